//! `#[repr(C)]` layouts placed in shared memory, and the header that starts every segment.

use std::mem::{align_of, size_of};

/// "FERROSHM" read as a little-endian u64: marks a ferroproc segment.
pub const MAGIC: u64 = u64::from_le_bytes(*b"FERROSHM");
/// Bumped whenever any shared layout changes incompatibly.
pub const VERSION: u32 = 1;
/// Where the payload starts: one cache line after the base, so the header never shares a line
/// with hot words.
pub const PAYLOAD_OFFSET: usize = 64;

/// The first bytes of every segment. Written once by the creator before the segment is shared
/// (the descriptor travels through the kernel afterwards, which orders the writes before any
/// reader), and only read afterwards.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// [`MAGIC`].
    pub magic: u64,
    /// [`VERSION`].
    pub version: u32,
    /// Which payload layout follows ([`SharedLayout::KIND`]).
    pub kind: u32,
    /// Total segment size in bytes (must equal the file size).
    pub size: u64,
    /// `size_of::<usize>()` of the creator.
    pub ptr_width: u32,
    /// [`PAYLOAD_OFFSET`].
    pub payload_offset: u32,
}

const _: () = assert!(size_of::<Header>() == 32);
const _: () = assert!(align_of::<Header>() == 8);
const _: () = assert!(size_of::<Header>() <= PAYLOAD_OFFSET);

impl Header {
    /// The header a new segment of `size` bytes holding a `T` gets.
    #[must_use]
    pub fn new<T: SharedLayout>(size: usize) -> Self {
        Self {
            magic: MAGIC,
            version: VERSION,
            kind: T::KIND,
            size: size as u64,
            ptr_width: size_of::<usize>() as u32,
            payload_offset: PAYLOAD_OFFSET as u32,
        }
    }

    /// Checks that a segment of `file_size` bytes with this header holds a `T` we can use.
    ///
    /// # Errors
    /// A message naming the first mismatch.
    pub fn validate<T: SharedLayout>(&self, file_size: usize) -> Result<(), String> {
        let expected = Self::new::<T>(file_size);
        if self.magic != MAGIC {
            return Err(format!("not a ferroproc segment (magic {:#x})", self.magic));
        }
        if self.version != VERSION {
            return Err(format!(
                "segment layout version {} (expected {VERSION})",
                self.version
            ));
        }
        if self.ptr_width != expected.ptr_width || self.payload_offset != expected.payload_offset {
            return Err("segment created by an incompatible build".to_owned());
        }
        if self.kind != T::KIND {
            return Err(format!(
                "segment holds kind {} (expected {})",
                self.kind,
                T::KIND
            ));
        }
        if self.size != file_size as u64 || file_size < segment_size::<T>() {
            return Err(format!(
                "segment size {} does not match its file ({file_size})",
                self.size
            ));
        }
        Ok(())
    }
}

/// The size of a segment holding one `T`.
#[must_use]
pub const fn segment_size<T: SharedLayout>() -> usize {
    let raw = PAYLOAD_OFFSET + size_of::<T>();
    raw.div_ceil(64) * 64
}

/// A type that can live in a shared segment.
///
/// # Safety
/// Implementors must be `#[repr(C)]`, contain only atomics and plain integers (no pointers, no
/// `Drop`, no Rust-layout types), have alignment ≤ 64, and treat all-zero bytes as a valid
/// value: a new segment starts zeroed and is viewed as `&Self` from then on, by several
/// processes at once.
pub unsafe trait SharedLayout: Sync {
    /// A distinct tag per layout, stored in the header and checked on attach.
    const KIND: u32;
}
