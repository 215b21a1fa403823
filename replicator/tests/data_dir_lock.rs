//! Two `replicator serve` processes on one data directory: the second is refused with an
//! error naming the first, and the first keeps its directory. The servers need no authority
//! for this (the store is opened before the server registers), so the address given is one
//! nothing listens on.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn serve(dir: &std::path::Path, id: &str) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_replicator"));
    c.args(["serve", "--id", id, "--site", "s", "--volume", "v"])
        .arg("--data-dir")
        .arg(dir)
        .args([
            "--authority",
            "127.0.0.1:9",
            "--authority-timeout-ms",
            "100",
        ])
        .env("RUST_LOG", "error");
    c
}

/// Starts a server and waits until it has its store open: it prints its addresses after
/// that.
fn start_listening(dir: &std::path::Path) -> std::process::Child {
    let mut c = serve(dir, "a")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(c.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.starts_with("replicator listening"), "{line:?}");
    c
}

#[test]
fn a_second_server_on_the_same_data_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut first = start_listening(dir.path());

    let t0 = Instant::now();
    let second = serve(dir.path(), "b").output().unwrap();
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "the second server did not give up"
    );
    assert!(!second.status.success());
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(
        err.contains("is in use by another process")
            && err.contains(&format!("pid {}", first.id())),
        "{err}"
    );
    // The first still serves its directory.
    assert!(
        first.try_wait().unwrap().is_none(),
        "the first server exited"
    );
    first.kill().unwrap();
    first.wait().unwrap();

    // Once it is gone (kill -9 included), the directory can be served again.
    let mut again = start_listening(dir.path());
    again.kill().unwrap();
    again.wait().unwrap();
}
