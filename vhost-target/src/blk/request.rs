//! virtio-blk request parsing.
