//! Bad input from every side gets a clear error; the daemon keeps serving; state unchanged.

use std::time::Duration;

use authority::config::AuthorityConfig;
use authority::daemon::Daemon;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpStream, UnixStream};

fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    format!("127.0.0.1:{}", l.local_addr().unwrap().port())
}

async fn start(dir: &std::path::Path) -> Daemon {
    let config = AuthorityConfig {
        data_dir: dir.join("data"),
        rpc_addr: free_addr(),
        raft_addr: free_addr(),
        unix_socket: Some(dir.join("a.sock")),
        heartbeat_ms: 50,
        election_timeout_min_ms: 150,
        election_timeout_max_ms: 300,
        ..Default::default()
    };
    let d = Daemon::start(config).await.unwrap();
    // Wait for the single member to lead every group.
    for g in d.host.groups.values() {
        g.raft
            .wait(Some(Duration::from_secs(10)))
            .current_leader(1, "leader")
            .await
            .unwrap();
    }
    d
}

struct Line {
    rd: BufReader<tokio::net::tcp::OwnedReadHalf>,
    wr: tokio::net::tcp::OwnedWriteHalf,
}

impl Line {
    async fn connect(addr: &str) -> Line {
        let (rd, wr) = TcpStream::connect(addr).await.unwrap().into_split();
        Line {
            rd: BufReader::new(rd),
            wr,
        }
    }
    async fn send_raw(&mut self, bytes: &[u8]) -> Value {
        self.wr.write_all(bytes).await.unwrap();
        let mut s = String::new();
        tokio::time::timeout(Duration::from_secs(10), self.rd.read_line(&mut s))
            .await
            .unwrap()
            .unwrap();
        serde_json::from_str(&s).unwrap()
    }
    async fn call(&mut self, method: &str, params: Value) -> Value {
        let mut b = serde_json::to_vec(
            &json!({"jsonrpc": "2.0", "id": 7, "method": method, "params": params}),
        )
        .unwrap();
        b.push(b'\n');
        self.send_raw(&b).await
    }
}

fn code(v: &Value) -> i64 {
    v["error"]["code"]
        .as_i64()
        .unwrap_or_else(|| panic!("not an error: {v}"))
}

async fn setup(l: &mut Line) {
    for s in ["s1", "s2"] {
        let r = l
            .call(
                "server_register",
                json!({"site": "site-a", "server_id": s, "data_addr": "d", "admin_addr": "a"}),
            )
            .await;
        assert!(r.get("result").is_some(), "{r}");
    }
    let r = l
        .call(
            "volume_create",
            json!({"site": "site-a", "volume": "vol-a", "device": "dev0", "size_bytes": 1048576, "block_size": 512, "servers": ["s1", "s2"]}),
        )
        .await;
    assert_eq!(r["result"]["epoch"], 1, "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_json_rpc_gets_standard_errors_and_the_connection_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let d = start(dir.path()).await;
    let mut l = Line::connect(&d.host.config.rpc_addr).await;
    assert_eq!(code(&l.send_raw(b"{not json\n").await), -32700);
    assert_eq!(
        code(&l.send_raw(b"{\"id\":1,\"method\":\"volume_get\"}\n").await),
        -32600
    );
    assert_eq!(code(&l.call("no_such_method", json!({})).await), -32601);
    assert_eq!(
        code(
            &l.send_raw(
                b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"volume_get\",\"params\":[1]}\n"
            )
            .await
        ),
        -32602
    );
    assert_eq!(
        code(&l.call("volume_get", json!({"site": "site-a"})).await),
        -32602
    );
    assert_eq!(
        code(
            &l.call(
                "volume_get",
                json!({"site": "site-a", "volume": "v", "bogus": 1})
            )
            .await
        ),
        -32602
    );
    assert_eq!(
        code(
            &l.call(
                "lease_renew",
                json!({"site": "site-a", "volume": "v", "server_id": "s", "epoch": -1})
            )
            .await
        ),
        -32602
    );
    // Still serving on the same connection.
    let ok = l.call("rpc_get_methods", json!({})).await;
    assert!(ok["result"].as_array().unwrap().len() > 10);
    d.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_request_is_refused_and_the_next_one_served() {
    let dir = tempfile::tempdir().unwrap();
    let d = start(dir.path()).await;
    let mut l = Line::connect(&d.host.config.rpc_addr).await;
    let mut big = vec![b'x'; 3 << 20];
    big.push(b'\n');
    let r = l.send_raw(&big).await;
    assert_eq!(code(&r), -32600);
    assert!(
        r["error"]["message"].as_str().unwrap().contains("over"),
        "{r}"
    );
    let ok = l.call("rpc_get_methods", json!({})).await;
    assert!(ok.get("result").is_some(), "{ok}");
    d.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_name_the_reason_and_leave_the_state_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let d = start(dir.path()).await;
    let mut l = Line::connect(&d.host.config.rpc_addr).await;
    setup(&mut l).await;
    let g = l
        .call(
            "lease_acquire",
            json!({"site": "site-a", "volume": "vol-a", "server_id": "s1"}),
        )
        .await;
    assert_eq!(g["result"]["epoch"], 1, "{g}");
    let before = l.call("config_get", json!({})).await;

    let cases = [
        (
            "volume_get",
            json!({"site": "site-z", "volume": "vol-a"}),
            -32014,
        ),
        (
            "volume_get",
            json!({"site": "site-a", "volume": "nope"}),
            -32015,
        ),
        ("device_get", json!({"device": "nope"}), -32016),
        (
            "server_heartbeat",
            json!({"site": "site-a", "server_id": "nope", "health": {}}),
            -32017,
        ),
        (
            "lease_acquire",
            json!({"site": "site-a", "volume": "vol-a", "server_id": "s2"}),
            -32018,
        ),
        (
            "lease_renew",
            json!({"site": "site-a", "volume": "vol-a", "server_id": "s1", "epoch": 0}),
            -32011,
        ),
        (
            "volume_set_in_sync",
            json!({"site": "site-a", "volume": "vol-a", "server_id": "s2", "in_sync": false, "epoch": 9}),
            -32011,
        ),
        (
            "failover_request",
            json!({"site": "site-a", "volume": "vol-a", "reason": "x", "epoch": 5}),
            -32011,
        ),
        (
            "volume_create",
            json!({"site": "site-a", "volume": "vol-a", "device": "other", "size_bytes": 512, "block_size": 512, "servers": ["s1"]}),
            -32020,
        ),
        (
            "volume_create",
            json!({"site": "site-a", "volume": "v2", "device": "d", "size_bytes": 512, "block_size": 512, "servers": ["ghost"]}),
            -32017,
        ),
        (
            "volume_create",
            json!({"site": "site-a", "volume": "v3", "device": "d", "size_bytes": 1000, "block_size": 512, "servers": ["s1"]}),
            -32602,
        ),
        (
            "volume_delete",
            json!({"site": "site-a", "volume": "vol-a"}),
            -32012,
        ),
    ];
    for (m, p, want) in cases {
        let r = l.call(m, p.clone()).await;
        assert_eq!(code(&r), want, "{m} {p}: {r}");
    }
    let stale = l
        .call(
            "lease_renew",
            json!({"site": "site-a", "volume": "vol-a", "server_id": "s1", "epoch": 0}),
        )
        .await;
    assert_eq!(stale["error"]["data"], json!({"epoch": 1, "generation": 1}));
    let held = l
        .call(
            "lease_acquire",
            json!({"site": "site-a", "volume": "vol-a", "server_id": "s2"}),
        )
        .await;
    assert_eq!(held["error"]["data"], json!({"primary": "s1"}));

    // Not-in-sync refusal, then a forced failover that says so.
    let r = l.call("volume_set_in_sync", json!({"site": "site-a", "volume": "vol-a", "server_id": "s2", "in_sync": false, "epoch": 1})).await;
    assert_eq!(r["result"]["servers"][1]["in_sync"], false, "{r}");
    let before2 = l.call("config_get", json!({})).await;
    let r = l
        .call(
            "failover_request",
            json!({"site": "site-a", "volume": "vol-a", "reason": "x"}),
        )
        .await;
    assert_eq!(code(&r), -32013);
    assert_eq!(r["error"]["data"], json!({"server_id": "s2"}));
    assert_eq!(
        l.call("config_get", json!({})).await,
        before2,
        "the refused failover changed the state"
    );
    assert_ne!(before, before2);
    // The new primary's lease waits for the old one.
    let r = l
        .call(
            "failover_request",
            json!({"site": "site-a", "volume": "vol-a", "reason": "x", "force": true}),
        )
        .await;
    assert_eq!(
        r["result"],
        json!({"primary": "s2", "epoch": 2, "forced": true})
    );
    let r = l
        .call(
            "lease_acquire",
            json!({"site": "site-a", "volume": "vol-a", "server_id": "s2"}),
        )
        .await;
    assert_eq!(code(&r), -32012, "{r}");
    assert_eq!(r["error"]["data"]["holder"], "s1");
    assert!(r["error"]["data"]["retry_after_ms"].as_u64().unwrap() > 0);
    d.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_raft_port_is_refused_and_the_group_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let d = start(dir.path()).await;
    let raft = d.host.config.raft_addr.clone();
    // A length over the limit.
    let mut s = TcpStream::connect(&raft).await.unwrap();
    s.write_all(&u32::MAX.to_le_bytes()).await.unwrap();
    let mut len = [0u8; 4];
    s.read_exact(&mut len).await.unwrap();
    let mut reply = vec![0u8; u32::from_le_bytes(len) as usize];
    s.read_exact(&mut reply).await.unwrap();
    assert!(
        String::from_utf8_lossy(&reply).contains("over"),
        "{}",
        String::from_utf8_lossy(&reply)
    );
    // A frame that is not a Raft message, and one for a group not hosted here.
    for body in [&b"\x01\x02garbage"[..], &br#"{"group":{"Site":"nowhere"},"rpc":{"Vote":{"vote":{"leader_id":{"term":1,"node_id":9},"committed":false},"last_log_id":null}}}"#[..]] {
        let mut s = TcpStream::connect(&raft).await.unwrap();
        s.write_all(&(body.len() as u32).to_le_bytes()).await.unwrap();
        s.write_all(body).await.unwrap();
        s.read_exact(&mut len).await.unwrap();
        let mut reply = vec![0u8; u32::from_le_bytes(len) as usize];
        s.read_exact(&mut reply).await.unwrap();
        assert!(String::from_utf8_lossy(&reply).contains("Refused"), "{}", String::from_utf8_lossy(&reply));
    }
    // The groups still serve, over the Unix socket too.
    let (rd, mut wr) = UnixStream::connect(dir.path().join("a.sock"))
        .await
        .unwrap()
        .into_split();
    wr.write_all(b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"server_register\",\"params\":{\"site\":\"site-a\",\"server_id\":\"s1\",\"data_addr\":\"d\",\"admin_addr\":\"a\"}}\n").await.unwrap();
    let mut line = String::new();
    BufReader::new(rd).read_line(&mut line).await.unwrap();
    let v: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["result"], json!({}), "{v}");
    d.shutdown().await;
}
