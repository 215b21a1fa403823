//! The two-phase-commit coordinator as a pure step machine: which request to send next, and
//! what an answer means. No I/O, no clock.
//!
//! [`crate::txn::promote`] and [`crate::txn::resolve`] drive it over JSON-RPC; the model
//! checker (`tests/txn_model.rs`) drives the same machine over a lossy, duplicating,
//! reordering network with crashes, so the protocol it checks is this code, not a copy.
//!
//! A promotion: global `TxnBegin`, read the record, site `TxnPrepare` (the vote), global
//! `TxnDecide`, site `TxnFinish`, global `TxnFinish`, global `TxnForget`. If the begin answers
//! that a decision is already recorded (a retry), the vote and the decision are skipped.
//! A resolution (recovery of a transaction whose coordinator may be dead): read the record,
//! decide *abort* if undecided, then the same three finishing steps.

use serde::{Deserialize, Serialize};

use crate::error::AuthError;
use crate::state::{Command, Outcome, TxnRecord};

/// One request to a participant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Request {
    /// A command for the global group's log.
    Global(Command),
    /// A command for a site group's log.
    Site { site: String, cmd: Command },
    /// A linearizable read of the global group's record of a transaction.
    Record { txn_id: String },
}

/// A participant's answer to a [`Request`] (`Outcome` for a command, `Record` for a read).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Reply {
    Outcome(Result<Outcome, AuthError>),
    Record(Result<Option<TxnRecord>, AuthError>),
}

/// The result of a finished promotion or resolution.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Promoted {
    pub committed: bool,
    pub new_generation: u64,
    /// Why the site voted no, if it did.
    pub refusal: Option<AuthError>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Phase {
    Begin,
    ReadRecord,
    Prepare,
    Decide,
    FinishSite,
    FinishGlobal,
    Forget,
    Done,
}

/// The coordinator of one transaction (a promotion or a resolution), between two requests.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Coordinator {
    txn_id: String,
    /// `Some((device, to_site))` for a promotion, `None` for a resolution.
    promotion: Option<(String, String)>,
    phase: Phase,
    /// A decision the begin found already recorded (a retried promotion).
    decided_at_begin: Option<bool>,
    rec: Option<TxnRecord>,
    vote: bool,
    commit: bool,
    refusal: Option<AuthError>,
}

fn txn_outcome(o: Outcome) -> Result<(Option<bool>, u64), AuthError> {
    match o {
        Outcome::Txn {
            decision,
            new_generation,
        } => Ok((decision, new_generation)),
        other => Err(AuthError::Internal(format!("unexpected outcome {other:?}"))),
    }
}

fn outcome(reply: Reply) -> Result<Outcome, AuthError> {
    match reply {
        Reply::Outcome(r) => r,
        Reply::Record(_) => Err(AuthError::Internal(
            "a record where a command's outcome was expected".into(),
        )),
    }
}

impl Coordinator {
    /// Promote `device`'s volume in `to_site` under `txn_id` (a retry reuses the id).
    pub fn promote(txn_id: &str, device: &str, to_site: &str) -> Coordinator {
        Coordinator {
            txn_id: txn_id.into(),
            promotion: Some((device.into(), to_site.into())),
            phase: Phase::Begin,
            decided_at_begin: None,
            rec: None,
            vote: false,
            commit: false,
            refusal: None,
        }
    }

    /// Finish `txn_id` whatever its coordinator did: abort it if undecided, then apply the
    /// recorded decision in both groups.
    pub fn resolve(txn_id: &str) -> Coordinator {
        Coordinator {
            phase: Phase::ReadRecord,
            promotion: None,
            ..Coordinator::promote(txn_id, "", "")
        }
    }

    pub fn txn_id(&self) -> &str {
        &self.txn_id
    }

    /// The request to send now; `None` once finished.
    pub fn request(&self) -> Option<Request> {
        let txn_id = self.txn_id.clone();
        let rec = self.rec.as_ref();
        Some(match self.phase {
            Phase::Begin => {
                let (device, to_site) = self.promotion.clone().expect("a promotion begins");
                Request::Global(Command::TxnBegin {
                    txn_id,
                    device,
                    to_site,
                })
            }
            Phase::ReadRecord => Request::Record { txn_id },
            Phase::Prepare => {
                let rec = rec.expect("record read before the prepare");
                Request::Site {
                    site: rec.to_site.clone(),
                    cmd: Command::TxnPrepare {
                        txn_id,
                        volume: rec.to_volume.clone(),
                        new_generation: rec.new_generation,
                        to_site: rec.to_site.clone(),
                    },
                }
            }
            Phase::Decide => Request::Global(Command::TxnDecide {
                txn_id,
                commit: self.vote,
            }),
            Phase::FinishSite => Request::Site {
                site: rec.expect("record read before finishing").to_site.clone(),
                cmd: Command::TxnFinish {
                    txn_id,
                    commit: self.commit,
                },
            },
            Phase::FinishGlobal => Request::Global(Command::TxnFinish {
                txn_id,
                commit: self.commit,
            }),
            Phase::Forget => Request::Global(Command::TxnForget { txn_id }),
            Phase::Done => return None,
        })
    }

    /// Take the answer to [`Self::request`]. An error means the coordinator stops midway: the
    /// transaction is finished by a new coordinator with the same id, or by a resolution.
    pub fn on_reply(&mut self, reply: Reply) -> Result<(), AuthError> {
        self.phase = match self.phase {
            Phase::Begin => {
                self.decided_at_begin = txn_outcome(outcome(reply)?)?.0;
                Phase::ReadRecord
            }
            Phase::ReadRecord => {
                let rec = match reply {
                    Reply::Record(r) => r?,
                    Reply::Outcome(_) => {
                        return Err(AuthError::Internal(
                            "an outcome where a record was expected".into(),
                        ))
                    }
                };
                let rec = rec.ok_or_else(|| match self.promotion {
                    Some(_) => AuthError::Internal(format!(
                        "transaction {} vanished after its begin",
                        self.txn_id
                    )),
                    None => {
                        AuthError::InvalidParams(format!("unknown transaction {}", self.txn_id))
                    }
                })?;
                let next = match (&self.promotion, self.decided_at_begin, rec.decision) {
                    // A promotion whose begin found the decision: carry it out.
                    (Some(_), Some(d), _) => {
                        self.commit = d;
                        Phase::FinishSite
                    }
                    (Some(_), None, _) => Phase::Prepare,
                    // A resolution: the recorded decision, or presumed abort.
                    (None, _, Some(d)) => {
                        self.commit = d;
                        Phase::FinishSite
                    }
                    (None, _, None) => {
                        self.vote = false;
                        Phase::Decide
                    }
                };
                self.rec = Some(rec);
                next
            }
            Phase::Prepare => {
                self.vote = match outcome(reply) {
                    Ok(o) => txn_outcome(o)?.0 != Some(false),
                    // A lost answer is not a vote at all.
                    Err(
                        e @ (AuthError::Unavailable { .. }
                        | AuthError::NotLeader { .. }
                        | AuthError::Internal(_)),
                    ) => return Err(e),
                    // A refusal is a "no" vote.
                    Err(e) => {
                        self.refusal = Some(e);
                        false
                    }
                };
                Phase::Decide
            }
            Phase::Decide => {
                // The first recorded decision wins, whatever this coordinator proposed.
                self.commit = txn_outcome(outcome(reply)?)?.0.unwrap_or(false);
                Phase::FinishSite
            }
            Phase::FinishSite => {
                outcome(reply)?;
                Phase::FinishGlobal
            }
            Phase::FinishGlobal => {
                outcome(reply)?;
                Phase::Forget
            }
            Phase::Forget => {
                outcome(reply)?;
                Phase::Done
            }
            Phase::Done => {
                return Err(AuthError::Internal(
                    "an answer after the transaction finished".into(),
                ))
            }
        };
        Ok(())
    }

    /// The result, once [`Self::request`] is `None`.
    pub fn result(&self) -> Option<Promoted> {
        (self.phase == Phase::Done).then(|| Promoted {
            committed: self.commit,
            new_generation: self.rec.as_ref().map_or(0, |r| r.new_generation),
            refusal: self.refusal.clone(),
        })
    }
}
