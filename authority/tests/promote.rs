//! Volume promotion over JSON-RPC on the embedded single-member daemon: both tiers change
//! together, and survive a restart of the daemon on its data directory.

use std::time::Duration;

use authority::client::AuthorityClient;
use authority::config::AuthorityConfig;
use authority::daemon::Daemon;
use authority::error::AuthError;

fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    format!("127.0.0.1:{}", l.local_addr().unwrap().port())
}

async fn start(config: &AuthorityConfig) -> Daemon {
    let d = Daemon::start(config.clone()).await.unwrap();
    for g in d.host.groups.values() {
        g.raft
            .wait(Some(Duration::from_secs(10)))
            .current_leader(1, "leader")
            .await
            .unwrap();
    }
    d
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promotion_moves_the_device_to_the_other_site_in_both_tiers_and_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let config = AuthorityConfig {
        data_dir: dir.path().join("data"),
        rpc_addr: free_addr(),
        raft_addr: free_addr(),
        unix_socket: None,
        heartbeat_ms: 50,
        election_timeout_min_ms: 150,
        election_timeout_max_ms: 300,
        ..Default::default()
    };
    let d = start(&config).await;
    let c = AuthorityClient::new(vec![config.rpc_addr.clone()]);
    for (site, vol, servers) in [
        ("site-a", "vol-a", ["a1", "a2"]),
        ("site-b", "vol-b", ["b1", "b2"]),
    ] {
        for s in servers {
            c.server_register(site, s, "d", "a").await.unwrap();
        }
        c.volume_create(site, vol, "dev0", 1 << 20, 512, &servers)
            .await
            .unwrap();
    }
    let dev = c
        .device_create(
            "dev0",
            1 << 20,
            512,
            &[("site-a", "vol-a"), ("site-b", "vol-b")],
            "site-a",
        )
        .await
        .unwrap();
    assert_eq!(
        (dev.generation, dev.authoritative_volume.as_str()),
        (1, "vol-a")
    );

    // Tier 1: site-a's volume holds authority over the device under generation 1.
    let a_lease = c.device_lease_acquire("dev0", "site-a").await.unwrap();
    assert_eq!(a_lease.generation, 1);
    assert!(matches!(
        c.device_lease_acquire("dev0", "site-b").await,
        Err(AuthError::NotPrimary { primary: Some(p) }) if p == "site-a"
    ));

    let p = c.volume_promote("dev0", "site-b", "txn-1").await.unwrap();
    assert!(p.committed);
    assert_eq!((p.generation, p.epoch), (2, 2));
    // Idempotent by transaction id.
    let again = c.volume_promote("dev0", "site-b", "txn-1").await.unwrap();
    assert_eq!(again, p);
    let dev = c.device_get("dev0").await.unwrap();
    assert_eq!(
        (dev.generation, dev.authoritative_site.as_str(), dev.intent),
        (2, "site-b", None)
    );
    let vb = c.volume_get("site-b", "vol-b").await.unwrap();
    assert_eq!((vb.generation, vb.epoch, vb.intent), (2, 2, None));
    // The old authoritative volume is fenced; the new one gets the device lease only once
    // the old lease could have run out.
    assert_eq!(
        c.device_lease_renew("dev0", "site-a", 1).await,
        Err(AuthError::StaleEpoch {
            epoch: 0,
            generation: 2
        })
    );
    let t = std::time::Instant::now();
    let b_lease = loop {
        match c.device_lease_acquire("dev0", "site-b").await {
            Ok(g) => break (g, std::time::Instant::now()),
            Err(AuthError::LeaseHeld {
                holder,
                retry_after_ms,
            }) => {
                assert_eq!(holder, "site-a");
                tokio::time::sleep(Duration::from_millis(retry_after_ms.min(500))).await;
            }
            Err(e) => panic!("{e}"),
        }
        assert!(t.elapsed() < Duration::from_secs(10));
    };
    let (b_lease, b_granted_at) = b_lease;
    assert_eq!(b_lease.generation, 2);
    assert!(
        b_granted_at >= a_lease.valid_until,
        "the new authoritative volume was granted while the old one could still act"
    );
    // The promoted volume's primary gets leases under the new generation.
    let g = c.lease_acquire("site-b", "vol-b", "b1").await.unwrap();
    assert_eq!((g.generation, g.epoch), (2, 2));
    // An unknown site is refused by name, and nothing is left locked.
    assert!(matches!(
        c.volume_promote("dev0", "site-z", "txn-2").await,
        Err(AuthError::UnknownSite { .. })
    ));
    assert_eq!(c.device_get("dev0").await.unwrap().intent, None);

    // Kill the daemon's groups and start again on the same directory.
    d.shutdown().await;
    let d = start(&config).await;
    let c = AuthorityClient::new(vec![config.rpc_addr.clone()]);
    assert_eq!(c.device_get("dev0").await.unwrap().generation, 2);
    let back = c.volume_promote("dev0", "site-a", "txn-3").await.unwrap();
    assert_eq!(back.generation, 3);
    assert_eq!(c.volume_get("site-a", "vol-a").await.unwrap().generation, 3);
    d.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_recovery_loop_aborts_a_transaction_whose_coordinator_died_after_prepare() {
    let dir = tempfile::tempdir().unwrap();
    let config = AuthorityConfig {
        data_dir: dir.path().join("data"),
        rpc_addr: free_addr(),
        raft_addr: free_addr(),
        unix_socket: None,
        heartbeat_ms: 50,
        election_timeout_min_ms: 150,
        election_timeout_max_ms: 300,
        txn_recovery_after_ms: 300,
        ..Default::default()
    };
    let d = start(&config).await;
    let c = AuthorityClient::new(vec![config.rpc_addr.clone()]);
    for (site, vol, server) in [("site-a", "vol-a", "a1"), ("site-b", "vol-b", "b1")] {
        c.server_register(site, server, "d", "a").await.unwrap();
        c.volume_create(site, vol, "dev0", 1 << 20, 512, &[server])
            .await
            .unwrap();
    }
    c.device_create(
        "dev0",
        1 << 20,
        512,
        &[("site-a", "vol-a"), ("site-b", "vol-b")],
        "site-a",
    )
    .await
    .unwrap();
    // A coordinator that began and prepared, then died: drive its two steps by hand.
    let begin = serde_json::json!({"command": {"TxnBegin": {"txn_id": "dead", "device": "dev0", "to_site": "site-b"}}});
    c.call("txn_step", begin).await.unwrap();
    let prepare = serde_json::json!({"site": "site-b", "command": {"TxnPrepare": {"txn_id": "dead", "volume": "vol-b", "new_generation": 2, "to_site": "site-b"}}});
    c.call("txn_step", prepare).await.unwrap();
    assert!(c.device_get("dev0").await.unwrap().intent.is_some());
    assert_eq!(
        c.failover_request("site-b", "vol-b", "blocked by the intent", true)
            .await,
        Err(AuthError::TxnConflict {
            txn_id: "dead".into()
        })
    );
    // txn_step refuses anything but transaction commands.
    let sneaky =
        serde_json::json!({"site": "site-b", "command": {"VolumeDelete": {"volume": "vol-b"}}});
    assert!(matches!(
        c.call("txn_step", sneaky).await,
        Err(AuthError::InvalidParams(_))
    ));

    let t = std::time::Instant::now();
    loop {
        let rec = c
            .call("txn_get", serde_json::json!({"txn_id": "dead"}))
            .await
            .unwrap();
        if rec["finished"] == true {
            assert_eq!(rec["decision"], false, "{rec}");
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "not recovered: {rec}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let dev = c.device_get("dev0").await.unwrap();
    assert_eq!(
        (dev.generation, dev.authoritative_site.as_str(), dev.intent),
        (1, "site-a", None)
    );
    let vb = c.volume_get("site-b", "vol-b").await.unwrap();
    assert_eq!((vb.generation, vb.epoch, vb.intent), (1, 1, None));
    // Unlocked: a new promotion goes through.
    assert!(
        c.volume_promote("dev0", "site-b", "alive")
            .await
            .unwrap()
            .committed
    );
    d.shutdown().await;
}
