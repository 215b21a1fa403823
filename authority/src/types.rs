//! The openraft type configuration shared by every group, and the names of groups and members.

use std::fmt;
use std::io::Cursor;

use serde::{Deserialize, Serialize};

use crate::state::{Command, CommandOutcome};

/// A member of a group. One `authority` process is the same member (same id, same addresses)
/// in every group it hosts, so the id names the process.
pub type NodeId = u64;

/// What a group records about each member: where its Raft traffic goes and where clients
/// should be redirected when it is the leader.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberAddr {
    pub raft_addr: String,
    pub rpc_addr: String,
}

impl fmt::Display for MemberAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "raft={} rpc={}", self.raft_addr, self.rpc_addr)
    }
}

openraft::declare_raft_types!(
    /// The Raft types of every authority group (tier 1 and tier 2 use one command set).
    pub TypeConfig:
        D = Command,
        R = CommandOutcome,
        NodeId = NodeId,
        Node = MemberAddr,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
);

pub type Raft = openraft::Raft<TypeConfig>;
pub type Entry = openraft::Entry<TypeConfig>;
pub type LogId = openraft::LogId<NodeId>;
pub type Vote = openraft::Vote<NodeId>;
pub type StorageError = openraft::StorageError<NodeId>;
pub type StoredMembership = openraft::StoredMembership<NodeId, MemberAddr>;
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, MemberAddr>;

/// Which group: the global one (tier 1) or one site's (tier 2).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum GroupId {
    Global,
    Site(String),
}

impl GroupId {
    /// The directory name of the group's data under the data directory.
    pub fn dir_name(&self) -> String {
        match self {
            GroupId::Global => "global".to_string(),
            GroupId::Site(s) => format!("site-{s}"),
        }
    }
}

impl fmt::Display for GroupId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GroupId::Global => f.write_str("global"),
            GroupId::Site(s) => write!(f, "site:{s}"),
        }
    }
}
