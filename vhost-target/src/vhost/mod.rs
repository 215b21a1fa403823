//! The vhost-user-blk controller: one Unix socket, one bdev, queue workers
//! pinned to the controller's cpumask.
//!
//! Threads (see docs/architecture.md):
//! - the controller's *session thread* accepts a frontend on the socket and
//!   runs the vhost-user control protocol ([`handler`]); after a disconnect it
//!   resets and accepts the next frontend (QEMU's `reconnect=`);
//! - *queue workers* ([`worker`]), one per CPU of the cpumask, own the running
//!   virtqueues and the bdev channels; the session thread hands a queue to its
//!   worker when the frontend starts it and takes it back when it stops it.

pub mod controller;
pub mod handler;
pub mod used_ring;
pub mod worker;

use std::fmt;
use std::str::FromStr;

pub use controller::{Controller, ControllerInfo, ControllerSpec};

/// How queue workers wait for work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PollMode {
    /// Busy-poll the available rings; guest kicks are suppressed.
    Poll,
    /// Sleep on the kick eventfds; no polling.
    Interrupt,
    /// Poll while busy; after an idle spell re-enable kicks and sleep.
    #[default]
    Adaptive,
}

impl FromStr for PollMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "poll" => Ok(PollMode::Poll),
            "interrupt" => Ok(PollMode::Interrupt),
            "adaptive" => Ok(PollMode::Adaptive),
            other => Err(format!(
                "unknown poll mode {other:?}: expected poll, interrupt or adaptive"
            )),
        }
    }
}

impl fmt::Display for PollMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PollMode::Poll => "poll",
            PollMode::Interrupt => "interrupt",
            PollMode::Adaptive => "adaptive",
        })
    }
}

/// Errors of the vhost layer's control path.
#[derive(Debug, thiserror::Error)]
pub enum VhostError {
    #[error("cannot listen on vhost-user socket {path}: {reason}")]
    Listen { path: String, reason: String },
    #[error("cannot start queue worker: {0}")]
    Worker(String),
    #[error("invalid controller parameter: {0}")]
    InvalidParam(String),
    #[error(transparent)]
    Bdev(#[from] crate::bdev::BdevError),
}
