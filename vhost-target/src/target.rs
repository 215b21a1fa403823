//! The registry of bdevs and controllers: the one owner of that state.
//!
//! [`Target`] is the control plane's model of the daemon. Every operation
//! (from the JSON-RPC socket or from a config file being replayed) goes
//! through one of its methods, each of which checks the rules SPDK users
//! expect (unique names, a bdev cannot vanish under a controller, cpumasks
//! stay inside the application's core mask) before it changes anything.
//!
//! The daemon keeps one `Target` in a `Mutex`, locked only by the control
//! path: queue workers never see it. They hold their own `Arc<dyn Bdev>` and
//! channels, so a slow RPC never stalls I/O.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use crate::bdev::malloc::MallocBdev;
use crate::bdev::null::NullBdev;
use crate::bdev::replicated::{ReplicatedBdev, ReplicatedOptions};
use crate::bdev::uring::{UringBdev, UringOptions};
use crate::bdev::{Bdev, BdevError};
use crate::cpumask::{CpuMaskError, CpuSet};
use crate::keyring::{Keyring, KeyringError};
use crate::vhost::{Controller, ControllerInfo, ControllerSpec, PollMode, VhostError};

/// Linux errno values used as SPDK-style JSON-RPC error codes (negated).
pub mod errno {
    pub const EIO: i32 = libc::EIO;
    pub const EBUSY: i32 = libc::EBUSY;
    pub const EEXIST: i32 = libc::EEXIST;
    pub const ENODEV: i32 = libc::ENODEV;
    pub const EINVAL: i32 = libc::EINVAL;
    pub const ENAMETOOLONG: i32 = libc::ENAMETOOLONG;
    pub const ESHUTDOWN: i32 = libc::ESHUTDOWN;
    pub const EADDRINUSE: i32 = libc::EADDRINUSE;
    pub const ENOKEY: i32 = libc::ENOKEY;
}

/// Default number of virtqueues a controller offers (`num_queues`).
pub const DEFAULT_NUM_QUEUES: u16 = 4;
/// Most virtqueues a controller may offer.
pub const MAX_NUM_QUEUES: u16 = 64;
/// `sun_path` holds 108 bytes including the terminating NUL.
const MAX_SOCKET_PATH: usize = 107;

/// Why a control-plane operation was refused. [`TargetError::errno`] gives
/// the SPDK-style (negative errno) JSON-RPC code.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("bdev {0} already exists")]
    BdevExists(String),
    #[error("controller {0} already exists")]
    ControllerExists(String),
    #[error("bdev {0} does not exist")]
    NoSuchBdev(String),
    #[error("controller {0} does not exist")]
    NoSuchController(String),
    #[error("bdev {name} is a {actual} bdev, not a {expected} bdev")]
    WrongBdevKind {
        name: String,
        expected: &'static str,
        actual: &'static str,
    },
    #[error("bdev {bdev} is in use by controller {ctrlr}")]
    BdevInUse { bdev: String, ctrlr: String },
    #[error("invalid name {name:?}: {reason}")]
    InvalidName { name: String, reason: &'static str },
    #[error("socket path {0} is longer than the 107 bytes a Unix socket allows")]
    SocketPathTooLong(String),
    #[error("{0} exists and is not a socket; refusing to replace it")]
    SocketPathTaken(String),
    #[error("another process is serving on {0}")]
    SocketInUse(String),
    #[error(transparent)]
    CpuMask(#[from] CpuMaskError),
    #[error("cpumask {mask} is not a subset of the application core mask {app} (-m)")]
    CpuMaskOutsideApp { mask: String, app: String },
    #[error("invalid parameter: {0}")]
    InvalidParam(String),
    #[error(transparent)]
    Bdev(#[from] BdevError),
    #[error(transparent)]
    Vhost(#[from] VhostError),
    #[error("the target is shutting down")]
    ShuttingDown,
    #[error(transparent)]
    Keyring(#[from] KeyringError),
}

impl TargetError {
    /// The positive errno SPDK would report for this error; the JSON-RPC
    /// error code is its negation.
    pub fn errno(&self) -> i32 {
        match self {
            TargetError::BdevExists(_) | TargetError::ControllerExists(_) => errno::EEXIST,
            TargetError::NoSuchBdev(_)
            | TargetError::NoSuchController(_)
            | TargetError::WrongBdevKind { .. } => errno::ENODEV,
            TargetError::BdevInUse { .. } => errno::EBUSY,
            TargetError::SocketPathTooLong(_) => errno::ENAMETOOLONG,
            TargetError::SocketPathTaken(_) => errno::EEXIST,
            TargetError::SocketInUse(_) => errno::EADDRINUSE,
            TargetError::InvalidName { .. }
            | TargetError::CpuMask(_)
            | TargetError::CpuMaskOutsideApp { .. }
            | TargetError::InvalidParam(_) => errno::EINVAL,
            TargetError::Bdev(e) => bdev_errno(e),
            TargetError::Vhost(VhostError::InvalidParam(_)) => errno::EINVAL,
            TargetError::Vhost(VhostError::Bdev(e)) => bdev_errno(e),
            TargetError::Vhost(_) => errno::EIO,
            TargetError::ShuttingDown => errno::ESHUTDOWN,
            TargetError::Keyring(KeyringError::Exists(_)) => errno::EEXIST,
            TargetError::Keyring(KeyringError::NoSuchKey(_)) => errno::ENOKEY,
            TargetError::Keyring(KeyringError::InUse { .. }) => errno::EBUSY,
            TargetError::Keyring(_) => errno::EINVAL,
        }
    }
}

fn bdev_errno(e: &BdevError) -> i32 {
    match e {
        BdevError::InvalidParam(_) => errno::EINVAL,
        BdevError::Io { source, .. } => source.raw_os_error().unwrap_or(errno::EIO),
        BdevError::Channel(_) => errno::EIO,
    }
}

pub type Result<T, E = TargetError> = std::result::Result<T, E>;

/// Daemon-wide settings, fixed at start.
#[derive(Debug, Clone)]
pub struct TargetSettings {
    /// Where controller sockets live (SPDK's `-S`).
    pub vhost_socket_dir: PathBuf,
    /// CPUs the application may use (SPDK's `-m`).
    pub core_mask: CpuSet,
    /// Poll mode of controllers created without `poll_mode`.
    pub default_poll_mode: PollMode,
    /// Fault-injection methods (`bdev_replicated_cut`) are served: tests and drills only.
    pub fault_injection: bool,
}

impl Default for TargetSettings {
    fn default() -> Self {
        TargetSettings {
            vhost_socket_dir: PathBuf::from("."),
            core_mask: CpuSet::online(),
            default_poll_mode: PollMode::default(),
            fault_injection: false,
        }
    }
}

/// What `vhost_create_blk_controller` asks for, before validation.
#[derive(Debug, Clone, Default)]
pub struct ControllerRequest {
    pub name: String,
    pub bdev: String,
    /// `None`: the first CPU of the application core mask (SPDK: the main core).
    pub cpumask: Option<String>,
    pub readonly: bool,
    /// `None`: the daemon's default.
    pub poll_mode: Option<PollMode>,
    /// `None`: [`DEFAULT_NUM_QUEUES`].
    pub num_queues: Option<u16>,
}

/// A running controller as the registry sees it. The real implementation is
/// [`Controller`]; tests substitute one that opens no socket.
pub trait RunningController: Send {
    fn info(&self) -> ControllerInfo;
    /// Stops the workers and removes the socket.
    fn stop(self: Box<Self>);
}

impl RunningController for Controller {
    fn info(&self) -> ControllerInfo {
        Controller::info(self)
    }
    fn stop(self: Box<Self>) {
        Controller::stop(*self)
    }
}

/// Starts a controller from a validated spec.
pub type ControllerStarter =
    Box<dyn Fn(ControllerSpec) -> Result<Box<dyn RunningController>, VhostError> + Send>;

struct ControllerEntry {
    bdev: String,
    running: Box<dyn RunningController>,
}

/// The registries of bdevs and controllers, and the daemon's settings.
pub struct Target {
    settings: TargetSettings,
    bdevs: BTreeMap<String, Arc<dyn Bdev>>,
    controllers: BTreeMap<String, ControllerEntry>,
    keyring: Keyring,
    /// Next N tried for an auto-named "MallocN" (SPDK counts creations).
    next_malloc: u32,
    start_controller: ControllerStarter,
    /// Set by [`Target::shutdown`]: nothing new may be created after it, so a
    /// client still connected during shutdown cannot leave a socket behind.
    shut_down: bool,
}

impl Target {
    /// A target whose controllers are real vhost-user-blk controllers.
    pub fn new(settings: TargetSettings) -> Self {
        Self::with_controller_starter(
            settings,
            Box::new(|spec| {
                Controller::start(spec).map(|c| Box::new(c) as Box<dyn RunningController>)
            }),
        )
    }

    /// A target that starts controllers through `start` (for tests and
    /// embedding; the daemon uses [`Target::new`]).
    pub fn with_controller_starter(settings: TargetSettings, start: ControllerStarter) -> Self {
        Target {
            settings,
            bdevs: BTreeMap::new(),
            controllers: BTreeMap::new(),
            keyring: Keyring::default(),
            next_malloc: 0,
            start_controller: start,
            shut_down: false,
        }
    }

    pub fn settings(&self) -> &TargetSettings {
        &self.settings
    }

    // ---- bdevs ----

    /// Creates a malloc bdev; without a name it is called "MallocN" like SPDK.
    pub fn create_malloc_bdev(
        &mut self,
        name: Option<&str>,
        num_blocks: u64,
        block_size: u32,
        uuid: Option<uuid::Uuid>,
    ) -> Result<String> {
        let name = match name {
            Some(n) => n.to_owned(),
            None => self.next_malloc_name(),
        };
        self.check_new_bdev_name(&name)?;
        let bdev = MallocBdev::new(&name, num_blocks, block_size, uuid)?;
        self.register_bdev(Arc::new(bdev))
    }

    pub fn create_null_bdev(
        &mut self,
        name: &str,
        num_blocks: u64,
        block_size: u32,
        uuid: Option<uuid::Uuid>,
    ) -> Result<String> {
        self.check_new_bdev_name(name)?;
        let bdev = NullBdev::new(name, num_blocks, block_size, uuid)?;
        self.register_bdev(Arc::new(bdev))
    }

    /// Creates a file or block-device bdev (`bdev_uring_create`, `bdev_aio_create`).
    pub fn create_uring_bdev(&mut self, opts: UringOptions) -> Result<String> {
        self.check_new_bdev_name(&opts.name)?;
        let bdev = UringBdev::open(opts)?;
        self.register_bdev(Arc::new(bdev))
    }

    /// Creates a replicated bdev (`bdev_replicated_create`) encrypted with the named key.
    /// Blocks until the volume's label was read (or written) through its primary.
    pub fn create_replicated_bdev(&mut self, mut opts: ReplicatedOptions) -> Result<String> {
        self.check_new_bdev_name(&opts.name)?;
        if self.settings.fault_injection {
            opts.cut_servers = Some(Default::default());
        }
        let key = self.keyring.get(&opts.key_name)?;
        let bdev = ReplicatedBdev::open(opts, key)?;
        self.register_bdev(Arc::new(bdev))
    }

    /// Fault injection: the replicated bdev `name` acts as if it could not reach `servers`.
    pub fn cut_replicated(&mut self, name: &str, servers: &[String]) -> Result<()> {
        let b = self.bdev(name)?;
        let r = b.as_any().downcast_ref::<ReplicatedBdev>().ok_or_else(|| {
            TargetError::WrongBdevKind {
                name: name.to_owned(),
                expected: "replicated",
                actual: b.kind(),
            }
        })?;
        r.set_cut(servers)
            .map_err(|e| TargetError::InvalidParam(e.into()))?;
        tracing::warn!(bdev = name, ?servers, "fault injection: cut");
        Ok(())
    }

    pub fn keyring(&self) -> &Keyring {
        &self.keyring
    }

    pub fn keyring_mut(&mut self) -> &mut Keyring {
        &mut self.keyring
    }

    /// Adds an already built bdev under its own name.
    pub fn register_bdev(&mut self, bdev: Arc<dyn Bdev>) -> Result<String> {
        let name = bdev.info().name.clone();
        self.check_new_bdev_name(&name)?;
        self.bdevs.insert(name.clone(), bdev);
        tracing::info!(bdev = %name, "bdev created");
        Ok(name)
    }

    /// Deletes a bdev of the given kind ("malloc", "null", ...). Refused while
    /// a controller uses it.
    pub fn delete_bdev(&mut self, name: &str, kind: &'static str) -> Result<()> {
        let bdev = self.bdev(name)?;
        if bdev.kind() != kind {
            return Err(TargetError::WrongBdevKind {
                name: name.to_owned(),
                expected: kind,
                actual: bdev.kind(),
            });
        }
        if let Some(ctrlr) = self.claimed_by(name) {
            return Err(TargetError::BdevInUse {
                bdev: name.to_owned(),
                ctrlr: ctrlr.to_owned(),
            });
        }
        self.bdevs.remove(name);
        tracing::info!(bdev = %name, "bdev deleted");
        Ok(())
    }

    /// A bdev by name, or by UUID as SPDK also accepts.
    pub fn bdev(&self, name: &str) -> Result<&Arc<dyn Bdev>> {
        if let Some(b) = self.bdevs.get(name) {
            return Ok(b);
        }
        if let Ok(u) = uuid::Uuid::parse_str(name) {
            if let Some(b) = self.bdevs.values().find(|b| b.info().uuid == u) {
                return Ok(b);
            }
        }
        Err(TargetError::NoSuchBdev(name.to_owned()))
    }

    /// Every bdev, in name order.
    pub fn bdevs(&self) -> impl Iterator<Item = &Arc<dyn Bdev>> {
        self.bdevs.values()
    }

    /// The controller that uses bdev `name`, if any.
    pub fn claimed_by(&self, name: &str) -> Option<&str> {
        self.controllers
            .iter()
            .find(|(_, c)| c.bdev == name)
            .map(|(n, _)| n.as_str())
    }

    fn check_new_bdev_name(&self, name: &str) -> Result<()> {
        if self.shut_down {
            return Err(TargetError::ShuttingDown);
        }
        if name.is_empty() {
            return Err(TargetError::InvalidName {
                name: name.to_owned(),
                reason: "a bdev name cannot be empty",
            });
        }
        if self.bdevs.contains_key(name) {
            return Err(TargetError::BdevExists(name.to_owned()));
        }
        Ok(())
    }

    fn next_malloc_name(&mut self) -> String {
        loop {
            let n = format!("Malloc{}", self.next_malloc);
            self.next_malloc = self.next_malloc.wrapping_add(1);
            if !self.bdevs.contains_key(&n) {
                return n;
            }
        }
    }

    // ---- controllers ----

    /// Validates a request and starts the controller.
    pub fn create_controller(&mut self, req: ControllerRequest) -> Result<ControllerInfo> {
        if self.shut_down {
            return Err(TargetError::ShuttingDown);
        }
        validate_controller_name(&req.name)?;
        if self.controllers.contains_key(&req.name) {
            return Err(TargetError::ControllerExists(req.name));
        }
        let bdev = self.bdev(&req.bdev)?.clone();
        let bdev_name = bdev.info().name.clone();
        if let Some(ctrlr) = self.claimed_by(&bdev_name) {
            return Err(TargetError::BdevInUse {
                bdev: bdev_name,
                ctrlr: ctrlr.to_owned(),
            });
        }
        let cpumask = match &req.cpumask {
            Some(m) => {
                let set = CpuSet::parse(m)?;
                if !set.is_subset_of(&self.settings.core_mask) {
                    return Err(TargetError::CpuMaskOutsideApp {
                        mask: m.clone(),
                        app: self.settings.core_mask.to_string(),
                    });
                }
                set
            }
            None => self.default_cpumask()?,
        };
        let num_queues = req.num_queues.unwrap_or(DEFAULT_NUM_QUEUES);
        if !(1..=MAX_NUM_QUEUES).contains(&num_queues) {
            return Err(TargetError::InvalidParam(format!(
                "num_queues {num_queues} is outside 1..={MAX_NUM_QUEUES}"
            )));
        }
        let socket_path = self.settings.vhost_socket_dir.join(&req.name);
        if socket_path.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(TargetError::SocketPathTooLong(
                socket_path.display().to_string(),
            ));
        }
        check_socket_path_free(&socket_path)?;
        let spec = ControllerSpec {
            name: req.name.clone(),
            socket_path,
            bdev,
            cpumask,
            read_only: req.readonly,
            poll_mode: req.poll_mode.unwrap_or(self.settings.default_poll_mode),
            max_queues: num_queues,
        };
        let running = (self.start_controller)(spec)?;
        let info = running.info();
        self.controllers.insert(
            req.name.clone(),
            ControllerEntry {
                bdev: bdev_name,
                running,
            },
        );
        tracing::info!(ctrlr = %req.name, socket = %info.socket, bdev = %info.bdev, "controller created");
        Ok(info)
    }

    /// Stops a controller and removes its socket.
    pub fn delete_controller(&mut self, name: &str) -> Result<()> {
        let entry = self
            .controllers
            .remove(name)
            .ok_or_else(|| TargetError::NoSuchController(name.to_owned()))?;
        entry.running.stop();
        tracing::info!(ctrlr = %name, "controller deleted");
        Ok(())
    }

    pub fn controller_info(&self, name: &str) -> Result<ControllerInfo> {
        self.controllers
            .get(name)
            .map(|c| c.running.info())
            .ok_or_else(|| TargetError::NoSuchController(name.to_owned()))
    }

    /// Every controller, in name order.
    pub fn controllers(&self) -> Vec<ControllerInfo> {
        self.controllers
            .values()
            .map(|c| c.running.info())
            .collect()
    }

    /// Stops every controller (removing their sockets) and forgets every
    /// bdev; later create calls fail with [`TargetError::ShuttingDown`].
    pub fn shutdown(&mut self) {
        self.shut_down = true;
        while let Some((name, entry)) = self.controllers.pop_last() {
            entry.running.stop();
            tracing::info!(ctrlr = %name, "controller stopped");
        }
        self.bdevs.clear();
    }

    fn default_cpumask(&self) -> Result<CpuSet> {
        let first = self.settings.core_mask.cpus().first().copied().unwrap_or(0);
        Ok(CpuSet::parse(&format!("[{first}]"))?)
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The controller's listener replaces whatever is at its path; only a stale
/// socket may be replaced, never a file or a socket someone is serving on.
fn check_socket_path_free(path: &std::path::Path) -> Result<()> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Err(_) => Ok(()),
        Ok(m) if !m.file_type().is_socket() => {
            Err(TargetError::SocketPathTaken(path.display().to_string()))
        }
        Ok(_) if std::os::unix::net::UnixStream::connect(path).is_ok() => {
            Err(TargetError::SocketInUse(path.display().to_string()))
        }
        Ok(_) => Ok(()),
    }
}

/// A controller name becomes a file name in the `-S` directory.
fn validate_controller_name(name: &str) -> Result<()> {
    let reason = if name.is_empty() {
        "a controller name cannot be empty"
    } else if name.contains('/') {
        "a controller name cannot contain '/'"
    } else if name == "." || name == ".." {
        "a controller name cannot be . or .."
    } else if name.contains('\0') {
        "a controller name cannot contain NUL"
    } else {
        return Ok(());
    };
    Err(TargetError::InvalidName {
        name: name.to_owned(),
        reason,
    })
}

/// Test doubles shared by the control-plane tests: a bdev and a controller
/// that need neither memory nor sockets.
#[cfg(test)]
pub(crate) mod fakes {
    use super::*;
    use crate::bdev::{BdevCaps, BdevInfo, IoChannel, IoStats};

    pub struct FakeBdev {
        info: BdevInfo,
        stats: IoStats,
        kind: &'static str,
    }

    impl FakeBdev {
        pub fn shared(name: &str, kind: &'static str) -> Arc<dyn Bdev> {
            Arc::new(FakeBdev {
                info: BdevInfo {
                    name: name.to_owned(),
                    product_name: "Fake disk",
                    block_size: 512,
                    num_blocks: 2048,
                    physical_block_size: 512,
                    uuid: uuid::Uuid::new_v4(),
                    caps: BdevCaps {
                        flush: true,
                        discard: true,
                        write_zeroes: true,
                        ..BdevCaps::default()
                    },
                },
                stats: IoStats::default(),
                kind,
            })
        }
    }

    impl Bdev for FakeBdev {
        fn info(&self) -> &BdevInfo {
            &self.info
        }
        fn open_channel(&self, _qd: u32) -> Result<Box<dyn IoChannel>, BdevError> {
            Err(BdevError::Channel("fake bdev has no channels".into()))
        }
        fn iostat(&self) -> &IoStats {
            &self.stats
        }
        fn kind(&self) -> &'static str {
            self.kind
        }
        fn as_any(&self) -> &dyn std::any::Any {
            self
        }
        fn create_params(&self) -> serde_json::Value {
            serde_json::json!({
                "name": self.info.name,
                "num_blocks": self.info.num_blocks,
                "block_size": self.info.block_size,
                "uuid": self.info.uuid.to_string(),
            })
        }
    }

    pub struct FakeController(pub ControllerInfo);

    impl RunningController for FakeController {
        fn info(&self) -> ControllerInfo {
            self.0.clone()
        }
        fn stop(self: Box<Self>) {}
    }

    /// A starter that "starts" controllers without opening a socket.
    pub fn starter() -> ControllerStarter {
        Box::new(|spec: ControllerSpec| {
            Ok(Box::new(FakeController(ControllerInfo {
                ctrlr: spec.name.clone(),
                cpumask: spec.cpumask.to_string(),
                socket: spec.socket_path.display().to_string(),
                bdev: spec.bdev.info().name.clone(),
                readonly: spec.read_only,
                poll_mode: spec.poll_mode,
                max_queues: spec.max_queues,
                connected: false,
                bad_requests: 0,
            })) as Box<dyn RunningController>)
        })
    }

    /// A target on CPUs 0-1 with a fake controller starter.
    pub fn target() -> Target {
        Target::with_controller_starter(
            TargetSettings {
                vhost_socket_dir: PathBuf::from("/tmp/tandem-test"),
                core_mask: CpuSet::parse("0x3").expect("valid mask"),
                default_poll_mode: PollMode::Adaptive,
                fault_injection: false,
            },
            starter(),
        )
    }

    /// True while the bdev constructors are still the placeholders of the
    /// workspace skeleton; tests that need a real null/malloc bdev skip then.
    pub fn placeholder_bdevs() -> bool {
        match NullBdev::new("probe", 8, 512, None) {
            Err(e) if e.to_string().contains("not built yet") => {
                eprintln!("SKIPPED: null bdev is still a placeholder");
                true
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fakes::{target, FakeBdev};
    use super::*;

    fn req(name: &str, bdev: &str) -> ControllerRequest {
        ControllerRequest {
            name: name.into(),
            bdev: bdev.into(),
            ..ControllerRequest::default()
        }
    }

    #[test]
    fn duplicate_bdev_name_is_eexist_and_names_it() {
        let mut t = target();
        t.register_bdev(FakeBdev::shared("Malloc0", "malloc"))
            .unwrap();
        let e = t
            .register_bdev(FakeBdev::shared("Malloc0", "malloc"))
            .unwrap_err();
        assert_eq!(e.errno(), libc::EEXIST);
        assert!(e.to_string().contains("Malloc0"), "{e}");
        let e = t
            .create_malloc_bdev(Some("Malloc0"), 8, 512, None)
            .unwrap_err();
        assert!(matches!(e, TargetError::BdevExists(_)), "{e}");
    }

    #[test]
    fn unknown_bdev_is_enodev() {
        let mut t = target();
        let e = t.delete_bdev("nope", "malloc").unwrap_err();
        assert_eq!(e.errno(), libc::ENODEV);
        assert!(e.to_string().contains("nope"));
        let e = t.create_controller(req("vhost.0", "nope")).unwrap_err();
        assert_eq!(e.errno(), libc::ENODEV);
    }

    #[test]
    fn deleting_a_bdev_of_another_kind_is_refused() {
        let mut t = target();
        t.register_bdev(FakeBdev::shared("Null0", "null")).unwrap();
        let e = t.delete_bdev("Null0", "malloc").unwrap_err();
        assert!(matches!(e, TargetError::WrongBdevKind { .. }), "{e}");
        t.delete_bdev("Null0", "null").unwrap();
        assert!(t.bdevs().next().is_none());
    }

    #[test]
    fn deleting_a_claimed_bdev_is_ebusy_naming_the_controller() {
        let mut t = target();
        t.register_bdev(FakeBdev::shared("Malloc0", "malloc"))
            .unwrap();
        t.create_controller(req("vhost.0", "Malloc0")).unwrap();
        let e = t.delete_bdev("Malloc0", "malloc").unwrap_err();
        assert_eq!(e.errno(), libc::EBUSY);
        assert_eq!(
            e.to_string(),
            "bdev Malloc0 is in use by controller vhost.0"
        );
        // A second controller on the same bdev is refused too.
        let e = t.create_controller(req("vhost.1", "Malloc0")).unwrap_err();
        assert_eq!(e.errno(), libc::EBUSY);
        t.delete_controller("vhost.0").unwrap();
        t.delete_bdev("Malloc0", "malloc").unwrap();
    }

    #[test]
    fn duplicate_controller_is_eexist() {
        let mut t = target();
        t.register_bdev(FakeBdev::shared("A", "null")).unwrap();
        t.register_bdev(FakeBdev::shared("B", "null")).unwrap();
        t.create_controller(req("vhost.0", "A")).unwrap();
        let e = t.create_controller(req("vhost.0", "B")).unwrap_err();
        assert_eq!(e.errno(), libc::EEXIST);
        assert!(e.to_string().contains("vhost.0"));
    }

    #[test]
    fn controller_defaults_follow_spdk() {
        let mut t = target();
        t.register_bdev(FakeBdev::shared("A", "null")).unwrap();
        let info = t.create_controller(req("vhost.0", "A")).unwrap();
        assert_eq!(info.cpumask, "0x1", "default is the first CPU of -m");
        assert_eq!(info.socket, "/tmp/tandem-test/vhost.0");
        assert_eq!(info.max_queues, DEFAULT_NUM_QUEUES);
        assert_eq!(info.poll_mode, PollMode::Adaptive);
    }

    #[test]
    fn bad_cpumask_is_einval() {
        let mut t = target();
        t.register_bdev(FakeBdev::shared("A", "null")).unwrap();
        let mut r = req("vhost.0", "A");
        r.cpumask = Some("0xzz".into());
        let e = t.create_controller(r).unwrap_err();
        assert_eq!(e.errno(), libc::EINVAL);
        assert!(matches!(e, TargetError::CpuMask(_)));
    }

    #[test]
    fn cpumask_outside_core_mask_is_einval() {
        let mut t = target();
        t.register_bdev(FakeBdev::shared("A", "null")).unwrap();
        let mut r = req("vhost.0", "A");
        r.cpumask = Some("0x4".into());
        let e = t.create_controller(r).unwrap_err();
        assert_eq!(e.errno(), libc::EINVAL);
        assert!(e.to_string().contains("0x3"), "{e}");
        assert!(t.controllers().is_empty());
    }

    #[test]
    fn controller_names_that_are_not_file_names_are_refused() {
        let mut t = target();
        t.register_bdev(FakeBdev::shared("A", "null")).unwrap();
        for bad in ["", "a/b", "..", "."] {
            let e = t.create_controller(req(bad, "A")).unwrap_err();
            assert!(matches!(e, TargetError::InvalidName { .. }), "{bad:?}: {e}");
        }
    }

    #[test]
    fn num_queues_out_of_range_is_einval() {
        let mut t = target();
        t.register_bdev(FakeBdev::shared("A", "null")).unwrap();
        for n in [0, 65] {
            let mut r = req("vhost.0", "A");
            r.num_queues = Some(n);
            assert_eq!(t.create_controller(r).unwrap_err().errno(), libc::EINVAL);
        }
    }

    #[test]
    fn too_long_socket_path_is_refused() {
        let mut t = target();
        t.register_bdev(FakeBdev::shared("A", "null")).unwrap();
        let e = t.create_controller(req(&"x".repeat(120), "A")).unwrap_err();
        assert!(matches!(e, TargetError::SocketPathTooLong(_)), "{e}");
    }

    #[test]
    fn nothing_is_created_after_shutdown() {
        let mut t = target();
        t.register_bdev(FakeBdev::shared("A", "null")).unwrap();
        t.shutdown();
        assert!(t.controllers().is_empty() && t.bdevs().next().is_none());
        let e = t.register_bdev(FakeBdev::shared("B", "null")).unwrap_err();
        assert!(matches!(e, TargetError::ShuttingDown));
        let e = t.create_controller(req("vhost.0", "A")).unwrap_err();
        assert!(matches!(e, TargetError::ShuttingDown));
    }

    fn real_target(dir: &std::path::Path) -> Target {
        Target::new(TargetSettings {
            vhost_socket_dir: dir.to_owned(),
            core_mask: CpuSet::parse("0x1").unwrap(),
            default_poll_mode: PollMode::Interrupt,
            fault_injection: false,
        })
    }

    #[test]
    fn real_controller_creates_and_removes_its_socket() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = real_target(dir.path());
        t.register_bdev(FakeBdev::shared("A", "null")).unwrap();
        let info = t.create_controller(req("vhost.0", "A")).unwrap();
        let sock = dir.path().join("vhost.0");
        assert_eq!(info.socket, sock.display().to_string());
        assert!(sock.exists());
        assert!(!t.controller_info("vhost.0").unwrap().connected);
        t.delete_controller("vhost.0").unwrap();
        assert!(!sock.exists(), "socket removed on delete");
    }

    #[test]
    fn controller_never_replaces_a_file_or_a_live_socket() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = real_target(dir.path());
        t.register_bdev(FakeBdev::shared("A", "null")).unwrap();
        std::fs::write(dir.path().join("precious"), b"data").unwrap();
        let e = t.create_controller(req("precious", "A")).unwrap_err();
        assert!(matches!(e, TargetError::SocketPathTaken(_)), "{e}");
        assert_eq!(std::fs::read(dir.path().join("precious")).unwrap(), b"data");
        let _live = std::os::unix::net::UnixListener::bind(dir.path().join("live")).unwrap();
        let e = t.create_controller(req("live", "A")).unwrap_err();
        assert!(matches!(e, TargetError::SocketInUse(_)), "{e}");
        // A stale socket file is fine.
        drop(std::os::unix::net::UnixListener::bind(dir.path().join("stale")).unwrap());
        t.create_controller(req("stale", "A")).unwrap();
    }

    #[test]
    fn unknown_controller_is_enodev() {
        let mut t = target();
        assert_eq!(t.delete_controller("x").unwrap_err().errno(), libc::ENODEV);
        assert_eq!(t.controller_info("x").unwrap_err().errno(), libc::ENODEV);
    }

    #[test]
    fn bdev_is_found_by_uuid() {
        let mut t = target();
        let b = FakeBdev::shared("A", "null");
        let u = b.info().uuid.to_string();
        t.register_bdev(b).unwrap();
        assert_eq!(t.bdev(&u).unwrap().info().name, "A");
    }

    #[test]
    fn malloc_auto_names_count_like_spdk() {
        if fakes::placeholder_bdevs() {
            return;
        }
        let mut t = target();
        assert_eq!(t.create_malloc_bdev(None, 8, 512, None).unwrap(), "Malloc0");
        assert_eq!(t.create_malloc_bdev(None, 8, 512, None).unwrap(), "Malloc1");
    }
}
