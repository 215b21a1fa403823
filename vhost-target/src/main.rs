//! `vhost-target`: the daemon (`serve`), its JSON-RPC client (`rpc`) and the
//! load generator (`loadgen`). A thin shell over the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use serde_json::Value;

use vhost_target::cpumask::CpuSet;
use vhost_target::loadgen;
use vhost_target::rpc::client::{ClientError, RpcClient};
use vhost_target::rpc::server::RpcServer;
use vhost_target::rpc::DEFAULT_SOCKET;
use vhost_target::target::{Target, TargetSettings};
use vhost_target::vhost::PollMode;

#[derive(Parser)]
#[command(
    name = "vhost-target",
    version,
    about = "Tandem's vhost-user-blk target"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the target daemon.
    Serve(ServeArgs),
    /// Call a JSON-RPC method of a running daemon and print the result.
    Rpc(RpcArgs),
    /// Drive a vhost-user-blk socket with synthetic load, without a guest.
    Loadgen(loadgen::LoadgenArgs),
    /// A whole replicated cluster on this machine: an authority, two replicator servers and
    /// this target serving a replicated, encrypted device; prints the QEMU command line.
    Cluster(ClusterArgs),
    /// A replicator server (what `cluster` runs its servers with; same flags as
    /// `replicator serve`).
    #[command(hide = true)]
    ReplicatorServe(replicator::cli::ServeArgs),
}

#[derive(Args)]
struct ClusterArgs {
    /// Where everything keeps its data (authority, servers, key, sockets); reused if it exists.
    #[arg(long, default_value = "/var/tmp/tandem-cluster")]
    dir: PathBuf,
    /// The volume (and device `dev-VOLUME`) to create.
    #[arg(long, default_value = "vol0")]
    volume: String,
    /// Its size (e.g. 1G, 256M).
    #[arg(long, default_value = "1G", value_parser = loadgen::parse_size)]
    size: u64,
    /// The authority's primary lease in milliseconds.
    #[arg(long, default_value_t = 2000)]
    lease_ms: u64,
    /// Prometheus metrics address ("" for none).
    #[arg(long, default_value = "127.0.0.1:9300")]
    metrics_addr: String,
    #[command(flatten)]
    target: TargetFlags,
}

/// The target's flags that `serve` and `cluster` share.
#[derive(Args)]
struct TargetFlags {
    /// CPUs the target may use, as a hex mask (0x3) or a list ([0,2-3]);
    /// default: every online CPU.
    #[arg(short = 'm', long = "cpumask")]
    cpumask: Option<String>,
    /// How queue workers wait for work, unless a controller says otherwise:
    /// poll, interrupt or adaptive.
    #[arg(long, default_value = "adaptive")]
    poll_mode: PollMode,
    /// Serve the fault-injection method bdev_replicated_cut (tests and drills, never
    /// production).
    #[arg(long)]
    enable_fault_injection: bool,
    /// While running, ask the kernel (PM QoS, needs root) that no CPU take longer than this
    /// many microseconds to wake from idle; 0 makes idle CPUs poll instead of halting (on a
    /// VM, wake-ups of tens of microseconds become a few; idle CPUs stay at 100%). Off by
    /// default. See docs/operator-guide.md.
    #[arg(long)]
    cpu_latency_limit_us: Option<u32>,
}

impl TargetFlags {
    fn settings(&self, vhost_socket_dir: PathBuf) -> anyhow::Result<TargetSettings> {
        let core_mask = match &self.cpumask {
            Some(m) => CpuSet::parse(m).with_context(|| format!("bad -m {m:?}"))?,
            None => CpuSet::online(),
        };
        if !core_mask.is_subset_of(&CpuSet::online()) {
            tracing::warn!(mask = %core_mask, "-m names CPUs that are not online");
        }
        Ok(TargetSettings {
            vhost_socket_dir,
            core_mask,
            default_poll_mode: self.poll_mode,
            fault_injection: self.enable_fault_injection,
        })
    }
}

#[derive(Args)]
struct ServeArgs {
    /// SPDK-format JSON config to replay at start (as written by save_config).
    #[arg(short = 'c', long = "config")]
    config: Option<PathBuf>,
    /// Unix socket of the JSON-RPC server.
    #[arg(short = 'r', long = "rpc-socket", default_value = DEFAULT_SOCKET)]
    rpc_socket: PathBuf,
    /// Directory of the controllers' vhost-user sockets.
    #[arg(short = 'S', long = "vhost-sock-dir", default_value = ".")]
    vhost_sock_dir: PathBuf,
    #[command(flatten)]
    target: TargetFlags,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9300; port 0 picks
    /// one, logged at start). Off unless given.
    #[arg(long)]
    metrics_addr: Option<String>,
}

#[derive(Args)]
struct RpcArgs {
    /// Unix socket of the daemon.
    #[arg(short = 's', long = "server", default_value = DEFAULT_SOCKET)]
    server: PathBuf,
    /// Seconds to wait for the connection and the answer.
    #[arg(short = 't', long = "timeout", default_value_t = 60.0)]
    timeout: f64,
    /// Method name, e.g. bdev_get_bdevs.
    method: String,
    /// Parameters: one JSON object ('{"name": "Malloc0"}'), or key=value
    /// pairs whose values are read as JSON when they parse and as strings
    /// otherwise (name=Malloc0 num_blocks=1024).
    params: Vec<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve(args),
        Command::Rpc(args) => rpc(args),
        Command::Loadgen(args) => {
            init_logging();
            loadgen::run(&args).map(|()| ExitCode::SUCCESS)
        }
        Command::Cluster(args) => cluster(args),
        Command::ReplicatorServe(args) => {
            replicator::cli::tune_allocator();
            init_logging();
            replicator::cli::run_serve(args).map(|()| ExitCode::SUCCESS)
        }
    };
    result.unwrap_or_else(|e| {
        eprintln!("vhost-target: {e:#}");
        ExitCode::FAILURE
    })
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

// ---- serve ----

fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    // Before any thread exists, so every thread inherits the mask and the
    // signals wait for sigwait below instead of killing the process mid-I/O.
    let signals = block_termination_signals().context("cannot block SIGINT/SIGTERM")?;
    init_logging();

    let vhost_socket_dir = args.vhost_sock_dir.canonicalize().with_context(|| {
        format!(
            "vhost socket directory {} (-S)",
            args.vhost_sock_dir.display()
        )
    })?;
    if !vhost_socket_dir.is_dir() {
        bail!("-S {} is not a directory", vhost_socket_dir.display());
    }
    let settings = args.target.settings(vhost_socket_dir)?;
    // Held until serve returns: the kernel drops the request with the file.
    let _cpu_limit = replicator::cli::hold_cpu_latency_limit(args.target.cpu_latency_limit_us)?;
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        cpumask = %settings.core_mask,
        vhost_sock_dir = %settings.vhost_socket_dir.display(),
        poll_mode = %settings.default_poll_mode,
        "starting Tandem vhost-target"
    );
    let target = Arc::new(Mutex::new(Target::new(settings)));

    // The RPC socket opens first, so a second daemon on the same socket is
    // refused before it creates anything; clients wait on the lock until the
    // config has been replayed.
    let mut init = target.lock().unwrap_or_else(|e| e.into_inner());
    let server = RpcServer::start(&args.rpc_socket, target.clone())?;
    if let Some(path) = &args.config {
        if let Err(e) = vhost_target::config::load_file(path, &mut init) {
            init.shutdown();
            drop(init);
            server.shutdown();
            return Err(e.into());
        }
        tracing::info!(config = %path.display(), "config loaded");
    }
    drop(init);
    tracing::info!(socket = %server.path().display(), "JSON-RPC server listening");
    let metrics = match &args.metrics_addr {
        Some(a) => {
            let m = vhost_target::metrics::MetricsServer::start(a, target.clone())
                .with_context(|| format!("--metrics-addr {a}"))?;
            tracing::info!(addr = %m.addr(), "metrics listening");
            Some(m)
        }
        None => None,
    };

    let sig = wait_for_signal(&signals);
    tracing::info!(signal = sig, "shutting down");
    server.shutdown();
    drop(metrics);
    target.lock().unwrap_or_else(|e| e.into_inner()).shutdown();
    tracing::info!("stopped");
    Ok(ExitCode::SUCCESS)
}

fn block_termination_signals() -> std::io::Result<libc::sigset_t> {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it below.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: set is a valid sigset_t; SIGINT and SIGTERM are valid signals.
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
    }
    // SAFETY: set is initialised; a null old-set pointer is allowed.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(rc));
    }
    Ok(set)
}

/// Waits until SIGINT or SIGTERM (blocked in every thread) is pending.
fn wait_for_signal(set: &libc::sigset_t) -> i32 {
    loop {
        let mut sig = 0;
        // SAFETY: set is an initialised sigset_t whose signals are blocked;
        // sig is a valid out-pointer.
        let rc = unsafe { libc::sigwait(set, &mut sig) };
        if rc == 0 {
            return sig;
        }
    }
}

// ---- cluster ----

fn cluster(args: ClusterArgs) -> anyhow::Result<ExitCode> {
    use vhost_target::cluster::{ClusterOptions, LocalCluster};
    let signals = block_termination_signals().context("cannot block SIGINT/SIGTERM")?;
    init_logging();
    // The kernel applies it to the whole machine: the servers of the cluster too.
    let _cpu_limit = replicator::cli::hold_cpu_latency_limit(args.target.cpu_latency_limit_us)?;
    let opts = ClusterOptions {
        dir: args.dir.clone(),
        volume: args.volume,
        size_bytes: args.size,
        lease_ms: args.lease_ms,
        metrics_addr: args.metrics_addr,
        settings: args.target.settings(args.dir)?,
    };
    eprintln!(
        "starting an authority, replicator servers s1 and s2, and the target under {} ...",
        opts.dir.display()
    );
    let mut c = LocalCluster::start(&opts)?;
    println!("{}", c.instructions());
    // The site's monitor runs between signal checks.
    let sig = loop {
        if let Some(sig) = wait_for_signal_for(&signals, Duration::from_millis(500)) {
            break sig;
        }
        for event in c.check() {
            println!("{event}");
        }
    };
    eprintln!("signal {sig}: stopping the target, the servers and the authority");
    c.stop();
    eprintln!("stopped");
    Ok(ExitCode::SUCCESS)
}

/// Like [`wait_for_signal`], but gives up after `timeout`.
fn wait_for_signal_for(set: &libc::sigset_t, timeout: Duration) -> Option<i32> {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: libc::c_long::from(timeout.subsec_nanos() as i32),
    };
    // SAFETY: set is an initialised sigset_t whose signals are blocked; a null siginfo
    // pointer is allowed; ts is a valid timespec.
    let sig = unsafe { libc::sigtimedwait(set, std::ptr::null_mut(), &ts) };
    (sig > 0).then_some(sig)
}

// ---- rpc ----

fn rpc(args: RpcArgs) -> anyhow::Result<ExitCode> {
    let params = parse_cli_params(&args.params)?;
    let timeout = Duration::try_from_secs_f64(args.timeout)
        .ok()
        .filter(|d| !d.is_zero())
        .context("-t must be a positive number of seconds")?;
    let mut client = RpcClient::connect(&args.server, timeout)?;
    match client.call(&args.method, params) {
        Ok(result) => {
            println!("{}", serde_json::to_string_pretty(&result)?);
            Ok(ExitCode::SUCCESS)
        }
        Err(ClientError::Rpc { code, message }) => {
            let err = serde_json::json!({ "code": code, "message": message });
            eprintln!(
                "request {} failed:\n{}",
                args.method,
                serde_json::to_string_pretty(&err)?
            );
            Ok(ExitCode::FAILURE)
        }
        Err(e) => Err(e.into()),
    }
}

/// `[]` -> no params; `['{...}']` -> that object; `k=v ...` -> an object.
fn parse_cli_params(args: &[String]) -> anyhow::Result<Option<Value>> {
    match args {
        [] => Ok(None),
        [one] if one.trim_start().starts_with('{') => {
            let v: Value = serde_json::from_str(one).context("params are not valid JSON")?;
            if !v.is_object() {
                bail!("params must be a JSON object");
            }
            Ok(Some(v))
        }
        pairs => {
            let mut obj = serde_json::Map::new();
            for p in pairs {
                let Some((k, v)) = p.split_once('=') else {
                    bail!("expected key=value or one JSON object, got {p:?}");
                };
                if k.is_empty() {
                    bail!("empty key in {p:?}");
                }
                let value = serde_json::from_str(v).unwrap_or_else(|_| Value::String(v.to_owned()));
                obj.insert(k.to_owned(), value);
            }
            Ok(Some(Value::Object(obj)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn p(args: &[&str]) -> Option<Value> {
        parse_cli_params(&args.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn cli_params_accept_json_or_key_value() {
        assert_eq!(p(&[]), None);
        assert_eq!(p(&[r#"{"name": "M"}"#]), Some(json!({"name": "M"})));
        assert_eq!(
            p(&[
                "name=Malloc0",
                "num_blocks=1024",
                "readonly=true",
                "cpumask=0x1"
            ]),
            Some(
                json!({"name": "Malloc0", "num_blocks": 1024, "readonly": true, "cpumask": "0x1"})
            )
        );
        assert_eq!(p(&[r#"name="123""#]), Some(json!({"name": "123"})));
        assert!(parse_cli_params(&["novalue".into()]).is_err());
        assert!(parse_cli_params(&["[1]".into()]).is_err());
    }

    #[test]
    fn cli_definition_is_valid() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
