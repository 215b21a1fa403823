//! malloc bdev: a RAM disk in an anonymous mapping, like SPDK's.
//!
//! The mapping is reserved lazily (`MAP_NORESERVE`, zero pages on first
//! touch), so a large, mostly empty disk costs only what the guest writes.
//! All channels share one mapping; requests are served by copies in
//! `submit`.

use std::ptr::NonNull;
use std::sync::Arc;

use serde_json::json;

use super::params::{
    check_block_size, check_name, check_num_blocks, check_queue_depth, iov_total, IoBounds,
};
use super::sync_channel::{SyncChannel, SyncExecutor};
use super::{Bdev, BdevCaps, BdevError, BdevInfo, BdevIo, IoChannel, IoError, IoOp, IoStats};

/// The anonymous mapping that holds the disk. Unmapped when the bdev and
/// every channel are gone.
struct Region {
    base: NonNull<u8>,
    len: usize,
    page_size: usize,
}

// SAFETY: the region is plain memory with no thread affinity. Concurrent
// access from several channels is through raw pointers only (never through
// references), see `MallocExecutor::execute`.
unsafe impl Send for Region {}
// SAFETY: as above; `&Region` hands out nothing but the base pointer.
unsafe impl Sync for Region {}

impl Region {
    fn map(len: usize) -> std::io::Result<Self> {
        // SAFETY: an anonymous private mapping at an address of the kernel's
        // choosing aliases no existing memory.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: sysconf has no memory-safety preconditions.
        let page_size = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) })
            .unwrap_or(4096)
            .max(1);
        Ok(Self {
            base: NonNull::new(p.cast()).expect("mmap returned NULL without MAP_FIXED"),
            len,
            page_size,
        })
    }

    /// Zeroes `[offset, offset + len)`. Whole pages go back to the kernel
    /// (they read as zeroes afterwards and stop costing memory); the edges
    /// are cleared by hand.
    ///
    /// # Safety
    /// The range lies inside the region.
    unsafe fn zero(&self, offset: usize, len: usize) {
        let end = offset + len;
        let first_page = offset.next_multiple_of(self.page_size);
        let last_page = end / self.page_size * self.page_size;
        let base = self.base.as_ptr();
        if first_page < last_page {
            // SAFETY: [first_page, last_page) is a page-aligned subrange of
            // our own private anonymous mapping; MADV_DONTNEED on it makes
            // later reads see zero-fill pages and cannot unmap anything.
            let rc = unsafe {
                libc::madvise(
                    base.add(first_page).cast(),
                    last_page - first_page,
                    libc::MADV_DONTNEED,
                )
            };
            if rc == 0 {
                // SAFETY: both edges are inside the caller's range, inside the region.
                unsafe {
                    std::ptr::write_bytes(base.add(offset), 0, first_page - offset);
                    std::ptr::write_bytes(base.add(last_page), 0, end - last_page);
                }
                return;
            }
        }
        // SAFETY: the caller's range is inside the region.
        unsafe { std::ptr::write_bytes(base.add(offset), 0, len) };
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: base/len are exactly the mapping created in `map`, and no
        // channel can still use it (each holds an Arc to us).
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

pub struct MallocBdev {
    info: BdevInfo,
    stats: IoStats,
    region: Arc<Region>,
}

impl MallocBdev {
    pub fn new(
        name: &str,
        num_blocks: u64,
        block_size: u32,
        uuid: Option<uuid::Uuid>,
    ) -> Result<Self, BdevError> {
        check_name(name)?;
        check_block_size(block_size)?;
        let size = check_num_blocks(num_blocks, block_size)?;
        let len = usize::try_from(size)
            .ok()
            .filter(|&l| l <= isize::MAX as usize)
            .ok_or_else(|| {
                BdevError::InvalidParam(format!("{size} bytes do not fit in the address space"))
            })?;
        let region = Region::map(len).map_err(|source| BdevError::Io {
            path: format!("malloc bdev {name} ({size} bytes of anonymous memory)"),
            source,
        })?;
        Ok(Self {
            info: BdevInfo {
                name: name.to_owned(),
                product_name: "Malloc disk",
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
            region: Arc::new(region),
        })
    }
}

struct MallocExecutor {
    region: Arc<Region>,
}

impl SyncExecutor for MallocExecutor {
    unsafe fn validate(&self, io: &BdevIo) -> Result<(), IoError> {
        if matches!(io.op, IoOp::Read | IoOp::Write { .. }) {
            // The copy loop walks the iovecs, so they must describe exactly
            // `len` bytes, or it would run past the checked range.
            // SAFETY: the submit contract gives us `iovcnt` iovecs at `iovs`.
            if unsafe { iov_total(io.iovs, io.iovcnt) } != Some(io.len) {
                return Err(IoError::OutOfRange);
            }
        }
        Ok(())
    }

    unsafe fn execute(&mut self, io: &BdevIo) -> Result<(), IoError> {
        // `IoBounds::check` put offset + len inside the region, whose length
        // is a usize, so these conversions cannot truncate.
        let offset = io.offset as usize;
        let len = io.len as usize;
        let write = match io.op {
            IoOp::Read => false,
            IoOp::Write { .. } => true,
            IoOp::Flush => return Ok(()),
            IoOp::Discard | IoOp::WriteZeroes { .. } => {
                // SAFETY: range checked against the region by `IoBounds`.
                unsafe { self.region.zero(offset, len) };
                return Ok(());
            }
        };
        let mut disk = offset;
        for i in 0..io.iovcnt as usize {
            // SAFETY: i < iovcnt, per the submit contract.
            let iov = unsafe { &*io.iovs.add(i) };
            let n = iov.iov_len;
            // SAFETY: `validate` proved the iovecs sum to `len`, so
            // [disk, disk + n) stays inside [offset, offset + len), which is
            // inside the region. The guest buffer is valid and ours for the
            // request (submit contract). We copy with `ptr::copy` through raw
            // pointers, never references: other channels may copy to or from
            // the same disk bytes at this moment, and, as on a real disk,
            // overlapping concurrent requests give the guest torn data, never
            // a memory error (the mapping lives as long as our Arc). `copy`
            // rather than `copy_nonoverlapping` because nothing stops a
            // caller from pointing a buffer into the region itself.
            unsafe {
                let d = self.region.base.as_ptr().add(disk);
                let g = iov.iov_base.cast::<u8>();
                if write {
                    std::ptr::copy(g, d, n);
                } else {
                    std::ptr::copy(d, g, n);
                }
            }
            disk += n;
        }
        Ok(())
    }
}

impl Bdev for MallocBdev {
    fn info(&self) -> &BdevInfo {
        &self.info
    }

    fn open_channel(&self, queue_depth: u32) -> Result<Box<dyn IoChannel>, BdevError> {
        check_queue_depth(queue_depth)?;
        let bounds = IoBounds::new(self.info.block_size, self.info.size_bytes(), self.info.caps);
        let exec = MallocExecutor {
            region: self.region.clone(),
        };
        Ok(Box::new(SyncChannel::new(exec, bounds, queue_depth)))
    }

    fn iostat(&self) -> &IoStats {
        &self.stats
    }

    fn kind(&self) -> &'static str {
        "malloc"
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
    use crate::bdev::SubmitError;

    fn malloc(num_blocks: u64, block_size: u32) -> MallocBdev {
        MallocBdev::new("malloc0", num_blocks, block_size, None).unwrap()
    }

    #[test]
    fn fresh_disk_reads_zeroes() {
        let bdev = malloc(64, 512);
        let mut ch = bdev.open_channel(4).unwrap();
        assert!(read_ok(ch.as_mut(), 0, 32768)
            .as_slice()
            .iter()
            .all(|&b| b == 0));
    }

    #[test]
    fn data_round_trips() {
        let bdev = malloc(64, 4096);
        let mut ch = bdev.open_channel(4).unwrap();
        let mut data = AlignedBuf::pattern(8192, 3);
        write_ok(ch.as_mut(), 4096, &mut data);
        assert_eq!(read_ok(ch.as_mut(), 4096, 8192).as_slice(), data.as_slice());
    }

    #[test]
    fn data_round_trips_through_several_unaligned_iovecs() {
        let bdev = malloc(64, 512);
        let mut ch = bdev.open_channel(4).unwrap();
        // Write 1536 bytes scattered over three odd-sized, odd-placed pieces.
        let mut src = AlignedBuf::pattern(4096, 5);
        let iovs = [src.iov(3, 100), src.iov(200, 1000), src.iov(1300, 436)];
        // SAFETY: `src` outlives the call.
        let r = unsafe { run(ch.as_mut(), &io(IoOp::Write { fua: false }, 1024, &iovs)) };
        assert_eq!(r, Ok(Ok(())));
        let mut expect = Vec::new();
        expect.extend_from_slice(&src.as_slice()[3..103]);
        expect.extend_from_slice(&src.as_slice()[200..1200]);
        expect.extend_from_slice(&src.as_slice()[1300..1736]);
        assert_eq!(read_ok(ch.as_mut(), 1024, 1536).as_slice(), &expect[..]);

        // And read back into two pieces.
        let mut dst = AlignedBuf::new(2048);
        let iovs = [dst.iov(1, 700), dst.iov(1000, 836)];
        // SAFETY: `dst` outlives the call.
        let r = unsafe { run(ch.as_mut(), &io(IoOp::Read, 1024, &iovs)) };
        assert_eq!(r, Ok(Ok(())));
        assert_eq!(&dst.as_slice()[1..701], &expect[..700]);
        assert_eq!(&dst.as_slice()[1000..1836], &expect[700..]);
    }

    fn assert_zeroed_after(op: IoOp) {
        let bdev = malloc(64, 4096);
        let mut ch = bdev.open_channel(4).unwrap();
        write_ok(ch.as_mut(), 0, &mut AlignedBuf::pattern(64 * 4096, 9));
        // SAFETY: no iovecs.
        let r = unsafe { run(ch.as_mut(), &ranged(op, 4096, 3 * 4096)) };
        assert_eq!(r, Ok(Ok(())));
        let back = read_ok(ch.as_mut(), 0, 5 * 4096);
        let before = AlignedBuf::pattern(64 * 4096, 9);
        assert_eq!(&back.as_slice()[..4096], &before.as_slice()[..4096]);
        assert!(back.as_slice()[4096..4 * 4096].iter().all(|&b| b == 0));
        assert_eq!(
            &back.as_slice()[4 * 4096..],
            &before.as_slice()[4 * 4096..5 * 4096]
        );
    }

    #[test]
    fn read_after_discard_returns_zeroes() {
        assert_zeroed_after(IoOp::Discard);
    }

    #[test]
    fn read_after_write_zeroes_returns_zeroes() {
        assert_zeroed_after(IoOp::WriteZeroes { unmap: false });
        assert_zeroed_after(IoOp::WriteZeroes { unmap: true });
    }

    #[test]
    fn write_zeroes_on_sub_page_blocks_clears_exactly_the_range() {
        let bdev = malloc(64, 512);
        let mut ch = bdev.open_channel(4).unwrap();
        let before = AlignedBuf::pattern(32768, 2);
        write_ok(ch.as_mut(), 0, &mut AlignedBuf::pattern(32768, 2));
        // SAFETY: no iovecs.
        let r = unsafe { run(ch.as_mut(), &ranged(IoOp::Discard, 1536, 10240)) };
        assert_eq!(r, Ok(Ok(())));
        let back = read_ok(ch.as_mut(), 0, 32768);
        assert_eq!(&back.as_slice()[..1536], &before.as_slice()[..1536]);
        assert!(back.as_slice()[1536..11776].iter().all(|&b| b == 0));
        assert_eq!(&back.as_slice()[11776..], &before.as_slice()[11776..]);
    }

    #[test]
    fn out_of_range_and_misaligned_requests_are_refused() {
        let bdev = malloc(8, 512);
        let mut ch = bdev.open_channel(4).unwrap();
        let mut buf = AlignedBuf::new(1024);
        for (off, len) in [(4096u64, 512usize), (3584, 1024), (100, 512), (0, 100)] {
            let iovs = [buf.iov(0, len)];
            // SAFETY: refused requests touch nothing; `buf` outlives them anyway.
            let r = unsafe { ch.submit(&io(IoOp::Write { fua: false }, off, &iovs)) };
            assert_eq!(
                r,
                Err(SubmitError::Refused(IoError::OutOfRange)),
                "{off}+{len}"
            );
        }
        // iovecs that describe more than `len`: refused, not copied.
        let iovs = [buf.iov(0, 1024)];
        let mut req = io(IoOp::Read, 3584, &iovs);
        req.len = 512;
        // SAFETY: as above.
        let r = unsafe { ch.submit(&req) };
        assert_eq!(r, Err(SubmitError::Refused(IoError::OutOfRange)));
    }

    #[test]
    fn busy_when_queue_depth_reached() {
        let bdev = malloc(8, 512);
        let mut ch = bdev.open_channel(1).unwrap();
        // SAFETY: no iovecs.
        unsafe {
            ch.submit(&ranged(IoOp::Flush, 0, 0)).unwrap();
            assert_eq!(
                ch.submit(&ranged(IoOp::Flush, 0, 0)),
                Err(SubmitError::Busy)
            );
        }
        wait_for(ch.as_mut(), 1);
        assert_eq!(ch.in_flight(), 0);
    }

    #[test]
    fn several_channels_see_one_disk() {
        let bdev = Arc::new(malloc(64, 512));
        let mut writer = bdev.open_channel(4).unwrap();
        write_ok(writer.as_mut(), 512, &mut AlignedBuf::pattern(1024, 4));
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let bdev = bdev.clone();
                std::thread::spawn(move || {
                    let mut ch = bdev.open_channel(4).unwrap();
                    read_ok(ch.as_mut(), 512, 1024).as_slice().to_vec()
                })
            })
            .collect();
        for t in threads {
            assert_eq!(t.join().unwrap(), AlignedBuf::pattern(1024, 4).as_slice());
        }
    }

    #[test]
    fn bad_params_are_rejected() {
        assert!(MallocBdev::new("m", 0, 512, None).is_err());
        assert!(MallocBdev::new("m", 8, 1000, None).is_err());
        assert!(MallocBdev::new("m", 8, 8192, None).is_err());
        assert!(MallocBdev::new("", 8, 512, None).is_err());
        assert!(MallocBdev::new("m", u64::MAX / 512, 512, None).is_err());
    }

    #[test]
    fn create_params_replay_the_bdev() {
        let id = uuid::Uuid::new_v4();
        let bdev = MallocBdev::new("m1", 16, 512, Some(id)).unwrap();
        assert_eq!(bdev.kind(), "malloc");
        assert_eq!(bdev.info().product_name, "Malloc disk");
        assert!(!bdev.info().caps.volatile_cache);
        assert_eq!(
            bdev.create_params(),
            json!({"name": "m1", "num_blocks": 16, "block_size": 512, "uuid": id.to_string()})
        );
    }
}
