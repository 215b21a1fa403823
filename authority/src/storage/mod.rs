//! Durable storage of one group on plain files: the Raft log and vote ([`LogStore`]) and the
//! state machine with its snapshots ([`StateMachineStore`]).
//!
//! Layout of a group's directory:
//! - `log`: append-only records `[len u32 LE][crc32c u32 LE][JSON]`; a torn or corrupt tail is
//!   cut off at open (it was never acknowledged, since acknowledgement waits for fsync).
//! - `vote`: the last vote, replaced by write-to-temp, fsync, rename, fsync of the directory.
//! - `snapshot`: the last snapshot (meta + state), replaced the same way.

// openraft's traits return its `StorageError` (224 bytes); our helpers return the same type.
#![allow(clippy::result_large_err)]

mod file;
mod log_store;
mod state_machine;

pub use file::{read_atomic, write_atomic, RecordReader, MAX_RECORD};
pub use log_store::LogStore;
pub use state_machine::{SharedState, StateMachineStore};

#[cfg(test)]
mod tests;
