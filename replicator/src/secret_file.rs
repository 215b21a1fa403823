//! Reading a secret kept as hex in a file of its own: a volume's XTS key
//! ([`crate::volume_key`]) and a site's peer key ([`crate::peer_auth`]). The file must be
//! private (no group or other permission bits: a key readable by others is refused rather
//! than used), whitespace between the digits is ignored, and every copy of the text and the
//! bytes is wiped when dropped.

use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use thiserror::Error;
use zeroize::Zeroizing;

#[derive(Debug, Error)]
pub enum SecretFileError {
    #[error("cannot read key file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("key file {path} is accessible by group or others (mode {mode:o}); chmod 600 it")]
    LoosePermissions { path: String, mode: u32 },
    #[error("key file {path} is not hex: {reason}")]
    NotHex { path: String, reason: String },
}

/// The bytes a private hex file holds (its length is the caller's to check).
pub fn read_hex(path: &Path) -> Result<Zeroizing<Vec<u8>>, SecretFileError> {
    let p = || path.display().to_string();
    let read_err = |source| SecretFileError::Read { path: p(), source };
    let mut file = fs::File::open(path).map_err(read_err)?;
    let mode = file.metadata().map_err(read_err)?.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(SecretFileError::LoosePermissions { path: p(), mode });
    }
    let mut text = Zeroizing::new(String::new());
    file.read_to_string(&mut text).map_err(read_err)?;
    let digits: Zeroizing<String> =
        Zeroizing::new(text.chars().filter(|c| !c.is_whitespace()).collect());
    hex::decode(digits.as_bytes())
        .map(Zeroizing::new)
        .map_err(|e| SecretFileError::NotHex {
            path: p(),
            reason: e.to_string(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_private_hex_file_is_read_and_anything_else_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        fs::write(&path, "00ff\n10 20\n").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(&read_hex(&path).unwrap()[..], &[0x00, 0xff, 0x10, 0x20]);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o604)).unwrap();
        assert!(matches!(
            read_hex(&path),
            Err(SecretFileError::LoosePermissions { mode: 0o604, .. })
        ));
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        fs::write(&path, "0g").unwrap();
        assert!(matches!(
            read_hex(&path),
            Err(SecretFileError::NotHex { .. })
        ));
        assert!(matches!(
            read_hex(&dir.path().join("missing")),
            Err(SecretFileError::Read { .. })
        ));
    }
}
