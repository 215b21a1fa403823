//! Helpers for the bdev unit tests: page-aligned buffers and a bounded
//! submit-and-wait loop (a test that hangs tells nobody anything).

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::time::{Duration, Instant};

use super::{BdevIo, Completion, IoChannel, IoError, IoOp, SubmitError};

/// A heap buffer aligned to 4096 bytes, good for O_DIRECT.
pub struct AlignedBuf {
    ptr: *mut u8,
    layout: Layout,
}

impl AlignedBuf {
    pub fn new(len: usize) -> Self {
        let layout = Layout::from_size_align(len.max(1), 4096).unwrap();
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        assert!(!ptr.is_null());
        Self { ptr, layout }
    }

    /// A buffer filled with a pattern that differs per byte and per `seed`.
    pub fn pattern(len: usize, seed: u8) -> Self {
        let mut b = Self::new(len);
        for (i, x) in b.as_mut_slice().iter_mut().enumerate() {
            *x = (i as u8).wrapping_mul(31).wrapping_add(seed) | 1;
        }
        b
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr owns `layout.size()` initialised bytes.
        unsafe { std::slice::from_raw_parts(self.ptr, self.layout.size()) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: ptr owns `layout.size()` initialised bytes, borrowed mutably.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }

    /// An iovec for `len` bytes starting `start` bytes into the buffer.
    pub fn iov(&mut self, start: usize, len: usize) -> libc::iovec {
        assert!(start + len <= self.layout.size());
        libc::iovec {
            // SAFETY: start is inside the allocation (checked above).
            iov_base: unsafe { self.ptr.add(start) }.cast(),
            iov_len: len,
        }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { dealloc(self.ptr, self.layout) }
    }
}

pub fn io(op: IoOp, offset: u64, iovs: &[libc::iovec]) -> BdevIo {
    BdevIo {
        tag: 7,
        op,
        offset,
        len: iovs.iter().map(|v| v.iov_len as u64).sum(),
        iovs: iovs.as_ptr(),
        iovcnt: iovs.len() as u32,
    }
}

pub fn ranged(op: IoOp, offset: u64, len: u64) -> BdevIo {
    BdevIo {
        tag: 7,
        op,
        offset,
        len,
        iovs: std::ptr::null(),
        iovcnt: 0,
    }
}

/// Polls until `n` completions arrived or five seconds passed.
pub fn wait_for(ch: &mut dyn IoChannel, n: usize) -> Vec<Completion> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut out = Vec::new();
    while out.len() < n {
        ch.kick();
        ch.poll(&mut |c| out.push(c));
        if out.len() >= n {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {n} completions, got {}",
            out.len()
        );
        std::thread::sleep(Duration::from_micros(200));
    }
    out
}

/// Submits `io`, waits for its completion and returns its result.
///
/// # Safety
/// The iovecs of `io` stay valid for the call.
pub unsafe fn run(ch: &mut dyn IoChannel, io: &BdevIo) -> Result<Result<(), IoError>, SubmitError> {
    // SAFETY: the caller vouches for the iovecs, and we wait for the completion.
    unsafe { ch.submit(io) }?;
    let c = wait_for(ch, 1);
    assert_eq!(c[0].tag, io.tag);
    assert_eq!(ch.in_flight(), 0);
    Ok(c[0].result)
}

/// Writes `data` at `offset` and panics unless it succeeds.
pub fn write_ok(ch: &mut dyn IoChannel, offset: u64, data: &mut AlignedBuf) {
    let len = data.as_slice().len();
    let iovs = [data.iov(0, len)];
    // SAFETY: `data` outlives the call.
    let r = unsafe { run(ch, &io(IoOp::Write { fua: false }, offset, &iovs)) };
    assert_eq!(r, Ok(Ok(())));
}

/// Reads `len` bytes at `offset` and panics unless it succeeds.
pub fn read_ok(ch: &mut dyn IoChannel, offset: u64, len: usize) -> AlignedBuf {
    let mut buf = AlignedBuf::new(len);
    buf.as_mut_slice().fill(0xee);
    let iovs = [buf.iov(0, len)];
    // SAFETY: `buf` outlives the call.
    let r = unsafe { run(ch, &io(IoOp::Read, offset, &iovs)) };
    assert_eq!(r, Ok(Ok(())));
    buf
}
