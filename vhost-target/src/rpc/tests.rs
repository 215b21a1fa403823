//! Dispatch and protocol tests: every error class, and the result shapes.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Mutex;
use std::time::Duration;

use serde_json::{json, Value};

use super::*;
use crate::target::fakes::{placeholder_bdevs, target, FakeBdev};

fn shared() -> Mutex<Target> {
    Mutex::new(target())
}

/// Sends one request object and returns the response.
fn rpc(t: &Mutex<Target>, method: &str, params: Value) -> Value {
    handle_value(
        t,
        json!({"jsonrpc": "2.0", "id": 7, "method": method, "params": params}),
    )
    .expect("a request with an id gets a response")
}

fn err_code(resp: &Value) -> i64 {
    resp["error"]["code"]
        .as_i64()
        .unwrap_or_else(|| panic!("expected an error, got {resp}"))
}

fn err_msg(resp: &Value) -> String {
    resp["error"]["message"].as_str().unwrap_or("").to_owned()
}

fn with_malloc0_on_vhost0(t: &Mutex<Target>) {
    let mut g = t.lock().unwrap();
    g.register_bdev(FakeBdev::shared("Malloc0", "malloc"))
        .unwrap();
    drop(g);
    let r = rpc(
        t,
        "vhost_create_blk_controller",
        json!({"ctrlr": "vhost.0", "dev_name": "Malloc0"}),
    );
    assert_eq!(r["result"], true, "{r}");
}

#[test]
fn success_response_echoes_id_and_version() {
    let t = shared();
    let r = rpc(&t, "spdk_get_version", json!({}));
    assert_eq!(r["jsonrpc"], "2.0");
    assert_eq!(r["id"], 7);
    let v = r["result"]["version"].as_str().unwrap();
    assert!(v.contains("Tandem"), "{v}");
    assert!(r["result"]["fields"]["major"].is_u64());
}

#[test]
fn rpc_get_methods_lists_every_method() {
    let t = shared();
    let r = rpc(&t, "rpc_get_methods", json!({}));
    let names: Vec<&str> = r["result"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for m in [
        "bdev_malloc_create",
        "bdev_null_delete",
        "bdev_get_iostat",
        "vhost_create_blk_controller",
        "vhost_get_controllers",
        "save_config",
    ] {
        assert!(names.contains(&m), "{m} missing from {names:?}");
    }
}

#[test]
fn invalid_requests_are_32600() {
    let t = shared();
    for bad in [
        json!(5),
        json!("x"),
        json!({"id": 1, "method": "spdk_get_version"}),
        json!({"jsonrpc": "1.0", "id": 1, "method": "spdk_get_version"}),
        json!({"jsonrpc": "2.0", "id": 1, "method": 3}),
        json!({"jsonrpc": "2.0", "id": [1], "method": "spdk_get_version"}),
        json!({"jsonrpc": "2.0", "id": 1, "method": "spdk_get_version", "params": "x"}),
        json!({"jsonrpc": "2.0", "id": 1, "method": "spdk_get_version", "extra": 1}),
        json!([]),
    ] {
        let r = handle_value(&t, bad.clone()).unwrap();
        assert_eq!(err_code(&r), code::INVALID_REQUEST as i64, "{bad} -> {r}");
    }
    // The id is echoed when it could be read.
    let r = handle_value(&t, json!({"jsonrpc": "1.0", "id": "a", "method": "x"})).unwrap();
    assert_eq!(r["id"], "a");
}

#[test]
fn unknown_method_is_32601_naming_it() {
    let t = shared();
    let r = rpc(&t, "bdev_frobnicate", json!({}));
    assert_eq!(err_code(&r), code::METHOD_NOT_FOUND as i64);
    assert_eq!(err_msg(&r), "Method not found: bdev_frobnicate");
}

#[test]
fn wrong_param_types_are_32602() {
    let t = shared();
    let r = rpc(
        &t,
        "bdev_malloc_create",
        json!({"num_blocks": "many", "block_size": 512}),
    );
    assert_eq!(err_code(&r), code::INVALID_PARAMS as i64, "{r}");
    assert!(err_msg(&r).contains("invalid type"), "{r}");
    let r = rpc(
        &t,
        "bdev_malloc_create",
        json!({"num_blocks": -1, "block_size": 512}),
    );
    assert_eq!(err_code(&r), code::INVALID_PARAMS as i64, "{r}");
    let r = rpc(
        &t,
        "vhost_create_blk_controller",
        json!({"ctrlr": "c", "dev_name": "d", "poll_mode": "turbo"}),
    );
    assert_eq!(err_code(&r), code::INVALID_PARAMS as i64, "{r}");
    let r = rpc(
        &t,
        "bdev_null_create",
        json!({"name": "n", "num_blocks": 8, "block_size": 512, "uuid": "not-a-uuid"}),
    );
    assert_eq!(err_code(&r), code::INVALID_PARAMS as i64, "{r}");
}

#[test]
fn unknown_param_field_is_32602_naming_it() {
    let t = shared();
    let r = rpc(
        &t,
        "bdev_malloc_create",
        json!({"num_blocks": 8, "block_size": 512, "colour": "blue"}),
    );
    assert_eq!(err_code(&r), code::INVALID_PARAMS as i64);
    assert!(err_msg(&r).contains("colour"), "{r}");
    let r = rpc(&t, "save_config", json!({"x": 1}));
    assert_eq!(err_code(&r), code::INVALID_PARAMS as i64);
}

#[test]
fn missing_required_param_is_32602_naming_it() {
    let t = shared();
    let r = rpc(
        &t,
        "bdev_null_create",
        json!({"name": "n", "num_blocks": 8}),
    );
    assert_eq!(err_code(&r), code::INVALID_PARAMS as i64);
    assert!(err_msg(&r).contains("block_size"), "{r}");
    let r = handle_value(
        &t,
        json!({"jsonrpc": "2.0", "id": 1, "method": "vhost_delete_controller"}),
    )
    .unwrap();
    assert_eq!(err_code(&r), code::INVALID_PARAMS as i64);
    assert!(err_msg(&r).contains("ctrlr"), "{r}");
}

#[test]
fn positional_params_are_32602() {
    let t = shared();
    let r = handle_value(
        &t,
        json!({"jsonrpc": "2.0", "id": 1, "method": "bdev_malloc_delete", "params": ["x"]}),
    )
    .unwrap();
    assert_eq!(err_code(&r), code::INVALID_PARAMS as i64);
}

#[test]
fn duplicate_bdev_is_minus_17_naming_it() {
    let t = shared();
    t.lock()
        .unwrap()
        .register_bdev(FakeBdev::shared("Malloc0", "malloc"))
        .unwrap();
    let r = rpc(
        &t,
        "bdev_malloc_create",
        json!({"name": "Malloc0", "num_blocks": 8, "block_size": 512}),
    );
    assert_eq!(err_code(&r), -17);
    assert!(err_msg(&r).contains("Malloc0"));
}

#[test]
fn unknown_bdev_is_minus_19() {
    let t = shared();
    for (m, p) in [
        ("bdev_get_bdevs", json!({"name": "nope"})),
        ("bdev_get_iostat", json!({"name": "nope"})),
        ("bdev_malloc_delete", json!({"name": "nope"})),
        ("bdev_null_delete", json!({"name": "nope"})),
        (
            "vhost_create_blk_controller",
            json!({"ctrlr": "v", "dev_name": "nope"}),
        ),
        ("vhost_get_controllers", json!({"name": "nope"})),
        ("vhost_delete_controller", json!({"ctrlr": "nope"})),
    ] {
        let r = rpc(&t, m, p);
        assert_eq!(err_code(&r), -19, "{m}: {r}");
        assert!(err_msg(&r).contains("nope"), "{m}: {r}");
    }
}

#[test]
fn deleting_a_claimed_bdev_is_minus_16() {
    let t = shared();
    with_malloc0_on_vhost0(&t);
    let r = rpc(&t, "bdev_malloc_delete", json!({"name": "Malloc0"}));
    assert_eq!(err_code(&r), -16);
    assert_eq!(err_msg(&r), "bdev Malloc0 is in use by controller vhost.0");
    assert_eq!(
        rpc(&t, "vhost_delete_controller", json!({"ctrlr": "vhost.0"}))["result"],
        true
    );
    assert_eq!(
        rpc(&t, "bdev_malloc_delete", json!({"name": "Malloc0"}))["result"],
        true
    );
}

#[test]
fn bad_cpumask_is_minus_22() {
    let t = shared();
    t.lock()
        .unwrap()
        .register_bdev(FakeBdev::shared("Malloc0", "malloc"))
        .unwrap();
    for mask in ["0xq", "[2-1]", "0x0"] {
        let r = rpc(
            &t,
            "vhost_create_blk_controller",
            json!({"ctrlr": "vhost.0", "dev_name": "Malloc0", "cpumask": mask}),
        );
        assert_eq!(err_code(&r), -22, "{mask}: {r}");
    }
}

#[test]
fn cpumask_outside_core_mask_is_minus_22_naming_both() {
    let t = shared();
    t.lock()
        .unwrap()
        .register_bdev(FakeBdev::shared("Malloc0", "malloc"))
        .unwrap();
    let r = rpc(
        &t,
        "vhost_create_blk_controller",
        json!({"ctrlr": "vhost.0", "dev_name": "Malloc0", "cpumask": "0x6"}),
    );
    assert_eq!(err_code(&r), -22);
    let m = err_msg(&r);
    assert!(m.contains("0x6") && m.contains("0x3"), "{m}");
}

#[test]
fn unsupported_spdk_options_are_minus_22() {
    let t = shared();
    t.lock()
        .unwrap()
        .register_bdev(FakeBdev::shared("Malloc0", "malloc"))
        .unwrap();
    for p in [
        json!({"ctrlr": "v", "dev_name": "Malloc0", "packed_ring": true}),
        json!({"ctrlr": "v", "dev_name": "Malloc0", "transport": "vfio_user_blk"}),
    ] {
        assert_eq!(err_code(&rpc(&t, "vhost_create_blk_controller", p)), -22);
    }
    let r = rpc(
        &t,
        "bdev_malloc_create",
        json!({"num_blocks": 8, "block_size": 512, "md_size": 8}),
    );
    assert_eq!(err_code(&r), -22);
}

#[test]
fn notifications_get_no_response_and_batches_get_an_array() {
    let t = shared();
    assert!(handle_value(&t, json!({"jsonrpc": "2.0", "method": "spdk_get_version"})).is_none());
    let r = handle_value(
        &t,
        json!([
            {"jsonrpc": "2.0", "id": 1, "method": "spdk_get_version"},
            {"jsonrpc": "2.0", "method": "spdk_get_version"},
            {"jsonrpc": "2.0", "id": 2, "method": "nope"}
        ]),
    )
    .unwrap();
    let arr = r.as_array().unwrap();
    assert_eq!(arr.len(), 2);
    assert_eq!(arr[0]["id"], 1);
    assert_eq!(err_code(&arr[1]), code::METHOD_NOT_FOUND as i64);
}

#[test]
fn bdev_get_bdevs_has_spdk_shape_and_claim() {
    let t = shared();
    with_malloc0_on_vhost0(&t);
    let r = rpc(&t, "bdev_get_bdevs", json!({}));
    let b = &r["result"][0];
    for k in [
        "name",
        "aliases",
        "product_name",
        "block_size",
        "num_blocks",
        "uuid",
        "claimed",
        "supported_io_types",
        "driver_specific",
    ] {
        assert!(b.get(k).is_some(), "{k} missing in {b}");
    }
    assert_eq!(b["claimed"], true);
    assert_eq!(b["supported_io_types"]["reset"], false);
    assert_eq!(b["supported_io_types"]["unmap"], true);
    let by_name = rpc(&t, "bdev_get_bdevs", json!({"name": "Malloc0"}));
    assert_eq!(by_name["result"].as_array().unwrap().len(), 1);
}

#[test]
fn bdev_get_iostat_has_spdk_shape() {
    let t = shared();
    with_malloc0_on_vhost0(&t);
    let r = rpc(&t, "bdev_get_iostat", json!({}));
    assert_eq!(r["result"]["tick_rate"], 1_000_000_000u64);
    assert!(r["result"]["ticks"].as_u64().unwrap() > 0);
    let s = &r["result"]["bdevs"][0];
    assert_eq!(s["name"], "Malloc0");
    for k in [
        "bytes_read",
        "num_read_ops",
        "bytes_written",
        "num_write_ops",
        "bytes_unmapped",
        "num_unmap_ops",
        "read_latency_ticks",
        "write_latency_ticks",
        "unmap_latency_ticks",
    ] {
        assert_eq!(s[k], 0, "{k} in {s}");
    }
}

#[test]
fn vhost_get_controllers_has_spdk_shape() {
    let t = shared();
    with_malloc0_on_vhost0(&t);
    let r = rpc(&t, "vhost_get_controllers", json!({}));
    let c = &r["result"][0];
    assert_eq!(c["ctrlr"], "vhost.0");
    assert_eq!(c["cpumask"], "0x1");
    assert_eq!(c["delay_base_us"], 0);
    assert_eq!(c["iops_threshold"], 0);
    assert_eq!(c["socket"], "/tmp/tandem-test/vhost.0");
    assert!(c["sessions"].is_array());
    let blk = &c["backend_specific"]["block"];
    assert_eq!(blk["bdev"], "Malloc0");
    assert_eq!(blk["readonly"], false);
    assert_eq!(blk["transport"], "vhost_user_blk");
    assert_eq!(blk["poll_mode"], "adaptive");
    assert_eq!(blk["num_queues"], 4);
    assert_eq!(blk["connected"], false);
}

#[test]
fn malloc_and_null_create_return_the_name() {
    if placeholder_bdevs() {
        return;
    }
    let t = shared();
    let r = rpc(
        &t,
        "bdev_malloc_create",
        json!({"num_blocks": 64, "block_size": 512}),
    );
    assert_eq!(r["result"], "Malloc0");
    let r = rpc(
        &t,
        "bdev_null_create",
        json!({"name": "Null0", "num_blocks": 64, "block_size": 4096,
               "uuid": "6a9c6b8e-3f0b-4d6e-9d8e-0a1b2c3d4e5f"}),
    );
    assert_eq!(r["result"], "Null0");
    let r = rpc(&t, "bdev_get_bdevs", json!({"name": "Null0"}));
    assert_eq!(
        r["result"][0]["uuid"],
        "6a9c6b8e-3f0b-4d6e-9d8e-0a1b2c3d4e5f"
    );
    assert_eq!(r["result"][0]["block_size"], 4096);
    assert_eq!(
        rpc(&t, "bdev_null_delete", json!({"name": "Null0"}))["result"],
        true
    );
}

// ---- the connection loop ----

/// Runs serve_connection on one end of a socket pair; returns the other end.
fn connection(t: std::sync::Arc<Mutex<Target>>) -> UnixStream {
    let (client, server) = UnixStream::pair().unwrap();
    std::thread::spawn(move || server::serve_connection(server, &t));
    client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    client
}

fn read_one(s: &mut UnixStream) -> Value {
    let mut de = serde_json::Deserializer::from_reader(s).into_iter::<Value>();
    de.next().expect("a response").expect("valid JSON")
}

fn closed(s: &mut UnixStream) -> bool {
    // The newline after the last response may still be unread.
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).is_ok() && rest.iter().all(u8::is_ascii_whitespace)
}

#[test]
fn unframed_requests_back_to_back_each_get_an_answer() {
    let t = std::sync::Arc::new(shared());
    let mut s = connection(t);
    // No newlines, two objects in one write: what rpc.py-like clients send.
    s.write_all(
        br#"{"jsonrpc":"2.0","id":1,"method":"spdk_get_version"}{"jsonrpc":"2.0","id":2,"method":"rpc_get_methods"}"#,
    )
    .unwrap();
    assert_eq!(read_one(&mut s)["id"], 1);
    assert_eq!(read_one(&mut s)["id"], 2);
    // A request without a trailing newline is answered without waiting for more.
    s.write_all(br#"{"jsonrpc":"2.0","id":3,"method":"save_config"}"#)
        .unwrap();
    assert_eq!(read_one(&mut s)["id"], 3);
}

#[test]
fn parse_error_is_32700_and_closes_the_connection() {
    let t = std::sync::Arc::new(shared());
    let mut s = connection(t.clone());
    s.write_all(b"{\"jsonrpc\": \"2.0\", \"id\": 1, \"method\": }")
        .unwrap();
    let r = read_one(&mut s);
    assert_eq!(err_code(&r), code::PARSE_ERROR as i64, "{r}");
    assert_eq!(r["id"], Value::Null);
    assert!(closed(&mut s));
    // Another connection is still served.
    let mut s2 = connection(t);
    s2.write_all(br#"{"jsonrpc":"2.0","id":1,"method":"spdk_get_version"}"#)
        .unwrap();
    assert!(read_one(&mut s2)["result"].is_object());
}

#[test]
fn oversized_request_is_32700_and_closes_the_connection() {
    let t = std::sync::Arc::new(shared());
    let mut s = connection(t);
    let writer = {
        let mut w = s.try_clone().unwrap();
        std::thread::spawn(move || {
            let _ = w.write_all(b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"");
            let chunk = vec![b'a'; 64 * 1024];
            for _ in 0..((MAX_REQUEST_BYTES / chunk.len()) + 2) {
                if w.write_all(&chunk).is_err() {
                    break;
                }
            }
        })
    };
    let r = read_one(&mut s);
    assert_eq!(err_code(&r), code::PARSE_ERROR as i64, "{r}");
    assert!(err_msg(&r).contains("longer than"), "{r}");
    let _ = writer.join();
}

#[test]
fn framework_get_config_matches_save_config() {
    let t = shared();
    with_malloc0_on_vhost0(&t);
    let subs = rpc(&t, "framework_get_subsystems", json!({}));
    assert_eq!(
        subs["result"],
        json!([{"subsystem": "keyring", "depends_on": []},
               {"subsystem": "bdev", "depends_on": ["keyring"]},
               {"subsystem": "vhost_blk", "depends_on": ["bdev"]}])
    );
    let saved = rpc(&t, "save_config", json!({}))["result"].clone();
    for (i, name) in ["keyring", "bdev", "vhost_blk"].iter().enumerate() {
        let c = rpc(
            &t,
            "framework_get_config",
            json!({"name": name, "with_batches": false}),
        );
        assert_eq!(c["result"], saved["subsystems"][i]["config"], "{name}");
    }
    let r = rpc(&t, "framework_get_config", json!({"name": "nvmf"}));
    assert_eq!(err_code(&r), code::INVALID_PARAMS as i64);
}

#[test]
fn server_shuts_down_even_if_its_socket_file_was_removed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rpc.sock");
    let srv = server::RpcServer::start(&path, std::sync::Arc::new(shared())).unwrap();
    let mut c = UnixStream::connect(&path).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(br#"{"jsonrpc":"2.0","id":1,"method":"spdk_get_version"}"#)
        .unwrap();
    assert_eq!(read_one(&mut c)["id"], 1);
    std::fs::remove_file(&path).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        srv.shutdown();
        let _ = tx.send(());
    });
    rx.recv_timeout(Duration::from_secs(10))
        .expect("shutdown returns");
}

#[test]
fn kill_instance_accepts_only_stopping_signals() {
    let t = shared();
    // SIGINT/SIGTERM are covered by the multi-process tests: here they would
    // stop the test runner.
    let r = rpc(&t, "spdk_kill_instance", json!({"sig_name": "SIGKILL"}));
    assert_eq!(err_code(&r), -22);
    let r = rpc(&t, "spdk_kill_instance", json!({}));
    assert_eq!(err_code(&r), code::INVALID_PARAMS as i64);
}

#[test]
fn bad_replicated_bdev_and_keyring_params_are_refused_before_anything_connects() {
    let t = shared();
    let base = json!({"name": "Rep0", "authority": "127.0.0.1:1", "volume": "v", "key_name": "k"});
    let with = |k: &str, v: Value| {
        let mut p = base.clone();
        p[k] = v;
        p
    };
    // Neither a device nor a volume.
    let r = rpc(
        &t,
        "bdev_replicated_create",
        json!({"name": "Rep0", "authority": "127.0.0.1:1", "key_name": "k"}),
    );
    assert_eq!(err_code(&r), -22, "{r}");
    assert!(err_msg(&r).contains("device"), "{r}");
    // An empty authority address, a zero timeout.
    let r = rpc(
        &t,
        "bdev_replicated_create",
        with("authority", json!("a:1,")),
    );
    assert!(
        err_code(&r) == -22 && err_msg(&r).contains("authority"),
        "{r}"
    );
    let r = rpc(
        &t,
        "bdev_replicated_create",
        with("io_timeout_ms", json!(0)),
    );
    assert!(
        err_code(&r) == -22 && err_msg(&r).contains("io_timeout_ms"),
        "{r}"
    );
    // A key the keyring does not have: ENOKEY, naming it.
    let r = rpc(&t, "bdev_replicated_create", base.clone());
    assert_eq!(err_code(&r), -(libc::ENOKEY as i64), "{r}");
    assert!(err_msg(&r).contains('k'), "{r}");
    // Keyring: a missing file, a relative path, an unknown key to remove.
    let r = rpc(
        &t,
        "keyring_file_add_key",
        json!({"name": "k", "path": "/nonexistent/tandem.key"}),
    );
    assert!(
        err_code(&r) == -22 && err_msg(&r).contains("cannot read"),
        "{r}"
    );
    let r = rpc(
        &t,
        "keyring_file_add_key",
        json!({"name": "k", "path": "rel.key"}),
    );
    assert!(
        err_code(&r) == -22 && err_msg(&r).contains("absolute"),
        "{r}"
    );
    let r = rpc(&t, "keyring_file_remove_key", json!({"name": "k"}));
    assert_eq!(err_code(&r), -(libc::ENOKEY as i64), "{r}");
    // Fault injection on a bdev that is not replicated; unknown bdev.
    with_malloc0_on_vhost0(&t);
    let r = rpc(
        &t,
        "bdev_replicated_cut",
        json!({"name": "Malloc0", "servers": ["s1"]}),
    );
    assert!(
        err_code(&r) == -19 && err_msg(&r).contains("not a replicated"),
        "{r}"
    );
    let r = rpc(
        &t,
        "bdev_replicated_cut",
        json!({"name": "nope", "servers": []}),
    );
    assert_eq!(err_code(&r), -19, "{r}");
    // Nothing was created.
    let r = rpc(&t, "bdev_get_bdevs", json!({}));
    assert_eq!(r["result"].as_array().unwrap().len(), 1, "{r}");
    assert!(rpc(&t, "keyring_get_keys", json!({}))["result"]
        .as_array()
        .unwrap()
        .is_empty());
}
