//! uring bdev.
