//! Multi-process harness: real `authority` processes on loopback, each with its own data
//! directory, killed with SIGKILL and restarted on the same directory.

#![allow(dead_code)]

pub mod relay;

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use authority::client::{AuthorityClient, ClientOptions, LeaseGrant};
use authority::error::AuthError;
use authority::history::GrantEvent;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};

pub const LEASE_MS: u64 = 1000;
pub const DRIFT_MS: u64 = 100;

/// A loopback port that is free now, picked *below* the kernel's ephemeral range: ports from
/// `bind(0)` and the source ports of outgoing connections come from that range, so another
/// process cannot be handed this port between our check and the daemon's bind (a port picked
/// with `bind(0)` could be, and a member that cannot bind its port exits: seen as "connection
/// refused" in a failed membership run). Only another test picking the same random port at the
/// same moment could collide.
fn free_port() -> u16 {
    use std::sync::atomic::AtomicU64;
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let lo = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let (base, span) = if lo > 12000 {
        (10000u64, u64::from(lo) - 10000)
    } else {
        // An unusual range: fall back to the kernel's choice.
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        return l.local_addr().unwrap().port();
    };
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .subsec_nanos() as u64
        ^ (u64::from(std::process::id()) << 20);
    for i in 0..1000 {
        let n = NEXT.fetch_add(1, Ordering::Relaxed) + i;
        // A multiplicative hash spreads successive picks over the range.
        let port = (base + (seed + n).wrapping_mul(0x9E37_79B9_7F4A_7C15) % span) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port below {lo}");
}

pub struct Member {
    pub id: u64,
    pub rpc_addr: String,
    pub raft_addr: String,
    /// Where it listens for Raft traffic when that differs from `raft_addr` (a relay).
    pub raft_listen: Option<String>,
    pub dir: PathBuf,
    pub child: Option<Child>,
}

pub struct Cluster {
    pub tmp: tempfile::TempDir,
    pub members: Vec<Member>,
    members_arg: String,
    /// The fault injector in front of every member's Raft port, if started with one.
    pub relay: Option<relay::RaftRelay>,
}

impl Cluster {
    /// Start `n` members hosting the global group and site-a, site-b.
    pub fn start(n: u64) -> Cluster {
        Self::start_listing(n, n)
    }

    /// Start `n` members of which only the first `listed` are the groups' initial members;
    /// the others start as joiners and wait to be added.
    pub fn start_listing(n: u64, listed: u64) -> Cluster {
        let tmp = tempfile::tempdir().unwrap();
        let members: Vec<Member> = (1..=n)
            .map(|id| Member {
                id,
                rpc_addr: format!("127.0.0.1:{}", free_port()),
                raft_addr: format!("127.0.0.1:{}", free_port()),
                raft_listen: None,
                dir: tmp.path().join(format!("m{id}")),
                child: None,
            })
            .collect();
        Self::launch(tmp, members, listed as usize, None)
    }

    /// Start `n` members whose Raft traffic passes a [`relay::RaftRelay`] (see there).
    pub fn start_relayed(n: u64) -> Cluster {
        let tmp = tempfile::tempdir().unwrap();
        let listen: Vec<(u64, String)> = (1..=n)
            .map(|id| (id, format!("127.0.0.1:{}", free_port())))
            .collect();
        let (relay, relay_addrs) = relay::RaftRelay::start(&listen);
        let members: Vec<Member> = listen
            .into_iter()
            .zip(relay_addrs)
            .map(|((id, listen), raft_addr)| Member {
                id,
                rpc_addr: format!("127.0.0.1:{}", free_port()),
                raft_addr,
                raft_listen: Some(listen),
                dir: tmp.path().join(format!("m{id}")),
                child: None,
            })
            .collect();
        let listed = members.len();
        Self::launch(tmp, members, listed, Some(relay))
    }

    /// Spawns every member; the first `listed` are the groups' initial members.
    fn launch(
        tmp: tempfile::TempDir,
        members: Vec<Member>,
        listed: usize,
        relay: Option<relay::RaftRelay>,
    ) -> Cluster {
        let members_arg = members
            .iter()
            .take(listed)
            .map(|m| format!("{}={}={}", m.id, m.raft_addr, m.rpc_addr))
            .collect::<Vec<_>>()
            .join(",");
        let mut c = Cluster {
            tmp,
            members,
            members_arg,
            relay,
        };
        for i in 0..c.members.len() {
            c.spawn(i);
        }
        c
    }

    pub fn spawn(&mut self, i: usize) {
        let m = &mut self.members[i];
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(self.tmp.path().join(format!("m{}.log", m.id)))
            .unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_authority"));
        cmd.args(["serve", "--node-id", &m.id.to_string()]);
        if let Some(l) = &m.raft_listen {
            cmd.args(["--raft-listen-addr", l]);
        }
        let child = cmd
            .arg("--data-dir")
            .arg(&m.dir)
            .args([
                "--rpc-addr",
                &m.rpc_addr,
                "--raft-addr",
                &m.raft_addr,
                "--unix-socket",
                "none",
            ])
            .args([
                "--members",
                &self.members_arg,
                "--lease-ms",
                &LEASE_MS.to_string(),
            ])
            .env("RUST_LOG", "info,openraft=warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        m.child = Some(child);
    }

    /// SIGKILL member `i` (no chance to flush anything).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    pub fn addrs(&self) -> Vec<String> {
        self.members.iter().map(|m| m.rpc_addr.clone()).collect()
    }

    pub fn client(&self) -> AuthorityClient {
        AuthorityClient::with_options(
            self.addrs(),
            ClientOptions {
                deadline: Duration::from_secs(15),
                attempt_timeout: Duration::from_secs(2),
                drift_margin: Duration::from_millis(DRIFT_MS),
            },
        )
    }

    /// A client that talks to member `i` only and never follows anyone (for local status).
    pub fn direct(&self, i: usize) -> AuthorityClient {
        AuthorityClient::with_options(
            vec![self.members[i].rpc_addr.clone()],
            ClientOptions {
                deadline: Duration::from_secs(3),
                ..Default::default()
            },
        )
    }

    /// Member `i`'s local view of `group` (not linearizable).
    pub async fn status(&self, i: usize, group: &str) -> Option<Value> {
        let v = self
            .direct(i)
            .call("cluster_status", json!({"group": group}))
            .await
            .ok()?;
        v.as_object()?.values().next().cloned()
    }

    /// Wait until some live member says it leads `group`; its index.
    pub async fn leader_of(&self, group: &str, timeout: Duration) -> usize {
        self.leader_except(group, None, timeout).await
    }

    /// As [`Self::leader_of`], ignoring member `except` (say, a leader cut off from the
    /// others, which may still believe it leads).
    pub async fn leader_except(
        &self,
        group: &str,
        except: Option<usize>,
        timeout: Duration,
    ) -> usize {
        let end = Instant::now() + timeout;
        loop {
            for (i, m) in self.members.iter().enumerate() {
                if m.child.is_none() || Some(i) == except {
                    continue;
                }
                if let Some(s) = self.status(i, group).await {
                    if s["state"] == "Leader" && s["leader"].as_u64() == Some(m.id) {
                        return i;
                    }
                }
            }
            assert!(
                Instant::now() < end,
                "no leader of {group} within {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}

/// What the lease loops did, for the test's report.
#[derive(Default, Debug)]
pub struct Ops {
    pub acquires: AtomicU64,
    pub renewals: AtomicU64,
    /// LeaseHeld, StaleEpoch, NotPrimary: the authority said no.
    pub refusals: AtomicU64,
    /// Anything else: timeouts, no leader, unreachable members.
    pub errors: AtomicU64,
}

impl Ops {
    pub fn renewals(&self) -> u64 {
        self.renewals.load(Ordering::Relaxed)
    }

    pub fn report(&self) -> String {
        format!(
            "{} acquires, {} renewals, {} refusals, {} errors",
            self.acquires.load(Ordering::Relaxed),
            self.renewals.load(Ordering::Relaxed),
            self.refusals.load(Ordering::Relaxed),
            self.errors.load(Ordering::Relaxed)
        )
    }
}

/// One server's loop until `until`: hold `volume`'s lease when designated primary, renewing
/// at L/4; record every grant as the holder sees it.
pub async fn lease_loop(
    client: Arc<AuthorityClient>,
    site: &'static str,
    volume: String,
    server: String,
    until: Instant,
    history: Arc<Mutex<Vec<GrantEvent>>>,
    ops: Arc<Ops>,
) {
    let mut held: Option<LeaseGrant> = None;
    while Instant::now() < until {
        let renewing = matches!(held, Some(g) if g.is_valid());
        let res = match held {
            Some(g) if renewing => client.lease_renew(site, &volume, &server, g.epoch).await,
            _ => client.lease_acquire(site, &volume, &server).await,
        };
        match res {
            Ok(g) => {
                history.lock().unwrap().push(GrantEvent {
                    volume: volume.clone(),
                    server_id: server.clone(),
                    epoch: g.epoch,
                    // A holder can act only once it has the answer, and only until its own
                    // deadline counted from the send.
                    valid_from: Instant::now(),
                    valid_until: g.valid_until,
                });
                let counter = if renewing {
                    &ops.renewals
                } else {
                    &ops.acquires
                };
                counter.fetch_add(1, Ordering::Relaxed);
                held = Some(g);
                tokio::time::sleep(Duration::from_millis(LEASE_MS / 4)).await;
            }
            Err(AuthError::StaleEpoch { .. }) | Err(AuthError::NotPrimary { .. }) => {
                // Deposed: stop acting at once (the recorded validity already ends by itself).
                ops.refusals.fetch_add(1, Ordering::Relaxed);
                held = None;
                // As a server does: read the volume (linearizable) to learn who is primary.
                // It also moves this client to the group's real leader if the one it knew
                // is cut off and answers from a stale state.
                let _ = client.volume_get(site, &volume).await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(AuthError::LeaseHeld { retry_after_ms, .. }) => {
                ops.refusals.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(retry_after_ms.min(500))).await;
            }
            Err(_) => {
                ops.errors.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Register `servers` in `site` and create `volume` on them (the first is its primary).
pub async fn setup_volume(c: &AuthorityClient, site: &str, volume: &str, servers: &[&str]) {
    for s in servers {
        c.server_register(site, s, &format!("{s}:data"), &format!("{s}:admin"))
            .await
            .unwrap();
    }
    c.volume_create(site, volume, "dev0", 1 << 20, 512, servers)
        .await
        .unwrap();
}

/// Wait until `ops` counts `more` renewals beyond now, or fail after `timeout`.
pub async fn renewals_resume(ops: &Ops, more: u64, timeout: Duration, what: &str) -> Duration {
    let (n0, t) = (ops.renewals(), Instant::now());
    while ops.renewals() < n0 + more {
        assert!(t.elapsed() < timeout, "renewals stopped after {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    t.elapsed()
}

/// The epoch the site group kept for each of `volumes`: what `history::check` compares the
/// recorded grants with.
pub async fn durable_epochs(
    client: &AuthorityClient,
    site: &str,
    volumes: &[&str],
) -> BTreeMap<String, u64> {
    let mut durable = BTreeMap::new();
    for v in volumes {
        let epoch = client.volume_get(site, v).await.unwrap().epoch;
        durable.insert(v.to_string(), epoch);
    }
    durable
}

/// The distinct (volume, server, epoch) lease holders in a recorded history.
pub fn holders(history: &[GrantEvent]) -> BTreeSet<(&str, &str, u64)> {
    history
        .iter()
        .map(|e| (e.volume.as_str(), e.server_id.as_str(), e.epoch))
        .collect()
}
