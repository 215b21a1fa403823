//! One command for a whole local cluster (`vhost-target cluster`): the embedded default of the
//! replicated product. It starts an authority and two replicator servers on loopback
//! (`replicator::local_site`: the authority in this process, the servers as child processes
//! of this same binary, through its hidden `replicator-serve` subcommand), creates a device and
//! its volume, a volume key, and serves the device as a replicated bdev behind a vhost-user-blk
//! controller, with JSON-RPC and Prometheus metrics; every piece's data lives under one
//! directory. Run it again on the same directory and it picks the same device and key up.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use replicator::local_site::{LocalSite, LocalSiteOptions, ServerCommand};
use serde_json::json;

use crate::metrics::MetricsServer;
use crate::rpc::server::RpcServer;
use crate::rpc::{self};
use crate::target::{Target, TargetSettings};

/// What `vhost-target cluster` is asked for.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    pub dir: PathBuf,
    pub volume: String,
    pub size_bytes: u64,
    /// The authority's lease (a failover waits out about this long).
    pub lease_ms: u64,
    pub metrics_addr: String,
    pub settings: TargetSettings,
}

/// A running local cluster; dropping it stops the target, then the servers and the authority.
pub struct LocalCluster {
    pub site: LocalSite,
    pub target: Arc<Mutex<Target>>,
    pub rpc_socket: PathBuf,
    pub vhost_socket: PathBuf,
    pub device: String,
    metrics: Option<MetricsServer>,
    rpc: Option<RpcServer>,
}

pub const BDEV: &str = "Rep0";
pub const CTRLR: &str = "vhost.0";

/// A new 64-byte AES-256-XTS key as hex, readable by the owner only; an existing file is
/// kept (its key encrypts the volume already).
fn ensure_key(path: &Path) -> anyhow::Result<()> {
    if path.exists() {
        return Ok(());
    }
    let mut key = zeroize::Zeroizing::new([0u8; 64]);
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, key.as_mut()))
        .context("reading /dev/urandom")?;
    let hex = zeroize::Zeroizing::new(hex::encode(key.as_ref()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating key file {}", path.display()))?;
    f.write_all(hex.as_bytes())?;
    f.sync_all()?;
    Ok(())
}

/// The site's shared peer key; an existing file is kept (the servers of a restarted cluster
/// and its target must agree on it).
fn ensure_peer_key(path: &Path) -> anyhow::Result<()> {
    if path.exists() {
        return Ok(());
    }
    replicator::peer_auth::PeerKey::generate()
        .and_then(|k| k.write_key_file(path))
        .with_context(|| format!("creating peer key file {}", path.display()))
}

impl LocalCluster {
    pub fn start(o: &ClusterOptions) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&o.dir).with_context(|| format!("creating {}", o.dir.display()))?;
        let dir = o.dir.canonicalize()?;
        let mut site_opts = LocalSiteOptions::new(
            &o.volume,
            o.size_bytes,
            ServerCommand {
                program: std::env::current_exe()?,
                args_prefix: vec!["replicator-serve".into()],
            },
        );
        site_opts.lease_ms = o.lease_ms;
        let keys = dir.join("keys");
        std::fs::create_dir_all(&keys)?;
        // Every server and the target are this cluster's own, so the data ports authenticate
        // their peers from the start (docs/replication.md, Status 4).
        let peer_key = keys.join("peer.key");
        ensure_peer_key(&peer_key)?;
        site_opts.server_args = vec!["--peer-key-file".into(), peer_key.display().to_string()];
        let site = LocalSite::start(&dir.join("site"), site_opts)?;

        // The device (tier 1) whose authoritative volume the target attaches.
        let device = format!("dev-{}", o.volume);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let client = authority::client::AuthorityClient::new(vec![site.authority_addr.clone()]);
        if rt.block_on(client.device_get(&device)).is_err() {
            rt.block_on(client.device_create(
                &device,
                o.size_bytes,
                4096,
                &[(site.opts.site.as_str(), o.volume.as_str())],
                &site.opts.site,
            ))
            .with_context(|| format!("creating device {device}"))?;
        }
        drop(rt);

        let key = keys.join(format!("{}.key", o.volume));
        ensure_key(&key)?;

        let mut settings = o.settings.clone();
        settings.vhost_socket_dir = dir.clone();
        let target = Arc::new(Mutex::new(Target::new(settings)));
        let rpc_socket = dir.join("tandem.sock");
        let rpc = RpcServer::start(&rpc_socket, target.clone())?;
        {
            let mut t = target.lock().unwrap_or_else(|e| e.into_inner());
            let mut call = |m: &str, p: serde_json::Value| {
                rpc::call(&mut t, m, Some(p)).map_err(|e| anyhow::anyhow!("{m}: {e}"))
            };
            call(
                "keyring_file_add_key",
                json!({"name": format!("{}-key", o.volume), "path": key}),
            )?;
            call(
                "bdev_replicated_create",
                json!({"name": BDEV, "authority": site.authority_addr, "device": device,
                       "key_name": format!("{}-key", o.volume), "peer_key_file": peer_key}),
            )?;
            call(
                "vhost_create_blk_controller",
                json!({"ctrlr": CTRLR, "dev_name": BDEV}),
            )?;
        }
        let metrics = if o.metrics_addr.is_empty() {
            None
        } else {
            Some(MetricsServer::start(&o.metrics_addr, target.clone())?)
        };
        Ok(Self {
            vhost_socket: dir.join(CTRLR),
            site,
            target,
            rpc_socket,
            device,
            metrics,
            rpc: Some(rpc),
        })
    }

    pub fn metrics_addr(&self) -> Option<std::net::SocketAddr> {
        self.metrics.as_ref().map(MetricsServer::addr)
    }

    /// What a newcomer needs: the QEMU command line, the servers, how to kill one and watch.
    pub fn instructions(&self) -> String {
        let exe = std::env::current_exe()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|_| "vhost-target".into());
        let rpc = self.rpc_socket.display();
        let mut s = format!(
            "Tandem local cluster up: device {} (volume {} on servers {}), authority {}\n\n",
            self.device,
            self.site.opts.volume,
            self.site.opts.servers.join(", "),
            self.site.authority_addr
        );
        let queues = crate::target::DEFAULT_NUM_QUEUES;
        s += &format!(
            "Attach a guest (add a boot disk and kernel of your own):\n  {}\n  {}\n\n",
            crate::rpc::attach_hint::qemu_command(&self.vhost_socket, queues),
            crate::rpc::attach_hint::cloud_hypervisor_command(&self.vhost_socket, queues)
        );
        s += "Servers:\n";
        for srv in self.site.servers() {
            s += &format!(
                "  {}: pid {}, data {}, health http://{}/health, log {}\n",
                srv.id,
                srv.pid().unwrap_or(0),
                srv.data_addr,
                srv.admin_addr,
                srv.log.display()
            );
        }
        let primary = self.site.primary().unwrap_or_default();
        let ppid = self
            .site
            .server(&primary)
            .ok()
            .and_then(|s| s.pid())
            .unwrap_or(0);
        s += &format!(
            "\nKill the primary ({primary}) and watch the guest carry on:\n  kill -9 {ppid}\n  \
             {exe} rpc -s {rpc} bdev_get_bdevs name={BDEV}   # primary, epoch, retried\n"
        );
        if let Some(m) = self.metrics_addr() {
            s += &format!("  curl -s http://{m}/metrics | grep tandem_replicated\n");
        }
        s += "\nCtrl-C stops everything.\n";
        s
    }

    /// The site's monitor: reports servers that exited (and asks for a failover when the
    /// primary did; the target's own takeover request would also do it).
    pub fn check(&mut self) -> Vec<String> {
        self.site.check_children()
    }

    /// Stops the target first (no request may be lost to a stopped server), then the site.
    pub fn stop(mut self) {
        if let Some(r) = self.rpc.take() {
            r.shutdown();
        }
        self.metrics = None;
        self.target
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .shutdown();
        let site = self.site;
        site.stop();
    }
}
