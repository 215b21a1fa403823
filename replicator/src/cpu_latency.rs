//! A limit on how long an idle CPU may take to wake, requested from the kernel's PM QoS
//! (`/dev/cpu_dma_latency`) for as long as a [`CpuLatencyLimit`] is held.
//!
//! Why a storage server wants it: every request wakes a thread, and a thread on an idle CPU
//! wakes only as fast as that CPU leaves its idle state. Under a hypervisor the deepest state
//! is a halt, which exits to the host; on the 2-vCPU bench VM a pipe ping-pong between two
//! processes takes ~95 us per round trip when the CPUs halt and ~7 us when they poll
//! (`perf bench sched pipe`, docs/replication-performance.md). With a limit of 0 the idle loop
//! polls instead of halting. Polling happens only while a CPU has nothing to run, so it takes
//! no time from busy threads, but it keeps the CPU (under a hypervisor: the host's core) at
//! 100%, which is why it is an operator's choice and off by default. The kernel applies the
//! lowest limit any process holds to the whole machine; closing the file drops the request.
//! This is what `tuned`'s latency-performance profile does with its `force_latency`.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use thiserror::Error;

const DEVICE: &str = "/dev/cpu_dma_latency";

#[derive(Debug, Error)]
pub enum CpuLatencyError {
    #[error(
        "opening {DEVICE} to limit CPU wake-up latency (needs root, or write access to it): {0}"
    )]
    Open(io::Error),
    #[error("writing a limit of {us} us to {DEVICE}: {err}")]
    Write { us: u32, err: io::Error },
    #[error("a CPU wake-up limit of {0} us is larger than the kernel takes (at most {max} us)", max = i32::MAX)]
    TooLarge(u32),
}

/// The held request; dropping it withdraws it.
#[derive(Debug)]
pub struct CpuLatencyLimit {
    _file: File,
    us: u32,
}

impl CpuLatencyLimit {
    /// Asks that no CPU take longer than `us` microseconds to wake from idle.
    pub fn hold(us: u32) -> Result<Self, CpuLatencyError> {
        let v = i32::try_from(us).map_err(|_| CpuLatencyError::TooLarge(us))?;
        let mut f = OpenOptions::new()
            .write(true)
            .open(DEVICE)
            .map_err(CpuLatencyError::Open)?;
        // The device takes the value as a binary s32 (or as a hex string); one write.
        f.write_all(&v.to_ne_bytes())
            .map_err(|err| CpuLatencyError::Write { us, err })?;
        Ok(Self { _file: f, us })
    }

    pub fn us(&self) -> u32 {
        self.us
    }
}

/// The limit the kernel applies now (the lowest one held by any process), in microseconds.
pub fn current_limit_us() -> io::Result<i32> {
    let mut b = [0u8; 4];
    File::open(DEVICE)?.read_exact(&mut b)?;
    Ok(i32::from_ne_bytes(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_limit_is_in_force_until_dropped() {
        let before = match current_limit_us() {
            Ok(v) => v,
            Err(e) => {
                // Not root: holding must then fail with the error that says why.
                let err = CpuLatencyLimit::hold(0).unwrap_err();
                assert!(matches!(err, CpuLatencyError::Open(_)), "{err}");
                assert!(err.to_string().contains("needs root"), "{err}");
                eprintln!("{DEVICE} not readable ({e}): checked the error only");
                return;
            }
        };
        let want = 3;
        let held = CpuLatencyLimit::hold(want).expect("hold");
        assert!(current_limit_us().unwrap() <= want as i32);
        assert_eq!(held.us(), want);
        drop(held);
        // Another process may hold a lower limit of its own; ours is gone either way.
        let after = current_limit_us().unwrap();
        assert!(
            after == before || after < want as i32,
            "before {before}, after {after}"
        );
        assert!(matches!(
            CpuLatencyLimit::hold(u32::MAX),
            Err(CpuLatencyError::TooLarge(_))
        ));
    }
}
