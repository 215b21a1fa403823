//! Every refusal the authority gives, with its JSON-RPC code (docs/authority.md lists them).

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// A refusal. It crosses the Raft log (state machine outcomes) and the wire, so it is data.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, thiserror::Error)]
pub enum AuthError {
    #[error("not the leader of this group (leader: {leader_addr:?})")]
    NotLeader { leader_addr: Option<String> },
    #[error("stale epoch: the volume is at epoch {epoch}, generation {generation}")]
    StaleEpoch { epoch: u64, generation: u64 },
    #[error("lease held by {holder}; retry after {retry_after_ms} ms")]
    LeaseHeld { holder: String, retry_after_ms: u64 },
    #[error("server {server_id} is not in sync (pass force to promote it anyway)")]
    NotInSync { server_id: String },
    #[error("unknown site {site}")]
    UnknownSite { site: String },
    #[error("unknown volume {volume}")]
    UnknownVolume { volume: String },
    #[error("unknown device {device}")]
    UnknownDevice { device: String },
    #[error("unknown server {server_id}")]
    UnknownServer { server_id: String },
    #[error("not the designated primary (primary: {primary:?})")]
    NotPrimary { primary: Option<String> },
    #[error("conflicts with transaction {txn_id}")]
    TxnConflict { txn_id: String },
    #[error("{what} already exists")]
    AlreadyExists { what: String },
    #[error("group unavailable: {reason}")]
    Unavailable { reason: String },
    #[error("not implemented: {what}")]
    NotImplemented { what: String },
    #[error("invalid params: {0}")]
    InvalidParams(String),
    #[error("internal error: {0}")]
    Internal(String),
}

pub const CODE_PARSE_ERROR: i64 = -32700;
pub const CODE_INVALID_REQUEST: i64 = -32600;
pub const CODE_METHOD_NOT_FOUND: i64 = -32601;
pub const CODE_INVALID_PARAMS: i64 = -32602;
pub const CODE_INTERNAL: i64 = -32603;

impl AuthError {
    /// The JSON-RPC `error.code` (the contract's numbers; -32020.. are Tandem additions).
    pub fn code(&self) -> i64 {
        match self {
            AuthError::NotLeader { .. } => -32010,
            AuthError::StaleEpoch { .. } => -32011,
            AuthError::LeaseHeld { .. } => -32012,
            AuthError::NotInSync { .. } => -32013,
            AuthError::UnknownSite { .. } => -32014,
            AuthError::UnknownVolume { .. } => -32015,
            AuthError::UnknownDevice { .. } => -32016,
            AuthError::UnknownServer { .. } => -32017,
            AuthError::NotPrimary { .. } => -32018,
            AuthError::TxnConflict { .. } => -32019,
            AuthError::AlreadyExists { .. } => -32020,
            AuthError::Unavailable { .. } => -32021,
            AuthError::NotImplemented { .. } => -32022,
            AuthError::InvalidParams(_) => CODE_INVALID_PARAMS,
            AuthError::Internal(_) => CODE_INTERNAL,
        }
    }

    /// The structured `error.data`.
    pub fn data(&self) -> Value {
        match self {
            AuthError::NotLeader { leader_addr } => json!({ "leader_addr": leader_addr }),
            AuthError::StaleEpoch { epoch, generation } => {
                json!({ "epoch": epoch, "generation": generation })
            }
            AuthError::LeaseHeld {
                holder,
                retry_after_ms,
            } => {
                json!({ "holder": holder, "retry_after_ms": retry_after_ms })
            }
            AuthError::NotInSync { server_id } => json!({ "server_id": server_id }),
            AuthError::UnknownSite { site } => json!({ "site": site }),
            AuthError::UnknownVolume { volume } => json!({ "volume": volume }),
            AuthError::UnknownDevice { device } => json!({ "device": device }),
            AuthError::UnknownServer { server_id } => json!({ "server_id": server_id }),
            AuthError::NotPrimary { primary } => json!({ "primary": primary }),
            AuthError::TxnConflict { txn_id } => json!({ "txn_id": txn_id }),
            AuthError::AlreadyExists { what } => json!({ "what": what }),
            AuthError::Unavailable { reason } => json!({ "reason": reason }),
            AuthError::NotImplemented { what } => json!({ "what": what }),
            AuthError::InvalidParams(_) | AuthError::Internal(_) => Value::Null,
        }
    }

    /// Rebuild an error from a JSON-RPC error object (the client side of `code`/`data`).
    pub fn from_rpc(code: i64, message: &str, data: &Value) -> AuthError {
        let s = |k: &str| {
            data.get(k)
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string()
        };
        let n = |k: &str| data.get(k).and_then(Value::as_u64).unwrap_or(0);
        let os = |k: &str| data.get(k).and_then(Value::as_str).map(str::to_string);
        match code {
            -32010 => AuthError::NotLeader {
                leader_addr: os("leader_addr"),
            },
            -32011 => AuthError::StaleEpoch {
                epoch: n("epoch"),
                generation: n("generation"),
            },
            -32012 => AuthError::LeaseHeld {
                holder: s("holder"),
                retry_after_ms: n("retry_after_ms"),
            },
            -32013 => AuthError::NotInSync {
                server_id: s("server_id"),
            },
            -32014 => AuthError::UnknownSite { site: s("site") },
            -32015 => AuthError::UnknownVolume {
                volume: s("volume"),
            },
            -32016 => AuthError::UnknownDevice {
                device: s("device"),
            },
            -32017 => AuthError::UnknownServer {
                server_id: s("server_id"),
            },
            -32018 => AuthError::NotPrimary {
                primary: os("primary"),
            },
            -32019 => AuthError::TxnConflict {
                txn_id: s("txn_id"),
            },
            -32020 => AuthError::AlreadyExists { what: s("what") },
            -32021 => AuthError::Unavailable {
                reason: s("reason"),
            },
            -32022 => AuthError::NotImplemented { what: s("what") },
            CODE_INVALID_PARAMS => AuthError::InvalidParams(message.to_string()),
            _ => AuthError::Internal(format!("{code}: {message}")),
        }
    }
}
