//! Checks shared by every bdev: creation parameters on the control path, and
//! the per-request range/alignment checks on the hot path.
//!
//! The virtio layer validates requests before they reach a bdev; these checks
//! are defence in depth, so a bug up there turns into a refused request
//! instead of a write outside the device.

use super::{BdevCaps, BdevError, BdevIo, IoError, IoOp};

/// Smallest and largest logical block sizes we accept, as SPDK does for the
/// common bdev modules.
pub const MIN_BLOCK_SIZE: u32 = 512;
pub const MAX_BLOCK_SIZE: u32 = 4096;

/// io_uring refuses rings larger than this, and virtio queues never exceed it.
pub const MAX_QUEUE_DEPTH: u32 = 32768;

pub fn check_name(name: &str) -> Result<(), BdevError> {
    if name.is_empty() {
        return Err(BdevError::InvalidParam("name must not be empty".into()));
    }
    Ok(())
}

pub fn check_block_size(block_size: u32) -> Result<(), BdevError> {
    if !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size) || !block_size.is_power_of_two() {
        return Err(BdevError::InvalidParam(format!(
            "block_size {block_size} must be a power of two between {MIN_BLOCK_SIZE} and {MAX_BLOCK_SIZE}"
        )));
    }
    Ok(())
}

/// Checks `num_blocks` and returns the size in bytes.
pub fn check_num_blocks(num_blocks: u64, block_size: u32) -> Result<u64, BdevError> {
    if num_blocks == 0 {
        return Err(BdevError::InvalidParam(
            "num_blocks must be greater than 0".into(),
        ));
    }
    num_blocks
        .checked_mul(u64::from(block_size))
        .ok_or_else(|| {
            BdevError::InvalidParam(format!(
                "num_blocks {num_blocks} x block_size {block_size} overflows a 64-bit size"
            ))
        })
}

pub fn check_queue_depth(queue_depth: u32) -> Result<(), BdevError> {
    if queue_depth == 0 || queue_depth > MAX_QUEUE_DEPTH {
        return Err(BdevError::Channel(format!(
            "queue_depth {queue_depth} must be between 1 and {MAX_QUEUE_DEPTH}"
        )));
    }
    Ok(())
}

/// What a channel needs to know to vet a request: a copy of the bdev's
/// geometry, so the hot path never dereferences the shared `Bdev`.
#[derive(Debug, Clone, Copy)]
pub struct IoBounds {
    block_mask: u64,
    size_bytes: u64,
    caps: BdevCaps,
}

impl IoBounds {
    pub fn new(block_size: u32, size_bytes: u64, caps: BdevCaps) -> Self {
        debug_assert!(block_size.is_power_of_two());
        Self {
            block_mask: u64::from(block_size) - 1,
            size_bytes,
            caps,
        }
    }

    /// Whether the bdev may start `io`: the operation is supported, allowed
    /// on a read-only bdev, and its range is block-aligned and inside the
    /// device. Does not look at the iovecs.
    #[inline]
    pub fn check(&self, io: &BdevIo) -> Result<(), IoError> {
        let writes = match io.op {
            IoOp::Read => false,
            IoOp::Write { .. } => true,
            IoOp::Flush => {
                // A flush carries no range; nothing to check but support.
                return if self.caps.flush {
                    Ok(())
                } else {
                    Err(IoError::Unsupported)
                };
            }
            IoOp::Discard if !self.caps.discard => return Err(IoError::Unsupported),
            IoOp::WriteZeroes { .. } if !self.caps.write_zeroes => {
                return Err(IoError::Unsupported)
            }
            IoOp::Discard | IoOp::WriteZeroes { .. } => true,
        };
        if writes && self.caps.read_only {
            return Err(IoError::Errno(libc::EROFS));
        }
        if (io.offset | io.len) & self.block_mask != 0 {
            return Err(IoError::OutOfRange);
        }
        match io.offset.checked_add(io.len) {
            Some(end) if end <= self.size_bytes => Ok(()),
            _ => Err(IoError::OutOfRange),
        }
    }
}

/// Sum of the iovec lengths, `None` on overflow.
///
/// # Safety
/// `iovs` points to `iovcnt` readable iovecs (or `iovcnt` is 0).
#[inline]
pub unsafe fn iov_total(iovs: *const libc::iovec, iovcnt: u32) -> Option<u64> {
    let mut total: u64 = 0;
    for i in 0..iovcnt as usize {
        // SAFETY: i < iovcnt, and the caller vouches for `iovcnt` iovecs at `iovs`.
        let iov = unsafe { &*iovs.add(i) };
        total = total.checked_add(iov.iov_len as u64)?;
    }
    Some(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn io(op: IoOp, offset: u64, len: u64) -> BdevIo {
        BdevIo {
            tag: 0,
            op,
            offset,
            len,
            iovs: std::ptr::null(),
            iovcnt: 0,
        }
    }

    const ALL: BdevCaps = BdevCaps {
        volatile_cache: false,
        flush: true,
        discard: true,
        write_zeroes: true,
        read_only: false,
    };

    #[test]
    fn block_sizes_outside_512_to_4096_or_not_power_of_two_are_rejected() {
        for bs in [0, 1, 256, 1000, 1536, 8192] {
            assert!(check_block_size(bs).is_err(), "{bs}");
        }
        for bs in [512, 1024, 2048, 4096] {
            assert!(check_block_size(bs).is_ok(), "{bs}");
        }
    }

    #[test]
    fn size_overflow_is_rejected() {
        assert!(check_num_blocks(u64::MAX / 2, 4096).is_err());
        assert!(check_num_blocks(0, 512).is_err());
        assert_eq!(check_num_blocks(8, 512).unwrap(), 4096);
    }

    #[test]
    fn range_past_end_or_wrapping_is_out_of_range() {
        let b = IoBounds::new(512, 4096, ALL);
        assert_eq!(b.check(&io(IoOp::Read, 0, 4096)), Ok(()));
        assert_eq!(
            b.check(&io(IoOp::Read, 512, 4096)),
            Err(IoError::OutOfRange)
        );
        assert_eq!(
            b.check(&io(IoOp::Discard, u64::MAX - 511, 1024)),
            Err(IoError::OutOfRange)
        );
        assert_eq!(b.check(&io(IoOp::Read, 1, 512)), Err(IoError::OutOfRange));
        assert_eq!(b.check(&io(IoOp::Read, 0, 100)), Err(IoError::OutOfRange));
    }

    #[test]
    fn unsupported_ops_and_writes_to_read_only_are_refused() {
        let b = IoBounds::new(
            512,
            4096,
            BdevCaps {
                read_only: true,
                ..BdevCaps::default()
            },
        );
        assert_eq!(b.check(&io(IoOp::Flush, 0, 0)), Err(IoError::Unsupported));
        assert_eq!(
            b.check(&io(IoOp::Discard, 0, 512)),
            Err(IoError::Unsupported)
        );
        assert_eq!(
            b.check(&io(IoOp::Write { fua: false }, 0, 512)),
            Err(IoError::Errno(libc::EROFS))
        );
        assert_eq!(b.check(&io(IoOp::Read, 0, 512)), Ok(()));
    }
}
