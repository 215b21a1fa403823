//! Where the surviving replicas of a volume may differ after their primary dies.
//!
//! A write the primary sent to every in-sync secondary may reach some of them and not
//! others before the primary dies. It was never acknowledged, so either version is allowed,
//! but the replicas must end up holding the same one: otherwise a later read, after another
//! failover, could return data that changed with no write. The old primary's activity log
//! (which names exactly those regions) dies with it, so the knowledge has to live on the
//! secondaries:
//!
//! * the primary tracks which of its replicated seqs are still *unsettled* (sent, not yet
//!   answered by every in-sync peer, or a peer failed and could not be marked out of sync)
//!   in a [`SettleTracker`], and stamps every `Replicate` frame with its commit point: every
//!   seq at or below it is settled;
//! * each secondary keeps, in an [`UnsettledLog`], the ranges of the writes it received above
//!   the newest commit point it has seen, and, folded into regions, those a previous
//!   primary never settled;
//! * a new primary collects these from itself and from each in-sync peer when it connects
//!   them (`CATCH_UP_CONNECT`), and copies the union from its own replica to those peers
//!   before it serves (`VolumeRuntime::reconcile`).
//!
//! In memory only: recording every write durably would cost a disk write per write. So a
//! log starts *unknown* in a process that opens a synced replica (it may have received
//! unsettled writes before a restart and forgotten them); a new primary that did not lead
//! the stream such a replica followed gives it a full copy instead (`try_become_primary`),
//! while one that did lead it has those regions in its own persistent activity log. A
//! catch-up to its end makes the log known again. (A replica after a machine reboot is no
//! longer synced at all: boot id.)

use std::collections::{BTreeSet, VecDeque};

/// Writes above the commit point a secondary remembers one by one; beyond this (a primary
/// whose commit point is stuck, e.g. on a peer it could not mark out of sync) the oldest are
/// folded into regions, which bounds the log by the volume's region count.
const MAX_RECENT: usize = 4096;

/// The primary's unsettled seqs, for its commit point.
#[derive(Debug, Default)]
pub struct SettleTracker {
    open: BTreeSet<u64>,
}

impl SettleTracker {
    /// A new primary term: nothing of an earlier one is tracked.
    pub fn reset(&mut self) {
        self.open.clear();
    }

    /// `seq` was just assigned to a write that is sent to peers (under the sequencer lock,
    /// so the set only ever gains seqs above those it holds).
    pub fn open(&mut self, seq: u64) {
        self.open.insert(seq);
    }

    /// Every in-sync peer answered `seq` (or was marked out of sync at the authority). A seq
    /// that is never settled holds the commit point below it for the rest of the term:
    /// conservative, it only makes the secondaries remember more.
    pub fn settle(&mut self, seq: u64) {
        self.open.remove(&seq);
    }

    /// Every seq at or below this is settled; `next_seq` is the next seq the sequencer will
    /// assign. Never goes back within a term.
    pub fn commit_point(&self, next_seq: u64) -> u64 {
        match self.open.first() {
            Some(&s) => s - 1,
            None => next_seq.saturating_sub(1),
        }
    }
}

/// A secondary's record of where it may differ from the other replicas.
#[derive(Debug)]
pub struct UnsettledLog {
    region_size: u64,
    /// `(generation, epoch)` of the stream `recent` came from.
    fence: (u64, u64),
    /// `(seq, offset, len)` of received writes above the newest commit point, in seq order.
    recent: VecDeque<(u64, u64, u64)>,
    /// Regions of writes a primary will never settle (an earlier epoch's, or folded).
    older: BTreeSet<u64>,
    /// This process may have forgotten writes it received from the stream of this epoch
    /// (the one its replica followed when the process started; see the module's doc).
    unknown: Option<u64>,
}

impl UnsettledLog {
    /// `unknown`: this process opened a replica that was synced, following this epoch's
    /// stream, before it started.
    pub fn new(region_size: u64, unknown: Option<u64>) -> Self {
        assert!(region_size > 0, "region size is positive");
        Self {
            region_size,
            fence: (0, 0),
            recent: VecDeque::new(),
            older: BTreeSet::new(),
            unknown,
        }
    }

    /// The epoch of the stream whose writes, received before this process started, may be
    /// missing from the log.
    pub fn unknown(&self) -> Option<u64> {
        self.unknown
    }

    /// A replicated operation was admitted (in stream order): forget what its commit point
    /// settles, remember it if it carries data.
    pub fn admit(&mut self, fence: (u64, u64), seq: u64, commit: u64, offset: u64, len: u64) {
        if fence != self.fence {
            // The previous primary of this stream will never settle what it left.
            while let Some((_, off, len)) = self.recent.pop_front() {
                self.fold(off, len);
            }
            self.fence = fence;
        }
        while self.recent.front().is_some_and(|&(s, _, _)| s <= commit) {
            self.recent.pop_front();
        }
        if len > 0 {
            self.recent.push_back((seq, offset, len));
            if self.recent.len() > MAX_RECENT {
                let (_, off, len) = self.recent.pop_front().expect("not empty");
                self.fold(off, len);
            }
        }
    }

    fn fold(&mut self, offset: u64, len: u64) {
        let rs = self.region_size;
        self.older
            .extend(offset / rs..(offset + len.max(1) - 1) / rs + 1);
    }

    /// Byte ranges that may differ from the other replicas, each within one region of this
    /// server's size, sorted; for a volume of `size` bytes.
    pub fn ranges(&self, size: u64) -> Vec<[u64; 2]> {
        let rs = self.region_size;
        let mut regions = self.older.clone();
        for &(_, off, len) in &self.recent {
            regions.extend(off / rs..(off + len.max(1) - 1) / rs + 1);
        }
        region_ranges(regions, rs, size).collect()
    }

    /// Whether this replica may differ from the others where the primary of `fence` does
    /// not know it: writes of an earlier primary that nobody resynced. (Unsettled writes of
    /// `fence`'s own stream are that primary's to account for.)
    /// (The primary of a forgotten stream knows what it sent: its bitmap covers it.)
    pub fn unreconciled_for(&self, fence: (u64, u64)) -> bool {
        self.unknown.is_some_and(|e| e != fence.1)
            || !self.older.is_empty()
            || (self.fence != fence && !self.recent.is_empty())
    }

    /// A catch-up ran to its end: this replica holds the primary's copy of everything the
    /// primary knew it might lack (with anything unreconciled that was a full copy).
    pub fn caught_up(&mut self) {
        self.older.clear();
        self.unknown = None;
    }

    /// A primary copied every reported range to this replica: only writes of the current
    /// stream that are not settled yet may still differ.
    pub fn reconciled(&mut self) {
        self.older.clear();
    }

    /// Takes everything (this server becomes primary: its copy is the one the others get),
    /// and the epoch of a forgotten stream.
    pub fn take(&mut self, size: u64) -> (Vec<[u64; 2]>, Option<u64>) {
        let r = self.ranges(size);
        self.older.clear();
        self.recent.clear();
        (r, std::mem::take(&mut self.unknown))
    }
}

/// The byte range `[offset, len]` of each region of `region_size` in a volume of `size`
/// bytes (the last one cut at the end; regions past it dropped).
pub fn region_ranges(
    regions: impl IntoIterator<Item = u64>,
    region_size: u64,
    size: u64,
) -> impl Iterator<Item = [u64; 2]> {
    regions
        .into_iter()
        .filter(move |&r| r * region_size < size)
        .map(move |r| [r * region_size, region_size.min(size - r * region_size)])
}

/// Regions of `region_size` touched by the byte ranges, in order.
pub fn regions_of(ranges: &[[u64; 2]], region_size: u64) -> BTreeSet<u64> {
    let mut out = BTreeSet::new();
    for &[off, len] in ranges {
        out.extend(off / region_size..(off + len.max(1) - 1) / region_size + 1);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const RS: u64 = 1 << 20;

    #[test]
    fn a_commit_point_forgets_what_it_settles() {
        let mut l = UnsettledLog::new(RS, None);
        l.admit((1, 1), 1, 0, 0, 4096);
        l.admit((1, 1), 2, 0, 3 * RS, 4096);
        assert_eq!(l.ranges(8 * RS), vec![[0, RS], [3 * RS, RS]]);
        l.admit((1, 1), 3, 1, 5 * RS, 4096);
        assert_eq!(l.ranges(8 * RS), vec![[3 * RS, RS], [5 * RS, RS]]);
        // A flush (no data) carries a commit point too.
        l.admit((1, 1), 4, 3, 0, 0);
        assert!(l.ranges(8 * RS).is_empty());
    }

    #[test]
    fn a_new_epoch_keeps_the_old_primarys_unsettled_writes_until_reconciled() {
        let mut l = UnsettledLog::new(RS, None);
        l.admit((1, 1), 10, 9, RS + 5, 2 * RS);
        l.admit((1, 2), 1, 0, 6 * RS, 4096);
        // The new primary's commit point says nothing about the old stream.
        l.admit((1, 2), 2, 1, 6 * RS, 4096);
        assert_eq!(
            l.ranges(8 * RS),
            vec![[RS, RS], [2 * RS, RS], [3 * RS, RS], [6 * RS, RS]]
        );
        assert!(l.unreconciled_for((1, 2)));
        l.reconciled();
        assert_eq!(l.ranges(8 * RS), vec![[6 * RS, RS]]);
        // What is left is the current primary's own unsettled write.
        assert!(!l.unreconciled_for((1, 2)));
        assert!(l.unreconciled_for((1, 3)));
    }

    #[test]
    fn a_restarted_process_does_not_know_until_a_catch_up_ends() {
        let mut l = UnsettledLog::new(RS, Some(3));
        // The primary of epoch 3 knows what it sent; another one does not.
        assert!(!l.unreconciled_for((1, 3)));
        assert!(l.unreconciled_for((1, 4)));
        l.reconciled();
        assert_eq!(
            l.unknown(),
            Some(3),
            "a resync of reported ranges is not enough"
        );
        l.caught_up();
        assert!(l.unknown().is_none() && !l.unreconciled_for((1, 4)));
        let mut l = UnsettledLog::new(RS, Some(3));
        assert_eq!(l.take(8 * RS), (vec![], Some(3)));
        assert!(l.unknown().is_none());
    }

    #[test]
    fn the_last_region_is_cut_at_the_volume_end() {
        let mut l = UnsettledLog::new(RS, None);
        l.admit((1, 1), 1, 0, RS, 4096);
        assert_eq!(l.ranges(RS + 8192), vec![[RS, 8192]]);
        assert_eq!(l.take(RS + 8192), (vec![[RS, 8192]], None));
        assert!(l.ranges(RS + 8192).is_empty());
    }

    #[test]
    fn a_stuck_commit_point_folds_into_regions_instead_of_growing() {
        let mut l = UnsettledLog::new(RS, None);
        for s in 1..=(MAX_RECENT as u64 * 2) {
            l.admit((1, 1), s, 0, (s % 8) * RS, 4096);
        }
        assert!(l.recent.len() <= MAX_RECENT);
        assert_eq!(l.ranges(8 * RS).len(), 8);
    }

    #[test]
    fn the_commit_point_is_below_the_oldest_unsettled_seq() {
        let mut t = SettleTracker::default();
        assert_eq!(t.commit_point(1), 0);
        t.open(1);
        t.open(2);
        t.open(3);
        assert_eq!(t.commit_point(4), 0);
        t.settle(2);
        assert_eq!(t.commit_point(4), 0);
        t.settle(1);
        assert_eq!(t.commit_point(4), 2);
        t.settle(3);
        assert_eq!(t.commit_point(6), 5);
    }

    proptest! {
        /// Whatever order writes settle in, a secondary that saw every frame of the stream
        /// still lists every write that was not settled when its last frame left.
        #[test]
        fn no_unsettled_write_is_forgotten(
            writes in prop::collection::vec((0u64..16, any::<bool>()), 1..200),
        ) {
            let mut t = SettleTracker::default();
            let mut l = UnsettledLog::new(RS, None);
            let mut unsettled = Vec::new();
            for (i, &(region, settles_now)) in writes.iter().enumerate() {
                let seq = i as u64 + 1;
                t.open(seq);
                l.admit((1, 1), seq, t.commit_point(seq + 1), region * RS, 4096);
                if settles_now {
                    t.settle(seq);
                } else {
                    unsettled.push(region);
                }
            }
            let listed = regions_of(&l.ranges(16 * RS), RS);
            for r in unsettled {
                prop_assert!(listed.contains(&r), "region {} forgotten", r);
            }
        }
    }
}
