//! A JSON-RPC client for the daemon's Unix socket (`vhost-target rpc`).

use std::io::{self, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {path}: {source} (is the daemon running?)")]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("no response within {0:?}")]
    Timeout(Duration),
    #[error("the daemon closed the connection without a response")]
    Closed,
    #[error("malformed response: {0}")]
    Protocol(String),
    /// The daemon answered with a JSON-RPC error.
    #[error("{message} (code {code})")]
    Rpc { code: i32, message: String },
}

/// One connection to the daemon; calls are sent one at a time.
pub struct RpcClient {
    path: PathBuf,
    writer: UnixStream,
    reader: BufReader<UnixStream>,
    timeout: Duration,
    next_id: u64,
}

impl RpcClient {
    /// Connects; every later read and write gives up after `timeout`.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self, ClientError> {
        let connect_err = |source| ClientError::Connect {
            path: path.to_owned(),
            source,
        };
        let stream = UnixStream::connect(path).map_err(connect_err)?;
        let io_err = |source| ClientError::Io {
            path: path.to_owned(),
            source,
        };
        stream.set_read_timeout(Some(timeout)).map_err(io_err)?;
        stream.set_write_timeout(Some(timeout)).map_err(io_err)?;
        let reader = BufReader::new(stream.try_clone().map_err(io_err)?);
        Ok(RpcClient {
            path: path.to_owned(),
            writer: stream,
            reader,
            timeout,
            next_id: 1,
        })
    }

    /// Calls `method` and returns its `result`.
    pub fn call(&mut self, method: &str, params: Option<Value>) -> Result<Value, ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut req = json!({ "jsonrpc": "2.0", "id": id, "method": method });
        if let (Some(p), Some(obj)) = (params, req.as_object_mut()) {
            obj.insert("params".into(), p);
        }
        let mut buf = serde_json::to_vec(&req).map_err(|e| ClientError::Protocol(e.to_string()))?;
        buf.push(b'\n');
        self.writer.write_all(&buf).map_err(|e| self.io_error(e))?;
        let resp = self.read_value()?;
        let mut obj = match resp {
            Value::Object(o) => o,
            other => return Err(ClientError::Protocol(format!("not an object: {other}"))),
        };
        if obj.get("id") != Some(&json!(id)) {
            return Err(ClientError::Protocol(format!(
                "response id {:?} does not match request id {id}",
                obj.get("id")
            )));
        }
        if let Some(err) = obj.remove("error") {
            let code = err.get("code").and_then(Value::as_i64).unwrap_or(0);
            let message = err
                .get("message")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned();
            return Err(ClientError::Rpc {
                code: i32::try_from(code).unwrap_or(i32::MIN),
                message,
            });
        }
        obj.remove("result")
            .ok_or_else(|| ClientError::Protocol("neither result nor error".into()))
    }

    fn read_value(&mut self) -> Result<Value, ClientError> {
        let mut de = serde_json::Deserializer::from_reader(&mut self.reader).into_iter::<Value>();
        match de.next() {
            None => Err(ClientError::Closed),
            Some(Ok(v)) => Ok(v),
            Some(Err(e)) if e.is_io() => {
                let io = io::Error::other(e);
                Err(self.io_error(io))
            }
            Some(Err(e)) if e.is_eof() => Err(ClientError::Closed),
            Some(Err(e)) => Err(ClientError::Protocol(e.to_string())),
        }
    }

    fn io_error(&self, e: io::Error) -> ClientError {
        let timed_out = matches!(
            e.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ) || e
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<serde_json::Error>())
            .and_then(|je| je.io_error_kind())
            .is_some_and(|k| matches!(k, io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut));
        if timed_out {
            ClientError::Timeout(self.timeout)
        } else {
            ClientError::Io {
                path: self.path.clone(),
                source: e,
            }
        }
    }
}
