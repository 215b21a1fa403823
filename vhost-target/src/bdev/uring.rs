//! uring bdev: a regular file or a block device driven through io_uring.
//!
//! Serves both SPDK's `bdev_uring_create` and `bdev_aio_create` (the kind only
//! changes names and RPC shapes; the engine is io_uring either way).
//!
//! Each channel owns one ring, a fixed table of request slots and an eventfd,
//! all sized by `queue_depth` when it opens, so the hot path neither
//! allocates nor locks. The file is opened twice: with `O_DIRECT` when the file
//! system allows it, for the usual page-aligned guest buffers, and buffered,
//! for requests whose buffers `O_DIRECT` would reject with `EINVAL`. Linux
//! keeps the page cache coherent with direct I/O on the same inode, so mixing
//! the two is safe for non-overlapping requests, which is all a disk promises.
//!
//! # Sleeping on `completion_fd`
//! The eventfd is registered with the ring, so the kernel bumps it for every
//! completion it posts. A worker that wants to sleep must:
//! 1. read the eventfd (non-blocking) to reset its counter,
//! 2. `poll()` again — this catches completions posted before the reset,
//! 3. only if that delivered nothing, wait for the fd to become readable,
//! 4. `poll()`.
//!
//! Any completion posted after step 1 makes the fd readable, so none is
//! lost; one posted before it is found by step 2. Skipping step 1 leaves the
//! fd readable forever (a busy loop, not a hang); skipping step 2 can sleep
//! on a completion that has already arrived.
//!
//! # Discard on block devices
//! For a regular file DISCARD punches a hole (`FALLOC_FL_PUNCH_HOLE`), probed
//! at open. For a block device DISCARD is reported unsupported: the kernel's
//! punch-hole there needs hardware write-zeroes-with-unmap support that cannot
//! be probed without touching data, and `BLKDISCARD` is a synchronous ioctl
//! that would stall the polled core. WRITE_ZEROES on a block device uses
//! `FALLOC_FL_ZERO_RANGE`, which the kernel serves on every device (falling
//! back to writing zeroes).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::PathBuf;
use std::sync::Arc;

use io_uring::{opcode, squeue, types, IoUring};
use serde_json::json;

use super::params::{check_block_size, check_name, check_queue_depth, IoBounds};
use super::{
    Bdev, BdevCaps, BdevError, BdevInfo, BdevIo, Completion, IoChannel, IoError, IoOp, IoStats,
    SubmitError,
};

/// Which RPC created the bdev; both are served by the same io_uring code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UringKind {
    Uring,
    Aio,
}

#[derive(Debug, Clone)]
pub struct UringOptions {
    pub name: String,
    pub filename: PathBuf,
    /// Logical block size; `None`: the device's own (512 for a regular file).
    pub block_size: Option<u32>,
    pub readonly: bool,
    pub uuid: Option<uuid::Uuid>,
    pub kind: UringKind,
}

// <linux/fs.h>. libc lacks BLKGETSIZE64; its value is _IOR(0x12, 114, size_t),
// which is this number on the generic ioctl layout (x86, arm, riscv).
const BLKGETSIZE64: libc::Ioctl = 0x8008_1272;

/// Most iovecs one readv/writev takes (UIO_MAXIOV); longer chains go in
/// several pieces.
const IOV_MAX: u32 = 1024;

/// Largest single read/write piece, kept below the kernel's MAX_RW_COUNT and
/// a multiple of any block size; the rest follows as a short transfer would.
const MAX_PIECE: usize = 1 << 30;

/// Indices of the files registered with every ring.
const BUFFERED: types::Fixed = types::Fixed(0);
const DIRECT: types::Fixed = types::Fixed(1);

/// The opened file and what it supports; shared by the bdev and its channels.
struct UringFiles {
    buffered: File,
    direct: Option<DirectFile>,
    /// `fallocate` modes for DISCARD, WRITE_ZEROES, and WRITE_ZEROES with
    /// unmap allowed; `None`: unsupported.
    discard_mode: Option<i32>,
    zeroes_mode: Option<i32>,
    unmap_zeroes_mode: Option<i32>,
}

struct DirectFile {
    file: File,
    /// Alignment masks `O_DIRECT` demands of buffer addresses, and of file
    /// offsets and lengths.
    mem_mask: u64,
    offset_mask: u64,
}

pub struct UringBdev {
    info: BdevInfo,
    stats: IoStats,
    opts: UringOptions,
    files: Arc<UringFiles>,
}

fn io_err(path: &str, source: io::Error) -> BdevError {
    BdevError::Io {
        path: path.to_owned(),
        source,
    }
}

/// An `ioctl` that fills in one integer.
fn ioctl_get<T: Default>(file: &File, request: libc::Ioctl) -> io::Result<T> {
    let mut v = T::default();
    // SAFETY: every request passed here writes exactly one `T` through the
    // pointer, which points to a live `T`.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), request, &mut v as *mut T) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(v)
}

fn fallocate(file: &File, mode: i32, offset: u64, len: u64) -> io::Result<()> {
    // SAFETY: fallocate only reads its integer arguments.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), mode, offset as i64, len as i64) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A page-aligned scratch buffer for the open-time probe read.
struct ProbeBuf {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

impl ProbeBuf {
    fn new(len: usize, align: usize) -> Option<Self> {
        let layout = std::alloc::Layout::from_size_align(len.max(1), align.max(4096)).ok()?;
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        (!ptr.is_null()).then_some(Self { ptr, layout })
    }
}

impl Drop for ProbeBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) }
    }
}

/// Whether an aligned read of `len` bytes at offset 0 works on `file`. Some
/// file systems accept `O_DIRECT` at open and refuse the I/O with `EINVAL`.
fn probe_direct_read(file: &File, len: usize, mem_align: usize) -> bool {
    let Some(buf) = ProbeBuf::new(len, mem_align) else {
        return false;
    };
    // SAFETY: `buf` owns at least `len` writable bytes.
    let rc = unsafe { libc::pread(file.as_raw_fd(), buf.ptr.cast(), len, 0) };
    rc >= 0
}

/// Opens `O_DIRECT` and finds its alignment; `None` when direct I/O is not
/// available, and the buffered file serves everything.
fn open_direct(opts: &UringOptions, block_size: u32) -> Option<DirectFile> {
    let file = OpenOptions::new()
        .read(true)
        .write(!opts.readonly)
        .custom_flags(libc::O_DIRECT)
        .open(&opts.filename)
        .map_err(|e| {
            tracing::info!(bdev = %opts.name, error = %e, "O_DIRECT open failed; using buffered I/O");
        })
        .ok()?;

    // The kernel tells the exact alignment since 6.1; older kernels get a
    // probe from the block size up.
    // SAFETY: statx is plain data, for which all-zeroes is a valid value.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: the path is a valid C string, AT_EMPTY_PATH makes statx look at
    // the fd itself, and `stx` is a live, writable statx.
    let rc = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    let (mem_align, offset_align) = if rc == 0 && stx.stx_mask & libc::STATX_DIOALIGN != 0 {
        if stx.stx_dio_offset_align == 0 {
            tracing::info!(bdev = %opts.name, "file system has no direct I/O; using buffered I/O");
            return None;
        }
        (stx.stx_dio_mem_align.max(1), stx.stx_dio_offset_align)
    } else {
        let a = [512, 1024, 2048, 4096]
            .into_iter()
            .filter(|&a| a <= block_size)
            .find(|&a| probe_direct_read(&file, a as usize, a as usize))?;
        (a, a)
    };
    if !mem_align.is_power_of_two() || !offset_align.is_power_of_two() {
        return None;
    }
    if !probe_direct_read(&file, offset_align as usize, mem_align as usize) {
        tracing::info!(bdev = %opts.name, "O_DIRECT read probe failed; using buffered I/O");
        return None;
    }
    Some(DirectFile {
        file,
        mem_mask: u64::from(mem_align) - 1,
        offset_mask: u64::from(offset_align) - 1,
    })
}

impl UringBdev {
    pub fn open(opts: UringOptions) -> Result<Self, BdevError> {
        check_name(&opts.name)?;
        if let Some(bs) = opts.block_size {
            check_block_size(bs)?;
        }
        let path = opts.filename.display().to_string();
        let buffered = OpenOptions::new()
            .read(true)
            .write(!opts.readonly)
            .open(&opts.filename)
            .map_err(|e| io_err(&path, e))?;
        let meta = buffered.metadata().map_err(|e| io_err(&path, e))?;
        let is_blockdev = meta.file_type().is_block_device();

        let (block_size, num_blocks, physical_block_size) = if is_blockdev {
            let size: u64 = ioctl_get(&buffered, BLKGETSIZE64).map_err(|e| io_err(&path, e))?;
            let logical: libc::c_int =
                ioctl_get(&buffered, libc::BLKSSZGET).map_err(|e| io_err(&path, e))?;
            let logical = u32::try_from(logical).unwrap_or(512);
            let physical: libc::c_uint = ioctl_get(&buffered, libc::BLKPBSZGET).unwrap_or(logical);
            let bs = opts.block_size.unwrap_or(logical);
            check_block_size(bs)?;
            if bs < logical {
                return Err(BdevError::InvalidParam(format!(
                    "block_size {bs} is smaller than the logical block size {logical} of {path}"
                )));
            }
            let num_blocks = size / u64::from(bs);
            if num_blocks == 0 {
                return Err(BdevError::InvalidParam(format!(
                    "{path} ({size} bytes) is smaller than one {bs}-byte block"
                )));
            }
            (bs, num_blocks, physical.max(bs))
        } else if meta.file_type().is_file() {
            let size = meta.len();
            let bs = opts.block_size.unwrap_or(512);
            if size == 0 {
                return Err(BdevError::InvalidParam(format!("{path} is empty")));
            }
            if size % u64::from(bs) != 0 {
                return Err(BdevError::InvalidParam(format!(
                    "size of {path} ({size} bytes) is not a multiple of block_size {bs}"
                )));
            }
            (bs, size / u64::from(bs), bs)
        } else {
            return Err(BdevError::InvalidParam(format!(
                "{path} is neither a regular file nor a block device"
            )));
        };

        let direct = open_direct(&opts, block_size);

        const PUNCH: i32 = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        const ZERO: i32 = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
        let (discard_mode, zeroes_mode, unmap_zeroes_mode) = if opts.readonly {
            (None, None, None)
        } else if is_blockdev {
            (None, Some(ZERO), Some(ZERO))
        } else {
            // Probe just past the end of the file, where KEEP_SIZE makes both
            // calls touch no data. Zero-range first: it may preallocate a block
            // there, which the punch then gives back.
            let end = num_blocks * u64::from(block_size);
            let len = u64::from(block_size);
            let zero = fallocate(&buffered, ZERO, end, len).is_ok();
            let punch = fallocate(&buffered, PUNCH, end, len).is_ok();
            let pick = |first: bool, a: i32, second: bool, b: i32| {
                if first {
                    Some(a)
                } else if second {
                    Some(b)
                } else {
                    None
                }
            };
            (
                pick(punch, PUNCH, zero, ZERO),
                pick(zero, ZERO, punch, PUNCH),
                pick(punch, PUNCH, zero, ZERO),
            )
        };

        let caps = BdevCaps {
            volatile_cache: true,
            flush: true,
            discard: discard_mode.is_some(),
            write_zeroes: zeroes_mode.is_some(),
            read_only: opts.readonly,
        };
        tracing::info!(
            bdev = %opts.name,
            path = %path,
            block_size,
            num_blocks,
            direct = direct.is_some(),
            ?caps,
            "opened uring bdev"
        );
        Ok(Self {
            info: BdevInfo {
                name: opts.name.clone(),
                product_name: match opts.kind {
                    UringKind::Uring => "URING bdev",
                    UringKind::Aio => "AIO disk",
                },
                block_size,
                num_blocks,
                physical_block_size,
                uuid: opts.uuid.unwrap_or_else(uuid::Uuid::new_v4),
                caps,
            },
            stats: IoStats::default(),
            opts,
            files: Arc::new(UringFiles {
                buffered,
                direct,
                discard_mode,
                zeroes_mode,
                unmap_zeroes_mode,
            }),
        })
    }

    /// Whether requests with aligned buffers bypass the page cache.
    pub fn uses_direct_io(&self) -> bool {
        self.files.direct.is_some()
    }
}

impl Bdev for UringBdev {
    fn info(&self) -> &BdevInfo {
        &self.info
    }

    fn open_channel(&self, queue_depth: u32) -> Result<Box<dyn IoChannel>, BdevError> {
        Ok(Box::new(UringChannel::new(self, queue_depth)?))
    }

    fn iostat(&self) -> &IoStats {
        &self.stats
    }

    fn driver_specific(&self) -> serde_json::Value {
        let filename = self.opts.filename.display().to_string();
        match self.opts.kind {
            UringKind::Uring => json!({ "uring": { "filename": filename } }),
            UringKind::Aio => json!({
                "aio": {
                    "filename": filename,
                    "block_size_override": self.opts.block_size.is_some(),
                    "readonly": self.opts.readonly,
                }
            }),
        }
    }

    fn kind(&self) -> &'static str {
        match self.opts.kind {
            UringKind::Uring => "uring",
            UringKind::Aio => "aio",
        }
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn create_params(&self) -> serde_json::Value {
        let filename = self.opts.filename.display().to_string();
        match self.opts.kind {
            UringKind::Uring => json!({
                "name": self.info.name,
                "filename": filename,
                "block_size": self.info.block_size,
                "uuid": self.info.uuid.to_string(),
            }),
            UringKind::Aio => json!({
                "name": self.info.name,
                "filename": filename,
                "block_size": self.info.block_size,
                "readonly": self.opts.readonly,
                "uuid": self.info.uuid.to_string(),
            }),
        }
    }
}

/// What a channel needs of the files on the hot path, copied out of the
/// shared `UringFiles` so no pointer chase or refcount is involved.
#[derive(Clone, Copy)]
struct FileTable {
    has_direct: bool,
    mem_mask: u64,
    offset_mask: u64,
    discard_mode: i32,
    zeroes_mode: i32,
    unmap_zeroes_mode: i32,
}

/// One request in flight. It has exactly one SQE outstanding at any time:
/// a short transfer is continued by a new SQE only after its CQE arrives.
#[derive(Clone, Copy)]
struct Slot {
    tag: u32,
    op: IoOp,
    /// The caller's iovecs (never modified) and where the next piece starts:
    /// `head_skip` bytes into iovec `next_iov`.
    iovs: *const libc::iovec,
    iovcnt: u32,
    next_iov: u32,
    head_skip: usize,
    /// File offset and bytes still to transfer (Read/Write), or the range
    /// (Discard/WriteZeroes).
    offset: u64,
    remaining: u64,
    /// Every remaining piece meets O_DIRECT's alignment.
    direct_ok: bool,
    /// The outstanding SQE went to the O_DIRECT file.
    on_direct: bool,
}

impl Slot {
    const EMPTY: Slot = Slot {
        tag: 0,
        op: IoOp::Flush,
        iovs: std::ptr::null(),
        iovcnt: 0,
        next_iov: 0,
        head_skip: 0,
        offset: 0,
        remaining: 0,
        direct_ok: false,
        on_direct: false,
    };

    /// Moves the cursor `n` bytes on, after a transfer of that many.
    ///
    /// # Safety
    /// `iovs` points to `iovcnt` valid iovecs (the submit contract).
    unsafe fn advance(&mut self, mut n: usize) {
        while n > 0 && self.next_iov < self.iovcnt {
            // SAFETY: next_iov < iovcnt.
            let len = unsafe { (*self.iovs.add(self.next_iov as usize)).iov_len };
            let left = len - self.head_skip;
            if n >= left {
                n -= left;
                self.next_iov += 1;
                self.head_skip = 0;
            } else {
                self.head_skip += n;
                n = 0;
            }
        }
    }

    /// The SQE for the next piece of this request.
    ///
    /// # Safety
    /// `iovs` points to `iovcnt` valid iovecs describing `remaining` bytes
    /// from the cursor on, and their buffers stay valid until the CQE.
    unsafe fn prepare(&mut self, idx: u32, files: &FileTable) -> squeue::Entry {
        let entry = match self.op {
            IoOp::Flush => opcode::Fsync::new(BUFFERED)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            // fallocate refuses a zero length; a zero-length request is a no-op.
            IoOp::Discard | IoOp::WriteZeroes { .. } if self.remaining == 0 => {
                opcode::Nop::new().build()
            }
            IoOp::Discard => opcode::Fallocate::new(BUFFERED, self.remaining)
                .offset(self.offset)
                .mode(files.discard_mode)
                .build(),
            IoOp::WriteZeroes { unmap } => {
                let mode = if unmap {
                    files.unmap_zeroes_mode
                } else {
                    files.zeroes_mode
                };
                opcode::Fallocate::new(BUFFERED, self.remaining)
                    .offset(self.offset)
                    .mode(mode)
                    .build()
            }
            // A zero-length transfer still owes the caller a completion.
            IoOp::Read | IoOp::Write { .. } if self.remaining == 0 => opcode::Nop::new().build(),
            IoOp::Read | IoOp::Write { .. } => {
                let write = matches!(self.op, IoOp::Write { .. });
                let rw_flags = if matches!(self.op, IoOp::Write { fua: true }) {
                    libc::RWF_DSYNC
                } else {
                    0
                };
                self.on_direct = files.has_direct && self.direct_ok;
                let fd = if self.on_direct { DIRECT } else { BUFFERED };
                let rest = self.iovcnt - self.next_iov;
                // SAFETY: remaining > 0, so the cursor is on a valid iovec.
                let head = unsafe { self.iovs.add(self.next_iov as usize) };
                if self.head_skip > 0 || rest == 1 {
                    // SAFETY: as above.
                    let iov = unsafe { *head };
                    let len = (iov.iov_len - self.head_skip).min(MAX_PIECE) as u32;
                    // SAFETY: head_skip < iov_len, inside the caller's buffer.
                    let buf = unsafe { iov.iov_base.cast::<u8>().add(self.head_skip) };
                    if write {
                        opcode::Write::new(fd, buf, len)
                            .offset(self.offset)
                            .rw_flags(rw_flags)
                            .build()
                    } else {
                        opcode::Read::new(fd, buf, len).offset(self.offset).build()
                    }
                } else {
                    let cnt = rest.min(IOV_MAX);
                    if write {
                        opcode::Writev::new(fd, head, cnt)
                            .offset(self.offset)
                            .rw_flags(rw_flags)
                            .build()
                    } else {
                        opcode::Readv::new(fd, head, cnt)
                            .offset(self.offset)
                            .build()
                    }
                }
            }
        };
        entry.user_data(u64::from(idx))
    }
}

/// What a CQE means for its request.
enum Step {
    Done(Result<(), IoError>),
    Continue,
}

pub struct UringChannel {
    ring: IoUring,
    files: FileTable,
    /// Keeps the registered fds open as long as the ring may use them.
    _owner: Arc<UringFiles>,
    bounds: IoBounds,
    slots: Box<[Slot]>,
    /// Indices of free slots; capacity `queue_depth`, so pushes never allocate.
    free: Vec<u32>,
    eventfd: OwnedFd,
    /// SQEs were queued since the last successful `io_uring_enter`.
    unsubmitted: bool,
}

// SAFETY: the raw pointers in `slots` point to the submitter's buffers, which
// the submit contract keeps valid until completion wherever the channel
// runs; nothing in the channel is tied to the thread that created it (the
// ring is an fd and mappings). `IoChannel` requires `Send` so a worker can
// take its channel to its own thread.
unsafe impl Send for UringChannel {}

impl UringChannel {
    fn new(bdev: &UringBdev, queue_depth: u32) -> Result<Self, BdevError> {
        check_queue_depth(queue_depth)?;
        let err = |what: &str, e: io::Error| BdevError::Channel(format!("{what}: {e}"));
        let entries = queue_depth.next_power_of_two();
        let ring = IoUring::new(entries).map_err(|e| err("io_uring setup", e))?;

        let files = &bdev.files;
        let mut fds = vec![files.buffered.as_raw_fd()];
        if let Some(d) = &files.direct {
            fds.push(d.file.as_raw_fd());
        }
        ring.submitter()
            .register_files(&fds)
            .map_err(|e| err("io_uring file registration", e))?;

        // SAFETY: eventfd has no memory-safety preconditions.
        let efd: RawFd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if efd < 0 {
            return Err(err("eventfd", io::Error::last_os_error()));
        }
        // SAFETY: eventfd just returned this fd, and nothing else owns it.
        let eventfd = unsafe { OwnedFd::from_raw_fd(efd) };
        ring.submitter()
            .register_eventfd(eventfd.as_raw_fd())
            .map_err(|e| err("io_uring eventfd registration", e))?;

        let table = FileTable {
            has_direct: files.direct.is_some(),
            mem_mask: files.direct.as_ref().map_or(0, |d| d.mem_mask),
            offset_mask: files.direct.as_ref().map_or(0, |d| d.offset_mask),
            discard_mode: files.discard_mode.unwrap_or(0),
            zeroes_mode: files.zeroes_mode.unwrap_or(0),
            unmap_zeroes_mode: files.unmap_zeroes_mode.unwrap_or(0),
        };
        Ok(Self {
            ring,
            files: table,
            _owner: files.clone(),
            bounds: IoBounds::new(bdev.info.block_size, bdev.info.size_bytes(), bdev.info.caps),
            slots: vec![Slot::EMPTY; queue_depth as usize].into_boxed_slice(),
            free: (0..queue_depth).rev().collect(),
            eventfd,
            unsubmitted: false,
        })
    }

    /// Checks the iovecs of a read/write: they must add up to `len`; and
    /// reports whether every one suits O_DIRECT.
    ///
    /// # Safety
    /// As [`IoChannel::submit`].
    unsafe fn check_iovecs(&self, io: &BdevIo) -> Result<bool, IoError> {
        let f = &self.files;
        let mut total: u64 = 0;
        let mut misaligned = io.offset & f.offset_mask;
        for i in 0..io.iovcnt as usize {
            // SAFETY: i < iovcnt, per the submit contract.
            let iov = unsafe { &*io.iovs.add(i) };
            let len = iov.iov_len as u64;
            total = total.checked_add(len).ok_or(IoError::OutOfRange)?;
            misaligned |= (iov.iov_base as u64 & f.mem_mask) | (len & f.offset_mask);
        }
        if total != io.len {
            return Err(IoError::OutOfRange);
        }
        Ok(misaligned == 0)
    }

    /// Decides what a CQE with result `res` means for `slot`.
    ///
    /// # Safety
    /// The slot's iovecs are still valid (its request is in flight).
    unsafe fn step(slot: &mut Slot, files: &FileTable, res: i32) -> Step {
        if res < 0 {
            let errno = -res;
            if errno == libc::EINVAL && slot.on_direct {
                // The file system refused this alignment after all; the
                // buffered file takes any.
                slot.direct_ok = false;
                return Step::Continue;
            }
            return Step::Done(Err(IoError::Errno(errno)));
        }
        match slot.op {
            IoOp::Read | IoOp::Write { .. } if slot.remaining > 0 => {
                let n = (res as u64).min(slot.remaining);
                if n == 0 {
                    // End of file inside the bdev: the file shrank under us.
                    return Step::Done(Err(IoError::Errno(libc::EIO)));
                }
                // SAFETY: the caller guarantees the iovecs.
                unsafe { slot.advance(n as usize) };
                slot.offset += n;
                slot.remaining -= n;
                if slot.remaining == 0 {
                    return Step::Done(Ok(()));
                }
                if n & (files.offset_mask | files.mem_mask) != 0 {
                    // The cursor now sits mid-block or at an odd address.
                    slot.direct_ok = false;
                }
                Step::Continue
            }
            _ => Step::Done(Ok(())),
        }
    }
}

impl IoChannel for UringChannel {
    fn queue_depth(&self) -> u32 {
        self.slots.len() as u32
    }

    unsafe fn submit(&mut self, io: &BdevIo) -> Result<(), SubmitError> {
        if self.free.is_empty() {
            return Err(SubmitError::Busy);
        }
        self.bounds.check(io).map_err(SubmitError::Refused)?;
        let direct_ok = match io.op {
            IoOp::Read | IoOp::Write { .. } => {
                // SAFETY: our caller upholds the submit contract.
                unsafe { self.check_iovecs(io) }.map_err(SubmitError::Refused)?
            }
            _ => false,
        };
        let idx = self.free.pop().expect("checked non-empty above");
        let slot = &mut self.slots[idx as usize];
        *slot = Slot {
            tag: io.tag,
            op: io.op,
            iovs: io.iovs,
            iovcnt: io.iovcnt,
            next_iov: 0,
            head_skip: 0,
            offset: io.offset,
            remaining: io.len,
            direct_ok,
            on_direct: false,
        };
        // SAFETY: the iovecs were checked to describe `len` bytes, and the
        // submit contract keeps them valid until we deliver the completion.
        let entry = unsafe { slot.prepare(idx, &self.files) };
        // SAFETY: the SQE's buffers stay valid until its CQE (as above).
        let pushed = unsafe { self.ring.submission().push(&entry) };
        // At most one SQE per slot is ever outstanding and the ring has at
        // least `queue_depth` entries, so the queue cannot be full.
        assert!(pushed.is_ok(), "io_uring submission queue overflow");
        self.unsubmitted = true;
        Ok(())
    }

    fn kick(&mut self) {
        if !self.unsubmitted {
            return;
        }
        match self.ring.submit() {
            Ok(_) => self.unsubmitted = !self.ring.submission().is_empty(),
            Err(e) => match e.raw_os_error() {
                // Transient: retried at the next kick.
                Some(libc::EINTR | libc::EAGAIN | libc::EBUSY) => {}
                _ => tracing::error!(error = %e, "io_uring_enter failed"),
            },
        }
    }

    fn poll(&mut self, done: &mut dyn FnMut(Completion)) -> usize {
        let (submitter, mut sq, mut cq) = self.ring.split();
        let mut delivered = 0;
        let mut resubmitted = false;
        for cqe in &mut cq {
            let idx = cqe.user_data() as u32;
            let slot = &mut self.slots[idx as usize];
            // SAFETY: the slot's request is in flight (it had an SQE), so its
            // iovecs are still valid.
            match unsafe { Self::step(slot, &self.files, cqe.result()) } {
                Step::Done(result) => {
                    done(Completion {
                        tag: slot.tag,
                        result,
                    });
                    self.free.push(idx);
                    delivered += 1;
                }
                Step::Continue => {
                    // SAFETY: the cursor stays within the caller's iovecs,
                    // which remain valid until we deliver the completion.
                    let entry = unsafe { slot.prepare(idx, &self.files) };
                    // SAFETY: as above.
                    let pushed = unsafe { sq.push(&entry) };
                    assert!(pushed.is_ok(), "io_uring submission queue overflow");
                    resubmitted = true;
                }
            }
        }
        drop(cq);
        if resubmitted {
            sq.sync();
            // Submit now rather than at the next kick: the worker may go to
            // sleep on the eventfd right after this poll.
            if submitter.submit().is_err() {
                self.unsubmitted = true;
            }
        }
        delivered
    }

    fn completion_fd(&self) -> Option<RawFd> {
        Some(self.eventfd.as_raw_fd())
    }

    fn in_flight(&self) -> u32 {
        (self.slots.len() - self.free.len()) as u32
    }
}

impl Drop for UringChannel {
    /// Closing a ring cancels its requests asynchronously, so the kernel could
    /// still write into a guest buffer after we return. Wait for every
    /// outstanding SQE instead; each slot has exactly one.
    fn drop(&mut self) {
        let mut outstanding = self.in_flight();
        while outstanding > 0 {
            if let Err(e) = self.ring.submit_and_wait(1) {
                if e.raw_os_error() != Some(libc::EINTR) {
                    tracing::error!(error = %e, "cannot drain io_uring at channel close");
                    break;
                }
            }
            outstanding = outstanding.saturating_sub(self.ring.completion().count() as u32);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Seek, SeekFrom, Write};
    use std::path::Path;
    use std::time::{Duration, Instant};

    use super::*;
    use crate::bdev::test_util::{io, ranged, read_ok, run, wait_for, write_ok, AlignedBuf};

    /// A directory on a disk file system (not tmpfs), where O_DIRECT works.
    fn disk_dir() -> tempfile::TempDir {
        tempfile::Builder::new()
            .prefix("tandem-uring-")
            .tempdir_in("/var/tmp")
            .unwrap()
    }

    fn make_file(dir: &Path, name: &str, len: u64) -> PathBuf {
        let path = dir.join(name);
        File::create(&path).unwrap().set_len(len).unwrap();
        path
    }

    fn opts(path: &Path) -> UringOptions {
        UringOptions {
            name: "uring0".into(),
            filename: path.to_owned(),
            block_size: None,
            readonly: false,
            uuid: None,
            kind: UringKind::Uring,
        }
    }

    fn open_file(dir: &Path, len: u64) -> UringBdev {
        UringBdev::open(opts(&make_file(dir, "disk", len))).unwrap()
    }

    #[test]
    fn data_round_trips_through_o_direct() {
        let dir = disk_dir();
        let bdev = open_file(dir.path(), 1 << 20);
        assert!(bdev.uses_direct_io(), "/var/tmp should allow O_DIRECT");
        let mut ch = bdev.open_channel(8).unwrap();
        let mut data = AlignedBuf::pattern(16384, 1);
        write_ok(ch.as_mut(), 8192, &mut data);
        assert_eq!(
            read_ok(ch.as_mut(), 8192, 16384).as_slice(),
            data.as_slice()
        );
        // And it really is in the file, at that offset.
        drop(ch);
        let mut f = File::open(dir.path().join("disk")).unwrap();
        let mut back = vec![0; 16384];
        f.seek(SeekFrom::Start(8192)).unwrap();
        f.read_exact(&mut back).unwrap();
        assert_eq!(back, data.as_slice());
    }

    #[test]
    fn data_round_trips_on_tmp_and_tmpfs() {
        let mut dirs = vec![tempfile::tempdir().unwrap()];
        if Path::new("/dev/shm").is_dir() {
            dirs.push(tempfile::tempdir_in("/dev/shm").unwrap());
        }
        for dir in dirs {
            let bdev = open_file(dir.path(), 65536);
            let mut ch = bdev.open_channel(4).unwrap();
            let mut data = AlignedBuf::pattern(4096, 2);
            write_ok(ch.as_mut(), 512, &mut data);
            assert_eq!(
                read_ok(ch.as_mut(), 512, 4096).as_slice(),
                data.as_slice(),
                "{}",
                dir.path().display()
            );
        }
    }

    #[test]
    fn data_round_trips_through_several_iovecs() {
        let dir = disk_dir();
        let bdev = open_file(dir.path(), 1 << 20);
        let mut ch = bdev.open_channel(8).unwrap();
        let mut src = AlignedBuf::pattern(3 * 4096, 3);
        let iovs = [src.iov(0, 4096), src.iov(4096, 4096), src.iov(8192, 4096)];
        // SAFETY: `src` outlives the call.
        let r = unsafe { run(ch.as_mut(), &io(IoOp::Write { fua: false }, 4096, &iovs)) };
        assert_eq!(r, Ok(Ok(())));
        let mut dst = AlignedBuf::new(3 * 4096);
        let iovs = [dst.iov(8192, 4096), dst.iov(0, 8192)];
        // SAFETY: `dst` outlives the call.
        let r = unsafe { run(ch.as_mut(), &io(IoOp::Read, 4096, &iovs)) };
        assert_eq!(r, Ok(Ok(())));
        assert_eq!(&dst.as_slice()[8192..], &src.as_slice()[..4096]);
        assert_eq!(&dst.as_slice()[..8192], &src.as_slice()[4096..]);
    }

    #[test]
    fn unaligned_iovecs_are_served_not_failed() {
        let dir = disk_dir();
        let bdev = open_file(dir.path(), 1 << 20);
        assert!(bdev.uses_direct_io());
        let mut ch = bdev.open_channel(8).unwrap();
        // Odd addresses and lengths that are not block multiples: O_DIRECT
        // would say EINVAL.
        let mut src = AlignedBuf::pattern(8192, 4);
        let iovs = [src.iov(1, 1000), src.iov(2001, 1048)];
        // SAFETY: `src` outlives the call.
        let r = unsafe { run(ch.as_mut(), &io(IoOp::Write { fua: false }, 512, &iovs)) };
        assert_eq!(r, Ok(Ok(())));
        let back = read_ok(ch.as_mut(), 512, 2048);
        assert_eq!(&back.as_slice()[..1000], &src.as_slice()[1..1001]);
        assert_eq!(&back.as_slice()[1000..], &src.as_slice()[2001..3049]);
        let mut dst = AlignedBuf::new(4096);
        let iovs = [dst.iov(3, 2048)];
        // SAFETY: `dst` outlives the call.
        let r = unsafe { run(ch.as_mut(), &io(IoOp::Read, 512, &iovs)) };
        assert_eq!(r, Ok(Ok(())));
        assert_eq!(&dst.as_slice()[3..2051], back.as_slice());
    }

    #[test]
    fn direct_io_refusing_an_alignment_falls_back_to_the_buffered_file() {
        let dir = disk_dir();
        let bdev = open_file(dir.path(), 1 << 20);
        assert!(bdev.uses_direct_io());
        let mut ch = UringChannel::new(&bdev, 4).unwrap();
        // Pretend O_DIRECT takes any alignment, so a misaligned request goes
        // there, gets EINVAL, and must be retried buffered.
        ch.files.mem_mask = 0;
        ch.files.offset_mask = 0;
        let mut src = AlignedBuf::pattern(4096, 10);
        let iovs = [src.iov(1, 512)];
        // SAFETY: `src` outlives the call.
        let r = unsafe { run(&mut ch, &io(IoOp::Write { fua: false }, 512, &iovs)) };
        assert_eq!(r, Ok(Ok(())));
        let back = read_ok(&mut ch, 512, 512);
        assert_eq!(back.as_slice(), &src.as_slice()[1..513]);
    }

    #[test]
    fn buffered_only_file_serves_every_request() {
        let dir = disk_dir();
        let mut bdev = open_file(dir.path(), 1 << 20);
        // What open() leaves when O_DIRECT is unavailable (older tmpfs, some
        // FUSE and network file systems).
        Arc::get_mut(&mut bdev.files).unwrap().direct = None;
        assert!(!bdev.uses_direct_io());
        let mut ch = bdev.open_channel(4).unwrap();
        let mut data = AlignedBuf::pattern(8192, 11);
        write_ok(ch.as_mut(), 4096, &mut data);
        assert_eq!(read_ok(ch.as_mut(), 4096, 8192).as_slice(), data.as_slice());
    }

    #[test]
    fn chains_longer_than_iov_max_are_sent_in_pieces() {
        let dir = disk_dir();
        let bdev = open_file(dir.path(), 4 << 20);
        let mut ch = bdev.open_channel(4).unwrap();
        let n = IOV_MAX as usize + 300;
        let mut src = AlignedBuf::pattern(n * 512, 5);
        let iovs: Vec<_> = (0..n).map(|i| src.iov(i * 512, 512)).collect();
        // SAFETY: `src` outlives the call.
        let r = unsafe { run(ch.as_mut(), &io(IoOp::Write { fua: false }, 0, &iovs)) };
        assert_eq!(r, Ok(Ok(())));
        let mut dst = AlignedBuf::new(n * 512);
        let iovs: Vec<_> = (0..n).map(|i| dst.iov(i * 512, 512)).collect();
        // SAFETY: `dst` outlives the call.
        let r = unsafe { run(ch.as_mut(), &io(IoOp::Read, 0, &iovs)) };
        assert_eq!(r, Ok(Ok(())));
        assert!(dst.as_slice() == src.as_slice());
    }

    #[test]
    fn cursor_advances_across_iovec_boundaries() {
        let mut a = [0u8; 100];
        let mut b = [0u8; 50];
        let iovs = [
            libc::iovec {
                iov_base: a.as_mut_ptr().cast(),
                iov_len: 100,
            },
            libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: 50,
            },
        ];
        let mut slot = Slot {
            iovs: iovs.as_ptr(),
            iovcnt: 2,
            ..Slot::EMPTY
        };
        // SAFETY: `iovs` is live for the whole test.
        unsafe {
            slot.advance(30);
            assert_eq!((slot.next_iov, slot.head_skip), (0, 30));
            slot.advance(70);
            assert_eq!((slot.next_iov, slot.head_skip), (1, 0));
            slot.advance(49);
            assert_eq!((slot.next_iov, slot.head_skip), (1, 49));
            slot.advance(1);
            assert_eq!((slot.next_iov, slot.head_skip), (2, 0));
        }
    }

    fn assert_zeroed_after(op: IoOp, dir: &Path) {
        let bdev = open_file(dir, 1 << 20);
        let mut ch = bdev.open_channel(4).unwrap();
        let before = AlignedBuf::pattern(5 * 4096, 6);
        write_ok(ch.as_mut(), 0, &mut AlignedBuf::pattern(5 * 4096, 6));
        // SAFETY: no iovecs.
        let r = unsafe { run(ch.as_mut(), &ranged(op, 4096, 3 * 4096)) };
        assert_eq!(r, Ok(Ok(())), "{op:?}");
        let back = read_ok(ch.as_mut(), 0, 5 * 4096);
        assert_eq!(&back.as_slice()[..4096], &before.as_slice()[..4096]);
        assert!(
            back.as_slice()[4096..4 * 4096].iter().all(|&b| b == 0),
            "{op:?}"
        );
        assert_eq!(&back.as_slice()[4 * 4096..], &before.as_slice()[4 * 4096..]);
    }

    #[test]
    fn read_after_discard_returns_zeroes() {
        let dir = disk_dir();
        assert!(open_file(dir.path(), 4096).info().caps.discard);
        assert_zeroed_after(IoOp::Discard, dir.path());
    }

    #[test]
    fn read_after_write_zeroes_returns_zeroes() {
        let dir = disk_dir();
        assert!(open_file(dir.path(), 4096).info().caps.write_zeroes);
        assert_zeroed_after(IoOp::WriteZeroes { unmap: false }, dir.path());
        assert_zeroed_after(IoOp::WriteZeroes { unmap: true }, dir.path());
    }

    #[test]
    fn fua_write_and_flush_complete_ok() {
        let dir = disk_dir();
        let bdev = open_file(dir.path(), 1 << 20);
        assert!(bdev.info().caps.flush && bdev.info().caps.volatile_cache);
        let mut ch = bdev.open_channel(4).unwrap();
        let mut data = AlignedBuf::pattern(4096, 7);
        let iovs = [data.iov(0, 4096)];
        // SAFETY: `data` outlives the calls; flush has no iovecs.
        unsafe {
            let r = run(ch.as_mut(), &io(IoOp::Write { fua: true }, 0, &iovs));
            assert_eq!(r, Ok(Ok(())));
            let r = run(ch.as_mut(), &ranged(IoOp::Flush, 0, 0));
            assert_eq!(r, Ok(Ok(())));
        }
        assert_eq!(read_ok(ch.as_mut(), 0, 4096).as_slice(), data.as_slice());
    }

    #[test]
    fn out_of_range_and_misaligned_requests_are_refused() {
        let dir = disk_dir();
        let bdev = open_file(dir.path(), 8192);
        let mut ch = bdev.open_channel(4).unwrap();
        let mut buf = AlignedBuf::new(1024);
        for (off, len) in [(8192u64, 512usize), (7680, 1024), (100, 512), (0, 100)] {
            let iovs = [buf.iov(0, len)];
            // SAFETY: refused requests touch nothing; `buf` outlives them anyway.
            let r = unsafe { ch.submit(&io(IoOp::Read, off, &iovs)) };
            assert_eq!(
                r,
                Err(SubmitError::Refused(IoError::OutOfRange)),
                "{off}+{len}"
            );
        }
        // SAFETY: no iovecs.
        let r = unsafe { ch.submit(&ranged(IoOp::Discard, 4096, 8192)) };
        assert_eq!(r, Err(SubmitError::Refused(IoError::OutOfRange)));
        // iovecs describing more than `len`.
        let iovs = [buf.iov(0, 1024)];
        let mut req = io(IoOp::Write { fua: false }, 0, &iovs);
        req.len = 512;
        // SAFETY: as above.
        let r = unsafe { ch.submit(&req) };
        assert_eq!(r, Err(SubmitError::Refused(IoError::OutOfRange)));
        assert_eq!(ch.in_flight(), 0);
    }

    #[test]
    fn busy_when_queue_depth_reached() {
        let dir = disk_dir();
        let bdev = open_file(dir.path(), 1 << 20);
        let mut ch = bdev.open_channel(2).unwrap();
        let mut buf = AlignedBuf::new(8192);
        let a = [buf.iov(0, 4096)];
        let b = [buf.iov(4096, 4096)];
        // SAFETY: `buf` outlives the requests, drained below.
        unsafe {
            ch.submit(&io(IoOp::Read, 0, &a)).unwrap();
            ch.submit(&io(IoOp::Read, 4096, &b)).unwrap();
            assert_eq!(ch.submit(&io(IoOp::Read, 0, &a)), Err(SubmitError::Busy));
        }
        assert_eq!(ch.in_flight(), 2);
        let done = wait_for(ch.as_mut(), 2);
        assert!(done.iter().all(|c| c.result.is_ok()));
        assert_eq!(ch.in_flight(), 0);
    }

    #[test]
    fn a_full_queue_of_requests_completes_each_tag_once_with_its_data() {
        let dir = disk_dir();
        let bdev = open_file(dir.path(), 1 << 20);
        let mut ch = bdev.open_channel(32).unwrap();
        let mut src = AlignedBuf::pattern(32 * 4096, 12);
        let mut dst = AlignedBuf::new(32 * 4096);
        for round in 0..3 {
            let write = round % 2 == 0;
            let buf = if write { &mut src } else { &mut dst };
            let iovs: Vec<_> = (0..32).map(|i| [buf.iov(i * 4096, 4096)]).collect();
            for (i, v) in iovs.iter().enumerate() {
                let op = if write {
                    IoOp::Write { fua: false }
                } else {
                    IoOp::Read
                };
                // Reverse the disk order so completions come back scattered.
                let mut req = io(op, (31 - i as u64) * 4096, v);
                req.tag = i as u32;
                // SAFETY: the buffers outlive the requests, all waited for below.
                unsafe { ch.submit(&req) }.unwrap();
            }
            let mut seen = [false; 32];
            for c in wait_for(ch.as_mut(), 32) {
                assert_eq!(c.result, Ok(()));
                assert!(!std::mem::replace(&mut seen[c.tag as usize], true));
            }
        }
        assert!(dst.as_slice() == src.as_slice());
    }

    #[test]
    fn completion_fd_becomes_readable() {
        let dir = disk_dir();
        let bdev = open_file(dir.path(), 1 << 20);
        let mut ch = bdev.open_channel(4).unwrap();
        let fd = ch.completion_fd().expect("uring channels have an eventfd");
        let mut buf = AlignedBuf::new(4096);
        let iovs = [buf.iov(0, 4096)];
        // SAFETY: `buf` outlives the request, drained below.
        unsafe { ch.submit(&io(IoOp::Read, 0, &iovs)) }.unwrap();
        ch.kick();
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one live pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, 5000) };
        assert_eq!(n, 1, "eventfd never became readable");
        assert_eq!(wait_for(ch.as_mut(), 1).len(), 1);
    }

    #[test]
    fn sleep_protocol_loses_no_completion() {
        let dir = disk_dir();
        let bdev = open_file(dir.path(), 1 << 20);
        let mut ch = bdev.open_channel(4).unwrap();
        let fd = ch.completion_fd().unwrap();
        let mut buf = AlignedBuf::new(4096);
        let iovs = [buf.iov(0, 4096)];
        // SAFETY: `buf` outlives the request, drained below.
        unsafe { ch.submit(&io(IoOp::Read, 0, &iovs)) }.unwrap();
        ch.kick();
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut got = 0;
        while got == 0 {
            assert!(Instant::now() < deadline);
            // The documented protocol: reset the counter, poll, then sleep.
            let mut counter = 0u64;
            // SAFETY: reads 8 bytes into a live u64; the fd is non-blocking.
            unsafe { libc::read(fd, (&mut counter as *mut u64).cast(), 8) };
            got += ch.poll(&mut |_| {});
            if got > 0 {
                break;
            }
            let mut pfd = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one live pollfd.
            assert_eq!(unsafe { libc::poll(&mut pfd, 1, 5000) }, 1);
            got += ch.poll(&mut |_| {});
        }
        assert_eq!(got, 1);
    }

    #[test]
    fn read_only_refuses_writes() {
        let dir = disk_dir();
        let path = make_file(dir.path(), "disk", 65536);
        let bdev = UringBdev::open(UringOptions {
            readonly: true,
            ..opts(&path)
        })
        .unwrap();
        let caps = bdev.info().caps;
        assert!(caps.read_only && !caps.discard && !caps.write_zeroes);
        let mut ch = bdev.open_channel(4).unwrap();
        let mut buf = AlignedBuf::new(4096);
        let iovs = [buf.iov(0, 4096)];
        // SAFETY: refused requests touch nothing.
        let r = unsafe { ch.submit(&io(IoOp::Write { fua: false }, 0, &iovs)) };
        assert_eq!(r, Err(SubmitError::Refused(IoError::Errno(libc::EROFS))));
        assert!(read_ok(ch.as_mut(), 0, 4096)
            .as_slice()
            .iter()
            .all(|&b| b == 0));
    }

    #[test]
    fn several_channels_share_one_bdev() {
        let dir = disk_dir();
        let bdev = Arc::new(open_file(dir.path(), 1 << 20));
        let threads: Vec<_> = (0..3u8)
            .map(|t| {
                let bdev = bdev.clone();
                std::thread::spawn(move || {
                    let mut ch = bdev.open_channel(4).unwrap();
                    let off = u64::from(t) * 65536;
                    let mut data = AlignedBuf::pattern(65536, t);
                    write_ok(ch.as_mut(), off, &mut data);
                    assert_eq!(read_ok(ch.as_mut(), off, 65536).as_slice(), data.as_slice());
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let mut ch = bdev.open_channel(4).unwrap();
        for t in 0..3u8 {
            let back = read_ok(ch.as_mut(), u64::from(t) * 65536, 65536);
            assert_eq!(back.as_slice(), AlignedBuf::pattern(65536, t).as_slice());
        }
    }

    #[test]
    fn dropping_a_channel_waits_for_requests_in_flight() {
        let dir = disk_dir();
        let bdev = open_file(dir.path(), 1 << 20);
        let mut ch = bdev.open_channel(4).unwrap();
        let mut buf = AlignedBuf::new(4 * 65536);
        let iovs: Vec<_> = (0..4).map(|i| [buf.iov(i * 65536, 65536)]).collect();
        for (i, v) in iovs.iter().enumerate() {
            // SAFETY: `buf` outlives the channel, whose drop waits for these.
            unsafe { ch.submit(&io(IoOp::Read, i as u64 * 65536, v)) }.unwrap();
        }
        ch.kick();
        drop(ch);
    }

    fn open_err(o: UringOptions) -> String {
        match UringBdev::open(o) {
            Ok(_) => panic!("open succeeded"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn missing_file_is_rejected() {
        let dir = disk_dir();
        let e = open_err(opts(&dir.path().join("nope")));
        assert!(e.contains("nope"), "{e}");
    }

    #[test]
    fn file_size_not_a_multiple_of_block_size_is_rejected() {
        let dir = disk_dir();
        let path = make_file(dir.path(), "odd", 4096 + 512);
        let e = open_err(UringOptions {
            block_size: Some(4096),
            ..opts(&path)
        });
        assert!(e.contains("not a multiple"), "{e}");
        let path = make_file(dir.path(), "tiny", 100);
        assert!(open_err(opts(&path)).contains("not a multiple"));
    }

    #[test]
    fn empty_file_is_rejected() {
        let dir = disk_dir();
        let path = make_file(dir.path(), "empty", 0);
        assert!(open_err(opts(&path)).contains("empty"));
    }

    #[test]
    fn bad_block_size_and_name_are_rejected() {
        let dir = disk_dir();
        let path = make_file(dir.path(), "disk", 65536);
        for bs in [1000, 256, 8192] {
            let e = open_err(UringOptions {
                block_size: Some(bs),
                ..opts(&path)
            });
            assert!(e.contains("block_size"), "{e}");
        }
        let e = open_err(UringOptions {
            name: String::new(),
            ..opts(&path)
        });
        assert!(e.contains("name"), "{e}");
    }

    #[test]
    fn directory_is_rejected() {
        let dir = disk_dir();
        // Opened for writing, the kernel refuses a directory itself (EISDIR).
        assert!(UringBdev::open(opts(dir.path())).is_err());
        let e = open_err(UringOptions {
            readonly: true,
            ..opts(dir.path())
        });
        assert!(e.contains("neither"), "{e}");
    }

    #[test]
    fn uring_and_aio_describe_themselves_like_spdk() {
        let dir = disk_dir();
        let path = make_file(dir.path(), "disk", 65536);
        let id = uuid::Uuid::new_v4();
        let fname = path.display().to_string();
        let u = UringBdev::open(UringOptions {
            uuid: Some(id),
            block_size: Some(4096),
            ..opts(&path)
        })
        .unwrap();
        assert_eq!((u.kind(), u.info().product_name), ("uring", "URING bdev"));
        assert_eq!(u.info().num_blocks, 16);
        assert_eq!(
            u.create_params(),
            json!({"name": "uring0", "filename": fname, "block_size": 4096, "uuid": id.to_string()})
        );
        assert_eq!(u.driver_specific(), json!({"uring": {"filename": fname}}));

        let a = UringBdev::open(UringOptions {
            uuid: Some(id),
            kind: UringKind::Aio,
            readonly: true,
            ..opts(&path)
        })
        .unwrap();
        assert_eq!((a.kind(), a.info().product_name), ("aio", "AIO disk"));
        assert_eq!(a.info().block_size, 512);
        assert_eq!(
            a.create_params(),
            json!({"name": "uring0", "filename": fname, "block_size": 512,
                   "readonly": true, "uuid": id.to_string()})
        );
        assert_eq!(
            a.driver_specific(),
            json!({"aio": {"filename": fname, "block_size_override": false, "readonly": true}})
        );
    }

    #[test]
    fn writes_through_the_file_are_visible_to_the_bdev() {
        let dir = disk_dir();
        let path = make_file(dir.path(), "disk", 65536);
        let data = AlignedBuf::pattern(4096, 8);
        {
            let mut f = OpenOptions::new().write(true).open(&path).unwrap();
            f.seek(SeekFrom::Start(12288)).unwrap();
            f.write_all(data.as_slice()).unwrap();
        }
        let bdev = UringBdev::open(opts(&path)).unwrap();
        let mut ch = bdev.open_channel(4).unwrap();
        assert_eq!(
            read_ok(ch.as_mut(), 12288, 4096).as_slice(),
            data.as_slice()
        );
    }

    /// Detaches the loop device when the test ends, pass or fail.
    struct LoopDevice(String);

    impl Drop for LoopDevice {
        fn drop(&mut self) {
            let _ = std::process::Command::new("losetup")
                .args(["-d", &self.0])
                .status();
        }
    }

    /// Needs root and loop devices: `cargo test -p vhost-target --lib
    /// block_device -- --ignored`.
    #[test]
    #[ignore = "needs root and a free loop device"]
    fn block_device_takes_its_geometry_from_the_kernel() {
        let dir = disk_dir();
        let img = make_file(dir.path(), "img", 8 << 20);
        let out = std::process::Command::new("losetup")
            .args(["-f", "--show", "-b", "4096"])
            .arg(&img)
            .output()
            .unwrap();
        assert!(out.status.success(), "losetup: {out:?}");
        let dev = LoopDevice(String::from_utf8(out.stdout).unwrap().trim().to_owned());
        let path = PathBuf::from(&dev.0);

        let e = open_err(UringOptions {
            block_size: Some(512),
            ..opts(&path)
        });
        assert!(e.contains("smaller than the logical block size"), "{e}");

        let bdev = UringBdev::open(opts(&path)).unwrap();
        let info = bdev.info();
        assert_eq!((info.block_size, info.num_blocks), (4096, 2048));
        assert!(!info.caps.discard && info.caps.write_zeroes);
        assert!(bdev.uses_direct_io());
        let mut ch = bdev.open_channel(4).unwrap();
        let mut data = AlignedBuf::pattern(3 * 4096, 9);
        write_ok(ch.as_mut(), 4096, &mut data);
        assert_eq!(
            read_ok(ch.as_mut(), 4096, 3 * 4096).as_slice(),
            data.as_slice()
        );
        // SAFETY: no iovecs.
        let r = unsafe {
            run(
                ch.as_mut(),
                &ranged(IoOp::WriteZeroes { unmap: true }, 8192, 4096),
            )
        };
        assert_eq!(r, Ok(Ok(())));
        let back = read_ok(ch.as_mut(), 4096, 3 * 4096);
        assert_eq!(&back.as_slice()[..4096], &data.as_slice()[..4096]);
        assert!(back.as_slice()[4096..8192].iter().all(|&b| b == 0));
        assert_eq!(&back.as_slice()[8192..], &data.as_slice()[8192..]);
        // SAFETY: no iovecs.
        let r = unsafe { run(ch.as_mut(), &ranged(IoOp::Flush, 0, 0)) };
        assert_eq!(r, Ok(Ok(())));
    }
}
