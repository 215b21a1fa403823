//! Harness for the multi-process tests: real `replicator` processes on loopback, a client
//! pipeline in the test process, and the real authority.
//!
//! The authority is the `authority` crate's daemon (`authority::daemon::Daemon`: its openraft
//! groups, file log with fsync, JSON-RPC server), one member, run in the test process on its
//! own tokio runtime with its data directory under a tempdir and loopback ports picked free.
//! The servers reach it over TCP through `ClientAuthority` (the real `AuthorityClient`), as
//! in production. Only the partition fault injector is test scaffolding: a TCP relay per
//! server in front of the authority's port that can be cut ([`TestAuthority::cut`]).
#![allow(dead_code)]

use anyhow::{bail, Context, Result};
use authority::api::{FailoverReply, VolumeInfo};
use authority::client::{AuthorityClient, ClientOptions};
use authority::config::{AuthorityConfig, MemberConfig};
use authority::daemon::Daemon;
use replicator::authority::client::ClientAuthority;
use replicator::authority::Authority;
use replicator::pipeline::{
    IoKind, IoRequest, PipelineConfig, PipelineWorker, ReplicationPipeline,
};
use replicator::stamp::{parse_stamp, stamp_block, Stamp};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;

pub const SITE: &str = "site-a";
pub const BS: u64 = 4096;
/// The authority's lease in these tests: short, so failovers wait out little.
pub const LEASE_MS: u64 = 1000;
/// The authority's drift margin (its default, 200 ms, would also do; the holder's own margin
/// is the replicator's `--drift-margin-ms`).
pub const AUTHORITY_DRIFT_MS: u64 = 100;

/// The `replicator` binary: this package's own when its tests run; when another package's
/// tests include this harness (vhost-target's replicated-disk tests), the one built beside
/// them in the same target directory (`cargo build --workspace` or a workspace test run).
pub fn replicator_bin() -> PathBuf {
    if let Some(p) = option_env!("CARGO_BIN_EXE_replicator") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>/replicator
    let p = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("replicator"))
        .expect("target directory");
    assert!(
        p.exists(),
        "{} not found: build the workspace first (cargo build --workspace)",
        p.display()
    );
    p
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Per server: the relay's address, its cut switch, and how many connections it relays.
type Relay = (String, watch::Sender<bool>, Arc<AtomicUsize>);

/// A real authority: one member (or several) hosting the global group and `SITE`'s group.
pub struct TestAuthority {
    /// The members' JSON-RPC addresses, comma-separated (as `--authority` takes them).
    pub addr: String,
    pub addrs: Vec<String>,
    /// The test's own client, for setting up volumes and looking at the authority's state.
    client: AuthorityClient,
    daemons: Vec<Option<Daemon>>,
    relays: Mutex<HashMap<String, Relay>>,
    rt: tokio::runtime::Runtime,
    _dir: tempfile::TempDir,
}

impl TestAuthority {
    pub fn start() -> Self {
        Self::start_with_lease(LEASE_MS)
    }

    pub fn start_with_lease(lease_ms: u64) -> Self {
        Self::start_members(1, lease_ms)
    }

    /// `n` members on loopback, every group replicated on all of them.
    pub fn start_members(n: u64, lease_ms: u64) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("authority")
            .enable_all()
            .build()
            .unwrap();
        // The free ports are picked by binding and closing; another process may take one in
        // between, so a failed start is retried with new ports (and fresh data directories).
        let mut last = None;
        'attempt: for attempt in 0..5 {
            let members: Vec<MemberConfig> = (1..=n)
                .map(|id| MemberConfig {
                    id,
                    raft_addr: format!("127.0.0.1:{}", free_port()),
                    rpc_addr: format!("127.0.0.1:{}", free_port()),
                })
                .collect();
            let mut daemons = Vec::new();
            for m in &members {
                let config = AuthorityConfig {
                    node_id: m.id,
                    data_dir: dir.path().join(format!("attempt-{attempt}-m{}", m.id)),
                    rpc_addr: m.rpc_addr.clone(),
                    raft_addr: m.raft_addr.clone(),
                    unix_socket: None,
                    sites: vec![SITE.into()],
                    members: if n == 1 { Vec::new() } else { members.clone() },
                    lease_ms,
                    drift_margin_ms: AUTHORITY_DRIFT_MS,
                    heartbeat_ms: 50,
                    election_timeout_min_ms: 200,
                    election_timeout_max_ms: 400,
                    ..AuthorityConfig::default()
                };
                match rt.block_on(Daemon::start(config)) {
                    Ok(d) => daemons.push(Some(d)),
                    Err(e) => {
                        for d in daemons.into_iter().flatten() {
                            rt.block_on(d.shutdown());
                        }
                        last = Some(e);
                        continue 'attempt;
                    }
                }
            }
            let addrs: Vec<String> = members.iter().map(|m| m.rpc_addr.clone()).collect();
            let client = AuthorityClient::with_options(
                addrs.clone(),
                ClientOptions {
                    deadline: Duration::from_secs(15),
                    attempt_timeout: Duration::from_secs(3),
                    ..ClientOptions::default()
                },
            );
            let a = Self {
                addr: addrs.join(","),
                addrs,
                client,
                daemons,
                relays: Mutex::new(HashMap::new()),
                rt,
                _dir: dir,
            };
            // Answered once the site group has elected a leader.
            a.rt.block_on(a.client.call("server_list", json!({"site": SITE})))
                .expect("the authority's site group elects a leader");
            return a;
        }
        panic!("authority did not start: {:?}", last);
    }

    /// The index of the member that leads `SITE`'s group now, if one does.
    pub fn site_leader(&self) -> Option<usize> {
        self.daemons.iter().position(|d| {
            d.as_ref().is_some_and(|d| {
                let g = d.host.site(SITE).expect("site group");
                let m = g.raft.metrics().borrow().clone();
                m.current_leader == Some(g.node_id) && m.state.is_leader()
            })
        })
    }

    /// Stops member `i` (its Raft groups and its JSON-RPC port): the others elect a new leader.
    pub fn stop_member(&mut self, i: usize) {
        if let Some(d) = self.daemons[i].take() {
            self.rt.block_on(d.shutdown());
        }
    }

    /// Creates a volume of `servers` (the first is its primary, at epoch 1; all in sync, as
    /// the authority makes every new volume). A listed server that has not registered yet is
    /// registered without addresses, as an operator's inventory would list it; it registers
    /// its real addresses itself when it starts.
    pub fn create_volume(&self, vol: &str, size_bytes: u64, servers: &[&str]) {
        self.rt.block_on(async {
            let known: Vec<String> = self
                .client
                .call("server_list", json!({"site": SITE}))
                .await
                .expect("server_list")
                .as_array()
                .expect("a list")
                .iter()
                .filter_map(|s| s["server_id"].as_str().map(str::to_owned))
                .collect();
            for s in servers {
                if !known.iter().any(|k| k == s) {
                    self.client
                        .server_register(SITE, s, "", "")
                        .await
                        .expect("server_register");
                }
            }
            self.client
                .volume_create(
                    SITE,
                    vol,
                    &format!("dev-{vol}"),
                    size_bytes,
                    BS as u32,
                    servers,
                )
                .await
                .expect("volume_create");
        })
    }

    /// The volume as the authority has it now (a linearizable read).
    pub fn info(&self, vol: &str) -> VolumeInfo {
        self.rt
            .block_on(self.client.volume_get(SITE, vol))
            .expect("volume_get")
    }

    pub fn in_sync(&self, vol: &str, server: &str) -> bool {
        self.info(vol)
            .servers
            .iter()
            .any(|s| s.server_id == server && s.in_sync)
    }

    /// The server the authority has recorded as holding the volume's lease.
    pub fn lease_holder(&self, vol: &str) -> Option<String> {
        self.info(vol).lease_holder.map(|h| h.server_id)
    }

    /// `failover_request` (not forced), as a monitor or operator would send it.
    pub fn failover(&self, vol: &str, reason: &str) -> Result<FailoverReply> {
        self.rt
            .block_on(self.client.failover_request(SITE, vol, reason, false))
            .map_err(|e| anyhow::anyhow!("failover_request: {e}"))
    }

    /// A separate address in front of the authority for one server, so that server alone can
    /// be cut off from it ([`TestAuthority::cut`]): the partition fault injector of these tests
    /// (in front of the first member; meant for a one-member authority).
    pub fn addr_for(&self, who: &str) -> String {
        let mut relays = self.relays.lock().unwrap();
        if let Some((a, _, _)) = relays.get(who) {
            return a.clone();
        }
        let listener = self
            .rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (tx, rx) = watch::channel(false);
        let open = Arc::new(AtomicUsize::new(0));
        self.rt
            .spawn(relay(listener, self.addrs[0].clone(), rx, open.clone()));
        relays.insert(who.to_owned(), (addr.clone(), tx, open));
        addr
    }

    /// Cuts (or heals) `who`'s path to the authority: its open connections are closed and new
    /// ones refused while cut; its other links are untouched.
    /// Returns once a cut has closed every relayed connection.
    pub fn cut(&self, who: &str, cut: bool) {
        let open = {
            let relays = self.relays.lock().unwrap();
            relays[who].1.send_replace(cut);
            relays[who].2.clone()
        };
        if cut {
            wait_until(
                "the relay's connections closed",
                Duration::from_secs(10),
                || open.load(Ordering::SeqCst) == 0,
            )
            .unwrap();
        }
    }

    /// A replicator-side client of this authority (for a pipeline in the test process).
    pub fn client(&self) -> Arc<dyn Authority> {
        Arc::new(ClientAuthority::new(
            self.addrs.clone(),
            Duration::from_secs(3),
        ))
    }
}

impl Drop for TestAuthority {
    fn drop(&mut self) {
        for d in self.daemons.iter_mut().filter_map(Option::take) {
            self.rt.block_on(d.shutdown());
        }
    }
}

/// Relays connections to `upstream` byte for byte until `cut` says otherwise.
async fn relay(
    listener: tokio::net::TcpListener,
    upstream: String,
    cut: watch::Receiver<bool>,
    open: Arc<AtomicUsize>,
) {
    loop {
        let Ok((mut down, _)) = listener.accept().await else {
            // Out of descriptors or similar: do not spin.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        if *cut.borrow() {
            // Partitioned: the connection is closed before anything gets through.
            continue;
        }
        let mut cut = cut.clone();
        let upstream = upstream.clone();
        open.fetch_add(1, Ordering::SeqCst);
        let open = open.clone();
        tokio::spawn(async move {
            if let Ok(mut up) = tokio::net::TcpStream::connect(&upstream).await {
                tokio::select! {
                    _ = tokio::io::copy_bidirectional(&mut down, &mut up) => {}
                    _ = cut.wait_for(|c| *c) => {}
                }
            }
            drop(down);
            open.fetch_sub(1, Ordering::SeqCst);
        });
    }
}

pub struct ServerProc {
    pub id: String,
    pub dir: PathBuf,
    pub data_addr: String,
    pub admin_addr: String,
    args: Vec<String>,
    child: Option<Child>,
    log: PathBuf,
}

impl ServerProc {
    /// Starts `replicator serve` and waits for its "listening" line.
    pub fn start(
        id: &str,
        root: &Path,
        authority: &str,
        volumes: &[&str],
        extra: &[&str],
    ) -> Result<Self> {
        let dir = root.join(id);
        std::fs::create_dir_all(&dir)?;
        let mut args: Vec<String> = vec![
            "serve".into(),
            "--id".into(),
            id.into(),
            "--site".into(),
            SITE.into(),
            "--data-dir".into(),
            dir.display().to_string(),
            "--authority".into(),
            authority.into(),
            "--replicate-timeout-ms".into(),
            "400".into(),
            "--refresh-ms".into(),
            "50".into(),
        ];
        for v in volumes {
            args.push("--volume".into());
            args.push(v.to_string());
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut p = Self {
            id: id.into(),
            log: root.join(format!("{id}.log")),
            dir,
            data_addr: String::new(),
            admin_addr: String::new(),
            args,
            child: None,
        };
        p.spawn()?;
        Ok(p)
    }

    fn spawn(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let mut child = Command::new(replicator_bin())
            .args(&self.args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .context("spawn replicator")?;
        let stdout = child.stdout.take().unwrap();
        let (d, a) = replicator::local_site::await_listening(stdout, Duration::from_secs(20))
            .map_err(|why| {
                anyhow::anyhow!("server did not start: {why}; log: {}", self.log_text())
            })?;
        self.data_addr = d;
        self.admin_addr = a;
        self.child = Some(child);
        Ok(())
    }

    /// SIGTERM, then waits for the exit; returns whether it exited successfully.
    pub fn terminate(&mut self) -> bool {
        let Some(mut c) = self.child.take() else {
            return false;
        };
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        c.wait().map(|s| s.success()).unwrap_or(false)
    }

    /// Sends `sig` to the server process (e.g. SIGSTOP to freeze it with its sockets open).
    pub fn signal(&self, sig: i32) {
        if let Some(c) = &self.child {
            // SAFETY: kill(2) on our own child's pid; no memory is involved.
            unsafe { libc::kill(c.id() as i32, sig) };
        }
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill(); // SIGKILL
            let _ = c.wait();
        }
    }

    pub fn restart(&mut self) -> Result<()> {
        self.kill9();
        self.spawn()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn health(&self) -> Result<Value> {
        let body = http(&self.admin_addr, "GET", "/health")?;
        Ok(serde_json::from_str(&body)?)
    }

    pub fn volume_health(&self, vol: &str) -> Result<Value> {
        let h = self.health()?;
        h["volumes"]
            .as_array()
            .and_then(|a| a.iter().find(|v| v["volume"] == vol).cloned())
            .context("volume not in health")
    }

    pub fn data_file(&self, vol: &str) -> PathBuf {
        self.dir.join("volumes").join(vol).join("data")
    }
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A minimal HTTP/1.1 request; returns the body (errors on a non-2xx status).
pub fn http(addr: &str, method: &str, path: &str) -> Result<String> {
    Ok(replicator::local_site::http(addr, method, path)?)
}

/// Polls `f` every 20 ms until it holds or `timeout` passes.
pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) -> Result<()> {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if f() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("timed out waiting for {what}")
}

pub fn is_primary(s: &ServerProc, vol: &str) -> bool {
    s.volume_health(vol)
        .map(|v| v["role"] == "primary" && v["accepting_io"] == true)
        .unwrap_or(false)
}

/// The peers `s` (as a leased primary) has in sync; empty if it is not a leased primary.
pub fn in_sync_peers(s: &ServerProc, vol: &str) -> Vec<String> {
    match s.volume_health(vol) {
        Ok(v) if v["role"] == "primary" && v["accepting_io"] == true => v["in_sync_peers"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default(),
        _ => Vec::new(),
    }
}

/// Waits until `primary` serves `vol` with exactly `peers` in sync, locally and at the
/// authority.
pub fn wait_in_sync(
    au: &TestAuthority,
    primary: &ServerProc,
    vol: &str,
    peers: &[&str],
) -> Result<()> {
    wait_until(
        "primary with its peers in sync",
        Duration::from_secs(30),
        || in_sync_peers(primary, vol) == peers && peers.iter().all(|p| au.in_sync(vol, p)),
    )
}

pub fn pipeline(au: &TestAuthority, vol: &str) -> ReplicationPipeline {
    let mut cfg = PipelineConfig::new(SITE, vol, au.client());
    cfg.request_timeout = Duration::from_secs(30);
    ReplicationPipeline::start(cfg).unwrap()
}

/// Writes stamped `blocks` with `write_id`, `depth` at a time; returns the blocks acked.
pub fn write_blocks(
    w: &PipelineWorker,
    vol: &str,
    blocks: impl IntoIterator<Item = u64>,
    write_id: u64,
) -> Result<Vec<u64>> {
    let mut acked = Vec::new();
    let mut it = blocks.into_iter().peekable();
    loop {
        while let Some(&b) = it.peek() {
            let req = IoRequest {
                tag: b,
                kind: IoKind::Write,
                offset: b * BS,
                len: 0,
                data: stamp_block(
                    &Stamp {
                        volume: vol.into(),
                        block: b,
                        write_id,
                    },
                    BS as usize,
                ),
                fua: false,
            };
            if w.submit(req).is_err() {
                break;
            }
            it.next();
        }
        if w.inflight() == 0 {
            return Ok(acked);
        }
        let c = w.wait(Duration::from_secs(40)).context("no completion")?;
        match c.result {
            Ok(_) => acked.push(c.tag),
            Err(e) => bail!("write of block {} failed: {e}", c.tag),
        }
    }
}

pub fn read_block(w: &PipelineWorker, b: u64) -> Result<Vec<u8>> {
    w.submit(IoRequest {
        tag: b,
        kind: IoKind::Read,
        offset: b * BS,
        len: BS as u32,
        data: Vec::new(),
        fua: false,
    })
    .map_err(|_| anyhow::anyhow!("queue full"))?;
    let c = w.wait(Duration::from_secs(40)).context("no completion")?;
    c.result.map_err(|e| anyhow::anyhow!("read {b}: {e}"))
}

pub fn flush(w: &PipelineWorker) -> Result<()> {
    w.submit(IoRequest {
        tag: u64::MAX,
        kind: IoKind::Flush,
        offset: 0,
        len: 0,
        data: Vec::new(),
        fua: false,
    })
    .map_err(|_| anyhow::anyhow!("queue full"))?;
    let c = w.wait(Duration::from_secs(40)).context("no completion")?;
    c.result.map_err(|e| anyhow::anyhow!("flush: {e}"))?;
    Ok(())
}

/// The write id of the stamp on block `b` of a data file (None: not stamped / wrong block).
pub fn file_stamp(path: &Path, vol: &str, b: u64) -> Option<u64> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path).ok()?;
    let mut buf = vec![0u8; BS as usize];
    f.read_exact_at(&mut buf, b * BS).ok()?;
    let s = parse_stamp(&buf)?;
    (s.volume == vol && s.block == b).then_some(s.write_id)
}

pub fn files_equal_blocks(a: &Path, b: &Path, blocks: impl IntoIterator<Item = u64>) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let fa = std::fs::File::open(a)?;
    let fb = std::fs::File::open(b)?;
    let mut x = vec![0u8; BS as usize];
    let mut y = vec![0u8; BS as usize];
    for blk in blocks {
        fa.read_exact_at(&mut x, blk * BS)?;
        fb.read_exact_at(&mut y, blk * BS)?;
        if x != y {
            bail!(
                "block {blk} differs between {} and {}",
                a.display(),
                b.display()
            );
        }
    }
    Ok(())
}

/// A raw protocol connection for malformed-input and fencing tests.
pub struct RawConn {
    pub s: std::net::TcpStream,
    buf: Vec<u8>,
}

impl RawConn {
    pub fn connect(addr: &str) -> Result<Self> {
        let s = std::net::TcpStream::connect(addr)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        Ok(Self { s, buf: Vec::new() })
    }

    pub fn send_raw(&mut self, bytes: &[u8]) -> Result<()> {
        self.s.write_all(bytes)?;
        Ok(())
    }

    pub fn send(&mut self, h: &replicator::frame::Header, payload: &[u8]) -> Result<()> {
        self.send_raw(&replicator::frame::encode(h, payload))
    }

    /// The next answer frame, or `None` if the server closed the connection.
    pub fn recv(&mut self) -> Result<Option<replicator::frame::Frame>> {
        loop {
            if let Some((f, n)) = replicator::frame::decode(&self.buf)? {
                self.buf.drain(..n);
                return Ok(Some(f));
            }
            let mut chunk = [0u8; 65536];
            match self.s.read(&mut chunk) {
                Ok(0) => return Ok(None),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok(None),
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// True if the server closes the connection (reads EOF) within the read timeout.
    pub fn closed_by_server(&mut self) -> bool {
        matches!(self.recv(), Ok(None))
    }
}

pub fn header(
    kind: replicator::frame::MsgKind,
    rid: u64,
    vol: &str,
    g: u64,
    e: u64,
) -> replicator::frame::Header {
    let mut h =
        replicator::frame::Header::new(kind, rid, replicator::frame::VolumeName::new(vol).unwrap());
    h.generation = g;
    h.epoch = e;
    h
}

pub fn error_code(f: &replicator::frame::Frame) -> Option<replicator::frame::ErrorCode> {
    (f.header.kind == replicator::frame::MsgKind::Error)
        .then(|| replicator::frame::ErrorBody::decode(&f.payload).map(|b| b.code))
        .flatten()
}
