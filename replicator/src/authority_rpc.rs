//! [`Authority`] over the contract's JSON-RPC 2.0 (newline-delimited, TCP).
//!
//! A stand-in for `authority::client::AuthorityClient` until that crate lands: it speaks the
//! agreed contract, tries the members in turn, follows `NotLeader` redirects, and maps error
//! codes to [`AuthorityError`]. One connection per call keeps it simple and safe to retry.

use crate::authority::*;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

#[derive(Debug)]
pub struct RpcAuthority {
    members: Vec<String>,
    /// Index of the member that answered last (likely the leader).
    preferred: AtomicUsize,
    next_id: AtomicU64,
    timeout: Duration,
}

impl RpcAuthority {
    pub fn new(members: Vec<String>) -> Self {
        assert!(!members.is_empty(), "at least one authority address");
        Self {
            members,
            preferred: AtomicUsize::new(0),
            next_id: AtomicU64::new(1),
            timeout: Duration::from_secs(2),
        }
    }

    async fn call_one(
        &self,
        addr: &str,
        method: &str,
        params: &Value,
    ) -> Result<Value, AuthorityError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let req = json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params});
        let fut = async {
            let mut s = TcpStream::connect(addr).await?;
            let mut line = serde_json::to_vec(&req).expect("request serializes");
            line.push(b'\n');
            s.write_all(&line).await?;
            let mut r = BufReader::new(s);
            let mut resp = String::new();
            r.read_line(&mut resp).await?;
            Ok::<_, std::io::Error>(resp)
        };
        let resp = tokio::time::timeout(self.timeout, fut)
            .await
            .map_err(|_| AuthorityError::Unavailable(format!("{addr}: timed out")))?
            .map_err(|e| AuthorityError::Unavailable(format!("{addr}: {e}")))?;
        let v: Value = serde_json::from_str(&resp)
            .map_err(|e| AuthorityError::Unavailable(format!("{addr}: bad answer: {e}")))?;
        if let Some(err) = v.get("error") {
            return Err(map_error(err));
        }
        v.get("result")
            .cloned()
            .ok_or_else(|| AuthorityError::Unavailable(format!("{addr}: answer without result")))
    }

    async fn call<T: serde::de::DeserializeOwned>(
        &self,
        method: &str,
        params: Value,
    ) -> Result<T, AuthorityError> {
        let n = self.members.len();
        let start = self.preferred.load(Ordering::Relaxed);
        let mut last = AuthorityError::Unavailable("no member tried".into());
        let mut redirect: Option<String> = None;
        for i in 0..(2 * n) {
            let addr = match redirect.take() {
                Some(a) => a,
                None => self.members[(start + i) % n].clone(),
            };
            match self.call_one(&addr, method, &params).await {
                Ok(v) => {
                    if let Some(pos) = self.members.iter().position(|m| *m == addr) {
                        self.preferred.store(pos, Ordering::Relaxed);
                    }
                    return serde_json::from_value(v).map_err(|e| {
                        AuthorityError::Unavailable(format!("{method}: unexpected result: {e}"))
                    });
                }
                Err(AuthorityError::NotLeader { leader_addr }) => {
                    redirect = leader_addr.clone();
                    last = AuthorityError::NotLeader { leader_addr };
                }
                Err(e @ AuthorityError::Unavailable(_)) => last = e,
                Err(e) => return Err(e),
            }
        }
        Err(last)
    }
}

fn map_error(err: &Value) -> AuthorityError {
    let code = err.get("code").and_then(Value::as_i64).unwrap_or(0);
    let message = err
        .get("message")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned();
    let data = err.get("data").cloned().unwrap_or(Value::Null);
    let s = |k: &str| data.get(k).and_then(Value::as_str).map(str::to_owned);
    let u = |k: &str| data.get(k).and_then(Value::as_u64).unwrap_or(0);
    match code {
        -32010 => AuthorityError::NotLeader {
            leader_addr: s("leader_addr"),
        },
        -32011 => AuthorityError::StaleEpoch {
            epoch: u("epoch"),
            generation: u("generation"),
        },
        -32012 => AuthorityError::LeaseHeld {
            holder: s("holder").unwrap_or_default(),
            retry_after_ms: u("retry_after_ms"),
        },
        -32013 => AuthorityError::NotInSync {
            server_id: s("server_id").unwrap_or_default(),
        },
        -32014 => AuthorityError::UnknownSite,
        -32015 => AuthorityError::UnknownVolume,
        -32016 => AuthorityError::UnknownDevice,
        -32017 => AuthorityError::UnknownServer,
        -32018 => AuthorityError::NotPrimary {
            primary: s("primary"),
        },
        -32019 => AuthorityError::TxnConflict {
            txn_id: s("txn_id").unwrap_or_default(),
        },
        _ => AuthorityError::Other { code, message },
    }
}

/// The JSON-RPC error object for an [`AuthorityError`] (the inverse of `map_error`), for a
/// server side that speaks the same contract (used by the test harness's stand-in).
pub fn error_object(e: &AuthorityError) -> Value {
    let (code, data) = match e {
        AuthorityError::NotLeader { leader_addr } => (-32010, json!({"leader_addr": leader_addr})),
        AuthorityError::StaleEpoch { epoch, generation } => {
            (-32011, json!({"epoch": epoch, "generation": generation}))
        }
        AuthorityError::LeaseHeld {
            holder,
            retry_after_ms,
        } => (
            -32012,
            json!({"holder": holder, "retry_after_ms": retry_after_ms}),
        ),
        AuthorityError::NotInSync { server_id } => (-32013, json!({"server_id": server_id})),
        AuthorityError::UnknownSite => (-32014, Value::Null),
        AuthorityError::UnknownVolume => (-32015, Value::Null),
        AuthorityError::UnknownDevice => (-32016, Value::Null),
        AuthorityError::UnknownServer => (-32017, Value::Null),
        AuthorityError::NotPrimary { primary } => (-32018, json!({"primary": primary})),
        AuthorityError::TxnConflict { txn_id } => (-32019, json!({"txn_id": txn_id})),
        AuthorityError::Unavailable(_) => (-32603, Value::Null),
        AuthorityError::Other { code, .. } => (*code, Value::Null),
    };
    json!({"code": code, "message": e.to_string(), "data": data})
}

impl Authority for RpcAuthority {
    fn server_register<'a>(
        &'a self,
        site: &'a str,
        server_id: &'a str,
        data_addr: &'a str,
        admin_addr: &'a str,
    ) -> BoxFuture<'a, Result<(), AuthorityError>> {
        Box::pin(async move {
            let _: Value = self
                .call(
                    "server_register",
                    json!({"site": site, "server_id": server_id, "data_addr": data_addr, "admin_addr": admin_addr}),
                )
                .await?;
            Ok(())
        })
    }

    fn server_heartbeat<'a>(
        &'a self,
        site: &'a str,
        server_id: &'a str,
        health: Value,
    ) -> BoxFuture<'a, Result<(), AuthorityError>> {
        Box::pin(async move {
            let _: Value = self
                .call(
                    "server_heartbeat",
                    json!({"site": site, "server_id": server_id, "health": health}),
                )
                .await?;
            Ok(())
        })
    }

    fn volume_get<'a>(
        &'a self,
        site: &'a str,
        volume: &'a str,
    ) -> BoxFuture<'a, Result<VolumeInfo, AuthorityError>> {
        Box::pin(self.call("volume_get", json!({"site": site, "volume": volume})))
    }

    fn lease_acquire<'a>(
        &'a self,
        site: &'a str,
        volume: &'a str,
        server_id: &'a str,
    ) -> BoxFuture<'a, Result<LeaseGrant, AuthorityError>> {
        Box::pin(self.call(
            "lease_acquire",
            json!({"site": site, "volume": volume, "server_id": server_id}),
        ))
    }

    fn lease_renew<'a>(
        &'a self,
        site: &'a str,
        volume: &'a str,
        server_id: &'a str,
        epoch: u64,
    ) -> BoxFuture<'a, Result<LeaseGrant, AuthorityError>> {
        Box::pin(self.call(
            "lease_renew",
            json!({"site": site, "volume": volume, "server_id": server_id, "epoch": epoch}),
        ))
    }

    fn lease_release<'a>(
        &'a self,
        site: &'a str,
        volume: &'a str,
        server_id: &'a str,
        epoch: u64,
    ) -> BoxFuture<'a, Result<(), AuthorityError>> {
        Box::pin(async move {
            let _: Value = self
                .call(
                    "lease_release",
                    json!({"site": site, "volume": volume, "server_id": server_id, "epoch": epoch}),
                )
                .await?;
            Ok(())
        })
    }

    fn volume_set_in_sync<'a>(
        &'a self,
        site: &'a str,
        volume: &'a str,
        server_id: &'a str,
        in_sync: bool,
        epoch: u64,
    ) -> BoxFuture<'a, Result<VolumeInfo, AuthorityError>> {
        Box::pin(self.call(
            "volume_set_in_sync",
            json!({"site": site, "volume": volume, "server_id": server_id, "in_sync": in_sync, "epoch": epoch}),
        ))
    }

    fn failover_request<'a>(
        &'a self,
        site: &'a str,
        volume: &'a str,
        reason: &'a str,
        force: bool,
    ) -> BoxFuture<'a, Result<FailoverOutcome, AuthorityError>> {
        Box::pin(self.call(
            "failover_request",
            json!({"site": site, "volume": volume, "reason": reason, "force": force}),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_codes_round_trip() {
        for e in [
            AuthorityError::NotLeader {
                leader_addr: Some("a:1".into()),
            },
            AuthorityError::StaleEpoch {
                epoch: 4,
                generation: 2,
            },
            AuthorityError::LeaseHeld {
                holder: "s1".into(),
                retry_after_ms: 30,
            },
            AuthorityError::NotInSync {
                server_id: "s2".into(),
            },
            AuthorityError::UnknownVolume,
            AuthorityError::NotPrimary {
                primary: Some("s1".into()),
            },
        ] {
            assert_eq!(map_error(&error_object(&e)), e);
        }
    }
}
