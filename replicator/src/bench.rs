//! `replicator bench`: the replicated write path against the same store written locally,
//! side by side in one run (docs/replication-performance.md has the numbers and how to run
//! it; `ci/bench-replicator.sh` is the wrapper).
//!
//! Replicated: a [`LocalSite`] (the authority in this process, two `replicator serve`
//! children on loopback, data files under `DIR/site`), written through the client library
//! ([`ReplicationPipeline`]) from this process. One server: a second `LocalSite` under
//! `DIR/solo` whose volume has a single replica, written the same way: the same client,
//! protocol, server and store without replication, so the difference is what replication
//! costs (the targets compare against this). Store: a [`ReplicaStore`] volume of the
//! same geometry under `DIR/local` (the same sparse-file store code, on the same disk),
//! written in this process by `min(depth, cores)` threads calling `VolumeReplica::write_at` —
//! the floor without any network; a synchronous `pwrite` has no queue depth of its own, and
//! more threads than cores only contend for the inode lock.
//!
//! Rounds interleave the phases (the disk's speed drifts); every round's numbers are
//! printed, and the medians. `--only` runs one replicated phase alone, for profiling.

use crate::authority::VolumeInfo;
use crate::frame::{self, VolumeName};
use crate::local_site::{LocalSite, LocalSiteOptions, ServerCommand};
use crate::pipeline::{IoKind, IoRequest, PipelineConfig, PipelineWorker, ReplicationPipeline};
use crate::store::{ReplicaStore, VolumeReplica};
use anyhow::{bail, Context};
use clap::Parser;
use std::io::{Read, Write};
use std::os::fd::RawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const BS: u64 = 4096;
const MIB: u64 = 1 << 20;

#[derive(Parser, Debug)]
pub struct BenchArgs {
    /// Directory for the local store and the site's data (same disk for both); emptied first.
    #[arg(long)]
    pub dir: PathBuf,
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Seconds per throughput/latency phase.
    #[arg(long, default_value_t = 3.0)]
    pub seconds: f64,
    /// Volume size (MiB), for both the local and the replicated volume.
    #[arg(long, default_value_t = 1024)]
    pub size_mib: u64,
    /// MiB written while the secondary is down, then caught up.
    #[arg(long, default_value_t = 512)]
    pub catchup_mib: u64,
    /// Leave out the catch-up and rebuild phases (to see whether they slow later rounds).
    #[arg(long)]
    pub skip_copy: bool,
    /// Queue depth of the throughput phases.
    #[arg(long, default_value_t = 32)]
    pub depth: usize,
    /// Local writer threads (0: min(depth, cores)).
    #[arg(long, default_value_t = 0)]
    pub local_threads: usize,
    /// More flags for every `replicator serve` (e.g. `--server-arg=--worker-threads=1`).
    #[arg(long = "server-arg", allow_hyphen_values = true)]
    pub server_args: Vec<String>,
    /// Program that runs a server (default: this executable, `serve`).
    #[arg(long)]
    pub server_program: Option<PathBuf>,
    /// Runs only this replicated phase for `--seconds` once and prints its figure (for
    /// profiling one phase with `perf`; no local run, no ratios).
    #[arg(long, value_parser = ["4k", "128k", "qd1", "qd1-raw"])]
    pub only: Option<String>,
    /// With `--only`: write to the one-server site instead of the replicated one.
    #[arg(long, requires = "only")]
    pub solo: bool,
    /// How the submitting thread waits for completions, as a `vhost-target` queue worker
    /// would: `interrupt` (sleep on the completion eventfd) or `adaptive` (poll for 200 us
    /// first, the queue worker's default). Interrupt is the default here because client and
    /// both servers share this machine's cores: a polling client takes CPU the servers need
    /// (measured on 2 vCPUs: one-server 4k QD32 ~75k IOPS interrupt, ~17k adaptive).
    #[arg(long, default_value = "interrupt", value_parser = ["adaptive", "interrupt"])]
    pub wait: String,
    /// Measure on the fresh sparse volumes instead of writing every block once first.
    #[arg(long)]
    pub no_precondition: bool,
    /// Hold a PM QoS limit on CPU wake-up latency (us) for the whole run: the kernel applies
    /// it to the machine, so to every configuration alike (see `--cpu-latency-limit-us` of
    /// `replicator serve`). 0: idle CPUs poll instead of halting.
    #[arg(long)]
    pub cpu_latency_limit_us: Option<u32>,
}

/// The adaptive queue worker's polling spell (`vhost-target`'s `ADAPTIVE_IDLE`).
const ADAPTIVE_SPIN: Duration = Duration::from_micros(200);

/// A small fast PRNG (xorshift64*): random offsets without a dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

#[derive(Clone, Copy)]
enum Pattern {
    Random4k,
    Seq128k,
}

impl Pattern {
    fn len(self) -> u64 {
        match self {
            Pattern::Random4k => BS,
            Pattern::Seq128k => 128 << 10,
        }
    }
}

/// Hands out offsets: random 4k blocks, or one sequential 128k stream wrapping at the end.
struct Offsets {
    pattern: Pattern,
    size: u64,
    seq: AtomicU64,
}

impl Offsets {
    fn next(&self, rng: &mut Rng) -> u64 {
        match self.pattern {
            Pattern::Random4k => (rng.next() % (self.size / BS)) * BS,
            Pattern::Seq128k => {
                let l = self.pattern.len();
                (self.seq.fetch_add(l, Ordering::Relaxed)) % (self.size / l * l)
            }
        }
    }
}

struct Throughput {
    ops: u64,
    secs: f64,
    bytes_per_op: u64,
}
impl Throughput {
    fn iops(&self) -> f64 {
        self.ops as f64 / self.secs
    }
    fn mbps(&self) -> f64 {
        self.ops as f64 * self.bytes_per_op as f64 / self.secs / 1e6
    }
}

fn local_throughput(
    rep: &Arc<VolumeReplica>,
    pattern: Pattern,
    threads: usize,
    secs: f64,
) -> anyhow::Result<Throughput> {
    let offs = Arc::new(Offsets {
        pattern,
        size: rep.size_bytes(),
        seq: AtomicU64::new(0),
    });
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(secs);
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let (rep, offs) = (rep.clone(), offs.clone());
            std::thread::spawn(move || -> anyhow::Result<u64> {
                let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (t as u64 + 1));
                let buf = vec![0xA5u8; pattern.len() as usize];
                let mut n = 0u64;
                while Instant::now() < end {
                    rep.write_at(offs.next(&mut rng), &buf)?;
                    n += 1;
                }
                Ok(n)
            })
        })
        .collect();
    let mut ops = 0;
    for h in handles {
        ops += h.join().expect("bench thread")?;
    }
    Ok(Throughput {
        ops,
        secs: start.elapsed().as_secs_f64(),
        bytes_per_op: pattern.len(),
    })
}

/// Waits for a completion the way a queue worker does: in adaptive mode it polls the
/// completion queue for [`ADAPTIVE_SPIN`] first; then (and in interrupt mode at once) it
/// sleeps on the completion eventfd.
fn wait_completion(w: &PipelineWorker, adaptive: bool) {
    if adaptive {
        let t = Instant::now();
        while t.elapsed() < ADAPTIVE_SPIN {
            if w.has_completions() {
                return;
            }
            std::hint::spin_loop();
        }
    }
    wait_fd(w.completion_fd(), Duration::from_millis(100));
}

/// Blocks until the worker's completion eventfd is readable (or `timeout`), then resets it.
fn wait_fd(fd: RawFd, timeout: Duration) {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    unsafe { libc::poll(&mut p, 1, timeout.as_millis() as i32) };
    let mut v = 0u64;
    // SAFETY: reads 8 bytes into a live u64 from a non-blocking eventfd; EAGAIN is fine.
    unsafe { libc::read(fd, (&mut v as *mut u64).cast(), 8) };
}

fn write_req(tag: u64, offset: u64, data: &[u8]) -> IoRequest {
    IoRequest {
        tag,
        kind: IoKind::Write,
        offset,
        len: 0,
        data: data.to_vec(),
        fua: false,
    }
}

fn take_completions(w: &PipelineWorker, done: &mut u64) -> anyhow::Result<()> {
    while let Some(c) = w.poll() {
        if let Err(e) = c.result {
            bail!("write {} failed: {e}", c.tag);
        }
        *done += 1;
    }
    Ok(())
}

/// Writes back every dirty page on the machine and waits for it (`sync`) before a phase, so
/// that no phase inherits another's write-back: on ext4 the phases write GiBs into the page
/// cache faster than the disk takes them, and past the kernel's dirty thresholds every
/// writer is throttled to the disk's pace (`balance_dirty_pages`). Measured without it:
/// replicated 4k ~20k IOPS in the first round, 2.6k in the next, after the copies had
/// left ~3 GB dirty. A no-op on tmpfs.
fn settle() {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
}

/// Runs one phase after [`settle`].
fn settled<T>(phase: impl FnOnce() -> T) -> T {
    settle();
    phase()
}

/// Writes every block of each volume once (128k sequential), so that what the phases
/// measure is overwrites, as on a volume in use, and all three configurations alike: a
/// first write to a hole of the sparse files costs the file system an allocation (tmpfs: a
/// page and its accounting; ext4: blocks and an extent update), which made the figure
/// depend on how much of each volume earlier phases had happened to touch. `--only` fills
/// just the volume it measures.
fn precondition(
    local: Option<&VolumeReplica>,
    sites: &[&PipelineWorker],
    size: u64,
    depth: usize,
    adaptive: bool,
) -> anyhow::Result<()> {
    let t = Instant::now();
    if let Some(local) = local {
        let buf = vec![0xA5u8; Pattern::Seq128k.len() as usize];
        for off in (0..size).step_by(buf.len()) {
            let n = (size - off).min(buf.len() as u64) as usize;
            local.write_at(off, &buf[..n])?;
        }
        local.sync()?;
    }
    for w in sites {
        let total = Some(size);
        replicated_throughput(w, size, Pattern::Seq128k, depth, 3600.0, total, adaptive)?;
    }
    eprintln!(
        "preconditioned: every block written once ({:.1} s)",
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Keeps `depth` writes in flight for `secs` (or until `total_bytes` are written).
fn replicated_throughput(
    w: &PipelineWorker,
    size: u64,
    pattern: Pattern,
    depth: usize,
    secs: f64,
    total_bytes: Option<u64>,
    adaptive: bool,
) -> anyhow::Result<Throughput> {
    let offs = Offsets {
        pattern,
        size,
        seq: AtomicU64::new(0),
    };
    let mut rng = Rng(0xD1B5_4A32_D192_ED03);
    let buf = vec![0x5Au8; pattern.len() as usize];
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(secs);
    let max_ops = total_bytes.map(|b| b / pattern.len());
    let (mut sent, mut done) = (0u64, 0u64);
    loop {
        let more = match max_ops {
            Some(m) => sent < m,
            None => Instant::now() < end,
        };
        while more && w.inflight() < depth && max_ops.is_none_or(|m| sent < m) {
            if w.submit(write_req(sent, offs.next(&mut rng), &buf))
                .is_err()
            {
                break;
            }
            sent += 1;
        }
        if !more && w.inflight() == 0 {
            break;
        }
        take_completions(w, &mut done)?;
        if w.inflight() >= depth || !more {
            wait_completion(w, adaptive);
            take_completions(w, &mut done)?;
        }
        if start.elapsed() > Duration::from_secs_f64(secs) + Duration::from_secs(60) {
            bail!("writes stopped completing");
        }
    }
    Ok(Throughput {
        ops: done,
        secs: start.elapsed().as_secs_f64(),
        bytes_per_op: pattern.len(),
    })
}

#[derive(Debug, Clone, Copy)]
struct Latency {
    p50_us: f64,
    p99_us: f64,
    max_us: f64,
    n: usize,
}

fn percentiles(mut v: Vec<Duration>) -> Latency {
    if v.is_empty() {
        return Latency {
            p50_us: f64::NAN,
            p99_us: f64::NAN,
            max_us: f64::NAN,
            n: 0,
        };
    }
    v.sort();
    let at = |q: f64| v[((v.len() - 1) as f64 * q) as usize].as_secs_f64() * 1e6;
    Latency {
        p50_us: at(0.50),
        p99_us: at(0.99),
        max_us: at(1.0),
        n: v.len(),
    }
}

fn local_latency(rep: &VolumeReplica, secs: f64) -> anyhow::Result<Latency> {
    let mut rng = Rng(0x1234_5678_9ABC_DEF1);
    let buf = vec![0xC3u8; BS as usize];
    let blocks = rep.size_bytes() / BS;
    let end = Instant::now() + Duration::from_secs_f64(secs);
    let mut lat = Vec::new();
    while Instant::now() < end {
        let off = (rng.next() % blocks) * BS;
        let t = Instant::now();
        rep.write_at(off, &buf)?;
        lat.push(t.elapsed());
    }
    Ok(percentiles(lat))
}

fn replicated_latency(
    w: &PipelineWorker,
    size: u64,
    secs: f64,
    adaptive: bool,
) -> anyhow::Result<Latency> {
    let end = Instant::now() + Duration::from_secs_f64(secs);
    qd1_writes(w, size, adaptive, || Instant::now() >= end)
}

/// QD1 random 4 KiB writes through `w` until `stop` says so.
fn qd1_writes(
    w: &PipelineWorker,
    size: u64,
    adaptive: bool,
    stop: impl Fn() -> bool,
) -> anyhow::Result<Latency> {
    let mut rng = Rng(0x0FED_CBA9_8765_4321);
    let buf = vec![0x3Cu8; BS as usize];
    let mut lat = Vec::new();
    let mut done = 0;
    while !stop() {
        let off = (rng.next() % (size / BS)) * BS;
        let t = Instant::now();
        if w.submit(write_req(done, off, &buf)).is_err() {
            bail!("QD1 submit refused");
        }
        let before = done;
        while done == before {
            wait_completion(w, adaptive);
            take_completions(w, &mut done)?;
            if t.elapsed() > Duration::from_secs(30) {
                bail!("QD1 write did not complete");
            }
        }
        lat.push(t.elapsed());
    }
    Ok(percentiles(lat))
}

/// QD1 writes sent straight to the primary over one blocking socket, no pipeline: what the
/// servers cost on their own (`--only qd1-raw`; the difference to `qd1` is the pipeline's).
fn raw_latency(info: &VolumeInfo, size: u64, secs: f64) -> anyhow::Result<Latency> {
    let p = info.primary_entry().context("no primary")?;
    let mut c = std::net::TcpStream::connect(&p.data_addr)?;
    c.set_nodelay(true)?;
    let buf = vec![0x3Cu8; BS as usize];
    let mut rng = Rng(7);
    let end = Instant::now() + Duration::from_secs_f64(secs);
    let mut lat = Vec::new();
    let mut hdr = [0u8; frame::HEADER_LEN];
    let mut id = 0;
    while Instant::now() < end {
        id += 1;
        let mut h = frame::Header::new(frame::MsgKind::Write, id, VolumeName::new(&info.volume)?);
        h.generation = info.generation;
        h.epoch = info.epoch;
        h.offset = (rng.next() % (size / BS)) * BS;
        h.length = BS as u32;
        let t = Instant::now();
        c.write_all(&frame::encode(&h, &buf))?;
        c.read_exact(&mut hdr)?;
        let raw = frame::parse_header_prefix(&hdr)?;
        let mut payload = vec![0u8; raw.payload_len];
        c.read_exact(&mut payload)?;
        if frame::finish_decode(&raw, payload)?.header.kind != frame::MsgKind::Ok {
            bail!("write {id} refused by the primary");
        }
        lat.push(t.elapsed());
    }
    Ok(percentiles(lat))
}

/// Round trip of a 64-byte message over a loopback TCP connection (TCP_NODELAY, blocking
/// sockets, an echo thread): the floor under any replicated round trip.
fn loopback_rtt(secs: f64) -> anyhow::Result<Latency> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    let echo = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut s, _) = l.accept()?;
        s.set_nodelay(true)?;
        let mut b = [0u8; 64];
        loop {
            if s.read_exact(&mut b).is_err() {
                return Ok(());
            }
            s.write_all(&b)?;
        }
    });
    let mut c = std::net::TcpStream::connect(addr)?;
    c.set_nodelay(true)?;
    let mut b = [7u8; 64];
    let end = Instant::now() + Duration::from_secs_f64(secs);
    let mut lat = Vec::new();
    while Instant::now() < end {
        let t = Instant::now();
        c.write_all(&b)?;
        c.read_exact(&mut b)?;
        lat.push(t.elapsed());
    }
    drop(c);
    let _ = echo.join();
    Ok(percentiles(lat))
}

/// Waits until the primary reports `peer` in sync; returns (seconds from `t0`, copy phase
/// seconds: first progress seen to in sync, regions copied).
fn await_copy(
    site: &LocalSite,
    primary: &str,
    peer: &str,
    t0: Instant,
) -> anyhow::Result<(f64, f64, u64)> {
    let p = site.server(primary)?;
    let vol = site.opts.volume.clone();
    let mut first_progress: Option<Instant> = None;
    let mut total = 0u64;
    loop {
        if let Some(h) = p.volume_health(&vol) {
            let peers = h["peers"].as_array().cloned().unwrap_or_default();
            if let Some(ph) = peers.iter().find(|x| x["server_id"] == peer) {
                let state = ph["state"].as_str().unwrap_or("");
                let ct = ph["copy_total"].as_u64().unwrap_or(0);
                if state == "catching_up" && first_progress.is_none() {
                    first_progress = Some(Instant::now());
                }
                // The largest total seen while copying (before the copy starts, the health
                // still shows the previous copy's): if an attempt fails and a resumed one
                // copies the rest, the figure still covers the whole copy and its time.
                if state == "catching_up" {
                    total = total.max(ct);
                }
                let at_authority = || {
                    site.info()
                        .is_ok_and(|i| i.servers.iter().any(|s| s.server_id == peer && s.in_sync))
                };
                if let Some(first) = first_progress {
                    if state == "in_sync" && at_authority() {
                        let now = Instant::now();
                        return Ok((
                            now.duration_since(t0).as_secs_f64(),
                            now.duration_since(first).as_secs_f64(),
                            total,
                        ));
                    }
                }
            }
        }
        if t0.elapsed() > Duration::from_secs(300) {
            bail!("{peer} did not get back in sync");
        }
        // Not faster: every look is an HTTP request the primary serves while it copies.
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_degraded(site: &LocalSite, primary: &str) -> anyhow::Result<()> {
    let p = site.server(primary)?;
    let end = Instant::now() + Duration::from_secs(30);
    while Instant::now() < end {
        if p.volume_health(&site.opts.volume)
            .is_some_and(|h| h["degraded"] == true && h["accepting_io"] == true)
        {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    bail!("primary did not report degraded")
}

struct Round {
    local_4k: Throughput,
    single_4k: Throughput,
    repl_4k: Throughput,
    local_128k: Throughput,
    single_128k: Throughput,
    repl_128k: Throughput,
    local_qd1: Latency,
    single_qd1: Latency,
    repl_qd1: Latency,
    rtt: Latency,
    catchup_mb: f64,
    catchup_secs: f64,
    catchup_copy_secs: f64,
    rebuild_mb: f64,
    rebuild_secs: f64,
    rebuild_copy_secs: f64,
    /// QD1 writes of a client during the rebuild.
    rebuild_qd1: Latency,
    disk_mbps: f64,
    store_copy_mbps: f64,
}

fn median(v: Vec<f64>) -> f64 {
    let mut v: Vec<f64> = v.into_iter().filter(|x| !x.is_nan()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

pub fn run(a: BenchArgs) -> anyhow::Result<()> {
    if a.rounds == 0 || a.depth == 0 || a.size_mib == 0 {
        bail!("--rounds, --depth and --size-mib must be > 0");
    }
    if a.catchup_mib > a.size_mib {
        bail!("--catchup-mib must not exceed --size-mib");
    }
    let _cpu_limit = crate::cli::hold_cpu_latency_limit(a.cpu_latency_limit_us)?;
    let size = a.size_mib * MIB;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = if a.local_threads == 0 {
        a.depth.min(cores)
    } else {
        a.local_threads
    };
    if a.dir.exists() {
        std::fs::remove_dir_all(&a.dir).with_context(|| format!("empty {}", a.dir.display()))?;
    }
    std::fs::create_dir_all(&a.dir)?;

    let store = ReplicaStore::open(&a.dir.join("local"))?;
    let local = store.open_or_create(&VolumeName::new("bench")?, size, BS as u32)?;

    let mut cmd = ServerCommand::current_exe_serve()?;
    if let Some(p) = &a.server_program {
        cmd.program = p.clone();
    }
    let mut opts = LocalSiteOptions::new("bench", size, cmd);
    opts.server_log = std::env::var("BENCH_SERVER_LOG").unwrap_or_else(|_| "warn".into());
    opts.server_args = ["--replicate-timeout-ms", "300", "--refresh-ms", "50"]
        .iter()
        .map(|s| s.to_string())
        .chain(a.server_args.iter().cloned())
        .collect();
    let mut solo_opts = opts.clone();
    solo_opts.site = "site-solo".into();
    solo_opts.servers = vec!["solo".into()];
    let mut site = LocalSite::start(&a.dir.join("site"), opts)?;
    // The same store behind the same client library and server, without replication: one
    // server, no secondary. What replication costs is the difference to this.
    let solo = LocalSite::start(&a.dir.join("solo"), solo_opts)?;
    let primary = site.primary().context("no primary")?;
    let secondary = site.secondary().context("no secondary")?;
    let pipeline = site_pipeline(&site)?;
    let w = pipeline.worker(a.depth)?;
    let w1 = pipeline.worker(1)?;
    let solo_pipeline = site_pipeline(&solo)?;
    let sw = solo_pipeline.worker(a.depth)?;
    let sw1 = solo_pipeline.worker(1)?;

    eprintln!(
        "bench: {} rounds, {} s per phase, volume {} MiB, depth {}, local threads {threads}, dir {}",
        a.rounds,
        a.seconds,
        a.size_mib,
        a.depth,
        a.dir.display()
    );
    let s = a.seconds;
    let adaptive = a.wait == "adaptive";
    if !a.no_precondition {
        let (local, sites): (_, Vec<&PipelineWorker>) = match (a.only.is_some(), a.solo) {
            (false, _) => (Some(&*local), vec![&sw, &w]),
            (true, true) => (None, vec![&sw]),
            (true, false) => (None, vec![&w]),
        };
        precondition(local, &sites, size, a.depth, adaptive)?;
    }
    settle();
    if let Some(only) = a.only.as_deref() {
        eprintln!("profiling phase ready (pid {})", std::process::id());
        let (w, w1, site) = if a.solo {
            (&sw, &sw1, &solo)
        } else {
            (&w, &w1, &site)
        };
        match only {
            "4k" => {
                let t =
                    replicated_throughput(w, size, Pattern::Random4k, a.depth, s, None, adaptive)?;
                println!("4k random QD{}: {:.0} IOPS", a.depth, t.iops());
            }
            "128k" => {
                let t =
                    replicated_throughput(w, size, Pattern::Seq128k, a.depth, s, None, adaptive)?;
                println!("128k sequential QD{}: {:.0} MB/s", a.depth, t.mbps());
            }
            "qd1-raw" => {
                let l = raw_latency(&site.info()?, size, s)?;
                println!(
                    "QD1 4k straight to the primary (no pipeline): p50 {:.1} us, p99 {:.1} us, {} writes",
                    l.p50_us, l.p99_us, l.n
                );
            }
            _ => {
                let l = replicated_latency(w1, size, s, adaptive)?;
                println!(
                    "QD1 4k: p50 {:.1} us, p99 {:.1} us, {} writes",
                    l.p50_us, l.p99_us, l.n
                );
            }
        }
        remove_volumes(&a.dir);
        return Ok(());
    }
    let mut rounds = Vec::new();
    for r in 0..a.rounds {
        let through = |w: &PipelineWorker, p: Pattern| {
            replicated_throughput(w, size, p, a.depth, s, None, adaptive)
        };
        let local_4k = settled(|| local_throughput(&local, Pattern::Random4k, threads, s))?;
        let single_4k = settled(|| through(&sw, Pattern::Random4k))?;
        let repl_4k = settled(|| through(&w, Pattern::Random4k))?;
        let local_128k = settled(|| local_throughput(&local, Pattern::Seq128k, threads, s))?;
        let single_128k = settled(|| through(&sw, Pattern::Seq128k))?;
        let repl_128k = settled(|| through(&w, Pattern::Seq128k))?;
        let local_qd1 = settled(|| local_latency(&local, s))?;
        let single_qd1 = settled(|| replicated_latency(&sw1, size, s, adaptive))?;
        let repl_qd1 = settled(|| replicated_latency(&w1, size, s, adaptive))?;
        let rtt = loopback_rtt(s.min(1.0))?;
        // The copies below are timed too: none starts under the phases' write-back.
        settle();

        let (mut catchup_mb, mut catchup_secs, mut catchup_copy_secs) =
            (f64::NAN, f64::NAN, f64::NAN);
        let (mut rebuild_mb, mut rebuild_secs, mut rebuild_copy_secs) =
            (f64::NAN, f64::NAN, f64::NAN);
        let mut rebuild_qd1 = percentiles(Vec::new());
        if !a.skip_copy {
            // Catch-up: the secondary misses `catchup_mib` of writes, then comes back.
            site.kill9(&secondary)?;
            replicated_throughput(
                &w,
                size,
                Pattern::Seq128k,
                a.depth,
                3600.0,
                Some(a.catchup_mib * MIB),
                adaptive,
            )?;
            wait_degraded(&site, &primary)?;
            let t0 = Instant::now();
            site.restart(&secondary)?;
            let regions;
            (catchup_secs, catchup_copy_secs, regions) =
                await_copy(&site, &primary, &secondary, t0)?;
            catchup_mb = (regions * MIB) as f64 / 1e6;

            // Rebuild: a brand-new replica (its data directory removed) gets a full copy.
            site.kill9(&secondary)?;
            let sdir = site.server(&secondary)?.data_dir.clone();
            to_trash(&a.dir, &sdir, &format!("{secondary}-round{r}"))?;
            std::fs::create_dir_all(&sdir)?;
            let t0 = Instant::now();
            site.restart(&secondary)?;
            // A client keeps writing during the rebuild: what the copy costs it.
            let copying = std::sync::atomic::AtomicBool::new(true);
            let (copy, during) = std::thread::scope(|sc| {
                let writer = sc.spawn(|| {
                    qd1_writes(&w1, size, adaptive, || {
                        !copying.load(std::sync::atomic::Ordering::Relaxed)
                    })
                });
                let copy = await_copy(&site, &primary, &secondary, t0);
                copying.store(false, std::sync::atomic::Ordering::Relaxed);
                (copy, writer.join().expect("writer thread"))
            });
            let regions;
            (rebuild_secs, rebuild_copy_secs, regions) = copy?;
            rebuild_qd1 = during?;
            rebuild_mb = (regions * MIB) as f64 / 1e6;
            site.wait_in_sync(Duration::from_secs(60))?;
        }
        let (disk_mbps, store_copy_mbps) = if a.skip_copy {
            (f64::NAN, f64::NAN)
        } else {
            settle();
            let d = disk_write_mbps(&a.dir, size, r)?;
            settle();
            (d, store_copy_mbps(&a.dir, size, r)?)
        };
        let rd = Round {
            disk_mbps,
            store_copy_mbps,
            local_4k,
            single_4k,
            repl_4k,
            local_128k,
            single_128k,
            repl_128k,
            local_qd1,
            single_qd1,
            repl_qd1,
            rtt,
            catchup_mb,
            catchup_secs,
            catchup_copy_secs,
            rebuild_mb,
            rebuild_secs,
            rebuild_copy_secs,
            rebuild_qd1,
        };
        eprintln!(
            "round {}: 4k store {:.0} one server {:.0} repl {:.0} IOPS ({:.2}x); \
             128k store {:.0} one server {:.0} repl {:.0} MB/s ({:.2}x); \
             QD1 p50 store {:.1} one server {:.1} repl {:.1} us, rtt {:.1} us; \
             catch-up {:.0} MB/s, rebuild {:.0} MB/s (client QD1 meanwhile p50 {:.0} \
             p99 {:.0} max {:.0} us), new file {:.0} MB/s, store copy {:.0} MB/s",
            r + 1,
            rd.local_4k.iops(),
            rd.single_4k.iops(),
            rd.repl_4k.iops(),
            rd.repl_4k.iops() / rd.single_4k.iops(),
            rd.local_128k.mbps(),
            rd.single_128k.mbps(),
            rd.repl_128k.mbps(),
            rd.repl_128k.mbps() / rd.single_128k.mbps(),
            rd.local_qd1.p50_us,
            rd.single_qd1.p50_us,
            rd.repl_qd1.p50_us,
            rd.rtt.p50_us,
            rd.catchup_mb / rd.catchup_copy_secs,
            rd.rebuild_mb / rd.rebuild_copy_secs,
            rd.rebuild_qd1.p50_us,
            rd.rebuild_qd1.p99_us,
            rd.rebuild_qd1.max_us,
            rd.disk_mbps,
            rd.store_copy_mbps,
        );
        rounds.push(rd);
    }
    drop((w, w1, sw, sw1));
    drop((pipeline, solo_pipeline));
    site.stop();
    solo.stop();
    remove_volumes(&a.dir);
    report(&rounds, &a, threads, cores);
    Ok(())
}

/// The store alone writing what a rebuild's secondary writes, without network or primary: a
/// new replica filled in 1 MiB writes, each written back as it goes and waited for and
/// dropped from the page cache `COPY_LAG` regions later (as the copies of a window are),
/// then synced. The ceiling of a rebuild on this storage by the rebuild's own method;
/// unlike [`disk_write_mbps`] it reuses the page cache's pages, which on this VM is what
/// sets the pace (a fresh page costs the host a fault).
fn store_copy_mbps(dir: &std::path::Path, size: u64, round: usize) -> anyhow::Result<f64> {
    const COPY_LAG: usize = 16;
    let root = dir.join("store-copy");
    let store = ReplicaStore::open(&root)?;
    let rep = store.open_or_create(&VolumeName::new("copy")?, size, BS as u32)?;
    let buf = vec![0x5Au8; MIB as usize];
    let regions: Vec<(u64, u64)> = (0..size)
        .step_by(MIB as usize)
        .map(|off| (off, (size - off).min(MIB)))
        .collect();
    let t = Instant::now();
    for (i, &(off, len)) in regions.iter().enumerate() {
        rep.write_at(off, &buf[..len as usize])?;
        rep.start_writeback(off, len)?;
        if let Some(&(o, l)) = i.checked_sub(COPY_LAG).map(|j| &regions[j]) {
            rep.finish_writeback_and_drop(o, l)?;
        }
    }
    for &(o, l) in &regions[regions.len().saturating_sub(COPY_LAG)..] {
        rep.finish_writeback_and_drop(o, l)?;
    }
    rep.sync()?;
    let mbps = size as f64 / t.elapsed().as_secs_f64() / 1e6;
    drop((rep, store));
    to_trash(dir, &root, &format!("store-copy-round{round}"))?;
    Ok(mbps)
}

/// A new file of `size` bytes under `dir` written sequentially in 1 MiB `pwrite`s through the
/// page cache and fdatasync'ed, timed to the end of the sync, then moved to the trash: the
/// plain way to fill a file. Every page it writes is a fresh one, which on this VM bounds it
/// (tmpfs gives the same figure as ext4); see [`store_copy_mbps`] for the rebuild's method.
fn disk_write_mbps(dir: &std::path::Path, size: u64, round: usize) -> anyhow::Result<f64> {
    use std::os::unix::fs::FileExt;
    let path = dir.join("disk-alone");
    let f = std::fs::File::create(&path)?;
    let buf = vec![0x3Cu8; MIB as usize];
    let t = Instant::now();
    for off in (0..size).step_by(buf.len()) {
        let n = (size - off).min(MIB) as usize;
        f.write_all_at(&buf[..n], off)?;
    }
    f.sync_data()?;
    let mbps = size as f64 / t.elapsed().as_secs_f64() / 1e6;
    drop(f);
    to_trash(dir, &path, &format!("disk-alone-round{round}"))?;
    Ok(mbps)
}

/// Moves a file or directory the bench is done with into `DIR/trash`, which
/// [`remove_volumes`] deletes after the last round: on a file system mounted with `discard`
/// (this machine's ext4) freeing 1 GiB issues discards at the next journal commits, which
/// the next rounds' fdatasyncs would wait for.
fn to_trash(dir: &std::path::Path, path: &std::path::Path, name: &str) -> std::io::Result<()> {
    let trash = dir.join("trash");
    std::fs::create_dir_all(&trash)?;
    std::fs::rename(path, trash.join(name))
}

/// Deletes the volumes' data the bench wrote (GiBs; on tmpfs, memory) and keeps the logs
/// and the authority's state under `dir` for a look afterwards.
fn remove_volumes(dir: &std::path::Path) {
    let _ = std::fs::remove_dir_all(dir.join("trash"));
    let _ = std::fs::remove_dir_all(dir.join("local"));
    for site in ["site", "solo"] {
        let Ok(servers) = std::fs::read_dir(dir.join(site)) else {
            continue;
        };
        for s in servers.flatten() {
            let _ = std::fs::remove_dir_all(s.path().join("volumes"));
        }
    }
}

/// The client library on a local site's volume, as `vhost-target` would run it.
fn site_pipeline(site: &LocalSite) -> std::io::Result<ReplicationPipeline> {
    ReplicationPipeline::start(PipelineConfig::new(
        &site.opts.site,
        &site.opts.volume,
        site.authority(),
    ))
}

/// Prints the results as Markdown (what docs/replication-performance.md holds).
fn report(rounds: &[Round], a: &BenchArgs, threads: usize, cores: usize) {
    println!(
        "Rounds: {}, {} s per phase; volume {} MiB (4 KiB blocks), depth {}; store: {threads} writer thread(s) on {cores} cores.\n",
        rounds.len(),
        a.seconds,
        a.size_mib,
        a.depth
    );
    // What the kernel applied, whoever asked for it: the figures depend on it more than on
    // anything else on a VM (see `replicator::cpu_latency`).
    let limit = match crate::cpu_latency::current_limit_us() {
        Ok(v) if v >= 1_000_000 => "none (idle CPUs may halt)".to_string(),
        Ok(v) => format!(
            "{v} us (PM QoS{})",
            if v == 0 { ": idle CPUs poll" } else { "" }
        ),
        Err(e) => format!("unknown ({e})"),
    };
    println!("CPU wake-up latency limit in force: {limit}.\n");
    println!("Store = `VolumeReplica::write_at` in this process; one server = client library to one server without a secondary; replicated = client library to a primary with one in-sync secondary. Ratio = replicated / one server.\n");
    println!("| round | 4k QD{d} store IOPS | one server | replicated | ratio | 128k seq store MB/s | one server | replicated | ratio |", d = a.depth);
    println!("|---|---|---|---|---|---|---|---|---|");
    for (i, r) in rounds.iter().enumerate() {
        println!(
            "| {} | {:.0} | {:.0} | {:.0} | {:.2} | {:.0} | {:.0} | {:.0} | {:.2} |",
            i + 1,
            r.local_4k.iops(),
            r.single_4k.iops(),
            r.repl_4k.iops(),
            r.repl_4k.iops() / r.single_4k.iops(),
            r.local_128k.mbps(),
            r.single_128k.mbps(),
            r.repl_128k.mbps(),
            r.repl_128k.mbps() / r.single_128k.mbps()
        );
    }
    let m = |f: &dyn Fn(&Round) -> f64| median(rounds.iter().map(f).collect());
    println!(
        "| median | {:.0} | {:.0} | {:.0} | {:.2} | {:.0} | {:.0} | {:.0} | {:.2} |\n",
        m(&|r| r.local_4k.iops()),
        m(&|r| r.single_4k.iops()),
        m(&|r| r.repl_4k.iops()),
        m(&|r| r.repl_4k.iops() / r.single_4k.iops()),
        m(&|r| r.local_128k.mbps()),
        m(&|r| r.single_128k.mbps()),
        m(&|r| r.repl_128k.mbps()),
        m(&|r| r.repl_128k.mbps() / r.single_128k.mbps()),
    );
    println!("| round | QD1 store p50 us | one server p50 / p99 us | replicated p50 / p99 us | loopback RTT p50 / p99 us | budget (one server p50 + RTT p50 + 30) | replicated p50 within budget |");
    println!("|---|---|---|---|---|---|---|");
    for (i, r) in rounds.iter().enumerate() {
        let budget = r.single_qd1.p50_us + r.rtt.p50_us + 30.0;
        println!(
            "| {} | {:.1} | {:.1} / {:.1} | {:.1} / {:.1} | {:.1} / {:.1} | {:.1} | {} |",
            i + 1,
            r.local_qd1.p50_us,
            r.single_qd1.p50_us,
            r.single_qd1.p99_us,
            r.repl_qd1.p50_us,
            r.repl_qd1.p99_us,
            r.rtt.p50_us,
            r.rtt.p99_us,
            budget,
            if r.repl_qd1.p50_us <= budget {
                "yes"
            } else {
                "no"
            }
        );
    }
    println!(
        "\nQD1 samples per round: store {}, one server {}, replicated {}.\n",
        rounds[0].local_qd1.n, rounds[0].single_qd1.n, rounds[0].repl_qd1.n
    );
    println!("| round | catch-up MB | copy s | catch-up MB/s (copy) | restart-to-in-sync s | rebuild MB | copy s | rebuild MB/s (copy) | restart-to-in-sync s | client QD1 during rebuild p50/p99/max us | new file MB/s | store copy MB/s |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    for (i, r) in rounds.iter().enumerate() {
        println!(
            "| {} | {:.0} | {:.2} | {:.0} | {:.2} | {:.0} | {:.2} | {:.0} | {:.2} | {:.0} / {:.0} / {:.0} | {:.0} | {:.0} |",
            i + 1,
            r.catchup_mb,
            r.catchup_copy_secs,
            r.catchup_mb / r.catchup_copy_secs,
            r.catchup_secs,
            r.rebuild_mb,
            r.rebuild_copy_secs,
            r.rebuild_mb / r.rebuild_copy_secs,
            r.rebuild_secs,
            r.rebuild_qd1.p50_us,
            r.rebuild_qd1.p99_us,
            r.rebuild_qd1.max_us,
            r.disk_mbps,
            r.store_copy_mbps,
        );
    }
    println!(
        "| median | | | {:.0} | | | | {:.0} | | {:.0} / {:.0} / {:.0} | {:.0} | {:.0} |",
        m(&|r| r.catchup_mb / r.catchup_copy_secs),
        m(&|r| r.rebuild_mb / r.rebuild_copy_secs),
        m(&|r| r.rebuild_qd1.p50_us),
        m(&|r| r.rebuild_qd1.p99_us),
        m(&|r| r.rebuild_qd1.max_us),
        m(&|r| r.disk_mbps),
        m(&|r| r.store_copy_mbps),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<BenchArgs, clap::Error> {
        BenchArgs::try_parse_from(["bench", "--dir", "/tmp/b"].iter().chain(args))
    }

    #[test]
    fn bad_phase_wait_mode_and_solo_without_a_phase_are_refused_by_name() {
        let e = parse(&["--only", "8k"]).unwrap_err().to_string();
        assert!(e.contains("8k") && e.contains("qd1-raw"), "{e}");
        let e = parse(&["--wait", "spin"]).unwrap_err().to_string();
        assert!(e.contains("spin") && e.contains("interrupt"), "{e}");
        let e = parse(&["--solo"]).unwrap_err().to_string();
        assert!(e.contains("--only"), "{e}");
        let a = parse(&["--only", "qd1", "--solo"]).unwrap();
        assert_eq!(
            (a.only.as_deref(), a.solo, a.wait.as_str()),
            (Some("qd1"), true, "interrupt")
        );
    }

    #[test]
    fn zero_rounds_depth_or_size_and_a_catch_up_larger_than_the_volume_are_refused() {
        for (args, what) in [
            (&["--rounds", "0"][..], "--rounds"),
            (&["--depth", "0"][..], "--depth"),
            (
                &["--size-mib", "64", "--catchup-mib", "128"][..],
                "--catchup-mib",
            ),
        ] {
            let e = run(parse(args).unwrap()).unwrap_err().to_string();
            assert!(e.contains(what), "{args:?}: {e}");
        }
    }
}
