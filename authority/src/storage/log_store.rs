//! The Raft log and vote of one group, on an append-only CRC-framed file.
//!
//! Entries are kept in memory too (the log is bounded by snapshots and purging), so reads
//! never touch the disk. Every write goes through one writer thread, which keeps them in
//! order (openraft requires vote and log I/O to be serialised) and fsyncs once per batch of
//! appends that queued up meanwhile: that is the group commit that makes batching pay.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::ops::{Bound, RangeBounds};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{OptionalSend, RaftLogReader, StorageIOError};
use serde::{Deserialize, Serialize};

use super::file::{encode_record, read_atomic, sync_dir, write_atomic, RecordReader};
use crate::types::{Entry, LogId, StorageError, TypeConfig, Vote};

#[derive(Serialize, Deserialize)]
enum LogRecord {
    Entry(Entry),
    /// Entries from this index on are gone.
    Truncate(u64),
    /// Entries up to and including this id are gone.
    Purge(LogId),
}

type Done = Box<dyn FnOnce(io::Result<()>) + Send>;

enum WriteJob {
    /// Append bytes to the log file, fsync, then call `done`.
    Append { bytes: Vec<u8>, done: Done },
    /// Replace the log file with `bytes` (compaction).
    Rewrite { bytes: Vec<u8>, done: Done },
    /// Replace the vote file.
    Vote { bytes: Vec<u8>, done: Done },
}

#[derive(Default)]
struct LogMem {
    entries: BTreeMap<u64, Entry>,
    last_purged: Option<LogId>,
    vote: Option<Vote>,
    /// Records in the file that are no longer live; compaction when it grows.
    dead_records: usize,
}

struct Inner {
    mem: Mutex<LogMem>,
    writer: Mutex<mpsc::Sender<WriteJob>>,
}

/// The log store of one group. Cheap to clone; clones share the same log (the log reader
/// given to replication tasks is a clone).
#[derive(Clone)]
pub struct LogStore {
    inner: Arc<Inner>,
}

fn io_err(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

fn write_err(e: io::Error) -> StorageError {
    StorageIOError::write_logs(&e).into()
}

impl LogStore {
    /// Open (or create) the log in `dir`, replaying the file and cutting off a torn tail.
    pub fn open(dir: &Path) -> io::Result<LogStore> {
        std::fs::create_dir_all(dir)?;
        let log_path = dir.join("log");
        let vote_path = dir.join("vote");
        let mut mem = LogMem::default();
        let data = read_atomic(&log_path)?.unwrap_or_default();
        let mut reader = RecordReader::new(&data);
        let mut records = 0usize;
        for payload in reader.by_ref() {
            records += 1;
            match serde_json::from_slice::<LogRecord>(payload).map_err(io_err)? {
                LogRecord::Entry(e) => {
                    mem.entries.insert(e.log_id.index, e);
                }
                LogRecord::Truncate(since) => {
                    mem.entries.split_off(&since);
                }
                LogRecord::Purge(id) => {
                    mem.entries = mem.entries.split_off(&(id.index + 1));
                    mem.last_purged = Some(id);
                }
            }
        }
        mem.dead_records = records.saturating_sub(mem.entries.len());
        let good = reader.good_len();
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)?;
        if good < data.len() {
            tracing::warn!(path = %log_path.display(), good, len = data.len(), "cutting torn log tail");
            file.set_len(good as u64)?;
            file.sync_all()?;
        }
        sync_dir(&log_path)?;
        if let Some(v) = read_atomic(&vote_path)? {
            mem.vote = Some(serde_json::from_slice(&v).map_err(io_err)?);
        }
        let (tx, rx) = mpsc::channel();
        let path = log_path.clone();
        std::thread::Builder::new()
            .name("authority-log".into())
            .spawn(move || writer_loop(rx, file, path, vote_path))?;
        Ok(LogStore {
            inner: Arc::new(Inner {
                mem: Mutex::new(mem),
                writer: Mutex::new(tx),
            }),
        })
    }

    fn send(&self, job: WriteJob) -> Result<(), StorageError> {
        self.inner
            .writer
            .lock()
            .expect("writer lock")
            .send(job)
            .map_err(|_| write_err(io_err("log writer thread is gone")))
    }

    /// Queue a job and wait until it is durable.
    async fn write_sync(&self, make: impl FnOnce(Done) -> WriteJob) -> Result<(), StorageError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.send(make(Box::new(move |r| {
            let _ = tx.send(r);
        })))?;
        rx.await
            .map_err(|_| write_err(io_err("log writer thread is gone")))?
            .map_err(write_err)
    }

    fn encode(records: &[LogRecord]) -> Result<Vec<u8>, StorageError> {
        let mut out = Vec::new();
        for r in records {
            let payload = serde_json::to_vec(r).map_err(|e| write_err(io_err(e)))?;
            encode_record(&mut out, &payload);
        }
        Ok(out)
    }

    /// Number of live entries held (for tests of log bounding).
    pub fn live_entries(&self) -> usize {
        self.inner.mem.lock().expect("mem lock").entries.len()
    }
}

fn writer_loop(rx: mpsc::Receiver<WriteJob>, mut file: File, path: PathBuf, vote_path: PathBuf) {
    while let Ok(first) = rx.recv() {
        let mut job = Some(first);
        while let Some(j) = job.take() {
            match j {
                WriteJob::Append { bytes, done } => {
                    // Group commit: take every append already queued, one fsync for all.
                    let mut dones = vec![done];
                    let mut res = file.write_all(&bytes);
                    loop {
                        match rx.try_recv() {
                            Ok(WriteJob::Append { bytes, done }) => {
                                if res.is_ok() {
                                    res = file.write_all(&bytes);
                                }
                                dones.push(done);
                            }
                            Ok(other) => {
                                job = Some(other);
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                    let res = res.and_then(|_| file.sync_data());
                    for d in dones {
                        d(res
                            .as_ref()
                            .map(|_| ())
                            .map_err(|e| io::Error::new(e.kind(), e.to_string())));
                    }
                }
                WriteJob::Rewrite { bytes, done } => {
                    let res = write_atomic(&path, &bytes).and_then(|_| {
                        file = OpenOptions::new().append(true).open(&path)?;
                        Ok(())
                    });
                    done(res);
                }
                WriteJob::Vote { bytes, done } => done(write_atomic(&vote_path, &bytes)),
            }
        }
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let mem = self.inner.mem.lock().expect("mem lock");
        let start = match range.start_bound() {
            Bound::Included(s) => Bound::Included(*s),
            Bound::Excluded(s) => Bound::Excluded(*s),
            Bound::Unbounded => Bound::Unbounded,
        };
        let end = match range.end_bound() {
            Bound::Included(s) => Bound::Included(*s),
            Bound::Excluded(s) => Bound::Excluded(*s),
            Bound::Unbounded => Bound::Unbounded,
        };
        Ok(mem
            .entries
            .range((start, end))
            .map(|(_, e)| e.clone())
            .collect())
    }

    async fn limited_get_log_entries(
        &mut self,
        start: u64,
        end: u64,
    ) -> Result<Vec<Entry>, StorageError> {
        // Bounded so one replication message stays far below the network's frame limit.
        let mem = self.inner.mem.lock().expect("mem lock");
        Ok(mem
            .entries
            .range(start..end)
            .take(4096)
            .map(|(_, e)| e.clone())
            .collect())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let mem = self.inner.mem.lock().expect("mem lock");
        let last = mem
            .entries
            .values()
            .next_back()
            .map(|e| e.log_id)
            .or(mem.last_purged);
        Ok(LogState {
            last_purged_log_id: mem.last_purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> LogStore {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        let bytes = serde_json::to_vec(vote).map_err(|e| write_err(io_err(e)))?;
        self.write_sync(|done| WriteJob::Vote { bytes, done })
            .await?;
        self.inner.mem.lock().expect("mem lock").vote = Some(*vote);
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        Ok(self.inner.mem.lock().expect("mem lock").vote)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        let records: Vec<LogRecord> = entries.iter().cloned().map(LogRecord::Entry).collect();
        let bytes = Self::encode(&records)?;
        {
            // Readable as soon as append returns; durable when the callback fires.
            let mut mem = self.inner.mem.lock().expect("mem lock");
            for e in entries {
                mem.entries.insert(e.log_id.index, e);
            }
        }
        self.send(WriteJob::Append {
            bytes,
            done: Box::new(move |r| callback.log_io_completed(r)),
        })
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let bytes = Self::encode(&[LogRecord::Truncate(log_id.index)])?;
        {
            let mut mem = self.inner.mem.lock().expect("mem lock");
            let gone = mem.entries.split_off(&log_id.index);
            mem.dead_records += gone.len() + 1;
        }
        self.write_sync(|done| WriteJob::Append { bytes, done })
            .await
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let rewrite = {
            let mut mem = self.inner.mem.lock().expect("mem lock");
            let keep = mem.entries.split_off(&(log_id.index + 1));
            mem.dead_records += mem.entries.len() + 1;
            mem.entries = keep;
            mem.last_purged = Some(log_id);
            if mem.dead_records > 1024 && mem.dead_records > mem.entries.len() {
                // Compact: the file holds only the purge mark and the live entries.
                let mut records = vec![LogRecord::Purge(log_id)];
                records.extend(mem.entries.values().cloned().map(LogRecord::Entry));
                mem.dead_records = 0;
                Some(records)
            } else {
                None
            }
        };
        match rewrite {
            Some(records) => {
                let bytes = Self::encode(&records)?;
                self.write_sync(|done| WriteJob::Rewrite { bytes, done })
                    .await
            }
            None => {
                let bytes = Self::encode(&[LogRecord::Purge(log_id)])?;
                self.write_sync(|done| WriteJob::Append { bytes, done })
                    .await
            }
        }
    }
}
