use openraft::storage::{RaftLogStorage, RaftLogStorageExt, RaftStateMachine};
use openraft::testing::{StoreBuilder, Suite};
use openraft::{CommittedLeaderId, EntryPayload, RaftLogReader, RaftSnapshotBuilder};

use super::*;
use crate::state::Command;
use crate::types::{Entry, LogId, StorageError, TypeConfig, Vote};

struct Builder;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, tempfile::TempDir> for Builder {
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, LogStore, StateMachineStore), StorageError> {
        let dir = tempfile::tempdir().unwrap();
        let log = LogStore::open(dir.path()).unwrap();
        let sm = StateMachineStore::open(dir.path()).unwrap();
        Ok((dir, log, sm))
    }
}

/// openraft's own conformance suite for log stores and state machines.
#[test]
fn openraft_storage_suite() {
    Suite::test_all(Builder).unwrap();
}

fn entry(term: u64, index: u64, site_server: &str) -> Entry {
    Entry {
        log_id: LogId::new(CommittedLeaderId::new(term, 1), index),
        payload: EntryPayload::Normal(Command::ServerRegister {
            server_id: site_server.into(),
            data_addr: "d".into(),
            admin_addr: "a".into(),
        }),
    }
}

async fn append(log: &mut LogStore, entries: Vec<Entry>) {
    log.blocking_append(entries).await.unwrap();
}

#[tokio::test]
async fn the_log_and_vote_survive_reopen_and_purge_bounds_the_file() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut log = LogStore::open(dir.path()).unwrap();
        log.save_vote(&Vote::new(3, 1)).await.unwrap();
        append(&mut log, (1..=3000).map(|i| entry(3, i, "s")).collect()).await;
        log.truncate(LogId::new(CommittedLeaderId::new(3, 1), 2901))
            .await
            .unwrap();
        log.purge(LogId::new(CommittedLeaderId::new(3, 1), 2800))
            .await
            .unwrap();
    }
    let size = std::fs::metadata(dir.path().join("log")).unwrap().len();
    let mut log = LogStore::open(dir.path()).unwrap();
    assert_eq!(log.read_vote().await.unwrap(), Some(Vote::new(3, 1)));
    let st = log.get_log_state().await.unwrap();
    assert_eq!(st.last_purged_log_id.map(|l| l.index), Some(2800));
    assert_eq!(st.last_log_id.map(|l| l.index), Some(2900));
    let got = log.try_get_log_entries(2801..2901).await.unwrap();
    assert_eq!(got.len(), 100);
    assert_eq!(log.live_entries(), 100);
    // Purging 2800 of 3000 entries compacted the file to about what is live.
    assert!(size < 100 * 1024, "log file not compacted: {size} bytes");
}

#[tokio::test]
async fn a_snapshot_restores_the_state_after_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut sm = StateMachineStore::open(dir.path()).unwrap();
        sm.apply(vec![entry(1, 1, "s1"), entry(1, 2, "s2")])
            .await
            .unwrap();
        let mut b = sm.get_snapshot_builder().await;
        b.build_snapshot().await.unwrap();
    }
    let mut sm = StateMachineStore::open(dir.path()).unwrap();
    let (applied, _) = sm.applied_state().await.unwrap();
    assert_eq!(applied.map(|l| l.index), Some(2));
    let st = sm.shared();
    let st = st.read().unwrap();
    assert!(st.state.servers.contains_key("s1") && st.state.servers.contains_key("s2"));
}
