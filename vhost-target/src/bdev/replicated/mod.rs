//! The replicated bdev: a volume kept on two replicator servers of a site, encrypted here.
//!
//! Every queue worker's channel feeds the volume's [`ReplicationPipeline`] (lock-free queues
//! into one network thread that learns the primary from the authority, follows failovers and
//! resends what was not answered). Blocks leave this host encrypted with the volume's key
//! (AES-256-XTS, tweak = the guest's 512-byte sector) and are decrypted only here: replicators
//! store ciphertext. The volume's first 4 KiB hold a plaintext label with the key's check
//! value ([`label`]), so attaching with the wrong key fails at creation, not with garbage.
//!
//! Durability is the replicator's: a write completes when the primary and every in-sync
//! secondary have it; FLUSH completes when all of them have fdatasync'ed; FUA is passed on.
//! The bdev therefore reports a volatile cache, and the guest's FLUSH is what makes data safe.

mod channel;
pub mod label;

use std::sync::Arc;
use std::time::Duration;

use replicator::authority::client::ClientAuthority;
use replicator::authority::Authority;
use replicator::pipeline::{
    IoKind, IoRequest, PipelineConfig, PipelineStatus, PipelineWorker, ReplicationPipeline,
};
use replicator::volume_key::VolumeKey;
use serde_json::json;

use self::channel::ReplicatedChannel;
use self::label::{Decoded, Label, LABEL_BYTES};
use super::params::{check_block_size, check_name, check_queue_depth, IoBounds};
use super::{Bdev, BdevCaps, BdevError, BdevInfo, IoChannel, IoStats};

/// How a replicated bdev is created (`bdev_replicated_create`).
#[derive(Debug, Clone)]
pub struct ReplicatedOptions {
    pub name: String,
    /// The authority's JSON-RPC addresses (any member; the client finds the leader).
    pub authority: Vec<String>,
    /// The device to attach: its authoritative volume (tier 1) is looked up at creation and
    /// fills `site` and `volume`. `None`: `site` and `volume` name the volume directly.
    pub device: Option<String>,
    pub site: String,
    pub volume: String,
    /// The keyring entry that encrypts this volume.
    pub key_name: String,
    pub uuid: Option<uuid::Uuid>,
    /// A request with no answer for this long fails with an I/O error (Linux's own virtio-blk
    /// timeout is 30 s; the default stays inside it).
    pub io_timeout: Duration,
    /// When the primary cannot be reached for this long, ask an in-sync secondary to take
    /// over; it checks the primary's health first and refuses while the primary is healthy.
    pub takeover_after: Duration,
    /// Set when the daemon serves fault injection (`--enable-fault-injection`).
    pub cut_servers: Option<replicator::pipeline::CutServers>,
    /// The site's shared key file (absolute path, hex, mode 0600), when its servers require
    /// authentication (`replicator serve --peer-key-file`; docs/replication.md, Status 4).
    pub peer_key_file: Option<std::path::PathBuf>,
}

impl ReplicatedOptions {
    pub const DEFAULT_IO_TIMEOUT: Duration = Duration::from_secs(25);
    pub const DEFAULT_TAKEOVER_AFTER: Duration = Duration::from_millis(1000);
}

pub struct ReplicatedBdev {
    info: BdevInfo,
    stats: IoStats,
    opts: ReplicatedOptions,
    key: Arc<VolumeKey>,
    pipeline: ReplicationPipeline,
    /// Whether this attach wrote the label (the volume was blank).
    formatted: bool,
}

fn channel_err(what: impl std::fmt::Display) -> BdevError {
    BdevError::Channel(what.to_string())
}

/// Runs one pipeline request to completion (control path only: creation).
fn call(w: &PipelineWorker, req: IoRequest, timeout: Duration) -> Result<Vec<u8>, BdevError> {
    let kind = req.kind;
    w.submit(req)
        .map_err(|_| channel_err("pipeline queue full"))?;
    let c = w
        .wait(timeout + Duration::from_secs(1))
        .ok_or_else(|| channel_err(format!("{kind:?} of the volume label did not complete")))?;
    c.result
        .map_err(|e| channel_err(format!("{kind:?} of the volume label: {e}")))
}

impl ReplicatedBdev {
    /// Looks the volume up in the authority, connects to its primary and checks (or, on a
    /// blank volume, writes) the label. Fails with a clear error for an unknown volume, an
    /// unreachable authority or primary, a wrong key, or a volume that holds foreign data.
    pub fn open(mut opts: ReplicatedOptions, key: Arc<VolumeKey>) -> Result<Self, BdevError> {
        check_name(&opts.name)?;
        if opts.authority.is_empty() {
            return Err(BdevError::InvalidParam(
                "authority: at least one address is needed".into(),
            ));
        }
        // A lookup of its own, on a runtime of its own: the pipeline's client lives on the
        // pipeline's thread.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(channel_err)?;
        if let Some(device) = &opts.device {
            let client = authority::client::AuthorityClient::new(opts.authority.clone());
            let d = rt.block_on(client.device_get(device)).map_err(|e| {
                BdevError::InvalidParam(format!(
                    "device {device} at authority {}: {e}",
                    opts.authority.join(",")
                ))
            })?;
            if !opts.volume.is_empty()
                && (&opts.volume, &opts.site) != (&d.authoritative_volume, &d.authoritative_site)
            {
                return Err(BdevError::InvalidParam(format!(
                    "device {device}'s authoritative volume is {} of {}, not {} of {}",
                    d.authoritative_volume, d.authoritative_site, opts.volume, opts.site
                )));
            }
            opts.site = d.authoritative_site;
            opts.volume = d.authoritative_volume;
        }
        let lookup = ClientAuthority::new(opts.authority.clone(), Duration::from_secs(5));
        let vol = rt
            .block_on(lookup.volume_get(&opts.site, &opts.volume))
            .map_err(|e| {
                BdevError::InvalidParam(format!(
                    "volume {} of site {} at authority {}: {e}",
                    opts.volume,
                    opts.site,
                    opts.authority.join(",")
                ))
            })?;
        drop(rt);
        check_block_size(vol.block_size)?;
        if vol.size_bytes <= LABEL_BYTES + u64::from(vol.block_size) {
            return Err(BdevError::InvalidParam(format!(
                "volume {} has {} bytes: too small for the 4 KiB label and data",
                opts.volume, vol.size_bytes
            )));
        }
        let num_blocks = (vol.size_bytes - LABEL_BYTES) / u64::from(vol.block_size);
        let peer_key = match &opts.peer_key_file {
            None => None,
            // The daemon's working directory is nobody's business: a relative path in a saved
            // config would name another file after a restart elsewhere.
            Some(p) if !p.is_absolute() => {
                return Err(BdevError::InvalidParam(format!(
                    "peer_key_file {} is not an absolute path",
                    p.display()
                )))
            }
            Some(p) => Some(
                replicator::peer_auth::PeerKey::from_key_file(p)
                    .map_err(|e| BdevError::InvalidParam(format!("peer_key_file: {e}")))?,
            ),
        };

        let authority: Arc<dyn Authority> = Arc::new(ClientAuthority::new(
            opts.authority.clone(),
            Duration::from_secs(5),
        ));
        let mut cfg = PipelineConfig::new(&opts.site, &opts.volume, authority);
        cfg.request_timeout = opts.io_timeout;
        cfg.takeover_after = Some(opts.takeover_after);
        cfg.cut_servers = opts.cut_servers.clone();
        cfg.peer_key = peer_key;
        let pipeline = ReplicationPipeline::start(cfg).map_err(channel_err)?;
        let formatted = Self::check_label(&pipeline, &opts, &key)?;

        Ok(Self {
            info: BdevInfo {
                name: opts.name.clone(),
                product_name: "Replicated disk",
                block_size: vol.block_size,
                num_blocks,
                physical_block_size: vol.block_size,
                uuid: opts.uuid.unwrap_or_else(uuid::Uuid::new_v4),
                caps: BdevCaps {
                    volatile_cache: true,
                    flush: true,
                    discard: true,
                    write_zeroes: true,
                    read_only: false,
                },
            },
            stats: IoStats::default(),
            opts,
            key,
            pipeline,
            formatted,
        })
    }

    /// Returns whether the label was written now.
    fn check_label(
        p: &ReplicationPipeline,
        opts: &ReplicatedOptions,
        key: &VolumeKey,
    ) -> Result<bool, BdevError> {
        let w = p.worker(1).map_err(channel_err)?;
        let read = IoRequest {
            tag: 0,
            kind: IoKind::Read,
            offset: 0,
            len: LABEL_BYTES as u32,
            data: Vec::new(),
            fua: false,
        };
        let mine = Label {
            key_name: key.name().to_owned(),
            check: key.check(),
        };
        match Label::decode(&call(&w, read, opts.io_timeout)?) {
            Decoded::Label(l) if l.check == mine.check => Ok(false),
            Decoded::Label(l) => Err(BdevError::InvalidParam(format!(
                "wrong key for volume {}: it was formatted with key {:?} (check {:?}); key {:?} has check {:?}",
                opts.volume, l.key_name, l.check, mine.key_name, mine.check
            ))),
            Decoded::Foreign(why) => Err(BdevError::InvalidParam(format!(
                "volume {} is not a Tandem replicated volume: {why}; refusing to overwrite it",
                opts.volume
            ))),
            Decoded::Blank => {
                let write = IoRequest {
                    tag: 1,
                    kind: IoKind::Write,
                    offset: 0,
                    len: LABEL_BYTES as u32,
                    data: mine.encode(),
                    fua: true,
                };
                call(&w, write, opts.io_timeout)?;
                tracing::info!(volume = %opts.volume, key = %mine.key_name, "blank volume: label written");
                Ok(true)
            }
        }
    }

    pub fn status(&self) -> PipelineStatus {
        self.pipeline.status()
    }

    /// Fault injection: act as if `servers` could not be reached (empty: heal).
    pub fn set_cut(&self, servers: &[String]) -> Result<(), &'static str> {
        let cut = self.opts.cut_servers.as_ref().ok_or(
            "fault injection is off: start vhost-target serve with --enable-fault-injection",
        )?;
        *cut.lock().expect("cut set") = servers.iter().cloned().collect();
        Ok(())
    }
}

impl Bdev for ReplicatedBdev {
    fn info(&self) -> &BdevInfo {
        &self.info
    }

    fn open_channel(&self, queue_depth: u32) -> Result<Box<dyn IoChannel>, BdevError> {
        check_queue_depth(queue_depth)?;
        // Room for every request of the queue in parts, and for the largest request
        // (SEG_MAX x SIZE_MAX bytes) on its own.
        let parts = (queue_depth * 2).max(256);
        let worker = self.pipeline.worker(parts as usize).map_err(channel_err)?;
        let bounds = IoBounds::new(self.info.block_size, self.info.size_bytes(), self.info.caps);
        Ok(Box::new(ReplicatedChannel::new(
            worker,
            parts,
            self.key.clone(),
            bounds,
            queue_depth,
        )))
    }

    fn iostat(&self) -> &IoStats {
        &self.stats
    }

    fn driver_specific(&self) -> serde_json::Value {
        let s = self.pipeline.status();
        json!({
            "replicated": {
                "device": self.opts.device,
                "site": self.opts.site,
                "volume": self.opts.volume,
                "authority": self.opts.authority,
                "key_name": self.opts.key_name,
                "authenticates": self.opts.peer_key_file.is_some(),
                "primary": s.primary,
                "primary_addr": s.primary_addr,
                "generation": s.generation,
                "epoch": s.epoch,
                "in_sync": s.in_sync,
                "out_of_sync": s.out_of_sync,
                "degraded": !s.out_of_sync.is_empty(),
                "retried": s.retried,
                "primary_changes": s.primary_changes,
                "unreachable_ms": s.unreachable_ms,
                "formatted_on_attach": self.formatted,
            }
        })
    }

    fn kind(&self) -> &'static str {
        "replicated"
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn create_params(&self) -> serde_json::Value {
        // A device is looked up again on replay: its authoritative volume may have moved.
        let (site, volume) = match self.opts.device {
            Some(_) => (None, None),
            None => (Some(&self.opts.site), Some(&self.opts.volume)),
        };
        json!({
            "name": self.info.name,
            "device": self.opts.device,
            "authority": self.opts.authority,
            "site": site,
            "volume": volume,
            "key_name": self.opts.key_name,
            "uuid": self.info.uuid.to_string(),
            "io_timeout_ms": self.opts.io_timeout.as_millis() as u64,
            "takeover_after_ms": self.opts.takeover_after.as_millis() as u64,
            "peer_key_file": self.opts.peer_key_file,
        })
    }
}
