//! Mutual authentication of replication connections with a key that a site's servers and
//! clients share (`--peer-key-file`).
//!
//! Without it anyone who can reach a server's data port can send frames: a forged `Replicate`
//! with a newer epoch makes a secondary follow it and refuse the real primary (which then
//! steps down), and a forged write changes data. With a key configured, a connection starts
//! with a challenge-response in both directions before any other frame is served:
//!
//! ```text
//! client -> server  Auth HELLO  payload: client nonce (32 random bytes)
//! server -> client  Ok          payload: server nonce (32) | HMAC(key, "server" | cn | sn)
//! client -> server  Auth PROOF  payload: HMAC(key, "client" | cn | sn)
//! server -> client  Ok
//! ```
//!
//! HMAC-SHA256 with fresh nonces on both sides: neither side's answer can be replayed on
//! another connection, and a client learns that it talks to a holder of the key before it
//! sends data. What it does not do: encrypt, or protect the frames after the handshake from
//! someone who can alter the TCP stream itself (the frames' CRC32C is no MAC). Against an
//! attacker on the path the network must be trusted, or the link tunnelled (TLS, WireGuard).

use std::fmt;
use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use hmac::{Hmac, Mac};
use sha2::Sha256;
use zeroize::Zeroizing;

pub const KEY_LEN: usize = 32;
pub const NONCE_LEN: usize = 32;
pub const TAG_LEN: usize = 32;

/// `flags` of an `Auth` frame: which step it is.
pub const AUTH_HELLO: u16 = 1;
pub const AUTH_PROOF: u16 = 2;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("peer key: expected {KEY_LEN} bytes ({} hex digits), got {got} bytes", KEY_LEN * 2)]
    BadLength { got: usize },
    #[error("peer key: {0}")]
    File(#[from] crate::secret_file::SecretFileError),
    #[error("peer key file {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("no randomness from the OS for a nonce: {0}")]
    Random(String),
}

/// A site's shared key. `Debug` never prints it; the bytes are wiped on drop.
#[derive(Clone)]
pub struct PeerKey(Zeroizing<[u8; KEY_LEN]>);

impl fmt::Debug for PeerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PeerKey(..)")
    }
}

impl PeerKey {
    pub fn from_bytes(b: &[u8]) -> Result<Self, AuthError> {
        let arr: [u8; KEY_LEN] = b
            .try_into()
            .map_err(|_| AuthError::BadLength { got: b.len() })?;
        Ok(Self(Zeroizing::new(arr)))
    }

    /// A new random key.
    pub fn generate() -> Result<Self, AuthError> {
        let mut k = Zeroizing::new([0u8; KEY_LEN]);
        getrandom::getrandom(&mut k[..]).map_err(|e| AuthError::Random(e.to_string()))?;
        Ok(Self(k))
    }

    /// Reads a key file: the key as hex (whitespace ignored), readable by its owner only (as
    /// a volume key file).
    pub fn from_key_file(path: &Path) -> Result<Self, AuthError> {
        Self::from_bytes(&crate::secret_file::read_hex(path)?)
    }

    /// Writes the key as hex into a new file of mode 0600 (refuses to overwrite one).
    pub fn write_key_file(&self, path: &Path) -> Result<(), AuthError> {
        let io = |source| AuthError::Io {
            path: path.display().to_string(),
            source,
        };
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(io)?;
        let text = Zeroizing::new(hex::encode(&self.0[..]) + "\n");
        f.write_all(text.as_bytes()).map_err(io)?;
        f.sync_all().map_err(io)
    }

    fn mac(&self, role: &[u8], cn: &[u8], sn: &[u8]) -> Hmac<Sha256> {
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(&self.0[..]).expect("any key length");
        m.update(b"tandem-replicator-auth-v1 ");
        m.update(role);
        m.update(cn);
        m.update(sn);
        m
    }

    /// The tag `role` ("server" or "client") sends for this pair of nonces.
    pub fn tag(&self, role: Role, cn: &[u8], sn: &[u8]) -> [u8; TAG_LEN] {
        self.mac(role.label(), cn, sn)
            .finalize()
            .into_bytes()
            .into()
    }

    /// Checks a tag in constant time.
    pub fn verify(&self, role: Role, cn: &[u8], sn: &[u8], tag: &[u8]) -> bool {
        self.mac(role.label(), cn, sn).verify_slice(tag).is_ok()
    }
}

/// Which side of the handshake a tag proves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Server,
    Client,
}

impl Role {
    fn label(self) -> &'static [u8] {
        match self {
            Role::Server => b"server",
            Role::Client => b"client",
        }
    }
}

pub fn nonce() -> Result<[u8; NONCE_LEN], AuthError> {
    let mut n = [0u8; NONCE_LEN];
    getrandom::getrandom(&mut n).map_err(|e| AuthError::Random(e.to_string()))?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret_file::SecretFileError;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn tags_bind_key_role_and_both_nonces() {
        let k = PeerKey::generate().unwrap();
        let (cn, sn) = (nonce().unwrap(), nonce().unwrap());
        let t = k.tag(Role::Server, &cn, &sn);
        assert!(k.verify(Role::Server, &cn, &sn, &t));
        // The client's tag is not the server's: one side's answer is no proof for the other.
        assert!(!k.verify(Role::Client, &cn, &sn, &t));
        assert!(!k.verify(Role::Server, &sn, &cn, &t));
        let mut other_cn = cn;
        other_cn[0] ^= 1;
        assert!(!k.verify(Role::Server, &other_cn, &sn, &t));
        let other = PeerKey::generate().unwrap();
        assert!(!other.verify(Role::Server, &cn, &sn, &t));
        assert!(!k.verify(Role::Server, &cn, &sn, &t[..31]));
    }

    #[test]
    fn key_files_round_trip_and_refuse_loose_modes_and_bad_contents() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("peer.key");
        let k = PeerKey::generate().unwrap();
        k.write_key_file(&path).unwrap();
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let back = PeerKey::from_key_file(&path).unwrap();
        let (cn, sn) = ([1u8; 32], [2u8; 32]);
        assert_eq!(
            back.tag(Role::Client, &cn, &sn),
            k.tag(Role::Client, &cn, &sn)
        );
        assert!(
            k.write_key_file(&path).is_err(),
            "overwrote an existing key file"
        );

        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
        assert!(matches!(
            PeerKey::from_key_file(&path),
            Err(AuthError::File(SecretFileError::LoosePermissions {
                mode: 0o640,
                ..
            }))
        ));
        let short = dir.path().join("short.key");
        fs::write(&short, "abcd\n").unwrap();
        fs::set_permissions(&short, fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(
            PeerKey::from_key_file(&short),
            Err(AuthError::BadLength { got: 2 })
        ));
        fs::write(&short, "zz".repeat(32)).unwrap();
        assert!(matches!(
            PeerKey::from_key_file(&short),
            Err(AuthError::File(SecretFileError::NotHex { .. }))
        ));
        assert_eq!(format!("{k:?}"), "PeerKey(..)");
    }
}
