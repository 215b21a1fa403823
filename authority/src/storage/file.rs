//! Crash-safe file primitives: CRC-framed records and atomic replacement.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::Path;

/// The largest record accepted when reading back (a bigger length is corruption).
pub const MAX_RECORD: usize = 256 << 20;

/// Append one framed record to `out` (not flushed).
pub fn encode_record(out: &mut Vec<u8>, payload: &[u8]) {
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(payload).to_le_bytes());
    out.extend_from_slice(payload);
}

/// Reads framed records from a byte buffer; stops at the first torn or corrupt record.
pub struct RecordReader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> RecordReader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        RecordReader { buf, pos: 0 }
    }

    /// Offset just past the last good record.
    pub fn good_len(&self) -> usize {
        self.pos
    }
}

impl<'a> Iterator for RecordReader<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        let rest = &self.buf[self.pos..];
        if rest.len() < 8 {
            return None;
        }
        let len = u32::from_le_bytes(rest[0..4].try_into().expect("4 bytes")) as usize;
        let crc = u32::from_le_bytes(rest[4..8].try_into().expect("4 bytes"));
        if len > MAX_RECORD || rest.len() < 8 + len {
            return None;
        }
        let payload = &rest[8..8 + len];
        if crc32c::crc32c(payload) != crc {
            return None;
        }
        self.pos += 8 + len;
        Some(payload)
    }
}

/// Replace `path` with `data` so that after a crash it holds either the old or the new bytes.
pub fn write_atomic(path: &Path, data: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    sync_dir(path)
}

/// Read a file written by [`write_atomic`]; `None` if it does not exist.
pub fn read_atomic(path: &Path) -> io::Result<Option<Vec<u8>>> {
    match File::open(path) {
        Ok(mut f) => {
            let mut v = Vec::new();
            f.read_to_end(&mut v)?;
            Ok(Some(v))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// fsync the directory holding `path`, so a rename or a new file survives a crash.
pub fn sync_dir(path: &Path) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn torn_and_corrupt_tails_are_cut() {
        let mut buf = Vec::new();
        encode_record(&mut buf, b"one");
        encode_record(&mut buf, b"two");
        let good = buf.len();
        encode_record(&mut buf, b"three");
        // Torn: the last record is cut short.
        let torn = &buf[..buf.len() - 2];
        let mut r = RecordReader::new(torn);
        assert_eq!(
            r.by_ref().collect::<Vec<_>>(),
            vec![&b"one"[..], &b"two"[..]]
        );
        assert_eq!(r.good_len(), good);
        // Corrupt: a flipped payload byte fails the CRC.
        let mut bad = buf.clone();
        let last = bad.len() - 1;
        bad[last] ^= 0xff;
        let mut r = RecordReader::new(&bad);
        assert_eq!(r.by_ref().count(), 2);
        assert_eq!(r.good_len(), good);
    }
}
