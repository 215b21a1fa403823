//! virtio-blk config space.
