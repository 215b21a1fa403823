//! One queue worker's channel to a replicated volume: requests become pipeline requests
//! (split so each fits a frame), writes are encrypted on the way out and reads decrypted on
//! the way in, and a guest request completes when every part has.
//!
//! The channel is owned by its worker thread; the pipeline worker it wraps is lock-free, so
//! neither submission nor completion takes a lock. What still allocates per request: the
//! pipeline owns each write's payload (`Vec<u8>`), and a read's data arrives in one.

use std::sync::Arc;

use replicator::frame::ErrorCode;
use replicator::pipeline::{self, IoKind, IoRequest, PipelineWorker};
use replicator::volume_key::{VolumeKey, SECTOR_SIZE};

use super::label::LABEL_BYTES;
use crate::bdev::params::IoBounds;
use crate::bdev::sync_channel::CompletionRing;
use crate::bdev::{BdevIo, Completion, IoChannel, IoError, IoOp, SubmitError};

/// Largest part of a read or write: a pipeline frame holds at most 4 MiB; 1 MiB parts keep
/// one large guest request from holding the connection for long.
const DATA_PART: u64 = 1 << 20;
/// Largest part of a discard or write-zeroes (a frame's length field is 32 bits).
const RANGE_PART: u64 = 1 << 30;

/// A guest request in flight.
#[derive(Clone, Copy)]
struct Slot {
    tag: u32,
    op: IoOp,
    offset: u64,
    len: u64,
    iovs: *const libc::iovec,
    iovcnt: u32,
    parts_left: u32,
    result: Result<(), IoError>,
}

const FREE: Slot = Slot {
    tag: 0,
    op: IoOp::Flush,
    offset: 0,
    len: 0,
    iovs: std::ptr::null(),
    iovcnt: 0,
    parts_left: 0,
    result: Ok(()),
};

pub struct ReplicatedChannel {
    worker: PipelineWorker,
    key: Arc<VolumeKey>,
    bounds: IoBounds,
    slots: Box<[Slot]>,
    free: Vec<u32>,
    /// The pipeline worker's depth.
    part_capacity: u32,
    /// Requests that failed after some parts were refused, delivered at the next poll.
    failed: CompletionRing,
}

// SAFETY: the raw iovec pointers in `slots` point into memory the submitter keeps valid until
// the completion (the `submit` contract), whichever thread runs the channel; nothing else in
// the channel is tied to a thread. `IoChannel` requires `Send` so a worker can take its channel
// to its own thread.
unsafe impl Send for ReplicatedChannel {}

impl ReplicatedChannel {
    pub(super) fn new(
        worker: PipelineWorker,
        part_capacity: u32,
        key: Arc<VolumeKey>,
        bounds: IoBounds,
        queue_depth: u32,
    ) -> Self {
        Self {
            worker,
            key,
            bounds,
            slots: vec![FREE; queue_depth as usize].into_boxed_slice(),
            free: (0..queue_depth).rev().collect(),
            part_capacity,
            failed: CompletionRing::with_capacity(queue_depth as usize),
        }
    }

    fn parts_of(io: &BdevIo) -> u32 {
        let per = match io.op {
            IoOp::Read | IoOp::Write { .. } => DATA_PART,
            IoOp::Discard | IoOp::WriteZeroes { .. } => RANGE_PART,
            IoOp::Flush => return 1,
        };
        io.len.div_ceil(per).max(1) as u32
    }

    /// Calls `f(ptr, n)` for each piece of the request's buffers covering bytes
    /// `[at, at + len)` of the request, in order.
    ///
    /// # Safety
    /// `slot` describes a live request (the `submit` contract) and `at + len` is within it.
    unsafe fn segments(
        slot: &Slot,
        mut at: u64,
        mut len: usize,
        mut f: impl FnMut(*mut u8, usize),
    ) {
        for i in 0..slot.iovcnt as usize {
            if len == 0 {
                return;
            }
            // SAFETY: i < iovcnt; the iovecs are valid per the submit contract.
            let iov = unsafe { *slot.iovs.add(i) };
            let l = iov.iov_len as u64;
            if at >= l {
                at -= l;
                continue;
            }
            let n = ((l - at) as usize).min(len);
            // SAFETY: at < iov_len, so the pointer stays inside this iovec's buffer.
            f(unsafe { (iov.iov_base as *mut u8).add(at as usize) }, n);
            len -= n;
            at = 0;
        }
    }

    /// Copies `len` bytes of the request's buffers, from byte `at` of the request, into `out`.
    ///
    /// # Safety
    /// As [`Self::segments`].
    unsafe fn gather(slot: &Slot, at: u64, len: usize, out: &mut Vec<u8>) {
        // SAFETY: our caller's contract; each piece is inside the guest's buffers.
        unsafe {
            Self::segments(slot, at, len, |p, n| {
                out.extend_from_slice(std::slice::from_raw_parts(p, n))
            })
        }
    }

    /// Copies `data` into the request's buffers from byte `at` of the request.
    ///
    /// # Safety
    /// As [`Self::segments`], and the request is a read: its buffers are writable and not
    /// otherwise accessed until completion.
    unsafe fn scatter(slot: &Slot, at: u64, data: &[u8]) {
        let mut done = 0;
        // SAFETY: our caller's contract; each piece is inside the guest's buffers, which the
        // guest gave us to write.
        unsafe {
            Self::segments(slot, at, data.len(), |p, n| {
                std::ptr::copy_nonoverlapping(data[done..].as_ptr(), p, n);
                done += n;
            })
        }
    }

    fn finish_part(
        &mut self,
        slot_ix: u32,
        result: Result<(), IoError>,
        done: &mut dyn FnMut(Completion),
    ) -> bool {
        let s = &mut self.slots[slot_ix as usize];
        if s.result.is_ok() {
            s.result = result;
        }
        s.parts_left -= 1;
        if s.parts_left > 0 {
            return false;
        }
        done(Completion {
            tag: s.tag,
            result: s.result,
        });
        *s = FREE;
        self.free.push(slot_ix);
        true
    }
}

/// Decrypts a read in place. A sector that is all zeroes on the replicas was never written
/// (a new volume) or was zeroed or discarded (which travel as ranges, not data): it reads as
/// zeroes, as the guest expects. Real ciphertext is all zeroes with probability 2^-4096.
fn decrypt_read(key: &VolumeKey, data: &mut [u8], first_sector: u64) {
    for (i, sector) in data.chunks_exact_mut(SECTOR_SIZE).enumerate() {
        if sector.iter().any(|&b| b != 0) {
            key.decrypt(sector, first_sector + i as u64)
                .expect("a whole sector");
        }
    }
}

fn io_error(e: &pipeline::IoError) -> IoError {
    match e {
        pipeline::IoError::Server {
            code: ErrorCode::OutOfRange,
            ..
        } => IoError::OutOfRange,
        pipeline::IoError::Server { .. } => IoError::Errno(libc::EIO),
        pipeline::IoError::TimedOut => IoError::Errno(libc::ETIMEDOUT),
        pipeline::IoError::Invalid(_) => IoError::Errno(libc::EINVAL),
    }
}

impl IoChannel for ReplicatedChannel {
    fn queue_depth(&self) -> u32 {
        self.slots.len() as u32
    }

    unsafe fn submit(&mut self, io: &BdevIo) -> Result<(), SubmitError> {
        self.bounds.check(io).map_err(SubmitError::Refused)?;
        if matches!(io.op, IoOp::Read | IoOp::Write { .. }) {
            let mut total = 0u64;
            for i in 0..io.iovcnt as usize {
                // SAFETY: the submit contract: `iovcnt` valid iovecs.
                total += unsafe { (*io.iovs.add(i)).iov_len } as u64;
            }
            if total != io.len {
                return Err(SubmitError::Refused(IoError::OutOfRange));
            }
        }
        let parts = Self::parts_of(io);
        if parts > self.part_capacity {
            return Err(SubmitError::Refused(IoError::Errno(libc::EINVAL)));
        }
        if self.free.is_empty() || self.worker.inflight() as u32 + parts > self.part_capacity {
            return Err(SubmitError::Busy);
        }
        let ix = self.free.pop().expect("checked");
        let slot = Slot {
            tag: io.tag,
            op: io.op,
            offset: io.offset,
            len: io.len,
            iovs: io.iovs,
            iovcnt: io.iovcnt,
            parts_left: parts,
            result: Ok(()),
        };
        self.slots[ix as usize] = slot;
        for part in 0..parts {
            let tag = u64::from(ix) | (u64::from(part) << 32);
            let req = match io.op {
                IoOp::Flush => IoRequest {
                    tag,
                    kind: IoKind::Flush,
                    offset: 0,
                    len: 0,
                    data: Vec::new(),
                    fua: false,
                },
                IoOp::Read | IoOp::Write { .. } => {
                    let at = u64::from(part) * DATA_PART;
                    let len = (io.len - at).min(DATA_PART);
                    let (kind, data, fua) = if let IoOp::Write { fua } = io.op {
                        let mut data = Vec::with_capacity(len as usize);
                        // SAFETY: the submit contract; [at, at + len) is inside the request.
                        unsafe { Self::gather(&slot, at, len as usize, &mut data) };
                        self.key
                            .encrypt(&mut data, (io.offset + at) / SECTOR_SIZE as u64)
                            .expect("block-aligned lengths are whole sectors");
                        (IoKind::Write, data, fua)
                    } else {
                        (IoKind::Read, Vec::new(), false)
                    };
                    IoRequest {
                        tag,
                        kind,
                        offset: LABEL_BYTES + io.offset + at,
                        len: len as u32,
                        data,
                        fua,
                    }
                }
                IoOp::Discard | IoOp::WriteZeroes { .. } => {
                    let at = u64::from(part) * RANGE_PART;
                    IoRequest {
                        tag,
                        kind: if io.op == IoOp::Discard {
                            IoKind::Discard
                        } else {
                            IoKind::WriteZeroes
                        },
                        offset: LABEL_BYTES + io.offset + at,
                        len: (io.len - at).min(RANGE_PART) as u32,
                        data: Vec::new(),
                        fua: false,
                    }
                }
            };
            if self.worker.submit(req).is_err() {
                // Cannot happen: the check above keeps within the worker's depth; fail the
                // rest of this request rather than lose track of it.
                let left = parts - part;
                let s = &mut self.slots[ix as usize];
                s.result = Err(IoError::Errno(libc::EIO));
                s.parts_left -= left;
                if s.parts_left == 0 {
                    self.failed.push(Completion {
                        tag: s.tag,
                        result: s.result,
                    });
                    *s = FREE;
                    self.free.push(ix);
                }
                break;
            }
        }
        Ok(())
    }

    fn poll(&mut self, done: &mut dyn FnMut(Completion)) -> usize {
        let mut n = 0;
        while let Some(c) = self.failed.pop() {
            done(c);
            n += 1;
        }
        while let Some(c) = self.worker.poll() {
            let ix = (c.tag & 0xffff_ffff) as u32;
            let part = c.tag >> 32;
            let slot = self.slots[ix as usize];
            let result = match c.result {
                Ok(mut data) if slot.op == IoOp::Read => {
                    let at = part * DATA_PART;
                    let want = (slot.len - at).min(DATA_PART);
                    if data.len() as u64 != want {
                        Err(IoError::Errno(libc::EIO))
                    } else {
                        decrypt_read(
                            &self.key,
                            &mut data,
                            (slot.offset + at) / SECTOR_SIZE as u64,
                        );
                        // SAFETY: the slot's request is live until this completion is
                        // delivered; [at, at + data.len()) is inside it.
                        unsafe { Self::scatter(&slot, at, &data) };
                        Ok(())
                    }
                }
                Ok(_) => Ok(()),
                Err(e) => {
                    tracing::debug!(error = %e, "replicated request failed");
                    Err(io_error(&e))
                }
            };
            if self.finish_part(ix, result, done) {
                n += 1;
            }
        }
        n
    }

    fn completion_fd(&self) -> Option<std::os::fd::RawFd> {
        Some(self.worker.completion_fd())
    }

    fn in_flight(&self) -> u32 {
        (self.slots.len() - self.free.len()) as u32
    }
}
