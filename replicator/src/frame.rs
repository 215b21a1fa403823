//! The replication wire format: one fixed header, then `payload_len` bytes of payload.
//!
//! ```text
//! offset size field
//!  0     4   magic        b"TNDM"
//!  4     1   version      3
//!  5     1   kind         MsgKind
//!  6     2   flags        FLAG_* bits (FUA, replicated sub-op, ...)
//!  8     8   request_id   chosen by the sender, echoed in the answer
//! 16    32   volume       volume name, ASCII, NUL-padded
//! 48     8   generation   tier-1 generation the sender believes in
//! 56     8   epoch        tier-2 epoch the sender believes in
//! 64     8   seq          primary-assigned sequence number (0 where unused)
//! 72     8   offset       byte offset of the operation
//! 80     4   length       byte length of the operation (reads, zeroes, discard)
//! 84     4   payload_len  bytes of payload following the header
//! 88     8   commit       on a `Replicate`: every seq <= commit is on every in-sync replica
//! 96     4   crc          CRC32C over the payload and then bytes 0..96
//! ```
//!
//! The payload comes first in the checksum so that a server forwarding a payload under a new
//! header (a primary's `Replicate`) extends the CRC it verified instead of reading the
//! payload again: `crc32c_append(payload_crc, header)` costs 96 bytes, not 4 KiB. Version 3
//! added `commit` (the primary's commit point, which lets a new primary find the regions
//! where surviving replicas may differ: `server::unsettled`); version 2 moved the payload
//! first in the checksum (version 1 summed the header first).
//!
//! All integers are little-endian. A frame whose magic, version, kind, size or checksum is
//! wrong is a [`FrameError`]; the connection that sent it is closed (the stream can no longer
//! be trusted to be in step), other connections are unaffected.

use thiserror::Error;

pub const MAGIC: [u8; 4] = *b"TNDM";
pub const VERSION: u8 = 3;
pub const HEADER_LEN: usize = 100;
/// Bytes of the header the checksum covers (all but the checksum itself).
const CHECKED_LEN: usize = HEADER_LEN - 4;
/// Largest payload a frame may carry. Bigger I/O is split by the client.
pub const MAX_PAYLOAD: usize = 4 << 20;
pub const VOLUME_NAME_MAX: usize = 32;

/// Write through to stable storage before answering (virtio-blk FUA).
pub const FLAG_FUA: u16 = 1 << 0;
/// On a `Replicate`: the copy is a catch-up/rebuild copy, not a client write.
pub const FLAG_CATCH_UP: u16 = 1 << 1;
/// Bits 8..12 of `flags` on a `Replicate` frame: the replicated operation ([`ReplicaOp`]).
const REPLICA_OP_SHIFT: u16 = 8;
const REPLICA_OP_MASK: u16 = 0xf << REPLICA_OP_SHIFT;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum MsgKind {
    Write = 1,
    Read = 2,
    Flush = 3,
    WriteZeroes = 4,
    Discard = 5,
    /// Primary to secondary: apply one sequenced operation (see [`ReplicaOp`]).
    Replicate = 6,
    /// Primary to a returning secondary: "report your replica state" (answer payload is
    /// JSON [`crate::server::PeerHello`]); starts catch-up.
    CatchUp = 7,
    /// Health probe; the answer payload is the server's health JSON.
    Health = 8,
    /// Client to a secondary: "I cannot reach the primary, take over". The secondary checks
    /// the primary's health and the authority first (see `VolumeRuntime::takeover`).
    Takeover = 9,
    /// A step of the connection's authentication handshake (`flags`: HELLO or PROOF; see
    /// [`crate::peer_auth`]). Only as the first frames of a connection.
    Auth = 10,
    /// Successful answer. Reads carry the data as payload.
    Ok = 0x80,
    /// Failed answer: payload is [`ErrorBody`]; fencing errors carry the newer
    /// (generation, epoch) in the header.
    Error = 0x81,
}

impl MsgKind {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::Write,
            2 => Self::Read,
            3 => Self::Flush,
            4 => Self::WriteZeroes,
            5 => Self::Discard,
            6 => Self::Replicate,
            7 => Self::CatchUp,
            8 => Self::Health,
            9 => Self::Takeover,
            10 => Self::Auth,
            0x80 => Self::Ok,
            0x81 => Self::Error,
            _ => return None,
        })
    }

    pub fn is_answer(self) -> bool {
        matches!(self, Self::Ok | Self::Error)
    }
}

/// The operation a `Replicate` frame carries (in `flags` bits 8..12).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ReplicaOp {
    Write = 1,
    WriteZeroes = 2,
    Discard = 3,
    /// Barrier: the secondary applies every earlier seq, then fdatasyncs.
    Flush = 4,
}

impl ReplicaOp {
    pub fn from_flags(flags: u16) -> Option<Self> {
        Some(match (flags & REPLICA_OP_MASK) >> REPLICA_OP_SHIFT {
            1 => Self::Write,
            2 => Self::WriteZeroes,
            3 => Self::Discard,
            4 => Self::Flush,
            _ => return None,
        })
    }

    pub fn to_flags(self) -> u16 {
        (self as u16) << REPLICA_OP_SHIFT
    }
}

/// A volume name as carried in the header: 1..=32 bytes of `[A-Za-z0-9._-]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VolumeName(String);

impl VolumeName {
    pub fn new(name: &str) -> Result<Self, FrameError> {
        let ok = !name.is_empty()
            && name.len() <= VOLUME_NAME_MAX
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if ok {
            Ok(Self(name.to_owned()))
        } else {
            Err(FrameError::BadVolumeName)
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Name of no volume, for frames that concern the server (health).
    pub fn none() -> Self {
        Self(String::new())
    }
}

impl std::fmt::Display for VolumeName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub kind: MsgKind,
    pub flags: u16,
    pub request_id: u64,
    pub volume: VolumeName,
    pub generation: u64,
    pub epoch: u64,
    pub seq: u64,
    pub offset: u64,
    pub length: u32,
    /// On a `Replicate`: the primary's commit point, every seq at or below it has been
    /// answered by every in-sync replica (0 elsewhere). See `server::unsettled`.
    pub commit: u64,
}

impl Header {
    pub fn new(kind: MsgKind, request_id: u64, volume: VolumeName) -> Self {
        Self {
            kind,
            flags: 0,
            request_id,
            volume,
            generation: 0,
            epoch: 0,
            seq: 0,
            offset: 0,
            length: 0,
            commit: 0,
        }
    }

    /// The answer header for this request: same id and volume, kind `Ok`/`Error`.
    pub fn answer(&self, kind: MsgKind) -> Self {
        Self {
            kind,
            flags: 0,
            request_id: self.request_id,
            volume: self.volume.clone(),
            generation: 0,
            epoch: 0,
            seq: self.seq,
            offset: self.offset,
            length: self.length,
            commit: 0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub header: Header,
    pub payload: Vec<u8>,
    /// CRC32C of `payload` alone, verified on decode: what [`encode_with_payload_crc`] takes
    /// to forward the payload without summing it again.
    pub payload_crc: u32,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("bad magic {0:02x?}")]
    BadMagic([u8; 4]),
    #[error("unsupported protocol version {0}")]
    BadVersion(u8),
    #[error("unknown message kind {0:#x}")]
    UnknownKind(u8),
    #[error("payload of {0} bytes exceeds the maximum of {MAX_PAYLOAD}")]
    Oversized(u32),
    #[error("checksum mismatch: header says {expected:#010x}, frame has {actual:#010x}")]
    BadChecksum { expected: u32, actual: u32 },
    #[error("volume name is not 1..=32 bytes of [A-Za-z0-9._-]")]
    BadVolumeName,
}

/// Encodes `header` and `payload` into `out` (appended).
pub fn encode_into(header: &Header, payload: &[u8], out: &mut Vec<u8>) {
    encode_with_payload_crc(header, payload, crc32c::crc32c(payload), out)
}

/// [`encode_into`] for a payload whose CRC32C is known (a decoded [`Frame`]'s
/// `payload_crc`), so that forwarding it does not read it twice.
pub fn encode_with_payload_crc(
    header: &Header,
    payload: &[u8],
    payload_crc: u32,
    out: &mut Vec<u8>,
) {
    assert!(payload.len() <= MAX_PAYLOAD, "caller splits large payloads");
    debug_assert_eq!(
        payload_crc,
        crc32c::crc32c(payload),
        "payload CRC is the payload's"
    );
    let start = out.len();
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    out.push(header.kind as u8);
    out.extend_from_slice(&header.flags.to_le_bytes());
    out.extend_from_slice(&header.request_id.to_le_bytes());
    let mut name = [0u8; VOLUME_NAME_MAX];
    let vb = header.volume.as_str().as_bytes();
    name[..vb.len()].copy_from_slice(vb);
    out.extend_from_slice(&name);
    out.extend_from_slice(&header.generation.to_le_bytes());
    out.extend_from_slice(&header.epoch.to_le_bytes());
    out.extend_from_slice(&header.seq.to_le_bytes());
    out.extend_from_slice(&header.offset.to_le_bytes());
    out.extend_from_slice(&header.length.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&header.commit.to_le_bytes());
    let crc = crc32c::crc32c_append(payload_crc, &out[start..]);
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(payload);
}

pub fn encode(header: &Header, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(HEADER_LEN + payload.len());
    encode_into(header, payload, &mut v);
    v
}

/// What the header says, before the payload is read: enough to bound the read.
#[derive(Debug)]
pub struct RawHeader {
    bytes: [u8; HEADER_LEN],
    pub payload_len: usize,
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

/// Checks magic, version and size of a header so the reader knows how much payload to read
/// (and refuses to allocate for an oversized one).
pub fn parse_header_prefix(bytes: &[u8; HEADER_LEN]) -> Result<RawHeader, FrameError> {
    let magic: [u8; 4] = bytes[0..4].try_into().expect("4 bytes");
    if magic != MAGIC {
        return Err(FrameError::BadMagic(magic));
    }
    if bytes[4] != VERSION {
        return Err(FrameError::BadVersion(bytes[4]));
    }
    let payload_len = u32_at(bytes, 84);
    if payload_len as usize > MAX_PAYLOAD {
        return Err(FrameError::Oversized(payload_len));
    }
    Ok(RawHeader {
        bytes: *bytes,
        payload_len: payload_len as usize,
    })
}

/// Verifies the checksum over header and payload and decodes the header fields.
pub fn finish_decode(raw: &RawHeader, payload: Vec<u8>) -> Result<Frame, FrameError> {
    let b = &raw.bytes;
    debug_assert_eq!(payload.len(), raw.payload_len);
    let expected = u32_at(b, CHECKED_LEN);
    let payload_crc = crc32c::crc32c(&payload);
    let actual = crc32c::crc32c_append(payload_crc, &b[..CHECKED_LEN]);
    if expected != actual {
        return Err(FrameError::BadChecksum { expected, actual });
    }
    let kind = MsgKind::from_u8(b[5]).ok_or(FrameError::UnknownKind(b[5]))?;
    let name = &b[16..48];
    let end = name.iter().position(|&c| c == 0).unwrap_or(VOLUME_NAME_MAX);
    if name[end..].iter().any(|&c| c != 0) {
        return Err(FrameError::BadVolumeName);
    }
    let volume = if end == 0 {
        VolumeName::none()
    } else {
        VolumeName::new(std::str::from_utf8(&name[..end]).map_err(|_| FrameError::BadVolumeName)?)?
    };
    Ok(Frame {
        header: Header {
            kind,
            flags: u16::from_le_bytes([b[6], b[7]]),
            request_id: u64_at(b, 8),
            volume,
            generation: u64_at(b, 48),
            epoch: u64_at(b, 56),
            seq: u64_at(b, 64),
            offset: u64_at(b, 72),
            length: u32_at(b, 80),
            commit: u64_at(b, 88),
        },
        payload,
        payload_crc,
    })
}

/// Decodes one whole frame from `buf`; `Ok(None)` if `buf` holds less than a frame.
/// Returns the frame and the number of bytes it used.
pub fn decode(buf: &[u8]) -> Result<Option<(Frame, usize)>, FrameError> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let raw = parse_header_prefix(buf[..HEADER_LEN].try_into().expect("header len"))?;
    let total = HEADER_LEN + raw.payload_len;
    if buf.len() < total {
        return Ok(None);
    }
    let frame = finish_decode(&raw, buf[HEADER_LEN..total].to_vec())?;
    Ok(Some((frame, total)))
}

/// Error codes carried in an `Error` answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum ErrorCode {
    /// The sender's (generation, epoch) is older than the receiver's; header carries the newer.
    StaleEpoch = 1,
    /// This server is not the volume's primary; body `message` holds the primary's id if known.
    NotPrimary = 2,
    UnknownVolume = 3,
    OutOfRange = 4,
    /// The local disk failed (EIO...). Nothing was acknowledged.
    Io = 5,
    /// The primary's lease is not valid for its epoch: it may not acknowledge.
    LeaseExpired = 6,
    /// A replica needed for the acknowledgement did not answer and could not be marked out of
    /// sync at the authority; the write is not acknowledged.
    ReplicationFailed = 7,
    /// Well-formed frame the server cannot serve (e.g. unaligned I/O, bad kind for a role).
    Invalid = 8,
    /// The server is behind the sender (it has not yet learnt the sender's newer epoch).
    NotReady = 9,
    Unsupported = 10,
    /// A takeover was refused: the primary answered and holds a valid lease.
    PrimaryHealthy = 11,
    /// A takeover was refused: this replica is not in sync.
    NotInSync = 12,
    /// The connection did not authenticate (or failed to) and the server requires it; the
    /// server closes it after this answer.
    Unauthenticated = 13,
}

impl ErrorCode {
    pub fn from_u16(v: u16) -> Option<Self> {
        Some(match v {
            1 => Self::StaleEpoch,
            2 => Self::NotPrimary,
            3 => Self::UnknownVolume,
            4 => Self::OutOfRange,
            5 => Self::Io,
            6 => Self::LeaseExpired,
            7 => Self::ReplicationFailed,
            8 => Self::Invalid,
            9 => Self::NotReady,
            10 => Self::Unsupported,
            11 => Self::PrimaryHealthy,
            12 => Self::NotInSync,
            13 => Self::Unauthenticated,
            _ => return None,
        })
    }
}

/// Body of an `Error` answer: `code: u16`, then a UTF-8 message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorBody {
    pub code: ErrorCode,
    pub message: String,
}

impl ErrorBody {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = (self.code as u16).to_le_bytes().to_vec();
        v.extend_from_slice(self.message.as_bytes());
        v
    }

    pub fn decode(payload: &[u8]) -> Option<Self> {
        if payload.len() < 2 {
            return None;
        }
        let code = ErrorCode::from_u16(u16::from_le_bytes([payload[0], payload[1]]))?;
        Some(Self {
            code,
            message: String::from_utf8_lossy(&payload[2..]).into_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn kinds() -> impl Strategy<Value = MsgKind> {
        prop::sample::select(vec![
            MsgKind::Write,
            MsgKind::Read,
            MsgKind::Flush,
            MsgKind::WriteZeroes,
            MsgKind::Discard,
            MsgKind::Replicate,
            MsgKind::CatchUp,
            MsgKind::Health,
            MsgKind::Takeover,
            MsgKind::Auth,
            MsgKind::Ok,
            MsgKind::Error,
        ])
    }

    fn headers() -> impl Strategy<Value = Header> {
        (
            kinds(),
            any::<u16>(),
            any::<u64>(),
            "[a-z0-9._-]{1,32}",
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            any::<u32>(),
            any::<u64>(),
        )
            .prop_map(
                |(kind, flags, request_id, vol, g, e, seq, off, len, commit)| Header {
                    kind,
                    flags,
                    request_id,
                    volume: VolumeName::new(&vol).unwrap(),
                    generation: g,
                    epoch: e,
                    seq,
                    offset: off,
                    length: len,
                    commit,
                },
            )
    }

    proptest! {
        #[test]
        fn round_trip(h in headers(), payload in prop::collection::vec(any::<u8>(), 0..2048)) {
            let bytes = encode(&h, &payload);
            prop_assert_eq!(bytes.len(), HEADER_LEN + payload.len());
            let (f, used) = decode(&bytes).unwrap().unwrap();
            prop_assert_eq!(used, bytes.len());
            prop_assert_eq!(f.header, h);
            prop_assert_eq!(f.payload_crc, crc32c::crc32c(&payload));
            prop_assert_eq!(f.payload, payload);
        }

        #[test]
        fn a_forwarded_payload_keeps_a_valid_checksum(h in headers(), h2 in headers(),
                                                      payload in prop::collection::vec(any::<u8>(), 0..2048)) {
            let (f, _) = decode(&encode(&h, &payload)).unwrap().unwrap();
            let mut fwd = Vec::new();
            encode_with_payload_crc(&h2, &f.payload, f.payload_crc, &mut fwd);
            prop_assert_eq!(&fwd, &encode(&h2, &payload));
            let (g, _) = decode(&fwd).unwrap().unwrap();
            prop_assert_eq!(g.header, h2);
            prop_assert_eq!(g.payload, payload);
        }

        #[test]
        fn any_flipped_bit_is_rejected(h in headers(),
                                       payload in prop::collection::vec(any::<u8>(), 0..256),
                                       pos in any::<prop::sample::Index>(), bit in 0u8..8) {
            let mut bytes = encode(&h, &payload);
            let i = pos.index(bytes.len());
            bytes[i] ^= 1 << bit;
            // A flip in the length field may make the frame look incomplete (None) or
            // oversized; every other flip must be caught by magic/version/crc.
            match decode(&bytes) {
                Ok(None) => prop_assert!((84..88).contains(&i)),
                Ok(Some(_)) => prop_assert!(false, "corruption at byte {} accepted", i),
                Err(_) => {}
            }
        }

        #[test]
        fn truncated_frames_are_incomplete(h in headers(),
                                           payload in prop::collection::vec(any::<u8>(), 0..256),
                                           cut in any::<prop::sample::Index>()) {
            let bytes = encode(&h, &payload);
            let n = cut.index(bytes.len());
            prop_assert_eq!(decode(&bytes[..n]), Ok(None));
        }

        #[test]
        fn garbage_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode(&bytes);
        }
    }

    #[test]
    fn oversized_is_rejected_before_reading_payload() {
        let h = Header::new(MsgKind::Write, 1, VolumeName::new("v").unwrap());
        let mut bytes = encode(&h, &[]);
        bytes[84..88].copy_from_slice(&((MAX_PAYLOAD as u32) + 1).to_le_bytes());
        assert_eq!(
            decode(&bytes[..HEADER_LEN]).unwrap_err(),
            FrameError::Oversized(MAX_PAYLOAD as u32 + 1)
        );
    }

    #[test]
    fn unknown_kind_with_valid_crc_is_rejected() {
        let h = Header::new(MsgKind::Write, 1, VolumeName::new("v").unwrap());
        let mut bytes = encode(&h, b"abc");
        bytes[5] = 0x42;
        let crc = crc32c::crc32c_append(crc32c::crc32c(b"abc"), &bytes[..CHECKED_LEN]);
        bytes[CHECKED_LEN..HEADER_LEN].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(decode(&bytes).unwrap_err(), FrameError::UnknownKind(0x42));
    }

    #[test]
    fn replica_op_round_trips_in_flags() {
        for op in [
            ReplicaOp::Write,
            ReplicaOp::WriteZeroes,
            ReplicaOp::Discard,
            ReplicaOp::Flush,
        ] {
            assert_eq!(
                ReplicaOp::from_flags(op.to_flags() | FLAG_FUA | FLAG_CATCH_UP),
                Some(op)
            );
        }
        assert_eq!(ReplicaOp::from_flags(0), None);
    }

    #[test]
    fn error_body_round_trips() {
        let b = ErrorBody {
            code: ErrorCode::StaleEpoch,
            message: "epoch 7 > 3".into(),
        };
        assert_eq!(ErrorBody::decode(&b.encode()), Some(b));
        assert_eq!(ErrorBody::decode(&[0xff, 0xff]), None);
    }
}
