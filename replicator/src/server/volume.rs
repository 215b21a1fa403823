//! `VolumeRuntime`: one volume on one server, as primary or secondary.
//!
//! Owns the volume's role, its lease clock, its sequencer, its overlap queue and (as
//! primary) its peers. Everything about a volume changes here and nowhere else.

use super::overlap::{OverlapQueue, Ticket};
use super::unsettled::{self, SettleTracker, UnsettledLog};
use super::{Fail, ServerCtx};
use crate::authority::{AuthorityError, VolumeInfo};
use crate::conn::PeerLink;
use crate::frame::{
    ErrorBody, ErrorCode, Frame, Header, MsgKind, ReplicaOp, VolumeName, FLAG_CATCH_UP, FLAG_FUA,
};
use crate::peer_auth::PeerKey;
use crate::store::{DirtyBitmap, StoreError, VolumeReplica};
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Flags of a `CatchUp` frame: BEGIN asks the secondary for its [`PeerHello`] (and makes it
/// forget it was synced); DONE tells it that it now holds everything (synced at this epoch).
pub const CATCH_UP_BEGIN: u16 = 1;
pub const CATCH_UP_DONE: u16 = 2;
/// A new primary connects a peer that is in sync at the authority: the peer refuses with
/// `NotInSync` unless its replica is synced, learns the epoch, and answers a
/// [`ConnectReport`].
pub const CATCH_UP_CONNECT: u16 = 3;
/// The new primary copied every region of the report to this peer (see `unsettled`).
pub const CATCH_UP_RECONCILED: u16 = 4;
/// CONNECT from the first primary of a volume no replica of which was ever written: a peer
/// that is as new (created, never synced, never followed a stream) is in sync with it.
pub const CATCH_UP_CONNECT_NEW: u16 = 5;

/// How many sequence numbers a primary reserves in its metadata at a time.
const SEQ_CHUNK: u64 = 1 << 20;

/// Activity-log marks cover aligned groups of this many regions (see `activity_mark`).
const ACTIVITY_GROUP: u64 = 16;

/// Activity-log passes (seconds) a region stays marked after its last write.
const ACTIVITY_IDLE_PASSES: u64 = 60;
/// Marked regions beyond which the longest idle are cleared first (4 GiB at 1 MiB regions).
const ACTIVITY_MAX_REGIONS: usize = 4096;

/// A new primary copies at most this many regions to the surviving peers before it serves
/// (`reconcile`); beyond it they are caught up instead, out of sync meanwhile. After a
/// failover under load the set is about the writes that were in flight: a few regions.
const RESYNC_INLINE_MAX_REGIONS: usize = 256;

/// Region copies a catch-up keeps in flight (16 MiB at the default region size). On the
/// bench machine's ext4 disk 16 copied ~350 MB/s against ~260 with 8, once each copy starts
/// its own write-back (`VolumeReplica::start_writeback`).
const CATCH_UP_WINDOW: usize = 16;

/// The answer to one region copy.
type CopyAnswer =
    tokio::sync::oneshot::Receiver<Result<crate::frame::Frame, crate::conn::LinkError>>;

/// How long a catching-up peer may take to write back what it was sent before it joins.
const CATCH_UP_FLUSH_TIMEOUT: Duration = Duration::from_secs(60);

/// What a secondary reports when a primary starts catching it up.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PeerHello {
    /// The primary's bitmap for this replica is complete: it was synced at this epoch, or
    /// a catch-up from this epoch was under way.
    pub resumable: bool,
    pub synced: bool,
    pub followed_epoch: u64,
    pub epoch: u64,
    pub generation: u64,
}

/// What an in-sync secondary answers a new primary's `CATCH_UP_CONNECT`: the byte ranges
/// where it may differ from the other replicas (writes its last primaries never settled).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ConnectReport {
    pub unsettled: Vec<[u64; 2]>,
    /// Its process restarted since it last caught up: writes of this epoch's stream that it
    /// received before may be missing from `unsettled` (see `unsettled`).
    #[serde(default)]
    pub unknown_epoch: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// Follows `primary` (if known). Rejects client I/O with `NotPrimary`.
    Secondary { primary: Option<String> },
    /// Holds (or held) the lease of `epoch`; acknowledges only while the lease is valid.
    Primary { epoch: u64, generation: u64 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PeerState {
    /// Every acknowledged write waits for this peer.
    InSync,
    /// Marked out of sync at the authority; writes mark the bitmap instead.
    OutOfSync,
    /// Being caught up: receives live writes (not waited for) and region copies.
    CatchingUp,
}

/// A secondary as seen by its primary.
#[derive(Debug)]
pub struct Peer {
    pub server_id: String,
    pub addr: Mutex<String>,
    state: Mutex<PeerState>,
    link: Mutex<Option<Arc<PeerLink>>>,
    bitmap: Arc<Mutex<DirtyBitmap>>,
    degrade_lock: tokio::sync::Mutex<()>,
    /// The authority has been told this peer is in sync (after a catch-up).
    authority_in_sync: AtomicBool,
    pub copy_done: AtomicU64,
    pub copy_total: AtomicU64,
    pub full_rebuild: AtomicBool,
    pub failures: AtomicU64,
}

impl Peer {
    pub fn state(&self) -> PeerState {
        *self.state.lock().expect("peer state")
    }
    fn set_state(&self, s: PeerState) {
        *self.state.lock().expect("peer state") = s;
    }
    fn link(&self) -> Option<Arc<PeerLink>> {
        self.link.lock().expect("peer link").clone()
    }
    fn drop_link(&self) {
        if let Some(l) = self.link.lock().expect("peer link").take() {
            l.close();
        }
    }
    pub fn dirty_regions(&self) -> u64 {
        self.bitmap.lock().expect("bitmap").count_dirty()
    }

    /// Marks a range in this peer's bitmap, durably (off the async threads).
    async fn mark(&self, offset: u64, len: u64, all: bool) -> Result<(), Fail> {
        bitmap_op(&self.bitmap, move |b| {
            if all {
                b.mark_all()
            } else {
                b.mark(offset, len)
            }
        })
        .await
        .map_err(|e| Fail::new(ErrorCode::Io, format!("persisting dirty bitmap: {e}")))
    }

    async fn persist_bitmap(&self) {
        let bm = self.bitmap.clone();
        let r = tokio::task::spawn_blocking(move || bm.lock().expect("bitmap").persist_all())
            .await
            .expect("bitmap task");
        if let Err(e) = r {
            tracing::warn!(peer = %self.server_id, error = %e, "persisting bitmap");
        }
    }
}

/// A replicated operation sent to one peer: the peer and its answer, if it went out. Whether
/// a failure blocks the acknowledgement is the peer's state's business (`peer_failed`).
type PeerSend = (
    Arc<Peer>,
    Option<tokio::sync::oneshot::Receiver<Result<Frame, crate::conn::LinkError>>>,
);

/// Lease validity without a lock: the ack path reads two atomics.
#[derive(Debug)]
struct LeaseClock {
    base: Instant,
    epoch: AtomicU64,
    /// Nanoseconds after `base` until which the lease is valid (0: none).
    valid_until: AtomicU64,
}

impl LeaseClock {
    fn new() -> Self {
        Self {
            base: Instant::now(),
            epoch: AtomicU64::new(0),
            valid_until: AtomicU64::new(0),
        }
    }
    fn set(&self, epoch: u64, until: Instant) {
        self.epoch.store(epoch, Ordering::SeqCst);
        let n = until.saturating_duration_since(self.base).as_nanos() as u64;
        self.valid_until.store(n, Ordering::SeqCst);
    }
    fn clear(&self) {
        self.valid_until.store(0, Ordering::SeqCst);
    }
    fn valid(&self, epoch: u64) -> bool {
        self.epoch.load(Ordering::SeqCst) == epoch
            && (self.base.elapsed().as_nanos() as u64) < self.valid_until.load(Ordering::SeqCst)
    }
    fn remaining_ms(&self) -> u64 {
        let now = self.base.elapsed().as_nanos() as u64;
        self.valid_until.load(Ordering::SeqCst).saturating_sub(now) / 1_000_000
    }
}

#[derive(Debug)]
struct Sequencer {
    next: u64,
    reserved: u64,
}

#[derive(Debug, Default)]
pub struct VolumeStats {
    pub writes: AtomicU64,
    pub reads: AtomicU64,
    pub flushes: AtomicU64,
    pub errors: AtomicU64,
    pub replicated_applied: AtomicU64,
    pub degraded_events: AtomicU64,
    pub copies_sent: AtomicU64,
    /// Regions this server, as a new primary, copied to surviving peers because they may
    /// have differed (`reconcile`).
    pub resynced_regions: AtomicU64,
    pub inflight: AtomicU64,
    /// Milliseconds since the server started, of the last successful I/O (0: none).
    pub last_ok_ms: AtomicU64,
    /// Milliseconds since the server started, when `inflight` last rose from zero.
    pub busy_since_ms: AtomicU64,
}

pub struct VolumeRuntime {
    ctx: Arc<ServerCtx>,
    pub name: VolumeName,
    pub replica: Arc<VolumeReplica>,
    role: Mutex<Role>,
    lease: LeaseClock,
    seq: tokio::sync::Mutex<Sequencer>,
    overlap: Arc<OverlapQueue>,
    peers: Mutex<Vec<Arc<Peer>>>,
    info: Mutex<VolumeInfo>,
    /// True while a new primary connects its in-sync peers (client I/O gets NotReady).
    activating: AtomicBool,
    /// Held by each role-loop pass and by `release`, so a shutdown never races a pass that is
    /// acquiring the lease (which would hand the lease straight back to a stopping server).
    role_pass: tokio::sync::Mutex<()>,
    /// Set once by `release`: no role-loop pass acts after it.
    stopping: AtomicBool,
    /// Held around each lease renewal, so `release` can wait out one in flight (a renewal
    /// that reached the authority after the release would grant the lease again).
    renewing: tokio::sync::Mutex<()>,
    /// Regions that may have replicated writes in flight (persistent; see `activity_mark`).
    activity: Arc<Mutex<DirtyBitmap>>,
    /// Writes in flight per region, from their activity mark until every peer answered.
    active_writes: Arc<Mutex<std::collections::HashMap<u64, u32>>>,
    /// Regions written since the activity cleaner's last pass: a hot region stays marked,
    /// so it does not pay a mark (a disk write and fdatasync) again after every pass.
    activity_recent: Arc<Mutex<std::collections::HashSet<u64>>>,
    /// Held by a catch-up copy while it writes (see `secondary_apply`).
    copy_write: Arc<Mutex<()>>,
    /// As primary: the replicated writes not yet on every in-sync peer (see `unsettled`).
    settling: Mutex<SettleTracker>,
    /// As secondary: where this replica may differ from the others (see `unsettled`).
    unsettled: Mutex<UnsettledLog>,
    pub stats: VolumeStats,
}

/// The operation of a client write or a replicated one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteOp {
    Write,
    WriteZeroes,
    Discard,
}

impl WriteOp {
    fn replica_op(self) -> ReplicaOp {
        match self {
            Self::Write => ReplicaOp::Write,
            Self::WriteZeroes => ReplicaOp::WriteZeroes,
            Self::Discard => ReplicaOp::Discard,
        }
    }
}

fn store_fail(e: StoreError) -> Fail {
    match e {
        StoreError::OutOfRange { .. } => Fail::new(ErrorCode::OutOfRange, e.to_string()),
        StoreError::Unaligned { .. } => Fail::new(ErrorCode::Invalid, e.to_string()),
        _ => Fail::new(ErrorCode::Io, e.to_string()),
    }
}

impl VolumeRuntime {
    pub fn new(
        ctx: Arc<ServerCtx>,
        replica: Arc<VolumeReplica>,
        info: VolumeInfo,
    ) -> Result<Arc<Self>, StoreError> {
        let meta = replica.meta();
        let region_size = ctx.config.region_size;
        let activity = Arc::new(Mutex::new(replica.open_activity_log(region_size)?));
        Ok(Arc::new(Self {
            ctx,
            name: replica.name().clone(),
            replica,
            role: Mutex::new(Role::Secondary {
                primary: info.primary.clone(),
            }),
            lease: LeaseClock::new(),
            seq: tokio::sync::Mutex::new(Sequencer {
                next: meta.seq_reserved + 1,
                reserved: meta.seq_reserved,
            }),
            overlap: Arc::new(OverlapQueue::default()),
            peers: Mutex::new(Vec::new()),
            info: Mutex::new(info),
            activating: AtomicBool::new(false),
            role_pass: tokio::sync::Mutex::new(()),
            stopping: AtomicBool::new(false),
            renewing: tokio::sync::Mutex::new(()),
            activity,
            active_writes: Arc::default(),
            activity_recent: Arc::default(),
            copy_write: Arc::default(),
            settling: Mutex::default(),
            unsettled: Mutex::new(UnsettledLog::new(
                region_size,
                meta.synced.then_some(meta.followed_epoch),
            )),
            stats: VolumeStats::default(),
        }))
    }

    pub fn role(&self) -> Role {
        self.role.lock().expect("role").clone()
    }

    pub fn info(&self) -> VolumeInfo {
        self.info.lock().expect("info").clone()
    }

    /// As a secondary: the byte ranges where this replica may differ from the others, and
    /// whether its process forgot some in a restart (see `unsettled`).
    pub fn unsettled(&self) -> (usize, bool) {
        let log = self.unsettled.lock().expect("unsettled");
        (
            log.ranges(self.replica.size_bytes()).len(),
            log.unknown().is_some(),
        )
    }

    pub fn peers(&self) -> Vec<Arc<Peer>> {
        self.peers.lock().expect("peers").clone()
    }

    pub fn lease_valid(&self) -> bool {
        match self.role() {
            Role::Primary { epoch, .. } => self.lease.valid(epoch),
            Role::Secondary { .. } => false,
        }
    }

    /// Client writes are outstanding and none has completed for `replicate_timeout`: the
    /// disk (or the fan-out) is stuck. A primary in this state counts as unhealthy for a
    /// takeover.
    pub fn io_stalled(&self) -> bool {
        if self.stats.inflight.load(Ordering::Relaxed) == 0 {
            return false;
        }
        let now = self.ctx.started.elapsed().as_millis() as u64;
        let progress = self
            .stats
            .last_ok_ms
            .load(Ordering::Relaxed)
            .max(self.stats.busy_since_ms.load(Ordering::Relaxed));
        now.saturating_sub(progress) > self.ctx.config.replicate_timeout.as_millis() as u64
    }

    /// Serving client I/O now: primary, leased, in-sync peers connected.
    pub fn accepting_io(&self) -> bool {
        self.lease_valid() && !self.activating.load(Ordering::SeqCst)
    }

    pub fn lease_remaining_ms(&self) -> u64 {
        self.lease.remaining_ms()
    }

    fn is_primary_at(&self, epoch: u64) -> bool {
        matches!(self.role(), Role::Primary { epoch: e, .. } if e == epoch)
    }

    fn mark_ok(&self) {
        self.stats.last_ok_ms.store(
            self.ctx.started.elapsed().as_millis() as u64,
            Ordering::Relaxed,
        );
    }

    /// The known (generation, epoch): what this replica fences against.
    pub fn fence(&self) -> (u64, u64) {
        let m = self.replica.meta();
        (m.generation, m.epoch)
    }

    // ---- role changes ---------------------------------------------------------------

    /// One pass of the role loop: reads the volume from the authority and acts on it.
    pub async fn refresh(self: &Arc<Self>) {
        let _pass = self.role_pass.lock().await;
        if self.stopping.load(Ordering::SeqCst) {
            return;
        }
        let a = &self.ctx.authority;
        let info = match a
            .volume_get(&self.ctx.config.site, self.name.as_str())
            .await
        {
            Ok(i) => i,
            Err(e) => {
                tracing::debug!(volume = %self.name, error = %e, "volume_get");
                return;
            }
        };
        *self.info.lock().expect("info") = info.clone();
        let me = &self.ctx.config.server_id;
        let designated = info.primary.as_deref() == Some(me.as_str());
        match self.role() {
            Role::Primary { epoch, .. } if !designated || info.epoch > epoch => {
                self.step_down(&format!(
                    "authority names {:?} at epoch {}",
                    info.primary, info.epoch
                ));
            }
            Role::Primary { .. } => self.update_peer_addrs(&info),
            Role::Secondary { .. } if designated => self.try_become_primary(info).await,
            Role::Secondary { .. } => {
                let (g, e) = self.fence();
                if (info.generation, info.epoch) > (g, e) {
                    let (ng, ne) = (info.generation, info.epoch);
                    if let Err(err) = meta_update(&self.replica, move |m| {
                        m.generation = ng;
                        m.epoch = ne;
                    })
                    .await
                    {
                        tracing::warn!(volume = %self.name, error = %err, "persisting epoch");
                    }
                }
                *self.role.lock().expect("role") = Role::Secondary {
                    primary: info.primary.clone(),
                };
            }
        }
    }

    fn update_peer_addrs(&self, info: &VolumeInfo) {
        for p in self.peers() {
            if let Some(s) = info.server(&p.server_id) {
                *p.addr.lock().expect("addr") = s.data_addr.clone();
            }
        }
    }

    async fn try_become_primary(self: &Arc<Self>, info: VolumeInfo) {
        let cfg = &self.ctx.config;
        let sent = Instant::now();
        let grant = match self
            .ctx
            .authority
            .lease_acquire(&cfg.site, self.name.as_str(), &cfg.server_id)
            .await
        {
            Ok(g) => g,
            Err(e) => {
                tracing::info!(volume = %self.name, error = %e, "lease not granted yet");
                return;
            }
        };
        let until = sent + lease_usable(grant.lease_ms, cfg.drift_margin_ms);
        let epoch = grant.epoch;
        // The seq of a restarted primary continues above anything it may have used.
        let generation = grant.generation;
        let before = self.replica.meta();
        let meta = match meta_update(&self.replica, move |m| {
            m.generation = generation;
            m.epoch = epoch;
            m.followed_epoch = epoch;
            m.led_epoch = epoch;
            m.seq_reserved += SEQ_CHUNK;
        })
        .await
        {
            Ok(m) => m,
            Err(e) => {
                tracing::error!(volume = %self.name, error = %e, "cannot persist epoch; not taking the lease");
                return;
            }
        };
        {
            let mut sq = self.seq.lock().await;
            sq.next = meta.seq_reserved - SEQ_CHUNK + 1;
            sq.reserved = meta.seq_reserved;
        }
        self.overlap.reset_seq();
        let mut peers = Vec::new();
        for s in info.servers.iter().filter(|s| s.server_id != cfg.server_id) {
            let bitmap = match self.replica.open_bitmap(&s.server_id, cfg.region_size) {
                Ok(b) => b,
                Err(e) => {
                    tracing::error!(volume = %self.name, error = %e, "opening bitmap; not taking the lease");
                    return;
                }
            };
            peers.push(Arc::new(Peer {
                server_id: s.server_id.clone(),
                addr: Mutex::new(s.data_addr.clone()),
                state: Mutex::new(if s.in_sync {
                    PeerState::InSync
                } else {
                    PeerState::OutOfSync
                }),
                link: Mutex::new(None),
                bitmap: Arc::new(Mutex::new(bitmap)),
                degrade_lock: tokio::sync::Mutex::new(()),
                authority_in_sync: AtomicBool::new(s.in_sync),
                copy_done: AtomicU64::new(0),
                copy_total: AtomicU64::new(0),
                full_rebuild: AtomicBool::new(false),
                failures: AtomicU64::new(0),
            }));
        }
        // Regions that had writes in flight when this server last stopped as primary may
        // differ between the replicas (those writes were never acknowledged): every peer gets
        // them from this server's copy before it counts as in sync again.
        let active = self.activity.lock().expect("activity").dirty_list();
        let mut resync = false;
        if !active.is_empty() {
            tracing::warn!(volume = %self.name, regions = active.len(), "activity log: resyncing regions that had writes in flight");
            for p in &peers {
                let mut bm = p.bitmap.lock().expect("bitmap");
                for &r in &active {
                    if let Err(e) = bm.mark(r * cfg.region_size, 1) {
                        tracing::error!(volume = %self.name, error = %e, "merging activity log; not taking the lease");
                        return;
                    }
                }
            }
            resync = true;
        }
        *self.peers.lock().expect("peers") = peers.clone();
        // Client I/O waits (NotReady) until the in-sync peers are connected below.
        self.activating.store(true, Ordering::SeqCst);
        self.lease.set(epoch, until);
        *self.role.lock().expect("role") = Role::Primary {
            epoch,
            generation: grant.generation,
        };
        tracing::info!(volume = %self.name, epoch, "primary");
        let me = self.clone();
        tokio::spawn(async move { me.renew_loop(epoch, grant.lease_ms).await });
        let me = self.clone();
        tokio::spawn(async move { me.activity_cleaner(epoch).await });
        // In-sync peers are connected before the first write needs them; one that cannot
        // be reached is marked out of sync now rather than by the first write.
        for p in &peers {
            if resync && p.state() == PeerState::InSync {
                // Through catch-up (incremental: only the merged regions) back to in sync.
                let _ = self.peer_failed(p, 0, 0, false, epoch).await;
            }
        }
        if resync {
            let all = self.activity.lock().expect("activity").dirty_list();
            if let Err(e) = clear_regions(&self.activity, all).await {
                tracing::warn!(volume = %self.name, error = %e, "clearing activity log");
            }
        }
        // Where the survivors may differ: this replica's own record as a secondary (taken
        // now: since the epoch was persisted above no older frame is admitted) and each
        // peer's. (A previous term of this server that died part-way through the same resync
        // left the regions in its activity log, replayed above.)
        let size = self.replica.size_bytes();
        let (mut unsettled, own_unknown) = self.unsettled.lock().expect("unsettled").take(size);
        // A forgotten log is covered only for a stream this server led: its activity log
        // (replayed above) holds that stream's in-flight regions.
        let covered = |e: Option<u64>| e.is_none_or(|e| e != 0 && e == before.led_epoch);
        let own_unknown = !covered(own_unknown);
        // The first primary of a new volume: every replica is all zeroes, none was written.
        let pristine = before.is_pristine();
        for p in &peers {
            if p.state() == PeerState::InSync {
                match self.connect_in_sync(p, epoch, pristine).await {
                    Ok(report) if own_unknown || !covered(report.unknown_epoch) => {
                        // Where this replica and that one may differ is not known: all of it.
                        tracing::warn!(volume = %self.name, peer = %p.server_id, own_unknown,
                            "a replica forgot its unsettled writes in a restart: full copy");
                        let _ = self.peer_failed(p, 0, 0, true, epoch).await;
                    }
                    Ok(report) => unsettled.extend(report.unsettled),
                    Err(e) => {
                        tracing::warn!(volume = %self.name, peer = %p.server_id, error = %e.message, "in-sync peer unreachable");
                        let _ = self.peer_failed(p, 0, 0, false, epoch).await;
                    }
                }
            }
        }
        let regions = unsettled::regions_of(&unsettled, cfg.region_size);
        if let Err(e) = self.reconcile(regions, grant.generation, epoch).await {
            // Not serving with an in-sync peer that may differ; the role loop tries again
            // (the regions stay marked in the peers' bitmaps, so the next try finds them).
            tracing::error!(volume = %self.name, error = %e.message, "resync of the surviving replicas failed");
            self.step_down("could not resync the surviving replicas");
            self.activating.store(false, Ordering::SeqCst);
            return;
        }
        self.activating.store(false, Ordering::SeqCst);
        for p in peers {
            let me = self.clone();
            tokio::spawn(async move { me.peer_keeper(p, epoch).await });
        }
    }

    /// Connects an in-sync peer, retrying for a few replicate timeouts (a peer that starts
    /// with this server may still be loading the volume).
    async fn connect_in_sync(
        &self,
        p: &Arc<Peer>,
        epoch: u64,
        pristine: bool,
    ) -> Result<ConnectReport, Fail> {
        let end = Instant::now() + 3 * self.ctx.config.replicate_timeout;
        loop {
            match self.connect_in_sync_once(p, epoch, pristine).await {
                Ok(r) => return Ok(r),
                // Its replica is not synced (new, rebooted, wiped): only a full copy helps.
                Err(e) if e.code == ErrorCode::NotInSync => return Err(e),
                Err(e) if Instant::now() >= end => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    async fn connect_in_sync_once(
        &self,
        p: &Arc<Peer>,
        epoch: u64,
        pristine: bool,
    ) -> Result<ConnectReport, Fail> {
        if p.addr.lock().expect("addr").is_empty() {
            // The role loop is busy activating: look the address up here.
            if let Ok(info) = self
                .ctx
                .authority
                .volume_get(&self.ctx.config.site, self.name.as_str())
                .await
            {
                self.update_peer_addrs(&info);
            }
        }
        let link = self.connect_peer(p).await?;
        // CONNECT first: the peer follows this epoch, so this primary's bitmap for it is
        // from now on what it may lack (besides the regions of its report).
        let flag = if pristine {
            CATCH_UP_CONNECT_NEW
        } else {
            CATCH_UP_CONNECT
        };
        let h = self.catch_up_header(flag, &link, epoch);
        let f = link
            .call(&h, &[], self.ctx.config.replicate_timeout)
            .await
            .map_err(|e| Fail::new(ErrorCode::ReplicationFailed, e.to_string()))?;
        if f.header.kind != MsgKind::Ok {
            return Err(expect_ok(f).expect_err("an error answer"));
        }
        let report = serde_json::from_slice(&f.payload).map_err(|e| {
            Fail::new(
                ErrorCode::ReplicationFailed,
                format!("bad connect report: {e}"),
            )
        })?;
        *p.link.lock().expect("peer link") = Some(Arc::new(link));
        Ok(report)
    }

    /// Copies `regions` from this replica to every connected in-sync peer before the first
    /// client write: a dead primary's unsettled writes may have reached some replicas and not
    /// others there (see `unsettled`). Runs while activating, so no client write is
    /// sequenced meanwhile. A peer that fails a copy is marked out of sync as usual; an
    /// error means a peer could be neither resynced nor marked out of sync.
    async fn reconcile(
        &self,
        regions: std::collections::BTreeSet<u64>,
        g: u64,
        epoch: u64,
    ) -> Result<(), Fail> {
        let targets: Vec<Arc<Peer>> = self
            .peers()
            .into_iter()
            .filter(|p| p.state() == PeerState::InSync && p.link().is_some())
            .collect();
        if regions.is_empty() || targets.is_empty() {
            return Ok(());
        }
        let (rs, size) = (self.ctx.config.region_size, self.replica.size_bytes());
        let ranges: Vec<[u64; 2]> =
            unsettled::region_ranges(regions.iter().copied(), rs, size).collect();
        tracing::warn!(volume = %self.name, regions = ranges.len(), peers = targets.len(),
            "resyncing regions where the surviving replicas may differ");
        // Marked first, durably: in each peer's bitmap, so one that fails part-way is caught
        // up from it, and in the activity log, so that if this server dies part-way its next
        // term as primary resyncs them (the log's replay).
        let marks = std::iter::once(&self.activity).chain(targets.iter().map(|p| &p.bitmap));
        for bm in marks {
            let regions = regions.clone();
            bitmap_op(bm, move |b| b.mark_regions(regions))
                .await
                .map_err(|e| Fail::new(ErrorCode::Io, format!("persisting a bitmap: {e}")))?;
        }
        if ranges.len() > RESYNC_INLINE_MAX_REGIONS {
            // Too much to copy while clients wait (a commit point stuck for long, folded into
            // regions): the peers go out of sync and are caught up from their bitmaps, with
            // the volume serving meanwhile.
            tracing::warn!(volume = %self.name, regions = ranges.len(), "too many regions to resync before serving: catching the peers up instead");
            for p in &targets {
                self.peer_failed(p, 0, 0, false, epoch).await?;
            }
            return Ok(());
        }
        let mut pending = std::collections::VecDeque::new();
        for &[off, len] in &ranges {
            let sends = {
                let mut sq = self.seq.lock().await;
                let seq = self.next_seq(&mut sq).await?;
                let mut ticket = self
                    .overlap
                    .register(seq, off, len, false)
                    .map_err(|err| Fail::new(ErrorCode::Invalid, err.to_string()))?;
                ticket.ready().await;
                let data = store_op(&self.replica, false, move |rep| {
                    rep.read_at(off, len as u32)
                })
                .await
                .map_err(store_fail)?;
                drop(ticket);
                let mut rh = self.replicate_header(
                    self.commit_point(&sq),
                    seq,
                    ReplicaOp::Write,
                    0,
                    g,
                    epoch,
                );
                rh.offset = off;
                rh.length = len as u32;
                let mut sends = Vec::new();
                for p in &targets {
                    let rx = p.link().and_then(|l| {
                        rh.request_id = l.next_request_id();
                        l.send(&rh, &data).ok()
                    });
                    sends.push((p.clone(), rx));
                }
                sends
            };
            pending.push_back((off, len, sends));
            if pending.len() >= CATCH_UP_WINDOW {
                let (o, l, s) = pending.pop_front().expect("not empty");
                self.await_peers(s, o, l, false, epoch).await?;
            }
        }
        while let Some((o, l, s)) = pending.pop_front() {
            self.await_peers(s, o, l, false, epoch).await?;
        }
        self.stats
            .resynced_regions
            .fetch_add(ranges.len() as u64, Ordering::Relaxed);
        for p in targets.iter().filter(|p| p.state() == PeerState::InSync) {
            let Some(link) = p.link() else { continue };
            let h = self.catch_up_header(CATCH_UP_RECONCILED, &link, epoch);
            let told = link
                .call(&h, &[], self.ctx.config.replicate_timeout)
                .await
                .map_err(|e| Fail::new(ErrorCode::ReplicationFailed, e.to_string()))
                .and_then(expect_ok);
            if let Err(e) = told {
                // Harmless: the peer keeps its report and gives it to the next primary.
                tracing::warn!(volume = %self.name, peer = %p.server_id, error = %e.message, "telling a peer it was resynced");
                continue;
            }
            if let Err(e) = clear_regions(&p.bitmap, regions.clone()).await {
                tracing::warn!(volume = %self.name, peer = %p.server_id, error = %e, "clearing resynced regions from the bitmap");
            }
        }
        Ok(())
    }

    async fn connect_peer(&self, p: &Peer) -> Result<PeerLink, Fail> {
        let addr = p.addr.lock().expect("addr").clone();
        if addr.is_empty() {
            return Err(Fail::new(
                ErrorCode::ReplicationFailed,
                format!("peer {} has no address yet", p.server_id),
            ));
        }
        let key = self.ctx.config.peer_key.as_ref();
        PeerLink::connect(&addr, self.ctx.config.replicate_timeout, key, None)
            .await
            .map_err(|e| Fail::new(ErrorCode::ReplicationFailed, e.to_string()))
    }

    fn catch_up_header(&self, flags: u16, link: &PeerLink, epoch: u64) -> Header {
        let mut h = Header::new(MsgKind::CatchUp, link.next_request_id(), self.name.clone());
        h.flags = flags;
        h.epoch = epoch;
        h.generation = self.fence().0;
        h
    }

    async fn renew_loop(self: Arc<Self>, epoch: u64, lease_ms: u64) {
        let cfg = &self.ctx.config;
        let every = Duration::from_millis((lease_ms / 4).max(1));
        loop {
            tokio::time::sleep(every).await;
            let _renewing = self.renewing.lock().await;
            if !self.is_primary_at(epoch) {
                return;
            }
            let sent = Instant::now();
            match self
                .ctx
                .authority
                .lease_renew(&cfg.site, self.name.as_str(), &cfg.server_id, epoch)
                .await
            {
                // A step-down while the renewal was out keeps the lease cleared.
                Ok(_) if !self.is_primary_at(epoch) => return,
                Ok(g) if g.epoch == epoch => {
                    self.lease
                        .set(epoch, sent + lease_usable(g.lease_ms, cfg.drift_margin_ms));
                }
                Ok(g) => {
                    self.step_down(&format!("renew answered epoch {}", g.epoch));
                    return;
                }
                Err(AuthorityError::StaleEpoch { epoch: e, .. }) => {
                    self.step_down(&format!("lease renew: stale epoch (newer {e})"));
                    return;
                }
                Err(e) => {
                    // The lease runs out by itself if this goes on; acks stop then.
                    tracing::warn!(volume = %self.name, error = %e, "lease renew failed");
                }
            }
        }
    }

    /// Graceful stop: stop acknowledging, then give the lease back so a new primary need not
    /// wait for it to run out.
    pub async fn release(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        // Waits out a pass in flight: once it ends no pass acts again, so the role read here
        // is the last one.
        let _pass = self.role_pass.lock().await;
        if let Role::Primary { epoch, .. } = self.role() {
            self.step_down("shutting down");
            drop(self.renewing.lock().await);
            let cfg = &self.ctx.config;
            match self
                .ctx
                .authority
                .lease_release(&cfg.site, self.name.as_str(), &cfg.server_id, epoch)
                .await
            {
                Ok(()) => tracing::info!(volume = %self.name, epoch, "lease released"),
                Err(e) => tracing::warn!(volume = %self.name, error = %e, "lease_release"),
            }
        }
    }

    pub fn step_down(&self, why: &str) {
        let was = {
            let mut r = self.role.lock().expect("role");
            let was = matches!(*r, Role::Primary { .. });
            *r = Role::Secondary { primary: None };
            was
        };
        self.lease.clear();
        for p in self.peers.lock().expect("peers").drain(..) {
            p.drop_link();
        }
        self.overlap.reset_seq();
        if was {
            tracing::warn!(volume = %self.name, why, "stepped down");
        }
    }

    // ---- primary: client I/O -----------------------------------------------------------

    /// Checks that this server may serve client I/O for `h`: the primary, fenced, leased.
    fn check_primary(&self, h: &Header) -> Result<(u64, u64), Fail> {
        match self.role() {
            Role::Secondary { primary } => {
                let info = self.info();
                let addr = primary
                    .as_deref()
                    .and_then(|p| info.server(p))
                    .map(|s| s.data_addr.clone())
                    .unwrap_or_default();
                Err(Fail::new(
                    ErrorCode::NotPrimary,
                    format!("{} {}", primary.unwrap_or_default(), addr),
                ))
            }
            Role::Primary { epoch, generation } => {
                let mine = (generation, epoch);
                let theirs = (h.generation, h.epoch);
                if theirs < mine {
                    return Err(Fail::stale(mine));
                }
                if theirs > mine {
                    return Err(Fail::new(
                        ErrorCode::NotReady,
                        format!("client knows epoch {theirs:?}, this server {mine:?}"),
                    ));
                }
                if !self.lease.valid(epoch) {
                    return Err(Fail::new(ErrorCode::LeaseExpired, "lease not valid"));
                }
                if self.activating.load(Ordering::SeqCst) {
                    return Err(Fail::new(
                        ErrorCode::NotReady,
                        "connecting the in-sync secondaries",
                    ));
                }
                Ok(mine)
            }
        }
    }

    async fn next_seq(&self, sq: &mut Sequencer) -> Result<u64, Fail> {
        if sq.next > sq.reserved {
            let upto = sq.next + SEQ_CHUNK;
            let m = meta_update(&self.replica, move |m| m.seq_reserved = upto)
                .await
                .map_err(store_fail)?;
            sq.reserved = m.seq_reserved;
        }
        let s = sq.next;
        sq.next += 1;
        Ok(s)
    }

    /// The commit point a `Replicate` carries; taken under the sequencer lock (`sq`), right
    /// after its seq, so it is below every seq still unsettled at that moment.
    fn commit_point(&self, sq: &Sequencer) -> u64 {
        self.settling
            .lock()
            .expect("settle tracker")
            .commit_point(sq.next)
    }

    fn replicate_header(
        &self,
        commit: u64,
        seq: u64,
        op: ReplicaOp,
        flags: u16,
        g: u64,
        e: u64,
    ) -> Header {
        let mut h = Header::new(MsgKind::Replicate, 0, self.name.clone());
        h.commit = commit;
        h.flags = op.to_flags() | flags;
        h.generation = g;
        h.epoch = e;
        h.seq = seq;
        h
    }

    pub async fn client_write(
        self: &Arc<Self>,
        op: WriteOp,
        h: &Header,
        payload: Vec<u8>,
        payload_crc: u32,
    ) -> Result<(), Fail> {
        let (g, e) = self.check_primary(h)?;
        let len = match op {
            WriteOp::Write => payload.len() as u64,
            _ => h.length as u64,
        };
        let off = h.offset;
        self.replica.check_range(off, len).map_err(store_fail)?;
        let fua = h.flags & FLAG_FUA != 0;
        if self.stats.inflight.fetch_add(1, Ordering::Relaxed) == 0 {
            self.stats.busy_since_ms.store(
                self.ctx.started.elapsed().as_millis() as u64,
                Ordering::Relaxed,
            );
        }
        let r = self
            .sequenced_write(op, off, len, fua, payload, payload_crc, g, e)
            .await;
        self.stats.inflight.fetch_sub(1, Ordering::Relaxed);
        match &r {
            Ok(()) => {
                self.stats.writes.fetch_add(1, Ordering::Relaxed);
                self.mark_ok();
            }
            Err(_) => {
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        r
    }

    #[allow(clippy::too_many_arguments)]
    async fn sequenced_write(
        self: &Arc<Self>,
        op: WriteOp,
        off: u64,
        len: u64,
        fua: bool,
        payload: Vec<u8>,
        payload_crc: u32,
        g: u64,
        e: u64,
    ) -> Result<(), Fail> {
        let mut sends = Vec::new();
        // Catching-up peers' answers are not waited for (see `trail_peers`).
        let mut trailing = Vec::new();
        let mut missed = Vec::new();
        // `_active` lives until every peer answered: the region stays in the activity log.
        let (mut ticket, _active, seq) = {
            let mut sq = self.seq.lock().await;
            if !self.is_primary_at(e) {
                return Err(Fail::new(ErrorCode::LeaseExpired, "no longer primary"));
            }
            let active = if self.peers.lock().expect("peers").is_empty() {
                None
            } else {
                self.activity_mark(off, len).await?;
                {
                    let rs = self.ctx.config.region_size;
                    let mut recent = self.activity_recent.lock().expect("activity recent");
                    recent.extend(off / rs..(off + len.max(1) - 1) / rs + 1);
                }
                Some(ActiveWrite::enter(
                    &self.active_writes,
                    off,
                    len,
                    self.ctx.config.region_size,
                ))
            };
            let seq = self.next_seq(&mut sq).await?;
            let ticket = self
                .overlap
                .register(seq, off, len, false)
                .map_err(|err| Fail::new(ErrorCode::Invalid, err.to_string()))?;
            // One lock for both: this runs once per write.
            let commit = {
                let mut t = self.settling.lock().expect("settle tracker");
                if active.is_some() {
                    t.open(seq);
                }
                t.commit_point(sq.next)
            };
            let mut rh = self.replicate_header(commit, seq, op.replica_op(), 0, g, e);
            rh.offset = off;
            rh.length = len as u32;
            if fua {
                rh.flags |= FLAG_FUA;
            }
            // The client's payload CRC, verified on arrival, is extended over the new header
            // instead of summing 4 KiB again (see `frame::encode_with_payload_crc`).
            let (body, body_crc): (&[u8], u32) = if op == WriteOp::Write {
                (&payload, payload_crc)
            } else {
                (&[], crc32c::crc32c(&[]))
            };
            for p in self.peers() {
                let state = p.state();
                if state == PeerState::OutOfSync {
                    missed.push(p);
                    continue;
                }
                let rx = p.link().and_then(|l| {
                    rh.request_id = l.next_request_id();
                    l.send_with_payload_crc(&rh, body, body_crc).ok()
                });
                if state == PeerState::CatchingUp {
                    trailing.push((p, rx));
                } else {
                    sends.push((p, rx));
                }
            }
            (ticket, active, seq)
        };
        // A peer that is away lacks this write: say so durably before it can be acked.
        for p in &missed {
            p.mark(off, len, false).await?;
        }
        ticket.ready().await;
        if !sends.is_empty() {
            // Let the links' writer tasks put the Replicate frames on the wire before the
            // local write, which runs on this thread without yielding: the peers' round trip
            // then overlaps it (seen in a syscall trace: the frame left only after the pwrite).
            tokio::task::yield_now().await;
        }
        let may_block = fua || op != WriteOp::Write;
        let local = store_op(&self.replica, may_block, move |rep| {
            match op {
                WriteOp::Write => rep.write_at(off, &payload)?,
                WriteOp::WriteZeroes | WriteOp::Discard => rep.punch_zeroes(off, len)?,
            }
            if fua {
                rep.sync()?;
            }
            Ok::<_, StoreError>(())
        })
        .await;
        drop(ticket);
        self.trail_peers(trailing, off, len, false, e);
        self.await_peers(sends, off, len, false, e).await?;
        // Only now is the write on every in-sync peer (or the missing one is out of sync at
        // the authority); a failure above leaves it unsettled for good.
        self.settling.lock().expect("settle tracker").settle(seq);
        local.map_err(store_fail)?;
        if !self.lease.valid(e) {
            return Err(Fail::new(
                ErrorCode::LeaseExpired,
                "lease ran out before the write completed",
            ));
        }
        Ok(())
    }

    /// Records durably, before a write is sent anywhere, that its regions may have a write
    /// in flight (called under the sequencer lock). Only a region's first write since it
    /// was cleaned costs a disk write, and that write marks the whole aligned group of
    /// `ACTIVITY_GROUP` regions around it: a sequential stream pays one fdatasync per group,
    /// not per region (measured: one per region held 128k sequential writes to ~170 MB/s and
    /// random 4k writes to ~1k IOPS, each mark serialised under the sequencer lock).
    async fn activity_mark(&self, off: u64, len: u64) -> Result<(), Fail> {
        if self.activity.lock().expect("activity").covers(off, len) {
            return Ok(());
        }
        let group = self.ctx.config.region_size * ACTIVITY_GROUP;
        let start = off / group * group;
        let end = (off + len.max(1)).div_ceil(group) * group;
        let size = self.replica.size_bytes();
        let (m_off, m_len) = (start, end.min(size) - start);
        let a = self.activity.clone();
        tokio::task::spawn_blocking(move || a.lock().expect("activity").mark(m_off, m_len))
            .await
            .expect("activity task")
            .map_err(|e| Fail::new(ErrorCode::Io, format!("persisting activity log: {e}")))
    }

    /// Once a second, clears the activity bits of regions that have had no write in flight
    /// for [`ACTIVITY_IDLE_PASSES`] passes, and, while more than [`ACTIVITY_MAX_REGIONS`] are
    /// marked, of the longest idle ones (DRBD's activity log works the same way: a bounded
    /// set of hot extents, evicted least recently used). Clearing idle regions after one
    /// second made every return to a working set pay its marks again, each an fdatasync
    /// under the sequencer lock; on ext4, whose journal commit waits for other files' data,
    /// that held random writes to ~1-3k IOPS once another volume's copy was being written
    /// back (measured in the bench's later rounds). The price is a larger resync after a
    /// crash of this primary: at most the marked regions. Runs under the sequencer lock, so
    /// no write is between its mark and its registration.
    async fn activity_cleaner(self: Arc<Self>, epoch: u64) {
        // Cleaner-owned: the pass at which each marked region was last written (or first
        // seen marked).
        let mut last_written: std::collections::HashMap<u64, u64> = Default::default();
        let mut pass = 0u64;
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            if !self.is_primary_at(epoch) {
                return;
            }
            pass += 1;
            let _sq = self.seq.lock().await;
            let recent =
                std::mem::take(&mut *self.activity_recent.lock().expect("activity recent"));
            let clear = {
                let a = self.activity.lock().expect("activity");
                let busy = self.active_writes.lock().expect("active writes");
                let marked = a.dirty_list();
                // Rebuilt from the marked set each pass, so it holds no region that is no
                // longer marked.
                last_written = marked
                    .iter()
                    .map(|&r| {
                        let seen = if recent.contains(&r) {
                            pass
                        } else {
                            last_written.get(&r).copied().unwrap_or(pass)
                        };
                        (r, seen)
                    })
                    .collect();
                let mut idle: Vec<(u64, u64)> = last_written
                    .iter()
                    .filter(|(r, _)| !busy.contains_key(r))
                    .map(|(&r, &seen)| (seen, r))
                    .collect();
                idle.sort_unstable();
                let over = marked.len().saturating_sub(ACTIVITY_MAX_REGIONS);
                idle.iter()
                    .enumerate()
                    .take_while(|&(i, &(seen, _))| i < over || pass - seen >= ACTIVITY_IDLE_PASSES)
                    .map(|(_, &(_, r))| r)
                    .collect::<Vec<u64>>()
            };
            if clear.is_empty() {
                continue;
            }
            if let Err(e) = clear_regions(&self.activity, clear).await {
                tracing::warn!(volume = %self.name, error = %e, "cleaning activity log");
            }
        }
    }

    /// Takes the answers of catching-up peers off the acknowledgement path: a task waits for
    /// them and marks the range in a failed peer's bitmap (which sends it back out of sync),
    /// while the write is acknowledged without them. Waiting for them made every client
    /// write during a catch-up queue behind up to `CATCH_UP_WINDOW` region copies on that
    /// peer's link. Safe because such a peer is out of sync at the authority (it cannot be
    /// promoted), and until its answer the task keeps the range in the activity log, so a
    /// crash of this primary before the answer resyncs the range to every peer on restart.
    fn trail_peers(
        self: &Arc<Self>,
        trailing: Vec<PeerSend>,
        off: u64,
        len: u64,
        all: bool,
        e: u64,
    ) {
        if trailing.is_empty() {
            return;
        }
        let active = (!all).then(|| {
            ActiveWrite::enter(&self.active_writes, off, len, self.ctx.config.region_size)
        });
        let me = self.clone();
        tokio::spawn(async move {
            let _active = active;
            let _ = me.await_peers(trailing, off, len, all, e).await;
        });
    }

    /// Waits (in parallel: all were sent already) for the peers' answers until one common
    /// deadline; a peer that fails is marked out of sync before anything is acknowledged.
    async fn await_peers(
        &self,
        sends: Vec<PeerSend>,
        off: u64,
        len: u64,
        all: bool,
        epoch: u64,
    ) -> Result<(), Fail> {
        let deadline = tokio::time::Instant::now() + self.ctx.config.replicate_timeout;
        for (p, rx) in sends {
            let outcome = match rx {
                None => Err("no connection".to_string()),
                Some(rx) => match tokio::time::timeout_at(deadline, rx).await {
                    Err(_) => Err("timed out".into()),
                    Ok(Err(_)) | Ok(Ok(Err(_))) => Err("connection lost".into()),
                    Ok(Ok(Ok(f))) if f.header.kind == MsgKind::Ok => Ok(()),
                    Ok(Ok(Ok(f))) => {
                        let body = ErrorBody::decode(&f.payload);
                        if matches!(
                            body,
                            Some(ErrorBody {
                                code: ErrorCode::StaleEpoch,
                                ..
                            })
                        ) {
                            // A replica knows a newer epoch: this server has been deposed.
                            self.step_down("a secondary answered with a newer epoch");
                            return Err(Fail::stale((f.header.generation, f.header.epoch)));
                        }
                        Err(format!("peer error {body:?}"))
                    }
                },
            };
            if let Err(why) = outcome {
                tracing::warn!(volume = %self.name, peer = %p.server_id, why, "replication failed");
                self.peer_failed(&p, off, len, all, epoch).await?;
            }
        }
        Ok(())
    }

    /// A peer missed the range: mark it in the bitmap, and if it was in sync, mark it out of
    /// sync at the authority. Only when both hold may the caller acknowledge.
    async fn peer_failed(
        &self,
        p: &Arc<Peer>,
        off: u64,
        len: u64,
        all: bool,
        epoch: u64,
    ) -> Result<(), Fail> {
        p.failures.fetch_add(1, Ordering::Relaxed);
        if len > 0 || all {
            p.mark(off, len, all).await?;
        }
        let _g = p.degrade_lock.lock().await;
        match p.state() {
            PeerState::OutOfSync => Ok(()),
            PeerState::CatchingUp => {
                p.set_state(PeerState::OutOfSync);
                p.drop_link();
                Ok(())
            }
            PeerState::InSync => {
                let cfg = &self.ctx.config;
                match self
                    .ctx
                    .authority
                    .volume_set_in_sync(&cfg.site, self.name.as_str(), &p.server_id, false, epoch)
                    .await
                {
                    Ok(_) => {
                        p.set_state(PeerState::OutOfSync);
                        p.authority_in_sync.store(false, Ordering::SeqCst);
                        p.drop_link();
                        self.stats.degraded_events.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(volume = %self.name, peer = %p.server_id, "degraded: peer out of sync");
                        Ok(())
                    }
                    Err(AuthorityError::StaleEpoch { epoch, generation }) => {
                        self.step_down("authority refused set_in_sync: stale epoch");
                        Err(Fail::stale((generation, epoch)))
                    }
                    Err(e) => Err(Fail::new(
                        ErrorCode::ReplicationFailed,
                        format!(
                            "peer {} failed and could not be marked out of sync: {e}",
                            p.server_id
                        ),
                    )),
                }
            }
        }
    }

    pub async fn client_read(&self, h: &Header) -> Result<Vec<u8>, Fail> {
        let (_, e) = self.check_primary(h)?;
        let (off, len) = (h.offset, h.length);
        let r = store_op(&self.replica, false, move |rep| rep.read_at(off, len))
            .await
            .map_err(store_fail);
        if r.is_ok() && !self.lease.valid(e) {
            return Err(Fail::new(ErrorCode::LeaseExpired, "lease ran out"));
        }
        match &r {
            Ok(_) => {
                self.stats.reads.fetch_add(1, Ordering::Relaxed);
                self.mark_ok();
            }
            Err(_) => {
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        r
    }

    /// FLUSH: every write acknowledged before it is durable on this server and on every
    /// in-sync secondary when it completes.
    pub async fn client_flush(self: &Arc<Self>, h: &Header) -> Result<(), Fail> {
        let (g, e) = self.check_primary(h)?;
        let mut sends = Vec::new();
        let mut trailing = Vec::new();
        let mut ticket = {
            let mut sq = self.seq.lock().await;
            let seq = self.next_seq(&mut sq).await?;
            let t = self
                .overlap
                .register(seq, 0, 0, true)
                .map_err(|err| Fail::new(ErrorCode::Invalid, err.to_string()))?;
            let mut rh =
                self.replicate_header(self.commit_point(&sq), seq, ReplicaOp::Flush, 0, g, e);
            for p in self.peers() {
                let st = p.state();
                if st == PeerState::OutOfSync {
                    continue;
                }
                let rx = p.link().and_then(|l| {
                    rh.request_id = l.next_request_id();
                    l.send(&rh, &[]).ok()
                });
                if st == PeerState::CatchingUp {
                    trailing.push((p, rx));
                } else {
                    sends.push((p, rx));
                }
            }
            t
        };
        ticket.ready().await;
        let rep = self.replica.clone();
        let local = tokio::task::spawn_blocking(move || rep.sync())
            .await
            .expect("store task");
        drop(ticket);
        // A peer that failed a flush may have lost any write since its last flush: all dirty.
        self.trail_peers(trailing, 0, 0, true, e);
        self.await_peers(sends, 0, 0, true, e).await?;
        local.map_err(store_fail)?;
        if !self.lease.valid(e) {
            return Err(Fail::new(ErrorCode::LeaseExpired, "lease ran out"));
        }
        self.stats.flushes.fetch_add(1, Ordering::Relaxed);
        self.mark_ok();
        Ok(())
    }

    // ---- secondary -------------------------------------------------------------------

    /// Admits a replicated operation, in arrival order (called from the connection reader,
    /// before the next frame is read): fencing, learning a newer epoch, and registration in
    /// the overlap queue, which fixes its order among overlapping operations.
    pub fn secondary_admit(&self, h: &Header) -> Result<Ticket, Fail> {
        let op = ReplicaOp::from_flags(h.flags)
            .ok_or_else(|| Fail::new(ErrorCode::Invalid, "replicate without a known op"))?;
        let theirs = (h.generation, h.epoch);
        let known = self.fence();
        let primary_of = match self.role() {
            Role::Primary { epoch, generation } => Some((generation, epoch)),
            Role::Secondary { .. } => None,
        };
        let step = fence_step(known, theirs, primary_of);
        match step {
            FenceStep::Reject => return Err(Fail::stale(known)),
            FenceStep::SamePrimary => {
                return Err(Fail::new(
                    ErrorCode::Invalid,
                    "this server is the primary of that epoch",
                ))
            }
            FenceStep::StepDownAndFollow => self.step_down("replicated write from a newer epoch"),
            FenceStep::Apply | FenceStep::Follow => {}
        }
        if matches!(step, FenceStep::Follow | FenceStep::StepDownAndFollow) {
            blocking(|| {
                self.replica.update_meta(|m| {
                    m.generation = h.generation;
                    m.epoch = h.epoch;
                    m.followed_epoch = h.epoch;
                })
            })
            .map_err(store_fail)?;
            tracing::info!(volume = %self.name, epoch = h.epoch, "following a newer primary");
        }
        self.overlap.follow_stream(theirs);
        if op != ReplicaOp::Flush {
            self.replica
                .check_range(h.offset, h.length as u64)
                .map_err(store_fail)?;
        }
        let ticket = self
            .overlap
            .register(h.seq, h.offset, h.length as u64, op == ReplicaOp::Flush)
            .map_err(|e| Fail::new(ErrorCode::Invalid, e.to_string()))?;
        let len = if op == ReplicaOp::Flush {
            0
        } else {
            h.length as u64
        };
        // Recorded at admission, not after the apply: a write this replica then fails to
        // apply differs from the replicas that did apply it.
        self.unsettled
            .lock()
            .expect("unsettled")
            .admit(theirs, h.seq, h.commit, h.offset, len);
        Ok(ticket)
    }

    pub async fn secondary_apply(
        &self,
        h: &Header,
        payload: Vec<u8>,
        mut ticket: Ticket,
    ) -> Result<(), Fail> {
        let op = ReplicaOp::from_flags(h.flags)
            .ok_or_else(|| Fail::new(ErrorCode::Invalid, "replicate without a known op"))?;
        if op == ReplicaOp::Write && payload.len() as u64 != h.length as u64 {
            return Err(Fail::new(
                ErrorCode::Invalid,
                "replicated write: payload length differs from header length",
            ));
        }
        ticket.ready().await;
        let (off, len, fua) = (h.offset, h.length as u64, h.flags & FLAG_FUA != 0);
        let copy = h.flags & FLAG_CATCH_UP != 0;
        let r = if copy && op == ReplicaOp::Write {
            // A copy runs on the blocking pool: its write, the start of its write-back, then
            // (with the ticket released: later overlapping writes need not wait for the disk)
            // the wait for that write-back and the drop of its pages. The primary keeps
            // `CATCH_UP_WINDOW` copies in flight, but writes to one file take its inode lock
            // in turn: with all 16 writing at once a tmpfs rebuild spent ~20% of the machine
            // spinning on it (`rwsem_spin_on_owner`), so they take `copy_write` instead and
            // only their waits for the disk overlap.
            let (rep, lock) = (self.replica.clone(), self.copy_write.clone());
            tokio::task::spawn_blocking(move || {
                {
                    let _w = lock.lock().expect("copy write lock");
                    rep.write_at(off, &payload)?;
                    // Measured on ext4: without this a 1 GiB rebuild wrote it all into the
                    // page cache first and then waited for the disk in the closing flush.
                    rep.start_writeback(off, len)?;
                }
                drop(ticket);
                rep.finish_writeback_and_drop(off, len)?;
                if fua {
                    rep.sync()?;
                }
                Ok::<_, StoreError>(())
            })
            .await
            .expect("store task")
        } else {
            let may_block = fua || op != ReplicaOp::Write;
            let r = store_op(&self.replica, may_block, move |rep| {
                match op {
                    ReplicaOp::Write => rep.write_at(off, &payload)?,
                    ReplicaOp::WriteZeroes | ReplicaOp::Discard => rep.punch_zeroes(off, len)?,
                    ReplicaOp::Flush => rep.sync()?,
                }
                if fua {
                    rep.sync()?;
                }
                Ok::<_, StoreError>(())
            })
            .await;
            drop(ticket);
            r
        };
        match &r {
            Ok(()) => {
                self.stats
                    .replicated_applied
                    .fetch_add(1, Ordering::Relaxed);
                if h.flags & FLAG_CATCH_UP == 0 {
                    self.mark_ok();
                }
            }
            Err(_) => {
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        r.map_err(store_fail)
    }

    /// A primary's catch-up control frame (BEGIN / DONE).
    pub async fn secondary_catch_up(&self, h: &Header) -> Result<Vec<u8>, Fail> {
        let theirs = (h.generation, h.epoch);
        let known = self.fence();
        if theirs < known {
            return Err(Fail::stale(known));
        }
        if let Role::Primary { epoch, generation } = self.role() {
            if theirs > (generation, epoch) {
                // A primary of a newer epoch is catching this one up: it was deposed.
                self.step_down("catch-up from a newer epoch");
            } else {
                return Err(Fail::new(ErrorCode::Invalid, "catch-up sent to a primary"));
            }
        }
        let size = self.replica.size_bytes();
        let meta = self.replica.meta();
        let both_new = h.flags == CATCH_UP_CONNECT_NEW && meta.is_pristine();
        match h.flags {
            CATCH_UP_BEGIN | CATCH_UP_DONE | CATCH_UP_CONNECT | CATCH_UP_CONNECT_NEW
            | CATCH_UP_RECONCILED => {}
            other => {
                return Err(Fail::new(
                    ErrorCode::Invalid,
                    format!("unknown catch-up step {other}"),
                ))
            }
        }
        match h.flags {
            CATCH_UP_CONNECT | CATCH_UP_CONNECT_NEW if !meta.synced && !both_new => {
                return Err(Fail::new(
                    ErrorCode::NotInSync,
                    "this replica is not synced (new, after a reboot, or part-way through a \
                     rebuild): it needs a full copy",
                ))
            }
            CATCH_UP_RECONCILED => {
                self.unsettled.lock().expect("unsettled").reconciled();
                return Ok(Vec::new());
            }
            _ => {}
        }
        // A primary that has not resynced an earlier primary's unsettled regions of this
        // replica may lack them in its bitmap: only a full copy is safe then. (A catch-up of
        // this epoch that was under way already made that choice, so it may resume.)
        let unreconciled = self
            .unsettled
            .lock()
            .expect("unsettled")
            .unreconciled_for(theirs);
        let rep = self.replica.clone();
        let flags = h.flags;
        let (g, e) = theirs;
        let r = tokio::task::spawn_blocking(move || {
            let before = rep.meta();
            match flags {
                CATCH_UP_BEGIN => {
                    let resumable = (!unreconciled && before.synced && before.followed_epoch == e)
                        || before.partial_epoch == e;
                    rep.update_meta(|m| {
                        m.synced = false;
                        m.partial_epoch = e;
                        m.generation = g;
                        m.epoch = e;
                    })?;
                    Ok(serde_json::to_vec(&PeerHello {
                        resumable,
                        synced: before.synced,
                        followed_epoch: before.followed_epoch,
                        epoch: before.epoch,
                        generation: before.generation,
                    })
                    .expect("hello serializes"))
                }
                CATCH_UP_DONE => {
                    // Everything copied must be durable before this replica calls itself synced.
                    rep.sync()?;
                    rep.update_meta(|m| {
                        m.synced = true;
                        m.partial_epoch = 0;
                        m.followed_epoch = e;
                        m.generation = g;
                        m.epoch = e;
                    })?;
                    Ok(Vec::new())
                }
                CATCH_UP_CONNECT | CATCH_UP_CONNECT_NEW => {
                    // Synced already, or all zeroes like the primary (checked above); what
                    // it applied becomes durable before it records that it follows the new
                    // epoch.
                    rep.sync()?;
                    rep.update_meta(|m| {
                        m.synced = true;
                        m.followed_epoch = e;
                        m.generation = g;
                        m.epoch = e;
                    })?;
                    Ok(Vec::new())
                }
                _ => Ok(Vec::new()),
            }
        })
        .await
        .expect("store task")
        .map_err(store_fail)?;
        match flags {
            // The epoch is persisted: no frame of an older primary is admitted after this, so
            // the report misses none of them.
            CATCH_UP_CONNECT | CATCH_UP_CONNECT_NEW => {
                let log = self.unsettled.lock().expect("unsettled");
                Ok(serde_json::to_vec(&ConnectReport {
                    unsettled: log.ranges(size),
                    unknown_epoch: log.unknown(),
                })
                .expect("report serializes"))
            }
            // A finished catch-up copied everything the primary knew this replica lacked;
            // with unsettled regions left that was a full copy (BEGIN above).
            CATCH_UP_DONE => {
                self.unsettled.lock().expect("unsettled").caught_up();
                Ok(r)
            }
            _ => Ok(r),
        }
    }

    // ---- takeover ----------------------------------------------------------------------

    /// A client cannot reach the primary and asks this server to take over. It does so only
    /// if it is in sync and the primary, asked over this server's own network path, does not
    /// answer with a valid lease: one client's broken link must not depose a good primary.
    /// On success the authority has designated a new primary (normally this server, which
    /// then takes the lease once the old one has run out).
    pub async fn takeover(&self, reason: &str) -> Result<Vec<u8>, Fail> {
        let cfg = &self.ctx.config;
        let me = cfg.server_id.as_str();
        if matches!(self.role(), Role::Primary { .. }) {
            return Ok(serde_json::to_vec(
                &serde_json::json!({"primary": me, "epoch": self.fence().1}),
            )
            .expect("json"));
        }
        let info = self
            .ctx
            .authority
            .volume_get(&cfg.site, self.name.as_str())
            .await
            .map_err(|e| Fail::new(ErrorCode::NotReady, format!("authority: {e}")))?;
        if info.primary.as_deref() == Some(me) {
            return Ok(serde_json::to_vec(
                &serde_json::json!({"primary": me, "epoch": info.epoch}),
            )
            .expect("json"));
        }
        if !info.server(me).is_some_and(|s| s.in_sync) {
            return Err(Fail::new(
                ErrorCode::NotInSync,
                "this replica is not in sync; it cannot take over",
            ));
        }
        if let Some(p) = info.primary_entry() {
            let key = cfg.peer_key.as_ref();
            if primary_is_healthy(&p.data_addr, &self.name, cfg.replicate_timeout, key).await {
                return Err(Fail::new(
                    ErrorCode::PrimaryHealthy,
                    format!("primary {} answers with a valid lease", p.server_id),
                ));
            }
        }
        tracing::warn!(volume = %self.name, reason, "primary unhealthy; requesting failover");
        let out = self
            .ctx
            .authority
            .failover_request(
                &cfg.site,
                self.name.as_str(),
                &format!("takeover asked by a client: {reason}"),
                false,
            )
            .await
            .map_err(|e| Fail::new(ErrorCode::NotReady, format!("failover_request: {e}")))?;
        Ok(serde_json::to_vec(&out).expect("json"))
    }

    // ---- primary: keeping peers whole ---------------------------------------------------

    async fn peer_keeper(self: Arc<Self>, p: Arc<Peer>, epoch: u64) {
        let retry = self.ctx.config.peer_retry;
        loop {
            if !self.is_primary_at(epoch) {
                return;
            }
            match p.state() {
                PeerState::OutOfSync => {
                    if let Err(e) = self.catch_up(&p, epoch).await {
                        tracing::info!(volume = %self.name, peer = %p.server_id, error = %e.message, "catch-up not finished");
                        let _g = p.degrade_lock.lock().await;
                        if p.state() == PeerState::CatchingUp {
                            p.set_state(PeerState::OutOfSync);
                        }
                        if p.state() == PeerState::OutOfSync {
                            p.drop_link();
                        }
                    }
                }
                PeerState::InSync => {
                    let closed = p.link().map(|l| l.is_closed()).unwrap_or(true);
                    if closed {
                        let _ = self.peer_failed(&p, 0, 0, false, epoch).await;
                    } else if !p.authority_in_sync.load(Ordering::SeqCst) {
                        self.tell_in_sync(&p, epoch).await;
                    }
                }
                PeerState::CatchingUp => {}
            }
            tokio::time::sleep(retry).await;
        }
    }

    /// The copies still in flight when a catch-up stops: their bits were cleared when they
    /// were sent, so they are marked again (durably) before the peer is retried.
    async fn copies_lost(
        &self,
        p: &Peer,
        window: &std::collections::VecDeque<(u64, u64, CopyAnswer)>,
    ) -> Result<(), Fail> {
        for (off, len, _) in window {
            p.mark(*off, *len, false).await?;
        }
        Ok(())
    }

    async fn tell_in_sync(&self, p: &Peer, epoch: u64) {
        let cfg = &self.ctx.config;
        match self
            .ctx
            .authority
            .volume_set_in_sync(&cfg.site, self.name.as_str(), &p.server_id, true, epoch)
            .await
        {
            Ok(_) => {
                p.authority_in_sync.store(true, Ordering::SeqCst);
                tracing::info!(volume = %self.name, peer = %p.server_id, "peer back in sync");
            }
            Err(e) => {
                tracing::warn!(volume = %self.name, peer = %p.server_id, error = %e, "set_in_sync(true) refused; will retry")
            }
        }
    }

    /// Brings an out-of-sync peer back: from the bitmap if it followed this epoch and was
    /// synced, else by a full copy. Runs under live writes; see docs/replication.md for why a
    /// copy never overwrites a newer write.
    async fn catch_up(&self, p: &Arc<Peer>, epoch: u64) -> Result<(), Fail> {
        let cfg = &self.ctx.config;
        let link = Arc::new(self.connect_peer(p).await?);
        let h = self.catch_up_header(CATCH_UP_BEGIN, &link, epoch);
        let f = link
            .call(&h, &[], cfg.replicate_timeout)
            .await
            .map_err(|e| Fail::new(ErrorCode::ReplicationFailed, e.to_string()))?;
        if f.header.kind == MsgKind::Error {
            if let Some(ErrorBody {
                code: ErrorCode::StaleEpoch,
                ..
            }) = ErrorBody::decode(&f.payload)
            {
                self.step_down("peer knows a newer epoch");
            }
            return Err(Fail::new(
                ErrorCode::ReplicationFailed,
                "peer refused catch-up",
            ));
        }
        let hello: PeerHello = serde_json::from_slice(&f.payload)
            .map_err(|e| Fail::new(ErrorCode::ReplicationFailed, format!("bad hello: {e}")))?;
        let incremental = hello.resumable;
        if !incremental {
            p.mark(0, 0, true).await?;
        }
        p.full_rebuild.store(!incremental, Ordering::Relaxed);
        let total = p.dirty_regions();
        p.copy_total.store(total, Ordering::Relaxed);
        p.copy_done.store(0, Ordering::Relaxed);
        tracing::info!(volume = %self.name, peer = %p.server_id, incremental, regions = total, "catch-up started");
        {
            let _sq = self.seq.lock().await;
            *p.link.lock().expect("peer link") = Some(link.clone());
            p.set_state(PeerState::CatchingUp);
        }
        let region_size = cfg.region_size;
        let size = self.replica.size_bytes();
        let mut cursor = 0;
        let mut since_persist = 0;
        // Copies in flight, oldest first: up to `CATCH_UP_WINDOW` regions are on the wire at
        // once, so the copy is not one round trip per region (measured: ~200 MB/s serial).
        // Each is sequenced like a write, so the window changes nothing about ordering.
        let mut window: std::collections::VecDeque<(u64, u64, CopyAnswer)> =
            std::collections::VecDeque::new();
        loop {
            if !self.is_primary_at(epoch) {
                return Err(Fail::new(ErrorCode::LeaseExpired, "no longer primary"));
            }
            if p.state() != PeerState::CatchingUp {
                self.copies_lost(p, &window).await?;
                return Err(Fail::new(
                    ErrorCode::ReplicationFailed,
                    "a live write to the peer failed",
                ));
            }
            let next = if window.len() < CATCH_UP_WINDOW {
                let bm = p.bitmap.lock().expect("bitmap");
                bm.next_dirty(cursor).or_else(|| bm.next_dirty(0))
            } else {
                None
            };
            // A region whose copy is still in flight has its bit cleared, so it is not found
            // again unless a live write failed to reach the peer since (then it must go again,
            // after the copy in flight: it is sequenced after it).
            if let Some(region) = next {
                let off = region * region_size;
                let len = region_size.min(size - off);
                // Under the sequencer lock only the copy's place: its seq, its overlap
                // ticket and its slot in the link's frame order. The region is read after
                // the lock is released (reading it under the lock held every new write of
                // the volume for one region read, ~1 MiB, per copy); only this peer's later
                // frames wait for the slot, and only overlapping writes for the ticket.
                let placed = {
                    let mut sq = self.seq.lock().await;
                    let seq = self.next_seq(&mut sq).await?;
                    let t = self
                        .overlap
                        .register(seq, off, len, false)
                        .map_err(|e| Fail::new(ErrorCode::Invalid, e.to_string()))?;
                    p.bitmap.lock().expect("bitmap").clear_region(region);
                    let (g, _) = self.fence();
                    let mut rh = self.replicate_header(
                        self.commit_point(&sq),
                        seq,
                        ReplicaOp::Write,
                        FLAG_CATCH_UP,
                        g,
                        epoch,
                    );
                    rh.offset = off;
                    rh.length = len as u32;
                    rh.request_id = link.next_request_id();
                    link.reserve(rh.request_id)
                        .map(|(slot, rx)| (rh, t, slot, rx))
                };
                let rx = match placed {
                    Ok((rh, mut t, slot, rx)) => {
                        // Reading after every earlier overlapping write and before any later
                        // one (they wait for this ticket) is what orders the copy in the
                        // stream.
                        t.ready().await;
                        let data = store_op(&self.replica, false, move |rep| {
                            rep.read_at(off, len as u32)
                        })
                        .await;
                        drop(t);
                        // A failed read drops the slot, which closes the link: the frames
                        // behind it cannot leave in order.
                        let data = data.map_err(store_fail)?;
                        slot.fill(&rh, &data).map(|()| rx).map_err(|_| ())
                    }
                    Err(_) => Err(()),
                };
                match rx {
                    Ok(rx) => window.push_back((off, len, rx)),
                    Err(_) => {
                        self.copies_lost(p, &window).await?;
                        self.peer_failed(p, off, len, false, epoch).await?;
                        return Err(Fail::new(
                            ErrorCode::ReplicationFailed,
                            "region copy failed",
                        ));
                    }
                }
                cursor = region + 1;
                if cfg.rebuild_rate_bytes > 0 {
                    let secs = len as f64 / cfg.rebuild_rate_bytes as f64;
                    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
                }
                continue;
            }
            // The window is full, or no dirty region is left: wait for the oldest copy.
            let Some((off, len, rx)) = window.pop_front() else {
                break;
            };
            let ok = matches!(
                tokio::time::timeout(cfg.replicate_timeout, rx).await,
                Ok(Ok(Ok(ref f))) if f.header.kind == MsgKind::Ok
            );
            if !ok {
                self.copies_lost(p, &window).await?;
                self.peer_failed(p, off, len, false, epoch).await?;
                return Err(Fail::new(
                    ErrorCode::ReplicationFailed,
                    "region copy failed",
                ));
            }
            self.stats.copies_sent.fetch_add(1, Ordering::Relaxed);
            p.copy_done.fetch_add(1, Ordering::Relaxed);
            since_persist += 1;
            if since_persist >= 64 {
                p.persist_bitmap().await;
                since_persist = 0;
            }
        }
        // A flush while the peer is still catching up (live writes do not wait for it):
        // writing back everything copied can take far longer than `replicate_timeout`
        // (seconds after a large rebuild), and the barrier below, which live writes do wait
        // behind, must not be the one that pays for it — a slow barrier would send the peer
        // back out of sync, all dirty, again and again.
        let rx = {
            let mut sq = self.seq.lock().await;
            let seq = self.next_seq(&mut sq).await?;
            let mut rh = self.replicate_header(
                self.commit_point(&sq),
                seq,
                ReplicaOp::Flush,
                0,
                self.fence().0,
                epoch,
            );
            rh.request_id = link.next_request_id();
            link.send(&rh, &[])
        };
        let flush_timeout = cfg.replicate_timeout.max(CATCH_UP_FLUSH_TIMEOUT);
        let flushed = match rx {
            Ok(rx) => matches!(
                tokio::time::timeout(flush_timeout, rx).await,
                Ok(Ok(Ok(ref f))) if f.header.kind == MsgKind::Ok
            ),
            Err(_) => false,
        };
        if !flushed || p.state() != PeerState::CatchingUp {
            self.peer_failed(p, 0, 0, true, epoch).await?;
            return Err(Fail::new(ErrorCode::ReplicationFailed, "pre-flush failed"));
        }
        // From the barrier's seq on, every write waits for this peer; the barrier's answer
        // proves it applied (durably) everything before.
        let rx = {
            let mut sq = self.seq.lock().await;
            let seq = self.next_seq(&mut sq).await?;
            if p.state() != PeerState::CatchingUp {
                return Err(Fail::new(
                    ErrorCode::ReplicationFailed,
                    "peer failed at the end",
                ));
            }
            p.set_state(PeerState::InSync);
            let mut rh = self.replicate_header(
                self.commit_point(&sq),
                seq,
                ReplicaOp::Flush,
                0,
                self.fence().0,
                epoch,
            );
            rh.request_id = link.next_request_id();
            link.send(&rh, &[])
        };
        let barrier_ok = match rx {
            Ok(rx) => matches!(
                tokio::time::timeout(cfg.replicate_timeout, rx).await,
                Ok(Ok(Ok(ref f))) if f.header.kind == MsgKind::Ok
            ),
            Err(_) => false,
        };
        if !barrier_ok {
            self.peer_failed(p, 0, 0, true, epoch).await?;
            return Err(Fail::new(ErrorCode::ReplicationFailed, "barrier failed"));
        }
        let h = self.catch_up_header(CATCH_UP_DONE, &link, epoch);
        match link.call(&h, &[], cfg.replicate_timeout).await {
            Ok(f) if f.header.kind == MsgKind::Ok => {}
            _ => {
                self.peer_failed(p, 0, 0, true, epoch).await?;
                return Err(Fail::new(ErrorCode::ReplicationFailed, "DONE failed"));
            }
        }
        p.persist_bitmap().await;
        tracing::info!(volume = %self.name, peer = %p.server_id, "catch-up complete");
        self.tell_in_sync(p, epoch).await;
        Ok(())
    }
}

/// What a replica does with a replicated frame stamped `theirs`, knowing `known` (and, if it
/// is a primary itself, the pair it is primary of).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FenceStep {
    /// Older than what this replica knows: refuse with the newer pair.
    Reject,
    /// This replica is the primary of that very pair: two primaries in one epoch never exist,
    /// so the frame is invalid.
    SamePrimary,
    /// Same pair as known: apply.
    Apply,
    /// Newer: learn it (durably), then apply.
    Follow,
    /// Newer than the epoch this replica is primary of: it was deposed.
    StepDownAndFollow,
}

pub fn fence_step(
    known: (u64, u64),
    theirs: (u64, u64),
    primary_of: Option<(u64, u64)>,
) -> FenceStep {
    if theirs < known {
        return FenceStep::Reject;
    }
    match primary_of {
        Some(mine) if theirs <= mine => FenceStep::SamePrimary,
        Some(_) => FenceStep::StepDownAndFollow,
        None if theirs > known => FenceStep::Follow,
        None => FenceStep::Apply,
    }
}

/// Runs one data-file operation. A positioned read or write that lands in the page cache
/// takes microseconds, less than handing it to tokio's blocking pool and back (two thread
/// wake-ups per request: the largest cost in the server's profile, see
/// docs/replication-performance.md), so it runs right here. What may block for long goes to
/// the blocking pool: an fdatasync, a hole punch (`may_block`), and every operation while a
/// fault is injected (an injected stall must not hold a runtime thread).
async fn store_op<T: Send + 'static>(
    rep: &Arc<VolumeReplica>,
    may_block: bool,
    f: impl FnOnce(&VolumeReplica) -> T + Send + 'static,
) -> T {
    if !may_block && !rep.faults.any() {
        return f(rep);
    }
    let rep = rep.clone();
    tokio::task::spawn_blocking(move || f(&rep))
        .await
        .expect("store task")
}

/// Persists a change to the replica's metadata (write, fsync, rename) on the blocking pool.
/// The server's runtime is single-threaded by default: an fsync inline would stall every
/// connection and the lease renewals with it, and on ext4 under write-back one can take
/// seconds, longer than the lease's margin.
async fn meta_update(
    rep: &Arc<VolumeReplica>,
    f: impl FnOnce(&mut crate::store::VolumeMeta) + Send + 'static,
) -> Result<crate::store::VolumeMeta, StoreError> {
    let rep = rep.clone();
    tokio::task::spawn_blocking(move || rep.update_meta(f))
        .await
        .expect("metadata task")
}

/// Runs a short blocking store call from synchronous code on a runtime thread: in place on a
/// multi-threaded runtime (other tasks move to another thread), inline on a single-threaded
/// one. Only for rare calls where the caller cannot wait (a secondary following a new epoch
/// while it admits a frame, in arrival order).
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

/// Clears `regions` in a bitmap and persists it, off the async threads (it fdatasyncs).
async fn clear_regions(
    bm: &Arc<Mutex<DirtyBitmap>>,
    regions: impl IntoIterator<Item = u64> + Send + 'static,
) -> std::io::Result<()> {
    bitmap_op(bm, move |b| {
        for r in regions {
            b.clear_region(r);
        }
        b.persist_all()
    })
    .await
}

/// Runs `f` on a bitmap off the async threads (its persisting fdatasyncs).
async fn bitmap_op<T: Send + 'static>(
    bm: &Arc<Mutex<DirtyBitmap>>,
    f: impl FnOnce(&mut DirtyBitmap) -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    let bm = bm.clone();
    tokio::task::spawn_blocking(move || f(&mut bm.lock().expect("bitmap")))
        .await
        .expect("bitmap task")
}

/// A write counted in `active_writes` from its activity mark until it is answered.
struct ActiveWrite {
    map: Arc<Mutex<std::collections::HashMap<u64, u32>>>,
    regions: std::ops::Range<u64>,
}

impl ActiveWrite {
    fn enter(
        map: &Arc<Mutex<std::collections::HashMap<u64, u32>>>,
        off: u64,
        len: u64,
        region_size: u64,
    ) -> Self {
        let regions = off / region_size..(off + len.max(1) - 1) / region_size + 1;
        let mut m = map.lock().expect("active writes");
        for r in regions.clone() {
            *m.entry(r).or_insert(0) += 1;
        }
        Self {
            map: map.clone(),
            regions,
        }
    }
}

impl Drop for ActiveWrite {
    fn drop(&mut self) {
        let mut m = self.map.lock().expect("active writes");
        for r in self.regions.clone() {
            if let Some(n) = m.get_mut(&r) {
                *n -= 1;
                if *n == 0 {
                    m.remove(&r);
                }
            }
        }
    }
}

/// Asks the server at `addr` for its health and says whether it is the leased primary of
/// `volume` with its I/O progressing. Any failure to answer in time counts as unhealthy.
async fn primary_is_healthy(
    addr: &str,
    volume: &VolumeName,
    timeout: Duration,
    key: Option<&PeerKey>,
) -> bool {
    if addr.is_empty() {
        return false;
    }
    let Ok(link) = PeerLink::connect(addr, timeout, key, None).await else {
        return false;
    };
    let h = Header::new(MsgKind::Health, link.next_request_id(), VolumeName::none());
    let Ok(f) = link.call(&h, &[], timeout).await else {
        return false;
    };
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(&f.payload) else {
        return false;
    };
    v["volumes"].as_array().is_some_and(|vols| {
        vols.iter().any(|x| {
            x["volume"] == volume.as_str()
                && x["role"] == "primary"
                && x["lease_valid"] == true
                && x["io_stalled"] != true
        })
    })
}

/// A peer's answer as a result; an error keeps the peer's code (a caller acts on some, e.g.
/// `NotInSync`), or is `ReplicationFailed` when the answer says none.
fn expect_ok(f: Frame) -> Result<(), Fail> {
    if f.header.kind == MsgKind::Ok {
        return Ok(());
    }
    let body = ErrorBody::decode(&f.payload);
    let code = body
        .as_ref()
        .map_or(ErrorCode::ReplicationFailed, |b| b.code);
    Err(Fail::new(code, format!("peer answered {body:?}")))
}

/// How long a lease of `lease_ms` may be acted on, counted from when it was requested.
fn lease_usable(lease_ms: u64, drift_margin_ms: u64) -> Duration {
    Duration::from_millis(lease_ms.saturating_sub(drift_margin_ms.max(lease_ms / 10)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pair() -> impl Strategy<Value = (u64, u64)> {
        (0u64..4, 0u64..6)
    }

    proptest! {
        /// A replica fed any sequence of stamped frames never goes back to an older pair and
        /// never applies a frame older than what it knew when the frame arrived.
        #[test]
        fn fencing_never_goes_back(frames in prop::collection::vec(pair(), 1..50)) {
            let mut known = (0u64, 0u64);
            for theirs in frames {
                match fence_step(known, theirs, None) {
                    FenceStep::Reject => prop_assert!(theirs < known),
                    FenceStep::Apply => prop_assert_eq!(theirs, known),
                    FenceStep::Follow => {
                        prop_assert!(theirs > known);
                        known = theirs;
                    }
                    s => prop_assert!(false, "secondary got {:?}", s),
                }
            }
        }

        /// A primary steps down exactly for frames newer than its own epoch and rejects the
        /// rest; it never applies a replicated write while primary.
        #[test]
        fn a_primary_applies_nothing_replicated(mine in pair(), theirs in pair()) {
            match fence_step(mine, theirs, Some(mine)) {
                FenceStep::StepDownAndFollow => prop_assert!(theirs > mine),
                FenceStep::Reject | FenceStep::SamePrimary => prop_assert!(theirs <= mine),
                s => prop_assert!(false, "primary got {:?}", s),
            }
        }
    }
}
