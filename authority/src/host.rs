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

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("bad configuration: {0}")]
    Config(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("raft: {0}")]
    Raft(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> StartError {
    let what = what.into();
    move |source| StartError::Io { what, source }
}

fn raft_err(e: impl std::fmt::Display) -> StartError {
    StartError::Raft(e.to_string())
}

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
    pub async fn start(config: AuthorityConfig) -> Result<Arc<Host>, StartError> {
        config.validate().map_err(StartError::Config)?;
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
            .validate()
            .map_err(|e| StartError::Config(e.to_string()))?,
        );
        let timing = LeaseTiming {
            lease: Duration::from_millis(config.lease_ms),
            drift_margin: Duration::from_millis(config.drift_margin_ms),
        };
        let table: GroupTable = Arc::new(RwLock::new(HashMap::new()));
        let pool = network::ConnPool::default();
        let mut groups = BTreeMap::new();
        let ids =
            std::iter::once(GroupId::Global).chain(config.sites.iter().cloned().map(GroupId::Site));
        for id in ids {
            let dir = config.data_dir.join(id.dir_name());
            let log = LogStore::open(&dir).map_err(io(format!("open log in {}", dir.display())))?;
            let sm = StateMachineStore::open(&dir)
                .map_err(io(format!("open snapshot in {}", dir.display())))?;
            let state = sm.shared();
            let raft = Raft::new(
                config.node_id,
                raft_config.clone(),
                GroupNetwork {
                    group: id.clone(),
                    pool: pool.clone(),
                },
                log.clone(),
                sm,
            )
            .await
            .map_err(raft_err)?;
            table
                .write()
                .expect("group table")
                .insert(id.clone(), raft.clone());
            groups.insert(
                id.clone(),
                Group::new(id, config.node_id, raft, state, log, timing),
            );
        }
        let listen = config
            .raft_listen_addr
            .as_deref()
            .unwrap_or(&config.raft_addr);
        let listener = TcpListener::bind(listen)
            .await
            .map_err(io(format!("bind raft address {listen}")))?;
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
                if !g.raft.is_initialized().await.map_err(raft_err)? {
                    tracing::info!(group = %g.id, members = ?map.keys(), "initialising group");
                    g.raft.initialize(map.clone()).await.map_err(raft_err)?;
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
