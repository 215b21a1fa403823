//! A whole site on one machine: an authority (the `authority` crate's daemon, in this
//! process) and storage servers as child processes on loopback, their data under one
//! directory. For newcomers (`replicator local-site`), benchmarks (`replicator bench`) and
//! tests; another binary can run one too (`vhost-target`'s local cluster): the command that
//! runs a server is [`ServerCommand`], so that binary can point it at a hidden subcommand of
//! its own that calls [`crate::cli::run_serve`].
//!
//! Ports: every server binds port 0 and prints its addresses on its first stdout line
//! (`replicator listening data=... admin=...`), which is read back here. The authority binds
//! addresses picked free just before (its daemon takes a fixed address); a start that loses
//! the race for one is retried with new ones.
//!
//! [`LocalSite::check_children`] is the site's monitor: a server that exited is reported,
//! and if it held the volume's lease the authority is asked for a failover — what a site's
//! monitor does; without one nothing would ask (see docs/replication.md, Status).

use crate::authority::client::ClientAuthority;
use crate::authority::{Authority, AuthorityError, VolumeInfo};
use authority::client::{AuthorityClient, ClientOptions};
use authority::config::AuthorityConfig;
use authority::daemon::Daemon;
use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum LocalSiteError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("authority: {0}")]
    Authority(String),
    #[error("server {id} did not start: {reason} (log: {log})")]
    ServerStart {
        id: String,
        reason: String,
        log: PathBuf,
    },
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout { what: String, after: Duration },
    #[error("no server {0} in this site")]
    NoSuchServer(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> LocalSiteError {
    let what = what.into();
    move |source| LocalSiteError::Io { what, source }
}

/// How a storage server process is started: `program args... --id ... --site ...`.
#[derive(Debug, Clone)]
pub struct ServerCommand {
    pub program: PathBuf,
    /// Arguments before the server's own flags, e.g. `["serve"]`, or a hidden subcommand
    /// of another binary that runs [`crate::cli::run_serve`].
    pub args_prefix: Vec<String>,
}

impl ServerCommand {
    /// This executable's `serve` subcommand (right for the `replicator` binary itself).
    pub fn current_exe_serve() -> std::io::Result<Self> {
        Ok(Self {
            program: std::env::current_exe()?,
            args_prefix: vec!["serve".into()],
        })
    }
}

#[derive(Debug, Clone)]
pub struct LocalSiteOptions {
    pub site: String,
    pub volume: String,
    pub size_bytes: u64,
    pub block_size: u32,
    /// Server ids; the first is the volume's first primary.
    pub servers: Vec<String>,
    /// The authority's lease: a failover waits out about this long.
    pub lease_ms: u64,
    pub server_command: ServerCommand,
    /// More `serve` flags for every server (e.g. `--replicate-timeout-ms 300`).
    pub server_args: Vec<String>,
    /// `RUST_LOG` for the servers (their stderr goes to `DIR/<id>.log`).
    pub server_log: String,
    /// How long a server may take to print its addresses, and the volume to get in sync.
    pub start_timeout: Duration,
}

impl LocalSiteOptions {
    pub fn new(volume: &str, size_bytes: u64, server_command: ServerCommand) -> Self {
        Self {
            site: "site-a".into(),
            volume: volume.into(),
            size_bytes,
            block_size: 4096,
            servers: vec!["s1".into(), "s2".into()],
            lease_ms: 2000,
            server_command,
            server_args: Vec::new(),
            server_log: "info".into(),
            start_timeout: Duration::from_secs(30),
        }
    }
}

/// One storage server child.
#[derive(Debug)]
pub struct SiteServer {
    pub id: String,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    pub data_addr: String,
    pub admin_addr: String,
    args: Vec<String>,
    child: Option<Child>,
}

impl SiteServer {
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// The volume's data file on this server.
    pub fn data_file(&self, volume: &str) -> PathBuf {
        self.data_dir.join("volumes").join(volume).join("data")
    }

    /// `GET /health` of this server, parsed.
    pub fn health(&self) -> Result<Value, LocalSiteError> {
        let body = http_get(&self.admin_addr, "/health").map_err(io("GET /health"))?;
        serde_json::from_str(&body).map_err(|e| LocalSiteError::Io {
            what: "health JSON".into(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
        })
    }

    /// This server's `/health` entry for `volume`, if it serves it.
    pub fn volume_health(&self, volume: &str) -> Option<Value> {
        let h = self.health().ok()?;
        h["volumes"]
            .as_array()?
            .iter()
            .find(|v| v["volume"] == volume)
            .cloned()
    }

    fn spawn(
        &mut self,
        cmd: &ServerCommand,
        rust_log: &str,
        timeout: Duration,
    ) -> Result<(), LocalSiteError> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(io(format!("open {}", self.log.display())))?;
        // Its own process group: a Ctrl-C at the terminal reaches the site's owner, which
        // stops the servers in order, not every server at once behind its back.
        let mut command = Command::new(&cmd.program);
        // An owner that waits for signals with sigwait blocks them (vhost-target's cluster)
        // and a child inherits the mask across exec: the server would then never see its
        // SIGTERM and lose its chance to give the lease back.
        // SAFETY: the closure runs in the forked child before exec and only calls
        // sigemptyset and sigprocmask, which are async-signal-safe.
        unsafe {
            command.pre_exec(|| {
                let mut none: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut none);
                if libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut()) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = command
            .process_group(0)
            .args(&cmd.args_prefix)
            .args(&self.args)
            .env("RUST_LOG", rust_log)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .map_err(io(format!("spawn {}", cmd.program.display())))?;
        let stdout = child.stdout.take().expect("piped");
        let (d, a) = match await_listening(stdout, timeout) {
            Ok(addrs) => addrs,
            Err(reason) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(LocalSiteError::ServerStart {
                    id: self.id.clone(),
                    reason,
                    log: self.log.clone(),
                });
            }
        };
        self.data_addr = d;
        self.admin_addr = a;
        self.child = Some(child);
        Ok(())
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM (the server gives its leases back), then waits up to `timeout` before SIGKILL.
    pub fn terminate(&mut self, timeout: Duration) {
        let Some(mut c) = self.child.take() else {
            return;
        };
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if let Ok(Some(_)) = c.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// A running site. Dropping it stops the servers (SIGTERM, then SIGKILL) and the authority.
pub struct LocalSite {
    pub opts: LocalSiteOptions,
    pub dir: PathBuf,
    /// The authority's JSON-RPC address (what `--authority` takes).
    pub authority_addr: String,
    servers: Vec<SiteServer>,
    client: AuthorityClient,
    daemon: Option<Daemon>,
    rt: tokio::runtime::Runtime,
}

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

impl LocalSite {
    /// Starts the authority, creates the volume there (unless it exists: a site directory
    /// can be started again), starts every server and waits until the first one serves the
    /// volume as a leased primary with all others in sync.
    pub fn start(dir: &Path, opts: LocalSiteOptions) -> Result<Self, LocalSiteError> {
        std::fs::create_dir_all(dir).map_err(io(format!("create {}", dir.display())))?;
        let dir = dir
            .canonicalize()
            .map_err(io(format!("canonicalize {}", dir.display())))?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("authority")
            .enable_all()
            .build()
            .map_err(io("authority runtime"))?;
        let mut last = String::new();
        let mut daemon = None;
        let mut rpc_addr = String::new();
        // The free ports are picked by binding and closing; another process may take one in
        // between, so a failed start is retried with new ones.
        for _ in 0..5 {
            rpc_addr = format!("127.0.0.1:{}", free_port().map_err(io("free port"))?);
            let config = AuthorityConfig {
                node_id: 1,
                data_dir: dir.join("authority"),
                rpc_addr: rpc_addr.clone(),
                raft_addr: format!("127.0.0.1:{}", free_port().map_err(io("free port"))?),
                unix_socket: None,
                sites: vec![opts.site.clone()],
                members: Vec::new(),
                lease_ms: opts.lease_ms,
                drift_margin_ms: 100,
                heartbeat_ms: 50,
                election_timeout_min_ms: 200,
                election_timeout_max_ms: 400,
                ..AuthorityConfig::default()
            };
            match rt.block_on(Daemon::start(config)) {
                Ok(d) => {
                    daemon = Some(d);
                    break;
                }
                Err(e) => last = e.to_string(),
            }
        }
        let Some(daemon) = daemon else {
            return Err(LocalSiteError::Authority(format!("did not start: {last}")));
        };
        let client = AuthorityClient::with_options(
            vec![rpc_addr.clone()],
            ClientOptions {
                deadline: Duration::from_secs(15),
                attempt_timeout: Duration::from_secs(3),
                ..ClientOptions::default()
            },
        );
        let mut site = Self {
            dir: dir.clone(),
            authority_addr: rpc_addr,
            servers: Vec::new(),
            client,
            daemon: Some(daemon),
            rt,
            opts,
        };
        site.create_volume()?;
        for id in site.opts.servers.clone() {
            let data_dir = dir.join(&id);
            std::fs::create_dir_all(&data_dir)
                .map_err(io(format!("create {}", data_dir.display())))?;
            let mut args: Vec<String> = [
                "--id",
                &id,
                "--site",
                &site.opts.site,
                "--data-dir",
                &data_dir.display().to_string(),
                "--authority",
                &site.authority_addr,
                "--volume",
                &site.opts.volume,
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            args.extend(site.opts.server_args.iter().cloned());
            let mut s = SiteServer {
                log: dir.join(format!("{id}.log")),
                id,
                data_dir,
                data_addr: String::new(),
                admin_addr: String::new(),
                args,
                child: None,
            };
            s.spawn(
                &site.opts.server_command,
                &site.opts.server_log,
                site.opts.start_timeout,
            )?;
            site.servers.push(s);
        }
        site.wait_in_sync(site.opts.start_timeout)?;
        Ok(site)
    }

    fn create_volume(&self) -> Result<(), LocalSiteError> {
        let o = &self.opts;
        self.rt.block_on(async {
            let auth = |e: authority::error::AuthError| LocalSiteError::Authority(e.to_string());
            // Answered once the site group has elected a leader.
            let known: Vec<String> = self
                .client
                .call("server_list", serde_json::json!({"site": o.site}))
                .await
                .map_err(auth)?
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|s| s["server_id"].as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default();
            if let Ok(info) = self.client.volume_get(&o.site, &o.volume).await {
                if info.size_bytes != o.size_bytes || info.block_size != o.block_size {
                    return Err(LocalSiteError::Authority(format!(
                        "volume {} exists with size {} block {}, not {} / {}",
                        o.volume, info.size_bytes, info.block_size, o.size_bytes, o.block_size
                    )));
                }
                return Ok(());
            }
            // Servers not started yet are listed without addresses (they register their own).
            for s in &o.servers {
                if !known.contains(s) {
                    self.client
                        .server_register(&o.site, s, "", "")
                        .await
                        .map_err(auth)?;
                }
            }
            let servers: Vec<&str> = o.servers.iter().map(String::as_str).collect();
            self.client
                .volume_create(
                    &o.site,
                    &o.volume,
                    &format!("dev-{}", o.volume),
                    o.size_bytes,
                    o.block_size,
                    &servers,
                )
                .await
                .map_err(auth)?;
            Ok(())
        })
    }

    pub fn servers(&self) -> &[SiteServer] {
        &self.servers
    }

    pub fn server(&self, id: &str) -> Result<&SiteServer, LocalSiteError> {
        self.servers
            .iter()
            .find(|s| s.id == id)
            .ok_or_else(|| LocalSiteError::NoSuchServer(id.into()))
    }

    fn server_mut(&mut self, id: &str) -> Result<&mut SiteServer, LocalSiteError> {
        self.servers
            .iter_mut()
            .find(|s| s.id == id)
            .ok_or_else(|| LocalSiteError::NoSuchServer(id.into()))
    }

    /// A replicator-side authority client (for a `ReplicationPipeline`). One per tokio
    /// runtime: its connections run on the runtime that opened them.
    pub fn authority(&self) -> std::sync::Arc<dyn Authority> {
        std::sync::Arc::new(ClientAuthority::new(
            vec![self.authority_addr.clone()],
            Duration::from_secs(3),
        ))
    }

    /// The volume as the authority has it now.
    pub fn info(&self) -> Result<VolumeInfo, LocalSiteError> {
        self.rt
            .block_on(self.client.volume_get(&self.opts.site, &self.opts.volume))
            .map_err(|e| LocalSiteError::Authority(e.to_string()))
    }

    /// The server the authority designates as primary.
    pub fn primary(&self) -> Option<String> {
        self.info().ok().and_then(|i| i.primary)
    }

    /// The first of the site's servers that is not the designated primary.
    pub fn secondary(&self) -> Option<String> {
        let primary = self.primary()?;
        self.servers
            .iter()
            .map(|s| s.id.clone())
            .find(|s| *s != primary)
    }

    /// True when `primary` serves the volume as a leased primary, every other *running*
    /// server of the site is in sync there and at the authority.
    fn in_sync(&self, info: &VolumeInfo) -> bool {
        let Some(p) = info.primary.as_deref() else {
            return false;
        };
        let Some(h) = self
            .servers
            .iter()
            .find(|s| s.id == p && s.is_running())
            .and_then(|s| s.volume_health(&self.opts.volume))
        else {
            return false;
        };
        if h["role"] != "primary" || h["accepting_io"] != true {
            return false;
        }
        let peers: Vec<&str> = h["in_sync_peers"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        self.servers
            .iter()
            .filter(|s| s.id != p && s.is_running())
            .all(|s| {
                peers.contains(&s.id.as_str())
                    && info
                        .servers
                        .iter()
                        .any(|i| i.server_id == s.id && i.in_sync)
            })
    }

    /// Waits until the designated primary is leased and every running server is in sync.
    pub fn wait_in_sync(&self, timeout: Duration) -> Result<(), LocalSiteError> {
        self.wait_for(
            "the volume in sync on every running server",
            timeout,
            || self.info().is_ok_and(|i| self.in_sync(&i)),
        )
    }

    /// Waits until `server` is a leased primary of the volume.
    pub fn wait_primary(&self, server: &str, timeout: Duration) -> Result<(), LocalSiteError> {
        let s = self.server(server)?;
        self.wait_for(&format!("{server} a leased primary"), timeout, || {
            s.volume_health(&self.opts.volume)
                .is_some_and(|h| h["role"] == "primary" && h["accepting_io"] == true)
        })
    }

    fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        mut f: impl FnMut() -> bool,
    ) -> Result<(), LocalSiteError> {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if f() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(LocalSiteError::Timeout {
            what: what.into(),
            after: timeout,
        })
    }

    /// `failover_request` (not forced): the authority designates an in-sync secondary.
    pub fn failover(&self, reason: &str) -> Result<(), LocalSiteError> {
        self.rt
            .block_on(self.client.failover_request(
                &self.opts.site,
                &self.opts.volume,
                reason,
                false,
            ))
            .map(|_| ())
            .map_err(|e| LocalSiteError::Authority(e.to_string()))
    }

    pub fn kill9(&mut self, id: &str) -> Result<(), LocalSiteError> {
        self.server_mut(id)?.kill9();
        Ok(())
    }

    /// Starts a stopped (or killed) server again with the same data directory.
    pub fn restart(&mut self, id: &str) -> Result<(), LocalSiteError> {
        let cmd = self.opts.server_command.clone();
        let (log, timeout) = (self.opts.server_log.clone(), self.opts.start_timeout);
        let s = self.server_mut(id)?;
        s.kill9();
        s.spawn(&cmd, &log, timeout)
    }

    /// The site's monitor, one pass: reaps servers that exited (killed from outside, or
    /// crashed) and, if one was the designated primary, asks the authority for a failover.
    /// Returns what happened, one line per event, for an operator to read.
    pub fn check_children(&mut self) -> Vec<String> {
        let mut events = Vec::new();
        let mut exited = Vec::new();
        for s in &mut self.servers {
            if let Some(c) = s.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    events.push(format!("server {} exited ({status})", s.id));
                    s.child = None;
                    exited.push(s.id.clone());
                }
            }
        }
        if !exited.is_empty() {
            let primary = self.primary();
            if primary.as_ref().is_some_and(|p| exited.contains(p)) {
                let p = primary.unwrap_or_default();
                match self.failover(&format!("local-site monitor: primary {p} exited")) {
                    Ok(()) => events.push(format!(
                        "asked the authority for a failover from {p}; new primary: {}",
                        self.primary().unwrap_or_else(|| "(none yet)".into())
                    )),
                    Err(e) => events.push(format!("failover request from {p} failed: {e}")),
                }
            }
        }
        events
    }

    /// Stops every server (SIGTERM: they give their leases back) and the authority.
    pub fn stop(mut self) {
        self.stop_all();
    }

    fn stop_all(&mut self) {
        for s in &mut self.servers {
            if let Some(c) = &s.child {
                // SAFETY: kill(2) on our own child's pid; no memory is involved.
                unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            }
        }
        for s in &mut self.servers {
            s.terminate(Duration::from_secs(5));
        }
        if let Some(d) = self.daemon.take() {
            self.rt.block_on(d.shutdown());
        }
    }
}

impl Drop for LocalSite {
    fn drop(&mut self) {
        self.stop_all();
    }
}

impl From<AuthorityError> for LocalSiteError {
    fn from(e: AuthorityError) -> Self {
        LocalSiteError::Authority(e.to_string())
    }
}

/// Waits up to `timeout` for a `replicator serve` child's first stdout line and parses its
/// addresses (see [`listening_addrs`]); keeps draining the pipe afterwards, so the child
/// never blocks on a full pipe. The error says what came instead.
pub fn await_listening(
    stdout: std::process::ChildStdout,
    timeout: Duration,
) -> Result<(String, String), String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut r = BufReader::new(stdout);
        let mut line = String::new();
        let _ = r.read_line(&mut line);
        let _ = tx.send(line);
        let mut sink = [0u8; 4096];
        while matches!(r.read(&mut sink), Ok(n) if n > 0) {}
    });
    let line = rx
        .recv_timeout(timeout)
        .map_err(|_| "no \"listening\" line".to_string())?;
    listening_addrs(&line).ok_or_else(|| format!("unexpected first line {line:?}"))
}

/// The data and admin addresses of a server's first stdout line,
/// `replicator listening data=ADDR admin=ADDR`.
pub fn listening_addrs(line: &str) -> Option<(String, String)> {
    let addr = |key: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .map(str::to_owned)
    };
    Some((addr("data=")?, addr("admin=")?))
}

/// A minimal HTTP/1.1 GET; the body of a 2xx answer.
fn http_get(addr: &str, path: &str) -> std::io::Result<String> {
    http(addr, "GET", path)
}

/// A minimal HTTP/1.1 request without a body (the admin port's API); the body of a 2xx
/// answer, an `InvalidData` error naming the status otherwise.
pub fn http(addr: &str, method: &str, path: &str) -> std::io::Result<String> {
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
    )?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let bad = |m: String| std::io::Error::new(std::io::ErrorKind::InvalidData, m);
    let (head, body) = resp
        .split_once("\r\n\r\n")
        .ok_or_else(|| bad("no header end".into()))?;
    let status = head.split_whitespace().nth(1).unwrap_or("");
    if !status.starts_with('2') {
        return Err(bad(format!("HTTP {status}: {body}")));
    }
    Ok(body.to_owned())
}
