//! Raft traffic between `authority` processes: one TCP listener per process carries the
//! messages of every group it hosts, each frame tagged with its group.
//!
//! Frame: `[len u32 LE][JSON]`, at most [`MAX_FRAME`] bytes. A frame that is too big or does
//! not parse gets an error reply and the connection is closed; the groups keep serving.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::types::{GroupId, MemberAddr, NodeId, Raft, TypeConfig};

/// The largest Raft frame accepted (snapshot chunks are configured far below it).
pub const MAX_FRAME: usize = 16 << 20;

#[derive(Serialize, Deserialize)]
pub enum RaftRpc {
    AppendEntries(AppendEntriesRequest<TypeConfig>),
    Vote(VoteRequest<NodeId>),
    InstallSnapshot(InstallSnapshotRequest<TypeConfig>),
}

#[derive(Serialize, Deserialize)]
pub struct RaftFrame {
    pub group: GroupId,
    pub rpc: RaftRpc,
}

#[derive(Serialize, Deserialize)]
pub enum RaftReply {
    AppendEntries(Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>),
    Vote(Result<VoteResponse<NodeId>, RaftError<NodeId>>),
    InstallSnapshot(
        Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>,
    ),
    /// The frame was refused (too big, garbage, unknown group): the reason.
    Refused(String),
}

/// The groups this process hosts, by id, for the listener to dispatch to.
pub type GroupTable = Arc<RwLock<HashMap<GroupId, Raft>>>;

async fn write_frame(s: &mut TcpStream, payload: &[u8]) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(4 + payload.len());
    buf.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    buf.extend_from_slice(payload);
    s.write_all(&buf).await
}

/// Read one frame; `Err(InvalidData)` when it is longer than `MAX_FRAME`.
async fn read_frame(s: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).await?;
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("frame of {len} bytes is over the {MAX_FRAME} byte limit"),
        ));
    }
    let mut buf = vec![0u8; len];
    s.read_exact(&mut buf).await?;
    Ok(buf)
}

/// Serve Raft traffic for the groups in `groups` on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, groups: GroupTable) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "raft accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let groups = groups.clone();
        tokio::spawn(async move {
            if let Err(e) = serve_conn(stream, groups).await {
                tracing::debug!(%peer, error = %e, "raft connection closed");
            }
        });
    }
}

async fn serve_conn(mut s: TcpStream, groups: GroupTable) -> std::io::Result<()> {
    loop {
        let buf = match read_frame(&mut s).await {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                let reply = serde_json::to_vec(&RaftReply::Refused(e.to_string()))?;
                write_frame(&mut s, &reply).await?;
                return Err(e);
            }
            Err(e) => return Err(e),
        };
        let frame: RaftFrame = match serde_json::from_slice(&buf) {
            Ok(f) => f,
            Err(e) => {
                let msg = format!("not a raft frame: {e}");
                let reply = serde_json::to_vec(&RaftReply::Refused(msg.clone()))?;
                write_frame(&mut s, &reply).await?;
                return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, msg));
            }
        };
        let raft = groups
            .read()
            .expect("group table")
            .get(&frame.group)
            .cloned();
        let reply = match raft {
            None => RaftReply::Refused(format!("this process does not host group {}", frame.group)),
            Some(raft) => match frame.rpc {
                RaftRpc::AppendEntries(r) => RaftReply::AppendEntries(raft.append_entries(r).await),
                RaftRpc::Vote(r) => RaftReply::Vote(raft.vote(r).await),
                RaftRpc::InstallSnapshot(r) => {
                    RaftReply::InstallSnapshot(raft.install_snapshot(r).await)
                }
            },
        };
        let reply = serde_json::to_vec(&reply)?;
        write_frame(&mut s, &reply).await?;
    }
}

/// Idle connections to peers, by address, shared by every group of the process. openraft
/// makes a new network client for each leadership check (each batched read round), so without
/// reuse every round would open a TCP connection per follower.
#[derive(Clone, Default)]
pub struct ConnPool {
    idle: Arc<std::sync::Mutex<HashMap<String, Vec<TcpStream>>>>,
}

/// Idle connections kept per peer address.
const IDLE_PER_PEER: usize = 16;

impl ConnPool {
    fn take(&self, addr: &str) -> Option<TcpStream> {
        self.idle
            .lock()
            .expect("pool")
            .get_mut(addr)
            .and_then(Vec::pop)
    }

    fn put(&self, addr: &str, s: TcpStream) {
        let mut idle = self.idle.lock().expect("pool");
        let v = idle.entry(addr.to_string()).or_default();
        if v.len() < IDLE_PER_PEER {
            v.push(s);
        }
    }
}

/// Makes the connections of one group to its peers.
#[derive(Clone)]
pub struct GroupNetwork {
    pub group: GroupId,
    pub pool: ConnPool,
}

impl RaftNetworkFactory<TypeConfig> for GroupNetwork {
    type Network = PeerConnection;

    async fn new_client(&mut self, target: NodeId, node: &MemberAddr) -> PeerConnection {
        PeerConnection {
            group: self.group.clone(),
            target,
            addr: node.raft_addr.clone(),
            conn: None,
            pool: self.pool.clone(),
        }
    }
}

/// One connection to a peer for one group (openraft makes one per replication stream).
pub struct PeerConnection {
    group: GroupId,
    target: NodeId,
    addr: String,
    conn: Option<TcpStream>,
    pool: ConnPool,
}

impl Drop for PeerConnection {
    fn drop(&mut self) {
        // Only a connection whose last exchange completed goes back (others were dropped).
        if let Some(s) = self.conn.take() {
            self.pool.put(&self.addr, s);
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct PeerError(String);

impl PeerConnection {
    async fn call(
        &mut self,
        rpc: RaftRpc,
        ttl: Duration,
    ) -> Result<RaftReply, RPCError<NodeId, MemberAddr, RaftError<NodeId>>> {
        let payload = serde_json::to_vec(&RaftFrame {
            group: self.group.clone(),
            rpc,
        })
        .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        if payload.len() > MAX_FRAME {
            return Err(RPCError::Network(NetworkError::new(&PeerError(format!(
                "raft frame of {} bytes over the limit",
                payload.len()
            )))));
        }
        let res = tokio::time::timeout(ttl, async {
            // A pooled connection may have died with its peer (restart): then try once more
            // on a fresh one. Raft messages may be delivered twice.
            for attempt in 0..2 {
                let mut fresh = false;
                if self.conn.is_none() {
                    self.conn = if attempt == 0 {
                        self.pool.take(&self.addr)
                    } else {
                        None
                    };
                }
                if self.conn.is_none() {
                    let s = TcpStream::connect(&self.addr).await?;
                    s.set_nodelay(true)?;
                    self.conn = Some(s);
                    fresh = true;
                }
                let s = self.conn.as_mut().expect("connected above");
                let r = async {
                    write_frame(s, &payload).await?;
                    read_frame(s).await
                }
                .await;
                match r {
                    Ok(b) => return Ok(b),
                    Err(e) if fresh || attempt == 1 => return Err(e),
                    Err(_) => self.conn = None,
                }
            }
            unreachable!("the second attempt returns")
        })
        .await;
        let buf = match res {
            Ok(Ok(b)) => b,
            Ok(Err(e)) => {
                self.conn = None;
                return Err(RPCError::Unreachable(Unreachable::new(&e)));
            }
            Err(_) => {
                // A reply may still arrive on this connection: never reuse it.
                self.conn = None;
                let e = PeerError(format!("no reply from {} within {ttl:?}", self.addr));
                return Err(RPCError::Unreachable(Unreachable::new(&e)));
            }
        };
        match serde_json::from_slice::<RaftReply>(&buf) {
            Ok(RaftReply::Refused(why)) => {
                self.conn = None;
                Err(RPCError::Network(NetworkError::new(&PeerError(why))))
            }
            Ok(r) => Ok(r),
            Err(e) => {
                self.conn = None;
                Err(RPCError::Network(NetworkError::new(&e)))
            }
        }
    }

    fn unexpected<E: std::error::Error>(&self) -> RPCError<NodeId, MemberAddr, E> {
        RPCError::Network(NetworkError::new(&PeerError(
            "reply of the wrong kind".into(),
        )))
    }
}

fn retag<E: std::error::Error>(
    e: RPCError<NodeId, MemberAddr, RaftError<NodeId>>,
) -> RPCError<NodeId, MemberAddr, E> {
    match e {
        RPCError::Unreachable(u) => RPCError::Unreachable(u),
        RPCError::Network(n) => RPCError::Network(n),
        other => RPCError::Network(NetworkError::new(&PeerError(other.to_string()))),
    }
}

impl RaftNetwork<TypeConfig> for PeerConnection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, MemberAddr, RaftError<NodeId>>>
    {
        match self
            .call(RaftRpc::AppendEntries(rpc), option.hard_ttl())
            .await?
        {
            RaftReply::AppendEntries(Ok(r)) => Ok(r),
            RaftReply::AppendEntries(Err(e)) => {
                Err(RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            _ => Err(self.unexpected()),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, MemberAddr, RaftError<NodeId, InstallSnapshotError>>,
    > {
        match self
            .call(RaftRpc::InstallSnapshot(rpc), option.hard_ttl())
            .await
            .map_err(retag)?
        {
            RaftReply::InstallSnapshot(Ok(r)) => Ok(r),
            RaftReply::InstallSnapshot(Err(e)) => {
                Err(RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            _ => Err(self.unexpected()),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, MemberAddr, RaftError<NodeId>>> {
        match self.call(RaftRpc::Vote(rpc), option.hard_ttl()).await? {
            RaftReply::Vote(Ok(r)) => Ok(r),
            RaftReply::Vote(Err(e)) => Err(RPCError::RemoteError(RemoteError::new(self.target, e))),
            _ => Err(self.unexpected()),
        }
    }

    fn backoff(&self) -> openraft::network::Backoff {
        // A dead peer is retried quickly enough that a restarted member catches up soon.
        openraft::network::Backoff::new(std::iter::repeat(Duration::from_millis(200)))
    }
}
