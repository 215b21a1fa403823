//! The measurement loop: one thread per queue, preallocated request slots, no allocation
//! per request.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use super::memory::GuestMemory;
use super::session::blk::*;
use super::session::Queue;
use super::LoadgenError;

/// Access pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RwMode {
    /// Random reads.
    Randread,
    /// Random writes.
    Randwrite,
    /// Sequential reads.
    Read,
    /// Sequential writes.
    Write,
    /// Random mix, `rwmixread` percent reads.
    Randrw,
}

impl RwMode {
    fn random(self) -> bool {
        matches!(self, Self::Randread | Self::Randwrite | Self::Randrw)
    }
    fn writes(self) -> bool {
        !matches!(self, Self::Randread | Self::Read)
    }
}

/// What one queue thread does.
#[derive(Debug, Clone)]
pub struct JobSpec {
    /// Pattern.
    pub rw: RwMode,
    /// Block size in bytes (multiple of 512).
    pub bs: u64,
    /// Requests in flight per queue.
    pub iodepth: u32,
    /// Byte range [0, size) the offsets fall in.
    pub size: u64,
    /// Stop after this long...
    pub runtime: Duration,
    /// ...or after this many requests per queue, whichever comes first.
    pub ios: Option<u64>,
    /// Busy-poll the used ring (no interrupts) instead of sleeping on the call eventfd.
    pub poll: bool,
    /// Percent reads for randrw.
    pub rwmixread: u32,
    /// Stamp writes and check reads.
    pub verify: bool,
    /// Seed of the offset generator.
    pub seed: u64,
}

/// What one queue thread measured.
pub struct JobResult {
    /// Completed requests.
    pub ios: u64,
    /// Bytes moved.
    pub bytes: u64,
    /// Requests that returned a status other than OK, or a bad used element.
    pub errors: u64,
    /// Verify mismatches.
    pub verify_failures: u64,
    /// Latency, nanoseconds.
    pub hist: Histogram<u64>,
    /// Wall time of the measurement.
    pub elapsed: Duration,
}

/// xorshift64*: cheap, good enough to spread offsets, reproducible from a seed.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// One preallocated request slot: header, data buffer, status byte in guest memory.
#[derive(Clone, Copy)]
struct Slot {
    hdr: u64,
    data: u64,
    status: u64,
    start: Option<Instant>,
    write: bool,
    block: u64,
    write_id: u32,
}

const MAGIC: u64 = 0x474c_4d45_444e_4154; // "TANDEMLG"

/// Fills `buf` with the verify stamp of (byte offset, write id) in every 512-byte sector.
pub fn stamp(buf: &mut [u8], offset: u64, write_id: u32) {
    for (i, sector) in buf.chunks_mut(512).enumerate() {
        let off = offset + 512 * i as u64;
        let word = off ^ (u64::from(write_id) << 40) ^ MAGIC;
        for (j, w) in sector.chunks_mut(8).enumerate() {
            let v = match j {
                0 => MAGIC,
                1 => off,
                2 => u64::from(write_id),
                _ => word.rotate_left(j as u32),
            };
            w.copy_from_slice(&v.to_le_bytes()[..w.len()]);
        }
    }
}

/// Runs one job on one queue until `stop` or the job's limits.
pub fn run_queue(
    mut q: Queue,
    mem: Arc<GuestMemory>,
    spec: &JobSpec,
    queue_no: u32,
    queues: u32,
    stop: &AtomicBool,
) -> Result<(Queue, JobResult), LoadgenError> {
    let depth = spec.iodepth as usize;
    if depth * 3 > q.ring().size() as usize {
        return Err(LoadgenError::InvalidArgument(format!(
            "iodepth {} needs a queue of at least {} entries",
            spec.iodepth,
            3 * spec.iodepth
        )));
    }
    let bs = spec.bs;
    let blocks = spec.size / bs;
    if blocks == 0 {
        return Err(LoadgenError::InvalidArgument(
            "size smaller than one block".into(),
        ));
    }
    let mut slots = Vec::with_capacity(depth);
    for _ in 0..depth {
        slots.push(Slot {
            hdr: mem.alloc(16, 16)?,
            data: mem.alloc(bs, 4096)?,
            status: mem.alloc(1, 1)?,
            start: None,
            write: false,
            block: 0,
            write_id: 0,
        });
    }
    // Head index -> slot, so a completion finds its slot without searching.
    let mut head_slot = vec![u32::MAX; q.ring().size() as usize];
    let mut free_slots: Vec<u32> = (0..depth as u32).collect();
    // Verify state: last completed write id per block this queue owns (0 = never), and
    // whether a request for the block is in flight (never two at once: their order would
    // be undefined).
    let (mut written, mut busy) = if spec.verify {
        (vec![0u32; blocks as usize], vec![false; blocks as usize])
    } else {
        (Vec::new(), Vec::new())
    };
    let mut scratch = if spec.verify {
        vec![0u8; bs as usize]
    } else {
        Vec::new()
    };
    let mut expect = scratch.clone();
    let mut next_write_id = 1u32;

    q.ring().set_interrupts(!spec.poll);
    let mut rng =
        Rng(spec.seed ^ (u64::from(queue_no) + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    // Sequential jobs: each queue walks its own slice of the range.
    let per_queue = (blocks / u64::from(queues)).max(1);
    let seq_base = (u64::from(queue_no) * per_queue) % blocks;
    let mut seq_next = 0u64;

    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)
        .map_err(|e| LoadgenError::InvalidArgument(e.to_string()))?;
    let (mut ios, mut issued, mut errors, mut verify_failures) = (0u64, 0u64, 0u64, 0u64);
    let limit = spec.ios.unwrap_or(u64::MAX);
    let started = Instant::now();
    let deadline = started + spec.runtime;
    let mut in_flight = 0usize;
    let mut check_clock = 0u32;
    let mut stopping = false;

    loop {
        // Submit until the depth is full.
        let mut pushed = false;
        while !stopping && issued < limit {
            let Some(&slot_no) = free_slots.last() else {
                break;
            };
            let mut block = if spec.rw.random() {
                rng.next() % blocks
            } else {
                let b = (seq_base + seq_next) % blocks;
                seq_next = (seq_next + 1) % per_queue;
                b
            };
            if spec.verify {
                // Each queue owns the blocks congruent to its number; skip busy ones.
                let mut tries = 0;
                loop {
                    block -= block % u64::from(queues);
                    block += u64::from(queue_no);
                    if block < blocks && !busy[block as usize] {
                        break;
                    }
                    block = (block + u64::from(queues)) % blocks;
                    tries += 1;
                    if tries > 64 {
                        break;
                    }
                }
                if block >= blocks || busy[block as usize] {
                    break;
                }
            }
            let write = match spec.rw {
                RwMode::Randread | RwMode::Read => false,
                RwMode::Randwrite | RwMode::Write => true,
                RwMode::Randrw => (rng.next() % 100) as u32 >= spec.rwmixread,
            };
            let s = &mut slots[slot_no as usize];
            let offset = block * bs;
            mem.write(
                s.hdr,
                &header(
                    if write {
                        VIRTIO_BLK_T_OUT
                    } else {
                        VIRTIO_BLK_T_IN
                    },
                    offset / 512,
                ),
            )?;
            mem.write_u8(s.status, 0xff)?;
            if spec.verify {
                busy[block as usize] = true;
                if write {
                    s.write_id = next_write_id;
                    next_write_id = next_write_id.wrapping_add(1).max(1);
                    stamp(&mut scratch, offset, s.write_id);
                    mem.write(s.data, &scratch)?;
                }
            }
            let head = q.ring().add_linked(&[
                (s.hdr, 16, false),
                (s.data, bs as u32, !write),
                (s.status, 1, true),
            ])?;
            head_slot[head as usize] = slot_no;
            s.write = write;
            s.block = block;
            s.start = Some(Instant::now());
            q.ring().push_avail(head);
            free_slots.pop();
            in_flight += 1;
            issued += 1;
            pushed = true;
        }
        if pushed {
            q.publish_and_kick()?;
        }

        // Reap.
        let mut reaped = 0;
        while let Some(used) = q.ring().pop_used() {
            reaped += 1;
            let slot_no = head_slot.get(used.id as usize).copied().unwrap_or(u32::MAX);
            if slot_no == u32::MAX {
                // The backend returned a head we never made available.
                errors += 1;
                continue;
            }
            head_slot[used.id as usize] = u32::MAX;
            let s = &mut slots[slot_no as usize];
            if let Some(t) = s.start.take() {
                let ns = t.elapsed().as_nanos() as u64;
                let _ = hist.record(ns.max(1));
            }
            let status = mem.read_u8(s.status)?;
            if status != VIRTIO_BLK_S_OK {
                errors += 1;
            } else if spec.verify {
                let b = s.block as usize;
                if s.write {
                    written[b] = s.write_id;
                } else if written[b] != 0 {
                    mem.read(s.data, &mut scratch)?;
                    stamp(&mut expect, s.block * bs, written[b]);
                    if scratch != expect {
                        verify_failures += 1;
                    }
                }
            }
            if spec.verify {
                busy[s.block as usize] = false;
            }
            ios += 1;
            in_flight -= 1;
            free_slots.push(slot_no);
        }

        if !stopping {
            check_clock = check_clock.wrapping_add(1);
            // Reading the clock every loop costs more than the ring work on a null device.
            if issued >= limit
                || (check_clock % 64 == 0
                    && (Instant::now() >= deadline || stop.load(Ordering::Relaxed)))
            {
                stopping = true;
            }
        }
        if stopping && in_flight == 0 {
            break;
        }
        if reaped == 0 && !pushed {
            if spec.poll {
                std::hint::spin_loop();
            } else if !q.ring().arm_and_check() {
                q.wait_call(Duration::from_millis(100))?;
            }
            if stopping && Instant::now() > deadline + Duration::from_secs(30) {
                return Err(LoadgenError::Timeout);
            }
        }
    }
    let elapsed = started.elapsed();

    // Verify: read back every block this queue wrote, at depth 1 (not measured).
    if spec.verify && spec.rw.writes() {
        let s = slots[0];
        for b in 0..blocks {
            let id = written[b as usize];
            if id == 0 {
                continue;
            }
            mem.write(s.hdr, &header(VIRTIO_BLK_T_IN, b * bs / 512))?;
            mem.write_u8(s.status, 0xff)?;
            let head = q.ring().add_linked(&[
                (s.hdr, 16, false),
                (s.data, bs as u32, true),
                (s.status, 1, true),
            ])?;
            q.ring().push_avail(head);
            q.publish_and_kick()?;
            q.wait_used(Duration::from_secs(30), spec.poll)?
                .ok_or(LoadgenError::Timeout)?;
            if mem.read_u8(s.status)? != VIRTIO_BLK_S_OK {
                errors += 1;
                continue;
            }
            mem.read(s.data, &mut scratch)?;
            stamp(&mut expect, b * bs, id);
            if scratch != expect {
                verify_failures += 1;
            }
        }
    }

    Ok((
        q,
        JobResult {
            ios,
            bytes: ios * bs,
            errors,
            verify_failures,
            hist,
            elapsed,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamp_differs_by_offset_and_id() {
        let mut a = vec![0u8; 1024];
        let mut b = vec![0u8; 1024];
        stamp(&mut a, 4096, 1);
        stamp(&mut b, 4096, 2);
        assert_ne!(a, b);
        stamp(&mut b, 8192, 1);
        assert_ne!(a, b);
        stamp(&mut b, 4096, 1);
        assert_eq!(a, b);
        assert_ne!(a[..512], a[512..]);
    }
}
