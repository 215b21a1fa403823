//! A 3-member group on loopback whose Raft traffic passes a fault injector
//! (`common::relay`): the site group's leader is partitioned away from the other two while
//! nine clients acquire and renew leases and the volumes fail over; the partition heals; then
//! the leader of the moment is killed with SIGKILL and restarted. The recorded history must
//! pass the safety checker.

mod common;

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use authority::history::check;
use common::{durable_epochs, holders, lease_loop, renewals_resume, setup_volume, Cluster, Ops};

const SITE: &str = "site-a";
const VOLUMES: [&str; 3] = ["vol-1", "vol-2", "vol-3"];
const SERVERS: [&str; 3] = ["s1", "s2", "s3"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_then_killed_leaders_keep_leases_safe() {
    let mut cluster = Cluster::start_relayed(3);
    let client = Arc::new(cluster.client());
    cluster.leader_of(SITE, Duration::from_secs(20)).await;
    for v in VOLUMES {
        setup_volume(&client, SITE, v, &SERVERS).await;
    }

    let history = Arc::new(Mutex::new(Vec::new()));
    let ops = Arc::new(Ops::default());
    let until = Instant::now() + Duration::from_secs(22);
    let mut tasks = Vec::new();
    for v in VOLUMES {
        for s in SERVERS {
            // Each server has its own client (its own idea of who leads), as in production.
            tasks.push(tokio::spawn(lease_loop(
                Arc::new(cluster.client()),
                SITE,
                v.to_string(),
                s.to_string(),
                until,
                history.clone(),
                ops.clone(),
            )));
        }
    }
    let (mut partitions, mut kills, mut failovers) = (0, 0, 0);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(ops.renewals() > 0, "no renewal before the partition");

    // Fault 1: cut the site group's leader off from both other members.
    let cut = cluster.leader_of(SITE, Duration::from_secs(5)).await;
    let relay = cluster.relay.as_ref().expect("relayed cluster");
    relay.cut(cluster.members[cut].id);
    partitions += 1;
    let cut_at = Instant::now();
    // The majority elects a leader of its own (the cut one may still believe it leads).
    let majority = cluster
        .leader_except(SITE, Some(cut), Duration::from_secs(15))
        .await;
    assert_ne!(majority, cut);
    renewals_resume(&ops, 4, Duration::from_secs(15), "the partition").await;
    eprintln!(
        "partition: member {} cut; renewals resumed {:?} after the cut",
        cluster.members[cut].id,
        cut_at.elapsed()
    );
    // Leases move while the old leader is isolated: each new primary must wait out the old
    // lease, which clients may still be renewing at the isolated member (in vain).
    for v in VOLUMES {
        client
            .failover_request(SITE, v, "partition test", false)
            .await
            .unwrap();
        failovers += 1;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    relay.heal();
    eprintln!("healed after {:?}", cut_at.elapsed());

    // The old leader rejoins as a follower and catches up.
    let leader = cluster.leader_of(SITE, Duration::from_secs(15)).await;
    let target = cluster.status(leader, SITE).await.unwrap()["last_applied"]
        .as_u64()
        .unwrap();
    let t = Instant::now();
    while cluster
        .status(cut, SITE)
        .await
        .and_then(|s| s["last_applied"].as_u64())
        .unwrap_or(0)
        < target
    {
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "the healed member did not catch up to {target}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    renewals_resume(&ops, 4, Duration::from_secs(15), "the heal").await;

    // Fault 2: SIGKILL the leader of the moment, fail over under its successor, restart it.
    let killed = cluster.leader_of(SITE, Duration::from_secs(15)).await;
    cluster.kill(killed);
    kills += 1;
    let successor = cluster.leader_of(SITE, Duration::from_secs(15)).await;
    assert_ne!(successor, killed);
    renewals_resume(&ops, 4, Duration::from_secs(15), "the kill").await;
    for v in VOLUMES {
        client
            .failover_request(SITE, v, "kill test", true)
            .await
            .unwrap();
        failovers += 1;
    }
    cluster.spawn(killed);

    for t in tasks {
        t.await.unwrap();
    }
    let durable = durable_epochs(&client, SITE, &VOLUMES).await;
    let history = history.lock().unwrap().clone();
    let holders = holders(&history);
    let stats = &cluster.relay.as_ref().unwrap().stats;
    eprintln!(
        "faults: {partitions} partition, {kills} SIGKILL, {failovers} failovers; \
         operations: {} ({} grants recorded, {} holders); raft frames: {} forwarded, {} dropped",
        ops.report(),
        history.len(),
        holders.len(),
        stats.forwarded.load(Ordering::Relaxed),
        stats.dropped.load(Ordering::Relaxed),
    );
    assert_eq!(
        stats.unknown_sender.load(Ordering::Relaxed),
        0,
        "the relay could not tell who sent some frames, so it may not have cut them"
    );
    assert!(
        stats.dropped.load(Ordering::Relaxed) > 0,
        "the partition dropped nothing"
    );
    // Every volume changed hands at least twice (two rounds of failover).
    assert!(
        holders.len() >= 3 * VOLUMES.len(),
        "the failovers did not move the leases: {holders:?}"
    );
    let violations = check(&history, &durable);
    assert!(violations.is_empty(), "safety violations: {violations:?}");
}
