//! Harness for the multi-process tests: real `replicator` processes on loopback, a client
//! pipeline in the test process, and a JSON-RPC stand-in for the authority.
//!
//! The stand-in serves the authority contract (newline-delimited JSON-RPC 2.0) from the
//! library's `FakeAuthority` (feature `test-support`), so the servers talk to it through the
//! same `RpcAuthority` they will use against the real authority. It is test scaffolding,
//! not a product; when the `authority` crate lands, these tests should start it instead.
#![allow(dead_code)]

use anyhow::{bail, Context, Result};
use replicator::authority::fake::FakeAuthority;
use replicator::authority::{Authority, AuthorityError};
use replicator::authority_rpc::{error_object, RpcAuthority};
use replicator::pipeline::{
    IoKind, IoRequest, PipelineConfig, PipelineWorker, ReplicationPipeline,
};
use replicator::stamp::{parse_stamp, stamp_block, Stamp};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

pub const SITE: &str = "site-a";
pub const BS: u64 = 4096;

pub struct StandIn {
    pub fake: Arc<FakeAuthority>,
    pub addr: String,
    ports: Mutex<HashMap<String, (String, Arc<AtomicBool>)>>,
    _rt: tokio::runtime::Runtime,
}

fn dispatch(fake: &FakeAuthority, method: &str, p: &Value) -> Result<Value, AuthorityError> {
    let s = |k: &str| p.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
    let u = |k: &str| p.get(k).and_then(Value::as_u64).unwrap_or(0);
    let b = |k: &str| p.get(k).and_then(Value::as_bool).unwrap_or(false);
    let v = match method {
        "server_register" => {
            fake.do_register(
                &s("site"),
                &s("server_id"),
                &s("data_addr"),
                &s("admin_addr"),
            );
            json!({})
        }
        "server_heartbeat" => {
            fake.do_heartbeat(
                &s("site"),
                &s("server_id"),
                p.get("health").cloned().unwrap_or(Value::Null),
            );
            json!({})
        }
        "volume_get" => {
            serde_json::to_value(fake.do_volume_get(&s("site"), &s("volume"))?).unwrap()
        }
        "lease_acquire" => serde_json::to_value(fake.do_lease_acquire(
            &s("site"),
            &s("volume"),
            &s("server_id"),
        )?)
        .unwrap(),
        "lease_renew" => serde_json::to_value(fake.do_lease_renew(
            &s("site"),
            &s("volume"),
            &s("server_id"),
            u("epoch"),
        )?)
        .unwrap(),
        "lease_release" => {
            fake.do_lease_release(&s("site"), &s("volume"), &s("server_id"), u("epoch"))?;
            json!({})
        }
        "volume_set_in_sync" => serde_json::to_value(fake.do_set_in_sync(
            &s("site"),
            &s("volume"),
            &s("server_id"),
            b("in_sync"),
            u("epoch"),
        )?)
        .unwrap(),
        "failover_request" => {
            serde_json::to_value(fake.do_failover(&s("site"), &s("volume"), b("force"))?).unwrap()
        }
        _ => {
            return Err(AuthorityError::Other {
                code: -32601,
                message: "method not found".into(),
            })
        }
    };
    Ok(v)
}

async fn serve_listener(
    listener: tokio::net::TcpListener,
    f: Arc<FakeAuthority>,
    cut: Arc<AtomicBool>,
) {
    loop {
        let Ok((s, _)) = listener.accept().await else {
            continue;
        };
        let f = f.clone();
        let cut = cut.clone();
        tokio::spawn(async move {
            let (r, mut w) = s.into_split();
            let mut lines = tokio::io::BufReader::new(r).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if cut.load(Ordering::SeqCst) {
                    // Partitioned: the request is dropped and the connection closed.
                    return;
                }
                let resp = match serde_json::from_str::<Value>(&line) {
                    Ok(req) => {
                        let id = req.get("id").cloned().unwrap_or(Value::Null);
                        let m = req.get("method").and_then(Value::as_str).unwrap_or("");
                        let p = req.get("params").cloned().unwrap_or(Value::Null);
                        match dispatch(&f, m, &p) {
                            Ok(v) => json!({"jsonrpc": "2.0", "id": id, "result": v}),
                            Err(e) => {
                                json!({"jsonrpc": "2.0", "id": id, "error": error_object(&e)})
                            }
                        }
                    }
                    Err(_) => {
                        json!({"jsonrpc": "2.0", "id": null, "error": {"code": -32700, "message": "parse error"}})
                    }
                };
                let mut out = serde_json::to_vec(&resp).unwrap();
                out.push(b'\n');
                if w.write_all(&out).await.is_err() {
                    break;
                }
            }
        });
    }
}

impl StandIn {
    pub fn start() -> Self {
        let fake = Arc::new(FakeAuthority::new());
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        rt.spawn(serve_listener(
            listener,
            fake.clone(),
            Arc::new(AtomicBool::new(false)),
        ));
        Self {
            fake,
            addr,
            ports: Mutex::new(HashMap::new()),
            _rt: rt,
        }
    }

    /// A separate address of the same authority for one server, so that server alone can be
    /// cut off from it ([`StandIn::cut`]): the partition fault injector of these tests.
    pub fn addr_for(&self, who: &str) -> String {
        let mut ports = self.ports.lock().unwrap();
        if let Some((a, _)) = ports.get(who) {
            return a.clone();
        }
        let listener = self
            ._rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let cut = Arc::new(AtomicBool::new(false));
        self._rt
            .spawn(serve_listener(listener, self.fake.clone(), cut.clone()));
        ports.insert(who.to_owned(), (addr.clone(), cut));
        addr
    }

    /// Cuts (or heals) `who`'s path to the authority; its other links are untouched.
    pub fn cut(&self, who: &str, cut: bool) {
        self.ports.lock().unwrap()[who]
            .1
            .store(cut, Ordering::SeqCst);
    }

    pub fn client(&self) -> Arc<dyn Authority> {
        Arc::new(RpcAuthority::new(vec![self.addr.clone()]))
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
        let mut child = Command::new(env!("CARGO_BIN_EXE_replicator"))
            .args(&self.args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .context("spawn replicator")?;
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut r = BufReader::new(stdout);
            let mut line = String::new();
            let _ = r.read_line(&mut line);
            let _ = tx.send(line);
            // Keep draining so the child never blocks on a full pipe.
            let mut sink = Vec::new();
            let _ = r.read_to_end(&mut sink);
        });
        let line = rx
            .recv_timeout(Duration::from_secs(20))
            .context("server did not start")?;
        let mut data = None;
        let mut admin = None;
        for w in line.split_whitespace() {
            if let Some(a) = w.strip_prefix("data=") {
                data = Some(a.to_owned());
            }
            if let Some(a) = w.strip_prefix("admin=") {
                admin = Some(a.to_owned());
            }
        }
        let (Some(d), Some(a)) = (data, admin) else {
            bail!("unexpected first line {line:?}; log: {}", self.log_text());
        };
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
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
    )?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let (head, body) = resp.split_once("\r\n\r\n").context("no header end")?;
    let status = head.split_whitespace().nth(1).unwrap_or("");
    if !status.starts_with('2') {
        bail!("HTTP {status}: {body}");
    }
    Ok(body.to_owned())
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
pub fn wait_in_sync(si: &StandIn, primary: &ServerProc, vol: &str, peers: &[&str]) -> Result<()> {
    wait_until(
        "primary with its peers in sync",
        Duration::from_secs(30),
        || {
            in_sync_peers(primary, vol) == peers
                && si
                    .fake
                    .info(SITE, vol)
                    .is_some_and(|i| peers.iter().all(|p| i.server(p).is_some_and(|s| s.in_sync)))
        },
    )
}

pub fn pipeline(stand_in: &StandIn, vol: &str) -> ReplicationPipeline {
    let mut cfg = PipelineConfig::new(SITE, vol, stand_in.client());
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
