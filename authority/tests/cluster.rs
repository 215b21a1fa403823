//! A 3-member group on loopback: leader killed with SIGKILL while servers renew leases.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use authority::error::AuthError;
use authority::history::{check, GrantEvent};
use common::{Cluster, DRIFT_MS, LEASE_MS};
use serde_json::json;

const SITE: &str = "site-a";

async fn setup_volume(c: &authority::client::AuthorityClient, volume: &str, servers: &[&str]) {
    for s in servers {
        c.server_register(SITE, s, &format!("{s}:data"), &format!("{s}:admin"))
            .await
            .unwrap();
    }
    c.volume_create(SITE, volume, "dev0", 1 << 20, 512, servers)
        .await
        .unwrap();
}

/// One server's loop: hold the lease when designated primary, renewing at L/4; record every
/// grant as the holder sees it.
async fn server_loop(
    client: Arc<authority::client::AuthorityClient>,
    volume: String,
    server: String,
    until: Instant,
    history: Arc<Mutex<Vec<GrantEvent>>>,
    renewals: Arc<std::sync::atomic::AtomicU64>,
) {
    let mut held: Option<authority::client::LeaseGrant> = None;
    while Instant::now() < until {
        let res = match held {
            Some(g) if g.is_valid() => client.lease_renew(SITE, &volume, &server, g.epoch).await,
            _ => client.lease_acquire(SITE, &volume, &server).await,
        };
        match res {
            Ok(g) => {
                history.lock().unwrap().push(GrantEvent {
                    volume: volume.clone(),
                    server_id: server.clone(),
                    epoch: g.epoch,
                    // A holder can act only once it has the answer, and only until its own
                    // deadline counted from the send.
                    valid_from: std::time::Instant::now(),
                    valid_until: g.valid_until,
                });
                if held.is_some() {
                    renewals.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                held = Some(g);
                tokio::time::sleep(Duration::from_millis(LEASE_MS / 4)).await;
            }
            Err(AuthError::StaleEpoch { .. }) | Err(AuthError::NotPrimary { .. }) => {
                // Deposed: stop acting at once (the recorded validity already ends by itself).
                held = None;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(AuthError::LeaseHeld { retry_after_ms, .. }) => {
                tokio::time::sleep(Duration::from_millis(retry_after_ms.min(500))).await;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_kill_during_renewals_keeps_leases_safe_and_a_restarted_member_catches_up() {
    let mut cluster = Cluster::start(3);
    let client = Arc::new(cluster.client());
    cluster.leader_of("site-a", Duration::from_secs(20)).await;
    let volumes = ["vol-1", "vol-2"];
    for v in volumes {
        setup_volume(&client, v, &["s1", "s2", "s3"]).await;
    }

    let history = Arc::new(Mutex::new(Vec::new()));
    let renewals = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let until = Instant::now() + Duration::from_secs(14);
    let mut tasks = Vec::new();
    for v in volumes {
        for s in ["s1", "s2", "s3"] {
            tasks.push(tokio::spawn(server_loop(
                client.clone(),
                v.to_string(),
                s.to_string(),
                until,
                history.clone(),
                renewals.clone(),
            )));
        }
    }

    // Renewals flow; then kill the leader of site-a's group.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before_kill = renewals.load(std::sync::atomic::Ordering::Relaxed);
    assert!(before_kill > 0, "no renewal before the kill");
    let old = cluster.leader_of("site-a", Duration::from_secs(5)).await;
    cluster.kill(old);
    let killed_at = Instant::now();

    // A new leader is elected and keeps granting.
    let new = cluster.leader_of("site-a", Duration::from_secs(10)).await;
    assert_ne!(new, old);
    let n0 = renewals.load(std::sync::atomic::Ordering::Relaxed);
    let t = Instant::now();
    while renewals.load(std::sync::atomic::Ordering::Relaxed) < n0 + 4 {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "renewals stopped after the leader was killed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
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
    let mut durable = BTreeMap::new();
    for v in volumes {
        durable.insert(
            v.to_string(),
            client.volume_get(SITE, v).await.unwrap().epoch,
        );
    }
    let history = history.lock().unwrap().clone();
    let holders: std::collections::BTreeSet<_> = history
        .iter()
        .map(|e| (&e.volume, &e.server_id, e.epoch))
        .collect();
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
