//! malloc bdev. (Placeholder until the bdev work lands; the constructor signature is fixed.)

use super::{Bdev, BdevError};

pub struct MallocBdev {
    _private: (),
}

impl MallocBdev {
    pub fn new(
        name: &str,
        num_blocks: u64,
        block_size: u32,
        uuid: Option<uuid::Uuid>,
    ) -> Result<Self, BdevError> {
        let _ = (name, num_blocks, block_size, uuid);
        Err(BdevError::InvalidParam("malloc bdev not built yet".into()))
    }
}

impl Bdev for MallocBdev {
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
        "malloc"
    }
    fn create_params(&self) -> serde_json::Value {
        unreachable!()
    }
}
