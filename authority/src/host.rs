//! The groups one `authority` process hosts (the global group and each site's), started on
//! their stores and wired to the Raft listener.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::net::TcpListener;

use crate::config::AuthorityConfig;
use crate::error::AuthError;
use crate::group::{Group, LeaseTiming};
use crate::network::{self, GroupNetwork, GroupTable};
use crate::storage::{LogStore, StateMachineStore};
use crate::types::{GroupId, Raft};

/// Every group of this process, by id.
pub struct Host {
    pub config: AuthorityConfig,
    pub groups: BTreeMap<GroupId, Arc<Group>>,
    table: GroupTable,
    raft_task: tokio::task::JoinHandle<()>,
}

impl Host {
    /// Open every group's store, start its Raft instance, serve Raft traffic, and initialise
    /// the groups if this is the first start of the lowest-numbered member.
    pub async fn start(config: AuthorityConfig) -> anyhow::Result<Arc<Host>> {
        config.validate().map_err(anyhow::Error::msg)?;
        let raft_config = Arc::new(
            openraft::Config {
                cluster_name: "tandem-authority".into(),
                heartbeat_interval: config.heartbeat_ms,
                election_timeout_min: config.election_timeout_min_ms,
                election_timeout_max: config.election_timeout_max_ms,
                snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(config.snapshot_every),
                max_in_snapshot_log_to_keep: config.log_keep,
                snapshot_max_chunk_size: 1 << 20,
                max_payload_entries: 1024,
                ..Default::default()
            }
            .validate()?,
        );
        let timing = LeaseTiming {
            lease: Duration::from_millis(config.lease_ms),
            drift_margin: Duration::from_millis(config.drift_margin_ms),
        };
        let table: GroupTable = Arc::new(RwLock::new(HashMap::new()));
        let mut groups = BTreeMap::new();
        let ids =
            std::iter::once(GroupId::Global).chain(config.sites.iter().cloned().map(GroupId::Site));
        for id in ids {
            let dir = config.data_dir.join(id.dir_name());
            let log = LogStore::open(&dir)?;
            let sm = StateMachineStore::open(&dir)?;
            let state = sm.shared();
            let raft = Raft::new(
                config.node_id,
                raft_config.clone(),
                GroupNetwork { group: id.clone() },
                log.clone(),
                sm,
            )
            .await?;
            table
                .write()
                .expect("group table")
                .insert(id.clone(), raft.clone());
            groups.insert(
                id.clone(),
                Group::new(id, config.node_id, raft, state, log, timing),
            );
        }
        let listener = TcpListener::bind(&config.raft_addr).await?;
        let raft_task = tokio::spawn(network::serve(listener, table.clone()));

        let members = config.initial_members();
        let lowest = members
            .iter()
            .map(|m| m.id)
            .min()
            .expect("at least one member");
        if lowest == config.node_id {
            let map: BTreeMap<_, _> = members.iter().map(|m| (m.id, m.addr())).collect();
            for g in groups.values() {
                if !g.raft.is_initialized().await? {
                    tracing::info!(group = %g.id, members = ?map.keys(), "initialising group");
                    g.raft.initialize(map.clone()).await?;
                }
            }
        }
        Ok(Arc::new(Host {
            config,
            groups,
            table,
            raft_task,
        }))
    }

    pub fn group(&self, id: &GroupId) -> Result<&Arc<Group>, AuthError> {
        self.groups.get(id).ok_or_else(|| match id {
            GroupId::Global => AuthError::Unavailable {
                reason: "this process does not host the global group".into(),
            },
            GroupId::Site(s) => AuthError::UnknownSite { site: s.clone() },
        })
    }

    pub fn site(&self, site: &str) -> Result<&Arc<Group>, AuthError> {
        self.group(&GroupId::Site(site.to_string()))
    }

    /// Stop every group (tests and orderly shutdown).
    pub async fn shutdown(&self) {
        self.raft_task.abort();
        self.table.write().expect("group table").clear();
        for g in self.groups.values() {
            let _ = g.raft.shutdown().await;
        }
    }
}
