//! Deterministic crash tests of the promotion protocol: the coordinator stops at every step,
//! with the step's command lost before its group committed it or committed with the answer
//! lost; then recovery (itself crashing at every step, then run again) or a retry by the
//! coordinator finishes it. Every run must end committed in both groups or in neither.

use std::sync::Mutex;

use super::*;
use crate::state::GroupState;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Fault {
    /// The group never committed the step's command.
    LostRequest,
    /// The group committed it; the answer never reached the coordinator.
    LostReply,
}

struct Sim {
    global: Mutex<GroupState>,
    site: Mutex<GroupState>,
    step: Mutex<usize>,
    fault: Mutex<Option<(usize, Fault)>>,
}

impl Sim {
    fn new() -> Sim {
        let mut global = GroupState::default();
        global
            .apply(&Command::DeviceCreate {
                device: "dev0".into(),
                size_bytes: 1 << 20,
                block_size: 512,
                volumes: [
                    ("a".to_string(), "va".to_string()),
                    ("b".to_string(), "vb".to_string()),
                ]
                .into(),
                authoritative_site: "a".into(),
            })
            .unwrap();
        let mut site = GroupState::default();
        site.apply(&Command::ServerRegister {
            server_id: "s1".into(),
            data_addr: "d".into(),
            admin_addr: "a".into(),
        })
        .unwrap();
        site.apply(&Command::VolumeCreate {
            volume: "vb".into(),
            device: "dev0".into(),
            size_bytes: 1 << 20,
            block_size: 512,
            servers: vec!["s1".into()],
            generation: 1,
        })
        .unwrap();
        Sim {
            global: Mutex::new(global),
            site: Mutex::new(site),
            step: Mutex::new(0),
            fault: Mutex::new(None),
        }
    }

    fn arm(&self, at: usize, f: Fault) {
        *self.step.lock().unwrap() = 0;
        *self.fault.lock().unwrap() = Some((at, f));
    }

    fn disarm(&self) {
        *self.fault.lock().unwrap() = None;
    }

    fn run(&self, group: &Mutex<GroupState>, cmd: Command) -> Result<Outcome, AuthError> {
        let n = {
            let mut s = self.step.lock().unwrap();
            *s += 1;
            *s
        };
        let fault = *self.fault.lock().unwrap();
        let crash = || AuthError::Unavailable {
            reason: format!("injected crash at step {n}"),
        };
        match fault {
            Some((at, Fault::LostRequest)) if at == n => Err(crash()),
            Some((at, Fault::LostReply)) if at == n => {
                let _ = group.lock().unwrap().apply(&cmd);
                Err(crash())
            }
            _ => group.lock().unwrap().apply(&cmd),
        }
    }

    /// Both or neither; no intent left behind; the transaction finished.
    fn assert_atomic(&self, label: &str) -> bool {
        let g = self.global.lock().unwrap();
        let s = self.site.lock().unwrap();
        let d = &g.devices["dev0"];
        let v = &s.volumes["vb"];
        let global_done = d.generation == 2 && d.authoritative_site == "b";
        let site_done = v.generation == 2 && v.epoch == 2;
        assert_eq!(
            global_done, site_done,
            "{label}: committed in one group only: {d:?} {v:?}"
        );
        if !global_done {
            assert_eq!(
                (d.generation, v.generation, v.epoch),
                (1, 1, 1),
                "{label}: a half-applied abort"
            );
        }
        assert!(
            d.intent.is_none() && v.intent.is_none(),
            "{label}: intent left: {d:?} {v:?}"
        );
        assert!(
            g.txns.values().all(|t| t.finished),
            "{label}: unfinished transaction"
        );
        global_done
    }
}

impl Participants for Sim {
    async fn global(&self, cmd: Command) -> Result<Outcome, AuthError> {
        self.run(&self.global, cmd)
    }
    async fn site(&self, site: &str, cmd: Command) -> Result<Outcome, AuthError> {
        assert_eq!(site, "b");
        self.run(&self.site, cmd)
    }
    async fn record(&self, txn_id: &str) -> Result<Option<TxnRecord>, AuthError> {
        Ok(self.global.lock().unwrap().txns.get(txn_id).cloned())
    }
}

/// Steps of a full promotion: begin, prepare, decide, site finish, global finish, forget.
const STEPS: usize = 6;

#[tokio::test]
async fn an_undisturbed_promotion_commits_in_both_groups() {
    let sim = Sim::new();
    let out = promote(&sim, "t", "dev0", "b").await.unwrap();
    assert_eq!(
        out,
        Promoted {
            committed: true,
            new_generation: 2,
            refusal: None
        }
    );
    assert!(sim.assert_atomic("undisturbed"));
    // Idempotent by transaction id: a retry changes nothing and answers the same.
    let again = promote(&sim, "t", "dev0", "b").await.unwrap();
    assert!(again.committed);
    assert!(sim.assert_atomic("retried"));
}

#[tokio::test]
async fn a_coordinator_crash_at_any_step_is_resolved_by_recovery_to_both_or_neither() {
    let (mut commits, mut aborts) = (0, 0);
    for at in 1..=STEPS {
        for fault in [Fault::LostRequest, Fault::LostReply] {
            // Recovery itself crashes at each of its steps (0 = it does not), then reruns.
            for rec_at in 0..=4 {
                let sim = Sim::new();
                sim.arm(at, fault);
                let first = promote(&sim, "t", "dev0", "b").await;
                assert!(
                    first.is_err(),
                    "the injected crash at step {at} was not hit"
                );
                if rec_at > 0 {
                    sim.arm(rec_at, fault);
                    let _ = resolve(&sim, "t").await;
                }
                sim.disarm();
                // A begin that never committed left nothing anywhere: nothing to resolve.
                if sim.global.lock().unwrap().txns.contains_key("t") {
                    resolve(&sim, "t").await.unwrap();
                } else {
                    assert_eq!((at, fault), (1, Fault::LostRequest));
                }
                let label = format!("crash at {at} ({fault:?}), recovery crash at {rec_at}");
                if sim.assert_atomic(&label) {
                    commits += 1;
                } else {
                    aborts += 1;
                }
                // A late retry by the old coordinator cannot change the outcome.
                let late = promote(&sim, "t", "dev0", "b").await.unwrap();
                assert_eq!(
                    late.committed,
                    sim.global.lock().unwrap().devices["dev0"].generation == 2,
                    "{label}"
                );
                sim.assert_atomic(&format!("{label}, then a late retry"));
            }
        }
    }
    // Crashes before the decision abort; after it, the decision (commit) is carried out.
    assert!(
        commits > 0 && aborts > 0,
        "commits {commits}, aborts {aborts}"
    );
}

#[tokio::test]
async fn a_coordinator_that_retries_after_its_crash_finishes_the_transaction() {
    for at in 1..=STEPS {
        for fault in [Fault::LostRequest, Fault::LostReply] {
            let sim = Sim::new();
            sim.arm(at, fault);
            assert!(promote(&sim, "t", "dev0", "b").await.is_err());
            sim.disarm();
            let out = promote(&sim, "t", "dev0", "b").await.unwrap();
            assert!(
                out.committed,
                "crash at {at} ({fault:?}): a retry should commit"
            );
            assert!(sim.assert_atomic(&format!("retry after crash at {at} ({fault:?})")));
        }
    }
}

#[tokio::test]
async fn a_site_that_refuses_aborts_the_promotion_and_the_device_is_unlocked() {
    let sim = Sim::new();
    // A prepared transaction of someone else holds the volume.
    sim.site
        .lock()
        .unwrap()
        .apply(&Command::TxnPrepare {
            txn_id: "other".into(),
            volume: "vb".into(),
            new_generation: 5,
            to_site: "b".into(),
        })
        .unwrap();
    let out = promote(&sim, "t", "dev0", "b").await.unwrap();
    assert!(!out.committed);
    assert_eq!(
        out.refusal,
        Some(AuthError::TxnConflict {
            txn_id: "other".into()
        })
    );
    let g = sim.global.lock().unwrap();
    assert!(g.devices["dev0"].intent.is_none());
    assert_eq!(g.devices["dev0"].generation, 1);
}
