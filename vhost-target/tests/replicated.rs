//! The replicated bdev end to end without a guest: a real `vhost-target serve` attaches a
//! volume kept by two real `replicator serve` processes under the real authority (in this test
//! process, as in the replicator's own tests), and a vhost-user client (the load generator's
//! session) reads and writes it over the controller's socket.

mod common;
#[path = "../../replicator/tests/common/mod.rs"]
mod site;

use std::ffi::OsStr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};
use vhost_target::bdev::replicated::label::LABEL_BYTES;
use vhost_target::loadgen::{Session, SessionOptions};

use common::Target;
use site::{wait_in_sync, wait_until, ServerProc, TestAuthority, SITE};

const MIB: u64 = 1 << 20;

fn key_file(dir: &Path, name: &str, seed: u8) -> PathBuf {
    let p = dir.join(name);
    let hex: String = (0..64u8)
        .map(|i| format!("{:02x}", i.wrapping_mul(7) ^ seed))
        .collect();
    std::fs::write(&p, hex).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p
}

fn session(sock: &Path) -> Session {
    Session::connect(
        sock,
        SessionOptions {
            timeout: Duration::from_secs(30),
            ..SessionOptions::default()
        },
    )
    .unwrap()
}

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    (0..len)
        .map(|i| ((i as u64).wrapping_mul(31) ^ seed.wrapping_mul(0x9e37)) as u8)
        .collect()
}

fn replicated_params(au: &TestAuthority, name: &str, vol: &str, key: &str) -> Value {
    json!({"name": name, "authority": au.addr, "site": SITE, "volume": vol, "key_name": key})
}

fn read_file_at(path: &Path, off: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path).unwrap();
    let mut b = vec![0u8; len];
    f.read_exact_at(&mut b, off).unwrap();
    b
}

/// A two-server volume in sync, with its servers.
fn site(root: &Path, au: &TestAuthority, vol: &str) -> (ServerProc, ServerProc) {
    au.create_volume(vol, 64 * MIB, &["s1", "s2"]);
    let s1 = ServerProc::start("s1", root, &au.addr, &[vol], &[]).unwrap();
    let s2 = ServerProc::start("s2", root, &au.addr, &[vol], &[]).unwrap();
    wait_in_sync(au, &s1, vol, &["s2"]).unwrap();
    (s1, s2)
}

#[test]
fn replicated_disk_keeps_only_ciphertext_on_both_servers_and_survives_a_fresh_attach() {
    let root = tempfile::tempdir().unwrap();
    let au = TestAuthority::start();
    let (s1, s2) = site(root.path(), &au, "vol-r");
    let t = Target::start();
    let k0 = key_file(root.path(), "k0", 1);
    t.call("keyring_file_add_key", json!({"name": "k0", "path": k0}));
    t.call(
        "bdev_replicated_create",
        replicated_params(&au, "Rep0", "vol-r", "k0"),
    );
    let sock = t.controller("vhost.r", "Rep0", json!({}));

    let b = &t.call("bdev_get_bdevs", json!({"name": "Rep0"}))[0];
    assert_eq!(b["product_name"], "Replicated disk");
    assert_eq!(
        b["num_blocks"].as_u64().unwrap() * b["block_size"].as_u64().unwrap(),
        64 * MIB - LABEL_BYTES
    );
    let r = &b["driver_specific"]["replicated"];
    assert_eq!(
        (r["primary"].as_str(), r["degraded"].as_bool()),
        (Some("s1"), Some(false)),
        "{b}"
    );
    assert_eq!(r["formatted_on_attach"], true);

    let mut s = session(&sock);
    let writes: Vec<(u64, Vec<u8>)> = vec![
        (0, pattern(4096, 1)),
        (8 * MIB, pattern(256 * 1024, 2)),
        // Larger than one 1 MiB pipeline part: split and completed as one request.
        (20 * MIB, pattern(3 * MIB as usize / 2, 3)),
        (64 * MIB - LABEL_BYTES - 4096, pattern(4096, 4)),
    ];
    for (off, data) in &writes {
        s.write(*off, data).unwrap();
    }
    s.flush().unwrap();
    // Unwritten space reads as zeroes, not as decrypted zeroes.
    let mut z = vec![0xffu8; 8192];
    s.read(30 * MIB, &mut z).unwrap();
    assert!(z.iter().all(|&b| b == 0));
    s.write_zeroes(8 * MIB, 8192, false).unwrap();
    let mut back = vec![0u8; 8192];
    s.read(8 * MIB, &mut back).unwrap();
    assert!(
        back.iter().all(|&b| b == 0),
        "write-zeroes reads back zeroes"
    );
    s.write(8 * MIB, &writes[1].1[..8192]).unwrap();
    for (off, data) in &writes {
        let mut back = vec![0u8; data.len()];
        s.read(*off, &mut back).unwrap();
        assert!(back == *data, "read at {off} returns what was written");
    }

    // Both replicas hold the same bytes, and none of them is the guest's plaintext.
    for (off, data) in &writes {
        let a = read_file_at(&s1.data_file("vol-r"), LABEL_BYTES + off, data.len());
        let c = read_file_at(&s2.data_file("vol-r"), LABEL_BYTES + off, data.len());
        assert!(a == c, "replicas agree at {off}");
        assert!(a != *data, "replica at {off} holds ciphertext");
        assert!(
            a.chunks(512).zip(data.chunks(512)).all(|(x, y)| x != y),
            "no sector at {off} is stored in the clear"
        );
    }

    // Wrong key and missing key: clear errors at attach time, the target keeps serving.
    let k1 = key_file(root.path(), "k1", 2);
    t.call("keyring_file_add_key", json!({"name": "k1", "path": k1}));
    let e = t.try_call(
        "bdev_replicated_create",
        replicated_params(&au, "Rep1", "vol-r", "k1"),
    );
    let msg = e["error"]["message"].as_str().unwrap_or_default();
    assert!(msg.contains("wrong key") && msg.contains("k0"), "{e}");
    let e = t.try_call(
        "bdev_replicated_create",
        replicated_params(&au, "Rep2", "vol-r", "nope"),
    );
    assert_eq!(e["error"]["code"], -(libc::ENOKEY as i64), "{e}");
    let e = t.try_call(
        "bdev_replicated_create",
        replicated_params(&au, "Rep3", "no-such-volume", "k0"),
    );
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("no-such-volume"),
        "{e}"
    );
    // Fault injection is refused unless the daemon was started for it.
    let e = t.try_call(
        "bdev_replicated_cut",
        json!({"name": "Rep0", "servers": ["s1"]}),
    );
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("--enable-fault-injection"),
        "{e}"
    );
    // A key a bdev uses cannot be removed.
    let e = t.try_call("keyring_file_remove_key", json!({"name": "k0"}));
    assert_eq!(e["error"]["code"], -(libc::EBUSY as i64), "{e}");
    let keys = t.call("keyring_get_keys", json!({}));
    assert!(!keys
        .to_string()
        .contains(&std::fs::read_to_string(&k0).unwrap()[..16]));
    let mut back = vec![0u8; 4096];
    s.read(0, &mut back).unwrap();
    assert_eq!(back, writes[0].1);
    drop(s);

    // save_config, then a second target started from it: a fresh attach of the same volume
    // reads back every block.
    let saved = t.call("save_config", json!({}));
    let text = saved.to_string();
    assert!(text.contains("bdev_replicated_create") && text.contains("keyring_file_add_key"));
    let cfg = root.path().join("saved.json");
    std::fs::write(&cfg, serde_json::to_vec_pretty(&saved).unwrap()).unwrap();
    t.call("vhost_delete_controller", json!({"ctrlr": "vhost.r"}));
    drop(t);
    let t2 = Target::start_with(&[OsStr::new("-c"), cfg.as_os_str()]);
    let b = &t2.call("bdev_get_bdevs", json!({"name": "Rep0"}))[0];
    assert_eq!(
        b["driver_specific"]["replicated"]["formatted_on_attach"],
        false
    );
    let mut s = session(&t2.dir.path().join("vhost.r"));
    for (off, data) in &writes {
        let mut back = vec![0u8; data.len()];
        s.read(*off, &mut back).unwrap();
        assert!(back == *data, "fresh attach reads back the block at {off}");
    }
    let _ = (s1, s2);
}

#[test]
fn a_volume_holding_foreign_data_is_refused_not_overwritten() {
    let root = tempfile::tempdir().unwrap();
    let au = TestAuthority::start();
    let (s1, _s2) = site(root.path(), &au, "vol-f");
    // Something other than Tandem wrote the first block (through the replication client).
    let p = site::pipeline(&au, "vol-f");
    let w = p.worker(1).unwrap();
    site::write_blocks(&w, "vol-f", 0..1, 7).unwrap();
    site::flush(&w).unwrap();
    let before = read_file_at(&s1.data_file("vol-f"), 0, 4096);

    let t = Target::start();
    let k = key_file(t.dir.path(), "k", 3);
    t.call("keyring_file_add_key", json!({"name": "k", "path": k}));
    let e = t.try_call(
        "bdev_replicated_create",
        replicated_params(&au, "Rep0", "vol-f", "k"),
    );
    let msg = e["error"]["message"].as_str().unwrap_or_default();
    assert!(msg.contains("not a Tandem replicated volume"), "{e}");
    wait_until("nothing changed", Duration::from_secs(1), || {
        read_file_at(&s1.data_file("vol-f"), 0, 4096) == before
    })
    .unwrap();
    assert!(t
        .call("bdev_get_bdevs", json!({}))
        .as_array()
        .unwrap()
        .is_empty());
}

/// The history checker of the replicated disk: stamped 4 KiB writes and reads through
/// `vhost-target` (a vhost-user client, no guest) while the primary replicator is killed with
/// SIGKILL and restarted, again and again. Every acknowledged write must read back (its newest
/// stamp) and no read may return an older stamp than the newest acknowledged one; no request
/// may fail. The failovers come from the target itself: its pipeline asks the in-sync
/// secondary to take over when it cannot reach the primary, and the secondary checks the
/// primary's health before it asks the authority.
#[test]
fn stamped_writes_survive_repeated_primary_kills_without_an_io_error_or_a_stale_read() {
    use replicator::stamp::{parse_stamp, stamp_block, Stamp};
    use std::collections::HashMap;
    use std::time::Instant;

    const VOL: &str = "vol-h";
    const BLOCKS: u64 = 256;
    const KILLS: usize = 3;
    let root = tempfile::tempdir().unwrap();
    // The authority's default lease (2 s), so the longest stall reported is the one users get.
    let au = TestAuthority::start_with_lease(2000);
    let (a, b) = site(root.path(), &au, VOL);
    let mut servers = [a, b];
    let t = Target::start_with(&[OsStr::new("--metrics-addr"), OsStr::new("127.0.0.1:0")]);
    let k = key_file(root.path(), "k", 5);
    t.call("keyring_file_add_key", json!({"name": "k", "path": k}));
    t.call(
        "bdev_replicated_create",
        replicated_params(&au, "Rep0", VOL, "k"),
    );
    let mut s = session(&t.controller("vhost.h", "Rep0", json!({})));

    let mut acked: HashMap<u64, u64> = HashMap::new();
    let mut next_id = 1u64;
    let (mut writes, mut reads, mut checked_reads) = (0u64, 0u64, 0u64);
    let mut worst = Duration::ZERO;
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut step = |s: &mut Session, acked: &mut HashMap<u64, u64>| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        // Independent bits for the block and the operation.
        let block = (rng >> 8) % BLOCKS;
        let t0 = Instant::now();
        if (rng >> 40) % 4 == 0 {
            let mut buf = vec![0u8; 4096];
            s.read(block * 4096, &mut buf)
                .unwrap_or_else(|e| panic!("read of block {block} failed: {e}"));
            let got = parse_stamp(&buf).map(|st| st.write_id);
            assert_eq!(
                got,
                acked.get(&block).copied(),
                "block {block}: read a stale or foreign value"
            );
            reads += 1;
            checked_reads += u64::from(got.is_some());
        } else {
            let id = next_id;
            next_id += 1;
            let data = stamp_block(
                &Stamp {
                    volume: VOL.into(),
                    block,
                    write_id: id,
                },
                4096,
            );
            s.write(block * 4096, &data)
                .unwrap_or_else(|e| panic!("write {id} of block {block} failed: {e}"));
            acked.insert(block, id);
            writes += 1;
        }
        worst = worst.max(t0.elapsed());
    };

    let mut primary = 0usize;
    for kill in 0..KILLS {
        for _ in 0..300 {
            step(&mut s, &mut acked);
        }
        let name = servers[primary].id.clone();
        assert_eq!(au.info(VOL).primary.as_deref(), Some(name.as_str()));
        servers[primary].kill9();
        // Writes go on through the failover: the first ones wait for the new primary.
        for _ in 0..300 {
            step(&mut s, &mut acked);
        }
        let survivor = 1 - primary;
        assert_eq!(
            au.info(VOL).primary.as_deref(),
            Some(servers[survivor].id.as_str()),
            "failover {kill} went to the survivor"
        );
        servers[primary].restart().unwrap();
        let back = servers[primary].id.clone();
        wait_in_sync(&au, &servers[survivor], VOL, &[back.as_str()]).unwrap();
        primary = survivor;
    }
    for _ in 0..300 {
        step(&mut s, &mut acked);
    }
    assert!(
        checked_reads > reads / 2,
        "most reads hit written blocks ({checked_reads} of {reads})"
    );
    // Everything acknowledged reads back, through the target and on both replicas.
    s.flush().unwrap();
    for (&block, &id) in &acked {
        let mut buf = vec![0u8; 4096];
        s.read(block * 4096, &mut buf).unwrap();
        assert_eq!(
            parse_stamp(&buf).map(|st| st.write_id),
            Some(id),
            "block {block}"
        );
    }
    let range = LABEL_BYTES as usize + (BLOCKS * 4096) as usize;
    assert!(
        read_file_at(&servers[0].data_file(VOL), 0, range)
            == read_file_at(&servers[1].data_file(VOL), 0, range),
        "the replicas are whole again"
    );
    let st = &t.call("bdev_get_bdevs", json!({"name": "Rep0"}))[0]["driver_specific"]["replicated"];
    let retried = st["retried"].as_u64().unwrap();
    assert!(
        st["primary_changes"].as_u64().unwrap() >= KILLS as u64,
        "{st}"
    );
    // The same story in Prometheus metrics.
    let addr = t
        .log()
        .lines()
        .find_map(|l| l.split("metrics listening addr=").nth(1).map(str::to_owned))
        .expect("metrics address in the log");
    let page = site::http(addr.trim(), "GET", "/metrics").unwrap();
    let metric = |name: &str| -> u64 {
        page.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}{{bdev=\"Rep0\"}} ")))
            .unwrap_or_else(|| panic!("{name} missing:\n{page}"))
            .parse()
            .unwrap()
    };
    assert_eq!(
        metric("tandem_replicated_primary_changes_total"),
        st["primary_changes"].as_u64().unwrap()
    );
    assert_eq!(
        metric("tandem_replicated_epoch"),
        st["epoch"].as_u64().unwrap()
    );
    assert_eq!(metric("tandem_bdev_write_ops_total"), writes);
    assert!(
        page.contains("tandem_bdev_latency_seconds_bucket{bdev=\"Rep0\",op=\"write\",le=\"+Inf\"}")
    );
    println!(
        "history: {KILLS} primary kills, {writes} writes and {reads} reads checked \
         ({checked_reads} of written blocks), {} blocks verified at the end, {retried} \
         requests retried, longest request {worst:?}",
        acked.len()
    );
}

/// Multi-attach: two targets attach one volume. Target A is cut off from the primary (the
/// target's fault injector, a one-sided cut: A cannot reach s1, B and the servers can). A asks
/// the secondary to take over; the secondary finds the primary healthy and refuses, so no
/// failover happens; A's request waits and A reports the primary unreachable, while B keeps
/// writing. Then the primary really dies: exactly one failover, and both targets move to the
/// new primary, A's waiting write included.
#[test]
fn multi_attach_one_sided_cut_causes_no_failover_and_a_real_death_causes_one() {
    use std::time::Instant;
    const VOL: &str = "vol-m";
    let root = tempfile::tempdir().unwrap();
    let au = TestAuthority::start();
    let (mut s1, _s2) = site(root.path(), &au, VOL);
    let key = key_file(root.path(), "k", 9);
    // B attaches the device (tier 1 names its authoritative volume), A the volume itself.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let c = authority::client::AuthorityClient::new(vec![au.addr.clone()]);
    rt.block_on(c.device_create("dev-m", 64 * MIB, 4096, &[(SITE, VOL)], SITE))
        .unwrap();
    let by_device =
        json!({"name": "Rep0", "authority": au.addr, "device": "dev-m", "key_name": "k"});
    let attach = |t: &Target, params: Value| -> PathBuf {
        t.call("keyring_file_add_key", json!({"name": "k", "path": key}));
        t.call("bdev_replicated_create", params);
        t.controller("vhost.m", "Rep0", json!({}))
    };
    let ta = Target::start_with(&[OsStr::new("--enable-fault-injection")]);
    let tb = Target::start();
    let sock_a = attach(&ta, replicated_params(&au, "Rep0", VOL, "k"));
    let sock_b = attach(&tb, by_device);
    let rb =
        &tb.call("bdev_get_bdevs", json!({"name": "Rep0"}))[0]["driver_specific"]["replicated"];
    assert_eq!(
        (rb["device"].as_str(), rb["volume"].as_str()),
        (Some("dev-m"), Some(VOL)),
        "{rb}"
    );
    let mut sb = session(&sock_b);
    let a_block = pattern(4096, 0xa);
    let a_thread = {
        let a_block = a_block.clone();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
        let h = std::thread::spawn(move || {
            let mut sa = session(&sock_a);
            sa.write(0, &pattern(4096, 0x1)).unwrap();
            ready_tx.send(()).unwrap();
            go_rx.recv().unwrap();
            // Waits while A is cut off; completes once there is a primary A can reach.
            let t0 = Instant::now();
            let r = sa.write(4096, &a_block);
            (r.map_err(|e| e.to_string()), t0.elapsed())
        });
        ready_rx.recv().unwrap();
        (h, go_tx)
    };
    sb.write(8192, &pattern(4096, 0xb)).unwrap();

    // The one-sided cut.
    ta.call(
        "bdev_replicated_cut",
        json!({"name": "Rep0", "servers": ["s1"]}),
    );
    a_thread.1.send(()).unwrap();
    let until = Instant::now() + Duration::from_secs(4);
    let mut b_writes = 0u64;
    while Instant::now() < until {
        sb.write(8192 + 4096 * (b_writes % 16), &pattern(4096, b_writes))
            .unwrap();
        b_writes += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
    let i = au.info(VOL);
    assert_eq!(
        (i.primary.as_deref(), i.epoch),
        (Some("s1"), 1),
        "no failover"
    );
    assert!(
        !a_thread.0.is_finished(),
        "A's write waits while A is cut off"
    );
    let ra =
        &ta.call("bdev_get_bdevs", json!({"name": "Rep0"}))[0]["driver_specific"]["replicated"];
    assert!(
        ra["unreachable_ms"].as_u64().unwrap_or(0) >= 1000,
        "A reports the primary unreachable: {ra}"
    );
    assert!(
        ta.log().contains("takeover refused"),
        "A asked the secondary, which refused"
    );

    // The primary really dies: one failover, both targets go on at s2.
    s1.kill9();
    let (a_result, a_wait) = a_thread.0.join().unwrap();
    a_result.expect("A's waiting write completes at the new primary");
    sb.write(12288, &pattern(4096, 0xc)).unwrap();
    let i = au.info(VOL);
    assert_eq!(
        (i.primary.as_deref(), i.epoch),
        (Some("s2"), 2),
        "one failover"
    );
    let mut back = vec![0u8; 4096];
    sb.read(4096, &mut back).unwrap();
    assert_eq!(back, a_block, "B reads A's write");
    for t in [&ta, &tb] {
        let r =
            &t.call("bdev_get_bdevs", json!({"name": "Rep0"}))[0]["driver_specific"]["replicated"];
        assert_eq!(
            (r["primary"].as_str(), r["epoch"].as_u64()),
            (Some("s2"), Some(2)),
            "{r}"
        );
    }
    println!("multi-attach: B wrote {b_writes} blocks during A's cut; A's write waited {a_wait:?}");
}

/// Servers that authenticate their peers (`--peer-key-file`): the bdev attaches with the
/// site's key, and without it (or with a relative path, or another key) creation fails with
/// a clear error while the target keeps serving.
#[test]
fn a_bdev_attaches_to_authenticating_servers_only_with_the_sites_peer_key() {
    let root = tempfile::tempdir().unwrap();
    let au = TestAuthority::start();
    let peer_key = root.path().join("peer.key");
    let other_key = root.path().join("other.key");
    for f in [&peer_key, &other_key] {
        let k = replicator::peer_auth::PeerKey::generate().unwrap();
        k.write_key_file(f).unwrap();
    }
    let flag = ["--peer-key-file", peer_key.to_str().unwrap()];
    au.create_volume("vol-a", 64 * MIB, &["s1", "s2"]);
    let s1 = ServerProc::start("s1", root.path(), &au.addr, &["vol-a"], &flag).unwrap();
    let _s2 = ServerProc::start("s2", root.path(), &au.addr, &["vol-a"], &flag).unwrap();
    wait_in_sync(&au, &s1, "vol-a", &["s2"]).unwrap();

    let t = Target::start();
    let k = key_file(t.dir.path(), "k", 3);
    t.call("keyring_file_add_key", json!({"name": "k", "path": k}));
    let with = |name: &str, peer: Option<&Path>| {
        let mut p = replicated_params(&au, name, "vol-a", "k");
        p["io_timeout_ms"] = json!(3000);
        if let Some(f) = peer {
            p["peer_key_file"] = json!(f);
        }
        p
    };
    let e = t.try_call("bdev_replicated_create", with("Rep0", None));
    let msg = e["error"]["message"].as_str().unwrap_or_default();
    assert!(msg.contains("Unauthenticated"), "{e}");
    let e = t.try_call(
        "bdev_replicated_create",
        with("Rep0", Some(Path::new("peer.key"))),
    );
    let msg = e["error"]["message"].as_str().unwrap_or_default();
    assert!(msg.contains("not an absolute path"), "{e}");
    let e = t.try_call(
        "bdev_replicated_create",
        with("Rep0", Some(&root.path().join("missing.key"))),
    );
    let msg = e["error"]["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains("peer_key_file") && msg.contains("missing.key"),
        "{e}"
    );
    let e = t.try_call("bdev_replicated_create", with("Rep0", Some(&other_key)));
    assert!(e["error"]["code"].as_i64().is_some(), "{e}");
    assert!(s1.health().unwrap()["auth_failures"].as_u64().unwrap() >= 2);

    t.call("bdev_replicated_create", with("Rep0", Some(&peer_key)));
    let b = &t.call("bdev_get_bdevs", json!({"name": "Rep0"}))[0];
    assert_eq!(
        b["driver_specific"]["replicated"]["authenticates"], true,
        "{b}"
    );
    let sock = t.controller("vhost.a", "Rep0", json!({}));
    let mut s = session(&sock);
    let data = pattern(64 * 1024, 5);
    s.write(MIB, &data).unwrap();
    let mut back = vec![0u8; data.len()];
    s.read(MIB, &mut back).unwrap();
    assert_eq!(back, data);
    let saved = t.call("save_config", json!({})).to_string();
    assert!(saved.contains(peer_key.to_str().unwrap()), "{saved}");
}
