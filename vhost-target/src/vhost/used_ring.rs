//! The device's half of a split virtqueue's used ring, published in batches.
//!
//! `virtio_queue::Queue::add_used` stores `used.idx` after every element. The
//! driver polls that index from another CPU, so each store moves its cache
//! line across CPUs; a worker that retires a batch of requests in one pass
//! needs only one. `UsedRing` writes the elements, then publishes the index
//! once per pass ([`UsedRing::publish`]), and decides on notifications the
//! way Linux's virtio_ring does (EVENT_IDX: `used_event` between the last
//! check and now; otherwise the driver's `VRING_AVAIL_F_NO_INTERRUPT` hint).

use std::num::Wrapping;
use std::sync::atomic::{fence, Ordering};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress};

use crate::blk::request::GuestMem;

/// `flags` bit of the avail ring: the driver does not want interrupts.
const VRING_AVAIL_F_NO_INTERRUPT: u16 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum UsedRingError {
    /// The head names no descriptor of the table (a corrupted avail ring).
    #[error("descriptor head {0} is outside the descriptor table")]
    BadHead(u16),
    /// The ring lies (partly) outside guest memory.
    #[error("the used or avail ring is not in guest memory")]
    Unmapped,
}

#[derive(Debug)]
pub struct UsedRing {
    used: GuestAddress,
    avail: GuestAddress,
    size: u16,
    event_idx: bool,
    /// Index the next element goes to (not yet visible to the driver).
    next: Wrapping<u16>,
    /// Value of `used.idx` in guest memory.
    published: Wrapping<u16>,
    /// `used.idx` at the last notification decision.
    signalled: Wrapping<u16>,
}

impl UsedRing {
    /// Continues where `queue`'s used index stands.
    pub fn new(queue: &Queue) -> Self {
        let next = Wrapping(queue.next_used());
        UsedRing {
            used: GuestAddress(queue.used_ring()),
            avail: GuestAddress(queue.avail_ring()),
            size: queue.size(),
            event_idx: queue.event_idx_enabled(),
            next,
            published: next,
            signalled: next,
        }
    }

    /// The used index after the elements pushed so far.
    pub fn next_used(&self) -> u16 {
        self.next.0
    }

    /// Writes one element; the driver sees it after [`Self::publish`].
    pub fn push(&mut self, mem: &GuestMem, head: u16, len: u32) -> Result<(), UsedRingError> {
        if head >= self.size {
            return Err(UsedRingError::BadHead(head));
        }
        let slot = u64::from(self.next.0 % self.size);
        let addr = self
            .used
            .checked_add(4 + 8 * slot)
            .ok_or(UsedRingError::Unmapped)?;
        // struct virtq_used_elem { le32 id; le32 len; }
        let elem = [u32::from(head).to_le(), len.to_le()];
        mem.write_obj(elem, addr)
            .map_err(|_| UsedRingError::Unmapped)?;
        self.next += Wrapping(1);
        Ok(())
    }

    /// Makes every pushed element visible: one release store of `used.idx`.
    pub fn publish(&mut self, mem: &GuestMem) -> Result<(), UsedRingError> {
        if self.next == self.published {
            return Ok(());
        }
        let addr = self.used.checked_add(2).ok_or(UsedRingError::Unmapped)?;
        mem.store(self.next.0.to_le(), addr, Ordering::Release)
            .map_err(|_| UsedRingError::Unmapped)?;
        self.published = self.next;
        Ok(())
    }

    /// Whether the driver wants a notification for what was published since
    /// the last call.
    pub fn needs_notification(&mut self, mem: &GuestMem) -> Result<bool, UsedRingError> {
        let new = self.published;
        let old = std::mem::replace(&mut self.signalled, new);
        if new == old {
            return Ok(false);
        }
        // The index store must be visible before we read the driver's wish,
        // or a driver that re-armed in between would sleep forever.
        fence(Ordering::SeqCst);
        if self.event_idx {
            let addr = self
                .avail
                .checked_add(4 + 2 * u64::from(self.size))
                .ok_or(UsedRingError::Unmapped)?;
            let used_event: u16 = mem
                .load(addr, Ordering::Relaxed)
                .map_err(|_| UsedRingError::Unmapped)?;
            let event = Wrapping(u16::from_le(used_event));
            // virtio 1.2, 2.7.10: notify when used_event is in [old, new).
            Ok(new - event - Wrapping(1) < new - old)
        } else {
            let flags: u16 = mem
                .load(self.avail, Ordering::Relaxed)
                .map_err(|_| UsedRingError::Unmapped)?;
            Ok(u16::from_le(flags) & VRING_AVAIL_F_NO_INTERRUPT == 0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    const DESC: u64 = 0x1000;
    const AVAIL: u64 = 0x2000;
    const USED: u64 = 0x3000;

    fn setup(size: u16, event_idx: bool) -> (GuestMem, UsedRing) {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let mut q = Queue::new(size).unwrap();
        q.set_desc_table_address(Some(DESC as u32), Some(0));
        q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
        q.set_used_ring_address(Some(USED as u32), Some(0));
        q.set_event_idx(event_idx);
        q.set_next_used(65534);
        (mem, UsedRing::new(&q))
    }

    fn used_idx(mem: &GuestMem) -> u16 {
        mem.read_obj(GuestAddress(USED + 2)).unwrap()
    }

    #[test]
    fn elements_become_visible_at_publish_with_one_index_store() {
        let (mem, mut r) = setup(8, false);
        mem.write_obj(0xaaaau16, GuestAddress(USED + 2)).unwrap();
        r.push(&mem, 3, 512).unwrap();
        r.push(&mem, 5, 1).unwrap();
        assert_eq!(used_idx(&mem), 0xaaaa, "nothing published yet");
        r.publish(&mem).unwrap();
        // The index wraps past 65535.
        assert_eq!(used_idx(&mem), 0);
        assert_eq!(r.next_used(), 0);
        // 65534 % 8 = 6, then 7.
        let e: [u32; 2] = mem.read_obj(GuestAddress(USED + 4 + 8 * 6)).unwrap();
        assert_eq!(e, [3, 512]);
        let e: [u32; 2] = mem.read_obj(GuestAddress(USED + 4 + 8 * 7)).unwrap();
        assert_eq!(e, [5, 1]);
    }

    #[test]
    fn a_head_outside_the_table_is_refused_and_writes_nothing() {
        let (mem, mut r) = setup(8, false);
        assert_eq!(r.push(&mem, 8, 0), Err(UsedRingError::BadHead(8)));
        r.publish(&mem).unwrap();
        assert_eq!(r.next_used(), 65534);
        assert_eq!(used_idx(&mem), 0, "index never stored");
    }

    #[test]
    fn event_idx_notifies_only_when_used_event_was_crossed() {
        let (mem, mut r) = setup(8, true);
        let used_event = GuestAddress(AVAIL + 4 + 2 * 8);
        // The driver wants to hear when element 65535 (the second) is used.
        mem.write_obj(65535u16, used_event).unwrap();
        r.push(&mem, 0, 0).unwrap();
        r.publish(&mem).unwrap();
        assert!(!r.needs_notification(&mem).unwrap(), "65534 < used_event");
        r.push(&mem, 1, 0).unwrap();
        r.push(&mem, 2, 0).unwrap();
        r.publish(&mem).unwrap();
        assert!(r.needs_notification(&mem).unwrap(), "65535 published");
        assert!(!r.needs_notification(&mem).unwrap(), "nothing new");
    }

    #[test]
    fn without_event_idx_the_no_interrupt_flag_is_honoured() {
        let (mem, mut r) = setup(8, false);
        mem.write_obj(VRING_AVAIL_F_NO_INTERRUPT, GuestAddress(AVAIL))
            .unwrap();
        r.push(&mem, 0, 0).unwrap();
        r.publish(&mem).unwrap();
        assert!(!r.needs_notification(&mem).unwrap());
        mem.write_obj(0u16, GuestAddress(AVAIL)).unwrap();
        r.push(&mem, 1, 0).unwrap();
        r.publish(&mem).unwrap();
        assert!(r.needs_notification(&mem).unwrap());
    }
}
