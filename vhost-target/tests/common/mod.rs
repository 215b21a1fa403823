//! A `vhost-target serve` child process for the integration tests that drive the real
//! binary over its sockets (the load generator, libblkio).
#![allow(dead_code)] // each test binary uses its own subset

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

pub const BIN: &str = env!("CARGO_BIN_EXE_vhost-target");
pub const WAIT: Duration = Duration::from_secs(20);
/// 16 MiB malloc disks.
pub const BLOCKS: u64 = 32768;

/// A `vhost-target serve` child in a temp dir, killed on drop.
pub struct Target {
    child: Child,
    pub dir: tempfile::TempDir,
    pub rpc: PathBuf,
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Target {
    pub fn start() -> Target {
        Self::start_with(&[])
    }

    /// Starts with extra `serve` arguments (e.g. `-c config.json`).
    pub fn start_with(extra: &[&std::ffi::OsStr]) -> Target {
        let dir = tempfile::tempdir().unwrap();
        let rpc = dir.path().join("rpc.sock");
        let log = std::fs::File::create(dir.path().join("daemon.log")).unwrap();
        let child = Command::new(BIN)
            .arg("serve")
            .arg("-r")
            .arg(&rpc)
            .arg("-S")
            .arg(dir.path())
            .args(["-m", "0x1"])
            .args(extra)
            .env(
                "RUST_LOG",
                std::env::var("TANDEM_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut t = Target { child, dir, rpc };
        let deadline = Instant::now() + WAIT;
        while UnixStream::connect(&t.rpc).is_err() {
            if let Some(st) = t.child.try_wait().unwrap() {
                panic!("vhost-target exited early ({st}):\n{}", t.log());
            }
            assert!(Instant::now() < deadline, "no RPC socket:\n{}", t.log());
            std::thread::sleep(Duration::from_millis(20));
        }
        t
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }

    /// The whole JSON-RPC answer, error or not.
    pub fn try_call(&self, method: &str, params: Value) -> Value {
        let mut s = UnixStream::connect(&self.rpc).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let req = json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params});
        s.write_all(req.to_string().as_bytes()).unwrap();
        let mut de = serde_json::Deserializer::from_reader(s).into_iter::<Value>();
        de.next().expect("an answer").expect("valid JSON")
    }

    pub fn call(&self, method: &str, params: Value) -> Value {
        let mut s = UnixStream::connect(&self.rpc).unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        let req = json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params});
        s.write_all(req.to_string().as_bytes()).unwrap();
        let mut de = serde_json::Deserializer::from_reader(s).into_iter::<Value>();
        let v = de.next().expect("an answer").expect("valid JSON");
        assert!(
            v.get("error").is_none(),
            "{method} failed: {v}\n{}",
            self.log()
        );
        v["result"].clone()
    }

    pub fn malloc(&self, name: &str) {
        self.call(
            "bdev_malloc_create",
            json!({"name": name, "num_blocks": BLOCKS, "block_size": 512}),
        );
    }

    /// Creates controller `ctrlr` on `bdev` and returns its socket path.
    pub fn controller(&self, ctrlr: &str, bdev: &str, extra: Value) -> PathBuf {
        let mut p = json!({"ctrlr": ctrlr, "dev_name": bdev});
        if let (Some(p), Some(extra)) = (p.as_object_mut(), extra.as_object()) {
            p.extend(extra.clone());
        }
        self.call("vhost_create_blk_controller", p);
        self.dir.path().join(ctrlr)
    }

    pub fn bad_requests(&self, ctrlr: &str) -> u64 {
        let v = self.call("vhost_get_controllers", json!({"name": ctrlr}));
        v[0]["backend_specific"]["block"]["bad_requests"]
            .as_u64()
            .unwrap_or_else(|| panic!("no bad_requests in {v}"))
    }
}
