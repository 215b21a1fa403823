//! A fault injector for Raft traffic: one TCP relay in front of each member's Raft listener.
//!
//! Every member advertises its relay's address (`--raft-addr`, the address in `--members`)
//! and listens behind it (`--raft-listen-addr`), so all Raft traffic *to* a member passes its
//! relay. The relay reads each frame, finds its sender (every Raft request carries the
//! sender's vote: the leader's for AppendEntries and InstallSnapshot, the candidate's for
//! Vote) and forwards it only if neither the sender nor the receiver is cut off; otherwise it
//! closes the connection (the sender sees an unreachable peer). Cutting member `i` thus stops
//! Raft traffic between `i` and everyone, both ways, while clients still reach `i` over
//! JSON-RPC: the partition clients meet in practice (an isolated old leader still answering).

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Default)]
pub struct RelayStats {
    pub forwarded: AtomicU64,
    pub dropped: AtomicU64,
    /// Frames whose sender could not be read (must stay 0, or the relay cuts nothing).
    pub unknown_sender: AtomicU64,
}

pub struct RaftRelay {
    rt: Option<tokio::runtime::Runtime>,
    cut: Arc<Mutex<HashSet<u64>>>,
    pub stats: Arc<RelayStats>,
}

impl RaftRelay {
    /// Bind one relay per member (port 0: no race for a free port); `(id, listen address)`
    /// of each member. Returns the relay and each member's relay address, in order.
    pub fn start(members: &[(u64, String)]) -> (RaftRelay, Vec<String>) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let cut = Arc::new(Mutex::new(HashSet::new()));
        let stats = Arc::new(RelayStats::default());
        let mut addrs = Vec::new();
        for (id, upstream) in members {
            let std = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            std.set_nonblocking(true).unwrap();
            addrs.push(std.local_addr().unwrap().to_string());
            let (id, upstream, cut, stats) = (*id, upstream.clone(), cut.clone(), stats.clone());
            rt.spawn(async move {
                let listener = TcpListener::from_std(std).unwrap();
                loop {
                    let Ok((client, _)) = listener.accept().await else {
                        // Out of descriptors or similar: do not spin.
                        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                        continue;
                    };
                    let _ = client.set_nodelay(true);
                    tokio::spawn(relay_conn(
                        client,
                        id,
                        upstream.clone(),
                        cut.clone(),
                        stats.clone(),
                    ));
                }
            });
        }
        (
            RaftRelay {
                rt: Some(rt),
                cut,
                stats,
            },
            addrs,
        )
    }

    /// Cut member `id` off from every other member, both ways.
    pub fn cut(&self, id: u64) {
        self.cut.lock().unwrap().insert(id);
    }

    /// Reconnect everyone.
    pub fn heal(&self) {
        self.cut.lock().unwrap().clear();
    }
}

impl Drop for RaftRelay {
    fn drop(&mut self) {
        // Dropped inside the test's runtime: a blocking shutdown would panic there.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

async fn read_frame(s: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).await?;
    let n = u32::from_le_bytes(len) as usize;
    if n > authority::network::MAX_FRAME {
        return Err(std::io::Error::other("frame too long"));
    }
    let mut buf = vec![0u8; 4 + n];
    buf[..4].copy_from_slice(&len);
    s.read_exact(&mut buf[4..]).await?;
    Ok(buf)
}

/// The member that sent a Raft request frame (`{group, rpc: {Variant: {vote: ...}}}`).
fn sender_of(frame: &[u8]) -> Option<u64> {
    let v: Value = serde_json::from_slice(&frame[4..]).ok()?;
    let (_, req) = v["rpc"].as_object()?.iter().next()?;
    req["vote"]["leader_id"]["node_id"].as_u64()
}

async fn relay_conn(
    mut client: TcpStream,
    target: u64,
    upstream: String,
    cut: Arc<Mutex<HashSet<u64>>>,
    stats: Arc<RelayStats>,
) -> std::io::Result<()> {
    let mut up: Option<TcpStream> = None;
    loop {
        let frame = read_frame(&mut client).await?;
        let sender = sender_of(&frame);
        if sender.is_none() {
            stats.unknown_sender.fetch_add(1, Ordering::Relaxed);
        }
        let blocked = {
            let cut = cut.lock().unwrap();
            cut.contains(&target) || sender.is_some_and(|s| cut.contains(&s))
        };
        if blocked {
            stats.dropped.fetch_add(1, Ordering::Relaxed);
            // Dropping both streams closes the connection: the sender sees it unreachable.
            return Ok(());
        }
        if up.is_none() {
            let s = TcpStream::connect(&upstream).await?;
            s.set_nodelay(true)?;
            up = Some(s);
        }
        let u = up.as_mut().expect("connected above");
        u.write_all(&frame).await?;
        let reply = read_frame(u).await?;
        client.write_all(&reply).await?;
        stats.forwarded.fetch_add(1, Ordering::Relaxed);
    }
}
