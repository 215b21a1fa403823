//! The leader's clock of primary leases: when may a volume's lease go to a new holder?
//!
//! Lease deadlines are judged only on this process's monotonic clock, never compared across
//! machines. A deadline recorded here is taken *after* the grant was committed (or the
//! leadership confirmed by a quorum), so it is later than the moment the holder sent its
//! request, from which the holder counts: the holder's lease always ends before the deadline
//! recorded here (given clock rates that differ by less than the drift margin).
//!
//! A new leader cannot know when its predecessors granted, so for a whole lease (plus the
//! drift margin) after it first acts as leader in a term it grants no lease to a new holder
//! of any volume that has a recorded holder. Every grant an old leader made was confirmed by
//! a quorum before the new leader won its election (the quorums intersect, and a member that
//! voted for the new term rejects the old one), so all of those leases end within that wait.
//! See docs/authority.md, "Lease safety".

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::state::LeaseHolder;

/// Per group, owned by the group's leader side; reset whenever the Raft term changes.
#[derive(Debug)]
pub struct LeaseClock {
    term: u64,
    /// Until then no lease goes to a new holder (the predecessors' grants are unknown).
    blind_until: Instant,
    /// volume -> the last holder this leader granted or renewed, and until when it may act.
    deadlines: HashMap<String, (LeaseHolder, Instant)>,
}

impl LeaseClock {
    pub fn new(now: Instant) -> Self {
        LeaseClock {
            term: 0,
            blind_until: now,
            deadlines: HashMap::new(),
        }
    }

    /// Called with the current term on each decision; a new term forgets everything known.
    pub fn observe_term(&mut self, term: u64, now: Instant, wait: Duration) {
        if term != self.term {
            self.term = term;
            self.blind_until = now + wait;
            self.deadlines.clear();
        }
    }

    /// May `volume`'s lease, whose recorded holder is `recorded`, go to a new holder now?
    /// `Err((holder, retry_after))` if not. `margin` is the drift margin.
    pub fn may_grant_new(
        &self,
        volume: &str,
        recorded: &Option<LeaseHolder>,
        now: Instant,
        margin: Duration,
    ) -> Result<(), (String, Duration)> {
        let Some(prev) = recorded else {
            // Released (or never granted): nobody may act on it.
            return Ok(());
        };
        if now < self.blind_until {
            return Err((prev.server_id.clone(), self.blind_until - now));
        }
        if let Some((h, deadline)) = self.deadlines.get(volume) {
            let until = *deadline + margin;
            if now < until {
                return Err((h.server_id.clone(), until - now));
            }
        }
        Ok(())
    }

    /// `holder` was granted (or renewed) `volume`'s lease, valid at most until `deadline`.
    pub fn record(&mut self, volume: &str, holder: LeaseHolder, deadline: Instant) {
        let e = self
            .deadlines
            .entry(volume.to_string())
            .or_insert((holder.clone(), deadline));
        if e.0 != holder || e.1 < deadline {
            *e = (holder, deadline);
        }
    }

    /// `holder` released `volume`'s lease (committed): it stopped acting before asking.
    pub fn release(&mut self, volume: &str, holder: &LeaseHolder) {
        if self
            .deadlines
            .get(volume)
            .map(|(h, _)| h == holder)
            .unwrap_or(false)
        {
            self.deadlines.remove(volume);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(s: &str, e: u64) -> LeaseHolder {
        LeaseHolder {
            server_id: s.into(),
            epoch: e,
            incarnation: None,
        }
    }

    #[test]
    fn new_term_waits_a_full_lease_before_a_new_holder() {
        let t0 = Instant::now();
        let lease = Duration::from_millis(2000);
        let margin = Duration::from_millis(100);
        let mut c = LeaseClock::new(t0);
        c.observe_term(3, t0, lease + margin);
        let rec = Some(h("s1", 1));
        let (holder, retry) = c
            .may_grant_new("v", &rec, t0 + Duration::from_millis(500), margin)
            .unwrap_err();
        assert_eq!(holder, "s1");
        assert_eq!(retry, Duration::from_millis(1600));
        assert!(c
            .may_grant_new("v", &rec, t0 + lease + margin, margin)
            .is_ok());
        // A released lease is free at once, even while blind.
        assert!(c.may_grant_new("v", &None, t0, margin).is_ok());
    }

    #[test]
    fn a_recorded_deadline_blocks_until_it_and_the_margin_pass() {
        let t0 = Instant::now();
        let margin = Duration::from_millis(100);
        let mut c = LeaseClock::new(t0);
        c.observe_term(1, t0, Duration::ZERO);
        c.record("v", h("s1", 1), t0 + Duration::from_millis(2000));
        let rec = Some(h("s1", 1));
        assert!(c
            .may_grant_new("v", &rec, t0 + Duration::from_millis(2099), margin)
            .is_err());
        assert!(c
            .may_grant_new("v", &rec, t0 + Duration::from_millis(2100), margin)
            .is_ok());
        // A later term forgets the deadline but is blind for the wait instead.
        c.observe_term(
            2,
            t0 + Duration::from_millis(10),
            Duration::from_millis(2100),
        );
        assert!(c
            .may_grant_new("v", &rec, t0 + Duration::from_millis(2109), margin)
            .is_err());
        c.release("v", &h("s1", 1));
    }
}
