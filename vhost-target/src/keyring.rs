//! The file keyring (SPDK's `keyring_file_*` methods): named volume keys read from key files.
//!
//! The keyring owns the keys; a replicated bdev holds an `Arc` of the one it was created with,
//! so removing a key that a bdev still uses is refused rather than leaving `save_config` with a
//! bdev whose key it cannot name. Keys never appear in logs or RPC answers: `keyring_get_keys`
//! gives the name, the file and the key's check value (which identifies a key, not reveals it).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use replicator::volume_key::{KeyError, VolumeKey};

#[derive(Debug, thiserror::Error)]
pub enum KeyringError {
    #[error("key {0} already exists")]
    Exists(String),
    #[error("key {0} does not exist")]
    NoSuchKey(String),
    #[error("key {name} is in use by bdev(s); delete them first")]
    InUse { name: String },
    #[error("key file path {0:?} is not absolute (SPDK's file keyring requires absolute paths)")]
    RelativePath(PathBuf),
    #[error(transparent)]
    Key(#[from] KeyError),
}

struct Entry {
    path: PathBuf,
    key: Arc<VolumeKey>,
}

/// One key as `keyring_get_keys` and `save_config` show it.
#[derive(Debug, Clone)]
pub struct KeyDescription {
    pub name: String,
    pub path: PathBuf,
    /// Hex of the key check value's first 8 bytes.
    pub check: String,
    pub in_use: bool,
}

#[derive(Default)]
pub struct Keyring {
    keys: BTreeMap<String, Entry>,
}

impl Keyring {
    pub fn add_file_key(&mut self, name: &str, path: &Path) -> Result<(), KeyringError> {
        if self.keys.contains_key(name) {
            return Err(KeyringError::Exists(name.to_owned()));
        }
        if !path.is_absolute() {
            return Err(KeyringError::RelativePath(path.to_owned()));
        }
        let key = VolumeKey::from_key_file(name, path)?;
        tracing::info!(key = name, check = ?key.check(), "key added");
        self.keys.insert(
            name.to_owned(),
            Entry {
                path: path.to_owned(),
                key: Arc::new(key),
            },
        );
        Ok(())
    }

    pub fn remove(&mut self, name: &str) -> Result<(), KeyringError> {
        let e = self
            .keys
            .get(name)
            .ok_or_else(|| KeyringError::NoSuchKey(name.to_owned()))?;
        if Arc::strong_count(&e.key) > 1 {
            return Err(KeyringError::InUse {
                name: name.to_owned(),
            });
        }
        self.keys.remove(name);
        tracing::info!(key = name, "key removed");
        Ok(())
    }

    pub fn get(&self, name: &str) -> Result<Arc<VolumeKey>, KeyringError> {
        self.keys
            .get(name)
            .map(|e| e.key.clone())
            .ok_or_else(|| KeyringError::NoSuchKey(name.to_owned()))
    }

    pub fn describe(&self) -> Vec<KeyDescription> {
        self.keys
            .iter()
            .map(|(name, e)| KeyDescription {
                name: name.clone(),
                path: e.path.clone(),
                check: format!("{:?}", e.key.check()),
                in_use: Arc::strong_count(&e.key) > 1,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn key_file(dir: &Path, name: &str, byte: u8, mode: u32) -> PathBuf {
        let p = dir.join(name);
        let mut hex: String = (0..32).map(|_| format!("{byte:02x}")).collect();
        hex.extend((0..32).map(|_| format!("{:02x}", byte ^ 0x5a)));
        std::fs::write(&p, hex + "\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    #[test]
    fn keys_are_added_listed_held_and_removed() {
        let d = tempfile::tempdir().unwrap();
        let mut k = Keyring::default();
        let p = key_file(d.path(), "k0", 1, 0o600);
        k.add_file_key("k0", &p).unwrap();
        assert!(matches!(
            k.add_file_key("k0", &p),
            Err(KeyringError::Exists(_))
        ));
        let held = k.get("k0").unwrap();
        let listed = k.describe();
        assert_eq!(listed.len(), 1);
        assert!(listed[0].in_use);
        assert_eq!(listed[0].check, format!("{:?}", held.check()));
        assert!(matches!(k.remove("k0"), Err(KeyringError::InUse { .. })));
        drop(held);
        k.remove("k0").unwrap();
        assert!(matches!(k.get("k0"), Err(KeyringError::NoSuchKey(_))));
    }

    #[test]
    fn loose_permissions_relative_paths_and_bad_files_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let mut k = Keyring::default();
        let loose = key_file(d.path(), "loose", 2, 0o644);
        assert!(matches!(
            k.add_file_key("a", &loose),
            Err(KeyringError::Key(KeyError::File {
                source: replicator::secret_file::SecretFileError::LoosePermissions { .. },
                ..
            }))
        ));
        assert!(matches!(
            k.add_file_key("b", Path::new("relative/key")),
            Err(KeyringError::RelativePath(_))
        ));
        let short = d.path().join("short");
        std::fs::write(&short, "abcd").unwrap();
        std::fs::set_permissions(&short, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(
            k.add_file_key("c", &short),
            Err(KeyringError::Key(KeyError::BadLength { .. }))
        ));
        assert!(k.describe().is_empty());
    }
}
