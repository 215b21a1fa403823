//! Multi-process tests: real `replicator serve` processes on loopback, kill -9, restarts,
//! a client pipeline in the test process, against the real authority (`authority` crate's
//! daemon, one member, in the test process; see `common`): real leases with the lease-clock
//! waits, real `failover_request`, real `volume_set_in_sync`.

mod common;

use anyhow::{Context, Result};
use common::*;
use std::time::Duration;

const MIB: u64 = 1 << 20;
const T: Duration = Duration::from_secs(30);

fn two_server_volume(au: &TestAuthority, vol: &str) {
    au.create_volume(vol, 64 * MIB, &["s1", "s2"]);
}

/// Sends one stamped block write straight to the server at `addr`, at the authority's
/// current (generation, epoch), without waiting for its answer (which may never come); the
/// connection is returned so that it stays open.
fn raw_stamped_write(
    au: &TestAuthority,
    addr: &str,
    vol: &str,
    block: u64,
    write_id: u64,
) -> Result<RawConn> {
    use replicator::frame::MsgKind;
    let i = au.info(vol);
    let mut raw = RawConn::connect(addr)?;
    let mut h = header(MsgKind::Write, 1, vol, i.generation, i.epoch);
    h.offset = block * BS;
    h.length = BS as u32;
    let stamp = replicator::stamp::Stamp {
        volume: vol.into(),
        block,
        write_id,
    };
    raw.send(&h, &replicator::stamp::stamp_block(&stamp, BS as usize))?;
    Ok(raw)
}

#[test]
fn secondary_kill9_degrades_then_catches_up_from_bitmap_under_live_writes() -> Result<()> {
    let root = tempfile::tempdir()?;
    eprintln!("test dir {}", root.path().display());
    let au = TestAuthority::start();
    two_server_volume(&au, "vol-a");
    let s1 = ServerProc::start("s1", root.path(), &au.addr, &["vol-a"], &[])?;
    let mut s2 = ServerProc::start("s2", root.path(), &au.addr, &["vol-a"], &[])?;
    wait_in_sync(&au, &s1, "vol-a", &["s2"])?;

    let p = pipeline(&au, "vol-a");
    let w = p.worker(32)?;
    assert_eq!(write_blocks(&w, "vol-a", 0..300, 1)?.len(), 300);
    // In sync: the secondary has every acknowledged write.
    for b in 0..300 {
        assert_eq!(
            file_stamp(&s2.data_file("vol-a"), "vol-a", b),
            Some(1),
            "s2 block {b}\n{}\n{}\n{:?}",
            s1.log_text(),
            s2.log_text(),
            au.info("vol-a")
        );
    }

    s2.kill9();
    // The primary goes on alone once the secondary times out, and says so.
    assert_eq!(write_blocks(&w, "vol-a", 200..600, 2)?.len(), 400);
    let h = s1.volume_health("vol-a")?;
    assert_eq!(h["degraded"], true, "{h}");
    assert!(!au.in_sync("vol-a", "s2"));
    assert!(h["peers"][0]["dirty_regions"].as_u64().unwrap() >= 1, "{h}");

    // Back: catch-up from the bitmap while the client keeps writing.
    s2.restart()?;
    let writer = std::thread::spawn({
        let w = p.worker(16)?;
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
        au.in_sync("vol-a", "s2")
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

#[test]
fn primary_kill9_restart_keeps_every_acknowledged_write() -> Result<()> {
    let root = tempfile::tempdir()?;
    let au = TestAuthority::start();
    two_server_volume(&au, "vol-k");
    let mut s1 = ServerProc::start("s1", root.path(), &au.addr, &["vol-k"], &[])?;
    let s2 = ServerProc::start("s2", root.path(), &au.addr, &["vol-k"], &[])?;
    wait_in_sync(&au, &s1, "vol-k", &["s2"])?;
    let p = pipeline(&au, "vol-k");
    let w = p.worker(32)?;
    assert_eq!(write_blocks(&w, "vol-k", 0..500, 1)?.len(), 500);
    // kill -9 while a second round is in flight; the pipeline retries until s1 is back.
    let writer = std::thread::spawn(move || write_blocks(&w, "vol-k", 0..2000, 2).map(|a| (a, w)));
    std::thread::sleep(Duration::from_millis(50));
    s1.kill9();
    s1.restart()?;
    let (acked, w) = writer.join().unwrap()?;
    assert_eq!(acked.len(), 2000);
    for b in 0..2000 {
        let got = replicator::stamp::parse_stamp(&read_block(&w, b)?);
        assert_eq!(
            got.map(|s| (s.block, s.write_id)),
            Some((b, 2)),
            "block {b}"
        );
    }
    flush(&w)?;
    files_equal_blocks(&s1.data_file("vol-k"), &s2.data_file("vol-k"), 0..2000)?;
    Ok(())
}

#[test]
fn rebuild_of_a_new_secondary_is_full_rate_limited_with_progress_under_live_writes() -> Result<()> {
    let root = tempfile::tempdir()?;
    let au = TestAuthority::start();
    // s2 is listed but has never run: s1 finds it unreachable when it takes the lease and
    // marks it out of sync at the authority; s2 then starts with no replica at all.
    au.create_volume("vol-r", 32 * MIB, &["s1", "s2"]);
    // 32 regions of 1 MiB at 16 MiB/s: about 2 s, long enough to watch progress.
    let s1 = ServerProc::start(
        "s1",
        root.path(),
        &au.addr,
        &["vol-r"],
        &["--rebuild-rate", "16777216"],
    )?;
    wait_until("s1 primary", T, || is_primary(&s1, "vol-r"))?;
    let p = pipeline(&au, "vol-r");
    let w = p.worker(32)?;
    // Written while s2 does not exist yet: the primary is degraded and acks alone.
    assert_eq!(
        write_blocks(&w, "vol-r", (0..8192).step_by(7), 1)?.len(),
        8192_usize.div_ceil(7)
    );
    assert_eq!(s1.volume_health("vol-r")?["degraded"], true);

    let s2 = ServerProc::start("s2", root.path(), &au.addr, &["vol-r"], &[])?;
    wait_until("rebuild progress visible", T, || {
        s1.volume_health("vol-r").is_ok_and(|h| {
            let p = &h["peers"][0];
            p["state"] == "catching_up"
                && p["full_rebuild"] == true
                && p["copy_total"] == 32
                && p["copy_done"].as_u64().unwrap_or(0) > 0
                && p["copy_done"].as_u64().unwrap_or(32) < 32
        })
    })?;
    // Live writes during the rebuild, to regions already copied and to regions not yet.
    assert_eq!(
        write_blocks(&w, "vol-r", (0..8192).step_by(5), 2)?.len(),
        8192_usize.div_ceil(5)
    );
    wait_until("s2 in sync", T, || au.in_sync("vol-r", "s2"))?;
    flush(&w)?;
    files_equal_blocks(
        &s1.data_file("vol-r"),
        &s2.data_file("vol-r"),
        0..(32 * MIB / BS),
    )?;
    for b in (0..8192u64).step_by(5) {
        assert_eq!(
            file_stamp(&s2.data_file("vol-r"), "vol-r", b),
            Some(2),
            "block {b}"
        );
    }
    Ok(())
}

#[test]
fn garbage_oversized_and_corrupt_frames_close_only_their_connection() -> Result<()> {
    use replicator::frame::{self, ErrorCode, MsgKind};
    let root = tempfile::tempdir()?;
    let au = TestAuthority::start();
    au.create_volume("vol-g", 16 * MIB, &["s1"]);
    let s1 = ServerProc::start("s1", root.path(), &au.addr, &["vol-g"], &[])?;
    wait_until("s1 primary", T, || is_primary(&s1, "vol-g"))?;
    let p = pipeline(&au, "vol-g");
    let w = p.worker(8)?;
    write_blocks(&w, "vol-g", 0..10, 1)?;

    // A client connection that stays open through all of it and keeps working.
    let mut good = RawConn::connect(&s1.data_addr)?;
    let (g, e) = {
        let i = au.info("vol-g");
        (i.generation, i.epoch)
    };

    let mut garbage = RawConn::connect(&s1.data_addr)?;
    garbage.send_raw(&[0x42u8; 200])?;
    assert!(
        garbage.closed_by_server(),
        "garbage must close the connection"
    );

    let mut oversized = RawConn::connect(&s1.data_addr)?;
    let mut bytes = frame::encode(&header(MsgKind::Write, 1, "vol-g", g, e), &[]);
    bytes[84..88].copy_from_slice(&(64u32 << 20).to_le_bytes());
    oversized.send_raw(&bytes)?;
    assert!(
        oversized.closed_by_server(),
        "oversized frame must close the connection"
    );

    let mut corrupt = RawConn::connect(&s1.data_addr)?;
    let mut bytes = frame::encode(&header(MsgKind::Write, 1, "vol-g", g, e), &[7u8; 4096]);
    bytes[500] ^= 0xff;
    corrupt.send_raw(&bytes)?;
    assert!(
        corrupt.closed_by_server(),
        "bad checksum must close the connection"
    );

    let mut truncated = RawConn::connect(&s1.data_addr)?;
    let bytes = frame::encode(&header(MsgKind::Write, 1, "vol-g", g, e), &[7u8; 4096]);
    truncated.send_raw(&bytes[..1000])?;
    truncated.s.shutdown(std::net::Shutdown::Write)?;
    assert!(truncated.closed_by_server());

    let mut answer_to_server = RawConn::connect(&s1.data_addr)?;
    answer_to_server.send(&header(MsgKind::Ok, 1, "vol-g", g, e), &[])?;
    assert!(
        answer_to_server.closed_by_server(),
        "an answer sent to a server closes"
    );

    // A replicated frame without a known op is refused, the connection stays.
    let mut h = header(MsgKind::Replicate, 20, "vol-g", g, e + 1);
    h.flags = 0x0f00;
    h.seq = 1;
    good.send(&h, &[])?;
    let f = good.recv()?.expect("connection stays open");
    assert_eq!(error_code(&f), Some(ErrorCode::Invalid));

    // Well-formed but wrong requests get an error answer, the connection stays.
    let mut h = header(MsgKind::Read, 10, "no-such-volume", g, e);
    h.length = BS as u32;
    good.send(&h, &[])?;
    let mut h = header(MsgKind::Read, 11, "vol-g", g, e);
    h.offset = 16 * MIB;
    h.length = BS as u32;
    good.send(&h, &[])?;
    let mut h = header(MsgKind::Write, 12, "vol-g", g, e.saturating_sub(1));
    h.length = BS as u32;
    good.send(&h, &[0u8; BS as usize])?;
    let mut h = header(MsgKind::Read, 13, "vol-g", g, e);
    h.length = BS as u32;
    good.send(&h, &[])?;
    let mut answers = std::collections::HashMap::new();
    for _ in 0..4 {
        let f = good.recv()?.expect("good connection stays open");
        answers.insert(f.header.request_id, f);
    }
    assert_eq!(error_code(&answers[&10]), Some(ErrorCode::UnknownVolume));
    assert_eq!(error_code(&answers[&11]), Some(ErrorCode::OutOfRange));
    assert_eq!(error_code(&answers[&12]), Some(ErrorCode::StaleEpoch));
    assert_eq!(
        answers[&12].header.epoch, e,
        "fencing error names the newer epoch"
    );
    assert_eq!(answers[&13].header.kind, MsgKind::Ok);
    assert_eq!(
        replicator::stamp::parse_stamp(&answers[&13].payload).map(|s| s.block),
        Some(0)
    );

    // A stale generation is fenced too.
    let mut h = header(MsgKind::Write, 14, "vol-g", 0, e);
    h.length = BS as u32;
    good.send(&h, &[0u8; BS as usize])?;
    let f = good.recv()?.unwrap();
    assert_eq!(error_code(&f), Some(ErrorCode::StaleEpoch));
    assert_eq!((f.header.generation, f.header.epoch), (g, e));

    // The pipeline client was never disturbed.
    write_blocks(&w, "vol-g", 10..20, 2)?;
    let bad = s1.health()?["bad_frames"].as_u64().unwrap();
    assert!(bad >= 5, "bad frames counted: {bad}");
    Ok(())
}

#[test]
fn injected_eio_fails_that_volume_only_and_loses_nothing_acknowledged() -> Result<()> {
    use replicator::pipeline::{IoKind, IoRequest};
    let root = tempfile::tempdir()?;
    let au = TestAuthority::start();
    for v in ["vol-x", "vol-y"] {
        au.create_volume(v, 16 * MIB, &["s1"]);
    }
    let s1 = ServerProc::start(
        "s1",
        root.path(),
        &au.addr,
        &["vol-x", "vol-y"],
        &["--enable-fault-injection"],
    )?;
    wait_until("s1 primary of both", T, || {
        is_primary(&s1, "vol-x") && is_primary(&s1, "vol-y")
    })?;
    let px = pipeline(&au, "vol-x");
    let py = pipeline(&au, "vol-y");
    let (wx, wy) = (px.worker(8)?, py.worker(8)?);
    write_blocks(&wx, "vol-x", 0..50, 1)?;
    http(
        &s1.admin_addr,
        "POST",
        "/fault?volume=vol-x&op=write&errno=5",
    )?;
    let r = write_blocks(&wx, "vol-x", 0..1, 2);
    let msg = format!("{:#}", r.unwrap_err());
    assert!(msg.contains("Io") && msg.contains("os error 5"), "{msg}");
    // The other volume is served as before.
    write_blocks(&wy, "vol-y", 0..50, 1)?;
    assert!(s1.volume_health("vol-x")?["disk_errors"].as_u64().unwrap() >= 1);
    // Reads fail cleanly too when asked to.
    http(
        &s1.admin_addr,
        "POST",
        "/fault?volume=vol-x&op=read&errno=5",
    )?;
    wx.submit(IoRequest {
        tag: 1,
        kind: IoKind::Read,
        offset: 0,
        len: BS as u32,
        data: vec![],
        fua: false,
    })
    .unwrap();
    assert!(wx.wait(Duration::from_secs(20)).unwrap().result.is_err());
    http(
        &s1.admin_addr,
        "POST",
        "/fault?volume=vol-x&op=read&errno=0",
    )?;
    http(
        &s1.admin_addr,
        "POST",
        "/fault?volume=vol-x&op=write&errno=0",
    )?;
    // Everything acknowledged before the fault is intact.
    for b in 0..50 {
        let s = replicator::stamp::parse_stamp(&read_block(&wx, b)?).unwrap();
        assert_eq!((s.block, s.write_id), (b, 1));
    }
    write_blocks(&wx, "vol-x", 0..10, 3)?;
    // FLUSH and FUA reach the disk: with fdatasync failing, both fail (and nothing else does).
    http(
        &s1.admin_addr,
        "POST",
        "/fault?volume=vol-x&op=sync&errno=5",
    )?;
    assert!(flush(&wx).is_err());
    wx.submit(IoRequest {
        tag: 2,
        kind: IoKind::Write,
        offset: 0,
        len: 0,
        data: vec![0; BS as usize],
        fua: true,
    })
    .unwrap();
    assert!(wx.wait(Duration::from_secs(20)).unwrap().result.is_err());
    write_blocks(&wx, "vol-x", 20..30, 4)?;
    http(
        &s1.admin_addr,
        "POST",
        "/fault?volume=vol-x&op=sync&errno=0",
    )?;
    flush(&wx)?;
    // Fault injection is refused on a server that did not enable it.
    let s2 = ServerProc::start("s2", root.path(), &au.addr, &["vol-y"], &[])?;
    assert!(http(
        &s2.admin_addr,
        "POST",
        "/fault?volume=vol-y&op=write&errno=5"
    )
    .is_err());
    Ok(())
}

#[test]
fn failover_after_primary_kill9_and_the_deposed_primary_cannot_ack() -> Result<()> {
    use replicator::frame::{ErrorCode, MsgKind};
    let root = tempfile::tempdir()?;
    let au = TestAuthority::start();
    two_server_volume(&au, "vol-f");
    let mut s1 = ServerProc::start("s1", root.path(), &au.addr, &["vol-f"], &[])?;
    let s2 = ServerProc::start("s2", root.path(), &au.addr, &["vol-f"], &[])?;
    wait_in_sync(&au, &s1, "vol-f", &["s2"])?;
    let p = pipeline(&au, "vol-f");
    let w = p.worker(32)?;
    assert_eq!(write_blocks(&w, "vol-f", 0..400, 1)?.len(), 400);
    let writer = std::thread::spawn(move || write_blocks(&w, "vol-f", 0..1500, 2).map(|a| (a, w)));
    std::thread::sleep(Duration::from_millis(30));
    s1.kill9();
    // A monitor asks the authority to fail over: it promotes the in-sync secondary, which
    // then waits out s1's lease before the authority grants it its own.
    let out = au.failover("vol-f", "test: primary killed")?;
    assert_eq!(out.primary, "s2");
    let (acked, w) = writer.join().unwrap()?;
    assert_eq!(acked.len(), 1500);
    assert!(is_primary(&s2, "vol-f"));
    for b in 0..1500 {
        let s = replicator::stamp::parse_stamp(&read_block(&w, b)?).unwrap();
        assert_eq!((s.block, s.write_id), (b, 2), "block {b}");
    }
    // The deposed primary comes back: it follows s2 and acknowledges nothing.
    s1.restart()?;
    wait_until("s1 secondary at the new epoch", T, || {
        s1.volume_health("vol-f")
            .is_ok_and(|h| h["role"] == "secondary" && h["epoch"] == out.epoch)
    })?;
    let mut raw = RawConn::connect(&s1.data_addr)?;
    for (rid, epoch) in [(1u64, out.epoch - 1), (2, out.epoch)] {
        let mut h = header(MsgKind::Write, rid, "vol-f", 1, epoch);
        h.length = BS as u32;
        raw.send(&h, &[9u8; BS as usize])?;
        let f = raw.recv()?.unwrap();
        let code = error_code(&f);
        assert!(
            matches!(
                code,
                Some(ErrorCode::NotPrimary) | Some(ErrorCode::StaleEpoch)
            ),
            "{code:?}"
        );
    }
    // A replicated write from the old epoch is fenced by the new primary's secondary...
    let mut h = header(MsgKind::Replicate, 3, "vol-f", 1, out.epoch - 1);
    h.flags = replicator::frame::ReplicaOp::Write.to_flags();
    h.seq = u64::MAX;
    h.length = BS as u32;
    let mut raw2 = RawConn::connect(&s2.data_addr)?;
    raw2.send(&h, &[9u8; BS as usize])?;
    let f = raw2.recv()?.unwrap();
    assert_eq!(error_code(&f), Some(ErrorCode::StaleEpoch));
    assert_eq!(f.header.epoch, out.epoch);
    // ...and s2 catches the returning s1 up (a full copy: s1 followed an older epoch).
    wait_until("s1 in sync again", T, || au.in_sync("vol-f", "s1"))?;
    flush(&w)?;
    files_equal_blocks(&s1.data_file("vol-f"), &s2.data_file("vol-f"), 0..1500)?;
    Ok(())
}

#[test]
fn primary_cut_off_from_the_authority_stops_acking_and_the_client_follows_the_new_primary(
) -> Result<()> {
    use replicator::frame::{ErrorCode, MsgKind};
    let root = tempfile::tempdir()?;
    let au = TestAuthority::start();
    two_server_volume(&au, "vol-p");
    let s1 = ServerProc::start("s1", root.path(), &au.addr_for("s1"), &["vol-p"], &[])?;
    let s2 = ServerProc::start("s2", root.path(), &au.addr_for("s2"), &["vol-p"], &[])?;
    wait_in_sync(&au, &s1, "vol-p", &["s2"])?;
    let p = pipeline(&au, "vol-p");
    let w = p.worker(32)?;
    assert_eq!(write_blocks(&w, "vol-p", 0..200, 1)?.len(), 200);

    // Partition s1 from the authority only: the client and s2 still reach it.
    au.cut("s1", true);
    let writer = std::thread::spawn(move || write_blocks(&w, "vol-p", 0..1000, 2).map(|a| (a, w)));
    wait_until("s1's lease to lapse", T, || {
        s1.volume_health("vol-p")
            .is_ok_and(|h| h["lease_valid"] == false)
    })?;
    let mut raw = RawConn::connect(&s1.data_addr)?;
    let mut h = header(MsgKind::Write, 1, "vol-p", 1, 1);
    h.length = BS as u32;
    raw.send(&h, &[9u8; BS as usize])?;
    assert_eq!(
        error_code(&raw.recv()?.unwrap()),
        Some(ErrorCode::LeaseExpired)
    );

    let out = au
        .failover("vol-p", "test: primary partitioned")
        .map_err(|e| anyhow::anyhow!("{e}: {:?}\n{}", au.info("vol-p"), s1.log_text()))?;
    assert_eq!(out.primary, "s2");
    let (acked, w) = writer.join().unwrap()?;
    assert_eq!(acked.len(), 1000);
    for b in 0..1000 {
        let s = replicator::stamp::parse_stamp(&read_block(&w, b)?).unwrap();
        assert_eq!((s.block, s.write_id), (b, 2), "block {b}");
    }
    // s2 catches s1 up over the data path; s1 learns it is deposed from s2's epoch.
    wait_until("s1 caught up by s2", T, || au.in_sync("vol-p", "s1"))?;
    let h1 = s1.volume_health("vol-p")?;
    assert_eq!(h1["role"], "secondary", "{h1}");
    for (rid, epoch) in [(2u64, 1u64), (3, out.epoch)] {
        let mut h = header(MsgKind::Write, rid, "vol-p", 1, epoch);
        h.length = BS as u32;
        raw.send(&h, &[9u8; BS as usize])?;
        let code = error_code(&raw.recv()?.unwrap());
        assert!(
            matches!(
                code,
                Some(ErrorCode::NotPrimary) | Some(ErrorCode::StaleEpoch)
            ),
            "{code:?}"
        );
    }
    flush(&w)?;
    files_equal_blocks(&s1.data_file("vol-p"), &s2.data_file("vol-p"), 0..1000)?;
    Ok(())
}

#[test]
fn overlapping_concurrent_writes_land_in_the_same_order_on_both_replicas() -> Result<()> {
    use replicator::pipeline::{IoKind, IoRequest};
    let root = tempfile::tempdir()?;
    let au = TestAuthority::start();
    two_server_volume(&au, "vol-o");
    let s1 = ServerProc::start("s1", root.path(), &au.addr, &["vol-o"], &[])?;
    let s2 = ServerProc::start("s2", root.path(), &au.addr, &["vol-o"], &[])?;
    wait_in_sync(&au, &s1, "vol-o", &["s2"])?;
    let p = pipeline(&au, "vol-o");
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let w = p.worker(16).expect("pipeline worker");
            std::thread::spawn(move || -> Result<()> {
                // Deterministic pseudo-random ranges over 32 blocks: heavy overlap.
                let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ t;
                let mut sent = 0;
                let mut done = 0;
                while done < 300 {
                    while sent < 300 {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let start = x % 32;
                        let n = 1 + (x >> 8) % 8;
                        let fill = (t * 1000 + sent) as u8;
                        let req = IoRequest {
                            tag: sent,
                            kind: IoKind::Write,
                            offset: start * BS,
                            len: 0,
                            data: vec![fill; (n * BS) as usize],
                            fua: false,
                        };
                        if w.submit(req).is_err() {
                            break;
                        }
                        sent += 1;
                    }
                    let c = w.wait(Duration::from_secs(30)).expect("completion");
                    c.result.map_err(|e| anyhow::anyhow!("{e}"))?;
                    done += 1;
                }
                Ok(())
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap()?;
    }
    let w = p.worker(1)?;
    flush(&w)?;
    files_equal_blocks(&s1.data_file("vol-o"), &s2.data_file("vol-o"), 0..40)?;
    Ok(())
}

#[test]
fn eio_on_the_secondary_degrades_it_and_it_catches_up_after_the_disk_heals() -> Result<()> {
    let root = tempfile::tempdir()?;
    let au = TestAuthority::start();
    two_server_volume(&au, "vol-e");
    let s1 = ServerProc::start("s1", root.path(), &au.addr, &["vol-e"], &[])?;
    let s2 = ServerProc::start(
        "s2",
        root.path(),
        &au.addr,
        &["vol-e"],
        &["--enable-fault-injection"],
    )?;
    wait_in_sync(&au, &s1, "vol-e", &["s2"])?;
    let p = pipeline(&au, "vol-e");
    let w = p.worker(16)?;
    write_blocks(&w, "vol-e", 0..100, 1)?;
    http(
        &s2.admin_addr,
        "POST",
        "/fault?volume=vol-e&op=write&errno=5",
    )?;
    // The secondary's disk fails: the primary goes on alone, nothing is refused.
    assert_eq!(write_blocks(&w, "vol-e", 50..300, 2)?.len(), 250);
    assert_eq!(s1.volume_health("vol-e")?["degraded"], true);
    assert!(!au.in_sync("vol-e", "s2"));
    assert!(s2.volume_health("vol-e")?["disk_errors"].as_u64().unwrap() >= 1);
    http(
        &s2.admin_addr,
        "POST",
        "/fault?volume=vol-e&op=write&errno=0",
    )?;
    wait_in_sync(&au, &s1, "vol-e", &["s2"])?;
    flush(&w)?;
    files_equal_blocks(&s1.data_file("vol-e"), &s2.data_file("vol-e"), 0..400)?;
    for b in 0..300 {
        let want = if b >= 50 { 2 } else { 1 };
        assert_eq!(
            file_stamp(&s2.data_file("vol-e"), "vol-e", b),
            Some(want),
            "block {b}"
        );
    }
    // A secondary whose fdatasync fails a FLUSH may have lost anything since its last one:
    // the flush still completes (on the primary alone) and every region is copied again.
    http(
        &s2.admin_addr,
        "POST",
        "/fault?volume=vol-e&op=sync&errno=5",
    )?;
    flush(&w)?;
    assert!(!au.in_sync("vol-e", "s2"));
    http(
        &s2.admin_addr,
        "POST",
        "/fault?volume=vol-e&op=sync&errno=0",
    )?;
    wait_in_sync(&au, &s1, "vol-e", &["s2"])?;
    // Every region was copied (the bitmap was marked whole).
    assert_eq!(s1.volume_health("vol-e")?["peers"][0]["copy_total"], 64);
    files_equal_blocks(
        &s1.data_file("vol-e"),
        &s2.data_file("vol-e"),
        0..(64 * MIB / BS),
    )?;
    Ok(())
}

#[test]
fn three_servers_lose_a_secondary_then_the_primary_and_end_whole() -> Result<()> {
    let root = tempfile::tempdir()?;
    let au = TestAuthority::start();
    au.create_volume("vol-3", 16 * MIB, &["s1", "s2", "s3"]);
    let mut s1 = ServerProc::start("s1", root.path(), &au.addr, &["vol-3"], &[])?;
    let s2 = ServerProc::start("s2", root.path(), &au.addr, &["vol-3"], &[])?;
    let mut s3 = ServerProc::start("s3", root.path(), &au.addr, &["vol-3"], &[])?;
    wait_in_sync(&au, &s1, "vol-3", &["s2", "s3"])?;
    let p = pipeline(&au, "vol-3");
    let w = p.worker(32)?;
    write_blocks(&w, "vol-3", 0..300, 1)?;
    s3.kill9();
    write_blocks(&w, "vol-3", 100..400, 2)?;
    // s2 is still in sync and has every acknowledged write.
    for b in 0..400 {
        let want = if b >= 100 { 2 } else { 1 };
        assert_eq!(
            file_stamp(&s2.data_file("vol-3"), "vol-3", b),
            Some(want),
            "s2 block {b}"
        );
    }
    // s1 marked s3 out of sync at the authority before it acknowledged without it.
    assert!(!au.in_sync("vol-3", "s3"), "{:?}", au.info("vol-3"));
    s1.kill9();
    let out = au.failover("vol-3", "test: primary killed")?;
    assert_eq!(out.primary, "s2", "only s2 is in sync");
    write_blocks(&w, "vol-3", 200..500, 3)?;
    s1.restart()?;
    s3.restart()?;
    wait_in_sync(&au, &s2, "vol-3", &["s1", "s3"])?;
    flush(&w)?;
    for s in [&s1, &s3] {
        files_equal_blocks(
            &s2.data_file("vol-3"),
            &s.data_file("vol-3"),
            0..(16 * MIB / BS),
        )?;
    }
    for b in 0..500 {
        let want = if b >= 200 {
            3
        } else if b >= 100 {
            2
        } else {
            1
        };
        assert_eq!(
            file_stamp(&s3.data_file("vol-3"), "vol-3", b),
            Some(want),
            "s3 block {b}"
        );
    }
    Ok(())
}

#[test]
fn cli_client_writes_and_verifies_stamped_blocks() -> Result<()> {
    let root = tempfile::tempdir()?;
    let au = TestAuthority::start();
    au.create_volume("vol-c", 16 * MIB, &["s1"]);
    let s1 = ServerProc::start("s1", root.path(), &au.addr, &["vol-c"], &[])?;
    wait_until("s1 primary", T, || is_primary(&s1, "vol-c"))?;
    let cli = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_replicator"))
            .args([
                "client",
                "--authority",
                &au.addr,
                "--site",
                SITE,
                "--volume",
                "vol-c",
            ])
            .args(args)
            .output()
            .unwrap()
    };
    let out = cli(&[
        "write",
        "--start",
        "10",
        "--count",
        "200",
        "--write-id",
        "5",
        "--flush",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = cli(&[
        "verify",
        "--start",
        "10",
        "--count",
        "200",
        "--write-id",
        "5",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A wrong expectation and an unwritten range both fail verification.
    assert!(
        !cli(&["verify", "--start", "10", "--count", "5", "--write-id", "6"])
            .status
            .success()
    );
    assert!(!cli(&["verify", "--start", "0", "--count", "5"])
        .status
        .success());
    let out = cli(&["read", "--start", "10", "--count", "1"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("block 10: volume vol-c block 10 write 5")
    );
    Ok(())
}

#[test]
fn a_secondary_takes_over_only_when_the_primary_is_really_down() -> Result<()> {
    use replicator::frame::{ErrorCode, MsgKind};
    use replicator::pipeline::{PipelineConfig, ReplicationPipeline};
    let root = tempfile::tempdir()?;
    let au = TestAuthority::start();
    two_server_volume(&au, "vol-t");
    let mut s1 = ServerProc::start("s1", root.path(), &au.addr, &["vol-t"], &[])?;
    let s2 = ServerProc::start("s2", root.path(), &au.addr, &["vol-t"], &[])?;
    wait_in_sync(&au, &s1, "vol-t", &["s2"])?;

    // A client with a broken link to a healthy primary asks s2: refused, nothing changes.
    let mut raw = RawConn::connect(&s2.data_addr)?;
    raw.send(
        &header(MsgKind::Takeover, 1, "vol-t", 0, 0),
        b"test: my link to s1 is down",
    )?;
    assert_eq!(
        error_code(&raw.recv()?.unwrap()),
        Some(ErrorCode::PrimaryHealthy)
    );
    let i = au.info("vol-t");
    assert_eq!((i.primary.as_deref(), i.epoch), (Some("s1"), 1));

    let mut cfg = PipelineConfig::new(SITE, "vol-t", au.client());
    cfg.takeover_after = Some(Duration::from_millis(300));
    let p = ReplicationPipeline::start(cfg)?;
    let w = p.worker(32)?;
    assert_eq!(write_blocks(&w, "vol-t", 0..300, 1)?.len(), 300);
    // The primary really dies: the client's takeover request to s2 now goes through, the
    // authority promotes s2, and the client continues there. The test itself
    // does not touch the authority.
    s1.kill9();
    assert_eq!(write_blocks(&w, "vol-t", 0..600, 2)?.len(), 600);
    let i = au.info("vol-t");
    assert_eq!((i.primary.as_deref(), i.epoch), (Some("s2"), 2));
    for b in 0..600 {
        let s = replicator::stamp::parse_stamp(&read_block(&w, b)?).unwrap();
        assert_eq!((s.block, s.write_id), (b, 2), "block {b}");
    }
    // A takeover asked of a replica that is not in sync is refused.
    s1.restart()?;
    wait_until("s1 secondary", T, || {
        s1.volume_health("vol-t").is_ok_and(|h| h["epoch"] == 2)
    })?;
    if !au.in_sync("vol-t", "s1") {
        let mut raw = RawConn::connect(&s1.data_addr)?;
        raw.send(&header(MsgKind::Takeover, 2, "vol-t", 0, 0), b"test")?;
        let code = error_code(&raw.recv()?.unwrap());
        assert!(
            matches!(
                code,
                Some(ErrorCode::NotInSync) | Some(ErrorCode::PrimaryHealthy)
            ),
            "{code:?}"
        );
    }
    Ok(())
}

#[test]
fn writes_in_flight_when_primary_and_client_die_are_resynced_from_the_activity_log() -> Result<()> {
    let root = tempfile::tempdir()?;
    let au = TestAuthority::start();
    two_server_volume(&au, "vol-l");
    let mut s1 = ServerProc::start("s1", root.path(), &au.addr, &["vol-l"], &[])?;
    let s2 = ServerProc::start("s2", root.path(), &au.addr, &["vol-l"], &[])?;
    wait_in_sync(&au, &s1, "vol-l", &["s2"])?;
    // A client process with many writes in flight; it and the primary die together, so the
    // unanswered writes are never retried: some reached s2 and not s1's disk, or the reverse.
    let mut client = std::process::Command::new(env!("CARGO_BIN_EXE_replicator"))
        .args([
            "client",
            "--authority",
            &au.addr,
            "--site",
            SITE,
            "--volume",
            "vol-l",
        ])
        .args([
            "write",
            "--start",
            "0",
            "--count",
            "16000",
            "--write-id",
            "1",
            "--depth",
            "128",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    wait_until("writes under way", T, || {
        s2.volume_health("vol-l").is_ok_and(|_| true)
            && file_stamp(&s2.data_file("vol-l"), "vol-l", 2000).is_some()
    })?;
    s1.kill9();
    let _ = client.kill();
    let _ = client.wait();
    s1.restart()?;
    wait_until("s1 primary again", T, || is_primary(&s1, "vol-l"))?;
    wait_in_sync(&au, &s1, "vol-l", &["s2"])?;
    assert!(
        s1.log_text().contains("activity log: resyncing"),
        "the restarted primary resynced its active regions"
    );
    files_equal_blocks(
        &s1.data_file("vol-l"),
        &s2.data_file("vol-l"),
        0..(64 * MIB / BS),
    )?;
    Ok(())
}

#[test]
fn a_write_on_the_secondary_but_not_the_dead_primary_is_undone_by_the_activity_log() -> Result<()> {
    let root = tempfile::tempdir()?;
    let au = TestAuthority::start();
    two_server_volume(&au, "vol-d");
    let mut s1 = ServerProc::start(
        "s1",
        root.path(),
        &au.addr,
        &["vol-d"],
        &["--enable-fault-injection"],
    )?;
    let s2 = ServerProc::start("s2", root.path(), &au.addr, &["vol-d"], &[])?;
    wait_in_sync(&au, &s1, "vol-d", &["s2"])?;
    let p = pipeline(&au, "vol-d");
    let w = p.worker(8)?;
    write_blocks(&w, "vol-d", 0..10, 1)?;
    // s1's disk hangs: a write reaches s2 but never s1's disk, and is never answered.
    http(
        &s1.admin_addr,
        "POST",
        "/fault?volume=vol-d&op=write&errno=-1",
    )?;
    let _raw = raw_stamped_write(&au, &s1.data_addr, "vol-d", 5, 2)?;
    wait_until("s2 applied the write", T, || {
        file_stamp(&s2.data_file("vol-d"), "vol-d", 5) == Some(2)
    })?;
    assert_eq!(file_stamp(&s1.data_file("vol-d"), "vol-d", 5), Some(1));
    s1.kill9();
    s1.restart()?;
    wait_until("s1 primary again", T, || is_primary(&s1, "vol-d"))?;
    wait_in_sync(&au, &s1, "vol-d", &["s2"])?;
    // The unacknowledged write is gone from s2 too: the replicas are whole again.
    assert_eq!(file_stamp(&s2.data_file("vol-d"), "vol-d", 5), Some(1));
    files_equal_blocks(
        &s1.data_file("vol-d"),
        &s2.data_file("vol-d"),
        0..(64 * MIB / BS),
    )?;
    Ok(())
}

#[test]
fn sigterm_stops_acknowledging_and_releases_the_lease() -> Result<()> {
    let root = tempfile::tempdir()?;
    let au = TestAuthority::start_with_lease(5000);
    au.create_volume("vol-s", 16 * MIB, &["s1"]);
    let mut s1 = ServerProc::start("s1", root.path(), &au.addr, &["vol-s"], &[])?;
    wait_until("s1 primary", T, || is_primary(&s1, "vol-s"))?;
    assert_eq!(au.lease_holder("vol-s").as_deref(), Some("s1"));
    assert!(s1.terminate(), "clean exit on SIGTERM");
    // The 5 s lease is given back at once rather than left to run out.
    assert_eq!(au.lease_holder("vol-s"), None);
    assert!(s1.log_text().contains("lease released"));
    Ok(())
}

#[test]
fn a_primary_whose_disk_hangs_is_replaced_after_a_client_asks_a_secondary() -> Result<()> {
    use replicator::pipeline::{PipelineConfig, ReplicationPipeline};
    let root = tempfile::tempdir()?;
    let au = TestAuthority::start();
    two_server_volume(&au, "vol-h");
    let s1 = ServerProc::start(
        "s1",
        root.path(),
        &au.addr,
        &["vol-h"],
        &["--enable-fault-injection"],
    )?;
    let s2 = ServerProc::start("s2", root.path(), &au.addr, &["vol-h"], &[])?;
    wait_in_sync(&au, &s1, "vol-h", &["s2"])?;
    let mut cfg = PipelineConfig::new(SITE, "vol-h", au.client());
    cfg.takeover_after = Some(Duration::from_millis(300));
    let p = ReplicationPipeline::start(cfg)?;
    let w = p.worker(16)?;
    write_blocks(&w, "vol-h", 0..100, 1)?;
    // s1 keeps its lease and answers health, but its disk hangs: writes stop completing.
    http(
        &s1.admin_addr,
        "POST",
        "/fault?volume=vol-h&op=write&errno=-1",
    )?;
    assert_eq!(write_blocks(&w, "vol-h", 0..200, 2)?.len(), 200);
    let i = au.info("vol-h");
    assert_eq!((i.primary.as_deref(), i.epoch), (Some("s2"), 2));
    assert!(is_primary(&s2, "vol-h"));
    assert_eq!(
        s1.volume_health("vol-h")?["role"],
        "secondary",
        "s1 stepped down"
    );
    for b in 0..200 {
        let s = replicator::stamp::parse_stamp(&read_block(&w, b)?).unwrap();
        assert_eq!((s.block, s.write_id), (b, 2), "block {b}");
    }
    Ok(())
}

#[test]
fn a_rebuild_interrupted_by_a_secondary_kill9_resumes_where_it_was() -> Result<()> {
    let root = tempfile::tempdir()?;
    let au = TestAuthority::start();
    // s2 has never run (see the rebuild test above).
    au.create_volume("vol-u", 32 * MIB, &["s1", "s2"]);
    let s1 = ServerProc::start(
        "s1",
        root.path(),
        &au.addr,
        &["vol-u"],
        &["--rebuild-rate", "16777216"],
    )?;
    wait_until("s1 primary", T, || is_primary(&s1, "vol-u"))?;
    let p = pipeline(&au, "vol-u");
    let w = p.worker(32)?;
    write_blocks(&w, "vol-u", (0..8192).step_by(3), 1)?;
    let mut s2 = ServerProc::start("s2", root.path(), &au.addr, &["vol-u"], &[])?;
    let mut done_before = 0;
    wait_until("half the rebuild", T, || {
        s1.volume_health("vol-u").is_ok_and(|h| {
            done_before = h["peers"][0]["copy_done"].as_u64().unwrap_or(0);
            h["peers"][0]["full_rebuild"] == true && done_before >= 12
        })
    })?;
    s2.kill9();
    s2.restart()?;
    // The next attempt starts from the primary's bitmap: fewer regions than a full copy.
    wait_until("resumed catch-up", T, || {
        s1.volume_health("vol-u").is_ok_and(|h| {
            let p = &h["peers"][0];
            p["state"] == "catching_up" && p["full_rebuild"] == false
        })
    })?;
    let total = s1.volume_health("vol-u")?["peers"][0]["copy_total"]
        .as_u64()
        .unwrap();
    assert!(
        total <= 32 - 12 + 1,
        "resumed with {total} regions left after {done_before} copied"
    );
    wait_until("s2 in sync", T, || au.in_sync("vol-u", "s2"))?;
    flush(&w)?;
    files_equal_blocks(
        &s1.data_file("vol-u"),
        &s2.data_file("vol-u"),
        0..(32 * MIB / BS),
    )?;
    Ok(())
}

#[test]
fn the_primary_keeps_serving_across_an_authority_leader_change() -> Result<()> {
    let root = tempfile::tempdir()?;
    let mut au = TestAuthority::start_members(3, LEASE_MS);
    two_server_volume(&au, "vol-m");
    // Every server and the client know all three members and find the leader themselves.
    let s1 = ServerProc::start("s1", root.path(), &au.addr, &["vol-m"], &[])?;
    let s2 = ServerProc::start("s2", root.path(), &au.addr, &["vol-m"], &[])?;
    wait_in_sync(&au, &s1, "vol-m", &["s2"])?;
    let p = pipeline(&au, "vol-m");
    let w = p.worker(32)?;
    assert_eq!(write_blocks(&w, "vol-m", 0..300, 1)?.len(), 300);

    let mut old = None;
    wait_until("a leader of the site group", T, || {
        old = au.site_leader();
        old.is_some()
    })?;
    au.stop_member(old.unwrap());
    let stopped = std::time::Instant::now();
    wait_until("a new leader of the site group", T, || {
        au.site_leader().is_some()
    })?;
    // Every lease s1 got from the old leader ends within a lease of the stop: leased after
    // that means a renewal reached the new leader (the lease may lapse during the election;
    // writes then wait and the pipeline retries them, none is lost).
    wait_until("s1 leased by the new leader", T, || {
        stopped.elapsed() > Duration::from_millis(LEASE_MS + 100) && is_primary(&s1, "vol-m")
    })?;
    assert_eq!(write_blocks(&w, "vol-m", 200..600, 2)?.len(), 400);
    let i = au.info("vol-m");
    assert_eq!(
        (i.primary.as_deref(), i.epoch),
        (Some("s1"), 1),
        "no failover happened"
    );
    for b in 0..600 {
        let want = if b >= 200 { 2 } else { 1 };
        let s = replicator::stamp::parse_stamp(&read_block(&w, b)?).unwrap();
        assert_eq!((s.block, s.write_id), (b, want), "block {b}");
    }
    flush(&w)?;
    files_equal_blocks(&s1.data_file("vol-m"), &s2.data_file("vol-m"), 0..600)?;
    Ok(())
}

/// Three replicas: a write that reached one secondary and not the other before the primary
/// died (never acknowledged) must not leave the survivors different. The new primary
/// collects the secondaries' unsettled regions and copies them from its own replica before
/// it serves; the other survivor stays in sync throughout.
#[test]
fn a_dead_primarys_write_that_reached_one_secondary_only_is_resynced_to_the_other() -> Result<()> {
    let root = tempfile::tempdir()?;
    let au = TestAuthority::start();
    au.create_volume("vol-u", 16 * MIB, &["s1", "s2", "s3"]);
    let mut s1 = ServerProc::start("s1", root.path(), &au.addr_for("s1"), &["vol-u"], &[])?;
    let s2 = ServerProc::start("s2", root.path(), &au.addr, &["vol-u"], &[])?;
    let s3 = ServerProc::start(
        "s3",
        root.path(),
        &au.addr,
        &["vol-u"],
        &["--enable-fault-injection"],
    )?;
    wait_in_sync(&au, &s1, "vol-u", &["s2", "s3"])?;
    // A new volume's replicas are all zeroes: in sync from the start, nothing is copied.
    for peer in s1.volume_health("vol-u")?["peers"].as_array().unwrap() {
        assert_eq!(
            (&peer["full_rebuild"], &peer["copy_total"]),
            (&serde_json::json!(false), &serde_json::json!(0)),
            "{peer}"
        );
    }
    // A catch-up step the secondary does not know is refused, and it goes on serving.
    {
        use replicator::frame::{ErrorBody, ErrorCode, MsgKind};
        let i = au.info("vol-u");
        let mut raw = RawConn::connect(&s2.data_addr)?;
        let mut h = header(MsgKind::CatchUp, 1, "vol-u", i.generation, i.epoch);
        h.flags = 9;
        raw.send(&h, &[])?;
        let f = raw.recv()?.context("an answer")?;
        let body = ErrorBody::decode(&f.payload).context("an error body")?;
        assert_eq!(body.code, ErrorCode::Invalid, "{body:?}");
        assert!(body.message.contains("unknown catch-up step 9"), "{body:?}");
    }
    let p = pipeline(&au, "vol-u");
    let w = p.worker(8)?;
    write_blocks(&w, "vol-u", 0..64, 1)?;
    // s3's disk fails the next write and s1 cannot tell the authority (cut off from it), so
    // s3 stays in sync there while lacking a write that s2 applied.
    http(
        &s3.admin_addr,
        "POST",
        "/fault?volume=vol-u&op=write&errno=5",
    )?;
    au.cut("s1", true);
    let _raw = raw_stamped_write(&au, &s1.data_addr, "vol-u", 5, 2)?;
    wait_until("s2 applied the write", T, || {
        file_stamp(&s2.data_file("vol-u"), "vol-u", 5) == Some(2)
    })?;
    s1.kill9();
    assert_eq!(file_stamp(&s3.data_file("vol-u"), "vol-u", 5), Some(1));
    assert!(au.in_sync("vol-u", "s2") && au.in_sync("vol-u", "s3"));
    http(
        &s3.admin_addr,
        "POST",
        "/fault?volume=vol-u&op=write&errno=0",
    )?;

    // Either survivor may be designated; whichever it is, its copy of block 5 wins.
    let out = au.failover("vol-u", "test: primary killed")?;
    let (np, other) = match out.primary.as_str() {
        "s2" => (&s2, "s3"),
        "s3" => (&s3, "s2"),
        x => anyhow::bail!("unexpected primary {x}"),
    };
    wait_until("the new primary serves", T, || is_primary(np, "vol-u"))?;
    assert_eq!(
        in_sync_peers(np, "vol-u"),
        [other],
        "resynced, not degraded: {}",
        np.log_text()
    );
    assert!(
        np.log_text()
            .contains("resyncing regions where the surviving replicas may differ"),
        "{}",
        np.log_text()
    );
    let h = np.volume_health("vol-u")?;
    assert!(h["resynced_regions"].as_u64() >= Some(1), "{h}");
    let metrics = http(&np.admin_addr, "GET", "/metrics")?;
    assert!(
        metrics.contains("replicator_volume_resynced_regions_total{"),
        "{metrics}"
    );
    write_blocks(&w, "vol-u", 100..110, 3)?;
    flush(&w)?;
    files_equal_blocks(
        &s2.data_file("vol-u"),
        &s3.data_file("vol-u"),
        0..(16 * MIB / BS),
    )?;
    let want = file_stamp(&np.data_file("vol-u"), "vol-u", 5);
    let got = replicator::stamp::parse_stamp(&read_block(&w, 5)?).map(|s| s.write_id);
    assert_eq!(got, want);
    Ok(())
}

/// A secondary whose replica is gone (its data directory wiped; a reboot that lost its page
/// cache is alike) while the authority still lists it in sync is not trusted by the primary
/// that connects it: it is refused as in sync and rebuilt by a full copy.
#[test]
fn a_wiped_secondary_the_authority_calls_in_sync_is_rebuilt_not_trusted() -> Result<()> {
    let root = tempfile::tempdir()?;
    let au = TestAuthority::start();
    two_server_volume(&au, "vol-w");
    let mut s1 = ServerProc::start("s1", root.path(), &au.addr, &["vol-w"], &[])?;
    let mut s2 = ServerProc::start("s2", root.path(), &au.addr, &["vol-w"], &[])?;
    wait_in_sync(&au, &s1, "vol-w", &["s2"])?;
    let p = pipeline(&au, "vol-w");
    let w = p.worker(16)?;
    write_blocks(&w, "vol-w", 0..200, 1)?;
    flush(&w)?;
    // s2 becomes primary with no client write of its own, so its activity log (which would
    // send s1 through a catch-up anyway) is empty when it connects the wiped s1 below.
    s1.kill9();
    au.failover("vol-w", "test: primary killed")?;
    s1.restart()?;
    wait_in_sync(&au, &s2, "vol-w", &["s1"])?;
    s2.kill9();
    s1.kill9();
    std::fs::remove_dir_all(&s1.dir)?;
    std::fs::create_dir_all(&s1.dir)?;
    assert!(au.in_sync("vol-w", "s1"));
    s1.restart()?;
    s2.restart()?;
    wait_until("s2 primary again", T, || is_primary(&s2, "vol-w"))?;
    wait_in_sync(&au, &s2, "vol-w", &["s1"])?;
    let peer = &s2.volume_health("vol-w")?["peers"][0];
    assert_eq!(peer["full_rebuild"], true, "{peer}");
    for b in 0..200 {
        assert_eq!(
            file_stamp(&s1.data_file("vol-w"), "vol-w", b),
            Some(1),
            "s1 block {b}"
        );
    }
    Ok(())
}

/// The same divergence, but both survivors' processes restart before the failover (a double
/// fault): a write reached s2, s3 was frozen and never read it off its socket, and then both
/// restarted, forgetting what they had received unsettled. The new primary did not lead the
/// stream they followed, so it cannot know where they differ and gives the other a full copy.
#[test]
fn survivors_that_restarted_and_forgot_their_unsettled_writes_are_made_equal_by_a_full_copy(
) -> Result<()> {
    let root = tempfile::tempdir()?;
    let au = TestAuthority::start();
    au.create_volume("vol-f", 16 * MIB, &["s1", "s2", "s3"]);
    let mut s1 = ServerProc::start("s1", root.path(), &au.addr_for("s1"), &["vol-f"], &[])?;
    let mut s2 = ServerProc::start("s2", root.path(), &au.addr, &["vol-f"], &[])?;
    let mut s3 = ServerProc::start("s3", root.path(), &au.addr, &["vol-f"], &[])?;
    wait_in_sync(&au, &s1, "vol-f", &["s2", "s3"])?;
    let p = pipeline(&au, "vol-f");
    let w = p.worker(8)?;
    write_blocks(&w, "vol-f", 0..64, 1)?;
    // s3 frozen (the write waits unread in its socket), s1 unable to mark it out of sync.
    s3.signal(libc::SIGSTOP);
    au.cut("s1", true);
    let _raw = raw_stamped_write(&au, &s1.data_addr, "vol-f", 5, 2)?;
    wait_until("s2 applied the write", T, || {
        file_stamp(&s2.data_file("vol-f"), "vol-f", 5) == Some(2)
    })?;
    s1.kill9();
    s3.restart()?;
    s2.restart()?;
    assert_eq!(file_stamp(&s3.data_file("vol-f"), "vol-f", 5), Some(1));
    assert!(au.in_sync("vol-f", "s2") && au.in_sync("vol-f", "s3"));

    let out = au.failover("vol-f", "test: primary killed")?;
    let (np, other) = match out.primary.as_str() {
        "s2" => (&s2, "s3"),
        "s3" => (&s3, "s2"),
        x => anyhow::bail!("unexpected primary {x}"),
    };
    wait_until("the new primary serves", T, || is_primary(np, "vol-f"))?;
    wait_in_sync(&au, np, "vol-f", &[other])?;
    let peer = &np.volume_health("vol-f")?["peers"]
        .as_array()
        .and_then(|a| a.iter().find(|x| x["server_id"] == other).cloned())
        .unwrap_or_default();
    assert_eq!(peer["full_rebuild"], true, "{peer}");
    flush(&w)?;
    files_equal_blocks(
        &s2.data_file("vol-f"),
        &s3.data_file("vol-f"),
        0..(16 * MIB / BS),
    )?;
    Ok(())
}

/// Three servers under repeated kill -9s while a client writes at QD16: the primary in odd
/// rounds (the test then asks for the failover, as a monitor would), a secondary in even
/// ones, at a different moment each round. Every write completes (the pipeline follows
/// each failover), the killed server comes back in sync (rebuilt or caught up), every block
/// reads back its newest stamp and the three replicas end identical.
#[test]
fn three_servers_survive_repeated_kill9s_with_every_write_kept_and_replicas_identical() -> Result<()>
{
    const VOL: &str = "vol-k";
    // The whole volume each round: long enough (hundreds of ms) that every kill lands
    // while writes are in flight.
    const BLOCKS: u64 = 16 * MIB / BS;
    const IDS: [&str; 3] = ["s1", "s2", "s3"];
    let root = tempfile::tempdir()?;
    let au = TestAuthority::start();
    au.create_volume(VOL, 16 * MIB, &IDS);
    let mut servers = IDS
        .iter()
        .map(|id| ServerProc::start(id, root.path(), &au.addr, &[VOL], &[]))
        .collect::<Result<Vec<_>>>()?;
    wait_in_sync(&au, &servers[0], VOL, &["s2", "s3"])?;
    let p = pipeline(&au, VOL);
    let mut w = p.worker(16)?;
    let index = |id: &str| IDS.iter().position(|x| *x == id).expect("a server id");
    for round in 1..=4u64 {
        let primary = au.info(VOL).primary.context("a primary")?;
        let victim = if round % 2 == 1 {
            index(&primary)
        } else {
            (index(&primary) + 1 + (round as usize / 2) % 2) % 3
        };
        let writer = std::thread::spawn(move || {
            write_blocks(&w, VOL, 0..BLOCKS, round).map(|acked| (acked, w))
        });
        std::thread::sleep(Duration::from_millis(10 + 25 * round));
        servers[victim].kill9();
        if IDS[victim] == primary {
            au.failover(VOL, "test: primary killed")?;
        }
        let (acked, back) = writer.join().expect("writer thread")?;
        w = back;
        assert_eq!(acked.len(), BLOCKS as usize, "round {round}");
        servers[victim].restart()?;
        let now = au.info(VOL).primary.context("a primary")?;
        let others: Vec<&str> = IDS.iter().copied().filter(|id| *id != now).collect();
        wait_in_sync(&au, &servers[index(&now)], VOL, &others)
            .with_context(|| format!("round {round}: killed {}", IDS[victim]))?;
    }
    flush(&w)?;
    for b in 0..BLOCKS {
        let s = replicator::stamp::parse_stamp(&read_block(&w, b)?).context("a stamp")?;
        assert_eq!((s.block, s.write_id), (b, 4), "block {b}");
    }
    for s in &servers[1..] {
        files_equal_blocks(
            &servers[0].data_file(VOL),
            &s.data_file(VOL),
            0..(16 * MIB / BS),
        )?;
    }
    Ok(())
}

/// When the survivors report more regions than a new primary copies before serving (here:
/// 4 KiB regions and hundreds of writes that s1 could neither settle nor acknowledge, its
/// commit point stuck on s3's failing disk while it was cut off from the authority), the
/// peers are caught up instead, and still end identical.
#[test]
fn a_large_unsettled_set_is_caught_up_instead_of_copied_before_serving() -> Result<()> {
    use replicator::frame::MsgKind;
    const VOL: &str = "vol-l";
    let root = tempfile::tempdir()?;
    let au = TestAuthority::start();
    au.create_volume(VOL, 16 * MIB, &["s1", "s2", "s3"]);
    let small = ["--region-size", "4096"];
    let mut s1 = ServerProc::start("s1", root.path(), &au.addr_for("s1"), &[VOL], &small)?;
    let s2 = ServerProc::start("s2", root.path(), &au.addr, &[VOL], &small)?;
    let s3 = ServerProc::start(
        "s3",
        root.path(),
        &au.addr,
        &[VOL],
        &["--region-size", "4096", "--enable-fault-injection"],
    )?;
    wait_in_sync(&au, &s1, VOL, &["s2", "s3"])?;
    http(
        &s3.admin_addr,
        "POST",
        &format!("/fault?volume={VOL}&op=write&errno=5"),
    )?;
    au.cut("s1", true);
    let i = au.info(VOL);
    let mut raw = RawConn::connect(&s1.data_addr)?;
    let mut frames = Vec::new();
    for b in 0..400u64 {
        let mut h = header(MsgKind::Write, b + 1, VOL, i.generation, i.epoch);
        h.offset = b * 2 * BS;
        h.length = BS as u32;
        let stamp = replicator::stamp::Stamp {
            volume: VOL.into(),
            block: b * 2,
            write_id: 1,
        };
        frames.extend(replicator::frame::encode(
            &h,
            &replicator::stamp::stamp_block(&stamp, BS as usize),
        ));
    }
    raw.send_raw(&frames)?;
    wait_until("s2 applied more than 256 writes", T, || {
        (0..400u64)
            .filter(|b| file_stamp(&s2.data_file(VOL), VOL, b * 2) == Some(1))
            .count()
            > 300
    })?;
    s1.kill9();
    http(
        &s3.admin_addr,
        "POST",
        &format!("/fault?volume={VOL}&op=write&errno=0"),
    )?;
    let out = au.failover(VOL, "test: primary killed")?;
    let (np, other) = match out.primary.as_str() {
        "s2" => (&s2, "s3"),
        "s3" => (&s3, "s2"),
        x => anyhow::bail!("unexpected primary {x}"),
    };
    wait_until("the new primary serves", T, || is_primary(np, VOL))?;
    assert!(
        np.log_text()
            .contains("too many regions to resync before serving"),
        "{}",
        np.log_text()
    );
    wait_in_sync(&au, np, VOL, &[other])?;
    files_equal_blocks(&s2.data_file(VOL), &s3.data_file(VOL), 0..(16 * MIB / BS))?;
    Ok(())
}
