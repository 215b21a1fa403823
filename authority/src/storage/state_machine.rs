//! The state machine of one group (in memory) and its snapshots (on disk).
//!
//! The state is rebuilt at start from the last snapshot; openraft then re-applies the
//! committed log after it. A snapshot is written with fsync and an atomic rename before
//! openraft may purge the log it covers.

use std::io::{self, Cursor};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{EntryPayload, OptionalSend, RaftSnapshotBuilder, StorageIOError};
use serde::{Deserialize, Serialize};

use super::file::{read_atomic, write_atomic};
use crate::state::{CommandOutcome, GroupState};
use crate::types::{Entry, LogId, SnapshotMeta, StorageError, StoredMembership, TypeConfig};

/// What the state machine holds: the state plus what openraft needs to know about it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SmData {
    pub last_applied: Option<LogId>,
    pub membership: StoredMembership,
    pub state: GroupState,
}

/// The state, shared with the RPC layer for reads. One writer: the state machine.
pub type SharedState = Arc<RwLock<SmData>>;

#[derive(Serialize, Deserialize)]
struct SnapshotFile {
    meta: SnapshotMeta,
    data: Vec<u8>,
}

/// The state machine store of one group.
#[derive(Clone)]
pub struct StateMachineStore {
    data: SharedState,
    snapshot_path: PathBuf,
    snapshot_seq: Arc<std::sync::atomic::AtomicU64>,
}

fn read_err(e: impl std::fmt::Display) -> StorageError {
    StorageIOError::read_state_machine(&io::Error::other(e.to_string())).into()
}

fn snap_err(e: impl std::fmt::Display) -> StorageError {
    StorageIOError::write_snapshot(None, &io::Error::other(e.to_string())).into()
}

impl StateMachineStore {
    /// Open the state machine of the group in `dir`, from its last snapshot if any.
    pub fn open(dir: &Path) -> io::Result<StateMachineStore> {
        std::fs::create_dir_all(dir)?;
        let snapshot_path = dir.join("snapshot");
        let mut data = SmData::default();
        if let Some(bytes) = read_atomic(&snapshot_path)? {
            let file: SnapshotFile = serde_json::from_slice(&bytes).map_err(io::Error::other)?;
            data = serde_json::from_slice(&file.data).map_err(io::Error::other)?;
        }
        Ok(StateMachineStore {
            data: Arc::new(RwLock::new(data)),
            snapshot_path,
            snapshot_seq: Arc::new(Default::default()),
        })
    }

    pub fn shared(&self) -> SharedState {
        self.data.clone()
    }

    fn save(&self, meta: &SnapshotMeta, data: &[u8]) -> Result<(), StorageError> {
        let file = SnapshotFile {
            meta: meta.clone(),
            data: data.to_vec(),
        };
        let bytes = serde_json::to_vec(&file).map_err(snap_err)?;
        write_atomic(&self.snapshot_path, &bytes).map_err(snap_err)
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let (bytes, last_applied, membership) = {
            let d = self.data.read().expect("state lock");
            (
                serde_json::to_vec(&*d).map_err(snap_err)?,
                d.last_applied,
                d.membership.clone(),
            )
        };
        let seq = self
            .snapshot_seq
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let snapshot_id = match last_applied {
            Some(l) => format!("{}-{}-{seq}", l.leader_id.term, l.index),
            None => format!("none-{seq}"),
        };
        let meta = SnapshotMeta {
            last_log_id: last_applied,
            last_membership: membership,
            snapshot_id,
        };
        let this = self.clone();
        let (m2, b2) = (meta.clone(), bytes.clone());
        tokio::task::spawn_blocking(move || this.save(&m2, &b2))
            .await
            .map_err(snap_err)??;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(bytes)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = StateMachineStore;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        let d = self.data.read().expect("state lock");
        Ok((d.last_applied, d.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<CommandOutcome>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut d = self.data.write().expect("state lock");
        let mut out = Vec::new();
        for e in entries {
            debug_assert!(
                d.last_applied < Some(e.log_id),
                "the log is applied in order, once"
            );
            d.last_applied = Some(e.log_id);
            match e.payload {
                EntryPayload::Blank => out.push(Ok(crate::state::Outcome::Done)),
                EntryPayload::Normal(cmd) => out.push(d.state.apply(&cmd)),
                EntryPayload::Membership(m) => {
                    d.membership = StoredMembership::new(Some(e.log_id), m);
                    out.push(Ok(crate::state::Outcome::Done));
                }
            }
        }
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> StateMachineStore {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let bytes = snapshot.into_inner();
        let new: SmData = serde_json::from_slice(&bytes).map_err(read_err)?;
        let this = self.clone();
        let (m2, b2) = (meta.clone(), bytes.clone());
        tokio::task::spawn_blocking(move || this.save(&m2, &b2))
            .await
            .map_err(snap_err)??;
        let mut d = self.data.write().expect("state lock");
        *d = SmData {
            last_applied: meta.last_log_id,
            membership: meta.last_membership.clone(),
            state: new.state,
        };
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let bytes = match read_atomic(&self.snapshot_path).map_err(read_err)? {
            Some(b) => b,
            None => return Ok(None),
        };
        let file: SnapshotFile = serde_json::from_slice(&bytes).map_err(read_err)?;
        Ok(Some(Snapshot {
            meta: file.meta,
            snapshot: Box::new(Cursor::new(file.data)),
        }))
    }
}
