//! Multi-process harness: real `authority` processes on loopback, each with its own data
//! directory, killed with SIGKILL and restarted on the same directory.

#![allow(dead_code)]

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use authority::client::{AuthorityClient, ClientOptions};
use serde_json::{json, Value};

pub const LEASE_MS: u64 = 1000;
pub const DRIFT_MS: u64 = 100;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub struct Member {
    pub id: u64,
    pub rpc_addr: String,
    pub raft_addr: String,
    pub dir: PathBuf,
    pub child: Option<Child>,
}

pub struct Cluster {
    pub tmp: tempfile::TempDir,
    pub members: Vec<Member>,
    members_arg: String,
}

impl Cluster {
    /// Start `n` members hosting the global group and site-a, site-b.
    pub fn start(n: u64) -> Cluster {
        Self::start_listing(n, n)
    }

    /// Start `n` members of which only the first `listed` are the groups' initial members;
    /// the others start as joiners and wait to be added.
    pub fn start_listing(n: u64, listed: u64) -> Cluster {
        let tmp = tempfile::tempdir().unwrap();
        let members: Vec<Member> = (1..=n)
            .map(|id| Member {
                id,
                rpc_addr: format!("127.0.0.1:{}", free_port()),
                raft_addr: format!("127.0.0.1:{}", free_port()),
                dir: tmp.path().join(format!("m{id}")),
                child: None,
            })
            .collect();
        let members_arg = members
            .iter()
            .take(listed as usize)
            .map(|m| format!("{}={}={}", m.id, m.raft_addr, m.rpc_addr))
            .collect::<Vec<_>>()
            .join(",");
        let mut c = Cluster {
            tmp,
            members,
            members_arg,
        };
        for i in 0..c.members.len() {
            c.spawn(i);
        }
        c
    }

    pub fn spawn(&mut self, i: usize) {
        let m = &mut self.members[i];
        let log = std::fs::File::create(self.tmp.path().join(format!("m{}.log", m.id))).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_authority"))
            .args(["serve", "--node-id", &m.id.to_string(), "--data-dir"])
            .arg(&m.dir)
            .args([
                "--rpc-addr",
                &m.rpc_addr,
                "--raft-addr",
                &m.raft_addr,
                "--unix-socket",
                "none",
            ])
            .args([
                "--members",
                &self.members_arg,
                "--lease-ms",
                &LEASE_MS.to_string(),
            ])
            .env("RUST_LOG", "info,openraft=warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        m.child = Some(child);
    }

    /// SIGKILL member `i` (no chance to flush anything).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    pub fn addrs(&self) -> Vec<String> {
        self.members.iter().map(|m| m.rpc_addr.clone()).collect()
    }

    pub fn client(&self) -> AuthorityClient {
        AuthorityClient::with_options(
            self.addrs(),
            ClientOptions {
                deadline: Duration::from_secs(15),
                attempt_timeout: Duration::from_secs(2),
                drift_margin: Duration::from_millis(DRIFT_MS),
            },
        )
    }

    /// A client that talks to member `i` only and never follows anyone (for local status).
    pub fn direct(&self, i: usize) -> AuthorityClient {
        AuthorityClient::with_options(
            vec![self.members[i].rpc_addr.clone()],
            ClientOptions {
                deadline: Duration::from_secs(3),
                ..Default::default()
            },
        )
    }

    /// Member `i`'s local view of `group` (not linearizable).
    pub async fn status(&self, i: usize, group: &str) -> Option<Value> {
        let v = self
            .direct(i)
            .call("cluster_status", json!({"group": group}))
            .await
            .ok()?;
        v.as_object()?.values().next().cloned()
    }

    /// Wait until some live member says it leads `group`; its index.
    pub async fn leader_of(&self, group: &str, timeout: Duration) -> usize {
        let end = Instant::now() + timeout;
        loop {
            for (i, m) in self.members.iter().enumerate() {
                if m.child.is_none() {
                    continue;
                }
                if let Some(s) = self.status(i, group).await {
                    if s["state"] == "Leader" && s["leader"].as_u64() == Some(m.id) {
                        return i;
                    }
                }
            }
            assert!(
                Instant::now() < end,
                "no leader of {group} within {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}
