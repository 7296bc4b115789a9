//! The stdlib's `Connection` frame format, byte for byte.
//!
//! A frame is a big-endian signed 32-bit length followed by that many payload bytes. Payloads
//! longer than `0x7fff_ffff` bytes are announced by the length `-1` followed by a big-endian
//! unsigned 64-bit length. Any other negative length is malformed.
//!
//! Decoding is incremental and never trusts the announced length for allocation: a payload
//! buffer grows geometrically as bytes actually arrive, so a peer that claims 2^62 bytes and
//! then stops costs at most about twice what it really sent.
//!
//! Between the two ends of a ferroproc `Pipe()` (and only there) the length `-2` announces a
//! *lane frame*: a big-endian 32-bit slot number and 64-bit payload length follow, and the
//! payload waits in that slot of the sender's shared-memory lane (see `channel::lane`), whose
//! descriptor comes with the frame. Elsewhere `-2` is as malformed as any other negative
//! length.

use std::io::IoSlice;

use nix::errno::Errno;

use crate::error::{Error, Result};
use crate::sys::stream::Io;

/// Largest payload announced with the short (4-byte) header.
pub const SHORT_MAX: usize = 0x7fff_ffff;

/// Longest stdlib header: the `-1` marker and the 8-byte length.
pub const MAX_HEADER: usize = 12;

/// The marker of a lane frame.
pub const LANE_MARKER: i32 = -2;

/// A lane frame's header: the marker, the slot and the length.
pub const LANE_HEADER: usize = 16;

/// The header of a lane frame for `len` bytes in `slot`.
#[must_use]
pub fn encode_lane_header(slot: u32, len: usize) -> [u8; LANE_HEADER] {
    let mut h = [0u8; LANE_HEADER];
    h[..4].copy_from_slice(&LANE_MARKER.to_be_bytes());
    h[4..8].copy_from_slice(&slot.to_be_bytes());
    h[8..].copy_from_slice(&(len as u64).to_be_bytes());
    h
}

/// First allocation for a payload whose announced size is larger; later ones double.
pub const FIRST_CHUNK: usize = 64 * 1024;

/// The message for a frame that ends before its announced length (`OSError`).
pub const EOF_IN_MESSAGE: &str = "got end of file during message";

/// Outcome of a non-blocking decoding step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress<T> {
    /// The step finished with this value.
    Ready(T),
    /// The source has no more bytes for now: wait for readability and call again.
    Pending,
}

/// A byte source the decoder pulls from without blocking (a descriptor, or memory in tests).
pub trait Source {
    /// Reads into `buf`: `Io::Done(0)` at end of file, `Io::Again` when nothing is available.
    ///
    /// # Errors
    /// Whatever the underlying read fails with.
    fn read(&mut self, buf: &mut [u8]) -> Result<Io>;

    /// Appends up to `max` bytes to `v`, using only its already reserved spare capacity.
    ///
    /// # Errors
    /// As [`Source::read`].
    fn read_append(&mut self, v: &mut Vec<u8>, max: usize) -> Result<Io>;
}

/// Encodes the header for a payload of `len` bytes; returns the buffer and how many of its bytes
/// to send (4, or 12 beyond [`SHORT_MAX`]).
#[must_use]
pub fn encode_header(len: usize) -> ([u8; MAX_HEADER], usize) {
    let mut h = [0u8; MAX_HEADER];
    match i32::try_from(len) {
        Ok(short) => {
            h[..4].copy_from_slice(&short.to_be_bytes());
            (h, 4)
        }
        Err(_) => {
            h[..4].copy_from_slice(&(-1i32).to_be_bytes());
            h[4..].copy_from_slice(&(len as u64).to_be_bytes());
            (h, MAX_HEADER)
        }
    }
}

/// What the header bytes read so far say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Header {
    /// The header is this many bytes long in total and not complete yet.
    Incomplete(usize),
    /// The payload length.
    Len(u64),
    /// A negative length other than the `-1` marker: the stream is not a frame stream.
    Invalid(i32),
    /// A lane frame (only when lanes are expected): slot and length.
    Lane(u32, u64),
}

/// Decodes a (possibly partial) header; with `lanes`, `-2` starts a lane frame.
#[must_use]
pub fn decode_header(h: &[u8], lanes: bool) -> Header {
    let Some(first) = h.get(..4) else {
        return Header::Incomplete(4);
    };
    let short = i32::from_be_bytes([first[0], first[1], first[2], first[3]]);
    match short {
        LANE_MARKER if lanes => match h.get(4..LANE_HEADER) {
            Some(rest) => {
                let slot = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]);
                let mut b = [0u8; 8];
                b.copy_from_slice(&rest[4..]);
                Header::Lane(slot, u64::from_be_bytes(b))
            }
            None => Header::Incomplete(LANE_HEADER),
        },
        -1 => match h.get(4..MAX_HEADER) {
            Some(long) => {
                let mut b = [0u8; 8];
                b.copy_from_slice(long);
                Header::Len(u64::from_be_bytes(b))
            }
            None => Header::Incomplete(MAX_HEADER),
        },
        n if n < 0 => Header::Invalid(n),
        n => Header::Len(n.unsigned_abs().into()),
    }
}

/// Reads a header incrementally.
#[derive(Debug, Default, Clone)]
pub struct HeaderReader {
    buf: [u8; LANE_HEADER],
    got: usize,
}

/// A decoded header: a usable length, or a malformed one (`OSError("bad message length")`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Length {
    /// The payload is this long.
    Valid(u64),
    /// The header announced a negative length.
    Invalid,
    /// A lane frame: slot and length.
    Lane(u32, u64),
}

impl HeaderReader {
    /// A reader at the start of a frame.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether any byte of this header has been consumed.
    #[must_use]
    pub fn started(&self) -> bool {
        self.got > 0
    }

    /// Pulls header bytes from `src` until the header is complete or `src` runs dry.
    ///
    /// # Errors
    /// [`Error::Eof`] when the source ends before the first byte; `Protocol` when it ends
    /// inside the header; the source's own errors.
    pub fn step<S: Source + ?Sized>(
        &mut self,
        src: &mut S,
        lanes: bool,
    ) -> Result<Progress<Length>> {
        loop {
            let need = match decode_header(&self.buf[..self.got], lanes) {
                Header::Incomplete(n) => n,
                Header::Len(n) => return Ok(Progress::Ready(Length::Valid(n))),
                Header::Invalid(_) => return Ok(Progress::Ready(Length::Invalid)),
                Header::Lane(slot, n) => return Ok(Progress::Ready(Length::Lane(slot, n))),
            };
            match src.read(&mut self.buf[self.got..need])? {
                Io::Again => return Ok(Progress::Pending),
                Io::Done(0) if self.got == 0 => return Err(Error::Eof),
                Io::Done(0) => return Err(Error::Protocol(EOF_IN_MESSAGE.into())),
                Io::Done(n) => self.got += n,
            }
        }
    }
}

/// Fills a caller-provided slice with exactly its length of payload bytes.
#[derive(Debug, Default, Clone)]
pub struct SliceFill {
    got: usize,
}

impl SliceFill {
    /// A fill that has read nothing yet.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Reads into `dst[got..]` until it is full or `src` runs dry.
    ///
    /// # Errors
    /// `Protocol` when the source ends before `dst` is full; the source's own errors.
    pub fn step<S: Source + ?Sized>(
        &mut self,
        src: &mut S,
        dst: &mut [u8],
    ) -> Result<Progress<()>> {
        while self.got < dst.len() {
            match src.read(&mut dst[self.got..])? {
                Io::Again => return Ok(Progress::Pending),
                Io::Done(0) => return Err(Error::Protocol(EOF_IN_MESSAGE.into())),
                Io::Done(n) => self.got += n,
            }
        }
        Ok(Progress::Ready(()))
    }
}

/// Capacity to reserve next for a payload of `total` bytes of which `have` arrived: double what
/// is there (at least [`FIRST_CHUNK`]), never beyond `total`.
#[must_use]
pub fn next_capacity(have: usize, total: usize) -> usize {
    have.saturating_mul(2).max(FIRST_CHUNK).min(total)
}

/// Reads a payload of `total` bytes into a `Vec` that grows only as bytes arrive.
///
/// # Errors
/// `Protocol` when the source ends early; ENOMEM (as `Os`) when the buffer cannot grow; the
/// source's own errors.
pub fn fill_vec<S: Source + ?Sized>(
    src: &mut S,
    v: &mut Vec<u8>,
    total: usize,
) -> Result<Progress<()>> {
    while v.len() < total {
        if v.len() == v.capacity() {
            let target = next_capacity(v.len(), total);
            v.try_reserve_exact(target - v.len())
                .map_err(|_| Error::Os(Errno::ENOMEM))?;
        }
        match src.read_append(v, total - v.len())? {
            Io::Again => return Ok(Progress::Pending),
            Io::Done(0) => return Err(Error::Protocol(EOF_IN_MESSAGE.into())),
            Io::Done(_) => {}
        }
    }
    Ok(Progress::Ready(()))
}

/// Sends one frame in as many writes as the kernel needs, without copying the payload.
#[derive(Debug, Clone)]
pub struct FrameWriter {
    header: [u8; MAX_HEADER],
    header_len: usize,
    sent: usize,
    total: usize,
}

impl FrameWriter {
    /// A writer for a frame carrying a payload of `len` bytes.
    #[must_use]
    pub fn new(len: usize) -> Self {
        let (header, header_len) = encode_header(len);
        Self {
            header,
            header_len,
            sent: 0,
            total: header_len + len,
        }
    }

    /// Whether every byte has been written.
    #[must_use]
    pub fn is_done(&self) -> bool {
        self.sent >= self.total
    }

    /// The unsent parts of the frame, header first.
    #[must_use]
    pub fn pending<'a>(&'a self, payload: &'a [u8]) -> [IoSlice<'a>; 2] {
        let h = &self.header[self.header_len.min(self.sent)..self.header_len];
        let p = &payload[self.sent.saturating_sub(self.header_len).min(payload.len())..];
        [IoSlice::new(h), IoSlice::new(p)]
    }

    /// Records that `n` more bytes were written.
    pub fn advance(&mut self, n: usize) {
        self.sent = (self.sent + n).min(self.total);
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// An in-memory source delivering `data` in chunks of the given sizes, with `Again` between
    /// chunks, then end of file.
    struct Chunked {
        data: Vec<u8>,
        pos: usize,
        chunks: Vec<usize>,
        next: usize,
        stall: bool,
    }

    impl Chunked {
        fn new(data: Vec<u8>, chunks: Vec<usize>) -> Self {
            Self {
                data,
                pos: 0,
                chunks,
                next: 0,
                stall: false,
            }
        }

        fn limit(&mut self) -> Option<usize> {
            if self.stall {
                self.stall = false;
                return None;
            }
            self.stall = true;
            let c = if self.chunks.is_empty() {
                usize::MAX
            } else {
                self.chunks[self.next % self.chunks.len()].max(1)
            };
            self.next += 1;
            Some(c)
        }
    }

    impl Source for Chunked {
        fn read(&mut self, buf: &mut [u8]) -> Result<Io> {
            let Some(lim) = self.limit() else {
                return Ok(Io::Again);
            };
            let n = buf.len().min(lim).min(self.data.len() - self.pos);
            buf[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
            self.pos += n;
            Ok(Io::Done(n))
        }

        fn read_append(&mut self, v: &mut Vec<u8>, max: usize) -> Result<Io> {
            let Some(lim) = self.limit() else {
                return Ok(Io::Again);
            };
            let n = max
                .min(v.capacity() - v.len())
                .min(lim)
                .min(self.data.len() - self.pos);
            v.extend_from_slice(&self.data[self.pos..self.pos + n]);
            self.pos += n;
            Ok(Io::Done(n))
        }
    }

    fn encode(payload: &[u8]) -> Vec<u8> {
        let (h, n) = encode_header(payload.len());
        let mut out = h[..n].to_vec();
        out.extend_from_slice(payload);
        out
    }

    /// Decodes one frame; `Ok(None)` for an invalid length. Tracks the largest capacity used.
    fn decode_one(src: &mut Chunked, max_cap: &mut usize) -> Result<Option<Vec<u8>>> {
        decode_one_with(src, max_cap, false)
    }

    /// As [`decode_one`]; with `lanes`, a lane frame's header is read and then `Ok(None)`.
    fn decode_one_with(
        src: &mut Chunked,
        max_cap: &mut usize,
        lanes: bool,
    ) -> Result<Option<Vec<u8>>> {
        let mut hr = HeaderReader::new();
        let len = loop {
            if let Progress::Ready(l) = hr.step(src, lanes)? {
                break l;
            }
        };
        let Length::Valid(len) = len else {
            return Ok(None);
        };
        let total = usize::try_from(len).map_err(|_| Error::Os(Errno::ENOMEM))?;
        let mut v = Vec::new();
        loop {
            let r = fill_vec(src, &mut v, total);
            *max_cap = (*max_cap).max(v.capacity());
            if let Progress::Ready(()) = r? {
                return Ok(Some(v));
            }
        }
    }

    #[test]
    fn header_matches_stdlib_struct_pack() {
        assert_eq!(encode_header(0).0[..4], [0, 0, 0, 0]);
        assert_eq!(encode_header(258).0[..4], [0, 0, 1, 2]);
        let (h, n) = encode_header(SHORT_MAX);
        assert_eq!((&h[..n], n), (&[0x7f, 0xff, 0xff, 0xff][..], 4));
        let (h, n) = encode_header(SHORT_MAX + 1);
        assert_eq!(n, 12);
        assert_eq!(h, [0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0, 0x80, 0, 0, 0]);
    }

    #[test]
    fn decode_header_cases() {
        assert_eq!(decode_header(&[], false), Header::Incomplete(4));
        assert_eq!(decode_header(&[0, 0, 0], false), Header::Incomplete(4));
        assert_eq!(decode_header(&[0, 0, 0, 5], false), Header::Len(5));
        assert_eq!(decode_header(&[0xff; 4], false), Header::Incomplete(12));
        assert_eq!(
            decode_header(&[0xff, 0xff, 0xff, 0xfe], false),
            Header::Invalid(-2)
        );
        let mut big = vec![0xff; 4];
        big.extend_from_slice(&(1u64 << 62).to_be_bytes());
        assert_eq!(decode_header(&big, false), Header::Len(1 << 62));
    }

    #[test]
    fn lane_headers_only_where_lanes_are_expected() {
        let h = encode_lane_header(1, 1 << 20);
        assert_eq!(
            decode_header(&h[..4], true),
            Header::Incomplete(LANE_HEADER)
        );
        assert_eq!(
            decode_header(&h[..15], true),
            Header::Incomplete(LANE_HEADER)
        );
        assert_eq!(decode_header(&h, true), Header::Lane(1, 1 << 20));
        assert_eq!(decode_header(&h, false), Header::Invalid(LANE_MARKER));
        // Other headers decode the same either way.
        assert_eq!(decode_header(&[0, 0, 0, 5], true), Header::Len(5));
        assert_eq!(
            decode_header(&[0xff, 0xff, 0xff, 0xfd], true),
            Header::Invalid(-3)
        );
    }

    #[test]
    fn huge_claim_does_not_allocate_claimed_size() {
        let mut data = vec![0xff; 4];
        data.extend_from_slice(&(1u64 << 62).to_be_bytes());
        data.extend_from_slice(&[7u8; 1000]);
        let mut src = Chunked::new(data, vec![100]);
        let mut cap = 0;
        let err = decode_one(&mut src, &mut cap).unwrap_err();
        assert_eq!(err, Error::Protocol(EOF_IN_MESSAGE.into()));
        assert!(cap <= FIRST_CHUNK, "capacity {cap}");
    }

    #[test]
    fn writer_splits_header_and_payload() {
        let payload = b"hello";
        let mut w = FrameWriter::new(payload.len());
        let [h, p] = w.pending(payload);
        assert_eq!((&*h, &*p), (&[0, 0, 0, 5][..], &b"hello"[..]));
        w.advance(2);
        let [h, p] = w.pending(payload);
        assert_eq!((&*h, &*p), (&[0, 5][..], &b"hello"[..]));
        w.advance(3);
        let [h, p] = w.pending(payload);
        assert_eq!((&*h, &*p), (&[][..], &b"ello"[..]));
        w.advance(4);
        assert!(w.is_done());
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        /// Any sequence of frames, delivered in any chunking, decodes back to itself.
        #[test]
        fn roundtrip_any_chunking(
            payloads in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..300), 0..8),
            chunks in prop::collection::vec(1usize..40, 0..6),
        ) {
            let mut data = Vec::new();
            for p in &payloads {
                data.extend(encode(p));
            }
            let mut src = Chunked::new(data, chunks);
            let mut cap = 0;
            for p in &payloads {
                let got = decode_one(&mut src, &mut cap).unwrap();
                prop_assert_eq!(got.as_deref(), Some(&p[..]));
            }
            prop_assert_eq!(decode_one(&mut src, &mut cap), Err(Error::Eof));
        }

        /// Arbitrary bytes never panic, and the buffer never outgrows twice the bytes that
        /// exist (or the first chunk); also where lane frames are expected (a lane header is
        /// read whole or reported cut, never more).
        #[test]
        fn garbage_is_an_error_not_a_crash(
            data in prop::collection::vec(any::<u8>(), 0..2000),
            chunks in prop::collection::vec(1usize..64, 0..6),
            lanes in any::<bool>(),
        ) {
            let n = data.len();
            let mut src = Chunked::new(data, chunks);
            let mut cap = 0;
            while let Ok(Some(_)) = decode_one_with(&mut src, &mut cap, lanes) {}
            prop_assert!(cap <= FIRST_CHUNK.max(2 * n), "capacity {} for {} bytes", cap, n);
        }

        /// Truncating a valid frame anywhere gives EOF (at a boundary) or the mid-message error.
        #[test]
        fn truncation_is_reported(payload in prop::collection::vec(any::<u8>(), 1..500), cut in 0usize..504) {
            let mut data = encode(&payload);
            let cut = cut.min(data.len() - 1);
            data.truncate(cut);
            let mut src = Chunked::new(data, vec![7]);
            let mut cap = 0;
            let err = decode_one(&mut src, &mut cap).unwrap_err();
            if cut == 0 {
                prop_assert_eq!(err, Error::Eof);
            } else {
                prop_assert_eq!(err, Error::Protocol(EOF_IN_MESSAGE.into()));
            }
        }
    }
}
