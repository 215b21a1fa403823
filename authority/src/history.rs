//! A safety checker over a recorded history of lease grants.
//!
//! Each successful acquire or renew is recorded with the holder's view of its validity: from
//! the moment the answer arrived (it cannot act before) until the lease minus the drift margin
//! counted from the moment the request was sent, on the recording process's monotonic clock
//! (all clients of a test share one clock, so it is real time).
//! The checker proves: no two different holders of one volume's lease are valid at the same
//! instant; the epochs of successive holders strictly increase; and, given the epochs the
//! authority reports at the end, every granted epoch survived (none is newer than what the
//! group kept).

use std::collections::BTreeMap;
use std::time::Instant;

/// One granted lease as the holder saw it.
#[derive(Debug, Clone)]
pub struct GrantEvent {
    pub volume: String,
    pub server_id: String,
    pub epoch: u64,
    pub valid_from: Instant,
    pub valid_until: Instant,
}

/// A violation found in a history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Violation {
    Overlap {
        volume: String,
        first: (String, u64),
        second: (String, u64),
    },
    EpochNotIncreasing {
        volume: String,
        earlier: (String, u64),
        later: (String, u64),
    },
    EpochLost {
        volume: String,
        granted: u64,
        durable: u64,
    },
}

/// Check a history; `durable_epochs` is each volume's epoch read from the authority at the end.
pub fn check(events: &[GrantEvent], durable_epochs: &BTreeMap<String, u64>) -> Vec<Violation> {
    let mut out = Vec::new();
    let mut by_volume: BTreeMap<&str, Vec<&GrantEvent>> = BTreeMap::new();
    for e in events {
        by_volume.entry(&e.volume).or_default().push(e);
    }
    for (volume, evs) in by_volume {
        // Merge each holder's grants into one span [first valid_from, last valid_until).
        let mut spans: BTreeMap<(String, u64), (Instant, Instant)> = BTreeMap::new();
        for e in &evs {
            let s = spans
                .entry((e.server_id.clone(), e.epoch))
                .or_insert((e.valid_from, e.valid_until));
            s.0 = s.0.min(e.valid_from);
            s.1 = s.1.max(e.valid_until);
        }
        let mut ordered: Vec<_> = spans.into_iter().collect();
        ordered.sort_by_key(|(_, (from, _))| *from);
        for pair in ordered.windows(2) {
            let ((h1, (_, until1)), (h2, (from2, _))) = (&pair[0], &pair[1]);
            if from2 < until1 {
                out.push(Violation::Overlap {
                    volume: volume.to_string(),
                    first: h1.clone(),
                    second: h2.clone(),
                });
            }
            if h2.1 <= h1.1 {
                out.push(Violation::EpochNotIncreasing {
                    volume: volume.to_string(),
                    earlier: h1.clone(),
                    later: h2.clone(),
                });
            }
        }
        // Overlaps between non-neighbours are caught too: spans are sorted by start, and a
        // span that reaches past its neighbour's start also reaches past it.
        for i in 0..ordered.len() {
            for j in i + 2..ordered.len() {
                if ordered[j].1 .0 < ordered[i].1 .1 {
                    out.push(Violation::Overlap {
                        volume: volume.to_string(),
                        first: ordered[i].0.clone(),
                        second: ordered[j].0.clone(),
                    });
                }
            }
        }
        let durable = durable_epochs.get(volume).copied().unwrap_or(0);
        if let Some(max) = evs.iter().map(|e| e.epoch).max() {
            if max > durable {
                out.push(Violation::EpochLost {
                    volume: volume.to_string(),
                    granted: max,
                    durable,
                });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn ev(t0: Instant, server: &str, epoch: u64, from_ms: u64, until_ms: u64) -> GrantEvent {
        GrantEvent {
            volume: "v".into(),
            server_id: server.into(),
            epoch,
            valid_from: t0 + Duration::from_millis(from_ms),
            valid_until: t0 + Duration::from_millis(until_ms),
        }
    }

    #[test]
    fn a_clean_handover_passes() {
        let t0 = Instant::now();
        let h = [
            ev(t0, "s1", 1, 0, 900),
            ev(t0, "s1", 1, 500, 1400),
            ev(t0, "s2", 2, 1500, 2400),
        ];
        assert!(check(&h, &[("v".to_string(), 2)].into()).is_empty());
    }

    #[test]
    fn overlapping_holders_are_caught() {
        let t0 = Instant::now();
        let h = [
            ev(t0, "s1", 1, 0, 900),
            ev(t0, "s1", 1, 500, 1400),
            ev(t0, "s2", 2, 1300, 2000),
        ];
        let v = check(&h, &[("v".to_string(), 2)].into());
        assert_eq!(
            v,
            vec![Violation::Overlap {
                volume: "v".into(),
                first: ("s1".into(), 1),
                second: ("s2".into(), 2)
            }]
        );
    }

    #[test]
    fn a_non_neighbour_overlap_is_caught() {
        let t0 = Instant::now();
        let h = [
            ev(t0, "s1", 1, 0, 5000),
            ev(t0, "s2", 2, 6000, 7000),
            ev(t0, "s3", 3, 100, 200),
        ];
        let v = check(&h, &[("v".to_string(), 3)].into());
        assert!(
            v.iter().any(|x| matches!(x, Violation::Overlap { .. })),
            "{v:?}"
        );
    }

    #[test]
    fn falling_epochs_and_lost_epochs_are_caught() {
        let t0 = Instant::now();
        let h = [ev(t0, "s1", 2, 0, 900), ev(t0, "s2", 1, 1000, 1900)];
        let v = check(&h, &[("v".to_string(), 1)].into());
        assert!(
            v.iter()
                .any(|x| matches!(x, Violation::EpochNotIncreasing { .. })),
            "{v:?}"
        );
        assert!(
            v.contains(&Violation::EpochLost {
                volume: "v".into(),
                granted: 2,
                durable: 1
            }),
            "{v:?}"
        );
    }
}
