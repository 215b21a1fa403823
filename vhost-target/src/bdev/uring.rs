//! uring bdev. (Placeholder until the bdev work lands; the constructor signature is fixed.)

use std::path::PathBuf;

use super::{Bdev, BdevError};

/// Which RPC created the bdev; both are served by the same io_uring code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UringKind {
    Uring,
    Aio,
}

#[derive(Debug, Clone)]
pub struct UringOptions {
    pub name: String,
    pub filename: PathBuf,
    /// Logical block size; `None`: the device's own (512 for a regular file).
    pub block_size: Option<u32>,
    pub readonly: bool,
    pub uuid: Option<uuid::Uuid>,
    pub kind: UringKind,
}

pub struct UringBdev {
    _private: (),
}

impl UringBdev {
    pub fn open(opts: UringOptions) -> Result<Self, BdevError> {
        let _ = opts;
        Err(BdevError::InvalidParam("uring bdev not built yet".into()))
    }
}

impl Bdev for UringBdev {
    fn info(&self) -> &super::BdevInfo {
        unreachable!()
    }
    fn open_channel(&self, _qd: u32) -> Result<Box<dyn super::IoChannel>, BdevError> {
        unreachable!()
    }
    fn iostat(&self) -> &super::IoStats {
        unreachable!()
    }
    fn kind(&self) -> &'static str {
        "uring"
    }
    fn create_params(&self) -> serde_json::Value {
        unreachable!()
    }
}
