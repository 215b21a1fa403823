//! null bdev: a device of a given size that stores nothing, like SPDK's.
//!
//! Reads leave the buffer untouched and writes are dropped, so the bdev costs
//! almost nothing and measures the rest of the stack. FLUSH, DISCARD and
//! WRITE_ZEROES succeed and do nothing.

use serde_json::json;

use super::params::{check_block_size, check_name, check_num_blocks, check_queue_depth, IoBounds};
use super::sync_channel::{SyncChannel, SyncExecutor};
use super::{Bdev, BdevCaps, BdevError, BdevInfo, BdevIo, IoChannel, IoError, IoStats};

pub struct NullBdev {
    info: BdevInfo,
    stats: IoStats,
}

impl NullBdev {
    pub fn new(
        name: &str,
        num_blocks: u64,
        block_size: u32,
        uuid: Option<uuid::Uuid>,
    ) -> Result<Self, BdevError> {
        check_name(name)?;
        check_block_size(block_size)?;
        check_num_blocks(num_blocks, block_size)?;
        Ok(Self {
            info: BdevInfo {
                name: name.to_owned(),
                product_name: "Null disk",
                block_size,
                num_blocks,
                physical_block_size: block_size,
                uuid: uuid.unwrap_or_else(uuid::Uuid::new_v4),
                caps: BdevCaps {
                    volatile_cache: false,
                    flush: true,
                    discard: true,
                    write_zeroes: true,
                    read_only: false,
                },
            },
            stats: IoStats::default(),
        })
    }
}

struct NullExecutor;

impl SyncExecutor for NullExecutor {
    unsafe fn execute(&mut self, _io: &BdevIo) -> Result<(), IoError> {
        Ok(())
    }
}

impl Bdev for NullBdev {
    fn info(&self) -> &BdevInfo {
        &self.info
    }

    fn open_channel(&self, queue_depth: u32) -> Result<Box<dyn IoChannel>, BdevError> {
        check_queue_depth(queue_depth)?;
        let bounds = IoBounds::new(self.info.block_size, self.info.size_bytes(), self.info.caps);
        Ok(Box::new(SyncChannel::new(
            NullExecutor,
            bounds,
            queue_depth,
        )))
    }

    fn iostat(&self) -> &IoStats {
        &self.stats
    }

    fn kind(&self) -> &'static str {
        "null"
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn create_params(&self) -> serde_json::Value {
        json!({
            "name": self.info.name,
            "num_blocks": self.info.num_blocks,
            "block_size": self.info.block_size,
            "uuid": self.info.uuid.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bdev::test_util::{io, ranged, read_ok, run, wait_for, write_ok, AlignedBuf};
    use crate::bdev::{IoOp, SubmitError};

    fn null() -> NullBdev {
        NullBdev::new("null0", 1024, 512, None).unwrap()
    }

    #[test]
    fn reads_leave_the_buffer_untouched_and_writes_succeed() {
        let bdev = null();
        let mut ch = bdev.open_channel(4).unwrap();
        write_ok(ch.as_mut(), 0, &mut AlignedBuf::pattern(4096, 1));
        let buf = read_ok(ch.as_mut(), 0, 4096);
        assert!(buf.as_slice().iter().all(|&b| b == 0xee));
    }

    #[test]
    fn flush_discard_and_write_zeroes_complete_ok() {
        let bdev = null();
        let mut ch = bdev.open_channel(4).unwrap();
        for op in [
            IoOp::Flush,
            IoOp::Discard,
            IoOp::WriteZeroes { unmap: false },
            IoOp::WriteZeroes { unmap: true },
        ] {
            let len = if op == IoOp::Flush { 0 } else { 4096 };
            // SAFETY: no iovecs.
            let r = unsafe { run(ch.as_mut(), &ranged(op, 512, len)) };
            assert_eq!(r, Ok(Ok(())));
        }
    }

    #[test]
    fn completions_wait_for_poll() {
        let bdev = null();
        let mut ch = bdev.open_channel(4).unwrap();
        // SAFETY: no iovecs.
        unsafe { ch.submit(&ranged(IoOp::Flush, 0, 0)) }.unwrap();
        assert_eq!(ch.in_flight(), 1);
        assert_eq!(wait_for(ch.as_mut(), 1).len(), 1);
        assert_eq!(ch.in_flight(), 0);
    }

    #[test]
    fn out_of_range_and_misaligned_requests_are_refused() {
        let bdev = null();
        let mut ch = bdev.open_channel(4).unwrap();
        let end = bdev.info().size_bytes();
        for (off, len) in [(end, 512), (end - 512, 1024), (100, 512), (0, 100)] {
            // SAFETY: no iovecs; refused requests touch nothing.
            let r = unsafe { ch.submit(&ranged(IoOp::Read, off, len)) };
            assert_eq!(
                r,
                Err(SubmitError::Refused(IoError::OutOfRange)),
                "{off}+{len}"
            );
        }
        assert_eq!(ch.in_flight(), 0);
    }

    #[test]
    fn busy_when_queue_depth_reached() {
        let bdev = null();
        let mut ch = bdev.open_channel(2).unwrap();
        let mut buf = AlignedBuf::new(512);
        let iovs = [buf.iov(0, 512)];
        let req = io(IoOp::Read, 0, &iovs);
        // SAFETY: `buf` outlives the channel's use of it (drained below).
        unsafe {
            ch.submit(&req).unwrap();
            ch.submit(&req).unwrap();
            assert_eq!(ch.submit(&req), Err(SubmitError::Busy));
        }
        assert_eq!(wait_for(ch.as_mut(), 2).len(), 2);
        // SAFETY: as above.
        unsafe { ch.submit(&req) }.unwrap();
    }

    #[test]
    fn bad_params_are_rejected() {
        assert!(NullBdev::new("n", 0, 512, None).is_err());
        assert!(NullBdev::new("n", 8, 1000, None).is_err());
        assert!(NullBdev::new("", 8, 512, None).is_err());
        assert!(null().open_channel(0).is_err());
    }

    #[test]
    fn create_params_replay_the_bdev() {
        let id = uuid::Uuid::new_v4();
        let bdev = NullBdev::new("null1", 2048, 4096, Some(id)).unwrap();
        assert_eq!(bdev.kind(), "null");
        assert_eq!(bdev.info().product_name, "Null disk");
        assert_eq!(
            bdev.create_params(),
            json!({"name": "null1", "num_blocks": 2048, "block_size": 4096, "uuid": id.to_string()})
        );
        assert_eq!(bdev.driver_specific(), json!({}));
    }
}
