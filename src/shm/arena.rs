//! [`Chunk`]: one memfd mapping that an allocator in Python carves into `Value`/`Array` blocks,
//! plus lock-free atomic operations on integers inside it (the atomic-`Value` extension).
//!
//! A chunk starts with the usual [`Header`] (kind [`ArenaPayload::KIND`]); blocks live in the
//! payload, addressed by their offset from the payload start. The chunk knows nothing about
//! which blocks are in use: that bookkeeping is per process (as the stdlib's heap) and lives in
//! `ferroproc.heap`.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicI16, AtomicI32, AtomicI64, AtomicI8, Ordering};

use super::layout::{segment_size, Header, SharedLayout, PAYLOAD_OFFSET};
use crate::error::{Error, Result};
use crate::sys::shm::{self, Mapping};

/// The (empty) fixed part of an arena chunk: everything after the header is user blocks.
#[repr(C)]
#[derive(Debug)]
pub struct ArenaPayload {
    _private: [u8; 0],
}

// SAFETY: repr(C), zero-sized (no bytes at all, so any content is valid), alignment 1.
unsafe impl SharedLayout for ArenaPayload {
    const KIND: u32 = 0x4152_0001;
}

/// An integer width and signedness an atomic operation works on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IntKind {
    /// Bytes: 1, 2, 4 or 8.
    pub width: usize,
    /// Whether values are two's-complement signed (otherwise unsigned).
    pub signed: bool,
}

impl IntKind {
    /// Validates the width.
    ///
    /// # Errors
    /// `Error::Protocol` for a width other than 1, 2, 4 or 8.
    pub fn new(width: usize, signed: bool) -> Result<Self> {
        if matches!(width, 1 | 2 | 4 | 8) {
            Ok(Self { width, signed })
        } else {
            Err(Error::Protocol(format!(
                "atomic operations need an integer of 1, 2, 4 or 8 bytes, not {width}"
            )))
        }
    }

    fn bits(self) -> u32 {
        (self.width * 8) as u32
    }

    /// Reinterprets the low `width` bytes of `raw` as this kind's value.
    #[must_use]
    pub fn decode(self, raw: i64) -> i128 {
        let bits = self.bits();
        if bits == 64 {
            return if self.signed {
                i128::from(raw)
            } else {
                i128::from(raw as u64)
            };
        }
        let mask = (1i64 << bits) - 1;
        let low = raw & mask;
        if self.signed && low >> (bits - 1) != 0 {
            i128::from(low - (1i64 << bits))
        } else {
            i128::from(low)
        }
    }

    /// Wraps `value` into this kind's range (two's complement), as raw bits.
    #[must_use]
    pub fn encode(self, value: i128) -> i64 {
        // Truncation to the low 64 bits, then to `width`, is the wrap-around we want.
        let v = value as i64;
        if self.bits() == 64 {
            v
        } else {
            v & ((1i64 << self.bits()) - 1)
        }
    }

    /// Whether `value` is representable without wrapping.
    #[must_use]
    pub fn fits(self, value: i128) -> bool {
        let bits = self.bits();
        let (lo, hi) = if self.signed {
            (-(1i128 << (bits - 1)), (1i128 << (bits - 1)) - 1)
        } else {
            (0, (1i128 << bits) - 1)
        };
        (lo..=hi).contains(&value)
    }
}

/// One memfd-backed arena chunk. Unmapped and closed on drop.
pub struct Chunk {
    map: Mapping,
    fd: OwnedFd,
}

impl std::fmt::Debug for Chunk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Chunk")
            .field("fd", &self.fd)
            .field("len", &self.map.len())
            .finish()
    }
}

/// Atomic read-modify-write operations, dispatched on width.
#[derive(Debug, Clone, Copy)]
pub enum AtomicOp {
    /// Returns the value.
    Load,
    /// Stores the operand; returns the previous value.
    Swap(i64),
    /// Adds the operand (wrapping); returns the previous value.
    FetchAdd(i64),
    /// Stores `new` if the value equals `expected`; returns the previous value.
    CompareExchange {
        /// The value the caller expects.
        expected: i64,
        /// What to store when it matches.
        new: i64,
    },
}

macro_rules! apply_op {
    ($atomic:ty, $prim:ty, $ptr:expr, $op:expr) => {{
        // SAFETY: the caller (`Chunk::atomic`) checked that `$ptr` lies with its whole width
        // inside our live mapping and is aligned to that width; shared memory is only ever
        // accessed through atomics or through ctypes (plain loads/stores of whole values), and
        // an atomic type has the same size and alignment as its primitive.
        let a = unsafe { &*$ptr.cast::<$atomic>() };
        let old: $prim = match $op {
            AtomicOp::Load => a.load(Ordering::SeqCst),
            AtomicOp::Swap(v) => a.swap(v as $prim, Ordering::SeqCst),
            AtomicOp::FetchAdd(v) => a.fetch_add(v as $prim, Ordering::SeqCst),
            AtomicOp::CompareExchange { expected, new } => {
                match a.compare_exchange(
                    expected as $prim,
                    new as $prim,
                    Ordering::SeqCst,
                    Ordering::SeqCst,
                ) {
                    Ok(v) | Err(v) => v,
                }
            }
        };
        i64::from(old)
    }};
}

impl Chunk {
    /// Creates a zeroed chunk with at least `payload` usable bytes.
    ///
    /// # Errors
    /// The memfd/mmap errno (EMFILE, ENOMEM).
    pub fn create(payload: usize) -> Result<Self> {
        let size = PAYLOAD_OFFSET
            .checked_add(payload)
            .ok_or(Error::Protocol("arena chunk too large".to_owned()))?;
        let fd = shm::create("ferroproc-heap", size)?;
        let map = Mapping::new(&fd, size)?;
        let header = Header::new::<ArenaPayload>(size);
        // SAFETY: the mapping is `size` ≥ 64 bytes, page aligned (so aligned for Header) and not
        // yet visible to any other process or Rust reference.
        unsafe { map.as_ptr().cast::<Header>().write(header) };
        Ok(Self { map, fd })
    }

    /// Maps the chunk behind `fd` (received from another process) after validating its header.
    ///
    /// # Errors
    /// `Error::Protocol` for a descriptor that is not an arena chunk; the fstat/mmap errno.
    pub fn attach(fd: OwnedFd) -> Result<Self> {
        let size = shm::size(fd.as_fd())?;
        if size < segment_size::<ArenaPayload>() {
            return Err(Error::Protocol(format!(
                "arena chunk too small ({size} bytes)"
            )));
        }
        let map = Mapping::new(&fd, size)?;
        // SAFETY: the mapping is ≥ 64 bytes and page aligned; the header is plain integers the
        // creator wrote before sharing the fd (any bit pattern is a valid Header).
        let header = unsafe { map.as_ptr().cast::<Header>().read() };
        header
            .validate::<ArenaPayload>(size)
            .map_err(Error::Protocol)?;
        Ok(Self { map, fd })
    }

    /// Usable bytes after the header.
    #[must_use]
    pub fn payload_len(&self) -> usize {
        self.map.len() - PAYLOAD_OFFSET
    }

    /// The address of payload byte 0 (valid while `self` lives).
    #[must_use]
    pub fn payload_address(&self) -> usize {
        self.map.as_ptr().wrapping_add(PAYLOAD_OFFSET) as usize
    }

    /// The memfd (to hand to a child).
    #[must_use]
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Runs `op` atomically on the integer of `kind` at payload offset `offset`; returns the
    /// previous value (raw bits sign-extended from `width`, see [`IntKind::decode`]).
    ///
    /// # Errors
    /// `Error::Protocol` when the integer is out of the payload or not aligned to its width.
    pub fn atomic(&self, offset: usize, kind: IntKind, op: AtomicOp) -> Result<i64> {
        let end = offset.checked_add(kind.width);
        if end.map_or(true, |e| e > self.payload_len()) {
            return Err(Error::Protocol(format!(
                "integer at offset {offset} lies outside the arena chunk"
            )));
        }
        // PAYLOAD_OFFSET is a multiple of 64 and the base is page aligned, so the address is
        // aligned exactly when the offset is.
        if offset % kind.width != 0 {
            return Err(Error::Protocol(format!(
                "integer at offset {offset} is not aligned to {} bytes",
                kind.width
            )));
        }
        let ptr = self.map.as_ptr().wrapping_add(PAYLOAD_OFFSET + offset);
        Ok(match kind.width {
            1 => apply_op!(AtomicI8, i8, ptr, op),
            2 => apply_op!(AtomicI16, i16, ptr, op),
            4 => apply_op!(AtomicI32, i32, ptr, op),
            _ => apply_op!(AtomicI64, i64, ptr, op),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::fd::dup_cloexec;

    #[test]
    fn attach_shares_memory_and_atomics_wrap() {
        let c = Chunk::create(4096).unwrap();
        let d = Chunk::attach(dup_cloexec(c.fd()).unwrap()).unwrap();
        let k = IntKind::new(1, false).unwrap();
        c.atomic(8, k, AtomicOp::Swap(250)).unwrap();
        let old = d.atomic(8, k, AtomicOp::FetchAdd(10)).unwrap();
        assert_eq!(k.decode(old), 250);
        assert_eq!(k.decode(c.atomic(8, k, AtomicOp::Load).unwrap()), 4);
        let s = IntKind::new(4, true).unwrap();
        let old = c
            .atomic(
                16,
                s,
                AtomicOp::CompareExchange {
                    expected: 0,
                    new: s.encode(-5),
                },
            )
            .unwrap();
        assert_eq!(old, 0);
        assert_eq!(s.decode(d.atomic(16, s, AtomicOp::Load).unwrap()), -5);
    }

    #[test]
    fn rejects_misaligned_and_out_of_range() {
        let c = Chunk::create(64).unwrap();
        let k = IntKind::new(8, true).unwrap();
        assert!(c.atomic(4, k, AtomicOp::Load).is_err());
        assert!(c.atomic(c.payload_len() - 4, k, AtomicOp::Load).is_err());
        assert!(c.atomic(usize::MAX - 2, k, AtomicOp::Load).is_err());
        assert!(IntKind::new(3, true).is_err());
    }

    #[test]
    fn kinds_encode_and_decode() {
        let u16k = IntKind::new(2, false).unwrap();
        assert_eq!(u16k.decode(u16k.encode(70000)), 70000 - 65536);
        assert!(u16k.fits(65535) && !u16k.fits(-1));
        let i64k = IntKind::new(8, true).unwrap();
        assert_eq!(
            i64k.decode(i64k.encode(i128::from(i64::MIN))),
            i128::from(i64::MIN)
        );
        let u64k = IntKind::new(8, false).unwrap();
        assert_eq!(
            u64k.decode(u64k.encode(i128::from(u64::MAX))),
            i128::from(u64::MAX)
        );
    }
}
