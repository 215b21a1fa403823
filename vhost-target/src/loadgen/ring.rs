//! The driver side of a virtio 1.x split virtqueue, laid out in [`GuestMemory`].
//!
//! We are the guest here: we own the descriptor table and the available ring, the backend
//! owns the used ring. Index fields shared with the backend are accessed as atomics, with a
//! release fence before publishing `avail.idx` (so the backend sees the descriptors and ring
//! entry first) and an acquire fence after reading `used.idx` (so we see the used element
//! and the data the backend wrote before it).

use std::sync::atomic::{fence, AtomicU16, Ordering};
use std::sync::Arc;

use super::memory::GuestMemory;
use super::LoadgenError;

/// Descriptor continues via `next`.
pub const VIRTQ_DESC_F_NEXT: u16 = 1;
/// Buffer is device-writable (device-readable otherwise).
pub const VIRTQ_DESC_F_WRITE: u16 = 2;
/// Buffer holds an indirect descriptor table.
pub const VIRTQ_DESC_F_INDIRECT: u16 = 4;
/// avail.flags: please do not interrupt (without EVENT_IDX).
pub const VRING_AVAIL_F_NO_INTERRUPT: u16 = 1;
/// used.flags: please do not kick (without EVENT_IDX).
pub const VRING_USED_F_NO_NOTIFY: u16 = 1;

/// One descriptor as laid out in the table (and in indirect tables).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Desc {
    /// Guest physical address of the buffer.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// `VIRTQ_DESC_F_*`.
    pub flags: u16,
    /// Index of the next descriptor when `flags` has `VIRTQ_DESC_F_NEXT`.
    pub next: u16,
}

impl Desc {
    /// The 16 bytes of the descriptor in guest memory (little endian).
    pub fn to_bytes(self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&self.addr.to_le_bytes());
        b[8..12].copy_from_slice(&self.len.to_le_bytes());
        b[12..14].copy_from_slice(&self.flags.to_le_bytes());
        b[14..16].copy_from_slice(&self.next.to_le_bytes());
        b
    }
}

/// A completed element of the used ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UsedElem {
    /// Head descriptor index the backend returned.
    pub id: u32,
    /// Bytes the backend says it wrote into the chain.
    pub len: u32,
}

/// `vring_need_event` from the virtio spec: with EVENT_IDX, the other side wants a
/// notification if `event` lies in the window `[old, new)` of indices just published.
/// All arithmetic wraps at 2^16.
pub fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// Guest-physical and host addresses of the three parts of a split ring.
#[derive(Debug, Clone, Copy)]
pub struct RingAddrs {
    /// Descriptor table.
    pub desc: u64,
    /// Available ring.
    pub avail: u64,
    /// Used ring.
    pub used: u64,
}

/// A split virtqueue, driver side. Owns its descriptor free list; not `Sync` (one thread).
pub struct SplitQueue {
    mem: Arc<GuestMemory>,
    size: u16,
    gpa: RingAddrs,
    desc: *mut u8,
    avail: *mut u8,
    used: *mut u8,
    event_idx: bool,
    /// Free descriptor indices (a stack, preallocated to `size`).
    free: Vec<u16>,
    /// Our own copy of the chain links, so freeing never trusts guest-visible memory that a
    /// raw test may have laid out as a loop.
    shadow_next: Vec<u16>,
    /// Number of descriptors of the chain whose head is the index; 0 if not outstanding.
    chain_len: Vec<u16>,
    /// Next value of `avail.idx` (what we will publish).
    avail_idx: u16,
    /// `avail.idx` at the last kick decision.
    kicked_idx: u16,
    /// Next used index we will consume.
    last_used: u16,
    /// Whether we ask the backend to signal the call eventfd.
    interrupts: bool,
}

// SAFETY: the raw pointers point into `mem`, which the queue keeps alive through its `Arc`
// and which is `Sync`; a queue is used by one thread at a time (`&mut self` for everything
// that touches the ring).
unsafe impl Send for SplitQueue {}

impl SplitQueue {
    /// Lays out a queue of `size` entries (a power of two up to 32768) in `mem`.
    pub fn new(mem: Arc<GuestMemory>, size: u16, event_idx: bool) -> Result<Self, LoadgenError> {
        if size == 0 || !size.is_power_of_two() || size > 32768 {
            return Err(LoadgenError::InvalidArgument(format!(
                "queue size {size} is not a power of two in 1..=32768"
            )));
        }
        let n = u64::from(size);
        let desc = mem.alloc(16 * n, 4096)?;
        // Avail: flags, idx, ring[n], used_event.
        let avail = mem.alloc(6 + 2 * n, 64)?;
        // Used: flags, idx, ring[n] of (id u32, len u32), avail_event. Own cache lines, since
        // the backend writes it while we write the avail ring.
        let used = mem.alloc(6 + 8 * n, 4096)?;
        let q = Self {
            desc: mem.host_addr(desc)?,
            avail: mem.host_addr(avail)?,
            used: mem.host_addr(used)?,
            gpa: RingAddrs { desc, avail, used },
            mem,
            size,
            event_idx,
            free: (0..size).rev().collect(),
            shadow_next: vec![0; size as usize],
            chain_len: vec![0; size as usize],
            avail_idx: 0,
            kicked_idx: 0,
            last_used: 0,
            interrupts: true,
        };
        Ok(q)
    }

    /// Queue size (number of descriptors).
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Guest physical addresses of the ring parts.
    pub fn gpa(&self) -> RingAddrs {
        self.gpa
    }

    /// Host (frontend user) addresses of the ring parts, as `SET_VRING_ADDR` wants them.
    pub fn user_addrs(&self) -> RingAddrs {
        RingAddrs {
            desc: self.desc as u64,
            avail: self.avail as u64,
            used: self.used as u64,
        }
    }

    /// The guest memory this queue lives in.
    pub fn mem(&self) -> &Arc<GuestMemory> {
        &self.mem
    }

    /// Number of free descriptors.
    pub fn free_descs(&self) -> usize {
        self.free.len()
    }

    /// Chains made available and not yet seen in the used ring.
    pub fn in_flight(&self) -> u16 {
        self.avail_idx.wrapping_sub(self.last_used)
    }

    fn u16_at(&self, base: *mut u8, off: usize) -> &AtomicU16 {
        // SAFETY: callers pass offsets inside the ring parts allocated in `new` (all u16
        // fields are 2-aligned because each part starts 64-aligned); the memory lives as
        // long as `self.mem`, and AtomicU16 has the layout of u16.
        unsafe { &*(base.add(off) as *const AtomicU16) }
    }

    /// Writes descriptor `index` of the table verbatim.
    pub fn write_desc(&mut self, index: u16, d: Desc) {
        assert!(index < self.size, "descriptor index out of the table");
        let b = d.to_bytes();
        // SAFETY: `index < size`, so the 16 bytes are inside the table allocated in `new`.
        unsafe {
            std::ptr::copy_nonoverlapping(b.as_ptr(), self.desc.add(16 * index as usize), 16)
        };
    }

    /// Takes `descs.len()` free descriptors and writes a chain; `descs[i].next` is an index
    /// into `descs` (rewritten to the table index) when it is `< descs.len()`, and written
    /// verbatim otherwise. Flags are written as given (add `VIRTQ_DESC_F_NEXT` yourself).
    /// Returns the head index. Does not make the chain available: see [`Self::push_avail`].
    pub fn add_chain(&mut self, descs: &[Desc]) -> Result<u16, LoadgenError> {
        let n = descs.len();
        if n == 0 || n > self.free.len() {
            return Err(LoadgenError::QueueFull);
        }
        // Table indices of the chain, in order; kept on the stack (no allocation).
        let base = self.free.len() - n;
        for (i, &d) in descs.iter().enumerate() {
            let idx = self.free[self.free.len() - 1 - i];
            let next = if (d.next as usize) < n {
                self.free[self.free.len() - 1 - d.next as usize]
            } else {
                d.next
            };
            self.write_desc(idx, Desc { next, ..d });
            // For freeing, the chain is the order given, whatever the links say.
            if i + 1 < n {
                self.shadow_next[idx as usize] = self.free[self.free.len() - 2 - i];
            }
        }
        let head = self.free[self.free.len() - 1];
        self.free.truncate(base);
        self.chain_len[head as usize] = n as u16;
        Ok(head)
    }

    /// Adds a well-formed chain (`NEXT` flags and links filled in here) and returns its head.
    pub fn add_linked(&mut self, bufs: &[(u64, u32, bool)]) -> Result<u16, LoadgenError> {
        let n = bufs.len();
        if n == 0 || n > self.free.len() || n > 16 {
            return Err(LoadgenError::QueueFull);
        }
        let mut descs = [Desc::default(); 16];
        for (i, &(addr, len, writable)) in bufs.iter().enumerate() {
            let mut flags = if writable { VIRTQ_DESC_F_WRITE } else { 0 };
            if i + 1 < n {
                flags |= VIRTQ_DESC_F_NEXT;
            }
            descs[i] = Desc {
                addr,
                len,
                flags,
                next: (i + 1) as u16,
            };
        }
        self.add_chain(&descs[..n])
    }

    /// Puts `head` in the next avail ring slot. Not visible to the backend until
    /// [`Self::publish`].
    pub fn push_avail(&mut self, head: u16) {
        let slot = 4 + 2 * (self.avail_idx % self.size) as usize;
        self.u16_at(self.avail, slot).store(head, Ordering::Relaxed);
        self.avail_idx = self.avail_idx.wrapping_add(1);
    }

    /// Publishes every pushed head: release fence, then `avail.idx`.
    pub fn publish(&mut self) {
        fence(Ordering::Release);
        self.u16_at(self.avail, 2)
            .store(self.avail_idx, Ordering::Release);
    }

    /// Whether the backend wants a kick for what was published since the last call.
    /// Honors `avail_event` with EVENT_IDX, `VRING_USED_F_NO_NOTIFY` without.
    pub fn needs_kick(&mut self) -> bool {
        // Full fence: our avail.idx store must be visible before we read the backend's
        // suppression state, or both sides may decide the other will act (lost wakeup).
        fence(Ordering::SeqCst);
        let old = self.kicked_idx;
        let new = self.avail_idx;
        self.kicked_idx = new;
        if old == new {
            return false;
        }
        if self.event_idx {
            let avail_event = self
                .u16_at(self.used, 4 + 8 * self.size as usize)
                .load(Ordering::Relaxed);
            need_event(avail_event, new, old)
        } else {
            self.u16_at(self.used, 0).load(Ordering::Relaxed) & VRING_USED_F_NO_NOTIFY == 0
        }
    }

    /// Asks the backend to signal (or not) the call eventfd on completions. Off for
    /// busy-polling: the backend then skips the eventfd write syscall.
    pub fn set_interrupts(&mut self, on: bool) {
        self.interrupts = on;
        let flags = if on { 0 } else { VRING_AVAIL_F_NO_INTERRUPT };
        self.u16_at(self.avail, 0).store(flags, Ordering::Relaxed);
        self.update_used_event();
        fence(Ordering::SeqCst);
    }

    fn update_used_event(&mut self) {
        if self.event_idx {
            // Signal when the element at `last_used` is published; when off, pick an index
            // the backend has already passed, so it is not reached for the next 64K entries.
            let ev = if self.interrupts {
                self.last_used
            } else {
                self.last_used.wrapping_sub(1)
            };
            self.u16_at(self.avail, 4 + 2 * self.size as usize)
                .store(ev, Ordering::Relaxed);
        }
    }

    /// The used index the backend has published.
    pub fn used_idx(&self) -> u16 {
        self.u16_at(self.used, 2).load(Ordering::Acquire)
    }

    /// Takes the next used element, if any, and frees its chain's descriptors when the id
    /// names an outstanding head. An id that does not is returned as is (the caller decides
    /// what a bogus id means).
    pub fn pop_used(&mut self) -> Option<UsedElem> {
        if self.used_idx() == self.last_used {
            return None;
        }
        fence(Ordering::Acquire);
        let off = 4 + 8 * (self.last_used % self.size) as usize;
        // SAFETY: `off` is inside the used ring allocated in `new`; volatile because the
        // backend writes it; u32 fields are 4-aligned (ring starts 4096-aligned).
        let (id, len) = unsafe {
            (
                std::ptr::read_volatile(self.used.add(off) as *const u32),
                std::ptr::read_volatile(self.used.add(off + 4) as *const u32),
            )
        };
        self.last_used = self.last_used.wrapping_add(1);
        if self.interrupts {
            self.update_used_event();
        }
        self.free_chain(id);
        Some(UsedElem {
            id: u32::from_le(id),
            len: u32::from_le(len),
        })
    }

    /// Re-arms interrupts and reports whether a used element arrived meanwhile (then the
    /// caller must not sleep on the call eventfd).
    pub fn arm_and_check(&mut self) -> bool {
        self.update_used_event();
        fence(Ordering::SeqCst);
        self.used_idx() != self.last_used
    }

    fn free_chain(&mut self, id: u32) {
        let Some(&n) = self.chain_len.get(id as usize) else {
            return;
        };
        if n == 0 {
            return;
        }
        self.chain_len[id as usize] = 0;
        let mut idx = id as u16;
        for i in 0..n {
            self.free.push(idx);
            if i + 1 < n {
                idx = self.shadow_next[idx as usize];
            }
        }
    }

    /// Whether `head` is a chain that was added and not yet returned.
    pub fn is_outstanding(&self, head: u32) -> bool {
        self.chain_len.get(head as usize).is_some_and(|&n| n > 0)
    }

    /// Test hook: start the ring indices at `idx` (both sides must agree: the backend gets
    /// the same value through `SET_VRING_BASE`). Used to test wraparound past 65535.
    pub fn set_base(&mut self, idx: u16) {
        self.avail_idx = idx;
        self.kicked_idx = idx;
        self.last_used = idx;
        self.u16_at(self.avail, 2).store(idx, Ordering::Relaxed);
        self.u16_at(self.used, 2).store(idx, Ordering::Relaxed);
        // As a device that has drained the ring up to `idx` would have left it; a zero
        // here would suppress the first kick after a nonzero base.
        self.u16_at(self.used, 4 + 8 * self.size as usize)
            .store(idx, Ordering::Relaxed);
        self.update_used_event();
    }

    /// Test hook: act as the device and put `elem` in the used ring (unit tests only).
    #[cfg(test)]
    fn device_push_used(&mut self, at: u16, elem: UsedElem) {
        let off = 4 + 8 * (at % self.size) as usize;
        // SAFETY: inside the used ring.
        unsafe {
            std::ptr::write_volatile(self.used.add(off) as *mut u32, elem.id);
            std::ptr::write_volatile(self.used.add(off + 4) as *mut u32, elem.len);
        }
        self.u16_at(self.used, 2)
            .store(at.wrapping_add(1), Ordering::Release);
    }

    /// Test hook: the avail ring entry the device would read at `at`.
    #[cfg(test)]
    fn device_avail(&self, at: u16) -> (u16, u16) {
        let idx = self.u16_at(self.avail, 2).load(Ordering::Acquire);
        let head = self
            .u16_at(self.avail, 4 + 2 * (at % self.size) as usize)
            .load(Ordering::Relaxed);
        (idx, head)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue(size: u16, event_idx: bool) -> SplitQueue {
        let mem = Arc::new(GuestMemory::new(4 << 20, 1).unwrap());
        SplitQueue::new(mem, size, event_idx).unwrap()
    }

    #[test]
    fn need_event_matches_spec_including_wrap() {
        // Event just published: notify.
        assert!(need_event(5, 6, 5));
        // Event not reached yet.
        assert!(!need_event(10, 6, 5));
        // Event already passed before this batch.
        assert!(!need_event(4, 6, 5));
        // Window across the 16-bit wrap.
        assert!(need_event(0xffff, 2, 0xfffe));
        assert!(need_event(0, 2, 0xfffe));
        assert!(need_event(1, 2, 0xfffe));
        assert!(!need_event(2, 2, 0xfffe));
        assert!(!need_event(0xfffd, 2, 0xfffe));
        // Nothing new: never.
        assert!(!need_event(7, 7, 7));
    }

    #[test]
    fn chains_cycle_through_index_wraparound() {
        let mut q = queue(8, true);
        q.set_base(0xfff0);
        let mut expect_at = 0xfff0u16;
        for round in 0..40u32 {
            let h1 = q
                .add_linked(&[(0x1000, 16, false), (0x2000, 1, true)])
                .unwrap();
            let h2 = q.add_linked(&[(0x3000, 16, false)]).unwrap();
            q.push_avail(h1);
            q.push_avail(h2);
            q.publish();
            let (idx, head) = q.device_avail(expect_at);
            assert_eq!(idx, expect_at.wrapping_add(2));
            assert_eq!(head, h1);
            q.device_push_used(
                expect_at,
                UsedElem {
                    id: h2.into(),
                    len: round,
                },
            );
            q.device_push_used(
                expect_at.wrapping_add(1),
                UsedElem {
                    id: h1.into(),
                    len: 1,
                },
            );
            assert_eq!(q.pop_used().unwrap().id, u32::from(h2));
            assert_eq!(q.pop_used().unwrap().id, u32::from(h1));
            assert!(q.pop_used().is_none());
            assert_eq!(q.free_descs(), 8);
            expect_at = expect_at.wrapping_add(2);
        }
        // 80 entries from 0xfff0 went past 65535.
        assert!(expect_at < 0xfff0);
    }

    #[test]
    fn kick_honors_avail_event() {
        let mut q = queue(8, true);
        let h = q.add_linked(&[(0x1000, 16, false)]).unwrap();
        q.push_avail(h);
        q.publish();
        // avail_event = 0 (initial): the device wants to hear about entry 0.
        assert!(q.needs_kick());
        // Device says: wake me at entry 5; publishing entry 1 needs no kick.
        let ae = 4 + 8 * 8;
        q.u16_at(q.used, ae).store(5, Ordering::Relaxed);
        let h = q.add_linked(&[(0x1000, 16, false)]).unwrap();
        q.push_avail(h);
        q.publish();
        assert!(!q.needs_kick());
        // Nothing new published: no kick.
        assert!(!q.needs_kick());
    }

    #[test]
    fn kick_honors_no_notify_without_event_idx() {
        let mut q = queue(8, false);
        let h = q.add_linked(&[(0x1000, 16, false)]).unwrap();
        q.push_avail(h);
        q.publish();
        assert!(q.needs_kick());
        q.u16_at(q.used, 0)
            .store(VRING_USED_F_NO_NOTIFY, Ordering::Relaxed);
        let h = q.add_linked(&[(0x1000, 16, false)]).unwrap();
        q.push_avail(h);
        q.publish();
        assert!(!q.needs_kick());
    }

    #[test]
    fn raw_chain_links_are_relative_and_bogus_ids_do_not_free() {
        let mut q = queue(8, false);
        // A loop: 0 -> 1 -> 0.
        let d = [
            Desc {
                addr: 1,
                len: 1,
                flags: VIRTQ_DESC_F_NEXT,
                next: 1,
            },
            Desc {
                addr: 2,
                len: 1,
                flags: VIRTQ_DESC_F_NEXT,
                next: 0,
            },
        ];
        let h = q.add_chain(&d).unwrap();
        assert_eq!(q.free_descs(), 6);
        q.push_avail(h);
        q.publish();
        q.device_push_used(0, UsedElem { id: 77, len: 0 });
        assert_eq!(q.pop_used().unwrap().id, 77);
        assert_eq!(q.free_descs(), 6);
        q.device_push_used(
            1,
            UsedElem {
                id: h.into(),
                len: 0,
            },
        );
        q.pop_used().unwrap();
        assert_eq!(q.free_descs(), 8);
        assert!(q.add_chain(&[Desc::default(); 9]).is_err());
    }
}
