//! Block devices ("bdevs"): the layer under a vhost controller.
//!
//! A [`Bdev`] is shared (`Arc<dyn Bdev>`) between the control plane and every
//! queue worker that serves it. The hot path never touches the `Bdev` itself:
//! each queue worker opens its own [`IoChannel`] (SPDK's `io_channel`), which
//! it owns exclusively, so submission and completion take no lock.
//!
//! Completion is asynchronous by contract: `submit` only queues, and results
//! come back through `poll`. Synchronous bdevs (null, malloc) finish in
//! `submit` and report in the next `poll`; io_uring and the replicated bdev
//! complete whenever the kernel or the network says so.

pub mod iostat;
pub mod malloc;
pub mod null;
pub mod params;
pub mod replicated;
pub mod sync_channel;
#[cfg(test)]
mod test_util;
pub mod uring;

use std::os::fd::RawFd;

pub use iostat::{IoCounters, IoStats};

/// What a bdev can do. A controller offers the guest only the virtio-blk
/// features that its bdev supports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BdevCaps {
    /// Writes may sit in a volatile cache until FLUSH.
    pub volatile_cache: bool,
    /// FLUSH is meaningful and supported.
    pub flush: bool,
    /// DISCARD (SPDK: unmap) is supported.
    pub discard: bool,
    /// WRITE_ZEROES is supported.
    pub write_zeroes: bool,
    /// The bdev itself refuses writes.
    pub read_only: bool,
}

/// Static description of a bdev, fixed at creation.
#[derive(Debug, Clone)]
pub struct BdevInfo {
    pub name: String,
    /// SPDK's `product_name`, e.g. "Malloc disk", "Null disk", "URING bdev".
    pub product_name: &'static str,
    /// Logical block size in bytes (512 or 4096).
    pub block_size: u32,
    /// Size in logical blocks.
    pub num_blocks: u64,
    /// Physical block size in bytes (>= block_size); reported in virtio TOPOLOGY.
    pub physical_block_size: u32,
    pub uuid: uuid::Uuid,
    pub caps: BdevCaps,
}

impl BdevInfo {
    /// Size in bytes.
    pub fn size_bytes(&self) -> u64 {
        self.num_blocks * u64::from(self.block_size)
    }
}

/// Errors on the control path (creating bdevs, opening channels).
#[derive(Debug, thiserror::Error)]
pub enum BdevError {
    #[error("invalid bdev parameter: {0}")]
    InvalidParam(String),
    #[error("I/O error on {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open an I/O channel: {0}")]
    Channel(String),
}

/// The operation of one request, in bytes relative to the start of the bdev.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoOp {
    Read,
    /// `fua`: durable when completed (the guest turned the write cache off).
    Write {
        fua: bool,
    },
    Flush,
    Discard,
    /// `unmap`: the bdev may deallocate the range instead of writing zeroes.
    WriteZeroes {
        unmap: bool,
    },
}

/// One request handed to an [`IoChannel`].
///
/// The buffers are raw pointers into guest memory (or a load generator's
/// buffers): the submitter guarantees they stay mapped and untouched until the
/// completion carrying `tag` has been delivered. That contract is why
/// [`IoChannel::submit`] is `unsafe`.
#[derive(Debug, Clone, Copy)]
pub struct BdevIo {
    /// Opaque to the bdev; returned in the completion.
    pub tag: u32,
    pub op: IoOp,
    /// Byte offset; a multiple of the block size (the caller checks range and alignment).
    pub offset: u64,
    /// Byte length; a multiple of the block size. For Read/Write it must equal
    /// the sum of the iovec lengths (bdevs refuse anything else). Zero for Flush.
    pub len: u64,
    pub iovs: *const libc::iovec,
    pub iovcnt: u32,
}

/// Why a request failed. Mapped by the virtio layer to VIRTIO_BLK_S_IOERR
/// (or UNSUPP for `Unsupported`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoError {
    /// The device returned this errno.
    Errno(i32),
    /// The operation is not supported by this bdev.
    Unsupported,
    /// Offset/length outside the bdev or misaligned (the caller should have caught it).
    OutOfRange,
}

#[derive(Debug, Clone, Copy)]
pub struct Completion {
    pub tag: u32,
    pub result: Result<(), IoError>,
}

/// Why `submit` refused a request; the request was not started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    /// The channel already has `queue_depth` requests in flight; retry after a poll.
    #[error("channel is full")]
    Busy,
    #[error("request refused: {0:?}")]
    Refused(IoError),
}

/// A per-queue handle to a bdev, owned by exactly one thread.
pub trait IoChannel: Send {
    /// How many requests may be in flight at once.
    fn queue_depth(&self) -> u32;

    /// Starts one request. It may complete at any later `poll`.
    ///
    /// # Safety
    /// `io.iovs` points to `io.iovcnt` iovecs, and they and the memory they
    /// describe stay valid, and are not otherwise accessed (for reads), until
    /// `poll` has delivered the completion for `io.tag`.
    unsafe fn submit(&mut self, io: &BdevIo) -> Result<(), SubmitError>;

    /// Pushes queued submissions to the device (one syscall per batch where the
    /// device has a doorbell). Called once per worker loop iteration.
    fn kick(&mut self) {}

    /// Delivers finished requests to `done`; returns how many.
    fn poll(&mut self, done: &mut dyn FnMut(Completion)) -> usize;

    /// An eventfd that becomes readable when completions are waiting, so an
    /// idle worker can sleep on it. The caller's protocol: `poll`; if nothing
    /// came, wait for the fd; on wake read (reset) the eventfd, then `poll`.
    /// A completion that lands between `poll` and the wait leaves the fd
    /// readable, so none is slept through. `None`: completions only ever appear
    /// as a result of `submit`/`poll` on this thread (null, malloc).
    fn completion_fd(&self) -> Option<RawFd> {
        None
    }

    /// Requests submitted and not yet delivered by `poll`.
    fn in_flight(&self) -> u32;
}

/// A block device.
pub trait Bdev: Send + Sync + 'static {
    fn info(&self) -> &BdevInfo;

    /// Opens a channel for one queue worker. `queue_depth` is the most
    /// requests that worker will have in flight on it.
    fn open_channel(&self, queue_depth: u32) -> Result<Box<dyn IoChannel>, BdevError>;

    /// I/O statistics, fed by the queue workers through per-channel counters.
    fn iostat(&self) -> &IoStats;

    /// SPDK's `driver_specific` object in `bdev_get_bdevs`.
    fn driver_specific(&self) -> serde_json::Value {
        serde_json::Value::Object(Default::default())
    }

    /// The bdev type used by `save_config`: "malloc", "null", "uring", "aio".
    fn kind(&self) -> &'static str;

    /// The `params` of the creating RPC, so `save_config` can replay it.
    fn create_params(&self) -> serde_json::Value;

    /// For control-path methods that only one kind of bdev has.
    fn as_any(&self) -> &dyn std::any::Any;
}
