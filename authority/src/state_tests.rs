use proptest::prelude::*;
use serde_json::json;

use super::*;

fn site_with_volume(servers: &[&str]) -> GroupState {
    let mut st = GroupState::default();
    for s in servers {
        st.apply(&Command::ServerRegister {
            server_id: s.to_string(),
            data_addr: "d".into(),
            admin_addr: "a".into(),
        })
        .unwrap();
    }
    st.apply(&Command::VolumeCreate {
        volume: "v".into(),
        device: "dev0".into(),
        size_bytes: 1 << 20,
        block_size: 512,
        servers: servers.iter().map(|s| s.to_string()).collect(),
        generation: 1,
    })
    .unwrap();
    st
}

fn failover(force: bool, from: Option<u64>) -> Command {
    Command::Failover {
        volume: "v".into(),
        from_epoch: from,
        reason: "test".into(),
        force,
    }
}

#[test]
fn failover_promotes_an_in_sync_secondary_and_bumps_the_epoch() {
    let mut st = site_with_volume(&["s1", "s2", "s3"]);
    st.apply(&Command::SetInSync {
        volume: "v".into(),
        server_id: "s2".into(),
        in_sync: false,
        epoch: 1,
    })
    .unwrap();
    let out = st.apply(&failover(false, Some(1))).unwrap();
    assert_eq!(
        out,
        Outcome::Failover {
            primary: "s3".into(),
            epoch: 2,
            forced: false
        }
    );
    let v = &st.volumes["v"];
    assert_eq!(v.primary.as_deref(), Some("s3"));
    // The deposed primary may hold unacknowledged writes: out of sync.
    assert!(
        !v.servers
            .iter()
            .find(|s| s.server_id == "s1")
            .unwrap()
            .in_sync
    );
}

#[test]
fn failover_never_promotes_an_out_of_sync_secondary_unless_forced_and_says_so() {
    let mut st = site_with_volume(&["s1", "s2"]);
    st.apply(&Command::SetInSync {
        volume: "v".into(),
        server_id: "s2".into(),
        in_sync: false,
        epoch: 1,
    })
    .unwrap();
    let before = st.clone();
    assert_eq!(
        st.apply(&failover(false, None)),
        Err(AuthError::NotInSync {
            server_id: "s2".into()
        })
    );
    assert_eq!(st, before, "a refusal changes nothing");
    let out = st.apply(&failover(true, None)).unwrap();
    assert_eq!(
        out,
        Outcome::Failover {
            primary: "s2".into(),
            epoch: 2,
            forced: true
        }
    );
}

#[test]
fn a_retried_failover_returns_the_first_answer_and_a_stale_one_is_refused() {
    let mut st = site_with_volume(&["s1", "s2", "s3"]);
    let first = st.apply(&failover(false, Some(1))).unwrap();
    assert_eq!(st.apply(&failover(false, Some(1))).unwrap(), first);
    assert_eq!(
        st.volumes["v"].epoch, 2,
        "the retry did not fail over again"
    );
    st.apply(&failover(false, Some(2))).unwrap();
    assert_eq!(
        st.apply(&failover(false, Some(1))),
        Err(AuthError::StaleEpoch {
            epoch: 3,
            generation: 1
        })
    );
}

#[test]
fn another_incarnation_of_the_holder_is_another_holder() {
    let mut st = site_with_volume(&["s1", "s2"]);
    let holder = |inc: &str| LeaseHolder {
        server_id: "s1".into(),
        epoch: 1,
        incarnation: Some(inc.into()),
    };
    let grant = |inc: &str, prev: Option<LeaseHolder>| Command::GrantLease {
        volume: "v".into(),
        server_id: "s1".into(),
        epoch: 1,
        prev,
        incarnation: Some(inc.into()),
    };
    st.apply(&grant("a", None)).unwrap();
    // A restarted s1 (incarnation b) decided as if nobody held: refused, s1/a holds.
    assert!(matches!(
        st.apply(&grant("b", None)),
        Err(AuthError::LeaseHeld { .. })
    ));
    // A release by b does not free a's lease.
    let release = |inc: &str| Command::ReleaseLease {
        volume: "v".into(),
        server_id: "s1".into(),
        epoch: 1,
        incarnation: Some(inc.into()),
    };
    st.apply(&release("b")).unwrap();
    assert_eq!(st.volumes["v"].lease_holder, Some(holder("a")));
    // Decided after a's lease ran out (prev = a): granted to b.
    st.apply(&grant("b", Some(holder("a")))).unwrap();
    assert_eq!(st.volumes["v"].lease_holder, Some(holder("b")));
    st.apply(&release("b")).unwrap();
    assert_eq!(st.volumes["v"].lease_holder, None);
}

#[test]
fn lease_grants_are_compare_and_set_on_the_previous_holder() {
    let mut st = site_with_volume(&["s1", "s2"]);
    let grant = |s: &str, e: u64, prev: Option<LeaseHolder>| Command::GrantLease {
        volume: "v".into(),
        server_id: s.into(),
        epoch: e,
        prev,
        incarnation: None,
    };
    assert_eq!(
        st.apply(&grant("s2", 1, None)),
        Err(AuthError::NotPrimary {
            primary: Some("s1".into())
        })
    );
    assert_eq!(
        st.apply(&grant("s1", 1, None)),
        Ok(Outcome::Grant {
            epoch: 1,
            generation: 1
        })
    );
    // Same holder again: idempotent.
    assert_eq!(
        st.apply(&grant("s1", 1, None)),
        Ok(Outcome::Grant {
            epoch: 1,
            generation: 1
        })
    );
    st.apply(&failover(false, None)).unwrap();
    assert_eq!(
        st.apply(&grant("s2", 1, None)),
        Err(AuthError::StaleEpoch {
            epoch: 2,
            generation: 1
        })
    );
    // Decided while the leader saw no holder, but s1 holds: refused.
    assert!(matches!(
        st.apply(&grant("s2", 2, None)),
        Err(AuthError::LeaseHeld { .. })
    ));
    let prev = Some(LeaseHolder {
        server_id: "s1".into(),
        epoch: 1,
        incarnation: None,
    });
    assert_eq!(
        st.apply(&grant("s2", 2, prev)),
        Ok(Outcome::Grant {
            epoch: 2,
            generation: 1
        })
    );
}

#[test]
fn unknown_ids_are_refused_by_name() {
    let mut st = site_with_volume(&["s1"]);
    assert_eq!(
        st.apply(&Command::ServerHeartbeat {
            server_id: "nope".into(),
            health: json!({}),
            unix_ms: 0
        }),
        Err(AuthError::UnknownServer {
            server_id: "nope".into()
        })
    );
    assert_eq!(
        st.apply(&Command::VolumeDelete { volume: "x".into() }),
        Err(AuthError::UnknownVolume { volume: "x".into() })
    );
    assert_eq!(
        st.apply(&Command::DeviceDelete { device: "d".into() }),
        Err(AuthError::UnknownDevice { device: "d".into() })
    );
}

#[test]
fn promotion_commits_in_both_tiers_with_a_new_generation_and_epoch() {
    let mut global = GroupState::default();
    global
        .apply(&Command::DeviceCreate {
            device: "dev0".into(),
            size_bytes: 1 << 20,
            block_size: 512,
            volumes: [
                ("a".to_string(), "va".to_string()),
                ("b".to_string(), "v".to_string()),
            ]
            .into(),
            authoritative_site: "a".into(),
        })
        .unwrap();
    let mut site_b = site_with_volume(&["s1", "s2"]);
    let begin = global.apply(&Command::TxnBegin {
        txn_id: "t1".into(),
        device: "dev0".into(),
        to_site: "b".into(),
    });
    assert_eq!(
        begin,
        Ok(Outcome::Txn {
            decision: None,
            new_generation: 2
        })
    );
    // The intent blocks a conflicting change.
    assert_eq!(
        global.apply(&Command::TxnBegin {
            txn_id: "t2".into(),
            device: "dev0".into(),
            to_site: "b".into()
        }),
        Err(AuthError::TxnConflict {
            txn_id: "t1".into()
        })
    );
    let prep = Command::TxnPrepare {
        txn_id: "t1".into(),
        volume: "v".into(),
        new_generation: 2,
        to_site: "b".into(),
    };
    site_b.apply(&prep).unwrap();
    assert_eq!(
        site_b.apply(&failover(false, None)),
        Err(AuthError::TxnConflict {
            txn_id: "t1".into()
        })
    );
    global
        .apply(&Command::TxnDecide {
            txn_id: "t1".into(),
            commit: true,
        })
        .unwrap();
    // The first decision wins.
    let again = global
        .apply(&Command::TxnDecide {
            txn_id: "t1".into(),
            commit: false,
        })
        .unwrap();
    assert_eq!(
        again,
        Outcome::Txn {
            decision: Some(true),
            new_generation: 2
        }
    );
    for st in [&mut global, &mut site_b] {
        st.apply(&Command::TxnFinish {
            txn_id: "t1".into(),
            commit: true,
        })
        .unwrap();
        // Finishing twice is harmless.
        st.apply(&Command::TxnFinish {
            txn_id: "t1".into(),
            commit: true,
        })
        .unwrap();
    }
    assert_eq!(global.devices["dev0"].generation, 2);
    assert_eq!(global.devices["dev0"].authoritative_site, "b");
    assert_eq!(site_b.volumes["v"].generation, 2);
    assert_eq!(site_b.volumes["v"].epoch, 2);
    assert!(site_b.volumes["v"].intent.is_none());
}

#[test]
fn an_abort_before_prepare_fences_a_late_prepare() {
    let mut site_b = site_with_volume(&["s1"]);
    site_b
        .apply(&Command::TxnFinish {
            txn_id: "t1".into(),
            commit: false,
        })
        .unwrap();
    let late = Command::TxnPrepare {
        txn_id: "t1".into(),
        volume: "v".into(),
        new_generation: 2,
        to_site: "b".into(),
    };
    assert_eq!(
        site_b.apply(&late),
        Ok(Outcome::Txn {
            decision: Some(false),
            new_generation: 2
        })
    );
    assert!(
        site_b.volumes["v"].intent.is_none(),
        "an aborted transaction locked the volume"
    );
}

fn arb_command() -> impl Strategy<Value = Command> {
    let server = prop::sample::select(vec!["s1", "s2", "s3", "zz"]).prop_map(String::from);
    let volume = prop::sample::select(vec!["v", "w"]).prop_map(String::from);
    let epoch = 0u64..5;
    prop_oneof![
        (server.clone()).prop_map(|s| Command::ServerRegister {
            server_id: s,
            data_addr: "d".into(),
            admin_addr: "a".into()
        }),
        (server.clone()).prop_map(|s| Command::ServerHeartbeat {
            server_id: s,
            health: json!({"ok": true}),
            unix_ms: 1
        }),
        (volume.clone(), prop::collection::vec(server.clone(), 0..4)).prop_map(|(v, s)| {
            Command::VolumeCreate {
                volume: v,
                device: "dev0".into(),
                size_bytes: 1 << 20,
                block_size: 512,
                servers: s,
                generation: 1,
            }
        }),
        volume
            .clone()
            .prop_map(|v| Command::VolumeDelete { volume: v }),
        (
            volume.clone(),
            server.clone(),
            epoch.clone(),
            prop::option::of((server.clone(), epoch.clone()))
        )
            .prop_map(|(v, s, e, p)| Command::GrantLease {
                volume: v,
                server_id: s,
                epoch: e,
                prev: p.map(|(server_id, epoch)| LeaseHolder {
                    server_id,
                    epoch,
                    incarnation: None,
                }),
                incarnation: None,
            }),
        (volume.clone(), server.clone(), epoch.clone()).prop_map(|(v, s, e)| {
            Command::ReleaseLease {
                volume: v,
                server_id: s,
                epoch: e,
                incarnation: None,
            }
        }),
        (volume.clone(), server.clone(), any::<bool>(), epoch.clone()).prop_map(|(v, s, i, e)| {
            Command::SetInSync {
                volume: v,
                server_id: s,
                in_sync: i,
                epoch: e,
            }
        }),
        (volume, prop::option::of(epoch), any::<bool>()).prop_map(|(v, e, f)| Command::Failover {
            volume: v,
            from_epoch: e,
            reason: "p".into(),
            force: f
        }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Any sequence of commands: a refusal leaves the state unchanged; epochs and
    /// generations never go back; the primary is one of the volume's servers; a recorded
    /// lease holder's epoch is never newer than the volume's.
    #[test]
    fn refusals_change_nothing_and_epochs_only_grow(cmds in prop::collection::vec(arb_command(), 1..60)) {
        let mut st = GroupState::default();
        for cmd in &cmds {
            let before = st.clone();
            let res = st.apply(cmd);
            if res.is_err() {
                prop_assert_eq!(&st, &before, "refused {:?} but changed the state", cmd);
            }
            for (name, v) in &st.volumes {
                if let Some(old) = before.volumes.get(name) {
                    prop_assert!(v.epoch >= old.epoch && v.generation >= old.generation);
                }
                let p = v.primary.as_ref().expect("a volume has a primary");
                prop_assert!(v.servers.iter().any(|s| &s.server_id == p));
                prop_assert!(v.servers.iter().find(|s| &s.server_id == p).unwrap().in_sync);
                if let Some(h) = &v.lease_holder {
                    prop_assert!(h.epoch <= v.epoch);
                }
            }
        }
    }
}
