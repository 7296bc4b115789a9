//! The blob area of a ring's memfd: page-aligned space for large out-of-band buffers, far
//! beyond the data area and the overflow log, written and read positionally and freed by
//! punching a hole.
//!
//! Space is handed out by an atomic bump of `blob_w`, so writers allocate without the writer
//! lock; offsets only grow (the file is sparse; only unfreed blobs hold memory). A blob whose
//! message is never published (its writer died or gave up) or never freed (its reader died)
//! keeps its memory until the queue's memfd is closed by every process, like the rest of the
//! queue: nothing outlives the queue.

use std::os::fd::AsFd;
use std::sync::atomic::Ordering;

use super::{RingBuffer, PAGE};
use crate::error::{Error, Result};
use crate::sys::memfile;

/// File offset of the blob area: far above anything the overflow log reaches in practice
/// (4 PiB), far below the largest file offset (2^63).
pub const BLOB_BASE: u64 = 1 << 52;

/// `len` rounded up to whole pages.
fn span(len: usize) -> u64 {
    (len as u64).next_multiple_of(PAGE)
}

impl RingBuffer {
    /// Reserves a page-aligned blob of `len` bytes; returns its position in the blob area.
    ///
    /// # Errors
    /// `Error::Protocol` if the blob area is exhausted (after 2^62 bytes).
    pub fn blob_alloc(&self, len: usize) -> Result<u64> {
        let at = self
            .shared()
            .w
            .blob_w
            .fetch_add(span(len), Ordering::Relaxed);
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

    /// File offset of the blob at `at`.
    #[must_use]
    pub fn blob_offset(at: u64) -> u64 {
        BLOB_BASE + at
    }

    /// Writes `parts` (concatenated) into the blob at `at`, then zeros up to the next page
    /// boundary, so that the file covers the whole pages a reader maps.
    ///
    /// # Errors
    /// The `pwritev` errno (ENOSPC, ENOMEM).
    pub fn blob_write(&self, at: u64, parts: &[&[u8]]) -> Result<()> {
        static ZEROS: [u8; PAGE as usize] = [0; PAGE as usize];
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let pad = (span(len) - len as u64) as usize;
        let mut all = parts.to_vec();
        all.push(&ZEROS[..pad]);
        memfile::write_all_at(self.fd.as_fd(), &all, Self::blob_offset(at))
    }

    /// Reads `buf.len()` bytes of the blob at `at`.
    ///
    /// # Errors
    /// The `preadv` errno.
    pub fn blob_read(&self, at: u64, buf: &mut [u8]) -> Result<()> {
        memfile::read_exact_at(self.fd.as_fd(), buf, Self::blob_offset(at))
    }

    /// Frees the memory of the blob of `len` bytes at `at` (best effort).
    pub fn blob_free(&self, at: u64, len: usize) {
        memfile::punch_hole(self.fd.as_fd(), Self::blob_offset(at), span(len));
    }
}
