//! I/O statistics of a bdev (`bdev_get_iostat`).
//!
//! Each channel gets its own [`IoCounters`], written only by the worker that
//! owns the channel (relaxed atomics, no shared cache line between workers);
//! readers sum them. Latencies are in nanoseconds, so `tick_rate` is 1e9.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use super::IoOp;

/// Counters of one channel. Written by one thread; read by any.
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct IoCounters {
    pub read_ops: AtomicU64,
    pub read_bytes: AtomicU64,
    pub read_latency_ns: AtomicU64,
    pub write_ops: AtomicU64,
    pub write_bytes: AtomicU64,
    pub write_latency_ns: AtomicU64,
    pub unmap_ops: AtomicU64,
    pub unmap_bytes: AtomicU64,
    pub unmap_latency_ns: AtomicU64,
    pub write_zeroes_ops: AtomicU64,
    pub write_zeroes_bytes: AtomicU64,
    pub flush_ops: AtomicU64,
    pub io_errors: AtomicU64,
}

impl IoCounters {
    /// Records one finished request. Only the owning thread calls this, so a
    /// load-then-store is enough and cheaper than a locked read-modify-write.
    #[inline]
    pub fn record(&self, op: IoOp, bytes: u64, latency_ns: u64, ok: bool) {
        #[inline]
        fn bump(c: &AtomicU64, by: u64) {
            c.store(c.load(Relaxed).wrapping_add(by), Relaxed);
        }
        if !ok {
            bump(&self.io_errors, 1);
            return;
        }
        match op {
            IoOp::Read => {
                bump(&self.read_ops, 1);
                bump(&self.read_bytes, bytes);
                bump(&self.read_latency_ns, latency_ns);
            }
            IoOp::Write { .. } => {
                bump(&self.write_ops, 1);
                bump(&self.write_bytes, bytes);
                bump(&self.write_latency_ns, latency_ns);
            }
            IoOp::Discard => {
                bump(&self.unmap_ops, 1);
                bump(&self.unmap_bytes, bytes);
                bump(&self.unmap_latency_ns, latency_ns);
            }
            IoOp::WriteZeroes { .. } => {
                bump(&self.write_zeroes_ops, 1);
                bump(&self.write_zeroes_bytes, bytes);
            }
            IoOp::Flush => bump(&self.flush_ops, 1),
        }
    }
}

/// A plain snapshot of summed counters.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct IoSnapshot {
    pub num_read_ops: u64,
    pub bytes_read: u64,
    pub read_latency_ticks: u64,
    pub num_write_ops: u64,
    pub bytes_written: u64,
    pub write_latency_ticks: u64,
    pub num_unmap_ops: u64,
    pub bytes_unmapped: u64,
    pub unmap_latency_ticks: u64,
    pub num_write_zeroes_ops: u64,
    pub bytes_write_zeroes: u64,
    pub num_flush_ops: u64,
    pub num_io_errors: u64,
}

/// All channels' counters of one bdev. The mutex guards only the list and is
/// taken when a channel opens and when statistics are read, never per request.
#[derive(Debug, Default)]
pub struct IoStats {
    channels: Mutex<Vec<Arc<IoCounters>>>,
}

impl IoStats {
    /// Counters for a new channel; they stay counted after the channel closes.
    pub fn register_channel(&self) -> Arc<IoCounters> {
        let c = Arc::new(IoCounters::default());
        self.channels
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(c.clone());
        c
    }

    pub fn snapshot(&self) -> IoSnapshot {
        let chans = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        let mut s = IoSnapshot::default();
        for c in chans.iter() {
            s.num_read_ops += c.read_ops.load(Relaxed);
            s.bytes_read += c.read_bytes.load(Relaxed);
            s.read_latency_ticks += c.read_latency_ns.load(Relaxed);
            s.num_write_ops += c.write_ops.load(Relaxed);
            s.bytes_written += c.write_bytes.load(Relaxed);
            s.write_latency_ticks += c.write_latency_ns.load(Relaxed);
            s.num_unmap_ops += c.unmap_ops.load(Relaxed);
            s.bytes_unmapped += c.unmap_bytes.load(Relaxed);
            s.unmap_latency_ticks += c.unmap_latency_ns.load(Relaxed);
            s.num_write_zeroes_ops += c.write_zeroes_ops.load(Relaxed);
            s.bytes_write_zeroes += c.write_zeroes_bytes.load(Relaxed);
            s.num_flush_ops += c.flush_ops.load(Relaxed);
            s.num_io_errors += c.io_errors.load(Relaxed);
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_sums_every_channel_including_failures() {
        let stats = IoStats::default();
        let a = stats.register_channel();
        let b = stats.register_channel();
        a.record(IoOp::Read, 4096, 10, true);
        b.record(IoOp::Read, 512, 5, true);
        b.record(IoOp::Write { fua: false }, 8192, 7, true);
        b.record(IoOp::Write { fua: false }, 8192, 7, false);
        let s = stats.snapshot();
        assert_eq!(s.num_read_ops, 2);
        assert_eq!(s.bytes_read, 4608);
        assert_eq!(s.read_latency_ticks, 15);
        assert_eq!(s.num_write_ops, 1);
        assert_eq!(s.num_io_errors, 1);
    }
}
