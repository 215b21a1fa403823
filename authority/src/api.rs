//! The wire types of the JSON-RPC API, shared by the server and [`crate::client`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::state::{GroupState, LeaseHolder, TxnIntent};

/// One server of a volume, with its registered addresses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeServerInfo {
    pub server_id: String,
    pub data_addr: String,
    pub admin_addr: String,
    pub in_sync: bool,
}

/// `volume_get`'s answer (the contract's `VolumeInfo`, plus the lease holder and intent).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeInfo {
    pub site: String,
    pub volume: String,
    pub device: String,
    pub size_bytes: u64,
    pub block_size: u32,
    pub epoch: u64,
    pub generation: u64,
    pub primary: Option<String>,
    pub lease_ms: u64,
    pub servers: Vec<VolumeServerInfo>,
    #[serde(default)]
    pub lease_holder: Option<LeaseHolder>,
    #[serde(default)]
    pub intent: Option<TxnIntent>,
}

impl VolumeInfo {
    pub fn server(&self, id: &str) -> Option<&VolumeServerInfo> {
        self.servers.iter().find(|s| s.server_id == id)
    }

    pub fn primary_entry(&self) -> Option<&VolumeServerInfo> {
        self.primary.as_deref().and_then(|p| self.server(p))
    }

    /// Build from a site group's state; `None` if the volume does not exist.
    pub fn from_state(
        st: &GroupState,
        site: &str,
        volume: &str,
        lease_ms: u64,
    ) -> Option<VolumeInfo> {
        let v = st.volumes.get(volume)?;
        Some(VolumeInfo {
            site: site.to_string(),
            volume: volume.to_string(),
            device: v.device.clone(),
            size_bytes: v.size_bytes,
            block_size: v.block_size,
            epoch: v.epoch,
            generation: v.generation,
            primary: v.primary.clone(),
            lease_ms,
            servers: v
                .servers
                .iter()
                .map(|s| {
                    let reg = st.servers.get(&s.server_id);
                    VolumeServerInfo {
                        server_id: s.server_id.clone(),
                        data_addr: reg.map(|r| r.data_addr.clone()).unwrap_or_default(),
                        admin_addr: reg.map(|r| r.admin_addr.clone()).unwrap_or_default(),
                        in_sync: s.in_sync,
                    }
                })
                .collect(),
            lease_holder: v.lease_holder.clone(),
            intent: v.intent.clone(),
        })
    }
}

/// `lease_acquire` / `lease_renew` answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseReply {
    pub epoch: u64,
    pub generation: u64,
    pub lease_ms: u64,
}

/// `failover_request` answer. `forced` says a not-in-sync secondary was promoted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailoverReply {
    pub primary: String,
    pub epoch: u64,
    #[serde(default)]
    pub forced: bool,
}

/// `device_get` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceInfo {
    pub device: String,
    pub size_bytes: u64,
    pub block_size: u32,
    pub volumes: BTreeMap<String, String>,
    pub authoritative_site: String,
    pub authoritative_volume: String,
    pub generation: u64,
    #[serde(default)]
    pub intent: Option<TxnIntent>,
    /// The tier-1 lease's recorded holder (`server_id` is the site, `epoch` the generation).
    #[serde(default)]
    pub lease_holder: Option<LeaseHolder>,
}

/// `volume_promote` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromoteReply {
    pub txn_id: String,
    pub committed: bool,
    pub generation: u64,
    pub epoch: u64,
}
