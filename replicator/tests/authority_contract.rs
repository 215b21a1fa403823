//! The replicator's `Authority` trait (`ClientAuthority`) against the real authority: every
//! tier-2 method the servers call, and the refusals they act on, with the codes and data the
//! replicator's error variants carry. No replicator process: just the trait over the wire.

mod common;

use anyhow::Result;
use common::*;
use replicator::authority::{Authority, AuthorityError};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

#[test]
fn every_method_and_refusal_the_replicator_relies_on() -> Result<()> {
    let au = TestAuthority::start();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let a = au.client();
    rt.block_on(async {
        a.server_register(SITE, "s1", "127.0.0.1:1", "127.0.0.1:2")
            .await?;
        a.server_register(SITE, "s2", "127.0.0.1:3", "127.0.0.1:4")
            .await?;
        a.server_heartbeat(SITE, "s1", serde_json::json!({"ok": true}))
            .await?;
        assert_eq!(
            a.server_heartbeat(SITE, "nobody", serde_json::json!({}))
                .await,
            Err(AuthorityError::UnknownServer)
        );
        assert_eq!(
            a.volume_get(SITE, "vol-n").await,
            Err(AuthorityError::UnknownVolume)
        );
        assert_eq!(
            a.volume_get("no-such-site", "vol-n").await,
            Err(AuthorityError::UnknownSite)
        );
        Ok::<_, anyhow::Error>(())
    })?;
    au.create_volume("vol-n", 16 * MIB, &["s1", "s2"]);
    rt.block_on(async {
        let i = a.volume_get(SITE, "vol-n").await?;
        assert_eq!((i.epoch, i.generation), (1, 1));
        assert_eq!(i.primary.as_deref(), Some("s1"));
        assert_eq!(i.lease_ms, LEASE_MS);
        assert_eq!((i.size_bytes, i.block_size), (16 * MIB, BS as u32));
        let s2 = i.server("s2").expect("s2 listed");
        assert_eq!(
            (s2.data_addr.as_str(), s2.admin_addr.as_str(), s2.in_sync),
            ("127.0.0.1:3", "127.0.0.1:4", true)
        );

        // Only the designated primary gets the lease.
        assert_eq!(
            a.lease_acquire(SITE, "vol-n", "s2").await,
            Err(AuthorityError::NotPrimary {
                primary: Some("s1".into())
            })
        );
        let g = a.lease_acquire(SITE, "vol-n", "s1").await?;
        assert_eq!((g.epoch, g.generation, g.lease_ms), (1, 1, LEASE_MS));
        a.lease_renew(SITE, "vol-n", "s1", 1).await?;
        assert_eq!(
            a.lease_renew(SITE, "vol-n", "s1", 7).await,
            Err(AuthorityError::StaleEpoch {
                epoch: 1,
                generation: 1
            })
        );

        // Degraded: the primary marks s2 out of sync; no failover to it without force.
        let i = a.volume_set_in_sync(SITE, "vol-n", "s2", false, 1).await?;
        assert!(!i.server("s2").unwrap().in_sync);
        assert_eq!(
            a.failover_request(SITE, "vol-n", "test", false).await,
            Err(AuthorityError::NotInSync {
                server_id: "s2".into()
            })
        );
        a.volume_set_in_sync(SITE, "vol-n", "s2", true, 1).await?;

        // Failover: s2 at epoch 2; s1 is deposed (its renewal and its in-sync marks are stale).
        let last_renew = Instant::now();
        a.lease_renew(SITE, "vol-n", "s1", 1).await?;
        let out = a.failover_request(SITE, "vol-n", "test", false).await?;
        assert_eq!((out.primary.as_str(), out.epoch), ("s2", 2));
        let stale = Err(AuthorityError::StaleEpoch {
            epoch: 2,
            generation: 1,
        });
        assert_eq!(
            a.lease_renew(SITE, "vol-n", "s1", 1).await.map(|_| ()),
            stale
        );
        assert_eq!(
            a.volume_set_in_sync(SITE, "vol-n", "s1", true, 1)
                .await
                .map(|_| ()),
            stale
        );
        // s2 waits until s1's lease could have run out: LeaseHeld names s1 and a wait.
        let mut refusals = 0;
        let g = loop {
            match a.lease_acquire(SITE, "vol-n", "s2").await {
                Ok(g) => break g,
                Err(AuthorityError::LeaseHeld {
                    holder,
                    retry_after_ms,
                }) => {
                    assert_eq!(holder, "s1");
                    assert!(retry_after_ms > 0 && retry_after_ms <= LEASE_MS + AUTHORITY_DRIFT_MS);
                    refusals += 1;
                    tokio::time::sleep(Duration::from_millis(retry_after_ms.min(100))).await;
                }
                Err(e) => anyhow::bail!("lease_acquire by s2: {e}"),
            }
            assert!(last_renew.elapsed() < Duration::from_secs(10));
        };
        assert!(refusals >= 1, "the new primary had to wait");
        assert!(
            last_renew.elapsed() >= Duration::from_millis(LEASE_MS),
            "granted {:?} after s1's last renewal was sent",
            last_renew.elapsed()
        );
        assert_eq!((g.epoch, g.generation), (2, 1));

        // A released lease is free at once (s2 acquires again without waiting).
        a.lease_release(SITE, "vol-n", "s2", 2).await?;
        assert_eq!(au_lease_holder(&au), None);
        let t = Instant::now();
        a.lease_acquire(SITE, "vol-n", "s2").await?;
        assert!(t.elapsed() < Duration::from_millis(LEASE_MS));
        Ok::<_, anyhow::Error>(())
    })?;
    Ok(())
}

fn au_lease_holder(au: &TestAuthority) -> Option<String> {
    // `au` runs its own runtime; calling it from inside this test's runtime would nest
    // runtimes, so it is asked from a plain thread.
    std::thread::scope(|s| s.spawn(|| au.lease_holder("vol-n")).join().unwrap())
}

#[test]
fn an_unreachable_authority_is_unavailable_within_the_call_timeout() -> Result<()> {
    let au = TestAuthority::start();
    let addr = au.addr_for("s1");
    let a = replicator::authority::client::ClientAuthority::new(
        vec![addr],
        Duration::from_millis(1500),
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(a.server_register(SITE, "s1", "127.0.0.1:1", "127.0.0.1:2"))?;
    au.cut("s1", true);
    let t = Instant::now();
    let r = rt.block_on(a.volume_get(SITE, "vol-n"));
    assert!(matches!(r, Err(AuthorityError::Unavailable(_))), "{r:?}");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    au.cut("s1", false);
    // Healed: the same client reconnects.
    rt.block_on(a.server_heartbeat(SITE, "s1", serde_json::json!({})))?;
    Ok(())
}
