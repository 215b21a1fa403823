//! A vhost-user-blk frontend session: negotiation, guest memory, queues, and a synchronous
//! block API (read/write/flush/discard/write-zeroes/get-id) for integration tests.

use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserHeaderFlag};
use vhost::vhost_user::{Frontend, VhostUserFrontend, VhostUserProtocolFeatures};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::memory::GuestMemory;
use super::ring::{Desc, SplitQueue, UsedElem};
use super::LoadgenError;

/// virtio feature bits the load generator understands.
pub mod features {
    /// Maximum size of one segment in `size_max`.
    pub const VIRTIO_BLK_F_SIZE_MAX: u64 = 1 << 1;
    /// Maximum segments per request in `seg_max`.
    pub const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
    /// Device is read-only.
    pub const VIRTIO_BLK_F_RO: u64 = 1 << 5;
    /// Block size in `blk_size`.
    pub const VIRTIO_BLK_F_BLK_SIZE: u64 = 1 << 6;
    /// FLUSH supported.
    pub const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
    /// Topology fields valid.
    pub const VIRTIO_BLK_F_TOPOLOGY: u64 = 1 << 10;
    /// Writeback toggle in config.
    pub const VIRTIO_BLK_F_CONFIG_WCE: u64 = 1 << 11;
    /// `num_queues` valid.
    pub const VIRTIO_BLK_F_MQ: u64 = 1 << 12;
    /// DISCARD supported.
    pub const VIRTIO_BLK_F_DISCARD: u64 = 1 << 13;
    /// WRITE_ZEROES supported.
    pub const VIRTIO_BLK_F_WRITE_ZEROES: u64 = 1 << 14;
    /// Indirect descriptors.
    pub const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;
    /// used_event / avail_event notification suppression.
    pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;
    /// vhost-user protocol features negotiation.
    pub const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;
    /// virtio 1.x.
    pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
}
use features::*;

/// virtio-blk request types and status values.
pub mod blk {
    /// Read.
    pub const VIRTIO_BLK_T_IN: u32 = 0;
    /// Write.
    pub const VIRTIO_BLK_T_OUT: u32 = 1;
    /// Flush.
    pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
    /// Device id string (20 bytes).
    pub const VIRTIO_BLK_T_GET_ID: u32 = 8;
    /// Discard.
    pub const VIRTIO_BLK_T_DISCARD: u32 = 11;
    /// Write zeroes.
    pub const VIRTIO_BLK_T_WRITE_ZEROES: u32 = 13;
    /// Success.
    pub const VIRTIO_BLK_S_OK: u8 = 0;
    /// I/O error.
    pub const VIRTIO_BLK_S_IOERR: u8 = 1;
    /// Unsupported request.
    pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;
    /// Length of the GET_ID answer.
    pub const VIRTIO_BLK_ID_BYTES: usize = 20;

    /// The 16-byte request header: type, reserved, sector (all little endian).
    pub fn header(req_type: u32, sector: u64) -> [u8; 16] {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&req_type.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        h
    }

    /// A discard / write-zeroes segment: sector, num_sectors, flags (bit 0: unmap).
    pub fn dwz_segment(sector: u64, num_sectors: u32, unmap: bool) -> [u8; 16] {
        let mut s = [0u8; 16];
        s[0..8].copy_from_slice(&sector.to_le_bytes());
        s[8..12].copy_from_slice(&num_sectors.to_le_bytes());
        s[12..16].copy_from_slice(&u32::from(unmap).to_le_bytes());
        s
    }
}
use blk::*;

/// How to connect.
#[derive(Debug, Clone)]
pub struct SessionOptions {
    /// Queues to set up (capped at what the backend offers).
    pub queues: u16,
    /// Entries per queue (power of two).
    pub queue_size: u16,
    /// Bytes of guest memory beyond the rings (buffers, raw-test allocations).
    pub mem_size: u64,
    /// Regions the memory is split into (contiguous in guest-physical space).
    pub regions: usize,
    /// Register memory with `ADD_MEM_REG` (CONFIGURE_MEM_SLOTS) instead of `SET_MEM_TABLE`,
    /// as libblkio-based clients do.
    pub mem_slots: bool,
    /// Negotiate VIRTIO_RING_F_EVENT_IDX when offered.
    pub event_idx: bool,
    /// Timeout of the synchronous block API.
    pub timeout: Duration,
    /// Initial ring index (`SET_VRING_BASE`); near 65535 tests the backend's wraparound.
    pub vring_base: u16,
}

impl Default for SessionOptions {
    fn default() -> Self {
        Self {
            queues: 1,
            queue_size: 256,
            mem_size: 16 << 20,
            regions: 1,
            mem_slots: false,
            event_idx: true,
            timeout: Duration::from_secs(10),
            vring_base: 0,
        }
    }
}

/// The virtio-blk config space fields the load generator uses.
#[derive(Debug, Clone, Copy, Default)]
pub struct BlkConfig {
    /// Capacity in 512-byte sectors.
    pub capacity: u64,
    /// Logical block size (512 when not offered).
    pub blk_size: u32,
    /// Maximum segments per request (0 when not offered).
    pub seg_max: u32,
    /// Queues the device has (from config, 0 when not offered).
    pub num_queues: u16,
}

impl BlkConfig {
    fn parse(b: &[u8], features: u64) -> Self {
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap_or([0; 4]));
        Self {
            capacity: u64::from_le_bytes(b[0..8].try_into().unwrap_or([0; 8])),
            seg_max: if features & VIRTIO_BLK_F_SEG_MAX != 0 {
                u32_at(12)
            } else {
                0
            },
            blk_size: if features & VIRTIO_BLK_F_BLK_SIZE != 0 && u32_at(20) != 0 {
                u32_at(20)
            } else {
                512
            },
            num_queues: if features & VIRTIO_BLK_F_MQ != 0 {
                u16::from_le_bytes([b[34], b[35]])
            } else {
                0
            },
        }
    }
}

/// One virtqueue with its kick and call eventfds. Owned by one thread at a time.
pub struct Queue {
    ring: SplitQueue,
    kick: EventFd,
    call: EventFd,
    index: u16,
}

impl Queue {
    /// Queue index on the device.
    pub fn index(&self) -> u16 {
        self.index
    }

    /// The ring.
    pub fn ring(&mut self) -> &mut SplitQueue {
        &mut self.ring
    }

    /// Publishes pushed heads and kicks the backend if it asked to be kicked.
    pub fn publish_and_kick(&mut self) -> Result<(), LoadgenError> {
        self.ring.publish();
        if self.ring.needs_kick() {
            self.kick()?;
        }
        Ok(())
    }

    /// Kicks unconditionally.
    pub fn kick(&mut self) -> Result<(), LoadgenError> {
        self.kick.write(1).map_err(LoadgenError::EventFd)
    }

    /// Waits up to `timeout` for the call eventfd (interrupt mode). Returns whether it fired.
    pub fn wait_call(&mut self, timeout: Duration) -> Result<bool, LoadgenError> {
        let mut pfd = libc::pollfd {
            fd: self.call.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd on the stack.
        let r = unsafe { libc::poll(&mut pfd, 1, ms) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                return Ok(false);
            }
            return Err(LoadgenError::EventFd(e));
        }
        if r > 0 {
            // Drain the counter; EAGAIN means someone else drained it, which is fine.
            let _ = self.call.read();
            return Ok(true);
        }
        Ok(false)
    }

    /// Waits for the next used element: busy-polls if `poll`, sleeps on the call eventfd
    /// otherwise. `None` on timeout.
    pub fn wait_used(
        &mut self,
        timeout: Duration,
        poll: bool,
    ) -> Result<Option<UsedElem>, LoadgenError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(e) = self.ring.pop_used() {
                return Ok(Some(e));
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            if poll {
                std::hint::spin_loop();
            } else if !self.ring.arm_and_check() {
                self.wait_call((deadline - now).min(Duration::from_millis(100)))?;
            }
        }
    }
}

/// A connected vhost-user-blk device.
pub struct Session {
    frontend: Frontend,
    mem: Arc<GuestMemory>,
    features: u64,
    protocol_features: VhostUserProtocolFeatures,
    config: BlkConfig,
    queues: Vec<Option<Queue>>,
    opts: SessionOptions,
    /// Bounce area for the synchronous API: header, status, data.
    sync_hdr: u64,
    sync_status: u64,
    sync_data: u64,
}

/// Size of the bounce data area of the synchronous API; larger requests are split.
pub const SYNC_MAX_IO: usize = 1 << 20;

impl Session {
    /// Connects to a vhost-user-blk socket and sets up memory and queues.
    pub fn connect(socket: impl AsRef<Path>, opts: SessionOptions) -> Result<Self, LoadgenError> {
        let mut fe = Frontend::connect(socket.as_ref(), 1)?;
        let offered = fe.get_features()?;
        for (bit, name) in [
            (VIRTIO_F_VERSION_1, "VIRTIO_F_VERSION_1"),
            (
                VHOST_USER_F_PROTOCOL_FEATURES,
                "VHOST_USER_F_PROTOCOL_FEATURES",
            ),
        ] {
            if offered & bit == 0 {
                return Err(LoadgenError::MissingFeature(name));
            }
        }
        // PROTOCOL_FEATURES is usable before SET_FEATURES (vhost-user spec), and GET_CONFIG
        // needs it, so ack it now; the crate tracks it from get_features.
        let pf_offered = fe.get_protocol_features()?;
        let mut pf = pf_offered
            & (VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::REPLY_ACK
                | VhostUserProtocolFeatures::CONFIG);
        if opts.mem_slots {
            if !pf_offered.contains(VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS) {
                return Err(LoadgenError::MissingFeature("CONFIGURE_MEM_SLOTS"));
            }
            pf |= VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS;
        }
        if !pf.contains(VhostUserProtocolFeatures::CONFIG) {
            return Err(LoadgenError::MissingFeature("VHOST_USER_PROTOCOL_F_CONFIG"));
        }
        fe.set_protocol_features(pf)?;
        if pf.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            // Every request that has no reply of its own gets an ack, so a backend that
            // rejects SET_MEM_TABLE or SET_VRING_ADDR fails here, not later as a hang.
            fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        let device_queues = if pf.contains(VhostUserProtocolFeatures::MQ) {
            fe.get_queue_num()?
        } else {
            1
        };
        fe.set_owner()?;

        let (_, cfg) = fe.get_config(0, 60, VhostUserConfigFlags::empty(), &[0u8; 60])?;
        let wanted = VIRTIO_F_VERSION_1
            | VHOST_USER_F_PROTOCOL_FEATURES
            | VIRTIO_BLK_F_SIZE_MAX
            | VIRTIO_BLK_F_SEG_MAX
            | VIRTIO_BLK_F_RO
            | VIRTIO_BLK_F_BLK_SIZE
            | VIRTIO_BLK_F_FLUSH
            | VIRTIO_BLK_F_TOPOLOGY
            | VIRTIO_BLK_F_MQ
            | VIRTIO_BLK_F_DISCARD
            | VIRTIO_BLK_F_WRITE_ZEROES
            | if opts.event_idx {
                VIRTIO_RING_F_EVENT_IDX
            } else {
                0
            };
        let features = offered & wanted;
        fe.set_features(features)?;
        let config = BlkConfig::parse(&cfg, features);

        let nq = u64::from(opts.queues.max(1)).min(device_queues) as u16;
        let ring_bytes = u64::from(opts.queue_size) * 32 + 3 * 4096;
        let mem = Arc::new(GuestMemory::new(
            opts.mem_size + SYNC_MAX_IO as u64 + 8192 + u64::from(nq) * ring_bytes,
            opts.regions,
        )?);
        let regions: Vec<VhostUserMemoryRegionInfo> = mem
            .regions()
            .iter()
            .map(|r| VhostUserMemoryRegionInfo {
                guest_phys_addr: r.gpa,
                memory_size: r.size,
                userspace_addr: mem.user_addr_of_offset(r.fd_offset),
                mmap_offset: r.fd_offset,
                mmap_handle: mem.fd().as_raw_fd(),
            })
            .collect();
        if opts.mem_slots {
            let slots = fe.get_max_mem_slots()?;
            if slots < regions.len() as u64 {
                return Err(LoadgenError::InvalidArgument(format!(
                    "backend has {slots} memory slots, need {}",
                    regions.len()
                )));
            }
            for r in &regions {
                fe.add_mem_region(r)?;
            }
        } else {
            fe.set_mem_table(&regions)?;
        }

        let mut queues = Vec::with_capacity(nq as usize);
        for i in 0..nq {
            let mut ring = SplitQueue::new(
                mem.clone(),
                opts.queue_size,
                features & VIRTIO_RING_F_EVENT_IDX != 0,
            )?;
            ring.set_base(opts.vring_base);
            let q = Queue {
                kick: EventFd::new(EFD_NONBLOCK).map_err(LoadgenError::EventFd)?,
                call: EventFd::new(EFD_NONBLOCK).map_err(LoadgenError::EventFd)?,
                ring,
                index: i,
            };
            let idx = i as usize;
            let ua = q.ring.user_addrs();
            fe.set_vring_num(idx, opts.queue_size)?;
            fe.set_vring_base(idx, opts.vring_base)?;
            fe.set_vring_addr(
                idx,
                &VringConfigData {
                    queue_max_size: opts.queue_size,
                    queue_size: opts.queue_size,
                    flags: 0,
                    desc_table_addr: ua.desc,
                    used_ring_addr: ua.used,
                    avail_ring_addr: ua.avail,
                    log_addr: None,
                },
            )?;
            fe.set_vring_call(idx, &q.call)?;
            fe.set_vring_kick(idx, &q.kick)?;
            fe.set_vring_enable(idx, true)?;
            queues.push(Some(q));
        }

        let sync_hdr = mem.alloc(16, 16)?;
        let sync_status = mem.alloc(1, 1)?;
        let sync_data = mem.alloc(SYNC_MAX_IO as u64, 4096)?;
        Ok(Self {
            frontend: fe,
            mem,
            features,
            protocol_features: pf,
            config,
            queues,
            opts,
            sync_hdr,
            sync_status,
            sync_data,
        })
    }

    /// Negotiated virtio features.
    pub fn features(&self) -> u64 {
        self.features
    }

    /// Negotiated vhost-user protocol features.
    pub fn protocol_features(&self) -> VhostUserProtocolFeatures {
        self.protocol_features
    }

    /// Config space as read at connect.
    pub fn config(&self) -> BlkConfig {
        self.config
    }

    /// Capacity in bytes.
    pub fn capacity_bytes(&self) -> u64 {
        self.config.capacity * 512
    }

    /// Number of queues set up.
    pub fn num_queues(&self) -> u16 {
        self.queues.len() as u16
    }

    /// Guest memory (for allocating buffers and reading them back).
    pub fn mem(&self) -> &Arc<GuestMemory> {
        &self.mem
    }

    /// The underlying vhost-user frontend, for protocol-level tests.
    pub fn frontend(&mut self) -> &mut Frontend {
        &mut self.frontend
    }

    /// Takes queue `i` out of the session (to move it to a worker thread).
    pub fn take_queue(&mut self, i: u16) -> Option<Queue> {
        self.queues.get_mut(i as usize).and_then(Option::take)
    }

    /// Gives a queue back.
    pub fn put_queue(&mut self, q: Queue) {
        let i = q.index as usize;
        self.queues[i] = Some(q);
    }

    /// Raw (malicious-guest) access to queue `i`, which must not have been taken.
    pub fn raw_queue(&mut self, i: u16) -> Result<RawQueue<'_>, LoadgenError> {
        let mem = self.mem.clone();
        let q = self
            .queues
            .get_mut(i as usize)
            .and_then(Option::as_mut)
            .ok_or(LoadgenError::NoSuchQueue(i))?;
        Ok(RawQueue { q, mem })
    }

    /// Issues one request on queue 0 and waits for it: header, then `data` (device-writable
    /// when `data_writable`), then a status byte. Returns (status, used len).
    fn sync_request(
        &mut self,
        req_type: u32,
        sector: u64,
        data_len: u32,
        data_writable: bool,
    ) -> Result<(u8, u32), LoadgenError> {
        let timeout = self.opts.timeout;
        let (hdr, st, data) = (self.sync_hdr, self.sync_status, self.sync_data);
        self.mem.write(hdr, &header(req_type, sector))?;
        self.mem.write_u8(st, 0xff)?;
        let q = self
            .queues
            .get_mut(0)
            .and_then(Option::as_mut)
            .ok_or(LoadgenError::NoSuchQueue(0))?;
        let head = if data_len > 0 {
            q.ring.add_linked(&[
                (hdr, 16, false),
                (data, data_len, data_writable),
                (st, 1, true),
            ])?
        } else {
            q.ring.add_linked(&[(hdr, 16, false), (st, 1, true)])?
        };
        q.ring.push_avail(head);
        q.publish_and_kick()?;
        let used = q.wait_used(timeout, false)?.ok_or(LoadgenError::Timeout)?;
        if used.id != u32::from(head) {
            return Err(LoadgenError::UnexpectedUsedId(used.id));
        }
        Ok((self.mem.read_u8(st)?, used.len))
    }

    fn check_status(status: u8) -> Result<(), LoadgenError> {
        if status == VIRTIO_BLK_S_OK {
            Ok(())
        } else {
            Err(LoadgenError::Status(status))
        }
    }

    /// Reads `buf.len()` bytes (a multiple of 512) at byte `offset` (512-aligned).
    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), LoadgenError> {
        check_aligned(offset, buf.len())?;
        let mut done = 0;
        while done < buf.len() {
            let n = (buf.len() - done).min(SYNC_MAX_IO);
            let sector = (offset + done as u64) / 512;
            let (st, _) = self.sync_request(VIRTIO_BLK_T_IN, sector, n as u32, true)?;
            Self::check_status(st)?;
            self.mem.read(self.sync_data, &mut buf[done..done + n])?;
            done += n;
        }
        Ok(())
    }

    /// Writes `buf` (a multiple of 512 bytes) at byte `offset` (512-aligned).
    pub fn write(&mut self, offset: u64, buf: &[u8]) -> Result<(), LoadgenError> {
        check_aligned(offset, buf.len())?;
        let mut done = 0;
        while done < buf.len() {
            let n = (buf.len() - done).min(SYNC_MAX_IO);
            let sector = (offset + done as u64) / 512;
            self.mem.write(self.sync_data, &buf[done..done + n])?;
            let (st, _) = self.sync_request(VIRTIO_BLK_T_OUT, sector, n as u32, false)?;
            Self::check_status(st)?;
            done += n;
        }
        Ok(())
    }

    /// FLUSH.
    pub fn flush(&mut self) -> Result<(), LoadgenError> {
        let (st, _) = self.sync_request(VIRTIO_BLK_T_FLUSH, 0, 0, false)?;
        Self::check_status(st)
    }

    /// DISCARD of `len` bytes at `offset` (both 512-aligned).
    pub fn discard(&mut self, offset: u64, len: u64) -> Result<(), LoadgenError> {
        self.dwz(VIRTIO_BLK_T_DISCARD, offset, len, false)
    }

    /// WRITE_ZEROES of `len` bytes at `offset`, allowing unmap if `unmap`.
    pub fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> Result<(), LoadgenError> {
        self.dwz(VIRTIO_BLK_T_WRITE_ZEROES, offset, len, unmap)
    }

    fn dwz(&mut self, t: u32, offset: u64, len: u64, unmap: bool) -> Result<(), LoadgenError> {
        check_aligned(offset, len as usize)?;
        let sectors = u32::try_from(len / 512)
            .map_err(|_| LoadgenError::InvalidArgument("range too long".into()))?;
        self.mem
            .write(self.sync_data, &dwz_segment(offset / 512, sectors, unmap))?;
        let (st, _) = self.sync_request(t, 0, 16, false)?;
        Self::check_status(st)
    }

    /// GET_ID: the device serial (up to 20 bytes, NUL-padded when shorter).
    pub fn get_id(&mut self) -> Result<String, LoadgenError> {
        self.mem
            .fill(self.sync_data, 0, VIRTIO_BLK_ID_BYTES as u64)?;
        let (st, _) =
            self.sync_request(VIRTIO_BLK_T_GET_ID, 0, VIRTIO_BLK_ID_BYTES as u32, true)?;
        Self::check_status(st)?;
        let mut id = [0u8; VIRTIO_BLK_ID_BYTES];
        self.mem.read(self.sync_data, &mut id)?;
        let end = id.iter().position(|&b| b == 0).unwrap_or(id.len());
        Ok(String::from_utf8_lossy(&id[..end]).into_owned())
    }
}

fn check_aligned(offset: u64, len: usize) -> Result<(), LoadgenError> {
    if offset % 512 != 0 || len % 512 != 0 {
        return Err(LoadgenError::InvalidArgument(format!(
            "offset {offset} and length {len} must be multiples of 512"
        )));
    }
    Ok(())
}

/// One descriptor of a raw chain, as a malicious guest lays it out.
///
/// `next` is an index into the submitted slice when it is smaller than the slice's length
/// (rewritten to the descriptor-table index the chain landed on), and is written verbatim
/// otherwise, so a test can point outside the chain or past the end of the table.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RawDesc {
    /// Guest physical address (need not be inside guest memory).
    pub addr: u64,
    /// Length (zero and huge are allowed).
    pub len: u32,
    /// `VIRTQ_DESC_F_*` flags, written as given.
    pub flags: u16,
    /// See the type's documentation.
    pub next: u16,
}

impl RawDesc {
    /// A chain of `(addr, len, flags)` with `VIRTQ_DESC_F_NEXT` and `next` filled in (the
    /// last one without `NEXT`). Edit the result to break it.
    pub fn chain(parts: &[(u64, u32, u16)]) -> Vec<RawDesc> {
        let n = parts.len();
        parts
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, flags))| RawDesc {
                addr,
                len,
                flags: if i + 1 < n {
                    flags | super::ring::VIRTQ_DESC_F_NEXT
                } else {
                    flags
                },
                next: if i + 1 < n { (i + 1) as u16 } else { 0 },
            })
            .collect()
    }
}

/// Malicious-guest access to one queue: lay out any chain, publish it, wait for the used
/// element, read back what the backend wrote.
pub struct RawQueue<'a> {
    q: &'a mut Queue,
    mem: Arc<GuestMemory>,
}

impl RawQueue<'_> {
    /// Guest memory, to allocate and fill buffers.
    pub fn mem(&self) -> &GuestMemory {
        &self.mem
    }

    /// Allocates `len` bytes of guest memory (16-aligned), filled with `fill`.
    pub fn alloc(&self, len: u64, fill: u8) -> Result<u64, LoadgenError> {
        let gpa = self.mem.alloc(len, 16)?;
        self.mem.fill(gpa, fill, len)?;
        Ok(gpa)
    }

    /// Allocates a 16-byte virtio-blk header in guest memory.
    pub fn alloc_header(&self, req_type: u32, sector: u64) -> Result<u64, LoadgenError> {
        let gpa = self.mem.alloc(16, 16)?;
        self.mem.write(gpa, &header(req_type, sector))?;
        Ok(gpa)
    }

    /// Allocates a status byte preset to 0xff, so "not written" is distinguishable from
    /// every virtio status.
    pub fn alloc_status(&self) -> Result<u64, LoadgenError> {
        let gpa = self.mem.alloc(1, 1)?;
        self.mem.write_u8(gpa, 0xff)?;
        Ok(gpa)
    }

    /// Writes an indirect descriptor table into guest memory and returns its address and
    /// byte length (for a descriptor with `VIRTQ_DESC_F_INDIRECT`). `next` values are
    /// table-local and written verbatim.
    pub fn alloc_indirect(&self, descs: &[RawDesc]) -> Result<(u64, u32), LoadgenError> {
        let len = 16 * descs.len() as u64;
        let gpa = self.mem.alloc(len.max(16), 16)?;
        for (i, d) in descs.iter().enumerate() {
            let b = Desc {
                addr: d.addr,
                len: d.len,
                flags: d.flags,
                next: d.next,
            }
            .to_bytes();
            self.mem.write(gpa + 16 * i as u64, &b)?;
        }
        Ok((gpa, len as u32))
    }

    /// A guest physical address that no memory region covers.
    pub fn gpa_outside(&self) -> u64 {
        self.mem.gpa_outside()
    }

    /// Lays out `descs` in free descriptor-table entries, makes the head available and
    /// kicks. Returns the head index (the id the used element should carry).
    pub fn submit_chain(&mut self, descs: &[RawDesc]) -> Result<u16, LoadgenError> {
        let mut tmp = [Desc::default(); 64];
        if descs.len() > tmp.len() {
            return Err(LoadgenError::InvalidArgument(
                "raw chain longer than 64".into(),
            ));
        }
        for (t, d) in tmp.iter_mut().zip(descs) {
            *t = Desc {
                addr: d.addr,
                len: d.len,
                flags: d.flags,
                next: d.next,
            };
        }
        let head = self.q.ring.add_chain(&tmp[..descs.len()])?;
        self.q.ring.push_avail(head);
        self.q.ring.publish();
        // Always kick: a raw test must not depend on the backend's suppression state.
        self.q.kick()?;
        Ok(head)
    }

    /// Makes an arbitrary value available as a head (e.g. an index past the table), kicks.
    pub fn submit_head(&mut self, head: u16) -> Result<(), LoadgenError> {
        self.q.ring.push_avail(head);
        self.q.ring.publish();
        self.q.kick()
    }

    /// Waits up to `timeout` for the next used element: `(id, len)`, or `None`.
    pub fn wait_used(&mut self, timeout: Duration) -> Result<Option<(u32, u32)>, LoadgenError> {
        Ok(self.q.wait_used(timeout, false)?.map(|e| (e.id, e.len)))
    }

    /// Reads a status byte (or any byte) back from guest memory.
    pub fn read_status(&self, gpa: u64) -> Result<u8, LoadgenError> {
        self.mem.read_u8(gpa)
    }

    /// The underlying ring (for index-level tricks).
    pub fn ring(&mut self) -> &mut SplitQueue {
        &mut self.q.ring
    }
}
