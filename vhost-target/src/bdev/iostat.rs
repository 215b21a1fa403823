//! I/O statistics of a bdev (`bdev_get_iostat`).
//!
//! Each channel gets its own [`IoCounters`], written only by the worker that
//! owns the channel (relaxed atomics, no shared cache line between workers);
//! readers sum them. Latencies are in nanoseconds, so `tick_rate` is 1e9.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use super::IoOp;

/// Upper bounds (microseconds) of the latency histogram's buckets; the last bucket is
/// everything above. Log-spaced from 10 us to 5 s: a polled null request and a request
/// stalled by a failover both land in a bucket of their own.
pub const LATENCY_BUCKETS_US: [u64; 18] = [
    10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000,
    500_000, 1_000_000, 2_500_000, 5_000_000,
];
/// Buckets including the overflow one.
pub const HISTOGRAM_LEN: usize = LATENCY_BUCKETS_US.len() + 1;

/// Per-bucket counts (not cumulative) of one channel, written by its one worker.
#[derive(Debug, Default)]
pub struct LatencyHistogram([AtomicU64; HISTOGRAM_LEN]);

impl LatencyHistogram {
    #[inline]
    fn record(&self, latency_ns: u64) {
        let us = latency_ns / 1000;
        let i = LATENCY_BUCKETS_US
            .iter()
            .position(|&b| us <= b)
            .unwrap_or(LATENCY_BUCKETS_US.len());
        let c = &self.0[i];
        c.store(c.load(Relaxed).wrapping_add(1), Relaxed);
    }

    fn add_to(&self, out: &mut [u64; HISTOGRAM_LEN]) {
        for (o, c) in out.iter_mut().zip(&self.0) {
            *o += c.load(Relaxed);
        }
    }
}

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
    pub read_latency: LatencyHistogram,
    pub write_latency: LatencyHistogram,
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
                self.read_latency.record(latency_ns);
            }
            IoOp::Write { .. } => {
                bump(&self.write_ops, 1);
                bump(&self.write_bytes, bytes);
                bump(&self.write_latency_ns, latency_ns);
                self.write_latency.record(latency_ns);
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
    /// Reads per latency bucket ([`LATENCY_BUCKETS_US`], then the overflow bucket).
    pub read_latency_histogram: [u64; HISTOGRAM_LEN],
    pub write_latency_histogram: [u64; HISTOGRAM_LEN],
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
            c.read_latency.add_to(&mut s.read_latency_histogram);
            c.write_latency.add_to(&mut s.write_latency_histogram);
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
        // 10 ns and 5 ns are in the first bucket; a failed write is in no bucket.
        assert_eq!(s.read_latency_histogram[0], 2);
        assert_eq!(s.write_latency_histogram.iter().sum::<u64>(), 1);
    }

    #[test]
    fn latencies_land_in_their_buckets_and_beyond_the_last_in_overflow() {
        let stats = IoStats::default();
        let c = stats.register_channel();
        for us in [10, 11, 999, 1_000, 1_001, 4_000_000, 60_000_000] {
            c.record(IoOp::Write { fua: false }, 4096, us * 1000, true);
        }
        let h = stats.snapshot().write_latency_histogram;
        let at = |bound: u64| LATENCY_BUCKETS_US.iter().position(|&b| b == bound).unwrap();
        assert_eq!(h[at(10)], 1);
        assert_eq!(h[at(25)], 1);
        assert_eq!(h[at(1_000)], 2);
        assert_eq!(h[at(2_500)], 1);
        assert_eq!(h[at(5_000_000)], 1);
        assert_eq!(h[HISTOGRAM_LEN - 1], 1);
        assert_eq!(h.iter().sum::<u64>(), 7);
    }
}
