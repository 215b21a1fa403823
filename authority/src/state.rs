//! The replicated state of a group and the commands that change it.
//!
//! Applying a command is a pure function of the state: no clock, no I/O, so every member
//! reaches the same state from the same log. Time-based decisions (may a new lease holder be
//! granted yet?) are taken by the leader *before* it proposes a command, and the command
//! carries the precondition it was decided under (compare-and-set), see [`Command::GrantLease`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::AuthError;

/// One server of a volume and whether it holds every acknowledged write.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct VolumeServer {
    pub server_id: String,
    pub in_sync: bool,
}

/// Who was granted a volume's primary lease last, and under which epoch. `None` once released.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LeaseHolder {
    pub server_id: String,
    pub epoch: u64,
    /// The holder process's incarnation (its client picks one per process start), if sent: a
    /// restarted server (or a second process under the same id) is a new holder, which waits
    /// until its predecessor's lease could have run out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incarnation: Option<String>,
}

/// The outcome of the last failover, kept so a retried request gets the same answer.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FailoverRecord {
    pub from_epoch: u64,
    pub primary: String,
    pub epoch: u64,
    pub forced: bool,
    pub reason: String,
}

/// Tier 2: a volume (one device's copy in this site).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Volume {
    pub device: String,
    pub size_bytes: u64,
    pub block_size: u32,
    pub epoch: u64,
    pub generation: u64,
    pub primary: Option<String>,
    pub servers: Vec<VolumeServer>,
    pub lease_holder: Option<LeaseHolder>,
    pub last_failover: Option<FailoverRecord>,
    /// A prepared cross-group transaction that owns this volume until it is decided.
    pub intent: Option<TxnIntent>,
}

/// Tier 2: a registered server of the site.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Server {
    pub data_addr: String,
    pub admin_addr: String,
    pub health: Value,
    /// Wall-clock time the leader stamped on the last heartbeat: for operators only, never
    /// compared for any decision.
    pub last_heartbeat_unix_ms: u64,
    pub heartbeats: u64,
}

/// Tier 1: a device and which of its volumes may accept writes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Device {
    pub size_bytes: u64,
    pub block_size: u32,
    /// site -> volume name.
    pub volumes: BTreeMap<String, String>,
    pub authoritative_site: String,
    pub generation: u64,
    pub intent: Option<TxnIntent>,
    /// Tier-1 lease: which volume (by site) was granted authority, under which generation
    /// (`LeaseHolder::server_id` holds the site, `epoch` the generation).
    #[serde(default)]
    pub lease_holder: Option<LeaseHolder>,
}

/// A change that a two-phase transaction holds on a record until the decision.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TxnIntent {
    pub txn_id: String,
    pub new_generation: u64,
    pub to_site: String,
}

/// The coordinator's record of a promotion transaction (kept in the global group).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TxnRecord {
    pub device: String,
    pub to_site: String,
    pub to_volume: String,
    pub new_generation: u64,
    pub decision: Option<bool>,
    /// The decision has been applied in every participant.
    pub finished: bool,
}

/// The whole replicated state of one group. The global group uses `devices` and `txns`; a
/// site group uses `volumes`, `servers` and `prepared`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupState {
    pub devices: BTreeMap<String, Device>,
    pub txns: BTreeMap<String, TxnRecord>,
    pub volumes: BTreeMap<String, Volume>,
    pub servers: BTreeMap<String, Server>,
    /// txn id -> outcome of this participant (`Some(true)` committed, `Some(false)` aborted,
    /// `None` prepared and waiting).
    pub prepared: BTreeMap<String, Option<bool>>,
}

/// A change to a group's state. Every variant is idempotent or guarded, so a retried
/// proposal cannot apply twice in a way that matters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Command {
    ServerRegister {
        server_id: String,
        data_addr: String,
        admin_addr: String,
    },
    ServerHeartbeat {
        server_id: String,
        health: Value,
        unix_ms: u64,
    },
    VolumeCreate {
        volume: String,
        device: String,
        size_bytes: u64,
        block_size: u32,
        servers: Vec<String>,
        generation: u64,
    },
    VolumeDelete {
        volume: String,
    },
    /// Grant the primary lease to `server_id` at `epoch`, if the recorded holder is still
    /// `prev` (the leader decided, by its clock, that `prev`'s lease has run out).
    GrantLease {
        volume: String,
        server_id: String,
        epoch: u64,
        prev: Option<LeaseHolder>,
        #[serde(default)]
        incarnation: Option<String>,
    },
    ReleaseLease {
        volume: String,
        server_id: String,
        epoch: u64,
        /// Only the incarnation that holds the lease releases it.
        #[serde(default)]
        incarnation: Option<String>,
    },
    SetInSync {
        volume: String,
        server_id: String,
        in_sync: bool,
        epoch: u64,
    },
    Failover {
        volume: String,
        from_epoch: Option<u64>,
        reason: String,
        force: bool,
    },
    DeviceCreate {
        device: String,
        size_bytes: u64,
        block_size: u32,
        volumes: BTreeMap<String, String>,
        authoritative_site: String,
    },
    DeviceDelete {
        device: String,
    },
    /// Grant the device's tier-1 lease to its authoritative volume (by site) under
    /// `generation`, if the recorded holder is still `prev` (compare-and-set, as GrantLease).
    GrantDeviceLease {
        device: String,
        site: String,
        generation: u64,
        prev: Option<LeaseHolder>,
    },
    ReleaseDeviceLease {
        device: String,
        site: String,
        generation: u64,
    },
    /// Global group: open a promotion transaction and lock the device (coordinator's prepare).
    TxnBegin {
        txn_id: String,
        device: String,
        to_site: String,
    },
    /// Site group: vote on a promotion and lock the volume.
    TxnPrepare {
        txn_id: String,
        volume: String,
        new_generation: u64,
        to_site: String,
    },
    /// Global group: record the decision. The first decision wins.
    TxnDecide {
        txn_id: String,
        commit: bool,
    },
    /// Any participant: apply (commit) or drop (abort) the intent of the transaction.
    TxnFinish {
        txn_id: String,
        commit: bool,
    },
    /// Global group: every participant has applied the decision.
    TxnForget {
        txn_id: String,
    },
    /// Several commands in one log entry (batching); outcomes are returned in order.
    Batch(Vec<Command>),
}

/// What applying a command produced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Outcome {
    Done,
    Volume(String),
    Grant {
        epoch: u64,
        generation: u64,
    },
    Failover {
        primary: String,
        epoch: u64,
        forced: bool,
    },
    Txn {
        decision: Option<bool>,
        new_generation: u64,
    },
    Batch(Vec<CommandOutcome>),
}

/// The state machine's response for one log entry.
pub type CommandOutcome = Result<Outcome, AuthError>;

/// The refusal while `holder` (a volume's or a device's recorded lease) is held, or was
/// changed since the leader looked (then the holder may be nobody: released meanwhile).
fn lease_held(holder: &Option<LeaseHolder>) -> AuthError {
    AuthError::LeaseHeld {
        holder: holder
            .as_ref()
            .map(|h| h.server_id.clone())
            .unwrap_or_default(),
        retry_after_ms: 0,
    }
}

fn unknown_volume(volume: &str) -> AuthError {
    AuthError::UnknownVolume {
        volume: volume.to_string(),
    }
}

fn txn_conflict(intent: &Option<TxnIntent>) -> Result<(), AuthError> {
    match intent {
        Some(i) => Err(AuthError::TxnConflict {
            txn_id: i.txn_id.clone(),
        }),
        None => Ok(()),
    }
}

impl GroupState {
    /// Apply one command. Refusals leave the state exactly as it was.
    pub fn apply(&mut self, cmd: &Command) -> CommandOutcome {
        match cmd {
            Command::ServerRegister {
                server_id,
                data_addr,
                admin_addr,
            } => {
                let s = self
                    .servers
                    .entry(server_id.clone())
                    .or_insert_with(|| Server {
                        data_addr: String::new(),
                        admin_addr: String::new(),
                        health: Value::Null,
                        last_heartbeat_unix_ms: 0,
                        heartbeats: 0,
                    });
                s.data_addr = data_addr.clone();
                s.admin_addr = admin_addr.clone();
                Ok(Outcome::Done)
            }
            Command::ServerHeartbeat {
                server_id,
                health,
                unix_ms,
            } => {
                let s =
                    self.servers
                        .get_mut(server_id)
                        .ok_or_else(|| AuthError::UnknownServer {
                            server_id: server_id.clone(),
                        })?;
                s.health = health.clone();
                s.last_heartbeat_unix_ms = *unix_ms;
                s.heartbeats += 1;
                Ok(Outcome::Done)
            }
            Command::VolumeCreate {
                volume,
                device,
                size_bytes,
                block_size,
                servers,
                generation,
            } => {
                if let Some(v) = self.volumes.get(volume) {
                    let same = v.device == *device
                        && v.size_bytes == *size_bytes
                        && v.block_size == *block_size
                        && v.servers.iter().map(|s| &s.server_id).eq(servers.iter());
                    // A retried create with the same parameters succeeds.
                    return if same {
                        Ok(Outcome::Volume(volume.clone()))
                    } else {
                        Err(AuthError::AlreadyExists {
                            what: format!("volume {volume}"),
                        })
                    };
                }
                if servers.is_empty() {
                    return Err(AuthError::InvalidParams(
                        "a volume needs at least one server".into(),
                    ));
                }
                for (i, s) in servers.iter().enumerate() {
                    if !self.servers.contains_key(s) {
                        return Err(AuthError::UnknownServer {
                            server_id: s.clone(),
                        });
                    }
                    if servers[..i].contains(s) {
                        return Err(AuthError::InvalidParams(format!("server {s} listed twice")));
                    }
                }
                if *block_size == 0
                    || !block_size.is_power_of_two()
                    || *size_bytes % *block_size as u64 != 0
                {
                    return Err(AuthError::InvalidParams(
                        "block_size must be a power of two dividing size_bytes".into(),
                    ));
                }
                self.volumes.insert(
                    volume.clone(),
                    Volume {
                        device: device.clone(),
                        size_bytes: *size_bytes,
                        block_size: *block_size,
                        epoch: 1,
                        generation: *generation,
                        primary: Some(servers[0].clone()),
                        // A new volume is empty on every server: all are in sync.
                        servers: servers
                            .iter()
                            .map(|s| VolumeServer {
                                server_id: s.clone(),
                                in_sync: true,
                            })
                            .collect(),
                        lease_holder: None,
                        last_failover: None,
                        intent: None,
                    },
                );
                Ok(Outcome::Volume(volume.clone()))
            }
            Command::VolumeDelete { volume } => {
                let v = self
                    .volumes
                    .get(volume)
                    .ok_or_else(|| unknown_volume(volume))?;
                txn_conflict(&v.intent)?;
                if v.lease_holder.is_some() {
                    return Err(lease_held(&v.lease_holder));
                }
                self.volumes.remove(volume);
                Ok(Outcome::Done)
            }
            Command::GrantLease {
                volume,
                server_id,
                epoch,
                prev,
                incarnation,
            } => {
                let v = self
                    .volumes
                    .get_mut(volume)
                    .ok_or_else(|| unknown_volume(volume))?;
                if v.epoch != *epoch {
                    return Err(AuthError::StaleEpoch {
                        epoch: v.epoch,
                        generation: v.generation,
                    });
                }
                if v.primary.as_deref() != Some(server_id.as_str()) {
                    return Err(AuthError::NotPrimary {
                        primary: v.primary.clone(),
                    });
                }
                let me = LeaseHolder {
                    server_id: server_id.clone(),
                    epoch: *epoch,
                    incarnation: incarnation.clone(),
                };
                if v.lease_holder.as_ref() == Some(&me) {
                    // A retried or concurrent grant to the same holder.
                    return Ok(Outcome::Grant {
                        epoch: v.epoch,
                        generation: v.generation,
                    });
                }
                if v.lease_holder != *prev {
                    // Someone else was granted (or released) since the leader looked.
                    return Err(lease_held(&v.lease_holder));
                }
                v.lease_holder = Some(me);
                Ok(Outcome::Grant {
                    epoch: v.epoch,
                    generation: v.generation,
                })
            }
            Command::ReleaseLease {
                volume,
                server_id,
                epoch,
                incarnation,
            } => {
                let v = self
                    .volumes
                    .get_mut(volume)
                    .ok_or_else(|| unknown_volume(volume))?;
                match &v.lease_holder {
                    Some(h)
                        if h.server_id == *server_id
                            && h.epoch == *epoch
                            && h.incarnation == *incarnation =>
                    {
                        v.lease_holder = None;
                        Ok(Outcome::Done)
                    }
                    // Releasing what one no longer holds is a no-op (retries, late releases).
                    _ if *epoch <= v.epoch => Ok(Outcome::Done),
                    _ => Err(AuthError::InvalidParams(format!(
                        "epoch {epoch} is newer than the volume's {}",
                        v.epoch
                    ))),
                }
            }
            Command::SetInSync {
                volume,
                server_id,
                in_sync,
                epoch,
            } => {
                let v = self
                    .volumes
                    .get_mut(volume)
                    .ok_or_else(|| unknown_volume(volume))?;
                if v.epoch != *epoch {
                    return Err(AuthError::StaleEpoch {
                        epoch: v.epoch,
                        generation: v.generation,
                    });
                }
                if v.primary.as_deref() == Some(server_id.as_str()) {
                    return Err(AuthError::InvalidParams(
                        "the primary is in sync by definition".into(),
                    ));
                }
                let s = v
                    .servers
                    .iter_mut()
                    .find(|s| s.server_id == *server_id)
                    .ok_or_else(|| AuthError::UnknownServer {
                        server_id: server_id.clone(),
                    })?;
                s.in_sync = *in_sync;
                Ok(Outcome::Volume(volume.clone()))
            }
            Command::Failover {
                volume,
                from_epoch,
                reason,
                force,
            } => {
                let v = self
                    .volumes
                    .get_mut(volume)
                    .ok_or_else(|| unknown_volume(volume))?;
                if let Some(from) = from_epoch {
                    if *from != v.epoch {
                        if let Some(f) = &v.last_failover {
                            if f.from_epoch == *from {
                                // The retry of a failover that already happened.
                                return Ok(Outcome::Failover {
                                    primary: f.primary.clone(),
                                    epoch: f.epoch,
                                    forced: f.forced,
                                });
                            }
                        }
                        return Err(AuthError::StaleEpoch {
                            epoch: v.epoch,
                            generation: v.generation,
                        });
                    }
                }
                txn_conflict(&v.intent)?;
                let old = v.primary.clone();
                let others = || {
                    v.servers
                        .iter()
                        .filter(|s| Some(&s.server_id) != old.as_ref())
                };
                let (chosen, forced) = match others().find(|s| s.in_sync) {
                    Some(s) => (s.server_id.clone(), false),
                    None => match others().next() {
                        Some(s) if *force => (s.server_id.clone(), true),
                        Some(s) => {
                            return Err(AuthError::NotInSync {
                                server_id: s.server_id.clone(),
                            })
                        }
                        None => {
                            return Err(AuthError::InvalidParams(format!(
                                "volume {volume} has no secondary to fail over to"
                            )))
                        }
                    },
                };
                let from = v.epoch;
                v.epoch += 1;
                v.primary = Some(chosen.clone());
                for s in v.servers.iter_mut() {
                    if s.server_id == chosen {
                        s.in_sync = true;
                    } else if Some(&s.server_id) == old.as_ref() || forced {
                        // The deposed primary may hold writes nobody acknowledged; after a
                        // forced promotion nobody else is known to match the new primary.
                        s.in_sync = false;
                    }
                }
                v.last_failover = Some(FailoverRecord {
                    from_epoch: from,
                    primary: chosen.clone(),
                    epoch: v.epoch,
                    forced,
                    reason: reason.clone(),
                });
                Ok(Outcome::Failover {
                    primary: chosen,
                    epoch: v.epoch,
                    forced,
                })
            }
            Command::DeviceCreate {
                device,
                size_bytes,
                block_size,
                volumes,
                authoritative_site,
            } => {
                if let Some(d) = self.devices.get(device) {
                    let same = d.size_bytes == *size_bytes
                        && d.block_size == *block_size
                        && d.volumes == *volumes
                        && (d.authoritative_site == *authoritative_site || d.generation > 1);
                    return if same {
                        Ok(Outcome::Done)
                    } else {
                        Err(AuthError::AlreadyExists {
                            what: format!("device {device}"),
                        })
                    };
                }
                if !volumes.contains_key(authoritative_site) {
                    return Err(AuthError::UnknownSite {
                        site: authoritative_site.clone(),
                    });
                }
                if *block_size == 0
                    || !block_size.is_power_of_two()
                    || *size_bytes % *block_size as u64 != 0
                {
                    return Err(AuthError::InvalidParams(
                        "block_size must be a power of two dividing size_bytes".into(),
                    ));
                }
                self.devices.insert(
                    device.clone(),
                    Device {
                        size_bytes: *size_bytes,
                        block_size: *block_size,
                        volumes: volumes.clone(),
                        authoritative_site: authoritative_site.clone(),
                        generation: 1,
                        intent: None,
                        lease_holder: None,
                    },
                );
                Ok(Outcome::Done)
            }
            Command::DeviceDelete { device } => {
                let d = self
                    .devices
                    .get(device)
                    .ok_or_else(|| AuthError::UnknownDevice {
                        device: device.clone(),
                    })?;
                txn_conflict(&d.intent)?;
                if d.lease_holder.is_some() {
                    return Err(lease_held(&d.lease_holder));
                }
                self.devices.remove(device);
                Ok(Outcome::Done)
            }
            Command::GrantDeviceLease {
                device,
                site,
                generation,
                prev,
            } => {
                let d = self
                    .devices
                    .get_mut(device)
                    .ok_or_else(|| AuthError::UnknownDevice {
                        device: device.clone(),
                    })?;
                if d.generation != *generation {
                    return Err(AuthError::StaleEpoch {
                        epoch: 0,
                        generation: d.generation,
                    });
                }
                if d.authoritative_site != *site {
                    return Err(AuthError::NotPrimary {
                        primary: Some(d.authoritative_site.clone()),
                    });
                }
                let me = LeaseHolder {
                    server_id: site.clone(),
                    epoch: *generation,
                    incarnation: None,
                };
                if d.lease_holder.as_ref() != Some(&me) {
                    if d.lease_holder != *prev {
                        return Err(lease_held(&d.lease_holder));
                    }
                    d.lease_holder = Some(me);
                }
                Ok(Outcome::Grant {
                    epoch: 0,
                    generation: d.generation,
                })
            }
            Command::ReleaseDeviceLease {
                device,
                site,
                generation,
            } => {
                let d = self
                    .devices
                    .get_mut(device)
                    .ok_or_else(|| AuthError::UnknownDevice {
                        device: device.clone(),
                    })?;
                let me = LeaseHolder {
                    server_id: site.clone(),
                    epoch: *generation,
                    incarnation: None,
                };
                if d.lease_holder.as_ref() == Some(&me) {
                    d.lease_holder = None;
                }
                Ok(Outcome::Done)
            }
            Command::TxnBegin {
                txn_id,
                device,
                to_site,
            } => {
                if let Some(t) = self.txns.get(txn_id) {
                    if t.device == *device && t.to_site == *to_site {
                        return Ok(Outcome::Txn {
                            decision: t.decision,
                            new_generation: t.new_generation,
                        });
                    }
                    return Err(AuthError::TxnConflict {
                        txn_id: txn_id.clone(),
                    });
                }
                let d = self
                    .devices
                    .get_mut(device)
                    .ok_or_else(|| AuthError::UnknownDevice {
                        device: device.clone(),
                    })?;
                txn_conflict(&d.intent)?;
                let to_volume =
                    d.volumes
                        .get(to_site)
                        .cloned()
                        .ok_or_else(|| AuthError::UnknownSite {
                            site: to_site.clone(),
                        })?;
                let new_generation = d.generation + 1;
                d.intent = Some(TxnIntent {
                    txn_id: txn_id.clone(),
                    new_generation,
                    to_site: to_site.clone(),
                });
                self.txns.insert(
                    txn_id.clone(),
                    TxnRecord {
                        device: device.clone(),
                        to_site: to_site.clone(),
                        to_volume,
                        new_generation,
                        decision: None,
                        finished: false,
                    },
                );
                Ok(Outcome::Txn {
                    decision: None,
                    new_generation,
                })
            }
            Command::TxnPrepare {
                txn_id,
                volume,
                new_generation,
                to_site,
            } => {
                if let Some(outcome) = self.prepared.get(txn_id) {
                    return Ok(Outcome::Txn {
                        decision: *outcome,
                        new_generation: *new_generation,
                    });
                }
                let v = self
                    .volumes
                    .get_mut(volume)
                    .ok_or_else(|| unknown_volume(volume))?;
                txn_conflict(&v.intent)?;
                if *new_generation <= v.generation {
                    return Err(AuthError::StaleEpoch {
                        epoch: v.epoch,
                        generation: v.generation,
                    });
                }
                if v.primary.is_none() {
                    return Err(AuthError::NotPrimary { primary: None });
                }
                v.intent = Some(TxnIntent {
                    txn_id: txn_id.clone(),
                    new_generation: *new_generation,
                    to_site: to_site.clone(),
                });
                self.prepared.insert(txn_id.clone(), None);
                Ok(Outcome::Txn {
                    decision: None,
                    new_generation: *new_generation,
                })
            }
            Command::TxnDecide { txn_id, commit } => {
                let t = self.txns.get_mut(txn_id).ok_or_else(|| {
                    AuthError::InvalidParams(format!("unknown transaction {txn_id}"))
                })?;
                if t.decision.is_none() {
                    t.decision = Some(*commit);
                }
                Ok(Outcome::Txn {
                    decision: t.decision,
                    new_generation: t.new_generation,
                })
            }
            Command::TxnFinish { txn_id, commit } => self.finish_txn(txn_id, *commit),
            Command::TxnForget { txn_id } => {
                if let Some(t) = self.txns.get_mut(txn_id) {
                    t.finished = true;
                }
                Ok(Outcome::Done)
            }
            Command::Batch(cmds) => {
                Ok(Outcome::Batch(cmds.iter().map(|c| self.apply(c)).collect()))
            }
        }
    }

    fn finish_txn(&mut self, txn_id: &str, commit: bool) -> CommandOutcome {
        // Global side: the decision must be recorded, and must be the one we apply.
        if let Some(t) = self.txns.get(txn_id) {
            if t.decision != Some(commit) {
                return Err(AuthError::InvalidParams(format!(
                    "transaction {txn_id} is decided {:?}, not {commit}",
                    t.decision
                )));
            }
            let (device, to_site, new_generation) =
                (t.device.clone(), t.to_site.clone(), t.new_generation);
            if let Some(d) = self.devices.get_mut(&device) {
                if d.intent.as_ref().map(|i| i.txn_id.as_str()) == Some(txn_id) {
                    d.intent = None;
                    if commit {
                        assert!(
                            new_generation > d.generation,
                            "a generation never goes back"
                        );
                        d.generation = new_generation;
                        d.authoritative_site = to_site;
                    }
                }
            }
            return Ok(Outcome::Txn {
                decision: Some(commit),
                new_generation,
            });
        }
        // Site side.
        match self.prepared.get(txn_id) {
            Some(Some(done)) if *done == commit => {}
            Some(Some(_)) => {
                return Err(AuthError::InvalidParams(format!(
                    "transaction {txn_id} already finished otherwise"
                )))
            }
            Some(None) => {
                for v in self.volumes.values_mut() {
                    if v.intent.as_ref().map(|i| i.txn_id.as_str()) == Some(txn_id) {
                        let intent = v.intent.take().expect("checked above");
                        if commit {
                            assert!(
                                intent.new_generation > v.generation,
                                "a generation never goes back"
                            );
                            v.generation = intent.new_generation;
                            // The promoted volume starts a new epoch under its current primary.
                            v.epoch += 1;
                        }
                    }
                }
                self.prepared.insert(txn_id.to_string(), Some(commit));
            }
            // Abort of a transaction this site never prepared: remember it, so a late
            // prepare cannot lock the volume after the decision.
            None if !commit => {
                self.prepared.insert(txn_id.to_string(), Some(false));
            }
            None => {
                return Err(AuthError::InvalidParams(format!(
                    "cannot commit transaction {txn_id}: this site never prepared it"
                )))
            }
        }
        Ok(Outcome::Txn {
            decision: Some(commit),
            new_generation: 0,
        })
    }
}

#[cfg(test)]
#[path = "state_tests.rs"]
mod tests;
