//! Multi-process tests of the control plane: the real `vhost-target` binary,
//! a temporary RPC socket and `-S` directory, clients on raw sockets and
//! through `vhost-target rpc`. Every wait is bounded; the daemon is killed
//! when a test ends, pass or fail.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_vhost-target");
const WAIT: Duration = Duration::from_secs(20);

struct Daemon {
    child: Option<Child>,
    dir: tempfile::TempDir,
    rpc: PathBuf,
}

impl Daemon {
    /// Starts `serve` in a fresh temp dir and waits until it answers.
    fn start(extra: &[&str]) -> Daemon {
        let dir = tempfile::tempdir().expect("temp dir");
        Self::start_in(dir, extra)
    }

    fn start_in(dir: tempfile::TempDir, extra: &[&str]) -> Daemon {
        let rpc = dir.path().join("rpc.sock");
        let child = Self::spawn(dir.path(), &rpc, extra);
        let mut d = Daemon {
            child: Some(child),
            dir,
            rpc,
        };
        let deadline = Instant::now() + WAIT;
        loop {
            if let Ok(mut s) = UnixStream::connect(&d.rpc) {
                // Answered once the config (if any) has been replayed.
                if call_on(&mut s, "framework_wait_init", json!({})).get("result")
                    == Some(&json!(true))
                {
                    return d;
                }
            }
            if let Some(status) = d.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("daemon exited early ({status}):\n{}", d.log());
            }
            assert!(
                Instant::now() < deadline,
                "daemon did not start:\n{}",
                d.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn spawn(dir: &Path, rpc: &Path, extra: &[&str]) -> Child {
        let log = std::fs::File::create(dir.join("daemon.log")).expect("log file");
        Command::new(BIN)
            .arg("serve")
            .arg("-r")
            .arg(rpc)
            .arg("-S")
            .arg(dir)
            .args(["-m", "0x1"])
            .args(extra)
            .env("RUST_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn vhost-target serve")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }

    fn connect(&self) -> UnixStream {
        let s = UnixStream::connect(&self.rpc).expect("connect to the RPC socket");
        s.set_read_timeout(Some(WAIT)).unwrap();
        s.set_write_timeout(Some(WAIT)).unwrap();
        s
    }

    fn call(&self, method: &str, params: Value) -> Value {
        call_on(&mut self.connect(), method, params)
    }

    /// Runs `vhost-target rpc -s SOCK args...`.
    fn cli(&self, args: &[&str]) -> Output {
        let mut child = Command::new(BIN)
            .arg("rpc")
            .arg("-s")
            .arg(&self.rpc)
            .args(["-t", "10"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn vhost-target rpc");
        let deadline = Instant::now() + WAIT;
        while child.try_wait().expect("wait").is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("vhost-target rpc {args:?} hung");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        child.wait_with_output().expect("output")
    }

    /// SIGTERM, then waits for a clean exit.
    fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        // SAFETY: kill(2) on our own child's pid with a valid signal.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(st) = child.try_wait().expect("wait") {
                return st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("daemon ignored SIGTERM:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stops the daemon and hands back its directory for a restart.
    fn stop(mut self) -> tempfile::TempDir {
        assert!(self.terminate().success(), "{}", self.log());
        let dir = tempfile::tempdir().expect("temp dir");
        std::mem::replace(&mut self.dir, dir)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Sends one request with no framing (like SPDK's rpc.py) and reads one answer.
fn call_on(s: &mut UnixStream, method: &str, params: Value) -> Value {
    let req = json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params});
    s.write_all(req.to_string().as_bytes()).expect("send");
    read_answer(s)
}

fn read_answer(s: &mut UnixStream) -> Value {
    let mut de = serde_json::Deserializer::from_reader(s).into_iter::<Value>();
    de.next().expect("an answer").expect("valid JSON")
}

fn code(v: &Value) -> i64 {
    v["error"]["code"]
        .as_i64()
        .unwrap_or_else(|| panic!("expected an error, got {v}"))
}

/// True while the bdevs are the workspace skeleton's placeholders.
fn bdevs_are_placeholders(d: &Daemon) -> bool {
    let r = d.call(
        "bdev_null_create",
        json!({"name": "Probe", "num_blocks": 8, "block_size": 512}),
    );
    if r["error"]["message"]
        .as_str()
        .is_some_and(|m| m.contains("not built yet"))
    {
        eprintln!("SKIPPED: null bdev is still a placeholder");
        return true;
    }
    assert_eq!(
        d.call("bdev_null_delete", json!({"name": "Probe"}))["result"],
        true
    );
    false
}

#[test]
fn malformed_json_closes_only_that_connection() {
    let d = Daemon::start(&[]);
    let mut bad = d.connect();
    bad.write_all(b"{\"jsonrpc\": \"2.0\", \"method\": ]")
        .unwrap();
    let r = read_answer(&mut bad);
    assert_eq!(code(&r), -32700, "{r}");
    let mut rest = Vec::new();
    bad.read_to_end(&mut rest)
        .expect("the daemon closes the connection");
    assert!(rest.iter().all(u8::is_ascii_whitespace));

    let mut good = d.connect();
    let r = call_on(&mut good, "spdk_get_version", json!({}));
    assert!(r["result"]["version"].as_str().unwrap().contains("Tandem"));
    // The same connection keeps serving.
    let r = call_on(&mut good, "rpc_get_methods", json!({}));
    assert!(r["result"].as_array().unwrap().len() > 10);
}

#[test]
fn unknown_method_and_bad_params_are_answered() {
    let d = Daemon::start(&[]);
    let mut s = d.connect();
    let r = call_on(&mut s, "no_such_method", json!({}));
    assert_eq!(code(&r), -32601);
    assert_eq!(r["error"]["message"], "Method not found: no_such_method");
    let r = call_on(
        &mut s,
        "bdev_malloc_create",
        json!({"num_blocks": "lots", "block_size": 512}),
    );
    assert_eq!(code(&r), -32602, "{r}");
    let r = call_on(&mut s, "bdev_get_bdevs", json!({"name": "nope"}));
    assert_eq!(code(&r), -19, "{r}");
    let r = call_on(
        &mut s,
        "vhost_create_blk_controller",
        json!({"ctrlr": "v", "dev_name": "nope", "bogus": 1}),
    );
    assert_eq!(code(&r), -32602, "{r}");
}

#[test]
fn rpc_cli_round_trip() {
    let d = Daemon::start(&[]);
    let out = d.cli(&["spdk_get_version"]);
    assert!(out.status.success(), "{out:?}");
    let v: Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    assert!(v["version"].as_str().unwrap().contains("Tandem"));

    let out = d.cli(&["bdev_get_bdevs", "name=nope"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("-19") && err.contains("nope"), "{err}");

    let out = d.cli(&["vhost_get_controllers", r#"{"name": "nope"}"#]);
    assert!(!out.status.success());

    let out = d.cli(&["bdev_get_bdevs"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        serde_json::from_slice::<Value>(&out.stdout).unwrap(),
        json!([])
    );
}

#[test]
fn rpc_cli_reports_a_missing_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args(["rpc", "-t", "2", "-s"])
        .arg(dir.path().join("absent.sock"))
        .arg("spdk_get_version")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot connect"));
}

#[test]
fn live_socket_is_refused_and_stale_socket_replaced() {
    let d = Daemon::start(&[]);
    let out = Command::new(BIN)
        .arg("serve")
        .arg("-r")
        .arg(&d.rpc)
        .arg("-S")
        .arg(d.dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already serving"));
    // The first daemon is unharmed.
    assert!(d.call("spdk_get_version", json!({}))["result"].is_object());

    // A socket file nobody listens on is replaced.
    let dir = tempfile::tempdir().unwrap();
    drop(UnixListener::bind(dir.path().join("rpc.sock")).unwrap());
    let d2 = Daemon::start_in(dir, &[]);
    assert!(d2.call("spdk_get_version", json!({}))["result"].is_object());
}

#[test]
fn sigterm_stops_cleanly_and_removes_the_socket() {
    let mut d = Daemon::start(&[]);
    let status = d.terminate();
    assert!(status.success(), "{status}\n{}", d.log());
    assert!(!d.rpc.exists());
}

#[test]
fn spdk_kill_instance_stops_the_daemon_cleanly() {
    let mut d = Daemon::start(&[]);
    let mut c = d.connect();
    let req = json!({"jsonrpc": "2.0", "id": 1, "method": "spdk_kill_instance",
                     "params": {"sig_name": "SIGTERM"}});
    c.write_all(req.to_string().as_bytes()).unwrap();
    let mut child = d.child.take().unwrap();
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < deadline, "daemon did not stop");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(status.success(), "{status}\n{}", d.log());
    assert!(!d.rpc.exists());
}

#[test]
fn config_with_unknown_method_fails_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.json");
    std::fs::write(
        &cfg,
        r#"{"subsystems": [{"subsystem": "bdev", "config": [{"method": "bdev_lvol_create", "params": {}}]}]}"#,
    )
    .unwrap();
    let out = Command::new(BIN)
        .arg("serve")
        .arg("-r")
        .arg(dir.path().join("rpc.sock"))
        .arg("-S")
        .arg(dir.path())
        .arg("-c")
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bdev_lvol_create") && err.contains("bad.json"),
        "{err}"
    );
    assert!(!dir.path().join("rpc.sock").exists());
}

#[test]
fn saved_config_restarts_to_the_same_state() {
    let d = Daemon::start(&[]);
    // While the bdevs are placeholders the state is empty, and the test still
    // covers save_config -> file -> serve -c -> save_config.
    let mut with_controller = false;
    if !bdevs_are_placeholders(&d) {
        let r = d.call(
            "bdev_null_create",
            json!({"name": "Null0", "num_blocks": 2048, "block_size": 512}),
        );
        assert_eq!(r["result"], "Null0", "{r}");
        let r = d.call(
            "bdev_malloc_create",
            json!({"num_blocks": 256, "block_size": 4096}),
        );
        assert_eq!(r["result"], "Malloc0", "{r}");
        let r = d.call(
            "vhost_create_blk_controller",
            json!({"ctrlr": "vhost.0", "dev_name": "Malloc0", "num_queues": 2,
                   "readonly": true, "poll_mode": "interrupt"}),
        );
        assert_eq!(r["result"], true, "{r}");
        assert!(d.dir.path().join("vhost.0").exists(), "controller socket");
        with_controller = true;
    }
    let saved = d.call("save_config", json!({}))["result"].clone();
    assert!(saved["subsystems"].is_array(), "{saved}");
    let bdevs = d.call("bdev_get_bdevs", json!({}))["result"].clone();
    let cfg_dir = tempfile::tempdir().unwrap();
    let cfg = cfg_dir.path().join("saved.json");
    std::fs::write(&cfg, serde_json::to_vec_pretty(&saved).unwrap()).unwrap();

    let dir = d.stop();
    assert!(
        !dir.path().join("vhost.0").exists(),
        "socket removed at shutdown"
    );
    let d = Daemon::start_in(dir, &["-c", cfg.to_str().unwrap()]);
    assert_eq!(d.call("save_config", json!({}))["result"], saved);
    assert_eq!(d.call("bdev_get_bdevs", json!({}))["result"], bdevs);
    if with_controller {
        let c = d.call("vhost_get_controllers", json!({"name": "vhost.0"}));
        let blk = &c["result"][0]["backend_specific"]["block"];
        assert_eq!(blk["num_queues"], 2, "{c}");
        assert_eq!(blk["readonly"], true, "{c}");
        assert_eq!(blk["poll_mode"], "interrupt", "{c}");
        assert!(d.dir.path().join("vhost.0").exists(), "controller socket");
    }
}

#[test]
fn many_clients_at_once_are_all_served() {
    let d = Daemon::start(&[]);
    std::thread::scope(|s| {
        for _ in 0..8 {
            s.spawn(|| {
                let mut c = d.connect();
                for _ in 0..25 {
                    let r = call_on(&mut c, "bdev_get_bdevs", json!({}));
                    assert!(r["result"].is_array(), "{r}");
                }
            });
        }
    });
}

#[test]
fn batches_and_notifications_over_the_socket() {
    let d = Daemon::start(&[]);
    let mut c = d.connect();
    // A notification gets no answer; the batch after it gets one array.
    c.write_all(br#"{"jsonrpc":"2.0","method":"spdk_get_version"}"#)
        .unwrap();
    c.write_all(
        br#"[{"jsonrpc":"2.0","id":1,"method":"spdk_get_version"},{"jsonrpc":"2.0","id":2,"method":"nope"}]"#,
    )
    .unwrap();
    let r = read_answer(&mut c);
    let arr = r.as_array().unwrap_or_else(|| panic!("{r}"));
    assert_eq!(arr.len(), 2);
    assert_eq!(arr[0]["id"], 1);
    assert_eq!(code(&arr[1]), -32601);
}

#[test]
fn default_config_starts() {
    let d = Daemon::start(&[]);
    if bdevs_are_placeholders(&d) {
        return;
    }
    drop(d);
    let cfg = concat!(env!("CARGO_MANIFEST_DIR"), "/configs/default.json");
    let d = Daemon::start(&["-c", cfg]);
    let b = d.call("bdev_get_bdevs", json!({"name": "Malloc0"}));
    assert_eq!(b["result"][0]["num_blocks"], 524288, "{b}");
}
