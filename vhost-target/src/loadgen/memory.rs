//! Guest memory of the load generator: one memfd, mapped once here, shared with the backend.
//!
//! The backend maps the same memfd through the vhost-user memory table. Guest physical
//! addresses start at [`GUEST_BASE`] (not 0) so a backend that confuses guest addresses
//! with offsets fails loudly. The memory can be described to the backend as several regions
//! that are contiguous in guest-physical space but mapped separately by the backend, so a
//! buffer placed across a boundary tests the backend's region-crossing path.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};

use super::LoadgenError;

/// First guest physical address of guest memory. Deliberately far from 0.
pub const GUEST_BASE: u64 = 0x1_0000_0000;

/// One region of the vhost-user memory table.
#[derive(Debug, Clone, Copy)]
pub struct Region {
    /// Guest physical address of the first byte.
    pub gpa: u64,
    /// Length in bytes.
    pub size: u64,
    /// Offset of the region in the memfd.
    pub fd_offset: u64,
}

/// Shared guest memory: a memfd mapped `MAP_SHARED` into this process.
///
/// All accesses go through raw pointers (never `&[u8]`), because the backend writes this
/// memory concurrently and Rust references must not alias memory that changes under them.
#[derive(Debug)]
pub struct GuestMemory {
    fd: OwnedFd,
    base: *mut u8,
    size: u64,
    regions: Vec<Region>,
    /// Bump allocator cursor, as an offset from the start of the mapping.
    next_free: AtomicU64,
}

// SAFETY: the mapping lives as long as `GuestMemory`; every access goes through raw-pointer
// copies or atomics with explicit bounds checks, so sharing the pointer between threads is
// no different from sharing the memory with the backend process, which we do anyway.
unsafe impl Send for GuestMemory {}
// SAFETY: see `Send`: no method hands out references into the mapping.
unsafe impl Sync for GuestMemory {}

impl GuestMemory {
    /// Creates `size` bytes (rounded up to 2 MiB) of guest memory, described as `regions`
    /// equal regions.
    pub fn new(size: u64, regions: usize) -> Result<Self, LoadgenError> {
        const ALIGN: u64 = 2 << 20;
        let regions = regions.max(1) as u64;
        let size = size.max(ALIGN).div_ceil(ALIGN * regions) * ALIGN * regions;
        // SAFETY: the name is a valid NUL-terminated string; flags are valid.
        let raw = unsafe { libc::memfd_create(c"tandem-loadgen".as_ptr(), libc::MFD_CLOEXEC) };
        if raw < 0 {
            return Err(LoadgenError::GuestMemory(std::io::Error::last_os_error()));
        }
        // SAFETY: `raw` is a freshly created fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: plain syscall on an fd we own.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), size as libc::off_t) } != 0 {
            return Err(LoadgenError::GuestMemory(std::io::Error::last_os_error()));
        }
        // SAFETY: mapping a new shared region of an fd we own; the kernel picks the address.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(LoadgenError::GuestMemory(std::io::Error::last_os_error()));
        }
        let per = size / regions;
        let regions = (0..regions)
            .map(|i| Region {
                gpa: GUEST_BASE + i * per,
                size: per,
                fd_offset: i * per,
            })
            .collect();
        Ok(Self {
            fd,
            base: base.cast(),
            size,
            regions,
            // Leave the first page unused: address GUEST_BASE stays a valid but unused address.
            next_free: AtomicU64::new(4096),
        })
    }

    /// The memfd the backend maps.
    pub fn fd(&self) -> &OwnedFd {
        &self.fd
    }

    /// The regions as they go into the memory table.
    pub fn regions(&self) -> &[Region] {
        &self.regions
    }

    /// Total size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Address of `gpa` in this process (what vhost-user calls the frontend's user address).
    pub fn host_addr(&self, gpa: u64) -> Result<*mut u8, LoadgenError> {
        self.check(gpa, 1)?;
        // SAFETY: `check` proved `gpa - GUEST_BASE` is within the mapping.
        Ok(unsafe { self.base.add((gpa - GUEST_BASE) as usize) })
    }

    /// User address of the mapping's first byte (for vhost-user's `userspace_addr`).
    pub fn user_addr_of_offset(&self, offset: u64) -> u64 {
        self.base as u64 + offset
    }

    /// A guest physical address that no region covers (just past the end of guest memory).
    pub fn gpa_outside(&self) -> u64 {
        GUEST_BASE + self.size
    }

    /// The guest physical address where region `i` starts (`i >= 1` is a region boundary).
    pub fn region_start(&self, i: usize) -> Option<u64> {
        self.regions.get(i).map(|r| r.gpa)
    }

    /// Allocates `len` bytes aligned to `align` (a power of two), zeroed at creation.
    /// Never freed: the load generator sizes its memory up front.
    pub fn alloc(&self, len: u64, align: u64) -> Result<u64, LoadgenError> {
        let align = align.max(1);
        debug_assert!(align.is_power_of_two());
        let mut cur = self.next_free.load(Ordering::Relaxed);
        loop {
            let start = cur.div_ceil(align) * align;
            let end = start
                .checked_add(len)
                .ok_or(LoadgenError::OutOfGuestMemory)?;
            if end > self.size {
                return Err(LoadgenError::OutOfGuestMemory);
            }
            match self.next_free.compare_exchange_weak(
                cur,
                end,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Ok(GUEST_BASE + start),
                Err(seen) => cur = seen,
            }
        }
    }

    /// Allocates `len` bytes that straddle the boundary between region `i - 1` and region
    /// `i`, `before` bytes of them in region `i - 1`. For backends' region-crossing paths.
    /// Bypasses the bump allocator: the caller owns those bytes only if nothing else was
    /// allocated there; use it on a fresh, small-footprint session.
    pub fn straddling(&self, i: usize, before: u64, len: u64) -> Result<u64, LoadgenError> {
        let b = self.region_start(i).ok_or(LoadgenError::OutOfGuestMemory)?;
        let gpa = b - before;
        self.check(gpa, len)?;
        Ok(gpa)
    }

    fn check(&self, gpa: u64, len: u64) -> Result<(), LoadgenError> {
        let off = gpa
            .checked_sub(GUEST_BASE)
            .ok_or(LoadgenError::BadGuestAddress(gpa))?;
        match off.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(LoadgenError::BadGuestAddress(gpa)),
        }
    }

    /// Copies `src` into guest memory at `gpa`.
    pub fn write(&self, gpa: u64, src: &[u8]) -> Result<(), LoadgenError> {
        self.check(gpa, src.len() as u64)?;
        // SAFETY: bounds checked above; `src` is a local buffer, which cannot overlap the
        // shared mapping unless the caller built a slice over it, which this API never does.
        unsafe {
            std::ptr::copy_nonoverlapping(
                src.as_ptr(),
                self.base.add((gpa - GUEST_BASE) as usize),
                src.len(),
            )
        };
        Ok(())
    }

    /// Copies guest memory at `gpa` into `dst`.
    pub fn read(&self, gpa: u64, dst: &mut [u8]) -> Result<(), LoadgenError> {
        self.check(gpa, dst.len() as u64)?;
        // SAFETY: as in `write`.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.base.add((gpa - GUEST_BASE) as usize),
                dst.as_mut_ptr(),
                dst.len(),
            )
        };
        Ok(())
    }

    /// Fills `len` bytes at `gpa` with `byte`.
    pub fn fill(&self, gpa: u64, byte: u8, len: u64) -> Result<(), LoadgenError> {
        self.check(gpa, len)?;
        // SAFETY: bounds checked above.
        unsafe {
            std::ptr::write_bytes(
                self.base.add((gpa - GUEST_BASE) as usize),
                byte,
                len as usize,
            )
        };
        Ok(())
    }

    /// Reads one byte (for status bytes written by the backend).
    pub fn read_u8(&self, gpa: u64) -> Result<u8, LoadgenError> {
        let p = self.host_addr(gpa)?;
        // SAFETY: `host_addr` checked the address; volatile because the backend writes it.
        Ok(unsafe { std::ptr::read_volatile(p) })
    }

    /// Writes one byte.
    pub fn write_u8(&self, gpa: u64, v: u8) -> Result<(), LoadgenError> {
        let p = self.host_addr(gpa)?;
        // SAFETY: `host_addr` checked the address.
        unsafe { std::ptr::write_volatile(p, v) };
        Ok(())
    }
}

impl Drop for GuestMemory {
    fn drop(&mut self) {
        // SAFETY: `base`/`size` are the mapping made in `new`; nothing refers to it any more
        // because every user holds an `Arc<GuestMemory>`.
        unsafe { libc::munmap(self.base.cast(), self.size as usize) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alloc_is_aligned_and_bounded() {
        let m = GuestMemory::new(4 << 20, 2).unwrap();
        assert_eq!(m.regions().len(), 2);
        assert_eq!(m.regions()[1].gpa, GUEST_BASE + m.size() / 2);
        let a = m.alloc(10, 4096).unwrap();
        assert_eq!(a % 4096, 0);
        let b = m.alloc(10, 16).unwrap();
        assert!(b >= a + 10);
        assert!(m.alloc(1 << 30, 1).is_err());
        m.write(b, b"hello").unwrap();
        let mut out = [0u8; 5];
        m.read(b, &mut out).unwrap();
        assert_eq!(&out, b"hello");
        assert!(m.read(m.gpa_outside(), &mut out).is_err());
        assert!(m.read(0, &mut out).is_err());
    }
}
