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
//! them out, which for a 64 MiB buffer nearly doubles the writer's time (and for a stream of
//! 1 MiB messages, where the writer runs ahead of its reader by a few dozen messages, four
//! spares made every tenth message take ten times as long on each side). When the slots are full, or
//! keeping a freed blob would take the spares past [`SPARE_BYTES`], a freed blob larger than
//! the smallest spare replaces it (which is punched); otherwise it is punched itself. Spares
//! are at most [`SPARE_MAX`] bytes each, and an idle queue holds at most about `SPARE_BYTES`
//! of them (racing frees may overshoot by a blob each), until its memfd is closed.
//!
//! A reused blob is copied to and from through a mapping of it that each process keeps (see
//! [`BlobMaps`]) rather than with `pwrite`/`pread`: the kernel's copy looks up and locks each
//! page of the file in turn, which makes it about three times slower than a plain `memcpy`
//! between mapped pages (on this project's test machine, 1 MiB: ~70 us against ~22 us). A blob
//! written once is copied positionally: mapping it would cost more than the copy saves (an
//! `mmap` and `munmap` per message), and its pages do not exist yet.
//!
//! A large writable blob may stay taken after it is read: its reader maps it as the received
//! object's memory and frees it when that object is dropped (see `lease.rs`).
//!
//! A blob whose message is never published (its writer died or gave up) or never freed (its
//! reader died) keeps its memory until the queue's memfd is closed by every process, like the
//! rest of the queue: nothing outlives the queue.

use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{RingBuffer, PAGE};
use crate::channel::pybuf::Unfilled;
use crate::error::{Error, Result};
use crate::sys::memfile;
use crate::sys::shm::{self, Mapping};

/// File offset of the blob area: far above anything the overflow log reaches in practice
/// (4 PiB), far below the largest file offset (2^63).
pub const BLOB_BASE: u64 = 1 << 52;

/// Largest freed blob kept for reuse.
pub(crate) const SPARE_MAX: u64 = 128 << 20;

/// How many freed blobs are kept for reuse.
pub(crate) const SPARES: usize = 64;

/// Most bytes the kept blobs may hold together.
pub(crate) const SPARE_BYTES: u64 = 2 * SPARE_MAX;

/// Blobs, or bytes of blobs, in flight from which a writer that finds no spare waits for one
/// while readers are at work, rather than allocating a fresh blob (two blobs in flight at
/// least, so the writer can fill one while a reader empties the other: pacing 64 MiB arrays
/// one at a time made a stream of them 10% slower).
pub(crate) const PACE: u32 = 32;
pub(crate) const PACE_BYTES: u64 = 96 << 20;

/// Longest such wait per blob: a base, plus a millisecond per 2 MiB the reader may still be
/// copying out.
const PACE_WAIT: Duration = Duration::from_millis(10);

fn pace_wait(need: u64) -> Duration {
    PACE_WAIT + Duration::from_millis(need >> 21)
}

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

/// A blob just reserved: where it lies, and whether it is a spare (its pages exist, and it
/// was written before).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Blob {
    /// Position in the blob area.
    pub at: u64,
    /// Taken from the spares.
    pub reused: bool,
}

/// Most blob mappings a process keeps per queue, and most reused blob positions it remembers
/// having copied without one. A kept mapping costs only address space (the pages are the
/// file's).
const MAPS: usize = 64;

/// Reused blobs this large are mapped the first time they are met: for them, making the
/// mapping costs about what one copy saves (64 MiB: 7.8 ms to map and unmap, 13 ms to copy
/// positionally against 6 through a mapping), so even a cycle of two pays.
const MAP_AT_ONCE: usize = 8 << 20;

/// This process's mappings of reused blobs (most recently used last), and the positions of
/// reused blobs it copied positionally (oldest first).
///
/// Making a mapping (and later unmapping it) costs about twice a positional copy of 1 MiB, so
/// it pays only for a blob that comes back while its mapping is still kept. A writer that
/// runs ahead of its reader cycles through the blobs in flight and the spares (a few dozen in
/// the 1 MiB benchmark): a cycle up to [`MAPS`] long is mapped from its second round on and
/// then always found, while a longer one (a queue filled far ahead of its reader) would miss
/// every time, so a blob is mapped only when its position is met again within the last `MAPS`
/// reused blobs copied positionally (blobs of [`MAP_AT_ONCE`] bytes or more are mapped at
/// once). A blob position is never handed out twice except as a
/// spare, so a kept mapping of a blob that was punched since is merely stale (its pages are
/// gone, it holds no memory) and is dropped when newer ones push it out.
///
/// Only `try_lock` is used: a thread that finds the lists busy (or left locked by a thread of
/// the parent that was mid-update when this process was forked) copies positionally instead.
#[derive(Debug, Default)]
pub(crate) struct BlobMaps(pub(super) Mutex<MapLists>);

/// See [`BlobMaps`].
#[derive(Debug, Default)]
pub(crate) struct MapLists {
    pub(super) maps: Vec<(u64, Arc<Mapping>)>,
    seen: std::collections::VecDeque<u64>,
}

impl RingBuffer {
    /// Reserves a page-aligned blob of `len` bytes. Takes a spare blob when one is large
    /// enough (punching the pages beyond `len`).
    ///
    /// With [`PACE`] blobs or [`PACE_BYTES`] or more in flight and readers at work (see
    /// `reader_active`), a writer that finds no spare waits up to [`pace_wait`] for a reader to
    /// free one: a writer
    /// that keeps running ahead of its reader would otherwise make every blob a fresh one
    /// (its pages allocated, and punched when read) and cycle through more blobs than the
    /// mappings kept for copying. Readers that pause, or a queue filled before anyone reads,
    /// do not slow writers down. Call without the GIL.
    ///
    /// # Errors
    /// `Error::Protocol` if the blob area is exhausted (after 2^62 bytes); futex misuse errors.
    pub fn blob_alloc(&self, len: usize) -> Result<Blob> {
        let need = span(len);
        let b = &self.shared().b;
        let mut deadline = None;
        let blob = loop {
            let seen = self.shared().r.space_seq.load(Ordering::SeqCst);
            if let Some(at) = self.take_spare(need) {
                break Blob { at, reused: true };
            }
            let count = b.in_flight.load(Ordering::Relaxed);
            let pace = need <= SPARE_MAX
                && count >= 2
                && (count >= PACE || b.in_flight_bytes.load(Ordering::Relaxed) >= PACE_BYTES)
                && self.reader_active();
            let now = Instant::now();
            let until = *deadline.get_or_insert(now + pace_wait(need));
            if !pace || now >= until {
                let at = self.shared().w.blob_w.fetch_add(need, Ordering::Relaxed);
                if at > (1 << 62) {
                    return Err(Error::Protocol("queue blob area exhausted".to_owned()));
                }
                break Blob { at, reused: false };
            }
            self.wait_space(seen, until - now)?;
        };
        b.in_flight.fetch_add(1, Ordering::Relaxed);
        b.in_flight_bytes.fetch_add(need, Ordering::Relaxed);
        Ok(blob)
    }

    /// Takes a spare of at least `need` bytes, trimmed to `need`; returns its position.
    fn take_spare(&self, need: u64) -> Option<u64> {
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
                return Some(at);
            }
        }
        None
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

    /// Writes `parts` (concatenated) into `blob`.
    ///
    /// # Errors
    /// The `pwritev` errno (ENOSPC, ENOMEM).
    pub fn blob_write(&self, blob: Blob, parts: &[&[u8]]) -> Result<()> {
        let len = parts.iter().map(|p| p.len()).sum();
        if let Some(map) = blob.reused.then(|| self.blob_map(blob.at, len)).flatten() {
            let mut dest = map.as_ptr().wrapping_add(DATA_SHIFT as usize);
            for part in parts {
                // SAFETY: `blob_map` checked that the mapping holds DATA_SHIFT + len bytes, all
                // within the file; the parts add up to len, so each copy stays inside it. The
                // blob is this writer's alone until its message is published (readers only
                // learn its position then), so nothing else touches these bytes meanwhile;
                // the source is a live slice that cannot overlap a fresh mapping.
                unsafe { std::ptr::copy_nonoverlapping(part.as_ptr(), dest, part.len()) };
                dest = dest.wrapping_add(part.len());
            }
            return Ok(());
        }
        memfile::write_all_at(self.fd.as_fd(), parts, Self::blob_offset(blob.at))
    }

    /// Reads `buf.len()` bytes of `blob`.
    ///
    /// # Errors
    /// The `preadv` errno.
    pub fn blob_read(&self, blob: Blob, buf: &mut [u8]) -> Result<()> {
        if let Some(src) = self.blob_source(blob, buf.len()) {
            // SAFETY: `blob_source` returns a mapping holding `buf.len()` bytes from its
            // pointer, within the file; the message naming the blob was published before this
            // read and the blob is freed only after it, so no one writes them meanwhile.
            unsafe { std::ptr::copy_nonoverlapping(src.1, buf.as_mut_ptr(), buf.len()) };
            return Ok(());
        }
        memfile::read_exact_at(self.fd.as_fd(), buf, Self::blob_offset(blob.at))
    }

    /// Fills `dest` (a new Python buffer) from `blob`.
    ///
    /// # Errors
    /// The `pread` errno.
    pub fn blob_read_into(&self, blob: Blob, dest: &mut Unfilled) -> Result<()> {
        if let Some((_map, src)) = self.blob_source(blob, dest.len()) {
            // SAFETY: as in `blob_read`: `dest.len()` bytes from `src` are mapped, in the file,
            // and unchanging until the blob is freed after this call; `_map` keeps them mapped.
            unsafe { dest.fill_from_memory(src) };
            return Ok(());
        }
        dest.fill_from(self.fd.as_fd(), Self::blob_offset(blob.at))
    }

    /// The mapping of a reused blob and the address of its bytes, if it can be had.
    fn blob_source(&self, blob: Blob, len: usize) -> Option<(Arc<Mapping>, *const u8)> {
        let map = blob.reused.then(|| self.blob_map(blob.at, len)).flatten()?;
        let src = map.as_ptr().wrapping_add(DATA_SHIFT as usize).cast_const();
        Some((map, src))
    }

    /// This process's mapping of the blob at `at` holding `len` bytes: a kept one, or a new
    /// one (kept). `None` when the blob is too large to be a spare, the list is busy, the
    /// file does not reach the blob's end (a corrupted message), or mapping fails: the caller
    /// then copies positionally.
    fn blob_map(&self, at: u64, len: usize) -> Option<Arc<Mapping>> {
        let need = span(len);
        if need > SPARE_MAX {
            return None;
        }
        let need = usize::try_from(need).ok()?;
        let mut lists = self.maps.0.try_lock().ok()?;
        let MapLists { maps, seen } = &mut *lists;
        if let Some(i) = maps.iter().position(|(a, m)| *a == at && m.len() >= need) {
            let entry = maps.remove(i);
            let map = Arc::clone(&entry.1);
            maps.push(entry);
            return Some(map);
        }
        if let Some(i) = seen.iter().position(|&a| a == at) {
            seen.remove(i);
        } else if len < MAP_AT_ONCE {
            if seen.len() >= MAPS {
                seen.pop_front();
            }
            seen.push_back(at);
            return None;
        }
        // Pages wholly past the end of the file would fault with SIGBUS; the end never moves
        // back, so a mapping checked once stays safe for whatever fits in it.
        let end = Self::blob_offset(at).checked_add(len as u64)?;
        let size = shm::size(self.fd.as_fd()).ok()? as u64;
        if end > size {
            return None;
        }
        let map = Arc::new(Mapping::range(&self.fd, BLOB_BASE + at, need, true).ok()?);
        maps.retain(|(a, _)| *a != at);
        if maps.len() >= MAPS {
            maps.remove(0);
        }
        maps.push((at, Arc::clone(&map)));
        Some(map)
    }

    /// Frees the blob of `len` bytes at `at`: keeps it as a spare, or punches its memory out
    /// (best effort).
    pub fn blob_free(&self, at: u64, len: usize) {
        self.blob_taken(len);
        self.blob_release(at, len);
    }

    /// Counts the blob of `len` bytes as no longer in flight: its reader has it (and frees it
    /// later with [`RingBuffer::blob_release`]), so writers no longer wait for it.
    pub fn blob_taken(&self, len: usize) {
        let b = &self.shared().b;
        let _ = b
            .in_flight
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
        let _ = b
            .in_flight_bytes
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                Some(n.saturating_sub(span(len)))
            });
    }

    /// Frees a blob already counted as taken: keeps it as a spare, or punches it out.
    pub fn blob_release(&self, at: u64, len: usize) {
        self.release(at, span(len));
    }

    /// A shared mapping of exactly the blob of `len` bytes at `at` (its bytes start
    /// [`DATA_SHIFT`] into it) for a reader to hand out as is: this process's kept mapping of
    /// it, taken out of the list (so no writer copies through it while the reader holds it),
    /// or a new one with every page mapped. `None` when the file does not reach the blob's end
    /// (a corrupted message) or mapping fails. (A kept mapping longer than the blob, made when
    /// a larger message had it, would reach into the next blob: it is not taken.)
    pub(crate) fn blob_lease_map(&self, at: u64, len: usize) -> Option<Arc<Mapping>> {
        let need = usize::try_from(span(len)).ok()?;
        if let Ok(mut lists) = self.maps.0.try_lock() {
            if let Some(i) = lists
                .maps
                .iter()
                .position(|(a, m)| *a == at && m.len() == need)
            {
                return Some(lists.maps.remove(i).1);
            }
        }
        let end = Self::blob_offset(at).checked_add(len as u64)?;
        if end > shm::size(self.fd.as_fd()).ok()? as u64 {
            return None;
        }
        Mapping::range(&self.fd, BLOB_BASE + at, need, true)
            .ok()
            .map(Arc::new)
    }

    /// Gives back a mapping of the blob at `at` that [`RingBuffer::blob_lease_map`] handed
    /// out and that is still shared: kept for copying the blob when it comes back as a spare.
    pub(crate) fn blob_keep_map(&self, at: u64, map: Arc<Mapping>) {
        if map.len() as u64 > SPARE_MAX {
            return;
        }
        let Ok(mut lists) = self.maps.0.try_lock() else {
            return;
        };
        let maps = &mut lists.maps;
        maps.retain(|(a, _)| *a != at);
        if maps.len() >= MAPS {
            maps.remove(0);
        }
        maps.push((at, map));
    }

    /// Offers the blob `[at, at + span)` as a spare: it takes an empty slot if the spares'
    /// bytes allow, or replaces the smallest spare if that is smaller (punching it); otherwise
    /// it is punched itself.
    fn release(&self, at: u64, span: u64) {
        let Some(word) = pack_spare(at, span) else {
            return self.punch(at, span);
        };
        let slots = &self.shared().b.spares;
        loop {
            let mut empty = None;
            let mut smallest: Option<(&AtomicU64, u64)> = None;
            let mut total = 0;
            for slot in slots {
                let current = slot.load(Ordering::Acquire);
                if current == 0 {
                    empty = empty.or(Some(slot));
                    continue;
                }
                total += unpack_spare(current).1;
                if smallest.map_or(true, |(_, w)| unpack_spare(current).1 < unpack_spare(w).1) {
                    smallest = Some((slot, current));
                }
            }
            if let Some(slot) = empty.filter(|_| total + span <= SPARE_BYTES) {
                if slot
                    .compare_exchange(0, word, Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok()
                {
                    return self.free_space_signal();
                }
                continue; // taken under us: look again
            }
            match smallest {
                Some((slot, current))
                    if unpack_spare(current).1 < span
                        && total - unpack_spare(current).1 + span <= SPARE_BYTES =>
                {
                    if slot
                        .compare_exchange(current, word, Ordering::AcqRel, Ordering::Relaxed)
                        .is_ok()
                    {
                        let (old_at, old_span) = unpack_spare(current);
                        self.punch(old_at, old_span);
                        return self.free_space_signal();
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
