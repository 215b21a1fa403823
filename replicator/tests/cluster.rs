//! Multi-process tests: real `replicator serve` processes on loopback, kill -9, restarts,
//! a client pipeline in the test process. The authority is the JSON-RPC stand-in of
//! `common` (see there), not the real `authority` crate.

mod common;

use anyhow::Result;
use common::*;
use std::time::Duration;

const MIB: u64 = 1 << 20;
const T: Duration = Duration::from_secs(30);

fn two_server_volume(si: &StandIn, vol: &str, in_sync: &[&str]) {
    si.fake.create_volume(
        SITE,
        vol,
        64 * MIB,
        BS as u32,
        1000,
        &["s1", "s2"],
        "s1",
        in_sync,
    );
}

#[test]
fn secondary_kill9_degrades_then_catches_up_from_bitmap_under_live_writes() -> Result<()> {
    let root = tempfile::tempdir()?;
    eprintln!("test dir {}", root.path().display());
    let si = StandIn::start();
    two_server_volume(&si, "vol-a", &["s1", "s2"]);
    let s1 = ServerProc::start("s1", root.path(), &si.addr, &["vol-a"], &[])?;
    let mut s2 = ServerProc::start("s2", root.path(), &si.addr, &["vol-a"], &[])?;
    wait_until("s1 primary with s2 in sync", T, || {
        in_sync_peers(&s1, "vol-a") == ["s2"]
    })?;

    let p = pipeline(&si, "vol-a");
    let w = p.worker(32);
    assert_eq!(write_blocks(&w, "vol-a", 0..300, 1)?.len(), 300);
    // In sync: the secondary has every acknowledged write.
    for b in 0..300 {
        assert_eq!(
            file_stamp(&s2.data_file("vol-a"), "vol-a", b),
            Some(1),
            "s2 block {b}"
        );
    }

    s2.kill9();
    // The primary goes on alone once the secondary times out, and says so.
    assert_eq!(write_blocks(&w, "vol-a", 200..600, 2)?.len(), 400);
    let h = s1.volume_health("vol-a")?;
    assert_eq!(h["degraded"], true, "{h}");
    assert_eq!(
        si.fake
            .info(SITE, "vol-a")
            .unwrap()
            .server("s2")
            .unwrap()
            .in_sync,
        false
    );
    assert!(h["peers"][0]["dirty_regions"].as_u64().unwrap() >= 1, "{h}");

    // Back: catch-up from the bitmap while the client keeps writing.
    s2.restart()?;
    let writer = std::thread::spawn({
        let w = p.worker(16);
        move || -> Result<Vec<u64>> {
            let mut acked = Vec::new();
            for round in 0..5u64 {
                acked.extend(write_blocks(
                    &w,
                    "vol-a",
                    (round * 100)..(round * 100 + 150),
                    10 + round,
                )?);
            }
            Ok(acked)
        }
    });
    wait_until("s2 back in sync at the authority", T, || {
        si.fake
            .info(SITE, "vol-a")
            .unwrap()
            .server("s2")
            .unwrap()
            .in_sync
    })?;
    writer.join().unwrap()?;
    let h = s1.volume_health("vol-a")?;
    assert_eq!(h["degraded"], false, "{h}");
    assert_eq!(
        h["peers"][0]["full_rebuild"],
        false,
        "catch-up must be incremental: {h}\n{}",
        s1.log_text()
    );
    // Fewer regions copied than a full rebuild (64) would need.
    assert!(h["peers"][0]["copy_total"].as_u64().unwrap() < 64, "{h}");

    // Block by block: both replicas identical, newest stamps where expected.
    flush(&w)?;
    files_equal_blocks(
        &s1.data_file("vol-a"),
        &s2.data_file("vol-a"),
        0..(64 * MIB / BS),
    )?;
    for b in 0..600u64 {
        let expect = (0..5u64)
            .rev()
            .find(|r| (r * 100..r * 100 + 150).contains(&b))
            .map(|r| 10 + r)
            .unwrap_or(if b >= 200 { 2 } else { 1 });
        assert_eq!(
            file_stamp(&s1.data_file("vol-a"), "vol-a", b),
            Some(expect),
            "block {b}"
        );
    }
    Ok(())
}
