//! The virtio-blk device a controller presents: its feature bits and its
//! config space, both derived from the bdev underneath.

use virtio_bindings::bindings::virtio_blk::*;
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};

use crate::bdev::BdevInfo;

/// Sectors of virtio-blk are always 512 bytes, whatever the block size.
pub const SECTOR_SHIFT: u32 = 9;
pub const SECTOR_SIZE: u64 = 1 << SECTOR_SHIFT;

/// Most data segments in one request (virtio-blk `seg_max`). Sized so a
/// request slot's iovec array stays small and preallocated.
pub const SEG_MAX: u32 = 126;
/// Largest single segment (virtio-blk `size_max`).
pub const SIZE_MAX: u32 = 1 << 20;
/// Most sectors a DISCARD or WRITE_ZEROES segment may cover (1 GiB).
pub const MAX_DISCARD_SECTORS: u32 = 1 << 21;
/// DISCARD / WRITE_ZEROES segments per request. One keeps the request a
/// single bdev operation; Linux merges nothing across segments anyway.
pub const MAX_DISCARD_SEG: u32 = 1;

/// The `writeback` byte's offset in the config space (CONFIG_WCE).
pub const WCE_OFFSET: usize = std::mem::offset_of!(virtio_blk_config, wce);

/// What the parser needs to know of the device; copied into each worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceGeometry {
    pub capacity_bytes: u64,
    pub block_size: u32,
    pub read_only: bool,
    pub flush: bool,
    pub discard: bool,
    pub write_zeroes: bool,
}

impl DeviceGeometry {
    pub fn new(info: &BdevInfo, read_only: bool) -> Self {
        DeviceGeometry {
            capacity_bytes: info.size_bytes(),
            block_size: info.block_size,
            read_only: read_only || info.caps.read_only,
            flush: info.caps.flush,
            discard: info.caps.discard && !(read_only || info.caps.read_only),
            write_zeroes: info.caps.write_zeroes && !(read_only || info.caps.read_only),
        }
    }
}

/// The virtio feature bits a controller offers: only what its bdev supports.
pub fn device_features(info: &BdevInfo, read_only: bool) -> u64 {
    let g = DeviceGeometry::new(info, read_only);
    let mut f = (1u64 << VIRTIO_F_VERSION_1)
        | (1 << VIRTIO_RING_F_INDIRECT_DESC)
        | (1 << VIRTIO_RING_F_EVENT_IDX)
        | (1 << VIRTIO_BLK_F_SIZE_MAX)
        | (1 << VIRTIO_BLK_F_SEG_MAX)
        | (1 << VIRTIO_BLK_F_BLK_SIZE)
        | (1 << VIRTIO_BLK_F_TOPOLOGY)
        | (1 << VIRTIO_BLK_F_MQ);
    if g.flush {
        f |= 1 << VIRTIO_BLK_F_FLUSH;
    }
    // The guest may only switch the cache mode when there is a cache to switch.
    if g.flush && info.caps.volatile_cache {
        f |= 1 << VIRTIO_BLK_F_CONFIG_WCE;
    }
    if g.discard {
        f |= 1 << VIRTIO_BLK_F_DISCARD;
    }
    if g.write_zeroes {
        f |= 1 << VIRTIO_BLK_F_WRITE_ZEROES;
    }
    if g.read_only {
        f |= 1 << VIRTIO_BLK_F_RO;
    }
    f
}

/// Builds the config space. `writeback` is the current cache mode.
pub fn config_space(info: &BdevInfo, read_only: bool, num_queues: u16, writeback: bool) -> Vec<u8> {
    let g = DeviceGeometry::new(info, read_only);
    let phys = info.physical_block_size.max(info.block_size);
    let exp = (phys / info.block_size).trailing_zeros() as u8;
    let cfg = virtio_blk_config {
        capacity: g.capacity_bytes >> SECTOR_SHIFT,
        size_max: SIZE_MAX,
        seg_max: SEG_MAX,
        blk_size: info.block_size,
        physical_block_exp: exp,
        alignment_offset: 0,
        min_io_size: 1,
        opt_io_size: 0,
        wce: u8::from(writeback),
        num_queues,
        max_discard_sectors: if g.discard { MAX_DISCARD_SECTORS } else { 0 },
        max_discard_seg: if g.discard { MAX_DISCARD_SEG } else { 0 },
        discard_sector_alignment: info.block_size >> SECTOR_SHIFT,
        max_write_zeroes_sectors: if g.write_zeroes {
            MAX_DISCARD_SECTORS
        } else {
            0
        },
        max_write_zeroes_seg: if g.write_zeroes { MAX_DISCARD_SEG } else { 0 },
        write_zeroes_may_unmap: u8::from(g.write_zeroes && g.discard),
        ..Default::default()
    };
    let size = std::mem::size_of::<virtio_blk_config>();
    let mut out = vec![0u8; size];
    // SAFETY: virtio_blk_config is a repr(C) plain-data struct of `size`
    // bytes with no padding that could be uninitialised beyond what Default
    // zeroed; copying its bytes is the little-endian wire layout on x86-64
    // and aarch64 (the only targets we build for).
    unsafe {
        std::ptr::copy_nonoverlapping(
            (&cfg as *const virtio_blk_config).cast::<u8>(),
            out.as_mut_ptr(),
            size,
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bdev::{BdevCaps, BdevInfo};

    fn info(caps: BdevCaps) -> BdevInfo {
        BdevInfo {
            name: "t".into(),
            product_name: "test",
            block_size: 4096,
            num_blocks: 256,
            physical_block_size: 4096,
            uuid: uuid::Uuid::nil(),
            caps,
        }
    }

    #[test]
    fn features_follow_bdev_capabilities() {
        let none = device_features(&info(BdevCaps::default()), false);
        assert_eq!(none & (1 << VIRTIO_BLK_F_FLUSH), 0);
        assert_eq!(none & (1 << VIRTIO_BLK_F_DISCARD), 0);
        assert_eq!(none & (1 << VIRTIO_BLK_F_RO), 0);
        let all = BdevCaps {
            volatile_cache: true,
            flush: true,
            discard: true,
            write_zeroes: true,
            read_only: false,
        };
        let f = device_features(&info(all), false);
        for bit in [
            VIRTIO_BLK_F_FLUSH,
            VIRTIO_BLK_F_CONFIG_WCE,
            VIRTIO_BLK_F_DISCARD,
            VIRTIO_BLK_F_WRITE_ZEROES,
        ] {
            assert_ne!(f & (1 << bit), 0, "bit {bit}");
        }
        // A read-only controller offers RO and no way to modify the disk.
        let ro = device_features(&info(all), true);
        assert_ne!(ro & (1 << VIRTIO_BLK_F_RO), 0);
        assert_eq!(ro & (1 << VIRTIO_BLK_F_DISCARD), 0);
        assert_eq!(ro & (1 << VIRTIO_BLK_F_WRITE_ZEROES), 0);
    }

    #[test]
    fn config_space_reports_capacity_in_sectors_and_cache_mode() {
        let cfg = config_space(&info(BdevCaps::default()), false, 4, true);
        assert_eq!(u64::from_le_bytes(cfg[0..8].try_into().unwrap()), 256 * 8);
        assert_eq!(cfg[WCE_OFFSET], 1);
        let blk = std::mem::offset_of!(virtio_blk_config, blk_size);
        assert_eq!(
            u32::from_le_bytes(cfg[blk..blk + 4].try_into().unwrap()),
            4096
        );
        let nq = std::mem::offset_of!(virtio_blk_config, num_queues);
        assert_eq!(u16::from_le_bytes(cfg[nq..nq + 2].try_into().unwrap()), 4);
    }
}
