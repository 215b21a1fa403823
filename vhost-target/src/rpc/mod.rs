//! JSON-RPC 2.0 control socket, SPDK-compatible.
//!
//! Method names, parameters and result shapes follow SPDK's (`rpc.py` and
//! other SPDK tooling work unchanged); error codes are JSON-RPC's for protocol
//! errors and SPDK's negative errno values for domain errors. The reference is
//! `docs/jsonrpc.md`.
//!
//! - [`handle_value`]: one parsed request (or batch) in, one response out;
//!   shared by the socket server and the config loader ([`call`]).
//! - [`server`]: the Unix-socket server, one thread per client.
//! - [`client`]: the client behind `vhost-target rpc`.
//! - [`attach_hint`]: the QEMU / cloud-hypervisor command lines logged for
//!   each new controller.

pub mod attach_hint;
pub mod client;
mod methods;
pub mod server;

use std::sync::Mutex;

use serde_json::{json, Value};

use crate::target::{Target, TargetError};

pub use methods::{call, method_names};

/// Where the daemon listens unless told otherwise (`-r`).
pub const DEFAULT_SOCKET: &str = "/var/tmp/tandem.sock";

/// Largest request accepted on a connection; a larger one is answered with a
/// parse error and the connection is closed.
pub const MAX_REQUEST_BYTES: usize = 1 << 20;

/// JSON-RPC 2.0 error codes.
pub mod code {
    pub const PARSE_ERROR: i32 = -32700;
    pub const INVALID_REQUEST: i32 = -32600;
    pub const METHOD_NOT_FOUND: i32 = -32601;
    pub const INVALID_PARAMS: i32 = -32602;
    pub const INTERNAL_ERROR: i32 = -32603;
}

/// A JSON-RPC error object.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message} (code {code})")]
pub struct RpcError {
    pub code: i32,
    pub message: String,
}

impl RpcError {
    pub fn new(code: i32, message: impl Into<String>) -> Self {
        RpcError {
            code,
            message: message.into(),
        }
    }
    pub fn parse_error(detail: impl std::fmt::Display) -> Self {
        Self::new(code::PARSE_ERROR, format!("Parse error: {detail}"))
    }
    pub fn invalid_request(detail: impl std::fmt::Display) -> Self {
        Self::new(code::INVALID_REQUEST, format!("Invalid request: {detail}"))
    }
    pub fn method_not_found(method: &str) -> Self {
        Self::new(
            code::METHOD_NOT_FOUND,
            format!("Method not found: {method}"),
        )
    }
    pub fn invalid_params(detail: impl std::fmt::Display) -> Self {
        Self::new(
            code::INVALID_PARAMS,
            format!("Invalid parameters: {detail}"),
        )
    }
    pub fn internal(detail: impl std::fmt::Display) -> Self {
        Self::new(code::INTERNAL_ERROR, format!("Internal error: {detail}"))
    }

    fn to_json(&self) -> Value {
        json!({ "code": self.code, "message": self.message })
    }
}

impl From<TargetError> for RpcError {
    fn from(e: TargetError) -> Self {
        RpcError::new(-e.errno(), e.to_string())
    }
}

/// A response carrying `error` for request `id`.
pub fn error_response(id: Value, e: &RpcError) -> Value {
    json!({ "jsonrpc": "2.0", "id": id, "error": e.to_json() })
}

/// Handles one JSON value read from a client: a request or a batch of them.
/// Returns the response to send, or `None` when there is nothing to send
/// (a notification, or a batch of notifications only).
pub fn handle_value(target: &Mutex<Target>, value: Value) -> Option<Value> {
    match value {
        Value::Array(batch) if batch.is_empty() => Some(error_response(
            Value::Null,
            &RpcError::invalid_request("empty batch"),
        )),
        Value::Array(batch) => {
            let responses: Vec<Value> = batch
                .into_iter()
                .filter_map(|v| handle_request(target, v))
                .collect();
            (!responses.is_empty()).then_some(Value::Array(responses))
        }
        other => handle_request(target, other),
    }
}

/// A request that passed the JSON-RPC envelope checks.
struct Request {
    /// `None`: a notification, which gets no response.
    id: Option<Value>,
    method: String,
    params: Option<Value>,
}

fn parse_request(value: Value) -> Result<Request, (Value, RpcError)> {
    let Value::Object(mut obj) = value else {
        return Err((Value::Null, RpcError::invalid_request("not an object")));
    };
    let id = match obj.remove("id") {
        None => None,
        Some(id @ (Value::Null | Value::Number(_) | Value::String(_))) => Some(id),
        Some(_) => {
            return Err((
                Value::Null,
                RpcError::invalid_request("id must be a string, a number or null"),
            ))
        }
    };
    let reply_id = id.clone().unwrap_or(Value::Null);
    let bad = |msg: &str| (reply_id.clone(), RpcError::invalid_request(msg));
    match obj.remove("jsonrpc") {
        Some(Value::String(v)) if v == "2.0" => {}
        _ => return Err(bad("jsonrpc must be \"2.0\"")),
    }
    let method = match obj.remove("method") {
        Some(Value::String(m)) => m,
        _ => return Err(bad("method must be a string")),
    };
    let params = match obj.remove("params") {
        None | Some(Value::Null) => None,
        Some(p @ Value::Object(_)) => Some(p),
        Some(Value::Array(a)) if a.is_empty() => None,
        Some(Value::Array(_)) => {
            return Err((
                reply_id,
                RpcError::invalid_params("positional params are not supported; pass an object"),
            ))
        }
        Some(_) => return Err(bad("params must be an object")),
    };
    if let Some(key) = obj.keys().next() {
        return Err(bad(&format!("unknown member {key:?}")));
    }
    Ok(Request { id, method, params })
}

fn handle_request(target: &Mutex<Target>, value: Value) -> Option<Value> {
    let req = match parse_request(value) {
        Ok(r) => r,
        Err((id, e)) => {
            tracing::warn!(error = %e, "refused a JSON-RPC request");
            return Some(error_response(id, &e));
        }
    };
    let outcome = {
        let mut t = target.lock().unwrap_or_else(|e| e.into_inner());
        // A bug in one method must not take the daemon down; the client gets
        // an internal error and every other client keeps being served.
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            call(&mut t, &req.method, req.params)
        }))
        .unwrap_or_else(|_| {
            Err(RpcError::internal(
                "the method panicked; see the daemon log",
            ))
        })
    };
    match &outcome {
        Ok(_) => tracing::debug!(method = %req.method, "rpc ok"),
        Err(e) => {
            tracing::info!(method = %req.method, code = e.code, error = %e.message, "rpc failed")
        }
    }
    let id = req.id?;
    Some(match outcome {
        Ok(result) => json!({ "jsonrpc": "2.0", "id": id, "result": result }),
        Err(e) => error_response(id, &e),
    })
}

#[cfg(test)]
mod tests;
