//! The JSON-RPC server on a Unix socket: one thread per client.
//!
//! A client may send requests back to back with no framing (SPDK's `rpc.py`
//! sends one bare JSON object and reads until the answer parses), so each
//! connection is read as a stream of JSON values; each answer is one JSON
//! object followed by a newline. A parse error desynchronises the stream, so
//! it is answered and that connection closed; the daemon keeps serving the
//! others.

use std::cell::Cell;
use std::io::{self, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::Value;

use super::{error_response, handle_value, RpcError, MAX_REQUEST_BYTES};
use crate::target::Target;

/// Most clients served at once; more are turned away.
const MAX_CLIENTS: usize = 64;
/// A client that does not read its answers for this long is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("another daemon is already serving on {0}")]
    InUse(PathBuf),
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    #[error("cannot listen on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// A running server. [`RpcServer::shutdown`] (or drop) stops accepting and
/// removes the socket file.
pub struct RpcServer {
    path: PathBuf,
    /// The listening socket, shared with the accept thread; shut down to
    /// wake its blocking accept() even if the socket file was removed.
    listener: UnixListener,
    stop: Arc<AtomicBool>,
    accept_thread: Option<JoinHandle<()>>,
}

impl RpcServer {
    /// Listens on `path`, replacing a stale socket file but never a live one.
    pub fn start(path: &Path, target: Arc<Mutex<Target>>) -> Result<Self, ServerError> {
        let io_err = |source| ServerError::Io {
            path: path.to_owned(),
            source,
        };
        match std::fs::symlink_metadata(path) {
            Ok(m) if !m.file_type().is_socket() => {
                return Err(ServerError::NotASocket(path.to_owned()))
            }
            Ok(_) => {
                if UnixStream::connect(path).is_ok() {
                    return Err(ServerError::InUse(path.to_owned()));
                }
                tracing::info!(path = %path.display(), "removing stale RPC socket");
                std::fs::remove_file(path).map_err(io_err)?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(e)),
        }
        let listener = UnixListener::bind(path).map_err(io_err)?;
        let stop = Arc::new(AtomicBool::new(false));
        let accept_thread = {
            let stop = stop.clone();
            let listener = listener.try_clone().map_err(io_err)?;
            std::thread::Builder::new()
                .name("rpc-accept".into())
                .spawn(move || accept_loop(listener, target, stop))
                .map_err(io_err)?
        };
        Ok(RpcServer {
            path: path.to_owned(),
            listener,
            stop,
            accept_thread: Some(accept_thread),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stops accepting clients and removes the socket file. Clients already
    /// connected finish their current request.
    pub fn shutdown(mut self) {
        self.stop_accepting();
    }

    fn stop_accepting(&mut self) {
        let Some(thread) = self.accept_thread.take() else {
            return;
        };
        self.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept(): on Linux, shutdown(2) of a listening
        // socket makes accept() fail with EINVAL.
        // SAFETY: the fd is the listening socket we own (self.listener), open
        // until self is dropped; shutdown does not close it.
        let rc = unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        if rc != 0 {
            // Fall back to a connection, which wakes accept() as well.
            let _ = UnixStream::connect(&self.path);
        }
        let _ = thread.join();
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Drop for RpcServer {
    fn drop(&mut self) {
        self.stop_accepting();
    }
}

fn accept_loop(listener: UnixListener, target: Arc<Mutex<Target>>, stop: Arc<AtomicBool>) {
    let clients = Arc::new(AtomicUsize::new(0));
    for conn in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let stream = match conn {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "accept on the RPC socket failed");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        if clients.load(Ordering::SeqCst) >= MAX_CLIENTS {
            tracing::warn!("too many RPC clients ({MAX_CLIENTS}); refusing one");
            continue;
        }
        clients.fetch_add(1, Ordering::SeqCst);
        let (target, clients2) = (target.clone(), clients.clone());
        let spawned = std::thread::Builder::new()
            .name("rpc-client".into())
            .spawn(move || {
                serve_connection(stream, &target);
                clients2.fetch_sub(1, Ordering::SeqCst);
            });
        if let Err(e) = spawned {
            clients.fetch_sub(1, Ordering::SeqCst);
            tracing::warn!(error = %e, "cannot start an RPC client thread");
        }
    }
}

/// Counts the bytes of the request being parsed and fails the read once
/// they pass the limit.
struct LimitedReader<R> {
    inner: R,
    used: Rc<Cell<usize>>,
    limit: usize,
}

impl<R: Read> Read for LimitedReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let room = self.limit.saturating_sub(self.used.get());
        if room == 0 {
            self.used.set(self.limit + 1);
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "request too large",
            ));
        }
        let n = buf.len().min(room);
        let got = self.inner.read(&mut buf[..n])?;
        self.used.set(self.used.get() + got);
        Ok(got)
    }
}

/// Serves one client until it hangs up or sends something unparseable.
pub(crate) fn serve_connection(stream: UnixStream, target: &Mutex<Target>) {
    let _ = stream.set_write_timeout(Some(WRITE_TIMEOUT));
    let mut writer = match stream.try_clone() {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(error = %e, "cannot clone an RPC connection");
            return;
        }
    };
    let used = Rc::new(Cell::new(0));
    let reader = LimitedReader {
        inner: BufReader::new(stream),
        used: used.clone(),
        limit: MAX_REQUEST_BYTES,
    };
    let mut values = serde_json::Deserializer::from_reader(reader).into_iter::<Value>();
    loop {
        used.set(0);
        let response = match values.next() {
            None => return,
            Some(Ok(v)) => match handle_value(target, v) {
                Some(r) => r,
                None => continue,
            },
            Some(Err(e)) => {
                let err = if used.get() > MAX_REQUEST_BYTES {
                    RpcError::parse_error(format!(
                        "request is longer than {MAX_REQUEST_BYTES} bytes"
                    ))
                } else if e.is_io() {
                    tracing::debug!(error = %e, "RPC connection failed");
                    return;
                } else {
                    RpcError::parse_error(&e)
                };
                tracing::warn!(error = %err.message, "closing an RPC connection");
                let _ = write_response(&mut writer, &error_response(Value::Null, &err));
                return;
            }
        };
        if let Err(e) = write_response(&mut writer, &response) {
            tracing::debug!(error = %e, "cannot answer an RPC client");
            return;
        }
    }
}

fn write_response(w: &mut UnixStream, v: &Value) -> io::Result<()> {
    let mut buf = serde_json::to_vec(v).map_err(io::Error::other)?;
    buf.push(b'\n');
    w.write_all(&buf)?;
    w.flush()
}
