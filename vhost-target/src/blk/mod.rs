//! virtio-blk: the device's config space and its request format.

pub mod config;
pub mod request;
