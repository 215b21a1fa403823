//! `vhost-target cluster`, the one command for a whole local cluster: it comes up, serves a
//! replicated disk over its vhost-user socket, keeps serving it when the primary replicator
//! is killed, and stops everything it started on SIGINT.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vhost_target::loadgen::{Session, SessionOptions};

fn alive(pid: i32) -> bool {
    // SAFETY: kill(2) with signal 0 only checks that the process exists.
    unsafe { libc::kill(pid, 0) == 0 }
}

#[test]
fn cluster_serves_a_replicated_disk_survives_a_primary_kill_and_stops_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(common::BIN)
        .args([
            "cluster",
            "--size",
            "64M",
            "--metrics-addr",
            "",
            "-m",
            "0x1",
        ])
        .arg("--dir")
        .arg(dir.path())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.path().join("cluster.log")).unwrap())
        .spawn()
        .unwrap();
    let log = || std::fs::read_to_string(dir.path().join("cluster.log")).unwrap_or_default();
    // Read the instructions up to their last line; they name every server's pid.
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let (mut text, mut line) = (String::new(), String::new());
    while !text.contains("Ctrl-C stops everything") {
        line.clear();
        assert!(
            out.read_line(&mut line).unwrap() > 0,
            "cluster exited early:\n{text}\n{}",
            log()
        );
        text += &line;
    }
    assert!(text.contains("qemu-system-x86_64") && text.contains("vhost-user-blk-pci"));
    let pids: Vec<i32> = text
        .lines()
        .filter_map(|l| l.split(": pid ").nth(1))
        .map(|r| r.split(',').next().unwrap().trim().parse().unwrap())
        .collect();
    assert_eq!(pids.len(), 2, "{text}");
    let primary: i32 = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("kill -9 "))
        .expect("how to kill the primary")
        .parse()
        .unwrap();
    // The cluster's own servers require the site's peer key on their data ports.
    for health in text
        .lines()
        .filter_map(|l| l.split("health http://").nth(1))
        .filter_map(|r| r.split('/').next())
    {
        let mut c = std::net::TcpStream::connect(health).unwrap();
        use std::io::Write;
        write!(
            c,
            "GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut body = String::new();
        std::io::Read::read_to_string(&mut c, &mut body).unwrap();
        let json = body.split("\r\n\r\n").nth(1).unwrap_or_default();
        let v: serde_json::Value = serde_json::from_str(json).unwrap();
        assert_eq!(v["authenticates"], true, "{body}");
    }
    // Keep the pipe drained so the cluster never blocks on stdout.
    std::thread::spawn(move || for _ in out.lines() {});

    let mut s = Session::connect(
        dir.path().join("vhost.0"),
        SessionOptions {
            timeout: Duration::from_secs(30),
            ..SessionOptions::default()
        },
    )
    .unwrap();
    let block = |i: u64| -> Vec<u8> { (0..4096).map(|b| (b as u64 ^ i) as u8).collect() };
    for i in 0..64 {
        s.write(i * 4096, &block(i)).unwrap();
    }
    // SAFETY: kill(2) on the primary server's pid, a child of the cluster.
    unsafe { libc::kill(primary, libc::SIGKILL) };
    let t0 = Instant::now();
    s.write(64 * 4096, &block(64)).unwrap();
    let stall = t0.elapsed();
    for i in 65..128 {
        s.write(i * 4096, &block(i)).unwrap();
    }
    for i in 0..128 {
        let mut back = vec![0u8; 4096];
        s.read(i * 4096, &mut back).unwrap();
        assert!(back == block(i), "block {i} after the failover");
    }
    eprintln!("first write after the primary's SIGKILL took {stall:?}");
    drop(s);

    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "cluster did not stop:\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}\n{}", log());
    for p in pids {
        assert!(!alive(p), "server pid {p} outlived the cluster");
    }
    assert!(log().contains("stopped"));
    // The surviving primary stopped gracefully (its SIGTERM was not blocked): it gave its
    // lease back rather than being killed.
    let s2 = std::fs::read_to_string(dir.path().join("site/s2.log")).unwrap_or_default();
    assert!(s2.contains("lease released"), "s2's log:\n{s2}");
}
