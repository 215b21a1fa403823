//! A 3-member group on loopback: leader killed with SIGKILL while servers renew leases.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use authority::error::AuthError;
use authority::history::check;
use common::{
    durable_epochs, holders, lease_loop, renewals_resume, setup_volume, Cluster, Ops, DRIFT_MS,
    LEASE_MS,
};
use serde_json::json;

const SITE: &str = "site-a";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_kill_during_renewals_keeps_leases_safe_and_a_restarted_member_catches_up() {
    let mut cluster = Cluster::start(3);
    let client = Arc::new(cluster.client());
    cluster.leader_of("site-a", Duration::from_secs(20)).await;
    let volumes = ["vol-1", "vol-2"];
    for v in volumes {
        setup_volume(&client, SITE, v, &["s1", "s2", "s3"]).await;
    }

    let history = Arc::new(Mutex::new(Vec::new()));
    let ops = Arc::new(Ops::default());
    let until = Instant::now() + Duration::from_secs(14);
    let mut tasks = Vec::new();
    for v in volumes {
        for s in ["s1", "s2", "s3"] {
            tasks.push(tokio::spawn(lease_loop(
                client.clone(),
                SITE,
                v.to_string(),
                s.to_string(),
                until,
                history.clone(),
                ops.clone(),
            )));
        }
    }

    // Renewals flow; then kill the leader of site-a's group.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before_kill = ops.renewals();
    assert!(before_kill > 0, "no renewal before the kill");
    let old = cluster.leader_of("site-a", Duration::from_secs(5)).await;
    cluster.kill(old);
    let killed_at = Instant::now();

    // A new leader is elected and keeps granting.
    let new = cluster.leader_of("site-a", Duration::from_secs(10)).await;
    assert_ne!(new, old);
    renewals_resume(&ops, 4, Duration::from_secs(10), "the leader was killed").await;
    eprintln!("renewals resumed {:?} after the kill", killed_at.elapsed());

    // Failovers under the new leader: each new primary must wait out the old lease.
    for v in volumes {
        client
            .failover_request(SITE, v, "test", false)
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    for v in volumes {
        client
            .failover_request(SITE, v, "test again", true)
            .await
            .unwrap();
    }

    // Restart the killed member on its data: it catches up from disk and from the leader.
    cluster.spawn(old);
    for t in tasks {
        t.await.unwrap();
    }
    let leader_status = cluster
        .status(
            cluster.leader_of("site-a", Duration::from_secs(10)).await,
            "site-a",
        )
        .await
        .unwrap();
    let target = leader_status["last_applied"].as_u64().unwrap();
    let t = Instant::now();
    loop {
        if let Some(s) = cluster.status(old, "site-a").await {
            if s["last_applied"].as_u64().unwrap_or(0) >= target {
                break;
            }
        }
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "restarted member did not catch up to {target}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Safety over the recorded history, against what the group kept.
    let durable = durable_epochs(&client, SITE, &volumes).await;
    let history = history.lock().unwrap().clone();
    let holders = holders(&history);
    eprintln!("{} grants, holders {:?}", history.len(), holders);
    assert!(
        holders.len() >= 4,
        "the failovers did not move the leases: {holders:?}"
    );
    let violations = check(&history, &durable);
    assert!(violations.is_empty(), "safety violations: {violations:?}");

    // The restarted member serves linearizable reads after catching up (via redirect).
    let config = cluster
        .direct(old)
        .call("config_get", json!({"group": "site-a"}))
        .await;
    assert!(
        matches!(config, Ok(_) | Err(AuthError::NotLeader { .. })),
        "{config:?}"
    );
    let _ = (DRIFT_MS, LEASE_MS);
}
