//! Membership changes on real processes: a 1-member group grows to 3 (learners, then joint
//! consensus), survives the SIGKILL of its first member, and removes it.

mod common;

use std::time::{Duration, Instant};

use common::Cluster;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_grows_from_one_to_three_members_survives_losing_the_first_and_removes_it() {
    let mut cluster = Cluster::start_listing(3, 1);
    let client = cluster.client();
    cluster.leader_of("site-a", Duration::from_secs(20)).await;
    client
        .server_register("site-a", "s1", "d", "a")
        .await
        .unwrap();
    client
        .volume_create("site-a", "vol-a", "dev0", 1 << 20, 512, &["s1"])
        .await
        .unwrap();

    // Without `group` a membership call covers every group of the process it reaches: fine
    // while one process leads them all.
    for m in &cluster.members[1..] {
        client
            .call(
                "cluster_add_learner",
                json!({"id": m.id, "raft_addr": m.raft_addr, "rpc_addr": m.rpc_addr}),
            )
            .await
            .unwrap();
    }
    client
        .call("cluster_change_membership", json!({"voters": [1, 2, 3]}))
        .await
        .unwrap();
    for group in ["global", "site-a", "site-b"] {
        let s = cluster.status(0, group).await.unwrap();
        assert_eq!(s["voters"], json!([1, 2, 3]), "{group}: {s}");
    }
    let g = client.lease_acquire("site-a", "vol-a", "s1").await.unwrap();

    // The first member (leader of everything so far) dies; the two added ones carry on.
    cluster.kill(0);
    let leader = cluster.leader_of("site-a", Duration::from_secs(15)).await;
    assert_ne!(leader, 0);
    let v = client.volume_get("site-a", "vol-a").await.unwrap();
    assert_eq!(
        v.lease_holder.map(|h| h.server_id),
        Some("s1".into()),
        "the grant survived"
    );
    let t = Instant::now();
    loop {
        match client.lease_renew("site-a", "vol-a", "s1", g.epoch).await {
            Ok(r) => {
                assert_eq!(r.epoch, 1);
                break;
            }
            Err(e) => assert!(
                t.elapsed() < Duration::from_secs(15),
                "no renewal after the kill: {e}"
            ),
        }
    }

    // Remove the dead member from every group; the groups' leaders may now be different
    // processes, so one call per group (the client routes each to its group's leader).
    for group in ["global", "site-a", "site-b"] {
        client
            .call(
                "cluster_change_membership",
                json!({"voters": [2, 3], "group": group}),
            )
            .await
            .unwrap();
    }
    let s = cluster.status(leader, "site-a").await.unwrap();
    assert_eq!(s["voters"], json!([2, 3]), "{s}");
    client
        .server_register("site-a", "s2", "d", "a")
        .await
        .unwrap();
}
