//! A volume's data key: AES-256-XTS with the sector number as the tweak.
//!
//! The data of a replicated device is encrypted on the host that serves the guest, before it
//! leaves for a replicator, and decrypted only there; replicators store ciphertext. XTS is the
//! disk-encryption mode (IEEE 1619): length-preserving, so a 4 KiB write stays 4 KiB on every
//! replica, and tweaked per sector, so equal plaintext in two sectors gives unequal ciphertext.
//!
//! Key material lives in the AES key schedules only; `aes` is built with `zeroize`, so the
//! schedules are wiped when a `VolumeKey` drops, and the bytes read from a key file are wiped as
//! soon as the schedules exist. `Debug` prints the key's name and check value, never the key.

use std::fmt;
use std::path::Path;

use aes::cipher::generic_array::GenericArray;
use aes::cipher::{BlockDecrypt, BlockEncrypt, KeyInit};
use aes::{Aes256, Block};

/// XTS works on 512-byte sectors here: the tweak is the 512-byte LBA that virtio-blk names,
/// whatever the device's logical block size, so a request's offset alone fixes its tweaks.
pub const SECTOR_SIZE: usize = 512;

/// AES-256-XTS takes two 256-bit keys.
pub const KEY_LEN: usize = 64;

/// The sector whose encryption is the key check value. Data sectors are `u64`; the tweak is
/// `u128`, so this one can never collide with a sector of a disk.
const CHECK_SECTOR: u128 = u128::MAX;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("key {name}: expected {KEY_LEN} bytes ({} hex digits), got {got} bytes", KEY_LEN * 2)]
    BadLength { name: String, got: usize },
    #[error("key {name}: the two XTS halves are equal (IEEE 1619 requires distinct keys)")]
    EqualHalves { name: String },
    #[error("key {name}: {source}")]
    File {
        name: String,
        source: crate::secret_file::SecretFileError,
    },
    #[error("buffer of {len} bytes is not a whole number of {SECTOR_SIZE}-byte sectors")]
    Unaligned { len: usize },
}

/// The first 16 bytes of the check sector's ciphertext: equal for equal keys, and what a volume
/// records so that attaching it with the wrong key fails at once instead of returning garbage.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyCheck(pub [u8; 16]);

impl fmt::Debug for KeyCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in &self.0[..8] {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// AES blocks in one sector.
const BLOCKS: usize = SECTOR_SIZE / 16;

/// XTS over `aes` itself, a sector at a time: the 32 blocks of a sector go through the
/// cipher in one `encrypt_blocks` call, which AES-NI pipelines eight blocks deep. `xts-mode`
/// (kept as the reference the tests compare against) calls the cipher one block at a time,
/// which measured about 250 MB/s per core here: too slow for the data path.
pub struct VolumeKey {
    name: String,
    /// Encrypts the data (the first half of the key).
    data: Aes256,
    /// Encrypts the sector number into the first tweak (the second half).
    tweak: Aes256,
    check: KeyCheck,
}

/// The tweak of the next block: multiplication by x in GF(2^128), little-endian as IEEE 1619.
#[inline]
fn next_tweak(t: u128) -> u128 {
    (t << 1) ^ ((t >> 127) * 0x87)
}

impl VolumeKey {
    /// `key` is the 64-byte XTS key (first half: data key, second half: tweak key).
    pub fn from_bytes(name: &str, key: &[u8]) -> Result<Self, KeyError> {
        if key.len() != KEY_LEN {
            return Err(KeyError::BadLength {
                name: name.to_owned(),
                got: key.len(),
            });
        }
        let (k1, k2) = key.split_at(KEY_LEN / 2);
        if k1 == k2 {
            return Err(KeyError::EqualHalves {
                name: name.to_owned(),
            });
        }
        let mut key = Self {
            name: name.to_owned(),
            data: Aes256::new(GenericArray::from_slice(k1)),
            tweak: Aes256::new(GenericArray::from_slice(k2)),
            check: KeyCheck([0; 16]),
        };
        let mut probe = [0u8; SECTOR_SIZE];
        key.sector(&mut probe, CHECK_SECTOR, true);
        key.check.0.copy_from_slice(&probe[..16]);
        Ok(key)
    }

    /// Reads a key file holding the key as hex (whitespace ignored), as SPDK's file keyring
    /// does: the file must not be readable by group or others.
    pub fn from_key_file(name: &str, path: &Path) -> Result<Self, KeyError> {
        let bytes = crate::secret_file::read_hex(path).map_err(|source| KeyError::File {
            name: name.to_owned(),
            source,
        })?;
        Self::from_bytes(name, &bytes)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn check(&self) -> KeyCheck {
        self.check
    }

    /// Encrypts `buf` in place; `buf` starts at 512-byte sector `first_sector`.
    pub fn encrypt(&self, buf: &mut [u8], first_sector: u64) -> Result<(), KeyError> {
        check_aligned(buf)?;
        for (i, s) in buf.chunks_exact_mut(SECTOR_SIZE).enumerate() {
            self.sector(s, u128::from(first_sector) + i as u128, true);
        }
        Ok(())
    }

    /// Decrypts `buf` in place; `buf` starts at 512-byte sector `first_sector`.
    pub fn decrypt(&self, buf: &mut [u8], first_sector: u64) -> Result<(), KeyError> {
        check_aligned(buf)?;
        for (i, s) in buf.chunks_exact_mut(SECTOR_SIZE).enumerate() {
            self.sector(s, u128::from(first_sector) + i as u128, false);
        }
        Ok(())
    }

    /// XTS of one sector (whole blocks only, so no ciphertext stealing).
    fn sector(&self, sector: &mut [u8], number: u128, encrypt: bool) {
        debug_assert_eq!(sector.len(), SECTOR_SIZE);
        let mut t = Block::from(number.to_le_bytes());
        self.tweak.encrypt_block(&mut t);
        let mut t = u128::from_le_bytes(t.into());
        let mut tweaks = [0u128; BLOCKS];
        let mut blocks = [Block::default(); BLOCKS];
        for ((tw, b), src) in tweaks
            .iter_mut()
            .zip(blocks.iter_mut())
            .zip(sector.chunks_exact(16))
        {
            *tw = t;
            let x = u128::from_le_bytes(src.try_into().expect("16 bytes")) ^ t;
            *b = Block::from(x.to_le_bytes());
            t = next_tweak(t);
        }
        if encrypt {
            self.data.encrypt_blocks(&mut blocks);
        } else {
            self.data.decrypt_blocks(&mut blocks);
        }
        for ((tw, b), dst) in tweaks
            .iter()
            .zip(blocks.iter())
            .zip(sector.chunks_exact_mut(16))
        {
            let x = u128::from_le_bytes((*b).into()) ^ tw;
            dst.copy_from_slice(&x.to_le_bytes());
        }
    }
}

fn check_aligned(buf: &[u8]) -> Result<(), KeyError> {
    if buf.len() % SECTOR_SIZE != 0 {
        return Err(KeyError::Unaligned { len: buf.len() });
    }
    Ok(())
}

impl fmt::Debug for VolumeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VolumeKey")
            .field("name", &self.name)
            .field("check", &self.check)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret_file::SecretFileError;
    use proptest::prelude::*;
    use std::fs;
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;

    fn key_bytes(seed: u8) -> Vec<u8> {
        (0..KEY_LEN as u8)
            .map(|i| i.wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    #[test]
    fn matches_ieee_1619_vector_10() {
        // IEEE P1619/D16 Annex B, vector 10 (XTS-AES-256, data unit 0xff, 512 bytes): the
        // first 16 bytes of the ciphertext. Keys are the digits of e and pi.
        let k1 = hex::decode("2718281828459045235360287471352662497757247093699959574966967627")
            .unwrap();
        let k2 = hex::decode("3141592653589793238462643383279502884197169399375105820974944592")
            .unwrap();
        let key = VolumeKey::from_bytes("v10", &[k1, k2].concat()).unwrap();
        let mut buf: Vec<u8> = (0..512u32).map(|i| i as u8).collect();
        key.encrypt(&mut buf, 0xff).unwrap();
        assert_eq!(hex::encode(&buf[..16]), "1c3b3a102f770386e4836c99e370cf9b");
        key.decrypt(&mut buf, 0xff).unwrap();
        assert!(buf.iter().enumerate().all(|(i, &b)| b == i as u8));
    }

    proptest! {
        /// The batched XTS here equals the `xts-mode` crate's, sector by sector.
        #[test]
        fn matches_the_xts_mode_crate(seed in any::<u8>(), first in any::<u64>(),
                                      sectors in 1usize..9, fill in any::<u8>()) {
            use aes::cipher::KeyInit;
            let bytes = key_bytes(seed);
            let key = VolumeKey::from_bytes("k", &bytes).unwrap();
            let reference = xts_mode::Xts128::new(
                Aes256::new(GenericArray::from_slice(&bytes[..32])),
                Aes256::new(GenericArray::from_slice(&bytes[32..])),
            );
            let plain: Vec<u8> = (0..sectors * SECTOR_SIZE)
                .map(|i| (i as u8).wrapping_mul(fill | 1).wrapping_add(seed))
                .collect();
            let mut mine = plain.clone();
            let mut theirs = plain.clone();
            key.encrypt(&mut mine, first).unwrap();
            reference.encrypt_area(&mut theirs, SECTOR_SIZE, u128::from(first),
                                   xts_mode::get_tweak_default);
            prop_assert_eq!(&mine, &theirs);
            key.decrypt(&mut mine, first).unwrap();
            prop_assert_eq!(mine, plain);
        }
    }

    #[test]
    fn equal_sectors_encrypt_differently_and_the_tweak_is_the_sector() {
        let key = VolumeKey::from_bytes("k", &key_bytes(1)).unwrap();
        let mut two = vec![0xabu8; 2 * SECTOR_SIZE];
        key.encrypt(&mut two, 7).unwrap();
        assert_ne!(two[..SECTOR_SIZE], two[SECTOR_SIZE..]);
        // The second sector of a two-sector write at 7 is sector 8 written alone.
        let mut one = vec![0xabu8; SECTOR_SIZE];
        key.encrypt(&mut one, 8).unwrap();
        assert_eq!(one[..], two[SECTOR_SIZE..]);
    }

    #[test]
    fn key_check_tells_keys_apart() {
        let a = VolumeKey::from_bytes("a", &key_bytes(1)).unwrap();
        let a2 = VolumeKey::from_bytes("a2", &key_bytes(1)).unwrap();
        let b = VolumeKey::from_bytes("b", &key_bytes(2)).unwrap();
        assert_eq!(a.check(), a2.check());
        assert_ne!(a.check(), b.check());
    }

    #[test]
    fn bad_keys_are_refused_with_the_reason() {
        assert!(matches!(
            VolumeKey::from_bytes("k", &[1u8; 32]),
            Err(KeyError::BadLength { got: 32, .. })
        ));
        assert!(matches!(
            VolumeKey::from_bytes("k", &[7u8; 64]),
            Err(KeyError::EqualHalves { .. })
        ));
        let key = VolumeKey::from_bytes("k", &key_bytes(3)).unwrap();
        assert!(matches!(
            key.encrypt(&mut [0u8; 100], 0),
            Err(KeyError::Unaligned { len: 100 })
        ));
    }

    #[test]
    fn debug_never_shows_the_key() {
        let bytes = key_bytes(9);
        let key = VolumeKey::from_bytes("secret-volume", &bytes).unwrap();
        let shown = format!("{key:?}");
        assert!(shown.contains("secret-volume"));
        assert!(!shown.contains(&hex::encode(&bytes[..8])));
    }

    #[test]
    fn key_file_must_be_private_and_hex() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vol.key");
        let mut f = fs::File::create(&path).unwrap();
        writeln!(f, "{}", hex::encode(&key_bytes(4)[..32])).unwrap();
        writeln!(f, "{}", hex::encode(&key_bytes(4)[32..])).unwrap();
        drop(f);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            VolumeKey::from_key_file("k", &path),
            Err(KeyError::File {
                source: SecretFileError::LoosePermissions { mode: 0o644, .. },
                ..
            })
        ));
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        let from_file = VolumeKey::from_key_file("k", &path).unwrap();
        assert_eq!(
            from_file.check(),
            VolumeKey::from_bytes("k", &key_bytes(4)).unwrap().check()
        );

        fs::write(&path, "not hex at all").unwrap();
        assert!(matches!(
            VolumeKey::from_key_file("k", &path),
            Err(KeyError::File {
                source: SecretFileError::NotHex { .. },
                ..
            })
        ));
        assert!(matches!(
            VolumeKey::from_key_file("k", &dir.path().join("missing")),
            Err(KeyError::File {
                source: SecretFileError::Read { .. },
                ..
            })
        ));
    }

    proptest! {
        #[test]
        fn decrypt_inverts_encrypt(seed in any::<u8>(), sectors in 1usize..9, lba in any::<u64>(),
                                   fill in any::<u8>()) {
            let lba = lba.saturating_sub(sectors as u64);
            let key = VolumeKey::from_bytes("k", &key_bytes(seed)).unwrap();
            let plain: Vec<u8> = (0..sectors * SECTOR_SIZE).map(|i| (i as u8) ^ fill).collect();
            let mut buf = plain.clone();
            key.encrypt(&mut buf, lba).unwrap();
            prop_assert_ne!(&buf, &plain);
            key.decrypt(&mut buf, lba).unwrap();
            prop_assert_eq!(buf, plain);
        }
    }
}
