//! The vhost-user control protocol of one controller ([`BlkBackend`]).
//!
//! Tandem implements the `vhost` crate's `VhostUserBackendReqHandlerMut`
//! itself rather than going through `vhost-user-backend`'s handler, because
//! that handler (a) puts every vring behind a lock shared with its own epoll
//! threads, which cannot busy-poll on pinned cores, and (b) refuses
//! GET/SET_INFLIGHT_FD. Owning the handler keeps the hot path lock-free and
//! gives INFLIGHT_SHMFD an obvious home: `get_inflight_fd`/`set_inflight_fd`
//! below, with the per-queue inflight region handed to the worker in
//! [`QueueStart`] (see docs/architecture.md, "Surviving a target restart").
//!
//! The handler runs on the controller's session thread only. It owns the
//! vring *setup* (addresses, sizes, fds) while a ring is stopped; a started
//! ring is owned by its worker until GET_VRING_BASE takes it back.

use std::fs::File;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tracing::{debug, info, warn};
use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig,
    VhostUserSharedMsg, VhostUserSingleMemoryRegion, VhostUserVirtioFeatures,
    VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{
    Backend, Error as VuError, Result as VuResult, VhostUserBackendReqHandlerMut,
};
use vhost::VhostUserMemoryRegionBase;
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestRegionMmap};

use super::worker::{set_nonblocking, DeviceShared, Mem, QueueStart, WorkerCmd, WorkerHandle};
use crate::bdev::Bdev;
use crate::blk::config::{config_space, device_features, WCE_OFFSET};
use crate::blk::request::GuestMem;

use virtio_bindings::bindings::virtio_blk::VIRTIO_BLK_F_CONFIG_WCE;
use virtio_bindings::bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

/// Largest virtqueue a frontend may configure.
pub const MAX_QUEUE_SIZE: u16 = 1024;
/// Memory slots offered with CONFIGURE_MEM_SLOTS (QEMU's own limit is lower).
const MAX_MEM_SLOTS: u64 = 509;
/// How long GET_VRING_BASE waits for a queue's requests to drain.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// The frontend's view of one region: its own virtual address range and
/// where that lands in guest physical memory. Vring addresses arrive as
/// frontend virtual addresses and are translated with this.
#[derive(Debug, Clone, Copy)]
struct AddrMapping {
    vmm_addr: u64,
    size: u64,
    gpa_base: u64,
}

#[derive(Debug, Default)]
struct VringSetup {
    size: u16,
    base: u16,
    desc: u64,
    avail: u64,
    used: u64,
    kick: Option<File>,
    call: Option<File>,
    /// A kick fd arrived (or NOFD): the frontend started the ring.
    started: bool,
    enabled: bool,
    /// Handed to its worker.
    running: bool,
}

fn handler_err(msg: impl Into<String>) -> VuError {
    VuError::ReqHandlerError(std::io::Error::other(msg.into()))
}

/// One controller's vhost-user device state.
pub struct BlkBackend {
    bdev: Arc<dyn Bdev>,
    dev: Arc<DeviceShared>,
    workers: Arc<[WorkerHandle]>,
    read_only: bool,
    max_queues: u16,
    features: u64,
    acked_features: u64,
    acked_protocol: VhostUserProtocolFeatures,
    owned: bool,
    mem: Option<Mem>,
    mappings: Vec<AddrMapping>,
    vrings: Vec<VringSetup>,
}

impl BlkBackend {
    pub fn new(
        bdev: Arc<dyn Bdev>,
        dev: Arc<DeviceShared>,
        workers: Arc<[WorkerHandle]>,
        read_only: bool,
        max_queues: u16,
    ) -> Self {
        let features = device_features(bdev.info(), read_only)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        BlkBackend {
            bdev,
            dev,
            workers,
            read_only,
            max_queues,
            features,
            acked_features: 0,
            acked_protocol: VhostUserProtocolFeatures::empty(),
            owned: false,
            mem: None,
            mappings: Vec::new(),
            vrings: (0..max_queues).map(|_| VringSetup::default()).collect(),
        }
    }

    pub fn protocol_features() -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::RESET_DEVICE
    }

    /// Stops every running ring and forgets the session: called on reset and
    /// when the frontend disconnects, so the next frontend starts clean.
    pub fn reset(&mut self) {
        for i in 0..self.vrings.len() {
            if let Err(e) = self.stop_ring(i) {
                warn!(queue = i, "stopping ring on reset: {e}");
            }
        }
        self.vrings = (0..self.max_queues)
            .map(|_| VringSetup::default())
            .collect();
        self.acked_features = 0;
        self.acked_protocol = VhostUserProtocolFeatures::empty();
        self.owned = false;
        self.mem = None;
        self.mappings.clear();
        // A new session starts in the bdev's default cache mode.
        self.dev
            .writeback
            .store(self.bdev.info().caps.volatile_cache, Ordering::Relaxed);
    }

    fn vring(&mut self, index: u32) -> VuResult<&mut VringSetup> {
        self.vrings
            .get_mut(index as usize)
            .ok_or_else(|| handler_err(format!("vring index {index} out of range")))
    }

    fn vmm_to_gpa(&self, vmm: u64) -> VuResult<u64> {
        self.mappings
            .iter()
            .find(|m| vmm >= m.vmm_addr && vmm - m.vmm_addr < m.size)
            .map(|m| vmm - m.vmm_addr + m.gpa_base)
            .ok_or_else(|| handler_err(format!("vring address {vmm:#x} is not in guest memory")))
    }

    fn event_idx(&self) -> bool {
        self.acked_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0
    }

    /// Hands a ring to its worker once it is configured, kicked and enabled.
    fn maybe_start(&mut self, index: usize) -> VuResult<()> {
        let v = &self.vrings[index];
        if v.running || !v.started || !v.enabled {
            return Ok(());
        }
        let Some(mem) = self.mem.clone() else {
            return Err(handler_err("vring started before any memory table"));
        };
        let desc = self.vmm_to_gpa(v.desc)?;
        let avail = self.vmm_to_gpa(v.avail)?;
        let used = self.vmm_to_gpa(v.used)?;
        let mut queue = Queue::new(MAX_QUEUE_SIZE).map_err(|e| handler_err(format!("{e:?}")))?;
        queue.set_size(v.size);
        queue
            .try_set_desc_table_address(GuestAddress(desc))
            .map_err(|e| handler_err(format!("descriptor table: {e:?}")))?;
        queue
            .try_set_avail_ring_address(GuestAddress(avail))
            .map_err(|e| handler_err(format!("available ring: {e:?}")))?;
        queue
            .try_set_used_ring_address(GuestAddress(used))
            .map_err(|e| handler_err(format!("used ring: {e:?}")))?;
        queue.set_event_idx(self.event_idx());
        queue.set_next_avail(v.base);
        queue.set_ready(true);
        let guard = mem.memory();
        if !queue.is_valid(&*guard) {
            return Err(handler_err(format!(
                "vring {index} lies outside guest memory"
            )));
        }
        // Resume where the guest's used ring says we are: after a reconnect
        // this is the frontend's truth, not ours.
        let used_idx = queue
            .used_idx(&*guard, Ordering::Acquire)
            .map_err(|e| handler_err(format!("used ring: {e:?}")))?;
        queue.set_next_used(used_idx.0);
        drop(guard);

        let channel = self
            .bdev
            .open_channel(u32::from(v.size))
            .map_err(|e| handler_err(format!("bdev channel: {e}")))?;
        let v = &mut self.vrings[index];
        let kick = v
            .kick
            .as_ref()
            .map(File::try_clone)
            .transpose()
            .map_err(VuError::ReqHandlerError)?;
        let call = v
            .call
            .as_ref()
            .map(File::try_clone)
            .transpose()
            .map_err(VuError::ReqHandlerError)?;
        v.running = true;
        let start = QueueStart {
            index: index as u16,
            queue,
            mem,
            kick,
            call,
            channel,
            counters: self.bdev.iostat().register_channel(),
        };
        let worker = &self.workers[index % self.workers.len()];
        worker.send(WorkerCmd::Start(Box::new(start)));
        debug!(
            queue = index,
            size = self.vrings[index].size,
            "vring started"
        );
        Ok(())
    }

    /// Takes a ring back from its worker after its requests have finished;
    /// records where it stopped.
    fn stop_ring(&mut self, index: usize) -> VuResult<()> {
        if !self.vrings[index].running {
            return Ok(());
        }
        let (tx, rx) = crossbeam::channel::bounded(1);
        self.workers[index % self.workers.len()].send(WorkerCmd::Stop {
            index: index as u16,
            reply: tx,
        });
        let stopped = rx
            .recv_timeout(STOP_TIMEOUT)
            .map_err(|_| handler_err(format!("vring {index} did not drain in {STOP_TIMEOUT:?}")))?;
        let v = &mut self.vrings[index];
        v.running = false;
        v.base = stopped.next_avail;
        Ok(())
    }

    fn replace_memory(&mut self, mem: GuestMem) {
        match &self.mem {
            Some(atomic) => {
                // Workers pick the new table up at their next load; requests
                // in flight keep the old mapping alive through their slots.
                let guard = atomic.lock().unwrap_or_else(|e| e.into_inner());
                guard.replace(mem);
            }
            None => self.mem = Some(GuestMemoryAtomic::new(mem)),
        }
    }

    fn current_memory(&self) -> GuestMem {
        match &self.mem {
            Some(m) => (*m.memory()).clone(),
            None => GuestMem::default(),
        }
    }
}

impl VhostUserBackendReqHandlerMut for BlkBackend {
    fn set_owner(&mut self) -> VuResult<()> {
        if self.owned {
            return Err(VuError::InvalidOperation("already owned"));
        }
        self.owned = true;
        Ok(())
    }

    fn reset_owner(&mut self) -> VuResult<()> {
        self.reset();
        Ok(())
    }

    fn reset_device(&mut self) -> VuResult<()> {
        let protocol = self.acked_protocol;
        let mem = self.mem.take();
        let mappings = std::mem::take(&mut self.mappings);
        self.reset();
        // RESET_DEVICE resets the device, not the session.
        self.owned = true;
        self.acked_protocol = protocol;
        self.mem = mem;
        self.mappings = mappings;
        Ok(())
    }

    fn get_features(&mut self) -> VuResult<u64> {
        Ok(self.features)
    }

    fn set_features(&mut self, features: u64) -> VuResult<()> {
        if features & !self.features != 0 {
            return Err(VuError::InvalidParam);
        }
        self.acked_features = features;
        // Without protocol features a ring is enabled as soon as it starts.
        let enabled = features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0;
        for v in &mut self.vrings {
            if enabled {
                v.enabled = true;
            }
        }
        if features & (1 << VIRTIO_BLK_F_CONFIG_WCE) == 0 {
            // A driver that cannot switch the cache must get the safe mode
            // the bdev implies: write-back only if FLUSH was negotiated.
            let flush =
                features & (1 << virtio_bindings::bindings::virtio_blk::VIRTIO_BLK_F_FLUSH) != 0;
            self.dev.writeback.store(
                flush && self.bdev.info().caps.volatile_cache,
                Ordering::Relaxed,
            );
        }
        debug!("features acked: {features:#x}");
        Ok(())
    }

    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        _postcopy_listening: Option<bool>,
    ) -> VuResult<Option<Vec<VhostUserMemoryRegionBase>>> {
        let mut regions = Vec::with_capacity(ctx.len());
        let mut mappings = Vec::with_capacity(ctx.len());
        for (region, file) in ctx.iter().zip(files) {
            let r = GuestRegionMmap::new(
                region.mmap_region(file)?,
                GuestAddress(region.guest_phys_addr),
            )
            .ok_or_else(|| handler_err("memory region overflows the address space"))?;
            regions.push(r);
            mappings.push(AddrMapping {
                vmm_addr: region.user_addr,
                size: region.memory_size,
                gpa_base: region.guest_phys_addr,
            });
        }
        let mem = GuestMem::from_regions(regions)
            .map_err(|e| handler_err(format!("memory table: {e}")))?;
        self.replace_memory(mem);
        self.mappings = mappings;
        Ok(None)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> VuResult<()> {
        if num == 0 || num > u32::from(MAX_QUEUE_SIZE) || !num.is_power_of_two() {
            return Err(VuError::InvalidParam);
        }
        self.vring(index)?.size = num as u16;
        Ok(())
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        _flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> VuResult<()> {
        let v = self.vring(index)?;
        v.desc = descriptor;
        v.used = used;
        v.avail = available;
        Ok(())
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> VuResult<()> {
        self.vring(index)?.base = base as u16;
        Ok(())
    }

    fn get_vring_base(&mut self, index: u32) -> VuResult<VhostUserVringState> {
        self.vring(index)?;
        self.stop_ring(index as usize)?;
        let v = &mut self.vrings[index as usize];
        v.started = false;
        v.kick = None;
        Ok(VhostUserVringState::new(index, u32::from(v.base)))
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        let v = self.vring(u32::from(index))?;
        if let Some(f) = &fd {
            set_nonblocking(f).map_err(VuError::ReqHandlerError)?;
        }
        v.kick = fd;
        v.started = true;
        self.maybe_start(index as usize)
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        let v = self.vring(u32::from(index))?;
        v.call = fd;
        if v.running {
            let call = v
                .call
                .as_ref()
                .map(File::try_clone)
                .transpose()
                .map_err(VuError::ReqHandlerError)?;
            self.workers[index as usize % self.workers.len()].send(WorkerCmd::SetCall {
                index: u16::from(index),
                call,
            });
        }
        Ok(())
    }

    fn set_vring_err(&mut self, index: u8, _fd: Option<File>) -> VuResult<()> {
        // Errors are reported in logs and counters, not through the err fd.
        self.vring(u32::from(index)).map(|_| ())
    }

    fn get_protocol_features(&mut self) -> VuResult<VhostUserProtocolFeatures> {
        Ok(Self::protocol_features())
    }

    fn set_protocol_features(&mut self, features: u64) -> VuResult<()> {
        let f = VhostUserProtocolFeatures::from_bits(features).ok_or(VuError::InvalidParam)?;
        if !Self::protocol_features().contains(f) {
            return Err(VuError::InvalidParam);
        }
        self.acked_protocol = f;
        Ok(())
    }

    fn get_queue_num(&mut self) -> VuResult<u64> {
        Ok(u64::from(self.max_queues))
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> VuResult<()> {
        self.vring(index)?.enabled = enable;
        if enable {
            self.maybe_start(index as usize)
        } else {
            self.stop_ring(index as usize)
        }
    }

    fn get_config(
        &mut self,
        offset: u32,
        size: u32,
        _flags: VhostUserConfigFlags,
    ) -> VuResult<Vec<u8>> {
        let cfg = config_space(
            self.bdev.info(),
            self.read_only,
            self.max_queues,
            self.dev.writeback.load(Ordering::Relaxed),
        );
        let start = offset as usize;
        let end = start
            .checked_add(size as usize)
            .ok_or(VuError::InvalidParam)?;
        if end > cfg.len() {
            return Err(VuError::InvalidParam);
        }
        Ok(cfg[start..end].to_vec())
    }

    fn set_config(
        &mut self,
        offset: u32,
        buf: &[u8],
        _flags: VhostUserConfigFlags,
    ) -> VuResult<()> {
        // The only writable field is the cache mode, and only with CONFIG_WCE.
        let wce_acked = self.acked_features & (1 << VIRTIO_BLK_F_CONFIG_WCE) != 0;
        if offset as usize != WCE_OFFSET || buf.len() != 1 || !wce_acked {
            return Err(VuError::InvalidParam);
        }
        let writeback = buf[0] != 0;
        info!(writeback, "guest switched the write cache mode");
        self.dev.writeback.store(writeback, Ordering::Relaxed);
        Ok(())
    }

    fn set_backend_req_fd(&mut self, _backend: Backend) {}

    fn set_gpu_socket(&mut self, _gpu_backend: vhost::vhost_user::GpuBackend) -> VuResult<()> {
        Err(VuError::InvalidOperation("not a GPU device"))
    }

    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> VuResult<File> {
        Err(VuError::InvalidOperation(
            "shared objects are not supported",
        ))
    }

    fn get_inflight_fd(
        &mut self,
        _inflight: &VhostUserInflight,
    ) -> VuResult<(VhostUserInflight, File)> {
        // Not offered (INFLIGHT_SHMFD is not in our protocol features); this
        // is where the shared inflight region will be created.
        Err(VuError::InvalidOperation(
            "INFLIGHT_SHMFD is not implemented yet",
        ))
    }

    fn set_inflight_fd(&mut self, _inflight: &VhostUserInflight, _file: File) -> VuResult<()> {
        Err(VuError::InvalidOperation(
            "INFLIGHT_SHMFD is not implemented yet",
        ))
    }

    fn get_max_mem_slots(&mut self) -> VuResult<u64> {
        Ok(MAX_MEM_SLOTS)
    }

    fn add_mem_region(
        &mut self,
        region: &VhostUserSingleMemoryRegion,
        fd: File,
        _postcopy_listening: Option<bool>,
    ) -> VuResult<Option<VhostUserMemoryRegionBase>> {
        if self.mappings.len() as u64 >= MAX_MEM_SLOTS {
            return Err(handler_err("all memory slots are in use"));
        }
        let r = GuestRegionMmap::new(
            region.mmap_region(fd)?,
            GuestAddress(region.guest_phys_addr),
        )
        .ok_or_else(|| handler_err("memory region overflows the address space"))?;
        let mem = self
            .current_memory()
            .insert_region(Arc::new(r))
            .map_err(|e| handler_err(format!("add memory region: {e}")))?;
        self.replace_memory(mem);
        let (gpa, size) = (region.guest_phys_addr, region.memory_size);
        debug!(gpa, size, "memory region added");
        self.mappings.push(AddrMapping {
            vmm_addr: region.user_addr,
            size: region.memory_size,
            gpa_base: region.guest_phys_addr,
        });
        Ok(None)
    }

    fn remove_mem_region(&mut self, region: &VhostUserSingleMemoryRegion) -> VuResult<()> {
        let (mem, _removed) = self
            .current_memory()
            .remove_region(GuestAddress(region.guest_phys_addr), region.memory_size)
            .map_err(|e| handler_err(format!("remove memory region: {e}")))?;
        self.replace_memory(mem);
        self.mappings
            .retain(|m| m.gpa_base != region.guest_phys_addr);
        Ok(())
    }

    fn set_device_state_fd(
        &mut self,
        _direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        _fd: File,
    ) -> VuResult<Option<File>> {
        Err(VuError::InvalidOperation(
            "device state transfer is not supported",
        ))
    }

    fn check_device_state(&mut self) -> VuResult<()> {
        Err(VuError::InvalidOperation(
            "device state transfer is not supported",
        ))
    }

    fn get_shmem_config(&mut self) -> VuResult<VhostUserShMemConfig> {
        Err(VuError::InvalidOperation("no shared memory regions"))
    }

    fn set_log_base(&mut self, _log: &VhostUserLog, _file: File) -> VuResult<()> {
        Err(VuError::InvalidOperation(
            "dirty logging (live migration) is not supported",
        ))
    }
}

/// Whether a `handle_request` error means the connection is gone or
/// desynchronised (end the session) rather than one refused request.
pub fn is_transport_error(e: &VuError) -> bool {
    !matches!(
        e,
        VuError::InvalidParam
            | VuError::InvalidOperation(_)
            | VuError::InactiveFeature(_)
            | VuError::InactiveOperation(_)
            | VuError::FeatureMismatch
            | VuError::ReqHandlerError(_)
    )
}
