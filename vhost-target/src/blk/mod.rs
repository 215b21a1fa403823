//! virtio-blk: the device's config space and its request format.

pub mod config;
#[doc(hidden)]
pub mod fuzzing;
pub mod request;
