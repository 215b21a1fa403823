//! Everything the replicator needs from the authority, behind one trait.
//!
//! The methods and errors mirror the tier-2 part of the authority contract
//! (`notes/authority-contract.md`). [`client::ClientAuthority`] implements it on the real
//! authority's client (`authority::client::AuthorityClient`); unit tests of one layer use
//! `fake::FakeAuthority` (compiled for this crate's unit tests only).

use serde::{Deserialize, Serialize};
use std::future::Future;
use std::pin::Pin;
use thiserror::Error;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

// The authority's own answer types: one definition for both sides of the contract.
pub use authority::api::{VolumeInfo, VolumeServerInfo as ServerEntry};

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct LeaseGrant {
    pub epoch: u64,
    pub generation: u64,
    pub lease_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FailoverOutcome {
    pub primary: String,
    pub epoch: u64,
}

/// The contract's error codes, with their structured data.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum AuthorityError {
    #[error("not the authority leader (leader: {leader_addr:?})")]
    NotLeader { leader_addr: Option<String> },
    #[error("stale epoch: newer is generation {generation}, epoch {epoch}")]
    StaleEpoch { epoch: u64, generation: u64 },
    #[error("lease held by {holder}, retry after {retry_after_ms} ms")]
    LeaseHeld { holder: String, retry_after_ms: u64 },
    #[error("server {server_id} is not in sync")]
    NotInSync { server_id: String },
    #[error("unknown site")]
    UnknownSite,
    #[error("unknown volume")]
    UnknownVolume,
    #[error("unknown device")]
    UnknownDevice,
    #[error("unknown server")]
    UnknownServer,
    #[error("not the designated primary (primary: {primary:?})")]
    NotPrimary { primary: Option<String> },
    #[error("transaction conflict {txn_id}")]
    TxnConflict { txn_id: String },
    /// The authority could not be reached or answered something outside the contract.
    #[error("authority unavailable: {0}")]
    Unavailable(String),
    /// A JSON-RPC error outside the contract's list (parse, invalid params, ...).
    #[error("authority error {code}: {message}")]
    Other { code: i64, message: String },
}

/// The tier-2 methods the replicator calls. Object-safe (boxed futures) so a server holds an
/// `Arc<dyn Authority>` and tests swap implementations.
pub trait Authority: Send + Sync + 'static {
    fn server_register<'a>(
        &'a self,
        site: &'a str,
        server_id: &'a str,
        data_addr: &'a str,
        admin_addr: &'a str,
    ) -> BoxFuture<'a, Result<(), AuthorityError>>;

    fn server_heartbeat<'a>(
        &'a self,
        site: &'a str,
        server_id: &'a str,
        health: serde_json::Value,
    ) -> BoxFuture<'a, Result<(), AuthorityError>>;

    fn volume_get<'a>(
        &'a self,
        site: &'a str,
        volume: &'a str,
    ) -> BoxFuture<'a, Result<VolumeInfo, AuthorityError>>;

    fn lease_acquire<'a>(
        &'a self,
        site: &'a str,
        volume: &'a str,
        server_id: &'a str,
    ) -> BoxFuture<'a, Result<LeaseGrant, AuthorityError>>;

    fn lease_renew<'a>(
        &'a self,
        site: &'a str,
        volume: &'a str,
        server_id: &'a str,
        epoch: u64,
    ) -> BoxFuture<'a, Result<LeaseGrant, AuthorityError>>;

    fn lease_release<'a>(
        &'a self,
        site: &'a str,
        volume: &'a str,
        server_id: &'a str,
        epoch: u64,
    ) -> BoxFuture<'a, Result<(), AuthorityError>>;

    fn volume_set_in_sync<'a>(
        &'a self,
        site: &'a str,
        volume: &'a str,
        server_id: &'a str,
        in_sync: bool,
        epoch: u64,
    ) -> BoxFuture<'a, Result<VolumeInfo, AuthorityError>>;

    fn failover_request<'a>(
        &'a self,
        site: &'a str,
        volume: &'a str,
        reason: &'a str,
        force: bool,
    ) -> BoxFuture<'a, Result<FailoverOutcome, AuthorityError>>;
}

pub mod client;
#[cfg(test)]
pub mod fake;
