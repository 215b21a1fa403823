//! Parsing a virtio-blk request from a descriptor chain.
//!
//! Parsing is separate from execution and pure: it reads the guest's
//! descriptors and header, checks every address against guest memory, every
//! direction flag, length and range against the device, and produces either
//! an I/O for the bdev (with host iovecs written into the caller's
//! preallocated array) or the status the guest must get. Nothing the guest
//! controls can make it panic; the fuzz target `blk_request` drives it.

use virtio_bindings::bindings::virtio_blk::*;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{
    Address, ByteValued, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, Le32, Le64,
};

use super::config::{DeviceGeometry, MAX_DISCARD_SECTORS, SECTOR_SHIFT, SEG_MAX, SIZE_MAX};
use crate::bdev::IoOp;

/// Guest memory as the target maps it (no dirty-page bitmap: migration's
/// dirty logging is not offered).
pub type GuestMem = GuestMemoryMmap<()>;

/// Host iovecs one request may need: data segments, each possibly split where
/// it crosses from one guest memory region into the next.
pub const MAX_IOVS: usize = SEG_MAX as usize * 2;

/// Descriptors a chain may have: header, data segments, status.
const MAX_DESCS: usize = SEG_MAX as usize + 2;

/// Bytes of the request header (type, reserved, sector).
const HEADER_LEN: u32 = 16;

/// virtio-blk status byte values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Status {
    Ok = VIRTIO_BLK_S_OK as u8,
    IoErr = VIRTIO_BLK_S_IOERR as u8,
    Unsupp = VIRTIO_BLK_S_UNSUPP as u8,
}

/// Why a request was refused. Each maps to one virtio status through
/// [`RequestError::status`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("empty descriptor chain")]
    EmptyChain,
    #[error("descriptor chain is truncated or loops (last descriptor still has NEXT)")]
    TruncatedChain,
    #[error("status descriptor is missing, empty or not device-writable")]
    BadStatusDescriptor,
    #[error("status byte lies outside guest memory")]
    StatusOutsideMemory,
    #[error("request header is shorter than 16 bytes")]
    HeaderTooShort,
    #[error("request header is device-writable")]
    HeaderWritable,
    #[error("request header lies outside guest memory")]
    HeaderOutsideMemory,
    #[error("data buffer lies outside guest memory")]
    DataOutsideMemory,
    #[error("data buffer has the wrong direction for the request type")]
    WrongDirection,
    #[error("zero-length data segment")]
    ZeroLengthSegment,
    #[error("data segment larger than size_max")]
    SegmentTooLarge,
    #[error("more data segments than seg_max")]
    TooManySegments,
    #[error("length or offset not a multiple of the block size")]
    Misaligned,
    #[error("request reaches past the end of the disk")]
    OutOfRange,
    #[error("write to a read-only device")]
    ReadOnly,
    #[error("unknown request type {0}")]
    UnknownType(u32),
    #[error("request type not supported by this device")]
    Unsupported,
    #[error("DISCARD/WRITE_ZEROES payload is malformed")]
    BadDiscardSegment,
    #[error("DISCARD/WRITE_ZEROES flags not supported")]
    UnsupportedFlags,
}

impl RequestError {
    /// An address the request names is not in the memory table it was parsed
    /// against (which may be older than the request: see the queue worker).
    pub fn outside_memory(self) -> bool {
        matches!(
            self,
            RequestError::StatusOutsideMemory
                | RequestError::HeaderOutsideMemory
                | RequestError::DataOutsideMemory
        )
    }

    /// The status the guest gets, per the virtio spec: UNSUPP for request
    /// types and flags the device does not implement, IOERR for the rest.
    pub fn status(self) -> Status {
        match self {
            RequestError::UnknownType(_)
            | RequestError::Unsupported
            | RequestError::UnsupportedFlags => Status::Unsupp,
            _ => Status::IoErr,
        }
    }
}

/// What to do with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Hand to the bdev. `iovcnt` iovecs were written (0 for Flush,
    /// Discard and WriteZeroes).
    Io {
        op: IoOp,
        offset: u64,
        len: u64,
        iovcnt: u32,
    },
    /// Write the device serial into the `iovcnt` iovecs (at most `len` bytes).
    GetId { iovcnt: u32, len: u32 },
    /// Complete at once with this error.
    Fail(RequestError),
}

/// A parsed request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parsed {
    /// Where the status byte goes; `None` when the chain has no usable one
    /// (the request is then retired with a used length of 0).
    pub status: Option<GuestAddress>,
    pub action: Action,
}

impl Parsed {
    fn fail(status: Option<GuestAddress>, e: RequestError) -> Self {
        Parsed {
            status,
            action: Action::Fail(e),
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct RequestHeader {
    kind: Le32,
    _ioprio: Le32,
    sector: Le64,
}
// SAFETY: plain integers, no padding, any bit pattern is valid.
unsafe impl ByteValued for RequestHeader {}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct DiscardSegment {
    sector: Le64,
    num_sectors: Le32,
    flags: Le32,
}
// SAFETY: plain integers, no padding, any bit pattern is valid.
unsafe impl ByteValued for DiscardSegment {}

/// Parses one chain. `iovs` receives the data buffers of reads, writes and
/// GET_ID as host addresses inside `mem`; they stay valid as long as the
/// caller keeps this `mem` mapping alive.
pub fn parse_request(
    descs: impl Iterator<Item = Descriptor>,
    mem: &GuestMem,
    geo: &DeviceGeometry,
    iovs: &mut [libc::iovec; MAX_IOVS],
) -> Parsed {
    // Keep the descriptors on the stack: no allocation per request.
    let mut chain = [Descriptor::new(0, 0, 0, 0); MAX_DESCS];
    let mut n = 0usize;
    let mut overflow = false;
    let mut last = None;
    for d in descs {
        if n < MAX_DESCS {
            chain[n] = d;
            n += 1;
        } else {
            overflow = true;
        }
        last = Some(d);
    }
    let Some(last) = last else {
        return Parsed::fail(None, RequestError::EmptyChain);
    };
    // The chain iterator stops silently on a loop, a bad `next` or an
    // unreadable descriptor; the last descriptor then still says NEXT.
    if last.has_next() {
        return Parsed::fail(None, RequestError::TruncatedChain);
    }
    if !last.is_write_only() || last.len() == 0 {
        return Parsed::fail(None, RequestError::BadStatusDescriptor);
    }
    // The status is the last byte of the last descriptor.
    let Some(status) = last.addr().checked_add(u64::from(last.len()) - 1) else {
        return Parsed::fail(None, RequestError::StatusOutsideMemory);
    };
    if !mem.check_range(status, 1) {
        return Parsed::fail(None, RequestError::StatusOutsideMemory);
    }
    let status = Some(status);
    if overflow {
        return Parsed::fail(status, RequestError::TooManySegments);
    }
    if n < 2 {
        return Parsed::fail(status, RequestError::HeaderTooShort);
    }
    let head = chain[0];
    if head.is_write_only() {
        return Parsed::fail(status, RequestError::HeaderWritable);
    }
    if head.len() < HEADER_LEN {
        return Parsed::fail(status, RequestError::HeaderTooShort);
    }
    let Ok(hdr) = mem.read_obj::<RequestHeader>(head.addr()) else {
        return Parsed::fail(status, RequestError::HeaderOutsideMemory);
    };
    let data = &chain[1..n - 1];
    let action = match parse_body(hdr, data, mem, geo, iovs) {
        Ok(a) => a,
        Err(e) => Action::Fail(e),
    };
    Parsed { status, action }
}

fn parse_body(
    hdr: RequestHeader,
    data: &[Descriptor],
    mem: &GuestMem,
    geo: &DeviceGeometry,
    iovs: &mut [libc::iovec; MAX_IOVS],
) -> Result<Action, RequestError> {
    let kind = hdr.kind.to_native();
    let sector = hdr.sector.to_native();
    match kind {
        VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
            let is_read = kind == VIRTIO_BLK_T_IN;
            if !is_read && geo.read_only {
                return Err(RequestError::ReadOnly);
            }
            let (len, iovcnt) = map_data(data, is_read, mem, iovs)?;
            let offset = check_range(geo, sector, len)?;
            let op = if is_read {
                IoOp::Read
            } else {
                IoOp::Write { fua: false }
            };
            Ok(Action::Io {
                op,
                offset,
                len,
                iovcnt,
            })
        }
        VIRTIO_BLK_T_FLUSH => {
            if !geo.flush {
                return Err(RequestError::Unsupported);
            }
            Ok(Action::Io {
                op: IoOp::Flush,
                offset: 0,
                len: 0,
                iovcnt: 0,
            })
        }
        VIRTIO_BLK_T_GET_ID => {
            let (len, iovcnt) = map_data(data, true, mem, iovs)?;
            let len = len.min(u64::from(VIRTIO_BLK_ID_BYTES)) as u32;
            Ok(Action::GetId { iovcnt, len })
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            let discard = kind == VIRTIO_BLK_T_DISCARD;
            if (discard && !geo.discard) || (!discard && !geo.write_zeroes) {
                return Err(RequestError::Unsupported);
            }
            if geo.read_only {
                return Err(RequestError::ReadOnly);
            }
            let seg = read_discard_segment(data, mem)?;
            let flags = seg.flags.to_native();
            let unmap = flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
            // The unmap flag means something only for WRITE_ZEROES; any other bit is reserved.
            if flags & !VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0 || (discard && unmap) {
                return Err(RequestError::UnsupportedFlags);
            }
            let sectors = seg.num_sectors.to_native();
            if sectors == 0 || sectors > MAX_DISCARD_SECTORS {
                return Err(RequestError::BadDiscardSegment);
            }
            let len = u64::from(sectors) << SECTOR_SHIFT;
            let offset = check_range(geo, seg.sector.to_native(), len)?;
            let op = if discard {
                IoOp::Discard
            } else {
                IoOp::WriteZeroes { unmap }
            };
            Ok(Action::Io {
                op,
                offset,
                len,
                iovcnt: 0,
            })
        }
        other => Err(RequestError::UnknownType(other)),
    }
}

/// Checks that `len` bytes at `sector` fit the disk and its block size;
/// returns the byte offset.
fn check_range(geo: &DeviceGeometry, sector: u64, len: u64) -> Result<u64, RequestError> {
    let offset = sector
        .checked_mul(1 << SECTOR_SHIFT)
        .ok_or(RequestError::OutOfRange)?;
    let end = offset.checked_add(len).ok_or(RequestError::OutOfRange)?;
    if end > geo.capacity_bytes {
        return Err(RequestError::OutOfRange);
    }
    let bs = u64::from(geo.block_size);
    if offset % bs != 0 || len % bs != 0 {
        return Err(RequestError::Misaligned);
    }
    Ok(offset)
}

/// Maps the data descriptors into host iovecs; `device_writes`: the device
/// fills them (a read), else it reads them.
fn map_data(
    data: &[Descriptor],
    device_writes: bool,
    mem: &GuestMem,
    iovs: &mut [libc::iovec; MAX_IOVS],
) -> Result<(u64, u32), RequestError> {
    let mut total = 0u64;
    let mut cnt = 0usize;
    for d in data {
        if d.is_write_only() != device_writes {
            return Err(RequestError::WrongDirection);
        }
        let len = d.len();
        if len == 0 {
            return Err(RequestError::ZeroLengthSegment);
        }
        if len > SIZE_MAX {
            return Err(RequestError::SegmentTooLarge);
        }
        total += u64::from(len);
        for slice in mem.get_slices(d.addr(), len as usize) {
            let slice = slice.map_err(|_| RequestError::DataOutsideMemory)?;
            let iov = iovs.get_mut(cnt).ok_or(RequestError::TooManySegments)?;
            *iov = libc::iovec {
                iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                iov_len: slice.len(),
            };
            cnt += 1;
        }
    }
    Ok((total, cnt as u32))
}

fn read_discard_segment(
    data: &[Descriptor],
    mem: &GuestMem,
) -> Result<DiscardSegment, RequestError> {
    // One segment (max_discard_seg = 1) in one device-readable descriptor.
    let [d] = data else {
        return Err(if data.is_empty() {
            RequestError::BadDiscardSegment
        } else {
            RequestError::TooManySegments
        });
    };
    if d.is_write_only() {
        return Err(RequestError::WrongDirection);
    }
    if (d.len() as usize) != std::mem::size_of::<DiscardSegment>() {
        return Err(
            if d.len() as usize > std::mem::size_of::<DiscardSegment>() {
                RequestError::TooManySegments
            } else {
                RequestError::BadDiscardSegment
            },
        );
    }
    mem.read_obj::<DiscardSegment>(d.addr())
        .map_err(|_| RequestError::DataOutsideMemory)
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;

    const W: u16 = VRING_DESC_F_WRITE as u16;
    const N: u16 = virtio_bindings::bindings::virtio_ring::VRING_DESC_F_NEXT as u16;

    fn geo() -> DeviceGeometry {
        DeviceGeometry {
            capacity_bytes: 1 << 20,
            block_size: 512,
            read_only: false,
            flush: true,
            discard: true,
            write_zeroes: true,
        }
    }

    fn mem() -> GuestMem {
        GuestMem::from_ranges(&[(GuestAddress(0x10000), 0x10000)]).unwrap()
    }

    fn header(mem: &GuestMem, at: u64, kind: u32, sector: u64) -> Descriptor {
        let h = RequestHeader {
            kind: kind.into(),
            _ioprio: 0.into(),
            sector: sector.into(),
        };
        mem.write_obj(h, GuestAddress(at)).unwrap();
        Descriptor::new(at, 16, N, 0)
    }

    fn run(descs: &[Descriptor], mem: &GuestMem, geo: &DeviceGeometry) -> Parsed {
        let mut iovs = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; MAX_IOVS];
        parse_request(descs.iter().copied(), mem, geo, &mut iovs)
    }

    fn fails_with(p: Parsed) -> RequestError {
        match p.action {
            Action::Fail(e) => e,
            other => panic!("expected a failure, got {other:?}"),
        }
    }

    #[test]
    fn well_formed_read_maps_buffers() {
        let m = mem();
        let h = header(&m, 0x10000, VIRTIO_BLK_T_IN, 8);
        let d = [
            h,
            Descriptor::new(0x11000, 4096, W | N, 0),
            Descriptor::new(0x12000, 1, W, 0),
        ];
        let p = run(&d, &m, &geo());
        assert_eq!(p.status, Some(GuestAddress(0x12000)));
        assert_eq!(
            p.action,
            Action::Io {
                op: IoOp::Read,
                offset: 4096,
                len: 4096,
                iovcnt: 1
            }
        );
    }

    #[test]
    fn data_outside_guest_memory_is_ioerr() {
        let m = mem();
        let h = header(&m, 0x10000, VIRTIO_BLK_T_OUT, 0);
        let d = [
            h,
            Descriptor::new(0x1f_0000, 512, N, 0),
            Descriptor::new(0x12000, 1, W, 0),
        ];
        let e = fails_with(run(&d, &m, &geo()));
        assert_eq!(e, RequestError::DataOutsideMemory);
        assert_eq!(e.status(), Status::IoErr);
    }

    #[test]
    fn device_write_into_readable_buffer_is_refused() {
        let m = mem();
        let h = header(&m, 0x10000, VIRTIO_BLK_T_IN, 0);
        let d = [
            h,
            Descriptor::new(0x11000, 512, N, 0),
            Descriptor::new(0x12000, 1, W, 0),
        ];
        assert_eq!(
            fails_with(run(&d, &m, &geo())),
            RequestError::WrongDirection
        );
    }

    #[test]
    fn short_header_and_bad_status_are_caught() {
        let m = mem();
        let full = header(&m, 0x10000, VIRTIO_BLK_T_IN, 0);
        let h = Descriptor::new(full.addr().0, 8, N, 0);
        let d = [h, Descriptor::new(0x12000, 1, W, 0)];
        assert_eq!(
            fails_with(run(&d, &m, &geo())),
            RequestError::HeaderTooShort
        );
        // Status not writable: nothing can be reported, no status address.
        let h = header(&m, 0x10000, VIRTIO_BLK_T_IN, 0);
        let p = run(&[h, Descriptor::new(0x12000, 1, 0, 0)], &m, &geo());
        assert_eq!(p.status, None);
        assert_eq!(fails_with(p), RequestError::BadStatusDescriptor);
        // A zero-length status descriptor.
        let p = run(&[h, Descriptor::new(0x12000, 0, W, 0)], &m, &geo());
        assert_eq!(fails_with(p), RequestError::BadStatusDescriptor);
        // Status outside memory.
        let p = run(&[h, Descriptor::new(0x900000, 1, W, 0)], &m, &geo());
        assert_eq!(fails_with(p), RequestError::StatusOutsideMemory);
    }

    #[test]
    fn past_end_of_disk_and_misaligned_requests_are_ioerr() {
        let m = mem();
        let h = header(&m, 0x10000, VIRTIO_BLK_T_IN, (1 << 20) / 512);
        let d = [
            h,
            Descriptor::new(0x11000, 512, W | N, 0),
            Descriptor::new(0x12000, 1, W, 0),
        ];
        assert_eq!(fails_with(run(&d, &m, &geo())), RequestError::OutOfRange);
        let h = header(&m, 0x10000, VIRTIO_BLK_T_IN, u64::MAX / 256);
        let d = [h, d[1], d[2]];
        assert_eq!(fails_with(run(&d, &m, &geo())), RequestError::OutOfRange);
        let mut g = geo();
        g.block_size = 4096;
        let h = header(&m, 0x10000, VIRTIO_BLK_T_IN, 1);
        let d = [
            h,
            Descriptor::new(0x11000, 4096, W | N, 0),
            Descriptor::new(0x12000, 1, W, 0),
        ];
        assert_eq!(fails_with(run(&d, &m, &g)), RequestError::Misaligned);
    }

    #[test]
    fn zero_length_and_huge_segments_are_ioerr() {
        let m = mem();
        let h = header(&m, 0x10000, VIRTIO_BLK_T_OUT, 0);
        let d = [
            h,
            Descriptor::new(0x11000, 0, N, 0),
            Descriptor::new(0x12000, 1, W, 0),
        ];
        assert_eq!(
            fails_with(run(&d, &m, &geo())),
            RequestError::ZeroLengthSegment
        );
        let d = [
            h,
            Descriptor::new(0x11000, SIZE_MAX + 512, N, 0),
            Descriptor::new(0x12000, 1, W, 0),
        ];
        assert_eq!(
            fails_with(run(&d, &m, &geo())),
            RequestError::SegmentTooLarge
        );
    }

    #[test]
    fn unknown_type_is_unsupp_and_readonly_write_is_ioerr() {
        let m = mem();
        let h = header(&m, 0x10000, 0x7777, 0);
        let e = fails_with(run(&[h, Descriptor::new(0x12000, 1, W, 0)], &m, &geo()));
        assert_eq!(e, RequestError::UnknownType(0x7777));
        assert_eq!(e.status(), Status::Unsupp);
        let mut g = geo();
        g.read_only = true;
        let h = header(&m, 0x10000, VIRTIO_BLK_T_OUT, 0);
        let d = [
            h,
            Descriptor::new(0x11000, 512, N, 0),
            Descriptor::new(0x12000, 1, W, 0),
        ];
        let e = fails_with(run(&d, &m, &g));
        assert_eq!((e, e.status()), (RequestError::ReadOnly, Status::IoErr));
    }

    #[test]
    fn truncated_or_looping_chain_gets_no_status() {
        let m = mem();
        let h = header(&m, 0x10000, VIRTIO_BLK_T_IN, 0);
        let p = run(&[h, Descriptor::new(0x12000, 1, W | N, 3)], &m, &geo());
        assert_eq!(
            (p.status, fails_with(p)),
            (None, RequestError::TruncatedChain)
        );
    }

    #[test]
    fn discard_and_write_zeroes_parse_their_segment() {
        let m = mem();
        let seg = DiscardSegment {
            sector: 8.into(),
            num_sectors: 16.into(),
            flags: VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP.into(),
        };
        m.write_obj(seg, GuestAddress(0x11000)).unwrap();
        let h = header(&m, 0x10000, VIRTIO_BLK_T_WRITE_ZEROES, 0);
        let d = [
            h,
            Descriptor::new(0x11000, 16, N, 0),
            Descriptor::new(0x12000, 1, W, 0),
        ];
        assert_eq!(
            run(&d, &m, &geo()).action,
            Action::Io {
                op: IoOp::WriteZeroes { unmap: true },
                offset: 4096,
                len: 8192,
                iovcnt: 0
            }
        );
        // The unmap flag is meaningless for DISCARD.
        let h = header(&m, 0x10000, VIRTIO_BLK_T_DISCARD, 0);
        let e = fails_with(run(&[h, d[1], d[2]], &m, &geo()));
        assert_eq!(
            (e, e.status()),
            (RequestError::UnsupportedFlags, Status::Unsupp)
        );
        // A device without discard says UNSUPP.
        let mut g = geo();
        g.discard = false;
        assert_eq!(
            fails_with(run(&[h, d[1], d[2]], &m, &g)),
            RequestError::Unsupported
        );
    }

    #[test]
    fn get_id_caps_length_at_20_bytes() {
        let m = mem();
        let h = header(&m, 0x10000, VIRTIO_BLK_T_GET_ID, 0);
        let d = [
            h,
            Descriptor::new(0x11000, 512, W | N, 0),
            Descriptor::new(0x12000, 1, W, 0),
        ];
        assert_eq!(
            run(&d, &m, &geo()).action,
            Action::GetId { iovcnt: 1, len: 20 }
        );
    }

    #[test]
    fn too_many_segments_is_ioerr() {
        let m = mem();
        let h = header(&m, 0x10000, VIRTIO_BLK_T_IN, 0);
        let mut d = vec![h];
        for _ in 0..(SEG_MAX + 1) {
            d.push(Descriptor::new(0x11000, 512, W | N, 0));
        }
        d.push(Descriptor::new(0x12000, 1, W, 0));
        assert_eq!(
            fails_with(run(&d, &m, &geo())),
            RequestError::TooManySegments
        );
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_chains_never_escape_guest_memory(
            raw in proptest::collection::vec((0u64..0x30000, 0u32..0x3000, 0u16..4), 0..8),
            kind in 0u32..16, sector in proptest::prelude::any::<u64>()
        ) {
            let m = mem();
            let _ = header(&m, 0x10000, kind, sector);
            let descs: Vec<Descriptor> = raw.iter().enumerate().map(|(i, &(a, l, f))| {
                let last = i + 1 == raw.len();
                let flags = (f & W) | if last { 0 } else { N };
                Descriptor::new(a, l, flags, 0)
            }).collect();
            let mut iovs = [libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; MAX_IOVS];
            let p = parse_request(descs.iter().copied(), &m, &geo(), &mut iovs);
            if let Action::Io { iovcnt, .. } | Action::GetId { iovcnt, .. } = p.action {
                let base = m.get_host_address(GuestAddress(0x10000)).unwrap() as usize;
                for iov in &iovs[..iovcnt as usize] {
                    let start = iov.iov_base as usize;
                    proptest::prop_assert!(start >= base && start + iov.iov_len <= base + 0x10000);
                }
            }
            if let Some(s) = p.status {
                proptest::prop_assert!(m.check_range(s, 1));
            }
        }
    }
}
