//! `AuthorityClient`: the Rust client of the authority's JSON-RPC API.
//!
//! Built from the members' RPC addresses. It remembers each group's leader, follows
//! `NotLeader` redirects, and retries on lost connections and unavailable groups until its
//! deadline. Retrying is safe because every method is idempotent or guarded: creates accept a
//! repeat with the same parameters, leases are keyed by (server, epoch), a failover carries
//! the epoch it fails over from (so a repeat returns the first answer), a promotion carries
//! its transaction id.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

use crate::api::{DeviceInfo, FailoverReply, LeaseReply, PromoteReply, VolumeInfo};
use crate::error::AuthError;

/// How the client retries.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Give up on a call after this long.
    pub deadline: Duration,
    /// How long one attempt waits for its answer.
    pub attempt_timeout: Duration,
    /// Subtracted from a lease: the holder stops acting this much before it runs out.
    pub drift_margin: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            deadline: Duration::from_secs(10),
            attempt_timeout: Duration::from_secs(3),
            drift_margin: Duration::from_millis(200),
        }
    }
}

/// A granted lease, seen from the holder: counted from the moment the request was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseGrant {
    pub epoch: u64,
    pub generation: u64,
    pub lease_ms: u64,
    pub sent_at: Instant,
    /// The holder may act until then (lease minus drift margin, from `sent_at`).
    pub valid_until: Instant,
}

impl LeaseGrant {
    pub fn is_valid(&self) -> bool {
        Instant::now() < self.valid_until
    }
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Value>>>>;

/// One multiplexed connection: any number of requests in flight, matched by id.
struct Conn {
    tx: mpsc::UnboundedSender<Vec<u8>>,
    pending: Pending,
    closed: Arc<std::sync::atomic::AtomicBool>,
}

impl Conn {
    async fn connect(addr: &str) -> std::io::Result<Conn> {
        let s = TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        let (rd, mut wr) = s.into_split();
        let (tx, mut rx) = mpsc::unbounded_channel::<Vec<u8>>();
        let pending: Pending = Arc::new(Mutex::new(HashMap::new()));
        let closed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let c2 = closed.clone();
        tokio::spawn(async move {
            while let Some(mut buf) = rx.recv().await {
                while let Ok(more) = rx.try_recv() {
                    buf.extend(more);
                }
                if wr.write_all(&buf).await.is_err() {
                    break;
                }
            }
            c2.store(true, Ordering::Relaxed);
        });
        let (p2, c3) = (pending.clone(), closed.clone());
        tokio::spawn(async move {
            let mut lines = BufReader::new(rd).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let Ok(v) = serde_json::from_str::<Value>(&line) else {
                    continue;
                };
                if let Some(id) = v.get("id").and_then(Value::as_u64) {
                    if let Some(tx) = p2.lock().expect("pending").remove(&id) {
                        let _ = tx.send(v);
                    }
                }
            }
            c3.store(true, Ordering::Relaxed);
            // Dropping the senders tells every waiter the connection is gone.
            p2.lock().expect("pending").clear();
        });
        Ok(Conn {
            tx,
            pending,
            closed,
        })
    }

    async fn request(
        &self,
        id: u64,
        method: &str,
        params: &Value,
        timeout: Duration,
    ) -> Result<Value, String> {
        let (tx, rx) = oneshot::channel();
        self.pending.lock().expect("pending").insert(id, tx);
        let mut line = serde_json::to_vec(
            &json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}),
        )
        .map_err(|e| e.to_string())?;
        line.push(b'\n');
        if self.tx.send(line).is_err() {
            return Err("connection closed".into());
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(_)) => Err("connection closed".into()),
            Err(_) => {
                self.pending.lock().expect("pending").remove(&id);
                Err(format!("no answer within {timeout:?}"))
            }
        }
    }
}

/// The client. Cheap to share (`Arc`), usable from many tasks at once.
pub struct AuthorityClient {
    addrs: Vec<String>,
    opts: ClientOptions,
    next_id: AtomicU64,
    rotate: AtomicUsize,
    leaders: Mutex<HashMap<String, String>>,
    conns: Mutex<HashMap<String, Arc<Conn>>>,
    connecting: tokio::sync::Mutex<()>,
}

/// Which group a request goes to, for remembering leaders.
fn group_key(method: &str, params: &Value) -> String {
    if let Some(g) = params.get("group").and_then(Value::as_str) {
        return if g == "global" {
            g.to_string()
        } else {
            format!("site:{g}")
        };
    }
    match params.get("site").and_then(Value::as_str) {
        Some(s) if !method.starts_with("device_") => format!("site:{s}"),
        _ => "global".to_string(),
    }
}

impl AuthorityClient {
    pub fn new(addrs: Vec<String>) -> AuthorityClient {
        Self::with_options(addrs, ClientOptions::default())
    }

    pub fn with_options(addrs: Vec<String>, opts: ClientOptions) -> AuthorityClient {
        assert!(
            !addrs.is_empty(),
            "an AuthorityClient needs at least one address"
        );
        AuthorityClient {
            addrs,
            opts,
            next_id: AtomicU64::new(1),
            rotate: AtomicUsize::new(0),
            leaders: Mutex::new(HashMap::new()),
            conns: Mutex::new(HashMap::new()),
            connecting: tokio::sync::Mutex::new(()),
        }
    }

    fn cached(&self, addr: &str) -> Option<Arc<Conn>> {
        let conns = self.conns.lock().expect("conns");
        conns
            .get(addr)
            .filter(|c| !c.closed.load(Ordering::Relaxed))
            .cloned()
    }

    async fn conn(&self, addr: &str) -> Result<Arc<Conn>, String> {
        if let Some(c) = self.cached(addr) {
            return Ok(c);
        }
        // One connect at a time, so concurrent callers share the new connection.
        let _guard = self.connecting.lock().await;
        if let Some(c) = self.cached(addr) {
            return Ok(c);
        }
        let c = tokio::time::timeout(self.opts.attempt_timeout, Conn::connect(addr))
            .await
            .map_err(|_| format!("connect to {addr} timed out"))?
            .map_err(|e| format!("connect to {addr}: {e}"))?;
        let c = Arc::new(c);
        self.conns
            .lock()
            .expect("conns")
            .insert(addr.to_string(), c.clone());
        Ok(c)
    }

    fn drop_conn(&self, addr: &str) {
        self.conns.lock().expect("conns").remove(addr);
    }

    /// Call `method` with `params`, following redirects and retrying until the deadline.
    pub async fn call(&self, method: &str, params: Value) -> Result<Value, AuthError> {
        let key = group_key(method, &params);
        let deadline = Instant::now() + self.opts.deadline;
        let mut backoff = Duration::from_millis(20);
        let mut redirects = 0;
        loop {
            let last_err;
            let hinted = self.leaders.lock().expect("leaders").get(&key).cloned();
            let addr = hinted.clone().unwrap_or_else(|| {
                let i = self.rotate.fetch_add(1, Ordering::Relaxed);
                self.addrs[i % self.addrs.len()].clone()
            });
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            let attempt = match self.conn(&addr).await {
                Ok(c) => {
                    c.request(id, method, &params, self.opts.attempt_timeout)
                        .await
                }
                Err(e) => Err(e),
            };
            match attempt {
                Ok(v) => {
                    if let Some(r) = v.get("result") {
                        if hinted.is_none() {
                            self.leaders
                                .lock()
                                .expect("leaders")
                                .insert(key.clone(), addr.clone());
                        }
                        return Ok(r.clone());
                    }
                    let err = v.get("error").cloned().unwrap_or(Value::Null);
                    let code = err.get("code").and_then(Value::as_i64).unwrap_or(-32603);
                    let msg = err.get("message").and_then(Value::as_str).unwrap_or("");
                    let e = AuthError::from_rpc(code, msg, err.get("data").unwrap_or(&Value::Null));
                    match &e {
                        AuthError::NotLeader {
                            leader_addr: Some(l),
                        } if *l != addr && redirects < 4 => {
                            // Follow at once; a few hops at most before backing off (the
                            // members may disagree on the leader during an election).
                            redirects += 1;
                            self.leaders
                                .lock()
                                .expect("leaders")
                                .insert(key.clone(), l.clone());
                            continue;
                        }
                        AuthError::NotLeader { .. } | AuthError::Unavailable { .. } => {
                            self.leaders.lock().expect("leaders").remove(&key);
                            last_err = e;
                        }
                        _ => return Err(e),
                    }
                }
                Err(transport) => {
                    self.drop_conn(&addr);
                    self.leaders.lock().expect("leaders").remove(&key);
                    last_err = AuthError::Unavailable {
                        reason: format!("{addr}: {transport}"),
                    };
                }
            }
            redirects = 0;
            if Instant::now() + backoff > deadline {
                return Err(last_err);
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(300));
        }
    }

    async fn typed<T: DeserializeOwned>(
        &self,
        method: &str,
        params: Value,
    ) -> Result<T, AuthError> {
        let v = self.call(method, params).await?;
        serde_json::from_value(v)
            .map_err(|e| AuthError::Internal(format!("bad answer to {method}: {e}")))
    }

    pub async fn server_register(
        &self,
        site: &str,
        server_id: &str,
        data_addr: &str,
        admin_addr: &str,
    ) -> Result<(), AuthError> {
        self.call("server_register", json!({"site": site, "server_id": server_id, "data_addr": data_addr, "admin_addr": admin_addr}))
            .await
            .map(|_| ())
    }

    pub async fn server_heartbeat(
        &self,
        site: &str,
        server_id: &str,
        health: Value,
    ) -> Result<(), AuthError> {
        self.call(
            "server_heartbeat",
            json!({"site": site, "server_id": server_id, "health": health}),
        )
        .await
        .map(|_| ())
    }

    pub async fn volume_create(
        &self,
        site: &str,
        volume: &str,
        device: &str,
        size_bytes: u64,
        block_size: u32,
        servers: &[&str],
    ) -> Result<VolumeInfo, AuthError> {
        self.typed(
            "volume_create",
            json!({"site": site, "volume": volume, "device": device, "size_bytes": size_bytes,
                   "block_size": block_size, "servers": servers}),
        )
        .await
    }

    pub async fn volume_get(&self, site: &str, volume: &str) -> Result<VolumeInfo, AuthError> {
        self.typed("volume_get", json!({"site": site, "volume": volume}))
            .await
    }

    fn grant(&self, sent_at: Instant, r: LeaseReply) -> LeaseGrant {
        let lease = Duration::from_millis(r.lease_ms);
        LeaseGrant {
            epoch: r.epoch,
            generation: r.generation,
            lease_ms: r.lease_ms,
            sent_at,
            valid_until: sent_at + lease.saturating_sub(self.opts.drift_margin),
        }
    }

    /// Ask for the primary lease. The grant counts from before the first attempt was sent.
    /// The request names this process's [`incarnation`]: a restarted process is a new holder.
    pub async fn lease_acquire(
        &self,
        site: &str,
        volume: &str,
        server_id: &str,
    ) -> Result<LeaseGrant, AuthError> {
        let sent_at = Instant::now();
        let r: LeaseReply = self
            .typed(
                "lease_acquire",
                json!({"site": site, "volume": volume, "server_id": server_id,
                       "incarnation": incarnation()}),
            )
            .await?;
        Ok(self.grant(sent_at, r))
    }

    pub async fn lease_renew(
        &self,
        site: &str,
        volume: &str,
        server_id: &str,
        epoch: u64,
    ) -> Result<LeaseGrant, AuthError> {
        let sent_at = Instant::now();
        let r: LeaseReply = self
            .typed(
                "lease_renew",
                json!({"site": site, "volume": volume, "server_id": server_id, "epoch": epoch,
                       "incarnation": incarnation()}),
            )
            .await?;
        Ok(self.grant(sent_at, r))
    }

    pub async fn lease_release(
        &self,
        site: &str,
        volume: &str,
        server_id: &str,
        epoch: u64,
    ) -> Result<(), AuthError> {
        self.call(
            "lease_release",
            json!({"site": site, "volume": volume, "server_id": server_id, "epoch": epoch,
                   "incarnation": incarnation()}),
        )
        .await
        .map(|_| ())
    }

    pub async fn volume_set_in_sync(
        &self,
        site: &str,
        volume: &str,
        server_id: &str,
        in_sync: bool,
        epoch: u64,
    ) -> Result<VolumeInfo, AuthError> {
        self.typed(
            "volume_set_in_sync",
            json!({"site": site, "volume": volume, "server_id": server_id, "in_sync": in_sync, "epoch": epoch}),
        )
        .await
    }

    /// Fail over the volume's primary. The current epoch is read first and sent along, so a
    /// retry after a lost answer cannot fail over twice.
    pub async fn failover_request(
        &self,
        site: &str,
        volume: &str,
        reason: &str,
        force: bool,
    ) -> Result<FailoverReply, AuthError> {
        let epoch = self.volume_get(site, volume).await?.epoch;
        self.typed(
            "failover_request",
            json!({"site": site, "volume": volume, "reason": reason, "force": force, "epoch": epoch}),
        )
        .await
    }

    pub async fn device_create(
        &self,
        device: &str,
        size_bytes: u64,
        block_size: u32,
        volumes: &[(&str, &str)],
        authoritative_site: &str,
    ) -> Result<DeviceInfo, AuthError> {
        let vols: serde_json::Map<String, Value> = volumes
            .iter()
            .map(|(s, v)| (s.to_string(), json!(v)))
            .collect();
        self.typed(
            "device_create",
            json!({"device": device, "size_bytes": size_bytes, "block_size": block_size,
                   "volumes": vols, "authoritative_site": authoritative_site}),
        )
        .await
    }

    pub async fn device_get(&self, device: &str) -> Result<DeviceInfo, AuthError> {
        self.typed("device_get", json!({"device": device})).await
    }

    /// Ask for the device's tier-1 lease for the authoritative volume in `site`. The grant's
    /// `epoch` and `generation` are both the device's generation.
    pub async fn device_lease_acquire(
        &self,
        device: &str,
        site: &str,
    ) -> Result<LeaseGrant, AuthError> {
        let sent_at = Instant::now();
        let v = self
            .call(
                "device_lease_acquire",
                json!({"device": device, "site": site}),
            )
            .await?;
        self.device_grant(sent_at, v)
    }

    pub async fn device_lease_renew(
        &self,
        device: &str,
        site: &str,
        generation: u64,
    ) -> Result<LeaseGrant, AuthError> {
        let sent_at = Instant::now();
        let v = self
            .call(
                "device_lease_renew",
                json!({"device": device, "site": site, "generation": generation}),
            )
            .await?;
        self.device_grant(sent_at, v)
    }

    fn device_grant(&self, sent_at: Instant, v: Value) -> Result<LeaseGrant, AuthError> {
        let generation = v["generation"].as_u64();
        let lease_ms = v["lease_ms"].as_u64();
        match (generation, lease_ms) {
            (Some(generation), Some(lease_ms)) => Ok(self.grant(
                sent_at,
                LeaseReply {
                    epoch: generation,
                    generation,
                    lease_ms,
                },
            )),
            _ => Err(AuthError::Internal(format!("bad device lease answer: {v}"))),
        }
    }

    /// Make `site`'s volume the device's authoritative one (two-phase commit across groups).
    pub async fn volume_promote(
        &self,
        device: &str,
        site: &str,
        txn_id: &str,
    ) -> Result<PromoteReply, AuthError> {
        self.typed(
            "volume_promote",
            json!({"device": device, "to_site": site, "txn_id": txn_id}),
        )
        .await
    }
}

/// This process's incarnation: chosen once per process start (process id and start time), sent
/// with every primary-lease request, so the authority tells a restarted server (or a second
/// process under the same server id) from the one that holds the lease.
pub fn incarnation() -> &'static str {
    static INCARNATION: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    INCARNATION.get_or_init(|| {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        format!(
            "{:x}-{:x}{:08x}",
            std::process::id(),
            t.as_secs(),
            t.subsec_nanos()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_grant_counts_from_the_send_and_ends_a_drift_margin_early() {
        let c = AuthorityClient::with_options(
            vec!["127.0.0.1:1".into()],
            ClientOptions {
                drift_margin: Duration::from_millis(200),
                ..Default::default()
            },
        );
        let sent = Instant::now() - Duration::from_millis(1900);
        let g = c.grant(
            sent,
            LeaseReply {
                epoch: 3,
                generation: 1,
                lease_ms: 2000,
            },
        );
        assert_eq!(g.valid_until, sent + Duration::from_millis(1800));
        // 1900 ms after sending, a 2000 ms lease with a 200 ms margin is already over:
        // a holder that heard nothing since stops by itself.
        assert!(!g.is_valid());
        let fresh = c.grant(
            Instant::now(),
            LeaseReply {
                epoch: 3,
                generation: 1,
                lease_ms: 2000,
            },
        );
        assert!(fresh.is_valid());
    }

    #[test]
    fn calls_are_routed_to_their_group() {
        assert_eq!(group_key("lease_renew", &json!({"site": "a"})), "site:a");
        assert_eq!(
            group_key("device_lease_acquire", &json!({"site": "a"})),
            "global"
        );
        assert_eq!(
            group_key("cluster_status", &json!({"group": "global"})),
            "global"
        );
        assert_eq!(
            group_key("cluster_status", &json!({"group": "b"})),
            "site:b"
        );
    }
}
