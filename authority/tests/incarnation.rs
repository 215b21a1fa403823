//! A restarted server (a new process: a new incarnation) under the same server id does not get
//! its predecessor's lease back as a renewal: it waits until that lease could have run out, and
//! the predecessor can no longer renew.

use std::time::{Duration, Instant};

use authority::client::AuthorityClient;
use authority::config::AuthorityConfig;
use authority::daemon::Daemon;
use authority::error::AuthError;
use serde_json::{json, Value};

const LEASE_MS: u64 = 1000;
const DRIFT_MS: u64 = 100;

fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    format!("127.0.0.1:{}", l.local_addr().unwrap().port())
}

async fn lease(
    c: &AuthorityClient,
    method: &str,
    inc: &str,
    epoch: u64,
) -> Result<Value, AuthError> {
    c.call(
        method,
        json!({"site": "site-a", "volume": "v", "server_id": "s1", "epoch": epoch,
               "incarnation": inc}),
    )
    .await
}

async fn acquire(c: &AuthorityClient, inc: &str) -> Result<Value, AuthError> {
    c.call(
        "lease_acquire",
        json!({"site": "site-a", "volume": "v", "server_id": "s1", "incarnation": inc}),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_server_waits_out_its_predecessors_lease() {
    let dir = tempfile::tempdir().unwrap();
    let config = AuthorityConfig {
        data_dir: dir.path().join("data"),
        rpc_addr: free_addr(),
        raft_addr: free_addr(),
        unix_socket: None,
        lease_ms: LEASE_MS,
        drift_margin_ms: DRIFT_MS,
        heartbeat_ms: 50,
        election_timeout_min_ms: 150,
        election_timeout_max_ms: 300,
        ..Default::default()
    };
    let addr = config.rpc_addr.clone();
    let d = Daemon::start(config).await.unwrap();
    let c = AuthorityClient::new(vec![addr]);
    for s in ["s1", "s2"] {
        c.server_register("site-a", s, "d", "a").await.unwrap();
    }
    c.volume_create("site-a", "v", "dev0", 1 << 20, 512, &["s1", "s2"])
        .await
        .unwrap();

    // Incarnation "a" of s1 holds the lease and renews it.
    acquire(&c, "a").await.unwrap();
    let a_sent = Instant::now();
    lease(&c, "lease_renew", "a", 1).await.unwrap();

    // s1 restarts as incarnation "b": refused while a's lease could still run.
    match acquire(&c, "b").await {
        Err(AuthError::LeaseHeld { retry_after_ms, .. }) => assert!(retry_after_ms > 0),
        other => panic!("a new incarnation got the lease at once: {other:?}"),
    }
    // ... and granted once it could not: no sooner than a lease plus the margin after a's
    // last renewal was sent (the authority counts from after it confirmed that renewal).
    let granted_at = loop {
        match acquire(&c, "b").await {
            Ok(_) => break Instant::now(),
            Err(AuthError::LeaseHeld { retry_after_ms, .. }) => {
                tokio::time::sleep(Duration::from_millis(retry_after_ms.min(200))).await
            }
            Err(e) => panic!("{e:?}"),
        }
        assert!(
            a_sent.elapsed() < Duration::from_secs(10),
            "b never got the lease"
        );
    };
    assert!(
        granted_at - a_sent >= Duration::from_millis(LEASE_MS + DRIFT_MS),
        "b was granted {:?} after a's renewal",
        granted_at - a_sent
    );
    // The predecessor can no longer renew, nor release b's lease.
    assert!(matches!(
        lease(&c, "lease_renew", "a", 1).await,
        Err(AuthError::LeaseHeld { .. })
    ));
    lease(&c, "lease_release", "a", 1).await.unwrap();
    let v = c.volume_get("site-a", "v").await.unwrap();
    let h = v.lease_holder.expect("b holds the lease");
    assert_eq!(
        (h.server_id.as_str(), h.incarnation.as_deref()),
        ("s1", Some("b"))
    );
    lease(&c, "lease_renew", "b", 1).await.unwrap();
    d.shutdown().await;
}
