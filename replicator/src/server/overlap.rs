//! `OverlapQueue`: applies overlapping operations in sequence order, others in parallel.
//!
//! Every sequenced operation registers its byte range, in seq order, before it is applied.
//! Registration returns a [`Ticket`] that waits for every earlier registered operation whose
//! range overlaps (a barrier waits for every earlier non-barrier one). Because the primary
//! registers in the order it assigns seq, and a secondary registers in the order frames
//! arrive on its one connection from the primary (which is seq order), two overlapping
//! writes land in the same order on every replica.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use tokio::sync::watch;

#[derive(Debug)]
struct Entry {
    start: u64,
    end: u64,
    barrier: bool,
    done: watch::Receiver<bool>,
}

#[derive(Debug, Default)]
pub struct OverlapQueue {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// By registration order, not seq: a new stream's seqs may repeat an old stream's that
    /// are still in flight.
    entries: BTreeMap<u64, Entry>,
    registered: u64,
    last_seq: u64,
    /// `(generation, epoch)` of the primary whose stream a secondary registers.
    stream: (u64, u64),
}

/// A registered operation. Dropping it (or calling `done`) releases later overlapping ones.
#[derive(Debug)]
pub struct Ticket {
    seq: u64,
    id: u64,
    waits: Vec<watch::Receiver<bool>>,
    done: watch::Sender<bool>,
    queue: Arc<OverlapQueue>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("sequence number {seq} is not above the last registered {last}")]
pub struct SeqWentBack {
    pub seq: u64,
    pub last: u64,
}

impl OverlapQueue {
    /// Registers `seq` over `start..start+len` (a barrier: over everything earlier).
    /// `seq` must grow; a queue for a new epoch's stream is reset with [`OverlapQueue::reset_seq`].
    pub fn register(
        self: &Arc<Self>,
        seq: u64,
        start: u64,
        len: u64,
        barrier: bool,
    ) -> Result<Ticket, SeqWentBack> {
        let end = start.saturating_add(len.max(1));
        let mut g = self.inner.lock().expect("overlap lock");
        if seq <= g.last_seq {
            return Err(SeqWentBack {
                seq,
                last: g.last_seq,
            });
        }
        g.last_seq = seq;
        g.registered += 1;
        let id = g.registered;
        let waits = g
            .entries
            .values()
            .filter(|e| {
                if barrier {
                    !e.barrier
                } else {
                    !e.barrier && e.start < end && start < e.end
                }
            })
            .map(|e| e.done.clone())
            .collect();
        let (tx, rx) = watch::channel(false);
        g.entries.insert(
            id,
            Entry {
                start,
                end,
                barrier,
                done: rx,
            },
        );
        Ok(Ticket {
            seq,
            id,
            waits,
            done: tx,
            queue: self.clone(),
        })
    }

    /// A new stream (a new primary's epoch) may start at any seq.
    pub fn reset_seq(&self) {
        self.inner.lock().expect("overlap lock").last_seq = 0;
    }

    /// A secondary is about to register an operation of the stream of primary `fence`: a
    /// stream other than the last one starts its seqs afresh. (The epoch itself may have
    /// been learnt earlier, from the authority or a catch-up frame, so a change of stream
    /// is seen here, not there.)
    pub fn follow_stream(&self, fence: (u64, u64)) {
        let mut g = self.inner.lock().expect("overlap lock");
        if g.stream != fence {
            g.stream = fence;
            g.last_seq = 0;
        }
    }

    pub fn last_seq(&self) -> u64 {
        self.inner.lock().expect("overlap lock").last_seq
    }

    pub fn in_flight(&self) -> usize {
        self.inner.lock().expect("overlap lock").entries.len()
    }

    fn remove(&self, id: u64) {
        self.inner.lock().expect("overlap lock").entries.remove(&id);
    }
}

impl Ticket {
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Waits until every earlier overlapping operation is done.
    pub async fn ready(&mut self) {
        for w in &mut self.waits {
            // An Err means the sender was dropped: that operation is finished too.
            let _ = w.wait_for(|d| *d).await;
        }
        self.waits.clear();
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.queue.remove(self.id);
        let _ = self.done.send(true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn overlapping_waits_disjoint_does_not() {
        let q = Arc::new(OverlapQueue::default());
        let a = q.register(1, 0, 4096, false).unwrap();
        let mut b = q.register(2, 2048, 4096, false).unwrap();
        let mut c = q.register(3, 8192, 4096, false).unwrap();
        // Disjoint: ready at once.
        tokio::time::timeout(Duration::from_secs(5), c.ready())
            .await
            .unwrap();
        // Overlapping: not ready while `a` is live.
        assert!(tokio::time::timeout(Duration::from_millis(20), b.ready())
            .await
            .is_err());
        drop(a);
        tokio::time::timeout(Duration::from_secs(5), b.ready())
            .await
            .unwrap();
        assert_eq!(q.in_flight(), 2);
    }

    #[tokio::test]
    async fn barrier_waits_for_all_earlier_but_does_not_block_later() {
        let q = Arc::new(OverlapQueue::default());
        let a = q.register(1, 0, 512, false).unwrap();
        let mut f = q.register(2, 0, 0, true).unwrap();
        let mut later = q.register(3, 0, 512, false).unwrap();
        assert!(tokio::time::timeout(Duration::from_millis(20), f.ready())
            .await
            .is_err());
        drop(a);
        tokio::time::timeout(Duration::from_secs(5), f.ready())
            .await
            .unwrap();
        // `later` overlaps `a` (done) and the barrier (ignored): ready although f is live.
        tokio::time::timeout(Duration::from_secs(5), later.ready())
            .await
            .unwrap();
    }

    /// Two replicas apply the same stream of overlapping writes with different random delays:
    /// both end equal to applying the stream one by one in seq order.
    #[test]
    fn overlapping_writes_end_as_in_seq_order_whatever_the_delays() {
        use proptest::prelude::*;
        use proptest::test_runner::{Config, TestRunner};
        let mut runner = TestRunner::new(Config::with_cases(48));
        let ops = prop::collection::vec((0u64..24, 1u64..6, 0u64..300, 0u64..300), 1..40);
        runner
            .run(&ops, |ops| {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                let mut expect = vec![0u8; 32];
                for (i, &(start, len, _, _)) in ops.iter().enumerate() {
                    for b in start..start + len {
                        expect[b as usize] = i as u8 + 1;
                    }
                }
                for replica in 0..2 {
                    let disk = Arc::new(Mutex::new(vec![0u8; 32]));
                    let q = Arc::new(OverlapQueue::default());
                    rt.block_on(async {
                        let mut tasks = Vec::new();
                        for (i, &(start, len, d0, d1)) in ops.iter().enumerate() {
                            let mut t = q.register(i as u64 + 1, start, len, false).unwrap();
                            let disk = disk.clone();
                            let delay = if replica == 0 { d0 } else { d1 };
                            tasks.push(tokio::spawn(async move {
                                tokio::time::sleep(Duration::from_micros(delay)).await;
                                t.ready().await;
                                let mut d = disk.lock().unwrap();
                                for b in start..start + len {
                                    d[b as usize] = i as u8 + 1;
                                }
                                drop(d);
                                drop(t);
                            }));
                        }
                        for t in tasks {
                            t.await.unwrap();
                        }
                    });
                    prop_assert_eq!(&*disk.lock().unwrap(), &expect);
                }
                Ok(())
            })
            .unwrap();
    }

    #[test]
    fn seq_must_grow() {
        let q = Arc::new(OverlapQueue::default());
        let _a = q.register(5, 0, 1, false).unwrap();
        assert_eq!(
            q.register(5, 10, 1, false).unwrap_err(),
            SeqWentBack { seq: 5, last: 5 }
        );
        q.reset_seq();
        assert!(q.register(1, 10, 1, false).is_ok());
    }

    #[tokio::test]
    async fn a_new_stream_restarts_seqs_and_still_waits_for_the_old_one() {
        let q = Arc::new(OverlapQueue::default());
        q.follow_stream((1, 1));
        let old = q.register(1, 0, 8, false).unwrap();
        let _old2 = q.register(7, 100, 8, false).unwrap();
        q.follow_stream((1, 1));
        assert!(q.register(3, 200, 8, false).is_err(), "same stream");
        q.follow_stream((1, 2));
        // Seq 1 again, over the old seq 1's range: it must wait for it, and releasing one
        // must not release the other's entry.
        let mut new = q.register(1, 0, 8, false).unwrap();
        assert!(tokio::time::timeout(Duration::from_millis(20), new.ready())
            .await
            .is_err());
        drop(old);
        new.ready().await;
        assert_eq!(q.in_flight(), 2);
    }
}
