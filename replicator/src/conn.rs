//! Framed, pipelined TCP: reading frames off a stream, a writer task that batches encoded
//! frames, and [`PeerLink`], the sending side of a connection with many requests in flight
//! and answers matched by request id (used by the primary towards its secondaries and by
//! the client pipeline towards the primary).

use crate::frame::{self, Frame, FrameError, Header, HEADER_LEN};
use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

#[derive(Debug, Error)]
pub enum ReadError {
    #[error("connection I/O: {0}")]
    Io(#[from] io::Error),
    #[error("bad frame: {0}")]
    Frame(#[from] FrameError),
    #[error("connection closed in the middle of a frame")]
    Truncated,
}

/// Reads one frame. `Ok(None)` on a clean end of stream between frames.
///
/// Give it a buffered reader ([`frame_reader`]): pipelined small frames then cost one
/// `recv` for many, not two each.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<Frame>, ReadError> {
    let mut hdr = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        let n = r.read(&mut hdr[got..]).await?;
        if n == 0 {
            return if got == 0 {
                Ok(None)
            } else {
                Err(ReadError::Truncated)
            };
        }
        got += n;
    }
    // The size is checked before the payload buffer is allocated.
    let raw = frame::parse_header_prefix(&hdr)?;
    let mut payload = vec![0u8; raw.payload_len];
    if let Err(e) = r.read_exact(&mut payload).await {
        return Err(if e.kind() == io::ErrorKind::UnexpectedEof {
            ReadError::Truncated
        } else {
            ReadError::Io(e)
        });
    }
    Ok(Some(frame::finish_decode(&raw, payload)?))
}

/// The read half of a connection, buffered for [`read_frame`].
pub fn frame_reader(r: OwnedReadHalf) -> BufReader<OwnedReadHalf> {
    BufReader::with_capacity(64 << 10, r)
}

/// Spawns the task that owns the write half: it writes every encoded frame sent to the
/// returned channel, flushing when the channel is momentarily empty (so a burst of answers
/// goes out in few syscalls).
pub fn spawn_writer(w: OwnedWriteHalf) -> mpsc::UnboundedSender<Vec<u8>> {
    let (tx, mut rx) = mpsc::unbounded_channel::<Vec<u8>>();
    tokio::spawn(async move {
        let mut w = BufWriter::with_capacity(256 << 10, w);
        while let Some(buf) = rx.recv().await {
            if w.write_all(&buf).await.is_err() {
                return;
            }
            // A burst (more than one frame queued by the time this task ran): before the
            // flush, let the tasks that are ready now (the other requests read in the same
            // `recv`) queue their frames too, so they leave in one `sendto`. Without this, on
            // a multi-threaded runtime a burst of 32 answers cost ~30 sendto calls (strace),
            // each a wake-up of the peer. A lone frame (QD1) is flushed at once: the yield
            // would cost an extra `epoll_wait` on its path.
            let mut burst = false;
            while let Ok(more) = rx.try_recv() {
                burst = true;
                if w.write_all(&more).await.is_err() {
                    return;
                }
            }
            if burst {
                tokio::task::yield_now().await;
                while let Ok(more) = rx.try_recv() {
                    if w.write_all(&more).await.is_err() {
                        return;
                    }
                }
            }
            if w.flush().await.is_err() {
                return;
            }
        }
        let _ = w.shutdown().await;
    });
    tx
}

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum LinkError {
    #[error("connection to {0} closed")]
    Closed(String),
    #[error("connecting to {addr}: {reason}")]
    Connect { addr: String, reason: String },
    #[error("no answer from {0} in time")]
    Timeout(String),
}

/// Where an answer goes: a one-shot per request, or one channel for the whole link.
enum Waiter {
    Once(oneshot::Sender<Result<Frame, LinkError>>),
    Events,
}

/// An answer delivered on a link's event channel: `(link_id, request_id, answer)`; a
/// `request_id` of `None` means the link closed (every request still pending on it is lost).
pub type LinkEvent = (u64, Option<u64>, Result<Frame, LinkError>);

struct Pending {
    closed: bool,
    waiters: HashMap<u64, Waiter>,
}

static NEXT_LINK_ID: AtomicU64 = AtomicU64::new(1);

/// The requesting side of one connection.
pub struct PeerLink {
    id: u64,
    addr: String,
    tx: mpsc::UnboundedSender<Vec<u8>>,
    pending: Arc<Mutex<Pending>>,
    next_request: AtomicU64,
    reader: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for PeerLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerLink")
            .field("id", &self.id)
            .field("addr", &self.addr)
            .finish()
    }
}

impl PeerLink {
    /// Connects to `addr`. With `events`, every answer is delivered there (see [`LinkEvent`]);
    /// without, each [`PeerLink::send`] gets its own one-shot.
    pub async fn connect(
        addr: &str,
        timeout: Duration,
        events: Option<mpsc::UnboundedSender<LinkEvent>>,
    ) -> Result<Self, LinkError> {
        let err = |reason: String| LinkError::Connect {
            addr: addr.to_owned(),
            reason,
        };
        let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| err("timed out".into()))?
            .map_err(|e| err(e.to_string()))?;
        let _ = stream.set_nodelay(true);
        let (r, w) = stream.into_split();
        let mut r = frame_reader(r);
        let tx = spawn_writer(w);
        let pending = Arc::new(Mutex::new(Pending {
            closed: false,
            waiters: HashMap::new(),
        }));
        let id = NEXT_LINK_ID.fetch_add(1, Ordering::Relaxed);
        let p = pending.clone();
        let a = addr.to_owned();
        let reader = tokio::spawn(async move {
            loop {
                match read_frame(&mut r).await {
                    Ok(Some(f)) if f.header.kind.is_answer() => {
                        let rid = f.header.request_id;
                        let w = p.lock().expect("pending lock").waiters.remove(&rid);
                        match w {
                            Some(Waiter::Once(s)) => {
                                let _ = s.send(Ok(f));
                            }
                            Some(Waiter::Events) => {
                                if let Some(ev) = &events {
                                    let _ = ev.send((id, Some(rid), Ok(f)));
                                }
                            }
                            None => tracing::warn!(peer = %a, rid, "answer to no pending request"),
                        }
                    }
                    Ok(Some(f)) => {
                        tracing::warn!(peer = %a, kind = ?f.header.kind, "peer sent a request on a requesting link; closing");
                        break;
                    }
                    Ok(None) => break,
                    Err(e) => {
                        tracing::warn!(peer = %a, error = %e, "closing link");
                        break;
                    }
                }
            }
            let drained: Vec<(u64, Waiter)> = {
                let mut g = p.lock().expect("pending lock");
                g.closed = true;
                g.waiters.drain().collect()
            };
            for (_, w) in drained {
                if let Waiter::Once(s) = w {
                    let _ = s.send(Err(LinkError::Closed(a.clone())));
                }
            }
            if let Some(ev) = &events {
                let _ = ev.send((id, None, Err(LinkError::Closed(a.clone()))));
            }
        });
        Ok(Self {
            id,
            addr: addr.to_owned(),
            tx,
            pending,
            next_request: AtomicU64::new(1),
            reader,
        })
    }

    pub fn id(&self) -> u64 {
        self.id
    }
    pub fn addr(&self) -> &str {
        &self.addr
    }

    pub fn is_closed(&self) -> bool {
        self.pending.lock().expect("pending lock").closed || self.tx.is_closed()
    }

    /// A fresh request id on this link.
    pub fn next_request_id(&self) -> u64 {
        self.next_request.fetch_add(1, Ordering::Relaxed)
    }

    fn enqueue(&self, header: &Header, payload: &[u8], w: Waiter) -> Result<(), LinkError> {
        {
            let mut g = self.pending.lock().expect("pending lock");
            if g.closed {
                return Err(LinkError::Closed(self.addr.clone()));
            }
            g.waiters.insert(header.request_id, w);
        }
        // Frames leave in the order of these calls: callers rely on that for seq order.
        self.tx
            .send(frame::encode(header, payload))
            .map_err(|_| LinkError::Closed(self.addr.clone()))
    }

    /// Queues a request (not async: the frame is queued in call order) and returns the
    /// receiver of its answer.
    pub fn send(
        &self,
        header: &Header,
        payload: &[u8],
    ) -> Result<oneshot::Receiver<Result<Frame, LinkError>>, LinkError> {
        let (s, r) = oneshot::channel();
        self.enqueue(header, payload, Waiter::Once(s))?;
        Ok(r)
    }

    /// Queues a request whose answer goes to the link's event channel.
    pub fn send_evented(&self, header: &Header, payload: &[u8]) -> Result<(), LinkError> {
        self.enqueue(header, payload, Waiter::Events)
    }

    /// Sends and waits for the answer, at most `timeout`.
    pub async fn call(
        &self,
        header: &Header,
        payload: &[u8],
        timeout: Duration,
    ) -> Result<Frame, LinkError> {
        let rx = self.send(header, payload)?;
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(LinkError::Closed(self.addr.clone())),
            Err(_) => Err(LinkError::Timeout(self.addr.clone())),
        }
    }

    /// Closes the link: pending requests fail with `Closed`.
    pub fn close(&self) {
        self.reader.abort();
        let drained: Vec<(u64, Waiter)> = {
            let mut g = self.pending.lock().expect("pending lock");
            g.closed = true;
            g.waiters.drain().collect()
        };
        for (_, w) in drained {
            if let Waiter::Once(s) = w {
                let _ = s.send(Err(LinkError::Closed(self.addr.clone())));
            }
        }
    }
}

impl Drop for PeerLink {
    fn drop(&mut self) {
        self.reader.abort();
    }
}
