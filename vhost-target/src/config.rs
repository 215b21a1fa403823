//! SPDK-format configuration files: `save_config` writes one, `serve -c`
//! replays one.
//!
//! The format is SPDK's: `{"subsystems": [{"subsystem": "bdev", "config":
//! [{"method": "bdev_malloc_create", "params": {...}}, ...]}, ...]}`. Replay
//! goes through the same dispatch as the RPC socket, so a config can do
//! exactly what a client could, with the same checks and errors.
//!
//! Tandem has two of SPDK's subsystems, `bdev` and `vhost_blk`; they are
//! replayed in that order whatever the file's order. Other subsystems (SPDK's
//! save_config writes many: `iobuf`, `sock`, `accel`, `scsi`, ...) are skipped
//! with a warning when they hold anything. Inside a known subsystem, the
//! option methods SPDK writes at their defaults are skipped with a warning;
//! any other unknown method stops start-up with an error naming it and the file.

use std::path::Path;

use serde::Deserialize;
use serde_json::{json, Value};

use crate::rpc::{self, RpcError};
use crate::target::Target;

/// Tandem's subsystems and what each depends on, in initialisation order
/// (`framework_get_subsystems`).
pub fn subsystems() -> impl Iterator<Item = (&'static str, &'static [&'static str])> {
    [
        ("keyring", &[][..]),
        ("bdev", &["keyring"][..]),
        ("vhost_blk", &["bdev"][..]),
    ]
    .into_iter()
}

/// The subsystems Tandem replays, in replay order, with the methods each may hold.
const SUBSYSTEMS: &[(&str, &[&str])] = &[
    ("keyring", &["keyring_file_add_key"]),
    (
        "bdev",
        &[
            "bdev_malloc_create",
            "bdev_null_create",
            "bdev_uring_create",
            "bdev_aio_create",
            "bdev_replicated_create",
            "bdev_wait_for_examine",
        ],
    ),
    ("vhost_blk", &["vhost_create_blk_controller"]),
];

/// Methods SPDK's save_config writes that set options Tandem does not have.
/// Skipped with a warning so SPDK's own configs load.
const IGNORED_METHODS: &[&str] = &[
    "bdev_set_options",
    "bdev_nvme_set_options",
    "bdev_nvme_set_hotplug",
    "bdev_iscsi_set_options",
    "bdev_raid_set_options",
    "bdev_examine",
    "vhost_controller_set_coalescing",
];

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("config {path} is not an SPDK JSON config: {source}")]
    Parse {
        path: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("config {path}: method {method} (subsystem {subsystem}) is not supported by Tandem")]
    UnknownMethod {
        path: String,
        subsystem: String,
        method: String,
    },
    #[error("config {path}: {method} failed: {source}")]
    Method {
        path: String,
        method: String,
        #[source]
        source: RpcError,
    },
}

#[derive(Deserialize)]
struct ConfigFile {
    subsystems: Vec<SubsystemConfig>,
}

#[derive(Deserialize)]
struct SubsystemConfig {
    subsystem: String,
    #[serde(default)]
    config: Option<Vec<ConfigElem>>,
}

/// SPDK may write a batch (an array of calls) where a call would be.
#[derive(Deserialize)]
#[serde(untagged)]
enum ConfigElem {
    One(MethodCall),
    Batch(Vec<MethodCall>),
}

impl ConfigElem {
    fn calls(&self) -> &[MethodCall] {
        match self {
            ConfigElem::One(c) => std::slice::from_ref(c),
            ConfigElem::Batch(b) => b,
        }
    }
}

#[derive(Deserialize)]
struct MethodCall {
    method: String,
    #[serde(default)]
    params: Option<Value>,
}

/// Replays the config file at `path` into `target`.
pub fn load_file(path: &Path, target: &mut Target) -> Result<(), ConfigError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: shown.clone(),
        source,
    })?;
    load_str(&text, &shown, target)
}

/// Replays config `text`; `origin` names it in errors and logs.
pub fn load_str(text: &str, origin: &str, target: &mut Target) -> Result<(), ConfigError> {
    let file: ConfigFile = serde_json::from_str(text).map_err(|source| ConfigError::Parse {
        path: origin.to_owned(),
        source,
    })?;
    for s in &file.subsystems {
        let known = SUBSYSTEMS.iter().any(|(n, _)| *n == s.subsystem);
        let empty = s.config.as_ref().is_none_or(|c| c.is_empty());
        if !known && !empty {
            tracing::warn!(
                config = origin,
                subsystem = %s.subsystem,
                "skipping subsystem that Tandem does not have"
            );
        }
    }
    // Check every method before running any, so a bad file creates nothing.
    let plan: Vec<&MethodCall> = SUBSYSTEMS
        .iter()
        .flat_map(|(subsystem, allowed)| {
            file.subsystems
                .iter()
                .filter(move |s| s.subsystem == *subsystem)
                .flat_map(|s| s.config.iter().flatten())
                .flat_map(ConfigElem::calls)
                .map(move |c| (*subsystem, *allowed, c))
        })
        .map(|(subsystem, allowed, c)| {
            if IGNORED_METHODS.contains(&c.method.as_str()) || allowed.contains(&c.method.as_str())
            {
                Ok(c)
            } else {
                Err(ConfigError::UnknownMethod {
                    path: origin.to_owned(),
                    subsystem: subsystem.to_owned(),
                    method: c.method.clone(),
                })
            }
        })
        .collect::<Result<_, _>>()?;
    for c in plan {
        if IGNORED_METHODS.contains(&c.method.as_str()) {
            tracing::warn!(
                config = origin,
                method = %c.method,
                "skipping option method that Tandem does not have"
            );
            continue;
        }
        rpc::call(target, &c.method, c.params.clone()).map_err(|source| ConfigError::Method {
            path: origin.to_owned(),
            method: c.method.clone(),
            source,
        })?;
    }
    Ok(())
}

/// The target's state as an SPDK config (`save_config`): every bdev, then
/// every controller, in name order, each as the call that recreates it.
pub fn save(target: &Target) -> Value {
    let subsystems: Vec<Value> = subsystems()
        .filter_map(|(name, _)| {
            let config = subsystem_config(target, name)?;
            Some(json!({ "subsystem": name, "config": config }))
        })
        .collect();
    json!({ "subsystems": subsystems })
}

/// One subsystem's calls (`framework_get_config`); `None` for a subsystem
/// Tandem does not have.
pub fn subsystem_config(target: &Target, subsystem: &str) -> Option<Vec<Value>> {
    match subsystem {
        // Keys are saved by file, never by value: the file stays the one place the key is.
        "keyring" => Some(
            target
                .keyring()
                .describe()
                .into_iter()
                .map(|k| {
                    json!({
                        "method": "keyring_file_add_key",
                        "params": { "name": k.name, "path": k.path },
                    })
                })
                .collect(),
        ),
        "bdev" => Some(
            target
                .bdevs()
                .map(|b| {
                    json!({
                        "method": format!("bdev_{}_create", b.kind()),
                        "params": b.create_params(),
                    })
                })
                .collect(),
        ),
        "vhost_blk" => Some(
            target
                .controllers()
                .iter()
                .map(|c| {
                    json!({
                        "method": "vhost_create_blk_controller",
                        "params": {
                            "ctrlr": c.ctrlr,
                            "dev_name": c.bdev,
                            "cpumask": c.cpumask,
                            "readonly": c.readonly,
                            "poll_mode": c.poll_mode,
                            "num_queues": c.max_queues,
                        }
                    })
                })
                .collect(),
        ),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::target::fakes::{placeholder_bdevs, target, FakeBdev};

    #[test]
    fn save_lists_bdevs_then_controllers_as_replayable_calls() {
        let mut t = target();
        t.register_bdev(FakeBdev::shared("Null0", "null")).unwrap();
        rpc::call(
            &mut t,
            "vhost_create_blk_controller",
            Some(json!({"ctrlr": "vhost.0", "dev_name": "Null0", "num_queues": 2})),
        )
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("k0");
        let hex: String = (0..64u8).map(|i| format!("{i:02x}")).collect();
        std::fs::write(&key, &hex).unwrap();
        std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        rpc::call(
            &mut t,
            "keyring_file_add_key",
            Some(json!({"name": "k0", "path": key})),
        )
        .unwrap();
        let cfg = save(&t);
        // Keys first (bdevs need them), by file: the key itself is never in a config.
        assert_eq!(cfg["subsystems"][0]["subsystem"], "keyring");
        assert_eq!(
            cfg["subsystems"][0]["config"],
            json!([{"method": "keyring_file_add_key", "params": {"name": "k0", "path": key}}])
        );
        assert!(!cfg.to_string().contains(&hex[..32]));
        assert_eq!(cfg["subsystems"][1]["subsystem"], "bdev");
        assert_eq!(
            cfg["subsystems"][1]["config"][0]["method"],
            "bdev_null_create"
        );
        assert_eq!(cfg["subsystems"][1]["config"][0]["params"]["name"], "Null0");
        let ctrlr = &cfg["subsystems"][2]["config"][0];
        assert_eq!(ctrlr["method"], "vhost_create_blk_controller");
        assert_eq!(
            ctrlr["params"],
            json!({"ctrlr": "vhost.0", "dev_name": "Null0", "cpumask": "0x1",
                   "readonly": false, "poll_mode": "adaptive", "num_queues": 2})
        );
    }

    #[test]
    fn unknown_method_in_known_subsystem_names_method_and_file() {
        let mut t = target();
        t.register_bdev(FakeBdev::shared("Malloc0", "malloc"))
            .unwrap();
        let text = r#"{"subsystems": [
            {"subsystem": "vhost_blk", "config": [
                {"method": "vhost_create_blk_controller",
                 "params": {"ctrlr": "vhost.0", "dev_name": "Malloc0"}}]},
            {"subsystem": "bdev", "config": [
                {"method": "bdev_lvol_create", "params": {}}]}]}"#;
        let e = load_str(text, "my.json", &mut t).unwrap_err();
        assert!(t.controllers().is_empty(), "nothing runs before the check");
        let msg = e.to_string();
        assert!(
            msg.contains("bdev_lvol_create") && msg.contains("my.json"),
            "{msg}"
        );
    }

    #[test]
    fn spdk_defaults_and_foreign_subsystems_are_skipped() {
        let mut t = target();
        t.register_bdev(FakeBdev::shared("Malloc0", "malloc"))
            .unwrap();
        let text = r#"{"subsystems": [
            {"subsystem": "vhost_blk", "config": [
                {"method": "vhost_create_blk_controller",
                 "params": {"ctrlr": "vhost.0", "dev_name": "Malloc0", "cpumask": "0x1",
                            "transport": "vhost_user_blk"}},
                {"method": "vhost_controller_set_coalescing",
                 "params": {"ctrlr": "vhost.0", "delay_base_us": 0, "iops_threshold": 60000}}]},
            {"subsystem": "iobuf", "config": [{"method": "iobuf_set_options", "params": {}}]},
            {"subsystem": "scheduler", "config": null},
            {"subsystem": "bdev", "config": [
                {"method": "bdev_set_options", "params": {"bdev_io_pool_size": 65535}},
                {"method": "bdev_wait_for_examine"}]}
        ]}"#;
        load_str(text, "spdk.json", &mut t).unwrap();
        assert_eq!(t.controllers().len(), 1);
    }

    #[test]
    fn a_failing_method_names_itself_and_the_file() {
        let mut t = target();
        let text = r#"{"subsystems": [{"subsystem": "vhost_blk", "config": [
            {"method": "vhost_create_blk_controller",
             "params": {"ctrlr": "vhost.0", "dev_name": "Missing"}}]}]}"#;
        let e = load_str(text, "c.json", &mut t).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("c.json")
                && msg.contains("vhost_create_blk_controller")
                && msg.contains("Missing"),
            "{msg}"
        );
    }

    #[test]
    fn batches_in_a_config_are_flattened() {
        let mut t = target();
        t.register_bdev(FakeBdev::shared("Malloc0", "malloc"))
            .unwrap();
        let text = r#"{"subsystems": [{"subsystem": "vhost_blk", "config": [[
            {"method": "vhost_create_blk_controller",
             "params": {"ctrlr": "vhost.0", "dev_name": "Malloc0"}}]]}]}"#;
        load_str(text, "b.json", &mut t).unwrap();
        assert_eq!(t.controllers().len(), 1);
    }

    #[test]
    fn not_a_config_is_a_parse_error() {
        let mut t = target();
        assert!(matches!(
            load_str("[1,2]", "x.json", &mut t),
            Err(ConfigError::Parse { .. })
        ));
    }

    #[test]
    fn save_then_load_round_trips() {
        if placeholder_bdevs() {
            return;
        }
        let mut a = target();
        rpc::call(
            &mut a,
            "bdev_null_create",
            Some(json!({"name": "Null0", "num_blocks": 1024, "block_size": 512})),
        )
        .unwrap();
        rpc::call(
            &mut a,
            "bdev_malloc_create",
            Some(json!({"num_blocks": 256, "block_size": 4096})),
        )
        .unwrap();
        rpc::call(
            &mut a,
            "vhost_create_blk_controller",
            Some(
                json!({"ctrlr": "vhost.0", "dev_name": "Malloc0", "cpumask": "0x2",
                        "readonly": true, "poll_mode": "poll", "num_queues": 8}),
            ),
        )
        .unwrap();
        let saved = save(&a);
        let mut b = target();
        load_str(&saved.to_string(), "saved.json", &mut b).unwrap();
        assert_eq!(save(&b), saved);
    }

    #[test]
    fn shipped_configs_parse_and_use_only_known_methods() {
        for text in [
            include_str!("../configs/default.json"),
            include_str!("../configs/uring-example.json"),
        ] {
            let file: ConfigFile = serde_json::from_str(text).unwrap();
            for s in &file.subsystems {
                let (_, allowed) = SUBSYSTEMS.iter().find(|(n, _)| *n == s.subsystem).unwrap();
                for c in s.config.iter().flatten().flat_map(ConfigElem::calls) {
                    assert!(allowed.contains(&c.method.as_str()), "{}", c.method);
                }
            }
        }
    }

    #[test]
    fn default_config_loads() {
        if placeholder_bdevs() {
            return;
        }
        let mut t = target();
        load_str(
            include_str!("../configs/default.json"),
            "default.json",
            &mut t,
        )
        .unwrap();
        let b = t.bdev("Malloc0").unwrap();
        assert_eq!(b.info().size_bytes(), 256 << 20);
        assert_eq!(t.controller_info("vhost.0").unwrap().bdev, "Malloc0");
    }
}
