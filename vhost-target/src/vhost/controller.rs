//! A vhost-user-blk controller and its lifetime.

use std::path::PathBuf;
use std::sync::Arc;

use super::{PollMode, VhostError};
use crate::bdev::Bdev;
use crate::cpumask::CpuSet;

/// Everything needed to start a controller (`vhost_create_blk_controller`).
pub struct ControllerSpec {
    /// SPDK's `ctrlr`: the controller's name, also the socket's file name.
    pub name: String,
    /// Full path of the vhost-user socket (`-S` directory joined with the name).
    pub socket_path: PathBuf,
    pub bdev: Arc<dyn Bdev>,
    /// CPUs whose workers serve the queues; one worker per CPU.
    pub cpumask: CpuSet,
    pub read_only: bool,
    pub poll_mode: PollMode,
    /// Most virtqueues a frontend may use (virtio-blk `num_queues`).
    pub max_queues: u16,
}

/// What `vhost_get_controllers` reports.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ControllerInfo {
    pub ctrlr: String,
    pub cpumask: String,
    pub socket: String,
    pub bdev: String,
    pub readonly: bool,
    pub poll_mode: PollMode,
    pub max_queues: u16,
    /// Whether a frontend is attached right now.
    pub connected: bool,
    /// Requests refused because the guest sent something malformed.
    pub bad_requests: u64,
}

/// A running controller. Dropping it stops it and removes its socket.
pub struct Controller {
    spec_name: String,
}

impl Controller {
    pub fn start(spec: ControllerSpec) -> Result<Controller, VhostError> {
        let _ = spec;
        Err(VhostError::Worker("vhost-user backend not built yet".into()))
    }

    pub fn name(&self) -> &str {
        &self.spec_name
    }

    pub fn info(&self) -> ControllerInfo {
        unimplemented!()
    }

    /// Stops the workers, disconnects the frontend, removes the socket.
    pub fn stop(self) {}
}
