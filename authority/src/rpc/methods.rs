//! The JSON-RPC methods: parse the params, then execute against the right group.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::api::{DeviceInfo, FailoverReply, LeaseReply, VolumeInfo};
use crate::error::AuthError;
use crate::group::{write_error, Group};
use crate::host::Host;
use crate::state::{Command, Outcome};
use crate::types::{GroupId, MemberAddr, NodeId};

/// Marker for "no such method" (mapped to -32601 by the caller).
pub const NO_SUCH_METHOD: &str = "\0no such method";

/// Every method, for `rpc_get_methods` and the docs.
pub const METHODS: &[&str] = &[
    "server_register",
    "server_heartbeat",
    "server_list",
    "volume_create",
    "volume_delete",
    "volume_get",
    "volume_list",
    "lease_acquire",
    "lease_renew",
    "lease_release",
    "volume_set_in_sync",
    "failover_request",
    "device_create",
    "device_delete",
    "device_get",
    "device_list",
    "device_lease_acquire",
    "device_lease_renew",
    "device_lease_release",
    "volume_promote",
    "txn_get",
    "txn_step",
    "config_get",
    "cluster_status",
    "cluster_add_learner",
    "cluster_change_membership",
    "rpc_get_methods",
];

fn parse<T: DeserializeOwned>(params: Value) -> Result<T, AuthError> {
    serde_json::from_value(params).map_err(|e| AuthError::InvalidParams(e.to_string()))
}

fn to_value<T: serde::Serialize>(v: T) -> Result<Value, AuthError> {
    serde_json::to_value(v).map_err(|e| AuthError::Internal(e.to_string()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ServerRegister {
    site: String,
    server_id: String,
    data_addr: String,
    admin_addr: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ServerHeartbeat {
    site: String,
    server_id: String,
    #[serde(default)]
    health: Value,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SiteOnly {
    site: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VolumeCreate {
    site: String,
    volume: String,
    device: String,
    size_bytes: u64,
    block_size: u32,
    servers: Vec<String>,
    #[serde(default = "one")]
    generation: u64,
}

fn one() -> u64 {
    1
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VolumeRef {
    site: String,
    volume: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LeaseAcquire {
    site: String,
    volume: String,
    server_id: String,
    /// The holder process's incarnation (optional; see state::LeaseHolder).
    #[serde(default)]
    incarnation: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LeaseEpoch {
    site: String,
    volume: String,
    server_id: String,
    epoch: u64,
    #[serde(default)]
    incarnation: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetInSync {
    site: String,
    volume: String,
    server_id: String,
    in_sync: bool,
    epoch: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Failover {
    site: String,
    volume: String,
    #[serde(default)]
    reason: String,
    #[serde(default)]
    force: bool,
    /// The epoch being failed over from: makes a retried request idempotent.
    #[serde(default)]
    epoch: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeviceCreate {
    device: String,
    size_bytes: u64,
    block_size: u32,
    volumes: BTreeMap<String, String>,
    authoritative_site: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeviceLease {
    device: String,
    /// The site of the volume asking for authority over the device.
    site: String,
    #[serde(default)]
    generation: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeviceRef {
    device: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GroupSel {
    /// "global" or a site name; absent means every group of this process.
    #[serde(default)]
    group: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddLearner {
    id: NodeId,
    raft_addr: String,
    rpc_addr: String,
    #[serde(default)]
    group: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ChangeMembership {
    voters: BTreeSet<NodeId>,
    #[serde(default)]
    group: Option<String>,
}

fn group_id(name: &str) -> GroupId {
    if name == "global" {
        GroupId::Global
    } else {
        GroupId::Site(name.to_string())
    }
}

fn selected<'a>(host: &'a Host, sel: &Option<String>) -> Result<Vec<&'a Arc<Group>>, AuthError> {
    match sel {
        Some(name) => Ok(vec![host.group(&group_id(name))?]),
        None => Ok(host.groups.values().collect()),
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Run `cmd` through `group`'s log and turn a refusal into the error.
async fn write(group: &Group, cmd: Command) -> Result<Outcome, AuthError> {
    group.write(cmd).await
}

async fn volume_info(group: &Group, site: &str, volume: &str) -> Result<VolumeInfo, AuthError> {
    let st = group.state.read().expect("state lock");
    VolumeInfo::from_state(
        &st.state,
        site,
        volume,
        group.timing.lease.as_millis() as u64,
    )
    .ok_or_else(|| AuthError::UnknownVolume {
        volume: volume.to_string(),
    })
}

fn device_info(group: &Group, device: &str) -> Result<DeviceInfo, AuthError> {
    let st = group.state.read().expect("state lock");
    let d = st
        .state
        .devices
        .get(device)
        .ok_or_else(|| AuthError::UnknownDevice {
            device: device.to_string(),
        })?;
    Ok(DeviceInfo {
        device: device.to_string(),
        size_bytes: d.size_bytes,
        block_size: d.block_size,
        volumes: d.volumes.clone(),
        authoritative_site: d.authoritative_site.clone(),
        authoritative_volume: d
            .volumes
            .get(&d.authoritative_site)
            .cloned()
            .unwrap_or_default(),
        generation: d.generation,
        intent: d.intent.clone(),
        lease_holder: d.lease_holder.clone(),
    })
}

/// Execute one method.
pub async fn call(host: &Arc<Host>, method: &str, params: Value) -> Result<Value, AuthError> {
    match method {
        "server_register" => {
            let p: ServerRegister = parse(params)?;
            let g = host.site(&p.site)?;
            write(
                g,
                Command::ServerRegister {
                    server_id: p.server_id,
                    data_addr: p.data_addr,
                    admin_addr: p.admin_addr,
                },
            )
            .await?;
            Ok(json!({}))
        }
        "server_heartbeat" => {
            let p: ServerHeartbeat = parse(params)?;
            let g = host.site(&p.site)?;
            write(
                g,
                Command::ServerHeartbeat {
                    server_id: p.server_id,
                    health: p.health,
                    unix_ms: unix_ms(),
                },
            )
            .await?;
            Ok(json!({}))
        }
        "server_list" => {
            let p: SiteOnly = parse(params)?;
            let g = host.site(&p.site)?;
            g.linearize().await?;
            let st = g.state.read().expect("state lock");
            let list: Vec<Value> = st
                .state
                .servers
                .iter()
                .map(|(id, s)| {
                    json!({
                        "server_id": id, "data_addr": s.data_addr, "admin_addr": s.admin_addr,
                        "health": s.health, "last_heartbeat_unix_ms": s.last_heartbeat_unix_ms,
                        "heartbeats": s.heartbeats,
                    })
                })
                .collect();
            Ok(Value::Array(list))
        }
        "volume_create" => {
            let p: VolumeCreate = parse(params)?;
            let g = host.site(&p.site)?;
            write(
                g,
                Command::VolumeCreate {
                    volume: p.volume.clone(),
                    device: p.device,
                    size_bytes: p.size_bytes,
                    block_size: p.block_size,
                    servers: p.servers,
                    generation: p.generation,
                },
            )
            .await?;
            to_value(volume_info(g, &p.site, &p.volume).await?)
        }
        "volume_delete" => {
            let p: VolumeRef = parse(params)?;
            write(
                host.site(&p.site)?,
                Command::VolumeDelete { volume: p.volume },
            )
            .await?;
            Ok(json!({}))
        }
        "volume_get" => {
            let p: VolumeRef = parse(params)?;
            let g = host.site(&p.site)?;
            g.linearize().await?;
            to_value(volume_info(g, &p.site, &p.volume).await?)
        }
        "volume_list" => {
            let p: SiteOnly = parse(params)?;
            let g = host.site(&p.site)?;
            g.linearize().await?;
            let names: Vec<String> = g
                .state
                .read()
                .expect("state lock")
                .state
                .volumes
                .keys()
                .cloned()
                .collect();
            let mut out = Vec::new();
            for n in names {
                out.push(to_value(volume_info(g, &p.site, &n).await?)?);
            }
            Ok(Value::Array(out))
        }
        "lease_acquire" => {
            let p: LeaseAcquire = parse(params)?;
            let grant = host
                .site(&p.site)?
                .grant_lease(&p.volume, &p.server_id, None, p.incarnation.as_deref())
                .await?;
            to_value(LeaseReply {
                epoch: grant.epoch,
                generation: grant.generation,
                lease_ms: grant.lease_ms,
            })
        }
        "lease_renew" => {
            let p: LeaseEpoch = parse(params)?;
            let grant = host
                .site(&p.site)?
                .grant_lease(
                    &p.volume,
                    &p.server_id,
                    Some(p.epoch),
                    p.incarnation.as_deref(),
                )
                .await?;
            to_value(LeaseReply {
                epoch: grant.epoch,
                generation: grant.generation,
                lease_ms: grant.lease_ms,
            })
        }
        "lease_release" => {
            let p: LeaseEpoch = parse(params)?;
            host.site(&p.site)?
                .release_lease(&p.volume, &p.server_id, p.epoch, p.incarnation.as_deref())
                .await?;
            Ok(json!({}))
        }
        "volume_set_in_sync" => {
            let p: SetInSync = parse(params)?;
            let g = host.site(&p.site)?;
            write(
                g,
                Command::SetInSync {
                    volume: p.volume.clone(),
                    server_id: p.server_id,
                    in_sync: p.in_sync,
                    epoch: p.epoch,
                },
            )
            .await?;
            to_value(volume_info(g, &p.site, &p.volume).await?)
        }
        "failover_request" => {
            let p: Failover = parse(params)?;
            let g = host.site(&p.site)?;
            tracing::info!(site = %p.site, volume = %p.volume, reason = %p.reason, force = p.force, "failover requested");
            match write(
                g,
                Command::Failover {
                    volume: p.volume,
                    from_epoch: p.epoch,
                    reason: p.reason,
                    force: p.force,
                },
            )
            .await?
            {
                Outcome::Failover {
                    primary,
                    epoch,
                    forced,
                } => to_value(FailoverReply {
                    primary,
                    epoch,
                    forced,
                }),
                other => Err(AuthError::Internal(format!("unexpected outcome {other:?}"))),
            }
        }
        "device_create" => {
            let p: DeviceCreate = parse(params)?;
            let g = host.group(&GroupId::Global)?;
            write(
                g,
                Command::DeviceCreate {
                    device: p.device.clone(),
                    size_bytes: p.size_bytes,
                    block_size: p.block_size,
                    volumes: p.volumes,
                    authoritative_site: p.authoritative_site,
                },
            )
            .await?;
            to_value(device_info(g, &p.device)?)
        }
        "device_delete" => {
            let p: DeviceRef = parse(params)?;
            write(
                host.group(&GroupId::Global)?,
                Command::DeviceDelete { device: p.device },
            )
            .await?;
            Ok(json!({}))
        }
        "device_get" => {
            let p: DeviceRef = parse(params)?;
            let g = host.group(&GroupId::Global)?;
            g.linearize().await?;
            to_value(device_info(g, &p.device)?)
        }
        "device_list" => {
            let g = host.group(&GroupId::Global)?;
            g.linearize().await?;
            let names: Vec<String> = g
                .state
                .read()
                .expect("state lock")
                .state
                .devices
                .keys()
                .cloned()
                .collect();
            names
                .iter()
                .map(|n| device_info(g, n).and_then(to_value))
                .collect::<Result<Vec<_>, _>>()
                .map(Value::Array)
        }
        "device_lease_acquire" | "device_lease_renew" => {
            let p: DeviceLease = parse(params)?;
            if method == "device_lease_renew" && p.generation.is_none() {
                return Err(AuthError::InvalidParams(
                    "missing field `generation`".into(),
                ));
            }
            let expect = if method == "device_lease_renew" {
                p.generation
            } else {
                None
            };
            let g = host.group(&GroupId::Global)?;
            let grant = g.grant_device_lease(&p.device, &p.site, expect).await?;
            Ok(json!({"generation": grant.generation, "lease_ms": grant.lease_ms}))
        }
        "device_lease_release" => {
            let p: DeviceLease = parse(params)?;
            let generation = p
                .generation
                .ok_or_else(|| AuthError::InvalidParams("missing field `generation`".into()))?;
            host.group(&GroupId::Global)?
                .release_device_lease(&p.device, &p.site, generation)
                .await?;
            Ok(json!({}))
        }
        "volume_promote" | "txn_get" | "txn_step" => crate::txn::call(host, method, params).await,
        "config_get" => {
            let p: GroupSel = parse(params)?;
            let mut out = serde_json::Map::new();
            for g in selected(host, &p.group)? {
                g.linearize().await?;
                let st = g.state.read().expect("state lock");
                out.insert(g.id.to_string(), to_value(&st.state)?);
            }
            Ok(Value::Object(out))
        }
        "cluster_status" => {
            let p: GroupSel = parse(params)?;
            let mut out = serde_json::Map::new();
            for g in selected(host, &p.group)? {
                let m = g.raft.metrics().borrow().clone();
                let (voters, nodes) = g.members();
                out.insert(
                    g.id.to_string(),
                    json!({
                        "node_id": g.node_id,
                        "state": format!("{:?}", m.state),
                        "term": m.current_term,
                        "leader": m.current_leader,
                        "leader_rpc_addr": g.leader_rpc_addr(),
                        "last_log_index": m.last_log_index,
                        "last_applied": m.last_applied.map(|l| l.index),
                        "snapshot": m.snapshot.map(|l| l.index),
                        "purged": m.purged.map(|l| l.index),
                        "log_entries_in_memory": g.log.live_entries(),
                        "voters": voters,
                        "nodes": nodes.into_iter().map(|(id, n)| json!({"id": id, "raft_addr": n.raft_addr, "rpc_addr": n.rpc_addr})).collect::<Vec<_>>(),
                    }),
                );
            }
            Ok(Value::Object(out))
        }
        "cluster_add_learner" => {
            let p: AddLearner = parse(params)?;
            let node = MemberAddr {
                raft_addr: p.raft_addr,
                rpc_addr: p.rpc_addr,
            };
            for g in selected(host, &p.group)? {
                g.raft
                    .add_learner(p.id, node.clone(), true)
                    .await
                    .map_err(write_error)?;
            }
            Ok(json!({}))
        }
        "cluster_change_membership" => {
            let p: ChangeMembership = parse(params)?;
            if p.voters.is_empty() {
                return Err(AuthError::InvalidParams("voters must not be empty".into()));
            }
            for g in selected(host, &p.group)? {
                // Joint consensus: openraft commits the joint config, then the new one.
                g.raft
                    .change_membership(p.voters.clone(), false)
                    .await
                    .map_err(write_error)?;
            }
            Ok(json!({}))
        }
        "rpc_get_methods" => Ok(json!(METHODS)),
        _ => Err(AuthError::Internal(NO_SUCH_METHOD.to_string())),
    }
}
