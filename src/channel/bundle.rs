//! The layout of a queue message that carries pickle protocol 5 out-of-band buffers: a
//! *bundle* is a header naming where each buffer lies in the queue's blob area, then the
//! pickle. The buffers themselves never pass through the ring.
//!
//! ```text
//! "\0FPB"  u32 n  u64 pickle_len  n × (u64 len | READONLY | REUSED, u64 blob position)  pickle
//! ```
//! (integers little-endian). A pickle never starts with a zero byte (it starts with the PROTO
//! opcode), so a reader tells a bundle from a plain pickle by its first bytes. `READONLY`
//! marks a buffer that is to come back as `bytes` (read-only); the others come back writable.
//! `REUSED` marks a buffer written into a spare blob, which the reader copies out through its
//! mapping of that blob (see `ring::blob`).

use crate::channel::ring::Blob;
use crate::error::{Error, Result};

/// First bytes of every bundle.
pub const MAGIC: [u8; 4] = *b"\0FPB";
/// Bytes before the per-buffer entries.
pub const FIXED: usize = 16;
/// Bytes per buffer entry.
pub const ENTRY: usize = 16;
/// Flag bit of a buffer length: read-only buffer.
pub const READONLY: u64 = 1 << 63;
/// Flag bit of a buffer length: the buffer lies in a reused (spare) blob.
pub const REUSED: u64 = 1 << 62;
/// Most buffers one bundle may carry.
pub const MAX_BUFFERS: usize = 4096;

/// One out-of-band buffer: its length, kind and place in the blob area.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    /// Bytes.
    pub len: usize,
    /// Comes back read-only (`bytes`).
    pub readonly: bool,
    /// Position in the blob area.
    pub at: u64,
    /// The blob was a spare (see [`REUSED`]).
    pub reused: bool,
}

impl Piece {
    /// The blob this buffer lies in.
    #[must_use]
    pub fn blob(&self) -> Blob {
        Blob {
            at: self.at,
            reused: self.reused,
        }
    }
}

/// A parsed bundle: the buffers and where the pickle lies in the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// The buffers, in the order the pickle consumes them.
    pub pieces: Vec<Piece>,
    /// Offset of the pickle in the message (it runs to the end).
    pub pickle_at: usize,
}

/// Whether a message starts like a bundle.
#[must_use]
pub fn is_bundle(msg: &[u8]) -> bool {
    msg.starts_with(&MAGIC)
}

/// The header for a pickle of `pickle_len` bytes using `pieces`.
#[must_use]
pub fn header(pickle_len: usize, pieces: &[Piece]) -> Vec<u8> {
    let mut h = Vec::with_capacity(FIXED + ENTRY * pieces.len());
    h.extend_from_slice(&MAGIC);
    h.extend_from_slice(
        &u32::try_from(pieces.len())
            .unwrap_or(u32::MAX)
            .to_le_bytes(),
    );
    h.extend_from_slice(&(pickle_len as u64).to_le_bytes());
    for p in pieces {
        let mut flags = if p.readonly { READONLY } else { 0 };
        if p.reused {
            flags |= REUSED;
        }
        h.extend_from_slice(&(p.len as u64 | flags).to_le_bytes());
        h.extend_from_slice(&p.at.to_le_bytes());
    }
    h
}

fn corrupt(what: &str) -> Error {
    Error::Protocol(format!("corrupted queue message ({what})"))
}

fn word(b: &[u8]) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[..8]);
    u64::from_le_bytes(w)
}

/// Parses a bundle held whole in memory.
///
/// # Errors
/// `Error::Protocol` for a bad magic, count or length (nothing is allocated for a count or
/// length the message cannot hold).
pub fn parse(msg: &[u8]) -> Result<Layout> {
    if msg.len() < FIXED || !is_bundle(msg) {
        return Err(corrupt("bad bundle header"));
    }
    let n = u32::from_le_bytes([msg[4], msg[5], msg[6], msg[7]]) as usize;
    if n > MAX_BUFFERS || FIXED + ENTRY * n > msg.len() {
        return Err(corrupt("bad buffer count"));
    }
    let pickle_at = FIXED + ENTRY * n;
    if word(&msg[8..]) != (msg.len() - pickle_at) as u64 {
        return Err(corrupt("bad pickle length"));
    }
    let pieces = msg[FIXED..pickle_at]
        .chunks_exact(ENTRY)
        .map(|e| {
            let raw = word(e);
            let len = usize::try_from(raw & !(READONLY | REUSED))
                .map_err(|_| corrupt("bad buffer length"))?;
            let at = word(&e[8..]);
            if at.checked_add(len as u64).map_or(true, |end| end > 1 << 62) {
                return Err(corrupt("bad buffer position"));
            }
            Ok(Piece {
                len,
                readonly: raw & READONLY != 0,
                at,
                reused: raw & REUSED != 0,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Layout { pieces, pickle_at })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trip() {
        let pieces = [
            Piece {
                len: 3,
                readonly: true,
                at: 0,
                reused: false,
            },
            Piece {
                len: 5000,
                readonly: false,
                at: 4096,
                reused: true,
            },
        ];
        let mut msg = header(2, &pieces);
        msg.extend_from_slice(b"PK");
        let layout = parse(&msg).unwrap();
        assert_eq!(layout.pieces, pieces);
        assert_eq!(&msg[layout.pickle_at..], b"PK");
        assert!(!is_bundle(b"\x80\x05N."));
    }

    #[test]
    fn refuses_what_the_message_cannot_hold() {
        let mut msg = header(
            2,
            &[Piece {
                len: 1,
                readonly: false,
                at: 0,
                reused: false,
            }],
        );
        msg.extend_from_slice(b"PKx");
        assert!(parse(&msg).is_err(), "pickle length");
        let mut msg = MAGIC.to_vec();
        msg.extend_from_slice(&u32::MAX.to_le_bytes());
        msg.extend_from_slice(&[0; 8]);
        assert!(parse(&msg).is_err(), "count");
        let msg = header(
            0,
            &[Piece {
                len: 1,
                readonly: false,
                at: u64::MAX,
                reused: true,
            }],
        );
        assert!(parse(&msg).is_err(), "position");
    }

    proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
            let mut msg = MAGIC.to_vec();
            msg.extend(bytes);
            let _ = parse(&msg);
        }
    }
}
