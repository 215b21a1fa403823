//! `ReplicationPipeline`: the client side that `vhost-target`'s queue workers feed.
//!
//! Each worker thread owns a [`PipelineWorker`]: a bounded lock-free submission queue and a
//! completion queue (`crossbeam::queue::ArrayQueue`), sized to the worker's queue depth so
//! neither push can fail once a request was admitted. The network side is one thread running
//! a tokio runtime: it drains the submission queues, sends frames to the primary (one
//! pipelined connection, frames batched by the link's writer), and pushes completions back.
//!
//! Failover: the network side learns the primary from the authority. A fencing error, a
//! redirect (`NotPrimary`), a lease that is not valid or a dropped connection makes it ask the
//! authority again and resend every request that has no answer yet, in submission order, to
//! the (new) primary. A request completes exactly once: its completion is produced only when
//! it leaves the in-flight table, and answers from a replaced connection are ignored.

use crate::authority::Authority;
use crate::conn::{LinkEvent, PeerLink};
use crate::frame::{ErrorBody, ErrorCode, Header, MsgKind, VolumeName, FLAG_FUA, MAX_PAYLOAD};
use crate::peer_auth::PeerKey;
use crossbeam::queue::{ArrayQueue, SegQueue};
use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use thiserror::Error;
use tokio::sync::{mpsc, Notify};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoKind {
    Read,
    Write,
    Flush,
    WriteZeroes,
    Discard,
}

#[derive(Debug, Clone)]
pub struct IoRequest {
    /// The submitter's own id for this request, returned in its completion.
    pub tag: u64,
    pub kind: IoKind,
    pub offset: u64,
    /// Bytes to read, zero or discard (a write's length is `data.len()`).
    pub len: u32,
    pub data: Vec<u8>,
    pub fua: bool,
}

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum IoError {
    #[error("server refused: {code:?}: {message}")]
    Server { code: ErrorCode, message: String },
    #[error("no answer within the request timeout")]
    TimedOut,
    #[error("invalid request: {0}")]
    Invalid(String),
}

#[derive(Debug, Clone)]
pub struct IoCompletion {
    pub tag: u64,
    /// Read data for reads, empty otherwise.
    pub result: Result<Vec<u8>, IoError>,
}

#[derive(Clone)]
pub struct PipelineConfig {
    pub site: String,
    pub volume: String,
    pub authority: Arc<dyn Authority>,
    /// A request with no answer after this long completes with `TimedOut`.
    pub request_timeout: Duration,
    pub connect_timeout: Duration,
    /// Pause between attempts to find a primary.
    pub retry_backoff: Duration,
    /// When the primary cannot be reached for this long, ask an in-sync secondary to take
    /// over (it checks the primary's health itself first). `None`: never ask.
    pub takeover_after: Option<Duration>,
    /// Fault injection (tests, drills): servers this client must act as if it cannot reach,
    /// a one-sided network cut. `None` in production; see `docs/replication.md`.
    pub cut_servers: Option<CutServers>,
    /// The site's shared key, when its servers require authentication
    /// ([`crate::peer_auth`]).
    pub peer_key: Option<PeerKey>,
}

/// The set of server ids a client treats as unreachable (fault injection only).
pub type CutServers = Arc<std::sync::Mutex<std::collections::HashSet<String>>>;

impl PipelineConfig {
    pub fn new(site: &str, volume: &str, authority: Arc<dyn Authority>) -> Self {
        Self {
            site: site.to_owned(),
            volume: volume.to_owned(),
            authority,
            request_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(1),
            retry_backoff: Duration::from_millis(50),
            takeover_after: None,
            cut_servers: None,
            peer_key: None,
        }
    }
}

#[derive(Debug)]
struct WorkerQueues {
    sq: ArrayQueue<IoRequest>,
    cq: ArrayQueue<IoCompletion>,
    inflight: AtomicUsize,
    depth: usize,
    /// Written after a batch of completions, so a worker that sleeps between polls (an idle
    /// queue worker) wakes for them.
    completion_fd: OwnedFd,
}

struct Shared {
    new_workers: SegQueue<Arc<WorkerQueues>>,
    notify: Notify,
    stop: AtomicBool,
    /// Written by the network side when it (re)learns the primary; read by operators.
    status: std::sync::Mutex<PipelineStatus>,
    /// Requests sent again after a failover, a fencing answer or a lost connection.
    retried: AtomicU64,
}

/// What the pipeline last learned about its volume (for health output and metrics).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PipelineStatus {
    /// The primary the requests go to, once one was connected.
    pub primary: Option<String>,
    pub primary_addr: Option<String>,
    pub generation: u64,
    pub epoch: u64,
    /// Servers of the volume the authority lists as in sync (the primary among them).
    pub in_sync: Vec<String>,
    /// Servers of the volume that are not in sync: the volume is degraded while any is.
    pub out_of_sync: Vec<String>,
    /// Requests sent again after a failover, a fencing answer or a lost connection.
    pub retried: u64,
    /// Times the connection went to a different primary than before.
    pub primary_changes: u64,
    /// Milliseconds since the primary could last be reached, while it cannot.
    pub unreachable_ms: Option<u64>,
}

/// One submitter's queues. `Send` but meant to stay on one thread (a queue worker).
pub struct PipelineWorker {
    q: Arc<WorkerQueues>,
    shared: Arc<Shared>,
}

impl PipelineWorker {
    /// Queues a request; gives it back when the worker already has `depth` in flight.
    pub fn submit(&self, req: IoRequest) -> Result<(), IoRequest> {
        if self.q.inflight.load(Ordering::Acquire) >= self.q.depth {
            return Err(req);
        }
        self.q.inflight.fetch_add(1, Ordering::AcqRel);
        // Cannot be full: at most `depth` requests are in flight and sq holds `depth`.
        self.q.sq.push(req).expect("bounded by inflight");
        self.shared.notify.notify_one();
        Ok(())
    }

    /// A completion, if one is ready (never blocks).
    pub fn poll(&self) -> Option<IoCompletion> {
        let c = self.q.cq.pop()?;
        self.q.inflight.fetch_sub(1, Ordering::AcqRel);
        Some(c)
    }

    /// Whether a completion is waiting (a polling worker's check; takes nothing).
    pub fn has_completions(&self) -> bool {
        !self.q.cq.is_empty()
    }

    pub fn inflight(&self) -> usize {
        self.q.inflight.load(Ordering::Acquire)
    }

    /// A non-blocking eventfd that becomes readable when completions were queued. A sleeping
    /// worker waits on it, reads it to reset it, then polls; a completion queued between its
    /// last poll and the wait leaves the fd readable, so none is slept through.
    pub fn completion_fd(&self) -> RawFd {
        self.q.completion_fd.as_raw_fd()
    }

    /// Waits for a completion up to `timeout` by polling with a growing pause (for tools
    /// and tests; a queue worker polls).
    pub fn wait(&self, timeout: Duration) -> Option<IoCompletion> {
        let end = Instant::now() + timeout;
        let mut pause = Duration::from_micros(10);
        loop {
            if let Some(c) = self.poll() {
                return Some(c);
            }
            if Instant::now() >= end {
                return None;
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(2));
        }
    }
}

pub struct ReplicationPipeline {
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ReplicationPipeline {
    /// Starts the network side on its own thread.
    pub fn start(cfg: PipelineConfig) -> std::io::Result<Self> {
        VolumeName::new(&cfg.volume)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()))?;
        let shared = Arc::new(Shared {
            new_workers: SegQueue::new(),
            notify: Notify::new(),
            stop: AtomicBool::new(false),
            status: Default::default(),
            retried: AtomicU64::new(0),
        });
        let s = shared.clone();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let thread = std::thread::Builder::new()
            .name(format!("pipeline-{}", cfg.volume))
            .spawn(move || rt.block_on(NetSide::new(cfg, s).run()))?;
        Ok(Self {
            shared,
            thread: Some(thread),
        })
    }

    /// What the network side last learned: primary, epoch, replicas in sync, retries.
    pub fn status(&self) -> PipelineStatus {
        let mut s = self.shared.status.lock().expect("status").clone();
        s.retried = self.shared.retried.load(Ordering::Relaxed);
        s
    }

    /// A new submitter with room for `depth` requests in flight.
    pub fn worker(&self, depth: usize) -> std::io::Result<PipelineWorker> {
        // SAFETY: eventfd(2) takes no pointers; the result is checked before use.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by eventfd and is owned by nothing else.
        let completion_fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let q = Arc::new(WorkerQueues {
            sq: ArrayQueue::new(depth.max(1)),
            cq: ArrayQueue::new(depth.max(1)),
            inflight: AtomicUsize::new(0),
            depth: depth.max(1),
            completion_fd,
        });
        self.shared.new_workers.push(q.clone());
        self.shared.notify.notify_one();
        Ok(PipelineWorker {
            q,
            shared: self.shared.clone(),
        })
    }
}

impl Drop for ReplicationPipeline {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.notify.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Pending {
    worker: usize,
    req: IoRequest,
    /// The link it was last sent on, if it is waiting for an answer there.
    sent_on: Option<u64>,
    /// Sent at least once already: sending it again is a retry.
    sent_before: bool,
    deadline: Instant,
}

struct NetSide {
    cfg: PipelineConfig,
    volume: VolumeName,
    shared: Arc<Shared>,
    workers: Vec<Arc<WorkerQueues>>,
    /// Per worker: completions were queued since its eventfd was last written.
    to_signal: Vec<bool>,
    inflight: BTreeMap<u64, Pending>,
    next_order: u64,
    link: Option<PeerLink>,
    fence: (u64, u64),
    need_refresh: bool,
    next_refresh: Instant,
    events_tx: mpsc::UnboundedSender<LinkEvent>,
    events_rx: mpsc::UnboundedReceiver<LinkEvent>,
    /// Since when the primary named by the authority could not be connected to.
    unreachable_since: Option<Instant>,
    last_takeover: Option<Instant>,
    /// The last answer from (or connection to) the primary: progress, for stall detection.
    last_progress: Instant,
    last_info: Option<crate::authority::VolumeInfo>,
}

impl NetSide {
    fn new(cfg: PipelineConfig, shared: Arc<Shared>) -> Self {
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        Self {
            volume: VolumeName::new(&cfg.volume).expect("checked in start"),
            cfg,
            shared,
            workers: Vec::new(),
            to_signal: Vec::new(),
            inflight: BTreeMap::new(),
            next_order: 1,
            link: None,
            fence: (0, 0),
            need_refresh: true,
            next_refresh: Instant::now(),
            events_tx,
            events_rx,
            unreachable_since: None,
            last_takeover: None,
            last_progress: Instant::now(),
            last_info: None,
        }
    }

    fn complete(&mut self, order: u64, result: Result<Vec<u8>, IoError>) {
        if let Some(p) = self.inflight.remove(&order) {
            let q = &self.workers[p.worker];
            // Cannot be full: the worker has at most `depth` requests outstanding.
            q.cq.push(IoCompletion {
                tag: p.req.tag,
                result,
            })
            .expect("completion queue bounded by depth");
            self.to_signal[p.worker] = true;
        }
    }

    /// One eventfd write per worker per batch of completions, not one per completion.
    fn signal_completions(&mut self) {
        for (wi, flag) in self.to_signal.iter_mut().enumerate() {
            if std::mem::take(flag) {
                let one: u64 = 1;
                // SAFETY: writes 8 bytes from a live u64 to an eventfd this side owns (via
                // the worker's queues). EAGAIN (counter saturated) still leaves it readable.
                unsafe {
                    libc::write(
                        self.workers[wi].completion_fd.as_raw_fd(),
                        (&one as *const u64).cast(),
                        8,
                    )
                };
            }
        }
    }

    fn drain_submissions(&mut self) {
        while let Some(w) = self.shared.new_workers.pop() {
            self.workers.push(w);
            self.to_signal.push(false);
        }
        let deadline = Instant::now() + self.cfg.request_timeout;
        for wi in 0..self.workers.len() {
            while let Some(req) = self.workers[wi].sq.pop() {
                let order = self.next_order;
                self.next_order += 1;
                self.inflight.insert(
                    order,
                    Pending {
                        worker: wi,
                        req,
                        sent_on: None,
                        sent_before: false,
                        deadline,
                    },
                );
                if let Some(why) = self.invalid(order) {
                    self.complete(order, Err(IoError::Invalid(why)));
                }
            }
        }
    }

    fn invalid(&self, order: u64) -> Option<String> {
        let r = &self.inflight[&order].req;
        match r.kind {
            IoKind::Write if r.data.len() > MAX_PAYLOAD => Some("write larger than a frame".into()),
            IoKind::Read if r.len as usize > MAX_PAYLOAD => Some("read larger than a frame".into()),
            _ => None,
        }
    }

    async fn refresh(&mut self) {
        self.next_refresh = Instant::now() + self.cfg.retry_backoff;
        let info = match self
            .cfg
            .authority
            .volume_get(&self.cfg.site, &self.cfg.volume)
            .await
        {
            Ok(i) => i,
            Err(e) => {
                tracing::debug!(error = %e, "pipeline: volume_get");
                return;
            }
        };
        let Some(p) = info.primary_entry().filter(|p| !p.data_addr.is_empty()) else {
            return;
        };
        if self.is_cut(&p.server_id) {
            if let Some(old) = self.link.take() {
                old.close();
            }
            tracing::debug!(server = %p.server_id, "pipeline: primary cut off (fault injection)");
            let since = *self.unreachable_since.get_or_insert_with(Instant::now);
            self.shared.status.lock().expect("status").unreachable_ms =
                Some(since.elapsed().as_millis() as u64);
            self.maybe_takeover(&info, since).await;
            return;
        }
        let same = self
            .link
            .as_ref()
            .is_some_and(|l| l.addr() == p.data_addr && !l.is_closed());
        if !same {
            if let Some(old) = self.link.take() {
                old.close();
            }
            match PeerLink::connect(
                &p.data_addr,
                self.cfg.connect_timeout,
                self.cfg.peer_key.as_ref(),
                Some(self.events_tx.clone()),
            )
            .await
            {
                Ok(l) => {
                    self.link = Some(l);
                    self.unreachable_since = None;
                    self.last_progress = Instant::now();
                }
                Err(e) => {
                    tracing::debug!(error = %e, "pipeline: connect to primary");
                    let since = *self.unreachable_since.get_or_insert_with(Instant::now);
                    self.shared.status.lock().expect("status").unreachable_ms =
                        Some(since.elapsed().as_millis() as u64);
                    self.maybe_takeover(&info, since).await;
                    return;
                }
            }
        }
        self.fence = (info.generation, info.epoch);
        self.need_refresh = false;
        {
            let mut st = self.shared.status.lock().expect("status");
            if st.primary.is_some() && st.primary != info.primary {
                st.primary_changes += 1;
            }
            st.primary = info.primary.clone();
            st.primary_addr = Some(p.data_addr.clone());
            st.generation = info.generation;
            st.epoch = info.epoch;
            let (ins, outs): (Vec<_>, Vec<_>) = info.servers.iter().partition(|s| s.in_sync);
            st.in_sync = ins.iter().map(|s| s.server_id.clone()).collect();
            st.out_of_sync = outs.iter().map(|s| s.server_id.clone()).collect();
            st.unreachable_ms = None;
        }
        self.last_info = Some(info.clone());
        // Everything not answered on the current link goes again, in submission order.
        let cur = self.link.as_ref().map(PeerLink::id);
        for p in self.inflight.values_mut() {
            if p.sent_on != cur {
                p.sent_on = None;
            }
        }
    }

    fn is_cut(&self, server_id: &str) -> bool {
        self.cfg
            .cut_servers
            .as_ref()
            .is_some_and(|c| c.lock().expect("cut set").contains(server_id))
    }

    /// A cut injected while connected drops the connection, as a real cut would.
    fn apply_cut(&mut self) {
        let cut_now = self.link.is_some()
            && self
                .last_info
                .as_ref()
                .and_then(|i| i.primary.as_deref())
                .is_some_and(|p| self.is_cut(p));
        if cut_now {
            let lid = self.link.take().map(|l| {
                l.close();
                l.id()
            });
            self.need_refresh = true;
            for p in self.inflight.values_mut() {
                if p.sent_on == lid {
                    p.sent_on = None;
                }
            }
        }
    }

    /// Asks the in-sync secondaries, one after the other, to take over; stops at the first
    /// that accepts. Their answer does not change what this side does next: it keeps asking
    /// the authority, which names the new primary once there is one.
    async fn maybe_takeover(&mut self, info: &crate::authority::VolumeInfo, since: Instant) {
        let Some(after) = self.cfg.takeover_after else {
            return;
        };
        let now = Instant::now();
        if now.duration_since(since) < after
            || self
                .last_takeover
                .is_some_and(|t| now.duration_since(t) < after)
        {
            return;
        }
        self.last_takeover = Some(now);
        let reason = format!(
            "client could not reach primary {:?} for {:?}",
            info.primary,
            now.duration_since(since)
        );
        for s in info
            .servers
            .iter()
            .filter(|s| s.in_sync && Some(&s.server_id) != info.primary.as_ref())
        {
            let key = self.cfg.peer_key.as_ref();
            let Ok(link) =
                PeerLink::connect(&s.data_addr, self.cfg.connect_timeout, key, None).await
            else {
                continue;
            };
            let h = Header::new(
                MsgKind::Takeover,
                link.next_request_id(),
                self.volume.clone(),
            );
            match link
                .call(&h, reason.as_bytes(), Duration::from_secs(5))
                .await
            {
                Ok(f) if f.header.kind == MsgKind::Ok => {
                    tracing::warn!(server = %s.server_id, "takeover accepted");
                    return;
                }
                Ok(f) => {
                    tracing::info!(server = %s.server_id, answer = ?ErrorBody::decode(&f.payload), "takeover refused")
                }
                Err(e) => {
                    tracing::info!(server = %s.server_id, error = %e, "takeover request failed")
                }
            }
        }
    }

    fn send_unsent(&mut self) {
        let Some(link) = &self.link else { return };
        let lid = link.id();
        for (&order, p) in self.inflight.iter_mut() {
            if p.sent_on.is_some() {
                continue;
            }
            let r = &p.req;
            let kind = match r.kind {
                IoKind::Read => MsgKind::Read,
                IoKind::Write => MsgKind::Write,
                IoKind::Flush => MsgKind::Flush,
                IoKind::WriteZeroes => MsgKind::WriteZeroes,
                IoKind::Discard => MsgKind::Discard,
            };
            let mut h = Header::new(kind, order, self.volume.clone());
            h.generation = self.fence.0;
            h.epoch = self.fence.1;
            h.offset = r.offset;
            h.length = if r.kind == IoKind::Write {
                r.data.len() as u32
            } else {
                r.len
            };
            if r.fua {
                h.flags |= FLAG_FUA;
            }
            let body: &[u8] = if r.kind == IoKind::Write {
                &r.data
            } else {
                &[]
            };
            if link.send_evented(&h, body).is_err() {
                self.need_refresh = true;
                return;
            }
            p.sent_on = Some(lid);
            if std::mem::replace(&mut p.sent_before, true) {
                self.shared.retried.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn on_event(&mut self, (lid, rid, res): LinkEvent) {
        let current = self.link.as_ref().map(PeerLink::id);
        if Some(lid) != current {
            return;
        }
        let Some(order) = rid else {
            // The connection to the primary is gone.
            self.link = None;
            self.need_refresh = true;
            for p in self.inflight.values_mut() {
                if p.sent_on == Some(lid) {
                    p.sent_on = None;
                }
            }
            return;
        };
        if self.inflight.get(&order).and_then(|p| p.sent_on) != Some(lid) {
            return;
        }
        let f = match res {
            Ok(f) => f,
            Err(_) => return,
        };
        self.last_progress = Instant::now();
        if f.header.kind == MsgKind::Ok {
            self.complete(order, Ok(f.payload));
            return;
        }
        let body = ErrorBody::decode(&f.payload).unwrap_or(ErrorBody {
            code: ErrorCode::Invalid,
            message: "undecodable error answer".into(),
        });
        match body.code {
            // Someone else is (or is about to be) primary, or this one cannot ack right now:
            // find the primary again and resend.
            ErrorCode::StaleEpoch
            | ErrorCode::NotPrimary
            | ErrorCode::NotReady
            | ErrorCode::LeaseExpired
            | ErrorCode::ReplicationFailed => {
                if let Some(p) = self.inflight.get_mut(&order) {
                    p.sent_on = None;
                }
                self.need_refresh = true;
            }
            code => self.complete(
                order,
                Err(IoError::Server {
                    code,
                    message: body.message,
                }),
            ),
        }
    }

    /// Requests wait on a connected primary that answers nothing: ask a secondary to take
    /// over (it decides whether the primary is really unhealthy) and look again.
    async fn check_stall(&mut self) {
        let Some(after) = self.cfg.takeover_after else {
            return;
        };
        let Some(cur) = self.link.as_ref().map(PeerLink::id) else {
            return;
        };
        let waiting = self.inflight.values().any(|p| p.sent_on == Some(cur));
        if !waiting || self.last_progress.elapsed() < after {
            return;
        }
        if let Some(info) = self.last_info.clone() {
            let since = self.last_progress;
            self.maybe_takeover(&info, since).await;
        }
        self.need_refresh = true;
        self.next_refresh = Instant::now();
    }

    fn expire(&mut self) {
        let now = Instant::now();
        let late: Vec<u64> = self
            .inflight
            .iter()
            .filter(|(_, p)| p.deadline <= now)
            .map(|(&o, _)| o)
            .collect();
        for o in late {
            self.complete(o, Err(IoError::TimedOut));
        }
    }

    async fn run(mut self) {
        loop {
            self.drain_submissions();
            if self.cfg.cut_servers.is_some() {
                self.apply_cut();
            }
            if self.shared.stop.load(Ordering::SeqCst) && self.inflight.is_empty() {
                self.signal_completions();
                return;
            }
            if (self.need_refresh || self.link.is_none())
                && !self.inflight.is_empty()
                && Instant::now() >= self.next_refresh
            {
                self.refresh().await;
            }
            if !self.need_refresh {
                self.send_unsent();
            }
            self.expire();
            self.check_stall().await;
            while let Ok(ev) = self.events_rx.try_recv() {
                self.on_event(ev);
            }
            let wait = if self.need_refresh && !self.inflight.is_empty() {
                self.next_refresh.saturating_duration_since(Instant::now())
            } else {
                Duration::from_millis(100)
            };
            self.signal_completions();
            tokio::select! {
                _ = self.shared.notify.notified() => {}
                ev = self.events_rx.recv() => {
                    if let Some(ev) = ev { self.on_event(ev); }
                }
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authority::fake::FakeAuthority;
    use crate::conn::{read_frame, spawn_writer};
    use crate::frame::{encode, ErrorBody};
    use std::sync::Mutex;
    use tokio::net::TcpListener;

    /// What a scripted primary saw: (request id, offset, epoch) in arrival order.
    type Seen = Arc<Mutex<Vec<(u64, u64, u64)>>>;

    fn answer(h: &Header, code: Option<ErrorCode>) -> Vec<u8> {
        match code {
            None => encode(&h.answer(MsgKind::Ok), &[]),
            Some(code) => {
                let mut a = h.answer(MsgKind::Error);
                a.epoch = 2;
                a.generation = 1;
                encode(
                    &a,
                    &ErrorBody {
                        code,
                        message: "scripted".into(),
                    }
                    .encode(),
                )
            }
        }
    }

    /// Old primary: acks the first `ok` requests (the first one twice, a duplicate answer),
    /// then hands the volume to "s2" at the fake authority and fences everything else.
    async fn old_primary(l: TcpListener, seen: Seen, fake: Arc<FakeAuthority>, ok: usize) {
        let (s, _) = l.accept().await.unwrap();
        let (mut r, w) = s.into_split();
        let tx = spawn_writer(w);
        let mut n = 0;
        while let Ok(Some(f)) = read_frame(&mut r).await {
            let h = f.header;
            seen.lock().unwrap().push((h.request_id, h.offset, h.epoch));
            n += 1;
            if n <= ok {
                tx.send_encoded(&answer(&h, None)).unwrap();
                if n == 1 {
                    tx.send_encoded(&answer(&h, None)).unwrap();
                }
            } else {
                if n == ok + 1 {
                    fake.do_failover("s", "v", true).unwrap();
                }
                tx.send_encoded(&answer(&h, Some(ErrorCode::StaleEpoch)))
                    .unwrap();
            }
        }
    }

    async fn new_primary(l: TcpListener, seen: Seen) {
        let (s, _) = l.accept().await.unwrap();
        let (mut r, w) = s.into_split();
        let tx = spawn_writer(w);
        while let Ok(Some(f)) = read_frame(&mut r).await {
            seen.lock()
                .unwrap()
                .push((f.header.request_id, f.header.offset, f.header.epoch));
            tx.send_encoded(&answer(&f.header, None)).unwrap();
        }
    }

    #[test]
    fn failover_resends_in_order_and_completes_each_request_once() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let fake = Arc::new(FakeAuthority::new());
        fake.create_volume(
            "s",
            "v",
            1 << 20,
            512,
            1000,
            &["s1", "s2"],
            "s1",
            &["s1", "s2"],
        );
        let (la, lb) = rt.block_on(async {
            (
                TcpListener::bind("127.0.0.1:0").await.unwrap(),
                TcpListener::bind("127.0.0.1:0").await.unwrap(),
            )
        });
        fake.do_register("s", "s1", &la.local_addr().unwrap().to_string(), "");
        fake.do_register("s", "s2", &lb.local_addr().unwrap().to_string(), "");
        let (seen_a, seen_b): (Seen, Seen) = Default::default();
        rt.spawn(old_primary(la, seen_a.clone(), fake.clone(), 3));
        rt.spawn(new_primary(lb, seen_b.clone()));

        let p = ReplicationPipeline::start(PipelineConfig::new("s", "v", fake.clone())).unwrap();
        let w = p.worker(16).unwrap();
        for tag in 0..10u64 {
            w.submit(IoRequest {
                tag,
                kind: IoKind::Write,
                offset: tag * 512,
                len: 0,
                data: vec![tag as u8; 512],
                fua: false,
            })
            .unwrap();
        }
        let mut tags = Vec::new();
        while tags.len() < 10 {
            // A sleeping queue worker's protocol: wait on the eventfd, reset it, poll.
            let mut pfd = libc::pollfd {
                fd: w.completion_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one live pollfd; a bounded wait.
            let woke = unsafe { libc::poll(&mut pfd, 1, 20_000) };
            assert_eq!(woke, 1, "eventfd woke");
            let mut n = 0u64;
            // SAFETY: reads 8 bytes into a live u64 from the worker's eventfd.
            let r = unsafe { libc::read(w.completion_fd(), (&mut n as *mut u64).cast(), 8) };
            assert_eq!((r, n > 0), (8, true));
            // A wake may find nothing: the previous drain can take completions whose
            // eventfd write came after it. What matters is that none is slept through.
            while let Some(c) = w.poll() {
                assert!(c.result.is_ok(), "{c:?}");
                tags.push(c.tag);
            }
        }
        // No duplicate (the old primary answered request 1 twice) and nothing extra.
        assert!(w.wait(Duration::from_millis(200)).is_none());
        tags.sort();
        assert_eq!(tags, (0..10).collect::<Vec<_>>());
        // The new primary got exactly the unanswered ones, in submission order, at epoch 2.
        let b = seen_b.lock().unwrap().clone();
        let offsets: Vec<u64> = b.iter().map(|&(_, off, _)| off / 512).collect();
        assert_eq!(offsets, (3..10).collect::<Vec<_>>());
        assert!(b.iter().all(|&(_, _, e)| e == 2), "{b:?}");
        assert!(seen_a.lock().unwrap().iter().all(|&(_, _, e)| e == 1));
        // Status: the new primary, its epoch, one change, and the seven resent requests.
        let st = p.status();
        assert_eq!(
            (
                st.primary.as_deref(),
                st.epoch,
                st.primary_changes,
                st.retried
            ),
            (Some("s2"), 2, 1, 7),
            "{st:?}"
        );
    }
}
