//! Transactions across groups: promoting a device's volume in another site.
//!
//! A promotion changes the global group (new generation, new authoritative volume) and the
//! promoted volume's site group (that generation, a new epoch) in both or neither. Two-phase
//! commit with the groups as participants, each step a command in a group's Raft log:
//!
//! 1. global `TxnBegin`: records the transaction and locks the device (intent), fixing the
//!    new generation. This is also the global group's "yes" vote.
//! 2. site `TxnPrepare`: locks the volume (intent) and votes yes; or refuses (no).
//! 3. global `TxnDecide`: the decision, recorded once; the first decision wins.
//! 4. site then global `TxnFinish`: apply or drop the intents; global `TxnForget`.
//!
//! The steps and what each answer means are the pure [`Coordinator`] (coordinator.rs); this
//! module runs it over JSON-RPC and hosts the methods and the recovery loop.
//!
//! Every step is idempotent by transaction id, so the coordinator may retry any of them, and
//! [`resolve`] can finish a transaction whose coordinator died: it decides *abort* if nothing
//! was decided yet (presumed abort; a site that never prepared remembers the abort, so a late
//! prepare cannot lock the volume) and then drives the recorded decision to both groups.
//! Intents make conflicting changes (another promotion, a failover of the volume, deleting
//! the device or volume) fail with `TxnConflict` until the transaction is finished.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::{json, Value};

use crate::api::PromoteReply;
use crate::client::AuthorityClient;
use crate::coordinator::{Coordinator, Reply, Request};
use crate::error::AuthError;
use crate::host::Host;
use crate::state::{Command, Outcome, TxnRecord};
use crate::types::GroupId;

/// The two kinds of participants, as the coordinator reaches them.
pub trait Participants {
    fn global(&self, cmd: Command) -> impl Future<Output = Result<Outcome, AuthError>> + Send;
    fn site(
        &self,
        site: &str,
        cmd: Command,
    ) -> impl Future<Output = Result<Outcome, AuthError>> + Send;
    /// The global group's record of a transaction (linearizable).
    fn record(
        &self,
        txn_id: &str,
    ) -> impl Future<Output = Result<Option<TxnRecord>, AuthError>> + Send;
}

pub use crate::coordinator::Promoted;

/// Run a coordinator to its end against `p`, one request at a time.
async fn drive<P: Participants>(p: &P, mut c: Coordinator) -> Result<Promoted, AuthError> {
    while let Some(req) = c.request() {
        let reply = match req {
            Request::Global(cmd) => Reply::Outcome(p.global(cmd).await),
            Request::Site { site, cmd } => Reply::Outcome(p.site(&site, cmd).await),
            Request::Record { txn_id } => Reply::Record(p.record(&txn_id).await),
        };
        c.on_reply(reply)?;
    }
    c.result()
        .ok_or_else(|| AuthError::Internal(format!("transaction {} did not finish", c.txn_id())))
}

/// Coordinate the promotion of `device`'s volume in `to_site`. Any error means the
/// coordinator stopped midway: the transaction is then finished by retrying with the same
/// id, or by [`resolve`].
pub async fn promote<P: Participants>(
    p: &P,
    txn_id: &str,
    device: &str,
    to_site: &str,
) -> Result<Promoted, AuthError> {
    drive(p, Coordinator::promote(txn_id, device, to_site)).await
}

/// Finish a transaction whose coordinator may be dead: abort it if undecided, then apply the
/// decision everywhere. Returns the decision.
pub async fn resolve<P: Participants>(p: &P, txn_id: &str) -> Result<bool, AuthError> {
    Ok(drive(p, Coordinator::resolve(txn_id)).await?.committed)
}

/// Participants reached over JSON-RPC (`txn_step`), following each group's leader.
pub struct RpcParticipants {
    pub client: AuthorityClient,
}

impl RpcParticipants {
    async fn step(&self, group: &str, cmd: Command) -> Result<Outcome, AuthError> {
        let cmd = serde_json::to_value(cmd).map_err(|e| AuthError::Internal(e.to_string()))?;
        let params = if group == "global" {
            json!({"command": cmd})
        } else {
            json!({"site": group, "command": cmd})
        };
        let v = self.client.call("txn_step", params).await?;
        serde_json::from_value(v)
            .map_err(|e| AuthError::Internal(format!("bad txn_step answer: {e}")))
    }
}

impl Participants for RpcParticipants {
    async fn global(&self, cmd: Command) -> Result<Outcome, AuthError> {
        self.step("global", cmd).await
    }
    async fn site(&self, site: &str, cmd: Command) -> Result<Outcome, AuthError> {
        self.step(site, cmd).await
    }
    async fn record(&self, txn_id: &str) -> Result<Option<TxnRecord>, AuthError> {
        let v = self
            .client
            .call("txn_get", json!({"txn_id": txn_id}))
            .await?;
        serde_json::from_value(v)
            .map_err(|e| AuthError::Internal(format!("bad txn_get answer: {e}")))
    }
}

fn participants(host: &Host) -> RpcParticipants {
    let addrs = host
        .config
        .initial_members()
        .iter()
        .map(|m| m.rpc_addr.clone())
        .collect();
    RpcParticipants {
        client: AuthorityClient::new(addrs),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PromoteParams {
    device: String,
    to_site: String,
    /// Makes a retried promotion idempotent; one is generated if absent.
    #[serde(default)]
    txn_id: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TxnGet {
    txn_id: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TxnStep {
    #[serde(default)]
    site: Option<String>,
    command: Command,
}

fn parse<T: serde::de::DeserializeOwned>(v: Value) -> Result<T, AuthError> {
    serde_json::from_value(v).map_err(|e| AuthError::InvalidParams(e.to_string()))
}

/// The transaction methods: `volume_promote`, `txn_get`, and `txn_step` (the participants'
/// side, used by coordinators; it accepts transaction commands only).
pub async fn call(host: &Arc<Host>, method: &str, params: Value) -> Result<Value, AuthError> {
    match method {
        "volume_promote" => {
            let p: PromoteParams = parse(params)?;
            let txn_id = p
                .txn_id
                .unwrap_or_else(|| format!("promote-{}-{}-{}", p.device, p.to_site, unique()));
            let parts = participants(host);
            let out = promote(&parts, &txn_id, &p.device, &p.to_site).await?;
            if let (false, Some(e)) = (out.committed, &out.refusal) {
                return Err(e.clone());
            }
            let epoch = if out.committed {
                let site = host.site(&p.to_site).ok();
                let volume = parts
                    .record(&txn_id)
                    .await?
                    .map(|r| r.to_volume)
                    .unwrap_or_default();
                match site {
                    Some(_) => parts
                        .client
                        .call("volume_get", json!({"site": p.to_site, "volume": volume}))
                        .await
                        .ok()
                        .and_then(|v| v["epoch"].as_u64())
                        .unwrap_or(0),
                    None => 0,
                }
            } else {
                0
            };
            serde_json::to_value(PromoteReply {
                txn_id,
                committed: out.committed,
                generation: out.new_generation,
                epoch,
            })
            .map_err(|e| AuthError::Internal(e.to_string()))
        }
        "txn_get" => {
            let p: TxnGet = parse(params)?;
            let g = host.group(&GroupId::Global)?;
            g.linearize().await?;
            let rec = g
                .state
                .read()
                .expect("state lock")
                .state
                .txns
                .get(&p.txn_id)
                .cloned();
            serde_json::to_value(rec).map_err(|e| AuthError::Internal(e.to_string()))
        }
        "txn_step" => {
            let p: TxnStep = parse(params)?;
            let allowed = matches!(
                p.command,
                Command::TxnBegin { .. }
                    | Command::TxnPrepare { .. }
                    | Command::TxnDecide { .. }
                    | Command::TxnFinish { .. }
                    | Command::TxnForget { .. }
            );
            if !allowed {
                return Err(AuthError::InvalidParams(
                    "txn_step takes transaction commands only".into(),
                ));
            }
            let g = match &p.site {
                Some(s) => host.site(s)?,
                None => host.group(&GroupId::Global)?,
            };
            let out = g.write(p.command).await?;
            serde_json::to_value(out).map_err(|e| AuthError::Internal(e.to_string()))
        }
        _ => Err(AuthError::Internal(crate::rpc::NO_SUCH_METHOD.into())),
    }
}

fn unique() -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    format!("{:x}{:x}", t.as_secs(), t.subsec_nanos())
}

/// The recovery loop: on the global group's leader, finish every transaction left open for
/// longer than `stale_after` (its coordinator is presumed dead).
pub async fn recovery_loop(host: Arc<Host>, stale_after: Duration) {
    let parts = participants(&host);
    let mut first_seen: HashMap<String, Instant> = HashMap::new();
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let Ok(g) = host.group(&GroupId::Global) else {
            return;
        };
        if g.raft.metrics().borrow().current_leader != Some(g.node_id) {
            first_seen.clear();
            continue;
        }
        let open: Vec<String> = g
            .state
            .read()
            .expect("state lock")
            .state
            .txns
            .iter()
            .filter(|(_, t)| !t.finished)
            .map(|(id, _)| id.clone())
            .collect();
        first_seen.retain(|id, _| open.contains(id));
        for id in open {
            let seen = *first_seen.entry(id.clone()).or_insert_with(Instant::now);
            if seen.elapsed() < stale_after {
                continue;
            }
            match resolve(&parts, &id).await {
                Ok(commit) => tracing::info!(txn_id = %id, commit, "recovered transaction"),
                Err(e) => {
                    tracing::warn!(txn_id = %id, error = %e, "transaction recovery failed; will retry")
                }
            }
        }
    }
}

#[cfg(test)]
#[path = "txn_tests.rs"]
mod tests;
