//! Stamped blocks for tests and operators: each block says which volume, which block and
//! which write wrote it, so a read-back check can tell a lost or misplaced write from a
//! current one.
//!
//! Layout: `b"TNDMSTMP"`, volume (32 bytes, NUL-padded), block u64, write id u64, CRC32C of
//! those 56 bytes (u32), then the first 60 bytes repeated to the block's end.

use crate::frame::VOLUME_NAME_MAX;

const MAGIC: &[u8; 8] = b"TNDMSTMP";
const HEAD: usize = 8 + VOLUME_NAME_MAX + 16;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stamp {
    pub volume: String,
    pub block: u64,
    pub write_id: u64,
}

/// A block of `block_size` bytes (at least 64) carrying `stamp`.
pub fn stamp_block(stamp: &Stamp, block_size: usize) -> Vec<u8> {
    assert!(block_size >= 64 && stamp.volume.len() <= VOLUME_NAME_MAX);
    let mut head = Vec::with_capacity(HEAD + 4);
    head.extend_from_slice(MAGIC);
    let mut name = [0u8; VOLUME_NAME_MAX];
    name[..stamp.volume.len()].copy_from_slice(stamp.volume.as_bytes());
    head.extend_from_slice(&name);
    head.extend_from_slice(&stamp.block.to_le_bytes());
    head.extend_from_slice(&stamp.write_id.to_le_bytes());
    let crc = crc32c::crc32c(&head);
    head.extend_from_slice(&crc.to_le_bytes());
    head.iter().copied().cycle().take(block_size).collect()
}

/// The stamp of a block, or `None` if it is not a whole, intact stamped block.
pub fn parse_stamp(block: &[u8]) -> Option<Stamp> {
    if block.len() < HEAD + 4 || &block[..8] != MAGIC {
        return None;
    }
    let crc = u32::from_le_bytes(block[HEAD..HEAD + 4].try_into().ok()?);
    if crc32c::crc32c(&block[..HEAD]) != crc {
        return None;
    }
    let period = HEAD + 4;
    if block
        .iter()
        .enumerate()
        .any(|(i, &b)| b != block[i % period])
    {
        return None;
    }
    let name = &block[8..8 + VOLUME_NAME_MAX];
    let end = name.iter().position(|&c| c == 0).unwrap_or(VOLUME_NAME_MAX);
    Some(Stamp {
        volume: String::from_utf8(name[..end].to_vec()).ok()?,
        block: u64::from_le_bytes(block[40..48].try_into().ok()?),
        write_id: u64::from_le_bytes(block[48..56].try_into().ok()?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_torn_block_detected() {
        let s = Stamp {
            volume: "vol-a".into(),
            block: 42,
            write_id: 7,
        };
        let mut b = stamp_block(&s, 4096);
        assert_eq!(parse_stamp(&b), Some(s));
        b[3000] ^= 1;
        assert_eq!(parse_stamp(&b), None);
        assert_eq!(parse_stamp(&[0u8; 4096]), None);
    }
}
