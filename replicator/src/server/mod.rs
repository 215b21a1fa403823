//! The storage server: accepts replication-protocol connections, serves each volume as
//! primary or secondary, and runs the admin (health/metrics) port.

pub mod overlap;
pub mod unsettled;
pub mod volume;

use crate::authority::Authority;
use crate::conn::{frame_reader, read_frame, spawn_writer, FrameSink};
use crate::frame::{self, ErrorBody, ErrorCode, Frame, Header, MsgKind, VolumeName};
use crate::peer_auth::{self, PeerKey, Role};
use crate::store::ReplicaStore;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tracing::Instrument;
use volume::{VolumeRuntime, WriteOp};

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub server_id: String,
    pub site: String,
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    /// Volumes this server holds a replica of (their geometry comes from the authority).
    pub volumes: Vec<String>,
    /// How long the primary waits for a secondary before it goes on without it.
    pub replicate_timeout: Duration,
    /// Bytes per dirty-bitmap bit and per catch-up copy.
    pub region_size: u64,
    /// Catch-up / rebuild copy rate limit in bytes per second (0: unlimited).
    pub rebuild_rate_bytes: u64,
    /// How often each volume re-reads its state from the authority.
    pub refresh_interval: Duration,
    /// How often an out-of-sync peer is retried.
    pub peer_retry: Duration,
    /// Acknowledgements stop this long (at least lease/10) before the lease would end.
    pub drift_margin_ms: u64,
    /// Lets `POST /fault` on the admin port inject disk errors (tests only).
    pub enable_fault_injection: bool,
    /// The site's shared key: with one, every connection to the data port must authenticate
    /// first, and this server authenticates to its peers with it ([`crate::peer_auth`]).
    pub peer_key: Option<PeerKey>,
}

impl ServerConfig {
    pub fn new(server_id: &str, site: &str, data_dir: PathBuf) -> Self {
        Self {
            server_id: server_id.to_owned(),
            site: site.to_owned(),
            data_dir,
            listen: "127.0.0.1:0".parse().expect("addr"),
            admin: "127.0.0.1:0".parse().expect("addr"),
            volumes: Vec::new(),
            replicate_timeout: Duration::from_millis(1000),
            region_size: 1 << 20,
            rebuild_rate_bytes: 0,
            refresh_interval: Duration::from_millis(200),
            peer_retry: Duration::from_millis(200),
            drift_margin_ms: 100,
            enable_fault_injection: false,
            peer_key: None,
        }
    }
}

/// What fails a request: an error code for the wire, a message for the log, and for a
/// fencing error the newer (generation, epoch).
#[derive(Debug, Clone)]
pub struct Fail {
    pub code: ErrorCode,
    pub message: String,
    pub fence: Option<(u64, u64)>,
}

impl Fail {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            fence: None,
        }
    }
    pub fn stale(newer: (u64, u64)) -> Self {
        Self {
            code: ErrorCode::StaleEpoch,
            message: format!("newer generation {} epoch {}", newer.0, newer.1),
            fence: Some(newer),
        }
    }
}

#[derive(Debug, Default)]
pub struct ServerStats {
    pub connections: AtomicU64,
    pub bad_frames: AtomicU64,
    /// Connections closed because they did not authenticate (with a peer key configured).
    pub auth_failures: AtomicU64,
    pub unknown_volume: AtomicU64,
}

/// What every task of the server shares.
pub struct ServerCtx {
    pub config: ServerConfig,
    pub authority: Arc<dyn Authority>,
    pub store: ReplicaStore,
    pub volumes: RwLock<HashMap<VolumeName, Arc<VolumeRuntime>>>,
    pub stats: ServerStats,
    pub started: Instant,
    pub data_addr: SocketAddr,
    pub admin_addr: SocketAddr,
}

impl ServerCtx {
    pub fn volume(&self, name: &VolumeName) -> Option<Arc<VolumeRuntime>> {
        self.volumes.read().expect("volumes").get(name).cloned()
    }
    pub fn all_volumes(&self) -> Vec<Arc<VolumeRuntime>> {
        let mut v: Vec<_> = self
            .volumes
            .read()
            .expect("volumes")
            .values()
            .cloned()
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }
}

/// Requests one connection may have in flight before its reader stops reading.
const MAX_INFLIGHT_PER_CONN: usize = 512;

pub struct Server {
    pub ctx: Arc<ServerCtx>,
    data: TcpListener,
    admin: TcpListener,
}

impl Server {
    /// Opens the store and binds both ports (nothing is served until [`Server::run`]).
    pub async fn bind(config: ServerConfig, authority: Arc<dyn Authority>) -> anyhow::Result<Self> {
        let store = ReplicaStore::open(&config.data_dir)?;
        let data = TcpListener::bind(config.listen).await?;
        let admin = TcpListener::bind(config.admin).await?;
        let ctx = Arc::new(ServerCtx {
            data_addr: data.local_addr()?,
            admin_addr: admin.local_addr()?,
            config,
            authority,
            store,
            volumes: RwLock::new(HashMap::new()),
            stats: ServerStats::default(),
            started: Instant::now(),
        });
        Ok(Self { ctx, data, admin })
    }

    pub async fn run(self) -> anyhow::Result<()> {
        let ctx = self.ctx.clone();
        tokio::spawn(crate::health::serve_admin(ctx.clone(), self.admin));
        tokio::spawn(register_and_heartbeat(ctx.clone()));
        for v in ctx.config.volumes.clone() {
            let span = tracing::info_span!("volume", server = %ctx.config.server_id, volume = %v);
            tokio::spawn(volume_loop(ctx.clone(), v).instrument(span));
        }
        loop {
            let (stream, peer) = match self.data.accept().await {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accept");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            ctx.stats.connections.fetch_add(1, Ordering::Relaxed);
            let span = tracing::info_span!("conn", server = %ctx.config.server_id, %peer);
            tokio::spawn(serve_conn(ctx.clone(), stream, peer).instrument(span));
        }
    }
}

async fn register_and_heartbeat(ctx: Arc<ServerCtx>) {
    let cfg = &ctx.config;
    let (d, a) = (ctx.data_addr.to_string(), ctx.admin_addr.to_string());
    loop {
        match ctx
            .authority
            .server_register(&cfg.site, &cfg.server_id, &d, &a)
            .await
        {
            Ok(()) => break,
            Err(e) => {
                tracing::warn!(error = %e, "server_register; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    loop {
        let h = crate::health::health_json(&ctx);
        if let Err(e) = ctx
            .authority
            .server_heartbeat(&cfg.site, &cfg.server_id, h)
            .await
        {
            tracing::debug!(error = %e, "heartbeat");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Loads one volume (geometry from the authority), then keeps its role current.
async fn volume_loop(ctx: Arc<ServerCtx>, name: String) {
    let vname = match VolumeName::new(&name) {
        Ok(n) => n,
        Err(e) => {
            tracing::error!(volume = %name, error = %e, "bad volume name");
            return;
        }
    };
    let info = loop {
        match ctx.authority.volume_get(&ctx.config.site, &name).await {
            Ok(i) => break i,
            Err(e) => {
                tracing::warn!(volume = %name, error = %e, "volume_get; retrying");
                tokio::time::sleep(ctx.config.refresh_interval).await;
            }
        }
    };
    let replica = match ctx
        .store
        .open_or_create(&vname, info.size_bytes, info.block_size)
    {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(volume = %name, error = %e, "cannot open replica");
            return;
        }
    };
    let rt = match VolumeRuntime::new(ctx.clone(), replica, info) {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(volume = %name, error = %e, "cannot open activity log");
            return;
        }
    };
    ctx.volumes
        .write()
        .expect("volumes")
        .insert(vname.clone(), rt.clone());
    loop {
        rt.refresh().await;
        tokio::time::sleep(ctx.config.refresh_interval).await;
    }
}

/// Answers `h`. A connection whose writer is gone has no one to answer: the error is
/// dropped, the reader ends on the same broken socket.
fn answer(tx: &FrameSink, h: &Header, r: Result<&[u8], &Fail>) {
    let _ = match r {
        Ok(payload) => tx.send(&h.answer(MsgKind::Ok), payload),
        Err(f) => {
            let mut a = h.answer(MsgKind::Error);
            if let Some((g, e)) = f.fence {
                a.generation = g;
                a.epoch = e;
            }
            let body = ErrorBody {
                code: f.code,
                message: f.message.clone(),
            };
            tx.send(&a, &body.encode())
        }
    };
}

async fn serve_conn(ctx: Arc<ServerCtx>, stream: TcpStream, peer: SocketAddr) {
    let _ = stream.set_nodelay(true);
    let (r, w) = stream.into_split();
    let mut r = frame_reader(r);
    let tx = spawn_writer(w);
    if let Some(key) = &ctx.config.peer_key {
        if let Err(why) = accept_auth(&mut r, &tx, key).await {
            ctx.stats.auth_failures.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%peer, reason = %why, "closing connection: authentication failed");
            return;
        }
    }
    let sem = Arc::new(Semaphore::new(MAX_INFLIGHT_PER_CONN));
    loop {
        let f = match read_frame(&mut r).await {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) => {
                ctx.stats.bad_frames.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%peer, reason = %e, "closing connection");
                break;
            }
        };
        if f.header.kind.is_answer() {
            ctx.stats.bad_frames.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%peer, "closing connection: an answer frame sent to a server");
            break;
        }
        let Ok(permit) = sem.clone().acquire_owned().await else {
            break;
        };
        if f.header.kind == MsgKind::Auth {
            // Only a server with a key authenticates, and only as a connection's first frames.
            let why = if ctx.config.peer_key.is_some() {
                "authentication is only the first frames of a connection"
            } else {
                "this server has no peer key (--peer-key-file): it does not authenticate connections"
            };
            answer(&tx, &f.header, Err(&Fail::new(ErrorCode::Unsupported, why)));
            continue;
        }
        if f.header.kind == MsgKind::Health {
            let body = serde_json::to_vec(&crate::health::health_json(&ctx)).expect("json");
            answer(&tx, &f.header, Ok(&body));
            continue;
        }
        let Some(vol) = ctx.volume(&f.header.volume) else {
            let configured = ctx
                .config
                .volumes
                .iter()
                .any(|v| v == f.header.volume.as_str());
            let fail = if configured {
                Fail::new(ErrorCode::NotReady, "volume is still loading")
            } else {
                ctx.stats.unknown_volume.fetch_add(1, Ordering::Relaxed);
                Fail::new(
                    ErrorCode::UnknownVolume,
                    format!("no volume {:?} on this server", f.header.volume.as_str()),
                )
            };
            answer(&tx, &f.header, Err(&fail));
            continue;
        };
        if f.header.kind == MsgKind::Replicate {
            // Admission happens here, in arrival order, so the overlap queue sees the
            // primary's seq order; the apply runs concurrently.
            match vol.secondary_admit(&f.header) {
                Ok(ticket) => {
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        let Frame {
                            header, payload, ..
                        } = f;
                        let r = vol.secondary_apply(&header, payload, ticket).await;
                        answer(&tx, &header, r.as_ref().map(|()| &[][..]));
                        drop(permit);
                    });
                }
                Err(fail) => answer(&tx, &f.header, Err(&fail)),
            }
            continue;
        }
        let tx = tx.clone();
        tokio::spawn(async move {
            let Frame {
                header: h,
                payload,
                payload_crc,
            } = f;
            let r = handle_request(&vol, &h, payload, payload_crc).await;
            if let Err(fail) = &r {
                tracing::debug!(volume = %h.volume, kind = ?h.kind, code = ?fail.code, msg = %fail.message, "request failed");
            }
            answer(&tx, &h, r.as_deref());
            drop(permit);
        });
    }
}

/// The server's side of the handshake in [`crate::peer_auth`]: a HELLO with the client's
/// nonce, answered with ours and our tag, then the client's PROOF. Anything else, or a wrong
/// tag, is answered `Unauthenticated` and ends the connection.
async fn accept_auth<R: tokio::io::AsyncRead + Unpin>(
    r: &mut R,
    tx: &FrameSink,
    key: &PeerKey,
) -> Result<(), String> {
    let refuse = |h: &Header, why: &str| {
        answer(tx, h, Err(&Fail::new(ErrorCode::Unauthenticated, why)));
        why.to_string()
    };
    let next = |f: Result<Option<Frame>, crate::conn::ReadError>| match f {
        Ok(Some(f)) => Ok(f),
        Ok(None) => Err("closed before authenticating".to_string()),
        Err(e) => Err(format!("bad frame before authenticating: {e}")),
    };
    let hello = next(read_frame(r).await)?;
    if hello.header.kind != MsgKind::Auth || hello.header.flags != peer_auth::AUTH_HELLO {
        return Err(refuse(
            &hello.header,
            "this server requires authentication with the site's peer key first",
        ));
    }
    if hello.payload.len() != peer_auth::NONCE_LEN {
        return Err(refuse(&hello.header, "the client's nonce is not 32 bytes"));
    }
    let sn = peer_auth::nonce().map_err(|e| refuse(&hello.header, &e.to_string()))?;
    let mut challenge = sn.to_vec();
    challenge.extend_from_slice(&key.tag(Role::Server, &hello.payload, &sn));
    answer(tx, &hello.header, Ok(&challenge));
    let proof = next(read_frame(r).await)?;
    if proof.header.kind != MsgKind::Auth || proof.header.flags != peer_auth::AUTH_PROOF {
        return Err(refuse(&proof.header, "expected the client's proof"));
    }
    if !key.verify(Role::Client, &hello.payload, &sn, &proof.payload) {
        return Err(refuse(
            &proof.header,
            "the client does not hold this site's peer key",
        ));
    }
    answer(tx, &proof.header, Ok(&[]));
    Ok(())
}

async fn handle_request(
    vol: &Arc<VolumeRuntime>,
    h: &Header,
    payload: Vec<u8>,
    payload_crc: u32,
) -> Result<Vec<u8>, Fail> {
    match h.kind {
        MsgKind::Write => {
            if payload.len() as u64 != h.length as u64 {
                Err(Fail::new(
                    ErrorCode::Invalid,
                    "write: payload length differs from header length",
                ))
            } else {
                vol.client_write(WriteOp::Write, h, payload, payload_crc)
                    .await
                    .map(|_| Vec::new())
            }
        }
        MsgKind::WriteZeroes => vol
            .client_write(WriteOp::WriteZeroes, h, Vec::new(), crc32c::crc32c(&[]))
            .await
            .map(|_| Vec::new()),
        MsgKind::Discard => vol
            .client_write(WriteOp::Discard, h, Vec::new(), crc32c::crc32c(&[]))
            .await
            .map(|_| Vec::new()),
        MsgKind::Read => {
            if h.length as usize > frame::MAX_PAYLOAD {
                Err(Fail::new(ErrorCode::Invalid, "read larger than a frame"))
            } else {
                vol.client_read(h).await
            }
        }
        MsgKind::Flush => vol.client_flush(h).await.map(|_| Vec::new()),
        MsgKind::CatchUp => vol.secondary_catch_up(h).await,
        MsgKind::Takeover => vol.takeover(&String::from_utf8_lossy(&payload)).await,
        _ => Err(Fail::new(
            ErrorCode::Unsupported,
            format!("{:?} is not a request this server serves", h.kind),
        )),
    }
}

/// Runs a server until the process ends (for `replicator serve`).
pub async fn serve(config: ServerConfig, authority: Arc<dyn Authority>) -> anyhow::Result<()> {
    let s = Server::bind(config, authority).await?;
    // Tests and operators read the bound addresses from this line.
    println!(
        "replicator listening data={} admin={}",
        s.ctx.data_addr, s.ctx.admin_addr
    );
    let ctx = s.ctx.clone();
    tokio::select! {
        r = s.run() => r,
        _ = shutdown_signal() => {
            for v in ctx.all_volumes() {
                v.release().await;
            }
            tracing::info!("stopped");
            Ok(())
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers the process still stops on SIGTERM, just not gracefully.
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
