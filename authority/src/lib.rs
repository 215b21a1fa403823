//! Tandem's authority: Raft groups (openraft) that decide which volume of a device accepts
//! writes (tier 1, the global group) and which server is a volume's primary (tier 2, one
//! group per site), with leases and epochs. See docs/authority.md.

pub mod api;
pub mod client;
pub mod config;
pub mod coordinator;
pub mod daemon;
pub mod error;
pub mod group;
pub mod history;
pub mod host;
pub mod lease;
pub mod network;
pub mod rpc;
pub mod state;
pub mod storage;
pub mod txn;
pub mod types;

pub use error::AuthError;
