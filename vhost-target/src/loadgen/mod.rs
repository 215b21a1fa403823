//! Guest-less vhost-user-blk load generator: a vhost-user *frontend* that plays the guest.
//!
//! Guests in this project run under TCG emulation, so a guest measures the emulator; this
//! module measures the backend instead. It works against any vhost-user-blk socket (Tandem's
//! `vhost-target`, `qemu-storage-daemon`'s vhost-user-blk export, ...).
//!
//! Three layers:
//! - [`Session`]: connect, negotiate, set up memfd guest memory and split virtqueues, plus a
//!   synchronous block API (`read`, `write`, `flush`, `discard`, `write_zeroes`, `get_id`)
//!   for integration tests.
//! - [`RawQueue`] (from [`Session::raw_queue`]): the malicious guest. Lay out any descriptor
//!   chain ([`RawDesc`]), indirect tables, bad addresses; wait for the used element; read
//!   the status byte back.
//! - [`run`]: the `vhost-target loadgen` command: fio-like jobs, one thread per queue,
//!   latency histograms, human or JSON output.
//!
//! ```no_run
//! use vhost_target::loadgen::{blk, RawDesc, Session, SessionOptions, VIRTQ_DESC_F_NEXT,
//!     VIRTQ_DESC_F_WRITE};
//! # fn main() -> Result<(), vhost_target::loadgen::LoadgenError> {
//! let mut s = Session::connect("/tmp/vhost.0", SessionOptions::default())?;
//! let mut q = s.raw_queue(0)?;
//! // A read whose data buffer lies outside guest memory: expect IOERR, not a crash.
//! let hdr = q.alloc_header(blk::VIRTIO_BLK_T_IN, 0)?;
//! let st = q.alloc_status()?;
//! let bad = q.gpa_outside();
//! let head = q.submit_chain(&[
//!     RawDesc { addr: hdr, len: 16, flags: VIRTQ_DESC_F_NEXT, next: 1 },
//!     RawDesc { addr: bad, len: 4096, flags: VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, next: 2 },
//!     RawDesc { addr: st, len: 1, flags: VIRTQ_DESC_F_WRITE, next: 0 },
//! ])?;
//! let used = q.wait_used(std::time::Duration::from_secs(5))?;
//! assert_eq!(used.map(|(id, _)| id), Some(u32::from(head)));
//! assert_eq!(q.read_status(st)?, blk::VIRTIO_BLK_S_IOERR);
//! # Ok(()) }
//! ```

mod memory;
mod ring;
mod session;
mod workload;

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use anyhow::Context as _;

pub use memory::{GuestMemory, Region, GUEST_BASE};
pub use ring::{
    need_event, Desc, SplitQueue, UsedElem, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
};
pub use session::{
    blk, features, BlkConfig, Queue, RawDesc, RawQueue, Session, SessionOptions, SYNC_MAX_IO,
};
pub use workload::{run_queue, stamp, JobResult, JobSpec, RwMode};

/// Errors of the load generator library.
#[derive(Debug, thiserror::Error)]
pub enum LoadgenError {
    /// The vhost-user conversation failed (connect, or a request the backend refused).
    #[error("vhost-user: {0}")]
    VhostUser(#[from] vhost::Error),
    /// The backend does not offer a feature we need.
    #[error("backend does not offer {0}")]
    MissingFeature(&'static str),
    /// memfd / mmap failed.
    #[error("guest memory: {0}")]
    GuestMemory(std::io::Error),
    /// Guest memory is exhausted (sizes are fixed at connect).
    #[error("out of guest memory")]
    OutOfGuestMemory,
    /// An address outside guest memory was accessed from our side.
    #[error("guest address {0:#x} is outside guest memory")]
    BadGuestAddress(u64),
    /// Not enough free descriptors.
    #[error("virtqueue full")]
    QueueFull,
    /// Kick/call eventfd failure.
    #[error("eventfd: {0}")]
    EventFd(std::io::Error),
    /// The backend did not complete a request in time.
    #[error("timed out waiting for the backend")]
    Timeout,
    /// The backend completed a request with a non-OK virtio-blk status.
    #[error("request failed with virtio-blk status {0}")]
    Status(u8),
    /// The backend returned a used element for a head that was not outstanding.
    #[error("backend returned unexpected used id {0}")]
    UnexpectedUsedId(u32),
    /// The queue does not exist or was taken by a worker.
    #[error("no queue {0}")]
    NoSuchQueue(u16),
    /// Bad argument.
    #[error("{0}")]
    InvalidArgument(String),
}

/// A size like `4k`, `1M`, `2GiB` or a byte count (clap value parser).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim().to_ascii_lowercase();
    let (num, mul) = match s.trim_end_matches(['b', 'i']).chars().last() {
        Some('k') => (&s[..s.find('k').unwrap_or(0)], 1u64 << 10),
        Some('m') => (&s[..s.find('m').unwrap_or(0)], 1 << 20),
        Some('g') => (&s[..s.find('g').unwrap_or(0)], 1 << 30),
        Some('t') => (&s[..s.find('t').unwrap_or(0)], 1 << 40),
        _ => (s.as_str(), 1),
    };
    let n: u64 = num.parse().map_err(|_| format!("bad size {s:?}"))?;
    n.checked_mul(mul)
        .ok_or_else(|| format!("size {s:?} overflows"))
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(s.len()));
    let n: f64 = num.parse().map_err(|_| format!("bad duration {s:?}"))?;
    let secs = match unit {
        "" | "s" => n,
        "ms" => n / 1e3,
        "us" => n / 1e6,
        "m" | "min" => n * 60.0,
        _ => return Err(format!("bad duration unit in {s:?}")),
    };
    Ok(Duration::from_secs_f64(secs))
}

/// A CPU list (`1`, `1,3`, `2-5`). A newtype, because clap takes a bare `Vec` for an
/// argument that repeats.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuList(pub Vec<usize>);

fn parse_cpus(s: &str) -> Result<CpuList, String> {
    let mut out = Vec::new();
    for part in s.split(',').filter(|p| !p.is_empty()) {
        if let Some((a, b)) = part.split_once('-') {
            let a: usize = a.parse().map_err(|_| format!("bad cpu {a:?}"))?;
            let b: usize = b.parse().map_err(|_| format!("bad cpu {b:?}"))?;
            out.extend(a..=b);
        } else {
            out.push(part.parse().map_err(|_| format!("bad cpu {part:?}"))?);
        }
    }
    if out.is_empty() {
        return Err("empty CPU list".into());
    }
    Ok(CpuList(out))
}

/// Command-line arguments of `vhost-target loadgen`.
#[derive(Debug, Clone, clap::Args)]
pub struct LoadgenArgs {
    /// The vhost-user-blk socket to drive.
    #[arg(long)]
    pub socket: PathBuf,
    /// Access pattern.
    #[arg(long, value_enum, default_value = "randread")]
    pub rw: RwMode,
    /// Block size (k/m suffixes are binary).
    #[arg(long, default_value = "4k", value_parser = parse_size)]
    pub bs: u64,
    /// Requests in flight per queue.
    #[arg(long, default_value_t = 32)]
    pub iodepth: u32,
    /// Queues to drive, one thread each.
    #[arg(long, default_value_t = 1)]
    pub queues: u16,
    /// CPUs to pin queue threads to, round robin (e.g. `1` or `1,3` or `2-5`).
    #[arg(long, value_parser = parse_cpus)]
    pub cpus: Option<CpuList>,
    /// How long to run (`10s`, `500ms`, `1m`).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub runtime: Duration,
    /// Stop after this many requests per queue (before `runtime` if reached first).
    #[arg(long)]
    pub ios: Option<u64>,
    /// Byte range to address (default: the device capacity).
    #[arg(long, value_parser = parse_size)]
    pub size: Option<u64>,
    /// Busy-poll the used ring with interrupts off (default; measures the backend, not
    /// eventfd wakeups). `--poll=false` sleeps on the call eventfd, as an interrupt-driven
    /// guest would.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub poll: bool,
    /// Percent reads for `--rw randrw`.
    #[arg(long, default_value_t = 50)]
    pub rwmixread: u32,
    /// Stamp every written sector with (offset, write id) and check reads and a final
    /// read-back against it.
    #[arg(long)]
    pub verify: bool,
    /// Virtqueue size (entries; needs 3 per request in flight).
    #[arg(long, default_value_t = 256)]
    pub queue_size: u16,
    /// Register memory with ADD_MEM_REG (CONFIGURE_MEM_SLOTS) instead of SET_MEM_TABLE.
    #[arg(long)]
    pub mem_slots: bool,
    /// Split guest memory into this many regions.
    #[arg(long, default_value_t = 1)]
    pub regions: usize,
    /// Do not negotiate VIRTIO_RING_F_EVENT_IDX.
    #[arg(long)]
    pub no_event_idx: bool,
    /// Seed of the offset generator.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Print one JSON object instead of the human summary.
    #[arg(long)]
    pub json: bool,
}

/// Aggregated results of a run (what `--json` prints).
#[derive(Debug, serde::Serialize)]
pub struct Report {
    /// Pattern.
    pub rw: RwMode,
    /// Block size, bytes.
    pub bs: u64,
    /// Depth per queue.
    pub iodepth: u32,
    /// Queues.
    pub queues: u16,
    /// Busy-polled.
    pub poll: bool,
    /// Seconds measured (longest queue).
    pub seconds: f64,
    /// Completed requests.
    pub ios: u64,
    /// Requests per second.
    pub iops: f64,
    /// Mebibytes per second.
    pub mib_s: f64,
    /// Mean latency, microseconds.
    pub lat_mean_us: f64,
    /// Median latency, microseconds.
    pub lat_p50_us: f64,
    /// 99th percentile, microseconds.
    pub lat_p99_us: f64,
    /// 99.9th percentile, microseconds.
    pub lat_p999_us: f64,
    /// Maximum, microseconds.
    pub lat_max_us: f64,
    /// Requests with a non-OK status or bad used element.
    pub errors: u64,
    /// Verify mismatches.
    pub verify_failures: u64,
}

fn pin_to(cpu: usize) -> std::io::Result<()> {
    // SAFETY: cpu_set_t is plain data; zeroed is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: CPU_SET writes inside `set`; it bounds-checks `cpu` against the set size.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: pid 0 = this thread; `set` is a valid cpu_set_t of the size passed.
    if unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Runs the load generator as `vhost-target loadgen` does.
pub fn run(args: &LoadgenArgs) -> anyhow::Result<()> {
    let report = run_job(args)?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "{:?} bs={} iodepth={} queues={} poll={}: {:.0} IOPS, {:.1} MiB/s, lat us mean {:.1} p50 {:.1} p99 {:.1} p99.9 {:.1} max {:.1}, {} ios in {:.2}s, errors {}, verify failures {}",
            report.rw, report.bs, report.iodepth, report.queues, report.poll, report.iops,
            report.mib_s, report.lat_mean_us, report.lat_p50_us, report.lat_p99_us,
            report.lat_p999_us, report.lat_max_us, report.ios, report.seconds, report.errors,
            report.verify_failures
        );
    }
    if report.errors > 0 || report.verify_failures > 0 {
        anyhow::bail!(
            "{} errors, {} verify failures",
            report.errors,
            report.verify_failures
        );
    }
    Ok(())
}

/// Connects, runs the job on every queue, and aggregates (the library form of [`run`]).
pub fn run_job(args: &LoadgenArgs) -> anyhow::Result<Report> {
    if args.bs == 0 || args.bs % 512 != 0 || args.bs > u64::from(u32::MAX) {
        anyhow::bail!("--bs must be a non-zero multiple of 512");
    }
    let per_queue = u64::from(args.iodepth) * (args.bs + 4096 + 64);
    let opts = SessionOptions {
        queues: args.queues,
        queue_size: args.queue_size,
        mem_size: per_queue * u64::from(args.queues) + (1 << 20),
        regions: args.regions,
        mem_slots: args.mem_slots,
        event_idx: !args.no_event_idx,
        ..SessionOptions::default()
    };
    let mut session = Session::connect(&args.socket, opts)
        .with_context(|| format!("connecting to {}", args.socket.display()))?;
    if session.num_queues() < args.queues {
        anyhow::bail!(
            "backend offers {} queues, --queues {} asked",
            session.num_queues(),
            args.queues
        );
    }
    let capacity = session.capacity_bytes();
    let size = args.size.unwrap_or(capacity).min(capacity);
    let spec = JobSpec {
        rw: args.rw,
        bs: args.bs,
        iodepth: args.iodepth,
        size,
        runtime: args.runtime,
        ios: args.ios,
        poll: args.poll,
        rwmixread: args.rwmixread,
        verify: args.verify,
        seed: args.seed,
    };
    let stop = AtomicBool::new(false);
    let mem = session.mem().clone();
    let queues: Vec<Queue> = (0..args.queues)
        .map(|i| session.take_queue(i).context("queue missing"))
        .collect::<anyhow::Result<_>>()?;
    let results: Vec<anyhow::Result<(Queue, JobResult)>> = std::thread::scope(|scope| {
        let handles: Vec<_> = queues
            .into_iter()
            .enumerate()
            .map(|(i, q)| {
                let (spec, stop, mem) = (&spec, &stop, mem.clone());
                let cpu = args
                    .cpus
                    .as_ref()
                    .and_then(|c| c.0.get(i % c.0.len()).copied());
                let nq = u32::from(args.queues);
                scope.spawn(move || -> anyhow::Result<(Queue, JobResult)> {
                    if let Some(cpu) = cpu {
                        pin_to(cpu).with_context(|| format!("pinning queue {i} to CPU {cpu}"))?;
                    }
                    Ok(run_queue(q, mem, spec, i as u32, nq, stop)?)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("queue thread panicked")))
            })
            .collect()
    });
    let mut hist = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)?;
    let (mut ios, mut bytes, mut errors, mut vf, mut secs) = (0, 0, 0, 0, 0f64);
    for r in results {
        let (q, r) = r?;
        session.put_queue(q);
        hist.add(&r.hist)?;
        ios += r.ios;
        bytes += r.bytes;
        errors += r.errors;
        vf += r.verify_failures;
        secs = secs.max(r.elapsed.as_secs_f64());
    }
    let us = |ns: u64| ns as f64 / 1e3;
    let secs = secs.max(1e-9);
    Ok(Report {
        rw: args.rw,
        bs: args.bs,
        iodepth: args.iodepth,
        queues: args.queues,
        poll: args.poll,
        seconds: secs,
        ios,
        iops: ios as f64 / secs,
        mib_s: bytes as f64 / secs / (1 << 20) as f64,
        lat_mean_us: hist.mean() / 1e3,
        lat_p50_us: us(hist.value_at_quantile(0.5)),
        lat_p99_us: us(hist.value_at_quantile(0.99)),
        lat_p999_us: us(hist.value_at_quantile(0.999)),
        lat_max_us: us(hist.max()),
        errors,
        verify_failures: vf,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_durations_parse() {
        assert_eq!(parse_size("4k").unwrap(), 4096);
        assert_eq!(parse_size("128K").unwrap(), 128 << 10);
        assert_eq!(parse_size("1m").unwrap(), 1 << 20);
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_size("512").unwrap(), 512);
        assert!(parse_size("x").is_err());
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("1m").unwrap(), Duration::from_secs(60));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert_eq!(parse_cpus("1,3-5").unwrap(), CpuList(vec![1, 3, 4, 5]));
    }

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        args: LoadgenArgs,
    }

    #[test]
    fn command_line_parses_every_flag() {
        use clap::Parser;
        let cli = Cli::try_parse_from([
            "loadgen",
            "--socket",
            "/s",
            "--rw",
            "randrw",
            "--bs",
            "128k",
            "--iodepth",
            "4",
            "--queues",
            "2",
            "--cpus",
            "1,3",
            "--runtime",
            "2s",
            "--ios",
            "10",
            "--size",
            "1g",
            "--poll",
            "false",
            "--rwmixread",
            "70",
            "--verify",
            "--queue-size",
            "64",
            "--mem-slots",
            "--regions",
            "2",
            "--no-event-idx",
            "--seed",
            "9",
            "--json",
        ])
        .unwrap();
        let a = cli.args;
        assert_eq!(a.rw, RwMode::Randrw);
        assert_eq!(a.bs, 128 << 10);
        assert_eq!(a.cpus, Some(CpuList(vec![1, 3])));
        assert!(!a.poll && a.verify && a.mem_slots && a.no_event_idx && a.json);
        let d = Cli::try_parse_from(["loadgen", "--socket", "/s"])
            .unwrap()
            .args;
        assert!(d.poll);
        assert_eq!((d.bs, d.iodepth, d.queues), (4096, 32, 1));
    }
}
