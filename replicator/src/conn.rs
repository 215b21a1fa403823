//! Framed, pipelined TCP: reading frames off a stream, a writer task that batches encoded
//! frames, and [`PeerLink`], the sending side of a connection with many requests in flight
//! and answers matched by request id (used by the primary towards its secondaries and by
//! the client pipeline towards the primary).

use crate::frame::{self, ErrorBody, Frame, FrameError, Header, MsgKind, VolumeName, HEADER_LEN};
use crate::peer_auth::{self, PeerKey, Role};
use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, Notify};

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

/// The sending side of a connection: frames are encoded straight into the buffer that the
/// connection's writer task (see [`spawn_writer`]) hands to the socket next, in call order.
/// Cheap to clone; the writer shuts the socket down once every clone is dropped and what was
/// queued is written.
///
/// One buffer instead of a channel of encoded frames: each frame used to be encoded into a
/// `Vec` of its own, sent, copied into a `BufWriter` and freed (an allocation, a free and a
/// copy of its payload per frame, on every hop).
#[derive(Debug)]
pub struct FrameSink {
    shared: Arc<SinkShared>,
}

#[derive(Debug)]
struct SinkShared {
    state: Mutex<SinkState>,
    wake: Notify,
    senders: AtomicUsize,
}

#[derive(Debug, Default)]
struct SinkState {
    /// Encoded frames the writer may send: everything before the first unfilled slot.
    buf: Vec<u8>,
    frames: usize,
    /// While a slot is unfilled: the slots and the frames queued behind it, in call order.
    behind: std::collections::VecDeque<Behind>,
    next_slot: u64,
    /// The writer failed (no more frames can leave), or every sender is gone.
    closed: bool,
}

#[derive(Debug)]
enum Behind {
    Slot { id: u64, frame: Option<Vec<u8>> },
    Frames { bytes: Vec<u8>, count: usize },
}

impl SinkState {
    /// Moves the filled slots and frames at the front of `behind` to `buf`; returns how many
    /// frames became sendable.
    fn release(&mut self) -> usize {
        let mut n = 0;
        loop {
            match self.behind.front_mut() {
                Some(Behind::Slot { frame: None, .. }) | None => return n,
                Some(Behind::Slot { frame: Some(f), .. }) => {
                    self.buf.extend_from_slice(f);
                    n += 1;
                }
                Some(Behind::Frames { bytes, count }) => {
                    self.buf.extend_from_slice(bytes);
                    n += *count;
                }
            }
            self.behind.pop_front();
        }
    }
}

/// A place in a connection's frame order, taken now and filled later ([`FrameSink::reserve`]):
/// frames queued after it wait until it is filled. Dropped unfilled, it closes the sink (the
/// frames behind it can no longer leave in order).
#[derive(Debug)]
pub struct FrameSlot {
    shared: Arc<SinkShared>,
    id: u64,
    filled: bool,
}

impl FrameSlot {
    /// Puts the frame in its place; it leaves with whatever was queued behind it up to the
    /// next unfilled slot.
    pub fn fill(mut self, header: &Header, payload: &[u8]) -> Result<(), SinkClosed> {
        self.filled = true;
        let wake = {
            let mut st = self.shared.state.lock().expect("sink lock");
            if st.closed {
                return Err(SinkClosed);
            }
            let before = st.frames;
            let at = st
                .behind
                .iter()
                .position(|b| matches!(b, Behind::Slot { id, .. } if *id == self.id))
                .expect("an unfilled slot is queued");
            if at == 0 {
                // First in line (the usual case: slots are filled in order): encoded straight
                // into the writer's buffer, not into a frame of its own and copied there.
                frame::encode_into(header, payload, &mut st.buf);
                st.behind.pop_front();
                st.frames += 1;
            } else {
                let mut f = Vec::with_capacity(HEADER_LEN + payload.len());
                frame::encode_into(header, payload, &mut f);
                st.behind[at] = Behind::Slot {
                    id: self.id,
                    frame: Some(f),
                };
            }
            st.frames += st.release();
            before == 0 && st.frames > 0
        };
        if wake {
            self.shared.wake.notify_one();
        }
        Ok(())
    }
}

impl Drop for FrameSlot {
    fn drop(&mut self) {
        if !self.filled {
            self.shared.state.lock().expect("sink lock").closed = true;
            self.shared.wake.notify_one();
        }
    }
}

/// The connection's writer is gone (its socket failed or was shut down).
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
#[error("connection writer closed")]
pub struct SinkClosed;

/// A writer keeps at most this much buffer between bursts; a larger one (a burst of big
/// frames) is freed.
const SINK_KEEP: usize = 1 << 20;

impl FrameSink {
    /// Queues one frame.
    pub fn send(&self, header: &Header, payload: &[u8]) -> Result<(), SinkClosed> {
        self.send_with_payload_crc(header, payload, crc32c::crc32c(payload))
    }

    /// Queues one frame whose payload's CRC32C is known (see
    /// [`frame::encode_with_payload_crc`]).
    pub fn send_with_payload_crc(
        &self,
        header: &Header,
        payload: &[u8],
        payload_crc: u32,
    ) -> Result<(), SinkClosed> {
        self.push(|buf| frame::encode_with_payload_crc(header, payload, payload_crc, buf))
    }

    /// Queues bytes that already hold whole encoded frames (tests, scripted peers).
    pub fn send_encoded(&self, bytes: &[u8]) -> Result<(), SinkClosed> {
        self.push(|buf| buf.extend_from_slice(bytes))
    }

    /// Takes the next place in the frame order for a frame that is not ready yet (a catch-up
    /// copy whose region is still being read: see `VolumeRuntime::catch_up`).
    pub fn reserve(&self) -> Result<FrameSlot, SinkClosed> {
        let mut st = self.shared.state.lock().expect("sink lock");
        if st.closed {
            return Err(SinkClosed);
        }
        st.next_slot += 1;
        let id = st.next_slot;
        st.behind.push_back(Behind::Slot { id, frame: None });
        Ok(FrameSlot {
            shared: self.shared.clone(),
            id,
            filled: false,
        })
    }

    fn push(&self, encode: impl FnOnce(&mut Vec<u8>)) -> Result<(), SinkClosed> {
        let first = {
            let mut st = self.shared.state.lock().expect("sink lock");
            if st.closed {
                return Err(SinkClosed);
            }
            if !st.behind.is_empty() {
                // Behind an unfilled slot: kept in order until it is filled.
                match st.behind.back_mut() {
                    Some(Behind::Frames { bytes, count }) => {
                        encode(bytes);
                        *count += 1;
                    }
                    _ => {
                        let mut bytes = Vec::new();
                        encode(&mut bytes);
                        st.behind.push_back(Behind::Frames { bytes, count: 1 });
                    }
                }
                return Ok(());
            }
            encode(&mut st.buf);
            st.frames += 1;
            st.frames == 1
        };
        // The writer sleeps only when it saw no frame queued, so only the first one since it
        // last took the buffer needs to wake it (a `Notify` keeps the permit if it is busy).
        if first {
            self.shared.wake.notify_one();
        }
        Ok(())
    }

    pub fn is_closed(&self) -> bool {
        self.shared.state.lock().expect("sink lock").closed
    }
}

impl Clone for FrameSink {
    fn clone(&self) -> Self {
        self.shared.senders.fetch_add(1, Ordering::Relaxed);
        Self {
            shared: self.shared.clone(),
        }
    }
}

impl Drop for FrameSink {
    fn drop(&mut self) {
        if self.shared.senders.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.shared.state.lock().expect("sink lock").closed = true;
            self.shared.wake.notify_one();
        }
    }
}

/// Spawns the task that owns the write half and returns the [`FrameSink`] that feeds it. The
/// task writes what is queued in one `write`, so a burst of answers goes out in few
/// syscalls.
pub fn spawn_writer(w: OwnedWriteHalf) -> FrameSink {
    let shared = Arc::new(SinkShared {
        state: Mutex::new(SinkState::default()),
        wake: Notify::new(),
        senders: AtomicUsize::new(1),
    });
    let s = shared.clone();
    tokio::spawn(async move {
        let mut w = w;
        let mut out = Vec::new();
        loop {
            let (frames, closed) = {
                let st = s.state.lock().expect("sink lock");
                (st.frames, st.closed)
            };
            match frames {
                0 if closed => break,
                0 => {
                    s.wake.notified().await;
                    continue;
                }
                // A burst (more than one frame queued by the time this task ran): let the
                // tasks that are ready now (the other requests read in the same `recv`)
                // queue their frames too, so they leave in one `sendto`. Without this, on a
                // multi-threaded runtime a burst of 32 answers cost ~30 sendto calls
                // (strace), each a wake-up of the peer. A lone frame (QD1) is written at
                // once: the yield would cost an extra `epoll_wait` on its path.
                1 => {}
                _ => tokio::task::yield_now().await,
            }
            {
                let mut st = s.state.lock().expect("sink lock");
                std::mem::swap(&mut st.buf, &mut out);
                st.frames = 0;
            }
            if w.write_all(&out).await.is_err() {
                let mut st = s.state.lock().expect("sink lock");
                st.closed = true;
                st.buf = Vec::new();
                st.behind.clear();
                return;
            }
            out.clear();
            if out.capacity() > SINK_KEEP {
                out = Vec::new();
            }
        }
        let _ = w.shutdown().await;
    });
    FrameSink { shared }
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
    tx: FrameSink,
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
    /// Connects to `addr`, and with a `key` authenticates both ways first (see
    /// [`crate::peer_auth`]; the handshake counts against `timeout` too). With `events`, every
    /// answer is delivered there (see [`LinkEvent`]); without, each [`PeerLink::send`] gets
    /// its own one-shot.
    pub async fn connect(
        addr: &str,
        timeout: Duration,
        key: Option<&PeerKey>,
        events: Option<mpsc::UnboundedSender<LinkEvent>>,
    ) -> Result<Self, LinkError> {
        let err = |reason: String| LinkError::Connect {
            addr: addr.to_owned(),
            reason,
        };
        let stream = tokio::time::timeout(timeout, async {
            let mut stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
            let _ = stream.set_nodelay(true);
            if let Some(key) = key {
                authenticate(&mut stream, key)
                    .await
                    .map_err(|why| format!("authentication: {why}"))?;
            }
            Ok::<_, String>(stream)
        })
        .await
        .map_err(|_| err("timed out".into()))?
        .map_err(err)?;
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

    /// Registers where the answer to `request_id` goes (refused once the link closed).
    fn wait_for(&self, request_id: u64, w: Waiter) -> Result<(), LinkError> {
        let mut g = self.pending.lock().expect("pending lock");
        if g.closed {
            return Err(LinkError::Closed(self.addr.clone()));
        }
        g.waiters.insert(request_id, w);
        Ok(())
    }

    fn enqueue(
        &self,
        header: &Header,
        payload: &[u8],
        payload_crc: u32,
        w: Waiter,
    ) -> Result<(), LinkError> {
        self.wait_for(header.request_id, w)?;
        // Frames leave in the order of these calls: callers rely on that for seq order.
        self.tx
            .send_with_payload_crc(header, payload, payload_crc)
            .map_err(|_| LinkError::Closed(self.addr.clone()))
    }

    /// Queues a request (not async: the frame is queued in call order) and returns the
    /// receiver of its answer.
    pub fn send(
        &self,
        header: &Header,
        payload: &[u8],
    ) -> Result<oneshot::Receiver<Result<Frame, LinkError>>, LinkError> {
        self.send_with_payload_crc(header, payload, crc32c::crc32c(payload))
    }

    /// [`PeerLink::send`] of a payload whose CRC32C is known (forwarding a verified frame's
    /// payload: see [`frame::encode_with_payload_crc`]).
    pub fn send_with_payload_crc(
        &self,
        header: &Header,
        payload: &[u8],
        payload_crc: u32,
    ) -> Result<oneshot::Receiver<Result<Frame, LinkError>>, LinkError> {
        let (s, r) = oneshot::channel();
        self.enqueue(header, payload, payload_crc, Waiter::Once(s))?;
        Ok(r)
    }

    /// Takes the next place in this link's frame order for request `request_id`, to be filled
    /// later ([`FrameSlot::fill`]); returns the slot and the receiver of its answer. Frames
    /// sent meanwhile leave after it.
    pub fn reserve(
        &self,
        request_id: u64,
    ) -> Result<(FrameSlot, oneshot::Receiver<Result<Frame, LinkError>>), LinkError> {
        let (s, r) = oneshot::channel();
        self.wait_for(request_id, Waiter::Once(s))?;
        let slot = self
            .tx
            .reserve()
            .map_err(|_| LinkError::Closed(self.addr.clone()))?;
        Ok((slot, r))
    }

    /// Queues a request whose answer goes to the link's event channel.
    pub fn send_evented(&self, header: &Header, payload: &[u8]) -> Result<(), LinkError> {
        self.enqueue(header, payload, crc32c::crc32c(payload), Waiter::Events)
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

/// The client's side of the handshake in [`crate::peer_auth`], on the bare stream before the
/// link's tasks start.
async fn authenticate(stream: &mut TcpStream, key: &PeerKey) -> Result<(), String> {
    let cn = peer_auth::nonce().map_err(|e| e.to_string())?;
    let mut h = Header::new(MsgKind::Auth, 0, VolumeName::none());
    h.flags = peer_auth::AUTH_HELLO;
    let answer = auth_step(stream, &h, &cn).await?;
    if answer.len() != peer_auth::NONCE_LEN + peer_auth::TAG_LEN {
        return Err(format!("the server's challenge is {} bytes", answer.len()));
    }
    let (sn, server_tag) = answer.split_at(peer_auth::NONCE_LEN);
    if !key.verify(Role::Server, &cn, sn, server_tag) {
        return Err("the server does not hold this site's peer key".into());
    }
    h.flags = peer_auth::AUTH_PROOF;
    h.request_id = 1;
    auth_step(stream, &h, &key.tag(Role::Client, &cn, sn)).await?;
    Ok(())
}

/// Sends one handshake frame and returns its `Ok` answer's payload.
async fn auth_step(stream: &mut TcpStream, h: &Header, payload: &[u8]) -> Result<Vec<u8>, String> {
    stream
        .write_all(&frame::encode(h, payload))
        .await
        .map_err(|e| e.to_string())?;
    let f = read_frame(stream)
        .await
        .map_err(|e| e.to_string())?
        .ok_or("the server closed the connection")?;
    match f.header.kind {
        MsgKind::Ok if f.header.request_id == h.request_id => Ok(f.payload),
        MsgKind::Error => Err(match ErrorBody::decode(&f.payload) {
            Some(b) => format!("the server refused: {:?}: {}", b.code, b.message),
            None => "the server refused".into(),
        }),
        k => Err(format!("unexpected {k:?} answer")),
    }
}

impl Drop for PeerLink {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        (a, b)
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_sink_writes_frames_in_call_order_and_shuts_down_after_the_last_sender() {
        let (a, b) = pair().await;
        let (_r, w) = a.into_split();
        let sink = spawn_writer(w);
        let other = sink.clone();
        let vol = VolumeName::new("v").unwrap();
        for i in 0..100u64 {
            let s = if i % 2 == 0 { &sink } else { &other };
            let payload = vec![i as u8; (i as usize * 37) % 5000];
            s.send(&Header::new(MsgKind::Write, i, vol.clone()), &payload)
                .unwrap();
        }
        drop(sink);
        drop(other);
        let (r, _w) = b.into_split();
        let mut r = frame_reader(r);
        for i in 0..100u64 {
            let f = read_frame(&mut r).await.unwrap().expect("a frame");
            assert_eq!(f.header.request_id, i);
            assert_eq!(f.payload, vec![i as u8; (i as usize * 37) % 5000]);
        }
        // Every sender gone and everything written: the writer closed its half.
        assert!(read_frame(&mut r).await.unwrap().is_none());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_sink_whose_socket_failed_refuses_frames() {
        let (a, b) = pair().await;
        let (_r, w) = a.into_split();
        let sink = spawn_writer(w);
        drop(b);
        let h = Header::new(MsgKind::Write, 1, VolumeName::new("v").unwrap());
        // The peer's close surfaces on a later write (EPIPE/ECONNRESET), then the sink closes.
        let mut refused = false;
        for _ in 0..200 {
            if sink.send(&h, &[0u8; 4096]).is_err() {
                refused = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(
            refused,
            "frames to a closed peer were still accepted after 1 s"
        );
        assert!(sink.is_closed());
    }

    /// A sink with no writer task: what it would hand to the socket stays in `buf`.
    fn bare_sink() -> FrameSink {
        FrameSink {
            shared: Arc::new(SinkShared {
                state: Mutex::new(SinkState::default()),
                wake: Notify::new(),
                senders: AtomicUsize::new(1),
            }),
        }
    }

    fn sendable_ids(sink: &FrameSink) -> Vec<u64> {
        let st = sink.shared.state.lock().unwrap();
        let (mut at, mut ids) = (0, Vec::new());
        while let Some((f, used)) = frame::decode(&st.buf[at..]).unwrap() {
            ids.push(f.header.request_id);
            at += used;
        }
        assert_eq!(at, st.buf.len(), "only whole frames are sendable");
        assert_eq!(st.frames, ids.len());
        ids
    }

    proptest::proptest! {
        /// Whatever the mix of frames and slots, and whatever order the slots are filled
        /// in, what may leave is always the calls' order up to the first unfilled slot.
        #[test]
        fn slots_and_frames_leave_in_call_order(ops in proptest::collection::vec(0u8..3, 1..60),
                                                picks in proptest::collection::vec(0usize..8, 60)) {
            let sink = bare_sink();
            let vol = VolumeName::new("v").unwrap();
            let mut open: Vec<(u64, FrameSlot)> = Vec::new();
            let mut next = 0u64;
            let mut picks = picks.into_iter();
            let check = |open: &Vec<(u64, FrameSlot)>, next: u64| {
                let first_open = open.iter().map(|(id, _)| *id).min().unwrap_or(next);
                proptest::prop_assert_eq!(sendable_ids(&sink), (0..first_open).collect::<Vec<_>>());
                Ok(())
            };
            for op in ops {
                match op {
                    0 => {
                        sink.send(&Header::new(MsgKind::Write, next, vol.clone()), b"f").unwrap();
                        next += 1;
                    }
                    1 => {
                        open.push((next, sink.reserve().unwrap()));
                        next += 1;
                    }
                    _ if !open.is_empty() => {
                        let i = picks.next().unwrap_or(0) % open.len();
                        let (id, slot) = open.remove(i);
                        slot.fill(&Header::new(MsgKind::Write, id, vol.clone()), b"s").unwrap();
                    }
                    _ => {}
                }
                check(&open, next)?;
            }
            while let Some((id, slot)) = open.pop() {
                slot.fill(&Header::new(MsgKind::Write, id, vol.clone()), b"s").unwrap();
                check(&open, next)?;
            }
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn frames_behind_a_slot_wait_for_it_and_slots_keep_their_place() {
        let (a, b) = pair().await;
        let (_r, w) = a.into_split();
        let sink = spawn_writer(w);
        let vol = VolumeName::new("v").unwrap();
        let h = |i: u64| Header::new(MsgKind::Write, i, vol.clone());
        sink.send(&h(1), b"one").unwrap();
        let s2 = sink.reserve().unwrap();
        sink.send(&h(3), b"three").unwrap();
        let s4 = sink.reserve().unwrap();
        sink.send(&h(5), b"five").unwrap();
        let (r, _w) = b.into_split();
        let mut r = frame_reader(r);
        assert_eq!(
            read_frame(&mut r).await.unwrap().unwrap().header.request_id,
            1
        );
        // Filled out of order: nothing behind the first slot may leave before it.
        s4.fill(&h(4), b"four").unwrap();
        assert!(
            tokio::time::timeout(Duration::from_millis(50), read_frame(&mut r))
                .await
                .is_err(),
            "a frame left ahead of an unfilled slot"
        );
        s2.fill(&h(2), b"two").unwrap();
        for i in 2..=5 {
            assert_eq!(
                read_frame(&mut r).await.unwrap().unwrap().header.request_id,
                i
            );
        }
        // A slot dropped unfilled closes the sink: what is behind it cannot keep its order.
        let s6 = sink.reserve().unwrap();
        sink.send(&h(7), b"seven").unwrap();
        drop(s6);
        assert!(sink.is_closed());
        assert!(sink.send(&h(8), b"eight").is_err());
        drop(sink);
        assert!(read_frame(&mut r).await.unwrap().is_none());
    }
}
