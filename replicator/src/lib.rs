//! Tandem's storage server (`replicator serve`) and the client side of its replication
//! protocol (`ReplicationPipeline`, which `vhost-target` links). See `docs/replication.md`.

pub mod authority;
pub mod bench;
pub mod cli;
pub mod conn;
pub mod cpu_latency;
pub mod frame;
pub mod health;
pub mod local_site;
pub mod peer_auth;
pub mod pipeline;
pub mod secret_file;
pub mod server;
pub mod stamp;
pub mod store;
pub mod volume_key;
