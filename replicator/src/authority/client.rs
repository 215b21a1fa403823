//! [`Authority`] over the real authority's Rust client, `authority::client::AuthorityClient`:
//! one client implementation for the whole workspace. The client finds each group's leader,
//! follows `NotLeader` redirects, multiplexes calls on one connection per member and retries
//! (safely: every tier-2 method is idempotent or guarded by an epoch) until its deadline.
//!
//! What is translated here: the authority's `AuthError` into the replicator's
//! [`AuthorityError`], and its wire types into the replicator's. Lease timing is not taken
//! from the client's `LeaseGrant`: the replicator counts a lease from its own clock reading
//! taken before it called (`server::volume`), which is no later than the client's.

use super::*;
use authority::client::{AuthorityClient, ClientOptions};
use authority::AuthError;
use std::time::Duration;

/// The replicator's side of a real authority (one or more members).
pub struct ClientAuthority {
    client: AuthorityClient,
}

impl ClientAuthority {
    /// `members`: the authority members' JSON-RPC addresses. `call_timeout` bounds one call,
    /// retries included: a caller (a role loop, a renewal, a write waiting to mark a peer out
    /// of sync) gets `Unavailable` after it rather than waiting on an unreachable authority.
    pub fn new(members: Vec<String>, call_timeout: Duration) -> Self {
        assert!(!members.is_empty(), "at least one authority address");
        let opts = ClientOptions {
            deadline: call_timeout,
            attempt_timeout: call_timeout.min(Duration::from_secs(1)),
            ..ClientOptions::default()
        };
        Self {
            client: AuthorityClient::with_options(members, opts),
        }
    }
}

/// The authority's refusal as the replicator's error. The contract's codes map one to one;
/// the authority's additions (`AlreadyExists`, `NotImplemented`, invalid params, internal)
/// keep their code and message.
pub fn map_error(e: AuthError) -> AuthorityError {
    match e {
        AuthError::NotLeader { leader_addr } => AuthorityError::NotLeader { leader_addr },
        AuthError::StaleEpoch { epoch, generation } => {
            AuthorityError::StaleEpoch { epoch, generation }
        }
        AuthError::LeaseHeld {
            holder,
            retry_after_ms,
        } => AuthorityError::LeaseHeld {
            holder,
            retry_after_ms,
        },
        AuthError::NotInSync { server_id } => AuthorityError::NotInSync { server_id },
        AuthError::UnknownSite { .. } => AuthorityError::UnknownSite,
        AuthError::UnknownVolume { .. } => AuthorityError::UnknownVolume,
        AuthError::UnknownDevice { .. } => AuthorityError::UnknownDevice,
        AuthError::UnknownServer { .. } => AuthorityError::UnknownServer,
        AuthError::NotPrimary { primary } => AuthorityError::NotPrimary { primary },
        AuthError::TxnConflict { txn_id } => AuthorityError::TxnConflict { txn_id },
        AuthError::Unavailable { reason } => AuthorityError::Unavailable(reason),
        e @ (AuthError::AlreadyExists { .. }
        | AuthError::NotImplemented { .. }
        | AuthError::InvalidParams(_)
        | AuthError::Internal(_)) => AuthorityError::Other {
            code: e.code(),
            message: e.to_string(),
        },
    }
}

fn grant(g: authority::client::LeaseGrant) -> LeaseGrant {
    LeaseGrant {
        epoch: g.epoch,
        generation: g.generation,
        lease_ms: g.lease_ms,
    }
}

impl Authority for ClientAuthority {
    fn server_register<'a>(
        &'a self,
        site: &'a str,
        server_id: &'a str,
        data_addr: &'a str,
        admin_addr: &'a str,
    ) -> BoxFuture<'a, Result<(), AuthorityError>> {
        Box::pin(async move {
            self.client
                .server_register(site, server_id, data_addr, admin_addr)
                .await
                .map_err(map_error)
        })
    }

    fn server_heartbeat<'a>(
        &'a self,
        site: &'a str,
        server_id: &'a str,
        health: serde_json::Value,
    ) -> BoxFuture<'a, Result<(), AuthorityError>> {
        Box::pin(async move {
            self.client
                .server_heartbeat(site, server_id, health)
                .await
                .map_err(map_error)
        })
    }

    fn volume_get<'a>(
        &'a self,
        site: &'a str,
        volume: &'a str,
    ) -> BoxFuture<'a, Result<VolumeInfo, AuthorityError>> {
        Box::pin(async move {
            self.client
                .volume_get(site, volume)
                .await
                .map_err(map_error)
        })
    }

    fn lease_acquire<'a>(
        &'a self,
        site: &'a str,
        volume: &'a str,
        server_id: &'a str,
    ) -> BoxFuture<'a, Result<LeaseGrant, AuthorityError>> {
        Box::pin(async move {
            self.client
                .lease_acquire(site, volume, server_id)
                .await
                .map(grant)
                .map_err(map_error)
        })
    }

    fn lease_renew<'a>(
        &'a self,
        site: &'a str,
        volume: &'a str,
        server_id: &'a str,
        epoch: u64,
    ) -> BoxFuture<'a, Result<LeaseGrant, AuthorityError>> {
        Box::pin(async move {
            self.client
                .lease_renew(site, volume, server_id, epoch)
                .await
                .map(grant)
                .map_err(map_error)
        })
    }

    fn lease_release<'a>(
        &'a self,
        site: &'a str,
        volume: &'a str,
        server_id: &'a str,
        epoch: u64,
    ) -> BoxFuture<'a, Result<(), AuthorityError>> {
        Box::pin(async move {
            self.client
                .lease_release(site, volume, server_id, epoch)
                .await
                .map_err(map_error)
        })
    }

    fn volume_set_in_sync<'a>(
        &'a self,
        site: &'a str,
        volume: &'a str,
        server_id: &'a str,
        in_sync: bool,
        epoch: u64,
    ) -> BoxFuture<'a, Result<VolumeInfo, AuthorityError>> {
        Box::pin(async move {
            self.client
                .volume_set_in_sync(site, volume, server_id, in_sync, epoch)
                .await
                .map_err(map_error)
        })
    }

    fn failover_request<'a>(
        &'a self,
        site: &'a str,
        volume: &'a str,
        reason: &'a str,
        force: bool,
    ) -> BoxFuture<'a, Result<FailoverOutcome, AuthorityError>> {
        Box::pin(async move {
            // The client reads the current epoch first and sends it along, so a retry after a
            // lost answer returns the first failover's answer instead of failing over twice.
            self.client
                .failover_request(site, volume, reason, force)
                .await
                .map(|r| FailoverOutcome {
                    primary: r.primary,
                    epoch: r.epoch,
                })
                .map_err(map_error)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every refusal the authority can give lands on the replicator variant its code names
    /// (the code is what crosses the wire; `AuthError::from_rpc` is the client's decoder).
    #[test]
    fn every_authority_error_maps_by_its_code() {
        let cases = [
            (
                AuthError::NotLeader {
                    leader_addr: Some("a:1".into()),
                },
                AuthorityError::NotLeader {
                    leader_addr: Some("a:1".into()),
                },
            ),
            (
                AuthError::StaleEpoch {
                    epoch: 4,
                    generation: 2,
                },
                AuthorityError::StaleEpoch {
                    epoch: 4,
                    generation: 2,
                },
            ),
            (
                AuthError::LeaseHeld {
                    holder: "s1".into(),
                    retry_after_ms: 30,
                },
                AuthorityError::LeaseHeld {
                    holder: "s1".into(),
                    retry_after_ms: 30,
                },
            ),
            (
                AuthError::NotInSync {
                    server_id: "s2".into(),
                },
                AuthorityError::NotInSync {
                    server_id: "s2".into(),
                },
            ),
            (
                AuthError::UnknownSite { site: "x".into() },
                AuthorityError::UnknownSite,
            ),
            (
                AuthError::UnknownVolume { volume: "v".into() },
                AuthorityError::UnknownVolume,
            ),
            (
                AuthError::UnknownDevice { device: "d".into() },
                AuthorityError::UnknownDevice,
            ),
            (
                AuthError::UnknownServer {
                    server_id: "s9".into(),
                },
                AuthorityError::UnknownServer,
            ),
            (
                AuthError::NotPrimary {
                    primary: Some("s1".into()),
                },
                AuthorityError::NotPrimary {
                    primary: Some("s1".into()),
                },
            ),
            (
                AuthError::TxnConflict {
                    txn_id: "t1".into(),
                },
                AuthorityError::TxnConflict {
                    txn_id: "t1".into(),
                },
            ),
            (
                AuthError::Unavailable {
                    reason: "no quorum".into(),
                },
                AuthorityError::Unavailable("no quorum".into()),
            ),
        ];
        for (a, want) in cases {
            // Through the wire encoding, as the client sees it.
            let wire = AuthError::from_rpc(a.code(), &a.to_string(), &a.data());
            assert_eq!(map_error(wire), want, "{a:?}");
        }
        for a in [
            AuthError::AlreadyExists { what: "v".into() },
            AuthError::NotImplemented { what: "x".into() },
            AuthError::InvalidParams("bad".into()),
        ] {
            let code = a.code();
            match map_error(a) {
                AuthorityError::Other { code: c, .. } => assert_eq!(c, code),
                other => panic!("{other:?}"),
            }
        }
    }
}
