//! The daemon's configuration (a JSON file, or the embedded default).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::types::{MemberAddr, NodeId};

/// One member of every group, as listed in the configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberConfig {
    pub id: NodeId,
    pub raft_addr: String,
    pub rpc_addr: String,
}

impl MemberConfig {
    pub fn addr(&self) -> MemberAddr {
        MemberAddr {
            raft_addr: self.raft_addr.clone(),
            rpc_addr: self.rpc_addr.clone(),
        }
    }
}

/// Configuration of one `authority` process.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthorityConfig {
    /// This process's member id (the same in every group).
    pub node_id: NodeId,
    /// Each group keeps its log, vote and snapshot under `data_dir/<group>/`.
    pub data_dir: PathBuf,
    /// JSON-RPC over TCP.
    pub rpc_addr: String,
    /// Raft traffic between members: the address peers connect to (as in `members`).
    pub raft_addr: String,
    /// Where to listen for Raft traffic, if not `raft_addr` (behind a proxy or NAT, or the
    /// tests' fault-injecting relay, which peers reach at `raft_addr`).
    pub raft_listen_addr: Option<String>,
    /// JSON-RPC over a Unix socket (none if absent).
    pub unix_socket: Option<PathBuf>,
    /// The sites; one tier-2 group each, beside the global group.
    pub sites: Vec<String>,
    /// The initial members of every group. The member with the lowest id initialises the
    /// groups on first start; empty means "this process alone". A process whose `node_id` is
    /// not listed joins an existing group: it waits until a member adds it.
    pub members: Vec<MemberConfig>,
    /// Length of a primary lease.
    pub lease_ms: u64,
    /// How much earlier than the lease a holder stops, and how much longer than it the
    /// authority waits, to cover monotonic clocks that run at slightly different rates.
    pub drift_margin_ms: u64,
    pub heartbeat_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    /// Build a snapshot (and purge the log it covers) after this many entries.
    pub snapshot_every: u64,
    /// Entries kept in the log behind the last snapshot (for slow followers).
    pub log_keep: u64,
    /// A cross-group transaction still open after this long is finished by the global
    /// group's leader (its coordinator is presumed dead).
    pub txn_recovery_after_ms: u64,
}

impl Default for AuthorityConfig {
    fn default() -> Self {
        AuthorityConfig {
            node_id: 1,
            data_dir: PathBuf::from("/var/lib/tandem/authority"),
            rpc_addr: "127.0.0.1:7300".into(),
            raft_addr: "127.0.0.1:7301".into(),
            raft_listen_addr: None,
            unix_socket: Some(PathBuf::from("/var/tmp/tandem-authority.sock")),
            sites: vec!["site-a".into(), "site-b".into()],
            members: Vec::new(),
            lease_ms: 2000,
            drift_margin_ms: 200,
            heartbeat_ms: 100,
            election_timeout_min_ms: 500,
            election_timeout_max_ms: 1000,
            snapshot_every: 10_000,
            log_keep: 1000,
            txn_recovery_after_ms: 5000,
        }
    }
}

impl AuthorityConfig {
    /// The initial membership: the configured members, or this process alone.
    pub fn initial_members(&self) -> Vec<MemberConfig> {
        if self.members.is_empty() {
            vec![MemberConfig {
                id: self.node_id,
                raft_addr: self.raft_addr.clone(),
                rpc_addr: self.rpc_addr.clone(),
            }]
        } else {
            self.members.clone()
        }
    }

    /// Refuse configurations that cannot work, with a reason.
    pub fn validate(&self) -> Result<(), String> {
        if self.drift_margin_ms * 2 >= self.lease_ms {
            return Err(format!(
                "drift_margin_ms ({}) must be less than half of lease_ms ({})",
                self.drift_margin_ms, self.lease_ms
            ));
        }
        if self.heartbeat_ms == 0 || self.election_timeout_min_ms <= self.heartbeat_ms {
            return Err("election_timeout_min_ms must be greater than heartbeat_ms > 0".into());
        }
        if self.election_timeout_max_ms <= self.election_timeout_min_ms {
            return Err(
                "election_timeout_max_ms must be greater than election_timeout_min_ms".into(),
            );
        }
        let mut sites = self.sites.clone();
        sites.sort();
        sites.dedup();
        if sites.len() != self.sites.len() || self.sites.iter().any(|s| s.is_empty()) {
            return Err("sites must be distinct non-empty names".into());
        }
        // A node_id not among `members` is a joining member: it never initialises a group
        // and waits to be added (cluster_add_learner, cluster_change_membership).
        if self.members.iter().any(|x| {
            x.id == self.node_id && (x.rpc_addr != self.rpc_addr || x.raft_addr != self.raft_addr)
        }) {
            return Err(format!(
                "member {}'s addresses in `members` differ from rpc_addr/raft_addr",
                self.node_id
            ));
        }
        Ok(())
    }
}
