//! A vhost-user-blk controller and its lifetime: the socket, the session
//! thread that speaks the control protocol, and the queue workers.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use tracing::{info, warn};
use vhost::vhost_user::{BackendReqHandler, Listener};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::handler::{is_transport_error, BlkBackend};
use super::worker::{DeviceShared, WorkerHandle};
use super::{PollMode, VhostError};
use crate::bdev::Bdev;
use crate::blk::config::DeviceGeometry;
use crate::cpumask::CpuSet;

/// Most queues a controller may expose.
pub const MAX_QUEUES: u16 = 64;

/// Everything needed to start a controller (`vhost_create_blk_controller`).
pub struct ControllerSpec {
    /// SPDK's `ctrlr`: the controller's name, also the socket's file name.
    pub name: String,
    /// Full path of the vhost-user socket (`-S` directory joined with the name).
    pub socket_path: PathBuf,
    pub bdev: Arc<dyn Bdev>,
    /// CPUs whose workers serve the queues; one worker per CPU.
    pub cpumask: CpuSet,
    pub read_only: bool,
    pub poll_mode: PollMode,
    /// Most virtqueues a frontend may use (virtio-blk `num_queues`).
    pub max_queues: u16,
}

/// What `vhost_get_controllers` reports.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ControllerInfo {
    pub ctrlr: String,
    pub cpumask: String,
    pub socket: String,
    pub bdev: String,
    pub readonly: bool,
    pub poll_mode: PollMode,
    pub max_queues: u16,
    /// Whether a frontend is attached right now.
    pub connected: bool,
    /// Requests refused because the guest sent something malformed.
    pub bad_requests: u64,
}

/// A running controller. Dropping it stops it and removes its socket.
pub struct Controller {
    name: String,
    socket_path: PathBuf,
    bdev_name: String,
    cpumask: CpuSet,
    read_only: bool,
    poll_mode: PollMode,
    max_queues: u16,
    dev: Arc<DeviceShared>,
    connected: Arc<AtomicBool>,
    stop: EventFd,
    session: Option<JoinHandle<()>>,
}

impl Controller {
    pub fn start(spec: ControllerSpec) -> Result<Controller, VhostError> {
        if spec.max_queues == 0 || spec.max_queues > MAX_QUEUES {
            return Err(VhostError::InvalidParam(format!(
                "num_queues must be 1..={MAX_QUEUES}, got {}",
                spec.max_queues
            )));
        }
        let info = spec.bdev.info();
        let mut serial = [0u8; 20];
        let n = info.name.len().min(serial.len());
        serial[..n].copy_from_slice(&info.name.as_bytes()[..n]);
        let dev = Arc::new(DeviceShared {
            geometry: DeviceGeometry::new(info, spec.read_only),
            serial,
            writeback: AtomicBool::new(info.caps.volatile_cache),
            bad_requests: AtomicU64::new(0),
        });

        // One worker per CPU of the mask, but never more workers than queues.
        let cpus = spec.cpumask.cpus();
        let nworkers = cpus.len().min(usize::from(spec.max_queues)).max(1);
        let workers: Vec<WorkerHandle> = cpus[..nworkers]
            .iter()
            .map(|&cpu| {
                WorkerHandle::spawn(
                    format!("vq-{}-c{cpu}", spec.name),
                    Some(cpu),
                    spec.poll_mode,
                    dev.clone(),
                )
            })
            .collect::<Result<_, _>>()
            .map_err(|e| VhostError::Worker(e.to_string()))?;
        let workers: Arc<[WorkerHandle]> = workers.into();

        let listen_err = |reason: String| VhostError::Listen {
            path: spec.socket_path.display().to_string(),
            reason,
        };
        let listener =
            Listener::new(&spec.socket_path, true).map_err(|e| listen_err(e.to_string()))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| listen_err(e.to_string()))?;
        let stop =
            EventFd::new(libc::EFD_NONBLOCK).map_err(|e| VhostError::Worker(e.to_string()))?;
        let stop2 = stop
            .try_clone()
            .map_err(|e| VhostError::Worker(e.to_string()))?;
        let connected = Arc::new(AtomicBool::new(false));

        let backend = Arc::new(Mutex::new(BlkBackend::new(
            spec.bdev.clone(),
            dev.clone(),
            workers,
            spec.read_only,
            spec.max_queues,
        )));
        let session = Session {
            name: spec.name.clone(),
            listener,
            backend,
            stop: stop2,
            connected: connected.clone(),
        };
        let thread = std::thread::Builder::new()
            .name(format!("vhost-{}", spec.name))
            .spawn(move || session.run())
            .map_err(|e| VhostError::Worker(e.to_string()))?;
        info!(
            ctrlr = spec.name,
            socket = %spec.socket_path.display(),
            bdev = info.name,
            cpumask = %spec.cpumask,
            mode = %spec.poll_mode,
            "vhost-user-blk controller listening"
        );
        Ok(Controller {
            name: spec.name,
            socket_path: spec.socket_path,
            bdev_name: info.name.clone(),
            cpumask: spec.cpumask,
            read_only: spec.read_only,
            poll_mode: spec.poll_mode,
            max_queues: spec.max_queues,
            dev,
            connected,
            stop,
            session: Some(thread),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn bdev_name(&self) -> &str {
        &self.bdev_name
    }

    pub fn info(&self) -> ControllerInfo {
        ControllerInfo {
            ctrlr: self.name.clone(),
            cpumask: self.cpumask.to_string(),
            socket: self.socket_path.display().to_string(),
            bdev: self.bdev_name.clone(),
            readonly: self.read_only,
            poll_mode: self.poll_mode,
            max_queues: self.max_queues,
            connected: self.connected.load(Ordering::Relaxed),
            bad_requests: self.dev.bad_requests.load(Ordering::Relaxed),
        }
    }

    /// Stops the workers, disconnects the frontend, removes the socket.
    pub fn stop(self) {}
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.session.take() {
            let _ = t.join();
        }
        info!(ctrlr = self.name, "controller stopped");
    }
}

/// The session thread's state: accepts one frontend at a time and serves its
/// control messages until it goes away, then waits for the next.
struct Session {
    name: String,
    listener: Listener,
    backend: Arc<Mutex<BlkBackend>>,
    stop: EventFd,
    connected: Arc<AtomicBool>,
}

const STOP_TOKEN: u64 = 0;
const SOCK_TOKEN: u64 = 1;

impl Session {
    fn run(self) {
        // The backend (and through it the workers) is dropped when this
        // thread ends, after the last session was reset.
        loop {
            let Some(stream) = self.wait_for_frontend() else {
                break;
            };
            self.connected.store(true, Ordering::Relaxed);
            info!(ctrlr = self.name, "frontend connected");
            let stopped = self.serve(stream);
            self.backend
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .reset();
            self.connected.store(false, Ordering::Relaxed);
            info!(
                ctrlr = self.name,
                "frontend disconnected; ready for the next one"
            );
            if stopped {
                break;
            }
        }
    }

    /// Waits until `fd` is readable or the controller is told to stop.
    /// Returns false on stop.
    fn wait_readable(&self, fd: i32) -> bool {
        let Ok(epoll) = Epoll::new() else {
            return false;
        };
        let ok = epoll
            .ctl(
                ControlOperation::Add,
                self.stop.as_raw_fd(),
                EpollEvent::new(EventSet::IN, STOP_TOKEN),
            )
            .and_then(|_| {
                epoll.ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN | EventSet::HANG_UP, SOCK_TOKEN),
                )
            });
        if ok.is_err() {
            return false;
        }
        let mut events = [EpollEvent::default(); 2];
        loop {
            match epoll.wait(-1, &mut events) {
                Ok(n) => {
                    if events[..n].iter().any(|e| e.data() == STOP_TOKEN) {
                        return false;
                    }
                    if n > 0 {
                        return true;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => return false,
            }
        }
    }

    fn wait_for_frontend(&self) -> Option<UnixStream> {
        loop {
            if !self.wait_readable(self.listener.as_raw_fd()) {
                return None;
            }
            match self.listener.accept() {
                Ok(Some(s)) => return Some(s),
                Ok(None) => continue,
                Err(e) => {
                    warn!(ctrlr = self.name, "accept: {e}");
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
            }
        }
    }

    /// Serves one frontend; returns true if the controller is stopping.
    fn serve(&self, stream: UnixStream) -> bool {
        let mut handler = BackendReqHandler::from_stream(stream, self.backend.clone());
        loop {
            if !self.wait_readable(handler.as_raw_fd()) {
                return true;
            }
            if let Err(e) = handler.handle_request() {
                if is_transport_error(&e) {
                    if !matches!(e, vhost::vhost_user::Error::Disconnected) {
                        warn!(ctrlr = self.name, "vhost-user connection failed: {e}");
                    }
                    return false;
                }
                // One refused request; the frontend got its NACK (REPLY_ACK)
                // or will notice. The session goes on.
                warn!(ctrlr = self.name, "vhost-user request refused: {e}");
            }
        }
    }
}
