//! An in-process authority with the contract's tier-2 semantics, for unit tests of one layer
//! (the pipeline's) only. It is not a product: there is no Raft, no persistence, no daemon;
//! every multi-process test runs against the real authority instead.
//!
//! Semantics kept: a lease is granted only to the designated primary and only once the
//! previous holder's lease has run out; the epoch is bumped when the holder changes (a new
//! primary); `volume_set_in_sync` is refused for a stale epoch; `failover_request` picks an
//! in-sync secondary unless `force`.

use super::*;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug)]
struct Lease {
    holder: String,
    epoch: u64,
    expires: Instant,
}

#[derive(Debug)]
struct VolumeState {
    info: VolumeInfo,
    lease: Option<Lease>,
}

#[derive(Debug, Default)]
struct State {
    /// (site, server) -> (data_addr, admin_addr)
    servers: HashMap<(String, String), (String, String)>,
    volumes: HashMap<(String, String), VolumeState>,
    heartbeats: HashMap<(String, String), serde_json::Value>,
}

#[derive(Debug, Default)]
pub struct FakeAuthority {
    state: Mutex<State>,
}

impl FakeAuthority {
    pub fn new() -> Self {
        Self::default()
    }

    /// Creates a volume with its servers (registered or not yet) and designated primary.
    #[allow(clippy::too_many_arguments)]
    pub fn create_volume(
        &self,
        site: &str,
        volume: &str,
        size_bytes: u64,
        block_size: u32,
        lease_ms: u64,
        servers: &[&str],
        primary: &str,
        in_sync: &[&str],
    ) {
        let mut st = self.state.lock().unwrap();
        let entries = servers
            .iter()
            .map(|s| {
                let (d, a) = st
                    .servers
                    .get(&(site.to_owned(), s.to_string()))
                    .cloned()
                    .unwrap_or_default();
                ServerEntry {
                    server_id: s.to_string(),
                    data_addr: d,
                    admin_addr: a,
                    in_sync: in_sync.contains(s),
                }
            })
            .collect();
        st.volumes.insert(
            (site.to_owned(), volume.to_owned()),
            VolumeState {
                info: VolumeInfo {
                    site: site.to_owned(),
                    volume: volume.to_owned(),
                    device: format!("dev-{volume}"),
                    size_bytes,
                    block_size,
                    epoch: 1,
                    generation: 1,
                    primary: Some(primary.to_owned()),
                    lease_ms,
                    servers: entries,
                    lease_holder: None,
                    intent: None,
                },
                lease: None,
            },
        );
    }

    pub fn info(&self, site: &str, volume: &str) -> Option<VolumeInfo> {
        let st = self.state.lock().unwrap();
        st.volumes
            .get(&(site.to_owned(), volume.to_owned()))
            .map(|v| v.info.clone())
    }

    pub fn heartbeat_of(&self, site: &str, server: &str) -> Option<serde_json::Value> {
        let st = self.state.lock().unwrap();
        st.heartbeats
            .get(&(site.to_owned(), server.to_owned()))
            .cloned()
    }

    fn with_volume<T>(
        &self,
        site: &str,
        volume: &str,
        f: impl FnOnce(&mut VolumeState) -> Result<T, AuthorityError>,
    ) -> Result<T, AuthorityError> {
        let mut st = self.state.lock().unwrap();
        let v = st
            .volumes
            .get_mut(&(site.to_owned(), volume.to_owned()))
            .ok_or(AuthorityError::UnknownVolume)?;
        f(v)
    }

    pub fn do_register(&self, site: &str, id: &str, data: &str, admin: &str) {
        let mut st = self.state.lock().unwrap();
        st.servers.insert(
            (site.to_owned(), id.to_owned()),
            (data.to_owned(), admin.to_owned()),
        );
        for v in st.volumes.values_mut() {
            if v.info.site == site {
                for s in v.info.servers.iter_mut().filter(|s| s.server_id == id) {
                    s.data_addr = data.to_owned();
                    s.admin_addr = admin.to_owned();
                }
            }
        }
    }

    pub fn do_heartbeat(&self, site: &str, id: &str, health: serde_json::Value) {
        self.state
            .lock()
            .unwrap()
            .heartbeats
            .insert((site.to_owned(), id.to_owned()), health);
    }

    pub fn do_volume_get(&self, site: &str, volume: &str) -> Result<VolumeInfo, AuthorityError> {
        self.with_volume(site, volume, |v| Ok(v.info.clone()))
    }

    pub fn do_lease_acquire(
        &self,
        site: &str,
        volume: &str,
        server: &str,
    ) -> Result<LeaseGrant, AuthorityError> {
        self.with_volume(site, volume, |v| {
            if v.info.primary.as_deref() != Some(server) {
                return Err(AuthorityError::NotPrimary {
                    primary: v.info.primary.clone(),
                });
            }
            let now = Instant::now();
            if let Some(l) = &v.lease {
                if l.holder != server && l.expires > now {
                    return Err(AuthorityError::LeaseHeld {
                        holder: l.holder.clone(),
                        retry_after_ms: (l.expires - now).as_millis() as u64 + 1,
                    });
                }
            }
            // A new holder of the current epoch means a new primary: bump. After a
            // failover the epoch was already bumped and the old lease is of an older epoch.
            if let Some(l) = &v.lease {
                if l.holder != server && l.epoch == v.info.epoch {
                    v.info.epoch += 1;
                }
            }
            v.lease = Some(Lease {
                holder: server.to_owned(),
                epoch: v.info.epoch,
                expires: now + Duration::from_millis(v.info.lease_ms),
            });
            Ok(LeaseGrant {
                epoch: v.info.epoch,
                generation: v.info.generation,
                lease_ms: v.info.lease_ms,
            })
        })
    }

    pub fn do_lease_renew(
        &self,
        site: &str,
        volume: &str,
        server: &str,
        epoch: u64,
    ) -> Result<LeaseGrant, AuthorityError> {
        self.with_volume(site, volume, |v| {
            if epoch != v.info.epoch || v.info.primary.as_deref() != Some(server) {
                return Err(AuthorityError::StaleEpoch {
                    epoch: v.info.epoch,
                    generation: v.info.generation,
                });
            }
            let now = Instant::now();
            match &mut v.lease {
                Some(l) if l.holder == server && l.epoch == epoch => {
                    l.expires = now + Duration::from_millis(v.info.lease_ms);
                }
                _ => {
                    return Err(AuthorityError::StaleEpoch {
                        epoch: v.info.epoch,
                        generation: v.info.generation,
                    })
                }
            }
            Ok(LeaseGrant {
                epoch,
                generation: v.info.generation,
                lease_ms: v.info.lease_ms,
            })
        })
    }

    pub fn do_lease_release(
        &self,
        site: &str,
        volume: &str,
        server: &str,
        epoch: u64,
    ) -> Result<(), AuthorityError> {
        self.with_volume(site, volume, |v| {
            if v.lease
                .as_ref()
                .is_some_and(|l| l.holder == server && l.epoch == epoch)
            {
                v.lease = None;
            }
            Ok(())
        })
    }

    /// The current lease holder, if its lease has not run out.
    pub fn lease_holder(&self, site: &str, volume: &str) -> Option<String> {
        let st = self.state.lock().unwrap();
        st.volumes
            .get(&(site.to_owned(), volume.to_owned()))
            .and_then(|v| v.lease.as_ref())
            .filter(|l| l.expires > Instant::now())
            .map(|l| l.holder.clone())
    }

    pub fn do_set_in_sync(
        &self,
        site: &str,
        volume: &str,
        server: &str,
        in_sync: bool,
        epoch: u64,
    ) -> Result<VolumeInfo, AuthorityError> {
        self.with_volume(site, volume, |v| {
            if epoch != v.info.epoch {
                return Err(AuthorityError::StaleEpoch {
                    epoch: v.info.epoch,
                    generation: v.info.generation,
                });
            }
            let s = v
                .info
                .servers
                .iter_mut()
                .find(|s| s.server_id == server)
                .ok_or(AuthorityError::UnknownServer)?;
            s.in_sync = in_sync;
            Ok(v.info.clone())
        })
    }

    pub fn do_failover(
        &self,
        site: &str,
        volume: &str,
        force: bool,
    ) -> Result<FailoverOutcome, AuthorityError> {
        self.with_volume(site, volume, |v| {
            let old = v.info.primary.clone();
            let pick = v
                .info
                .servers
                .iter()
                .find(|s| Some(&s.server_id) != old.as_ref() && (s.in_sync || force))
                .map(|s| s.server_id.clone())
                .ok_or_else(|| AuthorityError::NotInSync {
                    server_id: "no in-sync secondary".into(),
                })?;
            v.info.primary = Some(pick.clone());
            v.info.epoch += 1;
            // The old primary is no longer known to be in sync with the new one.
            for s in v.info.servers.iter_mut() {
                if Some(&s.server_id) == old.as_ref() {
                    s.in_sync = false;
                }
            }
            Ok(FailoverOutcome {
                primary: pick,
                epoch: v.info.epoch,
            })
        })
    }
}

fn ready<'a, T: Send + 'a>(v: T) -> BoxFuture<'a, T> {
    Box::pin(std::future::ready(v))
}

impl Authority for FakeAuthority {
    fn server_register<'a>(
        &'a self,
        site: &'a str,
        server_id: &'a str,
        data_addr: &'a str,
        admin_addr: &'a str,
    ) -> BoxFuture<'a, Result<(), AuthorityError>> {
        self.do_register(site, server_id, data_addr, admin_addr);
        ready(Ok(()))
    }

    fn server_heartbeat<'a>(
        &'a self,
        site: &'a str,
        server_id: &'a str,
        health: serde_json::Value,
    ) -> BoxFuture<'a, Result<(), AuthorityError>> {
        self.do_heartbeat(site, server_id, health);
        ready(Ok(()))
    }

    fn volume_get<'a>(
        &'a self,
        site: &'a str,
        volume: &'a str,
    ) -> BoxFuture<'a, Result<VolumeInfo, AuthorityError>> {
        ready(self.do_volume_get(site, volume))
    }

    fn lease_acquire<'a>(
        &'a self,
        site: &'a str,
        volume: &'a str,
        server_id: &'a str,
    ) -> BoxFuture<'a, Result<LeaseGrant, AuthorityError>> {
        ready(self.do_lease_acquire(site, volume, server_id))
    }

    fn lease_renew<'a>(
        &'a self,
        site: &'a str,
        volume: &'a str,
        server_id: &'a str,
        epoch: u64,
    ) -> BoxFuture<'a, Result<LeaseGrant, AuthorityError>> {
        ready(self.do_lease_renew(site, volume, server_id, epoch))
    }

    fn lease_release<'a>(
        &'a self,
        site: &'a str,
        volume: &'a str,
        server_id: &'a str,
        epoch: u64,
    ) -> BoxFuture<'a, Result<(), AuthorityError>> {
        ready(self.do_lease_release(site, volume, server_id, epoch))
    }

    fn volume_set_in_sync<'a>(
        &'a self,
        site: &'a str,
        volume: &'a str,
        server_id: &'a str,
        in_sync: bool,
        epoch: u64,
    ) -> BoxFuture<'a, Result<VolumeInfo, AuthorityError>> {
        ready(self.do_set_in_sync(site, volume, server_id, in_sync, epoch))
    }

    fn failover_request<'a>(
        &'a self,
        site: &'a str,
        volume: &'a str,
        _reason: &'a str,
        force: bool,
    ) -> BoxFuture<'a, Result<FailoverOutcome, AuthorityError>> {
        ready(self.do_failover(site, volume, force))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_only_to_designated_primary_and_epoch_bumps_on_new_holder() {
        let a = FakeAuthority::new();
        a.create_volume(
            "s",
            "v",
            1 << 20,
            512,
            50,
            &["s1", "s2"],
            "s1",
            &["s1", "s2"],
        );
        assert!(matches!(
            a.do_lease_acquire("s", "v", "s2"),
            Err(AuthorityError::NotPrimary { .. })
        ));
        let g = a.do_lease_acquire("s", "v", "s1").unwrap();
        assert_eq!(g.epoch, 1);
        let f = a.do_failover("s", "v", false).unwrap();
        assert_eq!((f.primary.as_str(), f.epoch), ("s2", 2));
        assert!(matches!(
            a.do_lease_acquire("s", "v", "s2"),
            Err(AuthorityError::LeaseHeld { .. })
        ));
        assert!(matches!(
            a.do_lease_renew("s", "v", "s1", 1),
            Err(AuthorityError::StaleEpoch { epoch: 2, .. })
        ));
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(a.do_lease_acquire("s", "v", "s2").unwrap().epoch, 2);
    }
}
