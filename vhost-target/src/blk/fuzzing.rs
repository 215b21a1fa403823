//! One entry point for fuzzing the request path, shared by the `cargo fuzz`
//! target (`vhost-target/fuzz`) and a proptest that runs in every test run.
//!
//! The input lays out a descriptor table, the avail ring's head and guest
//! memory; the chain is walked by `virtio-queue` exactly as a worker does
//! (indirect tables, loops, bad indices) and parsed. The harness asserts the
//! parser's promises: every host iovec lies inside guest memory and the
//! status byte, if any, is in guest memory.

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::config::DeviceGeometry;
use super::request::{parse_request, Action, GuestMem, MAX_IOVS};

const MEM_BASE: u64 = 0x10000;
const MEM_SIZE: usize = 0x10000;
const DESC_TABLE: u64 = MEM_BASE;
const AVAIL_RING: u64 = MEM_BASE + 0x1000;
const USED_RING: u64 = MEM_BASE + 0x2000;
const PAYLOAD: u64 = MEM_BASE + 0x3000;
const QUEUE_SIZE: u16 = 16;

/// Runs one fuzz input. Panics only if the parser broke a promise.
pub fn fuzz_request(data: &[u8]) {
    let Ok(mem) = GuestMem::from_ranges(&[(GuestAddress(MEM_BASE), MEM_SIZE)]) else {
        return;
    };
    let (head, rest) = data.split_first().unwrap_or((&0, &[]));
    let (ro, rest) = rest.split_first().unwrap_or((&0, &[]));
    let table_len = (usize::from(QUEUE_SIZE) * 16).min(rest.len());
    let _ = mem.write_slice(&rest[..table_len], GuestAddress(DESC_TABLE));
    let payload = &rest[table_len..];
    let payload = &payload[..payload.len().min(MEM_SIZE - 0x3000)];
    let _ = mem.write_slice(payload, GuestAddress(PAYLOAD));
    // One available chain, headed by the input's choice.
    let _ = mem.write_obj(0u16, GuestAddress(AVAIL_RING));
    let _ = mem.write_obj(1u16, GuestAddress(AVAIL_RING + 2));
    let _ = mem.write_obj(u16::from(*head), GuestAddress(AVAIL_RING + 4));

    let Ok(mut q) = Queue::new(QUEUE_SIZE) else {
        return;
    };
    q.set_size(QUEUE_SIZE);
    q.set_desc_table_address(Some(DESC_TABLE as u32), Some(0));
    q.set_avail_ring_address(Some(AVAIL_RING as u32), Some(0));
    q.set_used_ring_address(Some(USED_RING as u32), Some(0));
    q.set_ready(true);
    let geo = DeviceGeometry {
        capacity_bytes: 1 << 20,
        block_size: if ro & 1 == 0 { 512 } else { 4096 },
        read_only: ro & 2 != 0,
        flush: ro & 4 == 0,
        discard: ro & 8 == 0,
        write_zeroes: ro & 16 == 0,
    };
    let mut iovs = [libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    }; MAX_IOVS];
    let Some(chain) = q.pop_descriptor_chain(&mem) else {
        return;
    };
    let p = parse_request(chain, &mem, &geo, &mut iovs);
    let base = mem
        .get_host_address(GuestAddress(MEM_BASE))
        .map(|p| p as usize)
        .unwrap_or(0);
    if let Action::Io { iovcnt, .. } | Action::GetId { iovcnt, .. } = p.action {
        for iov in &iovs[..iovcnt as usize] {
            let start = iov.iov_base as usize;
            assert!(start >= base && start + iov.iov_len <= base + MEM_SIZE);
        }
    }
    if let Some(s) = p.status {
        assert!(mem.check_range(s, 1));
    }
}

#[cfg(test)]
mod tests {
    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]
        #[test]
        fn random_rings_never_break_the_parser(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600)) {
            super::fuzz_request(&data);
        }
    }
}
