//! The method table: parameters, checks and result shapes of every method.
//!
//! Parsing the parameters (serde, unknown fields refused like SPDK does) is
//! separate from executing them (a [`Target`] method), so every parameter
//! error is -32602 and every domain error is SPDK's negative errno.

use std::path::PathBuf;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{attach_hint, RpcError};
use crate::bdev::replicated::ReplicatedOptions;
use crate::bdev::uring::{UringKind, UringOptions};
use crate::bdev::Bdev;
use crate::target::{ControllerRequest, Target, TargetError};
use crate::vhost::{ControllerInfo, PollMode};

type Handler = fn(&mut Target, Value) -> Result<Value, RpcError>;

/// Every method, in the order `rpc_get_methods` lists them.
const METHODS: &[(&str, Handler)] = &[
    ("rpc_get_methods", rpc_get_methods),
    ("spdk_get_version", spdk_get_version),
    ("framework_wait_init", framework_wait_init),
    ("spdk_kill_instance", spdk_kill_instance),
    ("framework_get_subsystems", framework_get_subsystems),
    ("framework_get_config", framework_get_config),
    ("save_config", save_config),
    ("bdev_malloc_create", bdev_malloc_create),
    ("bdev_malloc_delete", bdev_malloc_delete),
    ("bdev_null_create", bdev_null_create),
    ("bdev_null_delete", bdev_null_delete),
    ("bdev_uring_create", bdev_uring_create),
    ("bdev_uring_delete", bdev_uring_delete),
    ("bdev_aio_create", bdev_aio_create),
    ("bdev_aio_delete", bdev_aio_delete),
    ("bdev_replicated_create", bdev_replicated_create),
    ("bdev_replicated_delete", bdev_replicated_delete),
    ("bdev_replicated_cut", bdev_replicated_cut),
    ("keyring_file_add_key", keyring_file_add_key),
    ("keyring_file_remove_key", keyring_file_remove_key),
    ("keyring_get_keys", keyring_get_keys),
    ("bdev_get_bdevs", bdev_get_bdevs),
    ("bdev_get_iostat", bdev_get_iostat),
    ("bdev_wait_for_examine", bdev_wait_for_examine),
    ("vhost_create_blk_controller", vhost_create_blk_controller),
    ("vhost_get_controllers", vhost_get_controllers),
    ("vhost_delete_controller", vhost_delete_controller),
];

/// The names of every method.
pub fn method_names() -> impl Iterator<Item = &'static str> {
    METHODS.iter().map(|(n, _)| *n)
}

/// Runs one method. `params` of `None` is the same as `{}`.
pub fn call(target: &mut Target, method: &str, params: Option<Value>) -> Result<Value, RpcError> {
    let handler = METHODS
        .iter()
        .find(|(n, _)| *n == method)
        .map(|(_, h)| *h)
        .ok_or_else(|| RpcError::method_not_found(method))?;
    handler(target, params.unwrap_or_else(|| json!({})))
}

fn parse<P: DeserializeOwned>(params: Value) -> Result<P, RpcError> {
    serde_json::from_value(params).map_err(RpcError::invalid_params)
}

fn parse_uuid(uuid: Option<&str>) -> Result<Option<uuid::Uuid>, RpcError> {
    uuid.map(|u| {
        uuid::Uuid::parse_str(u).map_err(|e| RpcError::invalid_params(format!("uuid {u:?}: {e}")))
    })
    .transpose()
}

fn einval(msg: String) -> RpcError {
    TargetError::InvalidParam(msg).into()
}

/// SPDK's metadata / protection-information options: accepted at their
/// defaults (SPDK's save_config writes them), refused otherwise.
fn check_no_metadata(
    block_size: u32,
    physical_block_size: Option<u32>,
    md_size: Option<u32>,
    dif_type: Option<u32>,
) -> Result<(), RpcError> {
    if let Some(p) = physical_block_size.filter(|&p| p != 0 && p != block_size) {
        return Err(einval(format!(
            "physical_block_size {p} different from block_size {block_size} is not supported"
        )));
    }
    if md_size.unwrap_or(0) != 0 {
        return Err(einval("md_size other than 0 is not supported".into()));
    }
    if dif_type.unwrap_or(0) != 0 {
        return Err(einval("dif_type other than 0 is not supported".into()));
    }
    Ok(())
}

/// For methods that take no parameters: `{}` or nothing.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NoParams {}

// ---- framework ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct GetMethodsParams {
    #[serde(default)]
    current: bool,
    #[serde(default)]
    include_aliases: bool,
}

fn rpc_get_methods(_t: &mut Target, p: Value) -> Result<Value, RpcError> {
    // Tandem has no start-up RPC state and no aliases: both flags change nothing.
    let GetMethodsParams { .. } = parse(p)?;
    Ok(json!(method_names().collect::<Vec<_>>()))
}

fn spdk_get_version(_t: &mut Target, p: Value) -> Result<Value, RpcError> {
    let NoParams {} = parse(p)?;
    let v = env!("CARGO_PKG_VERSION");
    Ok(json!({
        "version": format!("Tandem vhost-target v{v} (SPDK-compatible JSON-RPC)"),
        "fields": {
            "major": env!("CARGO_PKG_VERSION_MAJOR").parse::<u32>().unwrap_or(0),
            "minor": env!("CARGO_PKG_VERSION_MINOR").parse::<u32>().unwrap_or(0),
            "patch": env!("CARGO_PKG_VERSION_PATCH").parse::<u32>().unwrap_or(0),
            "suffix": env!("CARGO_PKG_VERSION_PRE"),
        }
    }))
}

fn framework_wait_init(_t: &mut Target, p: Value) -> Result<Value, RpcError> {
    // The RPC socket only opens once start-up (config replay) is done.
    let NoParams {} = parse(p)?;
    Ok(json!(true))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KillParams {
    sig_name: String,
}

/// Stops the daemon the way SPDK's test scripts do: the signal goes to this
/// process, where `serve` waits for it and shuts down gracefully.
fn spdk_kill_instance(_t: &mut Target, p: Value) -> Result<Value, RpcError> {
    let KillParams { sig_name } = parse(p)?;
    let sig = match sig_name.as_str() {
        "SIGINT" => libc::SIGINT,
        "SIGTERM" => libc::SIGTERM,
        other => {
            return Err(einval(format!(
                "sig_name {other:?}: only SIGINT and SIGTERM stop the target"
            )))
        }
    };
    tracing::info!(signal = %sig_name, "spdk_kill_instance");
    // SAFETY: kill(2) with our own pid and a valid signal number.
    if unsafe { libc::kill(libc::getpid(), sig) } != 0 {
        return Err(RpcError::internal(std::io::Error::last_os_error()));
    }
    Ok(json!(true))
}

fn framework_get_subsystems(_t: &mut Target, p: Value) -> Result<Value, RpcError> {
    let NoParams {} = parse(p)?;
    Ok(Value::Array(
        crate::config::subsystems()
            .map(|(name, deps)| json!({ "subsystem": name, "depends_on": deps }))
            .collect(),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GetConfigParams {
    name: String,
    /// SPDK may group calls into batch arrays; Tandem's lists are always flat.
    #[allow(dead_code)]
    with_batches: Option<bool>,
}

/// One subsystem's part of `save_config` (rpc.py's save_config is built from these).
fn framework_get_config(t: &mut Target, p: Value) -> Result<Value, RpcError> {
    let p: GetConfigParams = parse(p)?;
    crate::config::subsystem_config(t, &p.name)
        .map(Value::Array)
        .ok_or_else(|| RpcError::invalid_params(format!("subsystem {} not found", p.name)))
}

fn save_config(t: &mut Target, p: Value) -> Result<Value, RpcError> {
    let NoParams {} = parse(p)?;
    Ok(crate::config::save(t))
}

// ---- bdevs ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MallocCreateParams {
    name: Option<String>,
    num_blocks: u64,
    block_size: u32,
    uuid: Option<String>,
    physical_block_size: Option<u32>,
    #[allow(dead_code)]
    optimal_io_boundary: Option<u32>,
    md_size: Option<u32>,
    #[allow(dead_code)]
    md_interleave: Option<bool>,
    dif_type: Option<u32>,
    #[allow(dead_code)]
    dif_is_head_of_md: Option<bool>,
    #[allow(dead_code)]
    dif_pi_format: Option<u32>,
}

fn bdev_malloc_create(t: &mut Target, p: Value) -> Result<Value, RpcError> {
    let p: MallocCreateParams = parse(p)?;
    check_no_metadata(p.block_size, p.physical_block_size, p.md_size, p.dif_type)?;
    let uuid = parse_uuid(p.uuid.as_deref())?;
    let name = t.create_malloc_bdev(p.name.as_deref(), p.num_blocks, p.block_size, uuid)?;
    Ok(json!(name))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NullCreateParams {
    name: String,
    num_blocks: u64,
    block_size: u32,
    uuid: Option<String>,
    physical_block_size: Option<u32>,
    md_size: Option<u32>,
    dif_type: Option<u32>,
    #[allow(dead_code)]
    dif_is_head_of_md: Option<bool>,
    #[allow(dead_code)]
    dif_pi_format: Option<u32>,
}

fn bdev_null_create(t: &mut Target, p: Value) -> Result<Value, RpcError> {
    let p: NullCreateParams = parse(p)?;
    check_no_metadata(p.block_size, p.physical_block_size, p.md_size, p.dif_type)?;
    let uuid = parse_uuid(p.uuid.as_deref())?;
    Ok(json!(t.create_null_bdev(
        &p.name,
        p.num_blocks,
        p.block_size,
        uuid
    )?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UringCreateParams {
    name: String,
    filename: String,
    block_size: Option<u32>,
    uuid: Option<String>,
}

fn bdev_uring_create(t: &mut Target, p: Value) -> Result<Value, RpcError> {
    let p: UringCreateParams = parse(p)?;
    let opts = UringOptions {
        name: p.name,
        filename: PathBuf::from(p.filename),
        block_size: p.block_size.filter(|&b| b != 0),
        readonly: false,
        uuid: parse_uuid(p.uuid.as_deref())?,
        kind: UringKind::Uring,
    };
    Ok(json!(t.create_uring_bdev(opts)?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AioCreateParams {
    name: String,
    filename: String,
    block_size: Option<u32>,
    #[serde(default)]
    readonly: bool,
    /// SPDK: use fallocate for unmap/write_zeroes. Tandem's file bdev decides
    /// that itself; accepted so SPDK configs load.
    #[allow(dead_code)]
    fallocate: Option<bool>,
    /// SPDK: submit with RWF_NOWAIT. A hint Tandem's io_uring path does
    /// without; accepted so rpc.py (which always sends it) works.
    #[allow(dead_code)]
    nowait: Option<bool>,
    uuid: Option<String>,
}

fn bdev_aio_create(t: &mut Target, p: Value) -> Result<Value, RpcError> {
    let p: AioCreateParams = parse(p)?;
    let opts = UringOptions {
        name: p.name,
        filename: PathBuf::from(p.filename),
        block_size: p.block_size.filter(|&b| b != 0),
        readonly: p.readonly,
        uuid: parse_uuid(p.uuid.as_deref())?,
        kind: UringKind::Aio,
    };
    Ok(json!(t.create_uring_bdev(opts)?))
}

/// One address or several: `"127.0.0.1:7300"` or `["a:7300", "b:7300"]`.
#[derive(Deserialize)]
#[serde(untagged)]
enum Addresses {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReplicatedCreateParams {
    name: String,
    authority: Addresses,
    /// The device; its authoritative volume is attached. Or `volume` (and `site`).
    device: Option<String>,
    site: Option<String>,
    volume: Option<String>,
    key_name: String,
    uuid: Option<String>,
    io_timeout_ms: Option<u64>,
    takeover_after_ms: Option<u64>,
    /// The site's shared key file (absolute path), when its servers authenticate peers.
    peer_key_file: Option<std::path::PathBuf>,
}

fn bdev_replicated_create(t: &mut Target, p: Value) -> Result<Value, RpcError> {
    let p: ReplicatedCreateParams = parse(p)?;
    let authority = match p.authority {
        Addresses::One(a) => a.split(',').map(|s| s.trim().to_owned()).collect(),
        Addresses::Many(v) => v,
    };
    if authority.iter().any(|a| a.is_empty()) {
        return Err(einval("authority: empty address".into()));
    }
    let ms = |v: Option<u64>, d: std::time::Duration, what: &str| match v {
        None => Ok(d),
        Some(0) => Err(einval(format!("{what} must be above 0"))),
        Some(ms) => Ok(std::time::Duration::from_millis(ms)),
    };
    if p.device.is_none() && p.volume.is_none() {
        return Err(einval("give device, or volume (and site)".into()));
    }
    let opts = ReplicatedOptions {
        name: p.name,
        authority,
        device: p.device,
        site: p.site.unwrap_or_else(|| "site-a".into()),
        volume: p.volume.unwrap_or_default(),
        key_name: p.key_name,
        uuid: parse_uuid(p.uuid.as_deref())?,
        io_timeout: ms(
            p.io_timeout_ms,
            ReplicatedOptions::DEFAULT_IO_TIMEOUT,
            "io_timeout_ms",
        )?,
        takeover_after: ms(
            p.takeover_after_ms,
            ReplicatedOptions::DEFAULT_TAKEOVER_AFTER,
            "takeover_after_ms",
        )?,
        cut_servers: None,
        peer_key_file: p.peer_key_file,
    };
    Ok(json!(t.create_replicated_bdev(opts)?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CutParams {
    name: String,
    /// Server ids this bdev acts as if it cannot reach; empty heals.
    servers: Vec<String>,
}

/// Fault injection (Tandem only, with `--enable-fault-injection`): a one-sided network cut
/// between this target and some replicator servers.
fn bdev_replicated_cut(t: &mut Target, p: Value) -> Result<Value, RpcError> {
    let p: CutParams = parse(p)?;
    t.cut_replicated(&p.name, &p.servers)?;
    Ok(json!(true))
}

fn bdev_replicated_delete(t: &mut Target, p: Value) -> Result<Value, RpcError> {
    delete_of_kind(t, p, "replicated")
}

// ---- keyring ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFileParams {
    name: String,
    path: String,
}

fn keyring_file_add_key(t: &mut Target, p: Value) -> Result<Value, RpcError> {
    let p: KeyFileParams = parse(p)?;
    t.keyring_mut()
        .add_file_key(&p.name, std::path::Path::new(&p.path))
        .map_err(TargetError::from)?;
    Ok(json!(true))
}

fn keyring_file_remove_key(t: &mut Target, p: Value) -> Result<Value, RpcError> {
    let NameParams { name } = parse(p)?;
    t.keyring_mut().remove(&name).map_err(TargetError::from)?;
    Ok(json!(true))
}

fn keyring_get_keys(t: &mut Target, p: Value) -> Result<Value, RpcError> {
    let NoParams {} = parse(p)?;
    Ok(Value::Array(
        t.keyring()
            .describe()
            .into_iter()
            .map(|k| {
                json!({
                    "name": k.name,
                    "module": "keyring_file",
                    "path": k.path,
                    "removed": false,
                    "probed": false,
                    // Tandem extensions: the key check value (identifies, never reveals, the
                    // key) and whether a bdev holds the key.
                    "check": k.check,
                    "in_use": k.in_use,
                })
            })
            .collect(),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NameParams {
    name: String,
}

fn delete_of_kind(t: &mut Target, p: Value, kind: &'static str) -> Result<Value, RpcError> {
    let NameParams { name } = parse(p)?;
    t.delete_bdev(&name, kind)?;
    Ok(json!(true))
}

fn bdev_malloc_delete(t: &mut Target, p: Value) -> Result<Value, RpcError> {
    delete_of_kind(t, p, "malloc")
}
fn bdev_null_delete(t: &mut Target, p: Value) -> Result<Value, RpcError> {
    delete_of_kind(t, p, "null")
}
fn bdev_uring_delete(t: &mut Target, p: Value) -> Result<Value, RpcError> {
    delete_of_kind(t, p, "uring")
}
fn bdev_aio_delete(t: &mut Target, p: Value) -> Result<Value, RpcError> {
    delete_of_kind(t, p, "aio")
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GetBdevsParams {
    name: Option<String>,
    /// SPDK waits this long for the bdev to appear; Tandem's bdevs exist as
    /// soon as their create call returns, so there is nothing to wait for.
    #[allow(dead_code)]
    timeout: Option<u64>,
}

/// The bdevs a `{name?}` query selects: one (or -19), or all.
fn select_bdevs(t: &Target, name: Option<&str>) -> Result<Vec<Arc<dyn Bdev>>, RpcError> {
    Ok(match name {
        Some(n) => vec![t.bdev(n)?.clone()],
        None => t.bdevs().cloned().collect(),
    })
}

fn bdev_json(t: &Target, b: &dyn Bdev) -> Value {
    let i = b.info();
    let claimed_by = t.claimed_by(&i.name);
    let mut v = json!({
        "name": i.name,
        "aliases": [],
        "product_name": i.product_name,
        "block_size": i.block_size,
        "num_blocks": i.num_blocks,
        "uuid": i.uuid.to_string(),
        "assigned_rate_limits": {
            "rw_ios_per_sec": 0,
            "rw_mbytes_per_sec": 0,
            "r_mbytes_per_sec": 0,
            "w_mbytes_per_sec": 0
        },
        "claimed": claimed_by.is_some(),
        "zoned": false,
        "supported_io_types": {
            "read": true,
            "write": !i.caps.read_only,
            "unmap": i.caps.discard,
            "write_zeroes": i.caps.write_zeroes,
            "flush": i.caps.flush,
            "reset": false,
            "compare": false,
            "compare_and_write": false,
            "abort": false,
            "nvme_admin": false,
            "nvme_io": false
        },
        "driver_specific": b.driver_specific(),
    });
    if let (Some(ctrlr), Some(obj)) = (claimed_by, v.as_object_mut()) {
        obj.insert("claim_type".into(), json!("exclusive_write"));
        // Tandem extension: who holds the claim.
        obj.insert("claimed_by".into(), json!(ctrlr));
    }
    v
}

fn bdev_get_bdevs(t: &mut Target, p: Value) -> Result<Value, RpcError> {
    let p: GetBdevsParams = parse(p)?;
    let bdevs = select_bdevs(t, p.name.as_deref())?;
    Ok(Value::Array(
        bdevs.iter().map(|b| bdev_json(t, b.as_ref())).collect(),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GetIostatParams {
    name: Option<String>,
    #[serde(default)]
    per_channel: bool,
}

/// CLOCK_MONOTONIC in nanoseconds: the `ticks` of `bdev_get_iostat`, whose
/// `tick_rate` is 1e9 because the latency counters are in nanoseconds.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid, writable timespec; CLOCK_MONOTONIC always exists on Linux.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    if rc != 0 {
        return 0;
    }
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

fn bdev_get_iostat(t: &mut Target, p: Value) -> Result<Value, RpcError> {
    let p: GetIostatParams = parse(p)?;
    if p.per_channel {
        return Err(einval("per_channel statistics are not supported".into()));
    }
    let bdevs = select_bdevs(t, p.name.as_deref())?;
    let list: Vec<Value> = bdevs
        .iter()
        .map(|b| {
            let s = b.iostat().snapshot();
            json!({
                "name": b.info().name,
                "bytes_read": s.bytes_read,
                "num_read_ops": s.num_read_ops,
                "bytes_written": s.bytes_written,
                "num_write_ops": s.num_write_ops,
                "bytes_unmapped": s.bytes_unmapped,
                "num_unmap_ops": s.num_unmap_ops,
                "bytes_copied": 0,
                "num_copy_ops": 0,
                "read_latency_ticks": s.read_latency_ticks,
                "write_latency_ticks": s.write_latency_ticks,
                "unmap_latency_ticks": s.unmap_latency_ticks,
                "copy_latency_ticks": 0,
                // Tandem extensions.
                "bytes_write_zeroes": s.bytes_write_zeroes,
                "num_write_zeroes_ops": s.num_write_zeroes_ops,
                "num_flush_ops": s.num_flush_ops,
                "num_io_errors": s.num_io_errors,
                // Per-bucket counts; bucket i holds latencies up to
                // latency_buckets_us[i], the last one everything above.
                "latency_buckets_us": crate::bdev::iostat::LATENCY_BUCKETS_US,
                "read_latency_histogram": s.read_latency_histogram,
                "write_latency_histogram": s.write_latency_histogram,
            })
        })
        .collect();
    Ok(json!({
        "tick_rate": 1_000_000_000u64,
        "ticks": monotonic_ns(),
        "bdevs": list,
    }))
}

fn bdev_wait_for_examine(_t: &mut Target, p: Value) -> Result<Value, RpcError> {
    // Tandem has no examine step (no partition or lvol auto-discovery).
    let NoParams {} = parse(p)?;
    Ok(json!(true))
}

// ---- vhost ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBlkControllerParams {
    ctrlr: String,
    dev_name: String,
    cpumask: Option<String>,
    #[serde(default)]
    readonly: bool,
    transport: Option<String>,
    #[serde(default)]
    packed_ring: bool,
    #[allow(dead_code)]
    packed_ring_recovery: Option<bool>,
    /// Tandem extension.
    poll_mode: Option<PollMode>,
    /// Tandem extension.
    num_queues: Option<u16>,
}

fn vhost_create_blk_controller(t: &mut Target, p: Value) -> Result<Value, RpcError> {
    let p: CreateBlkControllerParams = parse(p)?;
    if let Some(tr) = p.transport.as_deref().filter(|&tr| tr != "vhost_user_blk") {
        return Err(einval(format!(
            "transport {tr:?} is not supported; Tandem serves vhost_user_blk only"
        )));
    }
    if p.packed_ring {
        return Err(einval(
            "packed_ring is not supported; Tandem serves split virtqueues".into(),
        ));
    }
    let info = t.create_controller(ControllerRequest {
        name: p.ctrlr,
        bdev: p.dev_name,
        cpumask: p.cpumask,
        readonly: p.readonly,
        poll_mode: p.poll_mode,
        num_queues: p.num_queues,
    })?;
    attach_hint::log(&info);
    Ok(json!(true))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GetControllersParams {
    name: Option<String>,
}

fn controller_json(c: &ControllerInfo) -> Value {
    // SPDK lists vhost-user sessions; Tandem serves one frontend at a time.
    let sessions = if c.connected {
        json!([{ "id": 0, "name": format!("{}s0", c.ctrlr), "started": true }])
    } else {
        json!([])
    };
    json!({
        "ctrlr": c.ctrlr,
        "cpumask": c.cpumask,
        "delay_base_us": 0,
        "iops_threshold": 0,
        "socket": c.socket,
        "sessions": sessions,
        "backend_specific": {
            "block": {
                "readonly": c.readonly,
                "bdev": c.bdev,
                "transport": "vhost_user_blk",
                // Tandem extensions.
                "poll_mode": c.poll_mode,
                "num_queues": c.max_queues,
                "connected": c.connected,
                "bad_requests": c.bad_requests,
            }
        }
    })
}

fn vhost_get_controllers(t: &mut Target, p: Value) -> Result<Value, RpcError> {
    let p: GetControllersParams = parse(p)?;
    let list = match p.name {
        Some(n) => vec![t.controller_info(&n)?],
        None => t.controllers(),
    };
    Ok(Value::Array(list.iter().map(controller_json).collect()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeleteControllerParams {
    ctrlr: String,
}

fn vhost_delete_controller(t: &mut Target, p: Value) -> Result<Value, RpcError> {
    let DeleteControllerParams { ctrlr } = parse(p)?;
    t.delete_controller(&ctrlr)?;
    Ok(json!(true))
}
