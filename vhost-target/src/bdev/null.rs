//! null bdev.
