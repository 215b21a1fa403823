//! Tandem's vhost-user-blk target.
//!
//! Code map (docs/architecture.md has the whole picture):
//! - [`bdev`]: block devices under a controller (null, malloc, uring).
//! - [`blk`]: virtio-blk config space and request parsing (pure, fuzzed).
//! - [`vhost`]: vhost-user protocol, controllers, polled queue workers.
//! - [`target`]: the registry of bdevs and controllers; the one owner of that state.
//! - [`rpc`]: the SPDK-compatible JSON-RPC 2.0 control socket and its client.
//! - [`config`]: SPDK-format configuration files (`save_config`, `-c`).
//! - [`loadgen`]: a guest-less vhost-user frontend that generates load.

pub mod bdev;
pub mod blk;
pub mod cluster;
pub mod config;
pub mod cpumask;
pub mod keyring;
pub mod loadgen;
pub mod metrics;
pub mod rpc;
pub mod target;
pub mod vhost;
