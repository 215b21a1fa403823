//! Queue workers: the threads that serve virtqueues.
//!
//! A worker owns its running queues outright: the virtio ring state, the
//! request slots and the bdev channel of each. The session thread hands a
//! queue over with [`WorkerCmd::Start`] and takes it back with
//! [`WorkerCmd::Stop`]; in between no other thread touches it, so the hot
//! path (pop a chain, parse, submit, reap, push used, notify) takes no lock
//! and allocates nothing: slots and their iovec arrays are sized when the
//! queue starts.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam::channel::{Receiver, Sender};
use tracing::{debug, error, warn};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryLoadGuard};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::used_ring::{UsedRing, UsedRingError};
use super::PollMode;
use crate::bdev::{BdevIo, Completion, IoChannel, IoCounters, IoError, IoOp, SubmitError};
use crate::blk::config::DeviceGeometry;
use crate::blk::request::{parse_request, Action, GuestMem, Status, MAX_IOVS};
use crate::cpumask::CpuSet;

/// Guest memory shared between the session thread (which replaces it on
/// SET_MEM_TABLE / ADD_MEM_REG) and the workers (which load it lock-free).
pub type Mem = GuestMemoryAtomic<GuestMem>;

/// One load of [`Mem`]: a worker takes one per queue per pass and hands it to
/// every step of the pass (an arc-swap load per step showed up at ~10% of a
/// polled core).
type MemGuard = GuestMemoryLoadGuard<GuestMem>;

/// How long an adaptive worker polls without finding work before it arms
/// notifications and sleeps. Long enough to bridge the gap between requests
/// of a busy guest at QD1, short enough that an idle disk costs no core.
pub const ADAPTIVE_IDLE: Duration = Duration::from_micros(200);

/// Passes between looks at the command channel while the queues are busy
/// (an idle worker looks on every pass). Commands are rare (queue start/stop);
/// a few microseconds of delay costs nothing, a channel poll per pass does.
const COMMAND_CHECK_PASSES: u32 = 64;

/// Longest single sleep: a kick-less queue (frontend sent no kick fd) is
/// still looked at this often.
const MAX_SLEEP_MS: i32 = 100;

/// State of the device that every queue of a controller shares.
#[derive(Debug)]
pub struct DeviceShared {
    pub geometry: DeviceGeometry,
    /// GET_ID answer: the bdev's serial, NUL-padded to 20 bytes.
    pub serial: [u8; 20],
    /// Guest-visible cache mode (CONFIG_WCE); false = write-through, so every
    /// write is issued with FUA.
    pub writeback: AtomicBool,
    /// Requests refused because the guest sent something malformed.
    pub bad_requests: AtomicU64,
}

/// A started virtqueue, as handed to a worker.
pub struct QueueStart {
    pub index: u16,
    pub queue: Queue,
    pub mem: Mem,
    pub kick: Option<File>,
    pub call: Option<File>,
    pub channel: Box<dyn IoChannel>,
    pub counters: Arc<IoCounters>,
}

/// The ring position a stopped queue resumes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueStopped {
    pub next_avail: u16,
}

pub enum WorkerCmd {
    Start(Box<QueueStart>),
    /// Stop taking requests, finish those in flight, then reply.
    Stop {
        index: u16,
        reply: Sender<QueueStopped>,
    },
    SetCall {
        index: u16,
        call: Option<File>,
    },
    Shutdown,
}

/// The control side of a worker thread.
pub struct WorkerHandle {
    cmds: Sender<WorkerCmd>,
    wake: EventFd,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl WorkerHandle {
    pub fn spawn(
        name: String,
        cpu: Option<usize>,
        mode: PollMode,
        shared: Arc<DeviceShared>,
    ) -> std::io::Result<Self> {
        let (tx, rx) = crossbeam::channel::unbounded();
        let wake = EventFd::new(libc::EFD_NONBLOCK)?;
        let wake2 = wake.try_clone()?;
        let thread = std::thread::Builder::new().name(name).spawn(move || {
            if let Some(cpu) = cpu {
                if let Err(e) = CpuSet::pin_current_thread(cpu) {
                    warn!(cpu, "cannot pin queue worker: {e}");
                }
            }
            match Worker::new(mode, shared, rx, wake2) {
                Ok(mut w) => w.run(),
                Err(e) => error!("queue worker cannot start: {e}"),
            }
        })?;
        Ok(WorkerHandle {
            cmds: tx,
            wake,
            thread: Some(thread),
        })
    }

    pub fn send(&self, cmd: WorkerCmd) {
        // A worker that has exited drops its receiver; the caller's reply
        // channel then reports the failure.
        let _ = self.cmds.send(cmd);
        let _ = self.wake.write(1);
    }
}

impl Drop for WorkerHandle {
    fn drop(&mut self) {
        self.send(WorkerCmd::Shutdown);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One request in flight. The iovecs point into guest memory, which `mem`
/// keeps mapped until the request completes.
struct Slot {
    head: u16,
    status: Option<GuestAddress>,
    op: IoOp,
    bytes: u64,
    used_len: u32,
    start: Instant,
    mem: Option<Arc<GuestMem>>,
    iovs: [libc::iovec; MAX_IOVS],
}

// SAFETY: the raw iovec pointers point into the guest memory mapping held
// alive by `mem`; a slot is only ever used by the one thread that owns its
// queue (it moves between threads only while no request is in flight).
unsafe impl Send for Slot {}

struct RunningQueue {
    index: u16,
    /// Owns the avail side (and the notification suppression we publish);
    /// the used side is written through `used`.
    queue: Queue,
    used: UsedRing,
    mem: Mem,
    kick: Option<File>,
    call: Option<File>,
    channel: Box<dyn IoChannel>,
    counters: Arc<IoCounters>,
    slots: Box<[Slot]>,
    free: Vec<u32>,
    stopping: Option<Sender<QueueStopped>>,
    /// The ring is unusable (the guest corrupted it); wait for a reset.
    broken: bool,
}

impl RunningQueue {
    fn new(q: QueueStart) -> Self {
        let depth = q
            .channel
            .queue_depth()
            .min(u32::from(q.queue.size()))
            .max(1);
        let empty = libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        };
        let slots = (0..depth)
            .map(|_| Slot {
                head: 0,
                status: None,
                op: IoOp::Read,
                bytes: 0,
                used_len: 0,
                start: Instant::now(),
                mem: None,
                iovs: [empty; MAX_IOVS],
            })
            .collect();
        RunningQueue {
            index: q.index,
            used: UsedRing::new(&q.queue),
            queue: q.queue,
            mem: q.mem,
            kick: q.kick,
            call: q.call,
            channel: q.channel,
            counters: q.counters,
            slots,
            free: (0..depth).rev().collect(),
            stopping: None,
            broken: false,
        }
    }

    fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Pops and starts every available request there is room for. Returns
    /// how many chains were consumed.
    fn take_requests(&mut self, guard: &MemGuard, dev: &DeviceShared) -> usize {
        if self.stopping.is_some() || self.broken || self.free.is_empty() {
            return 0;
        }
        let mem: &GuestMem = guard;
        let mut mem_arc: Option<Arc<GuestMem>> = None;
        // One clock read per batch, not per request: every request of the
        // batch was popped within the same pass, so they share a start time.
        let mut now: Option<Instant> = None;
        let mut n = 0;
        let index = self.index;
        let (slots, free, used, channel, counters, broken) = (
            &mut self.slots,
            &mut self.free,
            &mut self.used,
            &mut self.channel,
            &self.counters,
            &mut self.broken,
        );
        let mem_now = &self.mem;
        // One read of avail.idx per batch (the iterator takes it once).
        let mut avail = match self.queue.iter(mem) {
            Ok(it) => it,
            Err(e) => {
                warn!(queue = index, "avail ring unreadable: {e}");
                *broken = true;
                return 0;
            }
        };
        while let Some(&slot_idx) = free.last() {
            let Some(chain) = avail.next() else {
                break;
            };
            n += 1;
            let head = chain.head_index();
            let slot = &mut slots[slot_idx as usize];
            let parsed = parse_request(chain, mem, &dev.geometry, &mut slot.iovs);
            match parsed.action {
                Action::Fail(e) if e.outside_memory() && memory_replaced(guard, mem_now) => {
                    // The frontend added memory (ADD_MEM_REG, acknowledged) after this
                    // pass loaded its snapshot, then posted a request that uses it. Not a
                    // bad request: put it back; the next pass loads the new table.
                    avail.go_to_previous_position();
                    n -= 1;
                    break;
                }
                Action::Fail(e) => {
                    dev.bad_requests.fetch_add(1, Ordering::Relaxed);
                    debug!(queue = index, head, "bad request: {e}");
                    let len = finish(mem, parsed.status, e.status());
                    push_used(used, broken, index, mem, head, len);
                }
                Action::GetId { iovcnt, len } => {
                    let copied =
                        copy_to_iovs(&slot.iovs[..iovcnt as usize], &dev.serial[..len as usize]);
                    let len = finish(mem, parsed.status, Status::Ok) + copied as u32;
                    push_used(used, broken, index, mem, head, len);
                }
                Action::Io {
                    op,
                    offset,
                    len,
                    iovcnt,
                } => {
                    let op = match op {
                        IoOp::Write { .. } => IoOp::Write {
                            fua: !dev.writeback.load(Ordering::Relaxed),
                        },
                        other => other,
                    };
                    let io = BdevIo {
                        tag: slot_idx,
                        op,
                        offset,
                        len,
                        iovs: slot.iovs.as_ptr(),
                        iovcnt,
                    };
                    // SAFETY: the iovecs live in this slot, which stays
                    // reserved until the completion for `slot_idx` arrives;
                    // the guest memory they point into is kept mapped by
                    // `slot.mem`, set below before any completion can be reaped.
                    match unsafe { channel.submit(&io) } {
                        Ok(()) => {
                            let arc = mem_arc.get_or_insert_with(|| guard.clone().into_inner());
                            slot.mem = Some(arc.clone());
                            slot.head = head;
                            slot.status = parsed.status;
                            slot.op = op;
                            slot.bytes = len;
                            slot.used_len = if op == IoOp::Read { len as u32 } else { 0 };
                            slot.start = *now.get_or_insert_with(Instant::now);
                            free.pop();
                        }
                        Err(e) => {
                            // The channel's depth bounds the slots, so Busy
                            // means a bdev broke its contract; fail the request
                            // rather than spin.
                            let status = match e {
                                SubmitError::Refused(IoError::Unsupported) => Status::Unsupp,
                                _ => Status::IoErr,
                            };
                            warn!(queue = index, "bdev refused a request: {e}");
                            counters.record(op, len, 0, false);
                            let len = finish(mem, parsed.status, status);
                            push_used(used, broken, index, mem, head, len);
                        }
                    }
                }
            }
        }
        if n > 0 {
            channel.kick();
        }
        n
    }

    /// Reaps bdev completions into the used ring.
    fn reap(&mut self, guard: &MemGuard) -> usize {
        let mem: &GuestMem = guard;
        // One clock read per batch of completions (see `take_requests`).
        let mut now: Option<Instant> = None;
        let slots = &mut self.slots;
        let free = &mut self.free;
        let counters = &self.counters;
        let used = &mut self.used;
        let index = self.index;
        let broken = &mut self.broken;
        self.channel.poll(&mut |c: Completion| {
            let Some(slot) = slots.get_mut(c.tag as usize) else {
                error!(queue = index, tag = c.tag, "bdev completed an unknown tag");
                return;
            };
            let ok = c.result.is_ok();
            let status = match c.result {
                Ok(()) => Status::Ok,
                Err(IoError::Unsupported) => Status::Unsupp,
                Err(_) => Status::IoErr,
            };
            let end = *now.get_or_insert_with(Instant::now);
            counters.record(
                slot.op,
                slot.bytes,
                end.saturating_duration_since(slot.start).as_nanos() as u64,
                ok,
            );
            // The status byte is written through the mapping the request was
            // parsed against, even if the table changed since.
            let slot_mem: &GuestMem = slot.mem.as_deref().unwrap_or(mem);
            let data = if ok { slot.used_len } else { 0 };
            let len = finish(slot_mem, slot.status, status) + data;
            push_used(used, broken, index, slot_mem, slot.head, len);
            slot.mem = None;
            free.push(c.tag);
        })
    }

    /// Signals the guest if it asked to be (EVENT_IDX aware).
    /// Publishes this pass's used elements and signals the guest if it asked
    /// to be (EVENT_IDX aware).
    fn publish_and_notify(&mut self, guard: &MemGuard) {
        let mem: &GuestMem = guard;
        if self.used.publish(mem).is_err() {
            self.broken = true;
            return;
        }
        self.queue.set_next_used(self.used.next_used());
        match self.used.needs_notification(mem) {
            Ok(true) => {
                if let Some(call) = &mut self.call {
                    let _ = call.write(&1u64.to_ne_bytes());
                }
            }
            Ok(false) => {}
            Err(_) => self.broken = true,
        }
    }

    fn set_notification(&mut self, enable: bool) -> bool {
        let guard = self.mem.memory();
        if enable {
            self.queue.enable_notification(&*guard).unwrap_or(false)
        } else {
            let _ = self.queue.disable_notification(&*guard);
            false
        }
    }
}

/// The session thread has replaced the memory table since `guard` was loaded.
fn memory_replaced(guard: &MemGuard, mem: &Mem) -> bool {
    !std::ptr::eq::<GuestMem>(&**guard, &*mem.memory())
}

/// Returns a chain to the driver (visible at the next publish).
fn push_used(
    used: &mut UsedRing,
    broken: &mut bool,
    queue: u16,
    mem: &GuestMem,
    head: u16,
    len: u32,
) {
    match used.push(mem, head, len) {
        Ok(()) => {}
        // The avail ring named a descriptor that does not exist: there is
        // nothing to return (the driver could not map the id either). The
        // entry was consumed and counted as a bad request; the queue goes on.
        Err(UsedRingError::BadHead(_)) => {}
        Err(e) => {
            // The used ring itself is not writable: the guest broke its ring.
            // Retire nothing more until it resets the queue.
            warn!(queue, head, "cannot return descriptor: {e}");
            *broken = true;
        }
    }
}

/// Writes the status byte; returns the used length it contributes.
fn finish(mem: &GuestMem, status: Option<GuestAddress>, value: Status) -> u32 {
    match status {
        Some(addr) if mem.write_obj(value as u8, addr).is_ok() => 1,
        _ => 0,
    }
}

fn copy_to_iovs(iovs: &[libc::iovec], src: &[u8]) -> usize {
    let mut done = 0;
    for iov in iovs {
        if done == src.len() {
            break;
        }
        let n = iov.iov_len.min(src.len() - done);
        // SAFETY: the parser produced this iovec from a device-writable
        // descriptor inside guest memory, which is mapped for this call.
        unsafe {
            std::ptr::copy_nonoverlapping(src[done..].as_ptr(), iov.iov_base.cast::<u8>(), n)
        };
        done += n;
    }
    done
}

struct Worker {
    mode: PollMode,
    dev: Arc<DeviceShared>,
    cmds: Receiver<WorkerCmd>,
    wake: EventFd,
    epoll: Epoll,
    queues: Vec<RunningQueue>,
    shutdown: bool,
}

const WAKE_TOKEN: u64 = u64::MAX;

impl Worker {
    fn new(
        mode: PollMode,
        dev: Arc<DeviceShared>,
        cmds: Receiver<WorkerCmd>,
        wake: EventFd,
    ) -> std::io::Result<Self> {
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            wake.as_raw_fd(),
            EpollEvent::new(EventSet::IN, WAKE_TOKEN),
        )?;
        Ok(Worker {
            mode,
            dev,
            cmds,
            wake,
            epoll,
            queues: Vec::new(),
            shutdown: false,
        })
    }

    fn run(&mut self) {
        // Start of the current idle spell (adaptive mode); `None` while busy,
        // so a busy pass reads no clock.
        let mut idle_since: Option<Instant> = None;
        let mut busy_passes: u32 = 0;
        loop {
            if idle_since.is_some() || busy_passes % COMMAND_CHECK_PASSES == 0 {
                self.handle_commands();
                if self.shutdown && self.queues.is_empty() {
                    return;
                }
            }
            let work = self.serve_once();
            if self.draining() {
                self.finish_stops();
            }
            if work > 0 {
                idle_since = None;
                busy_passes = busy_passes.wrapping_add(1);
                continue;
            }
            busy_passes = 0;
            let sleep = match self.mode {
                PollMode::Poll => self.queues.is_empty(),
                PollMode::Interrupt => true,
                PollMode::Adaptive => {
                    idle_since.get_or_insert_with(Instant::now).elapsed() >= ADAPTIVE_IDLE
                }
            };
            if sleep {
                self.sleep();
                idle_since = None;
            } else {
                std::hint::spin_loop();
            }
        }
    }

    /// Some queue is stopping (its drain is checked after every pass).
    fn draining(&self) -> bool {
        self.queues.iter().any(|q| q.stopping.is_some())
    }

    /// One pass over every queue; returns the work done.
    fn serve_once(&mut self) -> usize {
        let mut work = 0;
        for q in &mut self.queues {
            let guard = q.mem.memory();
            let mut pass = q.reap(&guard);
            pass += q.take_requests(&guard, &self.dev);
            // Requests of synchronous bdevs finish within this pass.
            pass += q.reap(&guard);
            if pass > 0 {
                q.publish_and_notify(&guard);
            }
            work += pass;
        }
        work
    }

    fn handle_commands(&mut self) {
        while let Ok(cmd) = self.cmds.try_recv() {
            match cmd {
                WorkerCmd::Start(start) => {
                    let mut q = RunningQueue::new(*start);
                    self.watch(&q, true);
                    // Interrupt mode must publish avail_event now: after a
                    // reconnect the ring's old value may lie behind the
                    // driver's index, and the driver would never kick.
                    q.set_notification(self.mode == PollMode::Interrupt);
                    debug!(queue = q.index, "queue started");
                    self.queues.push(q);
                }
                WorkerCmd::Stop { index, reply } => {
                    match self.queues.iter_mut().find(|q| q.index == index) {
                        Some(q) => q.stopping = Some(reply),
                        None => {
                            // Not running here (never started): nothing to drain.
                            drop(reply);
                        }
                    }
                }
                WorkerCmd::SetCall { index, call } => {
                    if let Some(q) = self.queues.iter_mut().find(|q| q.index == index) {
                        q.call = call;
                        // A new call fd may have missed a notification.
                        if let Some(c) = &mut q.call {
                            let _ = c.write(&1u64.to_ne_bytes());
                        }
                    }
                }
                WorkerCmd::Shutdown => {
                    self.shutdown = true;
                    for q in &mut self.queues {
                        if q.stopping.is_none() {
                            let (tx, _rx) = crossbeam::channel::bounded(1);
                            q.stopping = Some(tx);
                        }
                    }
                }
            }
        }
    }

    /// Retires stopping queues whose requests have all completed.
    fn finish_stops(&mut self) {
        let mut i = 0;
        while i < self.queues.len() {
            let q = &self.queues[i];
            if q.stopping.is_some() && q.in_flight() == 0 {
                let q = self.queues.swap_remove(i);
                self.watch(&q, false);
                let stopped = QueueStopped {
                    next_avail: q.queue.next_avail(),
                };
                if let Some(reply) = q.stopping {
                    let _ = reply.send(stopped);
                }
                debug!(queue = q.index, "queue stopped");
            } else {
                i += 1;
            }
        }
    }

    fn fds(q: &RunningQueue) -> impl Iterator<Item = RawFd> + '_ {
        q.kick
            .as_ref()
            .map(|f| f.as_raw_fd())
            .into_iter()
            .chain(q.channel.completion_fd())
    }

    fn watch(&self, q: &RunningQueue, add: bool) {
        for fd in Self::fds(q) {
            let op = if add {
                ControlOperation::Add
            } else {
                ControlOperation::Delete
            };
            if let Err(e) = self
                .epoll
                .ctl(op, fd, EpollEvent::new(EventSet::IN, fd as u64))
            {
                warn!(queue = q.index, "epoll_ctl: {e}");
            }
        }
    }

    /// Arms notifications and sleeps until a kick, a completion, a command
    /// or the timeout. Returns without sleeping if work raced in.
    fn sleep(&mut self) {
        let mut timeout = MAX_SLEEP_MS;
        for q in &mut self.queues {
            if q.stopping.is_some() {
                // Draining: poll the completions without waiting on kicks.
                timeout = 0;
            }
            if q.set_notification(true) {
                timeout = 0;
            }
            // A bdev without a completion fd finishes in `poll`; never sleep
            // on its in-flight requests.
            if q.in_flight() > 0 && q.channel.completion_fd().is_none() {
                timeout = 0;
            }
        }
        if self.queues.is_empty() {
            timeout = -1;
        }
        if timeout != 0 {
            let mut events = [EpollEvent::default(); 16];
            let _ = self.epoll.wait(timeout, &mut events);
            // Reset every eventfd that fired; a completion posted after this
            // is found by the next poll (and re-arms the fd), so none is lost.
            let _ = self.wake.read();
            let mut buf = [0u8; 8];
            for q in &mut self.queues {
                if let Some(k) = &mut q.kick {
                    let _ = k.read(&mut buf);
                }
            }
            for e in &events {
                let fd = e.data();
                if fd != WAKE_TOKEN && e.events() != 0 {
                    drain_fd(fd as RawFd);
                }
            }
        }
        if self.mode != PollMode::Interrupt {
            for q in &mut self.queues {
                q.set_notification(false);
            }
        }
    }
}

fn drain_fd(fd: RawFd) {
    let mut buf = [0u8; 8];
    // SAFETY: fd is an eventfd registered by a live queue (kick or bdev
    // completion fd); reading 8 bytes into a stack buffer is the eventfd
    // protocol, and the fds are non-blocking.
    let _ = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
}

/// Makes a frontend's eventfd non-blocking so a spurious read never stalls
/// the worker.
pub fn set_nonblocking(f: &File) -> std::io::Result<()> {
    let fd = f.as_raw_fd();
    // SAFETY: fcntl on a valid fd we own, with valid flags.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
