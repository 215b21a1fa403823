//! `replicator serve` and `replicator client ...`: the command line (thin `main.rs` calls
//! [`main`]).

use crate::authority::client::ClientAuthority;
use crate::authority::Authority;
use crate::peer_auth::PeerKey;
use crate::pipeline::{IoKind, IoRequest, PipelineConfig, ReplicationPipeline};
use crate::server::ServerConfig;
use crate::stamp::{parse_stamp, stamp_block, Stamp};
use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(
    name = "replicator",
    about = "Tandem storage server and replication client"
)]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Run a storage server.
    Serve(ServeArgs),
    /// Talk to a volume's primary through the replication pipeline.
    Client(ClientArgs),
    /// Run a whole site on this machine: an authority and two servers on loopback, one
    /// volume, data under one directory; Ctrl-C stops it.
    LocalSite(LocalSiteArgs),
    /// Benchmark: replicated writes through the client library against the same store
    /// written locally (docs/replication-performance.md).
    Bench(crate::bench::BenchArgs),
    /// Write a new random peer key (hex, mode 0600) for `--peer-key-file`: give the same file
    /// to every server and client of a site.
    PeerKey {
        /// Where to write it; an existing file is not overwritten.
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Parser, Debug)]
pub struct LocalSiteArgs {
    /// Directory for the authority's and the servers' data and logs (reused if it exists).
    #[arg(long)]
    pub dir: PathBuf,
    #[arg(long, default_value = "vol-a")]
    pub volume: String,
    /// Volume size in MiB.
    #[arg(long, default_value_t = 256)]
    pub size_mib: u64,
    /// The authority's lease (a failover waits about this long).
    #[arg(long, default_value_t = 2000)]
    pub lease_ms: u64,
    /// The site's shared key (`replicator peer-key --out F`): every server's data port then
    /// requires it, and the printed client commands pass it.
    #[arg(long)]
    pub peer_key_file: Option<PathBuf>,
}

#[derive(Parser, Debug)]
pub struct ServeArgs {
    /// This server's id at the authority (e.g. s1).
    #[arg(long)]
    pub id: String,
    #[arg(long)]
    pub site: String,
    #[arg(long)]
    pub data_dir: PathBuf,
    /// Replication-protocol address (port 0: any free port; the bound one is printed).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: String,
    /// Admin HTTP address: /health, /metrics.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub admin: String,
    /// Authority member addresses (JSON-RPC over TCP), comma-separated; the client finds
    /// the leader and follows redirects.
    #[arg(long, value_delimiter = ',', required = true)]
    pub authority: Vec<String>,
    /// How long one authority call may take, retries and redirects included, before the
    /// caller is told the authority is unavailable.
    #[arg(long, default_value_t = 3000)]
    pub authority_timeout_ms: u64,
    /// A volume this server holds a replica of (repeat for several).
    #[arg(long = "volume", required = true)]
    pub volumes: Vec<String>,
    #[arg(long, default_value_t = 1000)]
    pub replicate_timeout_ms: u64,
    #[arg(long, default_value_t = 1 << 20)]
    pub region_size: u64,
    /// Catch-up/rebuild copy rate limit, bytes per second (0: unlimited).
    #[arg(long, default_value_t = 0)]
    pub rebuild_rate: u64,
    #[arg(long, default_value_t = 200)]
    pub refresh_ms: u64,
    #[arg(long, default_value_t = 100)]
    pub drift_margin_ms: u64,
    /// Allow POST /fault on the admin port (tests only).
    #[arg(long)]
    pub enable_fault_injection: bool,
    /// Runtime threads serving connections. 1 (the default): a single-threaded runtime, so
    /// a request crosses no thread inside the server; on the 2-vCPU bench machine that took
    /// the replicated QD1 write from ~190 to ~140 us p50 at the same throughput
    /// (docs/replication-performance.md). 0: one per core, for a server whose many busy
    /// volumes need more than one core; N: exactly N.
    #[arg(long, default_value_t = 1)]
    pub worker_threads: usize,
    /// While serving, ask the kernel (PM QoS, `/dev/cpu_dma_latency`, needs root) that no
    /// CPU take longer than this many microseconds to wake from idle. 0: idle CPUs poll
    /// instead of halting, which on a VM cuts each wake-up of a server thread from tens of
    /// microseconds to a few, at the price of idle CPUs kept at 100% (see
    /// `replicator::cpu_latency` and docs/operator-guide.md). Off by default.
    #[arg(long)]
    pub cpu_latency_limit_us: Option<u32>,
    /// The site's shared key (hex, mode 0600; `replicator peer-key --out F` makes one). With
    /// it, every connection to the data port must prove it holds the key before any frame is
    /// served, and this server proves it to its peers (docs/replication.md,
    /// "Status", item 4). Without it, the data port serves anyone who reaches it.
    #[arg(long)]
    pub peer_key_file: Option<PathBuf>,
}

#[derive(Parser, Debug)]
pub struct ClientArgs {
    /// Authority member addresses (JSON-RPC over TCP), comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    pub authority: Vec<String>,
    #[arg(long, default_value_t = 3000)]
    pub authority_timeout_ms: u64,
    #[arg(long)]
    pub site: String,
    #[arg(long)]
    pub volume: String,
    #[arg(long, default_value_t = 30_000)]
    pub timeout_ms: u64,
    /// Ask an in-sync secondary to take over when the primary cannot be reached for this
    /// long (it checks the primary's health first). Off when absent.
    #[arg(long)]
    pub takeover_after_ms: Option<u64>,
    /// The site's shared key, when its servers run with `--peer-key-file`.
    #[arg(long)]
    pub peer_key_file: Option<PathBuf>,
    #[command(subcommand)]
    pub op: ClientOp,
}

#[derive(Subcommand, Debug)]
pub enum ClientOp {
    /// Write stamped blocks `start..start+count` with `write_id`.
    Write {
        #[arg(long)]
        start: u64,
        #[arg(long)]
        count: u64,
        #[arg(long)]
        write_id: u64,
        /// Requests in flight at once.
        #[arg(long, default_value_t = 32)]
        depth: usize,
        /// FLUSH after the writes.
        #[arg(long)]
        flush: bool,
    },
    /// Read blocks and print each one's stamp.
    Read {
        #[arg(long)]
        start: u64,
        #[arg(long)]
        count: u64,
    },
    /// Check that blocks carry their own stamp (and `write_id`, if given).
    Verify {
        #[arg(long)]
        start: u64,
        #[arg(long)]
        count: u64,
        #[arg(long)]
        write_id: Option<u64>,
    },
}

/// Keeps freed frame buffers in the process instead of returning them to the kernel.
/// glibc serves allocations of 128 KiB and more with mmap and trims its heap eagerly, so
/// every 128k write frame cost fresh pages (page faults and zeroing) on the client, the
/// primary and the secondary — seen as `brk`/page-fault time in the server's profile
/// (docs/replication-performance.md). Buffer pools would be the real fix.
pub fn tune_allocator() {
    // SAFETY: mallopt only changes allocator parameters; called before any threads start.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 512 << 20);
    }
}

pub fn main() -> anyhow::Result<()> {
    tune_allocator();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().cmd {
        Cmd::Serve(a) => run_serve(a),
        Cmd::Client(a) => client(a),
        Cmd::LocalSite(a) => local_site(a),
        Cmd::Bench(a) => crate::bench::run(a),
        Cmd::PeerKey { out } => {
            PeerKey::generate()?.write_key_file(&out)?;
            println!("wrote a new peer key to {}", out.display());
            Ok(())
        }
    }
}

/// `replicator serve`: runs a storage server until SIGTERM/SIGINT. Public so that another
/// binary can run a server from a (hidden) subcommand of its own, e.g. as the
/// [`crate::local_site::ServerCommand`] of a local cluster.
pub fn run_serve(a: ServeArgs) -> anyhow::Result<()> {
    let mut cfg = ServerConfig::new(&a.id, &a.site, a.data_dir);
    cfg.listen = a.listen.parse().context("--listen")?;
    cfg.admin = a.admin.parse().context("--admin")?;
    cfg.volumes = a.volumes;
    cfg.replicate_timeout = Duration::from_millis(a.replicate_timeout_ms);
    if a.region_size == 0 {
        bail!("--region-size must be > 0");
    }
    cfg.region_size = a.region_size;
    cfg.rebuild_rate_bytes = a.rebuild_rate;
    cfg.refresh_interval = Duration::from_millis(a.refresh_ms.max(1));
    cfg.peer_retry = cfg.refresh_interval;
    cfg.drift_margin_ms = a.drift_margin_ms;
    cfg.enable_fault_injection = a.enable_fault_injection;
    cfg.peer_key = load_peer_key(a.peer_key_file.as_deref())?;
    let authority: Arc<dyn Authority> = Arc::new(ClientAuthority::new(
        a.authority,
        Duration::from_millis(a.authority_timeout_ms.max(1)),
    ));
    // Held until the server returns: the kernel drops the request with the file.
    let _cpu_limit = hold_cpu_latency_limit(a.cpu_latency_limit_us)?;
    let rt = match a.worker_threads {
        0 => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?,
        1 => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?,
        n => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n)
            .enable_all()
            .build()?,
    };
    rt.block_on(crate::server::serve(cfg, authority))
}

/// Reads `--peer-key-file`, if one was given.
fn load_peer_key(path: Option<&std::path::Path>) -> anyhow::Result<Option<PeerKey>> {
    path.map(PeerKey::from_key_file)
        .transpose()
        .context("--peer-key-file")
}

/// Holds the `--cpu-latency-limit-us` request, if one was given.
pub fn hold_cpu_latency_limit(
    us: Option<u32>,
) -> anyhow::Result<Option<crate::cpu_latency::CpuLatencyLimit>> {
    let Some(us) = us else { return Ok(None) };
    let held = crate::cpu_latency::CpuLatencyLimit::hold(us).context("--cpu-latency-limit-us")?;
    tracing::info!(us, "holding a CPU wake-up latency limit (PM QoS)");
    Ok(Some(held))
}

fn client(a: ClientArgs) -> anyhow::Result<()> {
    // One client per runtime: the authority client's connections run on the runtime that
    // opened them, and this one stops being driven once the lookup is done.
    let authority = || -> Arc<dyn Authority> {
        Arc::new(ClientAuthority::new(
            a.authority.clone(),
            Duration::from_millis(a.authority_timeout_ms.max(1)),
        ))
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let info = rt
        .block_on(authority().volume_get(&a.site, &a.volume))
        .context("volume_get")?;
    let bs = info.block_size as u64;
    if bs < 64 {
        bail!("block size {bs} too small for stamped blocks");
    }
    let mut pc = PipelineConfig::new(&a.site, &a.volume, authority());
    pc.peer_key = load_peer_key(a.peer_key_file.as_deref())?;
    pc.request_timeout = Duration::from_millis(a.timeout_ms);
    pc.takeover_after = a.takeover_after_ms.map(Duration::from_millis);
    let p = ReplicationPipeline::start(pc)?;
    let wait = Duration::from_millis(a.timeout_ms + 1000);
    match a.op {
        ClientOp::Write {
            start,
            count,
            write_id,
            depth,
            flush,
        } => {
            let w = p.worker(depth.max(1))?;
            let mut next = start;
            let mut done = 0;
            while done < count {
                while next < start + count {
                    let data = stamp_block(
                        &Stamp {
                            volume: a.volume.clone(),
                            block: next,
                            write_id,
                        },
                        bs as usize,
                    );
                    let req = IoRequest {
                        tag: next,
                        kind: IoKind::Write,
                        offset: next * bs,
                        len: 0,
                        data,
                        fua: false,
                    };
                    if w.submit(req).is_err() {
                        break;
                    }
                    next += 1;
                }
                let c = w.wait(wait).context("no completion in time")?;
                if let Err(e) = c.result {
                    bail!("block {}: {e}", c.tag);
                }
                done += 1;
            }
            if flush {
                w.submit(IoRequest {
                    tag: u64::MAX,
                    kind: IoKind::Flush,
                    offset: 0,
                    len: 0,
                    data: Vec::new(),
                    fua: false,
                })
                .map_err(|_| anyhow::anyhow!("queue full"))?;
                let c = w.wait(wait).context("no flush completion")?;
                c.result.map_err(|e| anyhow::anyhow!("flush: {e}"))?;
            }
            println!("wrote {count} blocks");
        }
        ClientOp::Read { start, count } | ClientOp::Verify { start, count, .. } => {
            let want = match a.op {
                ClientOp::Verify { write_id, .. } => Some(write_id),
                _ => None,
            };
            let w = p.worker(1)?;
            let mut bad = 0;
            for b in start..start + count {
                w.submit(IoRequest {
                    tag: b,
                    kind: IoKind::Read,
                    offset: b * bs,
                    len: bs as u32,
                    data: Vec::new(),
                    fua: false,
                })
                .map_err(|_| anyhow::anyhow!("queue full"))?;
                let c = w.wait(wait).context("no completion in time")?;
                let data = c.result.map_err(|e| anyhow::anyhow!("block {b}: {e}"))?;
                let st = parse_stamp(&data);
                match want {
                    None => match st {
                        Some(s) => println!(
                            "block {b}: volume {} block {} write {}",
                            s.volume, s.block, s.write_id
                        ),
                        None => println!("block {b}: not stamped"),
                    },
                    Some(wid) => {
                        let ok = st.as_ref().is_some_and(|s| {
                            s.volume == a.volume
                                && s.block == b
                                && wid.is_none_or(|w| s.write_id == w)
                        });
                        if !ok {
                            bad += 1;
                            eprintln!("block {b}: bad stamp {st:?}");
                        }
                    }
                }
            }
            if want.is_some() {
                if bad > 0 {
                    bail!("{bad} of {count} blocks failed verification");
                }
                println!("verified {count} blocks");
            }
        }
    }
    Ok(())
}

fn local_site(a: LocalSiteArgs) -> anyhow::Result<()> {
    use crate::local_site::{LocalSite, LocalSiteOptions, ServerCommand};
    use std::sync::atomic::{AtomicBool, Ordering};
    if a.size_mib == 0 {
        bail!("--size-mib must be > 0");
    }
    static STOP: AtomicBool = AtomicBool::new(false);
    extern "C" fn on_signal(_: libc::c_int) {
        STOP.store(true, Ordering::SeqCst);
    }
    // SAFETY: the handler only stores to an atomic (async-signal-safe); the function
    // pointer lives for the whole program.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    let mut opts = LocalSiteOptions::new(
        &a.volume,
        a.size_mib << 20,
        ServerCommand::current_exe_serve()?,
    );
    opts.lease_ms = a.lease_ms;
    let key_flag = match &a.peer_key_file {
        Some(f) => {
            // Checked here, so a bad file is one clear error rather than two servers failing.
            load_peer_key(Some(f))?;
            let f = f.canonicalize()?;
            opts.server_args = vec!["--peer-key-file".into(), f.display().to_string()];
            format!(" --peer-key-file {}", f.display())
        }
        None => String::new(),
    };
    eprintln!(
        "starting an authority and servers s1, s2 under {} ...",
        a.dir.display()
    );
    let mut site = LocalSite::start(&a.dir, opts)?;
    let exe = std::env::current_exe()?;
    let exe = exe.display();
    let c = format!(
        "{exe} client --authority {} --site {} --volume {}{key_flag}",
        site.authority_addr, site.opts.site, site.opts.volume
    );
    println!(
        "local site up: authority {}, volume {} ({} MiB)",
        site.authority_addr, a.volume, a.size_mib
    );
    for s in site.servers() {
        println!(
            "  server {}: pid {} data {} admin http://{}/health  log {}",
            s.id,
            s.pid().unwrap_or(0),
            s.data_addr,
            s.admin_addr,
            s.log.display()
        );
    }
    let primary = site.primary().unwrap_or_default();
    let ppid = site
        .server(&primary)
        .ok()
        .and_then(|s| s.pid())
        .unwrap_or(0);
    println!(
        "\nwrite and verify through the replication pipeline:\n  {c} write --start 0 --count 1000 --write-id 1 --flush\n  {c} verify --start 0 --count 1000 --write-id 1\n  {c} read --start 0 --count 4\n\nfailover: kill the primary ({primary}) and watch this window:\n  kill -9 {ppid}\nthis process notices, asks the authority for a failover, and the other server takes the\nlease once the old one ran out (about {} ms); then verify again:\n  {c} verify --start 0 --count 1000 --write-id 1\n\nCtrl-C stops the site.",
        a.lease_ms
    );
    let mut last_primary = Some(primary);
    while !STOP.load(Ordering::SeqCst) {
        for ev in site.check_children() {
            println!("{ev}");
        }
        let now = site.primary();
        if now != last_primary {
            if let Some(p) = &now {
                if site.wait_primary(p, Duration::from_secs(30)).is_ok() {
                    println!("server {p} is now the leased primary");
                }
            }
            last_primary = now;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    println!("stopping the site");
    site.stop();
    Ok(())
}
