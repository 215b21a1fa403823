//! Authentication of replication connections (`--peer-key-file`, `replicator::peer_auth`):
//! two real `replicator serve` processes sharing a key against the real authority. The
//! servers authenticate to each other (the secondary comes in sync), a client with the key
//! writes and reads, and everything without it is refused with a clear error while the
//! servers go on serving: a client without a key, one with another key, a raw write, and a
//! forged `Replicate` of a newer epoch sent to the secondary (which, unauthenticated, would
//! make it follow a primary that does not exist and fence the real one).

mod common;

use anyhow::Result;
use common::*;
use replicator::conn::PeerLink;
use replicator::frame::{ErrorCode, MsgKind, ReplicaOp};
use replicator::peer_auth::PeerKey;
use replicator::pipeline::{PipelineConfig, ReplicationPipeline};
use replicator::stamp::parse_stamp;
use std::path::Path;
use std::time::Duration;

const MIB: u64 = 1 << 20;
const T: Duration = Duration::from_secs(30);

fn keyed_pipeline(au: &TestAuthority, vol: &str, key: Option<PeerKey>) -> ReplicationPipeline {
    let mut cfg = PipelineConfig::new(SITE, vol, au.client());
    cfg.request_timeout = Duration::from_secs(3);
    cfg.peer_key = key;
    ReplicationPipeline::start(cfg).unwrap()
}

fn key_file(dir: &Path, name: &str) -> (PeerKey, String) {
    let path = dir.join(name);
    let k = PeerKey::generate().unwrap();
    k.write_key_file(&path).unwrap();
    (k, path.display().to_string())
}

#[test]
fn only_holders_of_the_site_key_are_served() -> Result<()> {
    let root = tempfile::tempdir()?;
    let (key, key_path) = key_file(root.path(), "site.key");
    let au = TestAuthority::start();
    au.create_volume("vol-k", 16 * MIB, &["s1", "s2"]);
    let extra = ["--peer-key-file", key_path.as_str()];
    let s1 = ServerProc::start("s1", root.path(), &au.addr, &["vol-k"], &extra)?;
    wait_until("s1 primary", T, || is_primary(&s1, "vol-k"))?;
    let s2 = ServerProc::start("s2", root.path(), &au.addr, &["vol-k"], &extra)?;
    // The primary's link to its secondary authenticated, or s2 would never come in sync.
    wait_in_sync(&au, &s1, "vol-k", &["s2"])?;
    assert_eq!(s1.health()?["authenticates"], true);

    let p = keyed_pipeline(&au, "vol-k", Some(key.clone()));
    let w = p.worker(8)?;
    assert_eq!(write_blocks(&w, "vol-k", 0..32, 1)?.len(), 32);
    for b in 0..32 {
        let s = parse_stamp(&read_block(&w, b)?).expect("a stamp");
        assert_eq!((s.block, s.write_id), (b, 1));
    }

    // A client without the key: its writes fail (the servers close its connections), and
    // the servers count and log why.
    let nokey = keyed_pipeline(&au, "vol-k", None);
    let wn = nokey.worker(1)?;
    let err = write_blocks(&wn, "vol-k", 100..101, 9).unwrap_err();
    eprintln!("write without the key: {err:#}");
    wait_until("s1 counts the refusal", T, || {
        s1.health()
            .map(|h| h["auth_failures"].as_u64() >= Some(1))
            .unwrap_or(false)
    })?;
    assert!(s1
        .log_text()
        .contains("closing connection: authentication failed"));

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // Another site's key: the client refuses the server (it cannot prove our key) before
    // it sends anything; and the server refuses a client that holds the wrong key.
    let other = PeerKey::generate().unwrap();
    let e = rt
        .block_on(PeerLink::connect(&s1.data_addr, T, Some(&other), None))
        .unwrap_err()
        .to_string();
    assert!(e.contains("does not hold this site's peer key"), "{e}");
    // A key on the client, none on a server: a clear refusal, not a hang.
    let plain = ServerProc::start("s3", root.path(), &au.addr, &["vol-none"], &[])?;
    let e = rt
        .block_on(PeerLink::connect(&plain.data_addr, T, Some(&key), None))
        .unwrap_err()
        .to_string();
    assert!(e.contains("does not authenticate connections"), "{e}");

    // A raw write without authenticating: answered Unauthenticated, then closed.
    let (g, ep) = {
        let i = au.info("vol-k");
        (i.generation, i.epoch)
    };
    let mut raw = RawConn::connect(&s1.data_addr)?;
    let mut h = header(MsgKind::Write, 1, "vol-k", g, ep);
    h.length = BS as u32;
    raw.send(&h, &[0xEEu8; BS as usize])?;
    let f = raw.recv()?.expect("an answer before the close");
    assert_eq!(error_code(&f), Some(ErrorCode::Unauthenticated));
    assert!(raw.closed_by_server());

    // A forged Replicate from a "newer primary" to the secondary: refused before it is
    // looked at, so the secondary does not follow it.
    let mut forged = RawConn::connect(&s2.data_addr)?;
    let mut h = header(MsgKind::Replicate, 1, "vol-k", g, ep + 5);
    h.flags = ReplicaOp::Write.to_flags();
    h.seq = 1;
    h.length = BS as u32;
    forged.send(&h, &[0xEEu8; BS as usize])?;
    let f = forged.recv()?.expect("an answer before the close");
    assert_eq!(error_code(&f), Some(ErrorCode::Unauthenticated));
    assert!(forged.closed_by_server());
    let v = s2.volume_health("vol-k")?;
    assert_eq!(
        v["epoch"].as_u64(),
        Some(ep),
        "the secondary followed a forged epoch: {v}"
    );

    // Through all of it the site serves its client, replicated.
    assert_eq!(write_blocks(&w, "vol-k", 32..64, 2)?.len(), 32);
    assert_eq!(in_sync_peers(&s1, "vol-k"), vec!["s2".to_string()]);
    for b in 0..64 {
        let s = parse_stamp(&read_block(&w, b)?).expect("a stamp");
        assert_eq!(s.write_id, if b < 32 { 1 } else { 2 }, "block {b}");
    }
    drop(w);
    drop(p);
    drop(s2);
    Ok(())
}

/// `replicator local-site --peer-key-file` with a file that is not a usable key stops at
/// once with an error naming the flag, before any server starts.
#[test]
fn local_site_refuses_a_bad_peer_key_file() {
    let dir = tempfile::tempdir().unwrap();
    let loose = dir.path().join("loose.key");
    std::fs::write(&loose, "00".repeat(32)).unwrap();
    std::fs::set_permissions(&loose, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    for (file, why) in [
        (dir.path().join("missing.key"), "cannot read"),
        (loose, "chmod 600"),
    ] {
        let out = std::process::Command::new(replicator_bin())
            .args(["local-site", "--dir"])
            .arg(dir.path().join("site"))
            .arg("--peer-key-file")
            .arg(&file)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{err}");
        assert!(
            err.contains("--peer-key-file") && err.contains(why),
            "{err}"
        );
        assert!(
            !dir.path().join("site").join("s1.log").exists(),
            "a server started"
        );
    }
}
