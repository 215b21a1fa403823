//! malloc bdev.
