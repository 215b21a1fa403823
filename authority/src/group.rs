//! One Raft group as this process sees it: the openraft instance, its state, its lease clock,
//! and the two ways into it (linearizable reads, batched; and writes through the log).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openraft::error::{CheckIsLeaderError, ClientWriteError, RaftError};
use tokio::sync::{mpsc, oneshot};

use crate::error::AuthError;
use crate::lease::LeaseClock;
use crate::state::{Command, GroupState, LeaseHolder, Outcome};
use crate::storage::{LogStore, SharedState};
use crate::types::{GroupId, MemberAddr, NodeId, Raft};

/// Lease timing of a group.
#[derive(Debug, Clone, Copy)]
pub struct LeaseTiming {
    pub lease: Duration,
    pub drift_margin: Duration,
}

/// What a lease decision reads about the leased volume or device.
struct LeaseView {
    /// The epoch a holder is identified by (a volume's epoch, a device's generation).
    epoch: u64,
    generation: u64,
    recorded: Option<LeaseHolder>,
}

/// A granted primary lease, as the authority answers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub epoch: u64,
    pub generation: u64,
    pub lease_ms: u64,
}

pub struct Group {
    pub id: GroupId,
    pub node_id: NodeId,
    pub raft: Raft,
    pub state: SharedState,
    pub log: LogStore,
    pub timing: LeaseTiming,
    clock: Mutex<LeaseClock>,
    reads: mpsc::UnboundedSender<oneshot::Sender<Result<u64, AuthError>>>,
}

impl Group {
    pub fn new(
        id: GroupId,
        node_id: NodeId,
        raft: Raft,
        state: SharedState,
        log: LogStore,
        timing: LeaseTiming,
    ) -> Arc<Group> {
        let (tx, rx) = mpsc::unbounded_channel();
        let g = Arc::new(Group {
            id,
            node_id,
            raft: raft.clone(),
            state,
            log,
            timing,
            clock: Mutex::new(LeaseClock::new(Instant::now())),
            reads: tx,
        });
        tokio::spawn(read_rounds(raft, rx, Arc::downgrade(&g)));
        g
    }

    /// The RPC address of the current leader, if known.
    pub fn leader_rpc_addr(&self) -> Option<String> {
        let m = self.raft.metrics().borrow().clone();
        let leader = m.current_leader?;
        m.membership_config
            .membership()
            .get_node(&leader)
            .map(|n| n.rpc_addr.clone())
    }

    /// Wait until this member is confirmed leader by a quorum *after* this call began, and
    /// its state has applied everything committed before: then a read of `state` is
    /// linearizable. Concurrent callers share one confirmation round.
    pub async fn linearize(&self) -> Result<(), AuthError> {
        self.linearize_term().await.map(|_| ())
    }

    /// [`Group::linearize`], answering the term in which this member was confirmed leader.
    async fn linearize_term(&self) -> Result<u64, AuthError> {
        let (tx, rx) = oneshot::channel();
        self.reads.send(tx).map_err(|_| AuthError::Unavailable {
            reason: "group is shutting down".into(),
        })?;
        rx.await.map_err(|_| AuthError::Unavailable {
            reason: "group is shutting down".into(),
        })?
    }

    /// Propose a command through the log; the state machine's outcome once committed.
    pub async fn write(&self, cmd: Command) -> Result<Outcome, AuthError> {
        match self.raft.client_write(cmd).await {
            Ok(resp) => resp.data,
            Err(e) => Err(write_error(e)),
        }
    }

    /// Grant or renew the primary lease of `volume` to `server_id` (the designated primary).
    /// `expect_epoch` is the epoch a renewal holds (`None` for an acquire); `incarnation`
    /// the holder process's, if its client sent one (another incarnation is another holder).
    pub async fn grant_lease(
        &self,
        volume: &str,
        server_id: &str,
        expect_epoch: Option<u64>,
        incarnation: Option<&str>,
    ) -> Result<Grant, AuthError> {
        let read = |st: &GroupState| {
            let v = st
                .volumes
                .get(volume)
                .ok_or_else(|| AuthError::UnknownVolume {
                    volume: volume.to_string(),
                })?;
            if expect_epoch.is_some_and(|e| e != v.epoch) {
                return Err(AuthError::StaleEpoch {
                    epoch: v.epoch,
                    generation: v.generation,
                });
            }
            if v.primary.as_deref() != Some(server_id) {
                return Err(AuthError::NotPrimary {
                    primary: v.primary.clone(),
                });
            }
            Ok(LeaseView {
                epoch: v.epoch,
                generation: v.generation,
                recorded: v.lease_holder.clone(),
            })
        };
        let propose = |epoch, prev| Command::GrantLease {
            volume: volume.to_string(),
            server_id: server_id.to_string(),
            epoch,
            prev,
            incarnation: incarnation.map(str::to_string),
        };
        self.grant(volume, server_id, incarnation, read, propose)
            .await
    }

    /// Grant or renew the tier-1 lease of `device` to its authoritative volume (named by its
    /// site). The lease's epoch is the device's generation: after a promotion the new
    /// authoritative volume waits until the old one's lease could have run out.
    pub async fn grant_device_lease(
        &self,
        device: &str,
        site: &str,
        expect_generation: Option<u64>,
    ) -> Result<Grant, AuthError> {
        let read = |st: &GroupState| {
            let d = st
                .devices
                .get(device)
                .ok_or_else(|| AuthError::UnknownDevice {
                    device: device.to_string(),
                })?;
            if expect_generation.is_some_and(|g| g != d.generation) {
                return Err(AuthError::StaleEpoch {
                    epoch: 0,
                    generation: d.generation,
                });
            }
            if d.authoritative_site != site {
                return Err(AuthError::NotPrimary {
                    primary: Some(d.authoritative_site.clone()),
                });
            }
            Ok(LeaseView {
                epoch: d.generation,
                generation: d.generation,
                recorded: d.lease_holder.clone(),
            })
        };
        let propose = |generation, prev| Command::GrantDeviceLease {
            device: device.to_string(),
            site: site.to_string(),
            generation,
            prev,
        };
        self.grant(&format!("device:{device}"), site, None, read, propose)
            .await
    }

    /// The lease decision shared by both tiers; `key` names the leased thing in the clock.
    async fn grant(
        &self,
        key: &str,
        holder: &str,
        incarnation: Option<&str>,
        read: impl FnOnce(&GroupState) -> Result<LeaseView, AuthError>,
        propose: impl FnOnce(u64, Option<LeaseHolder>) -> Command,
    ) -> Result<Grant, AuthError> {
        let term = self.linearize_term().await?;
        let lease_ms = self.timing.lease.as_millis() as u64;
        let (cmd, epoch_held) = {
            // The clock lock is held while the state is read, so a renewal of an old holder
            // and the grant to a new one are decided in one order.
            let mut clock = self.clock.lock().expect("lease clock");
            let now = Instant::now();
            clock.observe_term(term, now, self.timing.lease + self.timing.drift_margin);
            let st = self.state.read().expect("state lock");
            let view = read(&st.state)?;
            let me = LeaseHolder {
                server_id: holder.to_string(),
                epoch: view.epoch,
                incarnation: incarnation.map(str::to_string),
            };
            if view.recorded.as_ref() == Some(&me) {
                // Renewal by the recorded holder: leadership was confirmed after the holder
                // sent its request, so `now + lease` is later than the holder's own deadline.
                clock.record(key, me, now + self.timing.lease);
                return Ok(Grant {
                    epoch: view.epoch,
                    generation: view.generation,
                    lease_ms,
                });
            }
            if let Err((holder, retry)) =
                clock.may_grant_new(key, &view.recorded, now, self.timing.drift_margin)
            {
                return Err(AuthError::LeaseHeld {
                    holder,
                    retry_after_ms: retry.as_millis() as u64 + 1,
                });
            }
            (propose(view.epoch, view.recorded), view.epoch)
        };
        match self.write(cmd).await? {
            Outcome::Grant { epoch, generation } => {
                // The log's compare-and-set granted exactly the identity decided above.
                let me = LeaseHolder {
                    server_id: holder.to_string(),
                    epoch: epoch_held,
                    incarnation: incarnation.map(str::to_string),
                };
                self.clock.lock().expect("lease clock").record(
                    key,
                    me,
                    Instant::now() + self.timing.lease,
                );
                Ok(Grant {
                    epoch,
                    generation,
                    lease_ms,
                })
            }
            other => Err(AuthError::Internal(format!("unexpected outcome {other:?}"))),
        }
    }

    /// Release the device lease (committed), then forget its deadline.
    pub async fn release_device_lease(
        &self,
        device: &str,
        site: &str,
        generation: u64,
    ) -> Result<(), AuthError> {
        self.write(Command::ReleaseDeviceLease {
            device: device.to_string(),
            site: site.to_string(),
            generation,
        })
        .await?;
        let me = LeaseHolder {
            server_id: site.to_string(),
            epoch: generation,
            incarnation: None,
        };
        self.clock
            .lock()
            .expect("lease clock")
            .release(&format!("device:{device}"), &me);
        Ok(())
    }

    /// Release the lease (committed), then forget its deadline.
    pub async fn release_lease(
        &self,
        volume: &str,
        server_id: &str,
        epoch: u64,
        incarnation: Option<&str>,
    ) -> Result<(), AuthError> {
        let incarnation = incarnation.map(str::to_string);
        self.write(Command::ReleaseLease {
            volume: volume.to_string(),
            server_id: server_id.to_string(),
            epoch,
            incarnation: incarnation.clone(),
        })
        .await?;
        let me = LeaseHolder {
            server_id: server_id.to_string(),
            epoch,
            incarnation,
        };
        self.clock.lock().expect("lease clock").release(volume, &me);
        Ok(())
    }

    /// The members of the group: voters and learners with their addresses.
    pub fn members(&self) -> (Vec<NodeId>, Vec<(NodeId, MemberAddr)>) {
        let m = self.raft.metrics().borrow().clone();
        let mem = m.membership_config.membership();
        let voters = mem.voter_ids().collect();
        let nodes = mem.nodes().map(|(id, n)| (*id, n.clone())).collect();
        (voters, nodes)
    }
}

/// One leadership confirmation (a heartbeat round to a quorum) answers every read that was
/// waiting when the round started.
async fn read_rounds(
    raft: Raft,
    mut rx: mpsc::UnboundedReceiver<oneshot::Sender<Result<u64, AuthError>>>,
    group: std::sync::Weak<Group>,
) {
    while let Some(first) = rx.recv().await {
        let mut waiting = vec![first];
        // Let the requests already being parsed on other tasks join this round: a round
        // costs a trip through openraft's core (and a quorum round trip with peers).
        tokio::task::yield_now().await;
        while let Ok(more) = rx.try_recv() {
            waiting.push(more);
        }
        let res = match raft.ensure_linearizable().await {
            // The term is read once per round, after the confirmation: if it moved on since,
            // the lease clock resets for the newer term, which only makes it wait longer.
            Ok(_) => {
                let m = raft.metrics();
                let m = m.borrow();
                match m.current_leader == Some(m.id) {
                    true => Ok(m.current_term),
                    false => Err(AuthError::NotLeader {
                        leader_addr: m.current_leader.and_then(|l| {
                            m.membership_config
                                .membership()
                                .get_node(&l)
                                .map(|n| n.rpc_addr.clone())
                        }),
                    }),
                }
            }
            Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f))) => {
                Err(AuthError::NotLeader {
                    leader_addr: f.leader_node.map(|n| n.rpc_addr),
                })
            }
            Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(q))) => {
                match group.upgrade() {
                    Some(_) => Err(AuthError::Unavailable {
                        reason: q.to_string(),
                    }),
                    None => return,
                }
            }
            Err(RaftError::Fatal(e)) => Err(AuthError::Unavailable {
                reason: e.to_string(),
            }),
        };
        for w in waiting {
            let _ = w.send(res.clone());
        }
    }
}

/// The refusal for a failed Raft write (client write or membership change).
pub fn write_error(e: RaftError<NodeId, ClientWriteError<NodeId, MemberAddr>>) -> AuthError {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => AuthError::NotLeader {
            leader_addr: f.leader_node.map(|n| n.rpc_addr),
        },
        RaftError::APIError(ClientWriteError::ChangeMembershipError(e)) => {
            AuthError::InvalidParams(e.to_string())
        }
        RaftError::Fatal(e) => AuthError::Unavailable {
            reason: e.to_string(),
        },
    }
}
