//! The blob area of a ring's memfd: page-aligned space for large out-of-band buffers, far
//! beyond the data area and the overflow log, written and read positionally and freed by
//! punching a hole.
//!
//! A blob's bytes start [`DATA_SHIFT`] bytes into its first page. The kernel copies a file
//! page by page, so source and destination keep the distance they have within a page; where
//! the destination lies 8 to 24 bytes past the source (mod 4096) the copy runs 3-4x slower
//! (on this project's AMD EPYC test machine: loads alias the stores just made, "4K
//! aliasing"). Large Python buffers sit 16 (`bytearray`, numpy) or 48 (`bytes`) bytes into a
//! page, which is just that distance from a page-aligned source; half a page away they are
//! far from it on both sides, for the writer's copy in as for the reader's copy out.
//!
//! Space is handed out by an atomic bump of `blob_w`, so writers allocate without the writer
//! lock; offsets only grow (the file is sparse; only unfreed blobs hold memory).
//!
//! Up to [`SPARES`] freed blobs are kept, whole, in spare slots instead of being punched out,
//! and an allocation takes one that is large enough: writing into pages the file already has
//! costs a copy, while fresh pages also cost allocating (and zeroing) them and later punching
//! them out, which for a 64 MiB buffer nearly doubles the writer's time. A writer that runs
//! a few messages ahead of its reader still finds freed blobs. When the slots are full, a
//! freed blob larger than the smallest spare replaces it (which is punched); otherwise it is
//! punched itself. Spares are at most [`SPARE_MAX`] bytes each, so an idle queue holds at
//! most `SPARES * SPARE_MAX` bytes of them, until its memfd is closed.
//!
//! A blob whose message is never published (its writer died or gave up) or never freed (its
//! reader died) keeps its memory until the queue's memfd is closed by every process, like the
//! rest of the queue: nothing outlives the queue.

use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU64, Ordering};

use super::{RingBuffer, PAGE};
use crate::channel::pybuf::Unfilled;
use crate::error::{Error, Result};
use crate::sys::memfile;

/// File offset of the blob area: far above anything the overflow log reaches in practice
/// (4 PiB), far below the largest file offset (2^63).
pub const BLOB_BASE: u64 = 1 << 52;

/// Largest freed blob kept for reuse.
pub(crate) const SPARE_MAX: u64 = 128 << 20;

/// How many freed blobs are kept for reuse.
pub(crate) const SPARES: usize = 4;

/// Bits of the spare word that hold the page count (the page index is above them).
const SPARE_PAGE_BITS: u32 = 24;

/// The spare word for the blob at `at` spanning `span` bytes, or `None` if it cannot be kept.
fn pack_spare(at: u64, span: u64) -> Option<u64> {
    let pages = span / PAGE;
    let first = at / PAGE;
    (pages > 0 && span <= SPARE_MAX && first < 1 << (64 - SPARE_PAGE_BITS))
        .then_some(first << SPARE_PAGE_BITS | pages)
}

/// `(at, span)` of a spare word.
fn unpack_spare(word: u64) -> (u64, u64) {
    (
        (word >> SPARE_PAGE_BITS) * PAGE,
        (word & ((1 << SPARE_PAGE_BITS) - 1)) * PAGE,
    )
}

/// Where a blob's bytes start in its first page (see the module documentation).
pub(crate) const DATA_SHIFT: u64 = 2048;

/// The whole pages a blob of `len` bytes spans.
fn span(len: usize) -> u64 {
    (DATA_SHIFT + len as u64).next_multiple_of(PAGE)
}

impl RingBuffer {
    /// Reserves a page-aligned blob of `len` bytes; returns its position in the blob area.
    /// Takes a spare blob when one is large enough (punching the pages beyond `len`).
    ///
    /// # Errors
    /// `Error::Protocol` if the blob area is exhausted (after 2^62 bytes).
    pub fn blob_alloc(&self, len: usize) -> Result<u64> {
        let need = span(len);
        for slot in &self.shared().b.spares {
            let word = slot.load(Ordering::Acquire);
            if word == 0 || unpack_spare(word).1 < need {
                continue;
            }
            if slot
                .compare_exchange(word, 0, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                let (at, have) = unpack_spare(word);
                if have > need {
                    self.punch(at + need, have - need);
                }
                return Ok(at);
            }
        }
        let at = self.shared().w.blob_w.fetch_add(need, Ordering::Relaxed);
        if at > (1 << 62) {
            return Err(Error::Protocol("queue blob area exhausted".to_owned()));
        }
        Ok(at)
    }

    /// Whether this process can use blobs: their offsets lie beyond any finite
    /// `RLIMIT_FSIZE`, so a process with such a limit keeps large buffers in the ring.
    #[must_use]
    pub fn blobs_usable(&self) -> bool {
        static USABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *USABLE.get_or_init(memfile::file_size_unlimited)
    }

    /// File offset of the bytes of the blob at `at`.
    #[must_use]
    pub fn blob_offset(at: u64) -> u64 {
        BLOB_BASE + at + DATA_SHIFT
    }

    /// Writes `parts` (concatenated) into the blob at `at`.
    ///
    /// # Errors
    /// The `pwritev` errno (ENOSPC, ENOMEM).
    pub fn blob_write(&self, at: u64, parts: &[&[u8]]) -> Result<()> {
        memfile::write_all_at(self.fd.as_fd(), parts, Self::blob_offset(at))
    }

    /// Reads `buf.len()` bytes of the blob at `at`.
    ///
    /// # Errors
    /// The `preadv` errno.
    pub fn blob_read(&self, at: u64, buf: &mut [u8]) -> Result<()> {
        memfile::read_exact_at(self.fd.as_fd(), buf, Self::blob_offset(at))
    }

    /// Fills `dest` (a new Python buffer) from the blob at `at`.
    ///
    /// # Errors
    /// The `pread` errno.
    pub fn blob_read_into(&self, at: u64, dest: &mut Unfilled) -> Result<()> {
        dest.fill_from(self.fd.as_fd(), Self::blob_offset(at))
    }

    /// Frees the blob of `len` bytes at `at`: keeps it as a spare, or punches its memory out
    /// (best effort).
    pub fn blob_free(&self, at: u64, len: usize) {
        self.release(at, span(len));
    }

    /// Offers the blob `[at, at + span)` as a spare: it takes an empty slot, or replaces the
    /// smallest spare if that is smaller (punching it); otherwise it is punched itself.
    fn release(&self, at: u64, span: u64) {
        let Some(word) = pack_spare(at, span) else {
            return self.punch(at, span);
        };
        let slots = &self.shared().b.spares;
        loop {
            let mut smallest: Option<(&AtomicU64, u64)> = None;
            for slot in slots {
                let current = slot.load(Ordering::Acquire);
                if current == 0 {
                    if slot
                        .compare_exchange(0, word, Ordering::AcqRel, Ordering::Relaxed)
                        .is_ok()
                    {
                        return;
                    }
                    continue;
                }
                if smallest.map_or(true, |(_, w)| unpack_spare(current).1 < unpack_spare(w).1) {
                    smallest = Some((slot, current));
                }
            }
            match smallest {
                Some((slot, current)) if unpack_spare(current).1 < span => {
                    if slot
                        .compare_exchange(current, word, Ordering::AcqRel, Ordering::Relaxed)
                        .is_ok()
                    {
                        let (old_at, old_span) = unpack_spare(current);
                        return self.punch(old_at, old_span);
                    }
                    // The slot changed under us: look again.
                }
                _ => return self.punch(at, span),
            }
        }
    }

    fn punch(&self, at: u64, span: u64) {
        memfile::punch_hole(self.fd.as_fd(), BLOB_BASE + at, span);
    }
}
