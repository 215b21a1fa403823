//! The volume label: the first 4 KiB of a replicated volume, written by the first target that
//! attaches it, so that every later attach can tell whether it holds the volume's key.
//!
//! The label is plaintext and holds no secret: the key's name (for the error message) and its
//! check value (the encryption of a sector no disk has, see `VolumeKey::check`). Guest data
//! starts after it; the guest's sector numbers, not the volume's, are the XTS tweaks, so the
//! layout could move without re-encrypting.

use replicator::volume_key::KeyCheck;

/// Bytes the label takes at the start of the volume (one 4 KiB block, so both 512- and
/// 4096-byte volumes stay aligned).
pub const LABEL_BYTES: u64 = 4096;

const MAGIC: &[u8; 8] = b"TANDEMV1";
const VERSION: u32 = 1;
const MAX_NAME: usize = 255;
/// magic 8 | version 4 | data offset 4 | key check 16 | name length 2 | name ...
const NAME_AT: usize = 34;
const CRC_AT: usize = LABEL_BYTES as usize - 4;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Label {
    pub key_name: String,
    pub check: KeyCheck,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    /// All zeroes: a volume no target has attached yet.
    Blank,
    Label(Label),
    /// Something else is written there: not a Tandem volume, or a damaged label.
    Foreign(String),
}

impl Label {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; LABEL_BYTES as usize];
        b[..8].copy_from_slice(MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&(LABEL_BYTES as u32).to_le_bytes());
        b[16..32].copy_from_slice(&self.check.0);
        let name = &self.key_name.as_bytes()[..self.key_name.len().min(MAX_NAME)];
        b[32..34].copy_from_slice(&(name.len() as u16).to_le_bytes());
        b[NAME_AT..NAME_AT + name.len()].copy_from_slice(name);
        let crc = crc32c::crc32c(&b[..CRC_AT]);
        b[CRC_AT..].copy_from_slice(&crc.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Decoded {
        if b.len() != LABEL_BYTES as usize {
            return Decoded::Foreign(format!("label read returned {} bytes", b.len()));
        }
        if b.iter().all(|&x| x == 0) {
            return Decoded::Blank;
        }
        if &b[..8] != MAGIC {
            return Decoded::Foreign(
                "the first 4 KiB hold no Tandem volume label (data written by something else?)"
                    .into(),
            );
        }
        let crc = u32::from_le_bytes(b[CRC_AT..].try_into().expect("4 bytes"));
        if crc != crc32c::crc32c(&b[..CRC_AT]) {
            return Decoded::Foreign("the volume label fails its checksum".into());
        }
        let version = u32::from_le_bytes(b[8..12].try_into().expect("4 bytes"));
        let data_at = u32::from_le_bytes(b[12..16].try_into().expect("4 bytes"));
        if version != VERSION || u64::from(data_at) != LABEL_BYTES {
            return Decoded::Foreign(format!(
                "volume label version {version} (data at {data_at}) is not one this target reads"
            ));
        }
        let mut check = [0u8; 16];
        check.copy_from_slice(&b[16..32]);
        let n = usize::from(u16::from_le_bytes([b[32], b[33]])).min(MAX_NAME);
        Decoded::Label(Label {
            key_name: String::from_utf8_lossy(&b[NAME_AT..NAME_AT + n]).into_owned(),
            check: KeyCheck(check),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_label_round_trips_and_damage_is_named() {
        let l = Label {
            key_name: "vol-key".into(),
            check: KeyCheck([7; 16]),
        };
        let mut b = l.encode();
        assert_eq!(Label::decode(&b), Decoded::Label(l));
        b[40] ^= 1;
        assert!(matches!(Label::decode(&b), Decoded::Foreign(m) if m.contains("checksum")));
        assert_eq!(Label::decode(&[0; 4096]), Decoded::Blank);
        let mut other = vec![0u8; 4096];
        other[0] = 0xeb; // a FAT boot sector, say
        assert!(matches!(Label::decode(&other), Decoded::Foreign(m) if m.contains("no Tandem")));
        assert!(matches!(Label::decode(&[0; 512]), Decoded::Foreign(_)));
    }
}
