//! JSON-RPC 2.0 over TCP and a Unix socket: one JSON object per line.
//!
//! Requests on one connection run concurrently (a client may pipeline; answers carry the
//! request's id and may come back out of order). A line over [`MAX_LINE`] bytes, or one that
//! is not JSON, gets an error answer; the connection and the groups keep serving.

mod methods;

use std::path::Path;
use std::sync::Arc;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::mpsc;

use crate::error::{AuthError, CODE_INVALID_REQUEST, CODE_METHOD_NOT_FOUND, CODE_PARSE_ERROR};
use crate::host::Host;

pub use methods::{METHODS, NO_SUCH_METHOD};

/// The longest request line accepted.
pub const MAX_LINE: usize = 1 << 20;

fn error_response(id: Value, code: i64, message: String, data: Value) -> Value {
    let mut err = json!({ "code": code, "message": message });
    if !data.is_null() {
        err["data"] = data;
    }
    json!({ "jsonrpc": "2.0", "id": id, "error": err })
}

/// Answer one parsed request (`None` for a notification).
pub async fn handle(host: &Arc<Host>, req: Value) -> Option<Value> {
    let id = req.get("id").cloned();
    let valid = req.get("jsonrpc").and_then(Value::as_str) == Some("2.0")
        && req.get("method").map(Value::is_string).unwrap_or(false)
        && id
            .as_ref()
            .map(|i| i.is_string() || i.is_number() || i.is_null())
            .unwrap_or(true);
    if !req.is_object() || !valid {
        return Some(error_response(
            id.unwrap_or(Value::Null),
            CODE_INVALID_REQUEST,
            "invalid request: need jsonrpc \"2.0\", a string method and a string or number id"
                .into(),
            Value::Null,
        ));
    }
    let method = req["method"].as_str().expect("checked").to_string();
    let params = req.get("params").cloned().unwrap_or(json!({}));
    let result = if !params.is_object() {
        Err(Some(AuthError::InvalidParams(
            "params must be an object (named parameters)".into(),
        )))
    } else {
        methods::call(host, &method, params).await.map_err(Some)
    };
    let id = id?;
    Some(match result {
        Ok(v) => json!({ "jsonrpc": "2.0", "id": id, "result": v }),
        Err(Some(AuthError::Internal(m))) if m == methods::NO_SUCH_METHOD => error_response(
            id,
            CODE_METHOD_NOT_FOUND,
            format!("method not found: {method}"),
            Value::Null,
        ),
        Err(Some(e)) => error_response(id, e.code(), e.to_string(), e.data()),
        Err(None) => unreachable!(),
    })
}

async fn serve_stream<S>(host: Arc<Host>, stream: S)
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (rd, mut wr) = tokio::io::split(stream);
    let (tx, mut rx) = mpsc::unbounded_channel::<Value>();
    let writer = tokio::spawn(async move {
        while let Some(v) = rx.recv().await {
            let mut line = serde_json::to_vec(&v).expect("a Value serialises");
            line.push(b'\n');
            // Write everything already answered in one go.
            while let Ok(more) = rx.try_recv() {
                line.extend(serde_json::to_vec(&more).expect("a Value serialises"));
                line.push(b'\n');
            }
            if wr.write_all(&line).await.is_err() {
                return;
            }
        }
    });
    let mut rd = BufReader::new(rd);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        // Read at most MAX_LINE + 1 bytes of a line, so a huge line cannot exhaust memory.
        let n = match (&mut rd)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut buf)
            .await
        {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if n > MAX_LINE {
            let ended = buf.last() == Some(&b'\n');
            let _ = tx.send(error_response(
                Value::Null,
                CODE_INVALID_REQUEST,
                format!("request line over {MAX_LINE} bytes"),
                Value::Null,
            ));
            // Skip the rest of the oversized line.
            if !ended {
                loop {
                    buf.clear();
                    match (&mut rd)
                        .take(MAX_LINE as u64)
                        .read_until(b'\n', &mut buf)
                        .await
                    {
                        Ok(0) | Err(_) => break,
                        Ok(_) if buf.last() == Some(&b'\n') => break,
                        Ok(_) => continue,
                    }
                }
            }
            continue;
        }
        let line = String::from_utf8_lossy(&buf);
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let req: Value = match serde_json::from_str(line) {
            Ok(v) => v,
            Err(e) => {
                let _ = tx.send(error_response(
                    Value::Null,
                    CODE_PARSE_ERROR,
                    format!("parse error: {e}"),
                    Value::Null,
                ));
                continue;
            }
        };
        let host = host.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let answer = match req {
                Value::Array(reqs) if !reqs.is_empty() => {
                    let mut out = Vec::new();
                    for r in reqs {
                        if let Some(a) = handle(&host, r).await {
                            out.push(a);
                        }
                    }
                    (!out.is_empty()).then_some(Value::Array(out))
                }
                other => handle(&host, other).await,
            };
            if let Some(a) = answer {
                let _ = tx.send(a);
            }
        });
    }
    drop(tx);
    let _ = writer.await;
}

/// Serve JSON-RPC on a TCP listener until the task is dropped.
pub async fn serve_tcp(host: Arc<Host>, listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok((s, _)) => {
                let _ = s.set_nodelay(true);
                tokio::spawn(serve_stream(host.clone(), s));
            }
            Err(e) => {
                tracing::warn!(error = %e, "rpc accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

/// Serve JSON-RPC on a Unix socket at `path` (an old socket file there is replaced).
pub async fn serve_unix(
    host: Arc<Host>,
    path: &Path,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    Ok(tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((s, _)) => {
                    tokio::spawn(serve_stream(host.clone(), s));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "unix rpc accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    }))
}
