//! [`RingBuffer`]: a multi-producer, multi-consumer message ring in anonymous shared memory.
//!
//! # Layout
//! One memfd: the segment [`Header`] (magic, version, kind, size), then [`RingShared`] (locks,
//! counters and futex words, one cache line per side), then `capacity` bytes of data starting
//! at [`DATA_OFFSET`]. Positions are byte counters that only grow (`u64`, never wrap in
//! practice); `pos & (capacity - 1)` is the offset in the data area. Nothing stores an address.
//!
//! # Framing
//! Every frame starts 8-byte aligned with an 8-byte header `kind << 32 | len`, then `len` bytes,
//! padded to 8. A message whose frame fits in a quarter of the ring is one [`WHOLE`] frame. A
//! larger one is *streamed*: a [`START`] frame (with the total length in its first 8 bytes),
//! [`CHUNK`] frames, and an [`END`] frame, written while the writer holds the writer lock and
//! read while the reader holds the reader lock, so the ring never needs to hold it at once.
//!
//! # Overflow log
//! A message that does not fit the free space of the ring is appended to an *overflow log*
//! kept in the same memfd after the mapped part (positional writes at the log base plus
//! `log_w`), so `put` waits only for `maxsize`, never for a reader to make room (as with the
//! stdlib's feeder buffer). While the log holds messages, every new message goes to the log
//! too; readers take from the log only when the ring is empty, so FIFO order holds. Read
//! records are punched out of the file (their memory is freed). A large message is streamed
//! through the ring instead when readers are active and the log is empty. When readers are
//! active (one holds the reader lock, or another process consumed a message in the last few
//! milliseconds), a writer facing a full ring waits for room rather than using the log; after
//! a whole wait slice without progress and no live reader, it moves the message to the log.
//!
//! # Blob area
//! Far beyond the log (at [`BLOB_BASE`]), page-aligned blobs hold large out-of-band buffers of
//! messages; the message names them. See `ring/blob.rs`.
//!
//! # Commit and crash semantics
//! Writers hold `wlock`, readers `rlock` (both [`RobustMutex`]: a dead holder's lock is taken
//! over by the next process that waits for it). A frame becomes visible only when the writer
//! publishes the new `head` (release store) after copying it in, and it is freed only when the
//! reader publishes the new `tail` after copying it out, so:
//! * a writer killed mid-frame publishes nothing: the next writer overwrites the garbage;
//! * a reader killed mid-frame frees nothing: the next reader reads the frame again;
//! * a writer killed (or giving up) mid-stream leaves a partial stream: its reader drops the
//!   pieces when it finds `stream_owner` cleared or dead, or when the next frame is not a
//!   continuation; a reader killed mid-stream takes that message with it, and the next reader
//!   skips the orphan continuation frames.
//!
//! Counters (`committed`, `consumed`) are bumped right after the publishing store; a process
//! killed between the two stores (a window of a few instructions) leaves `qsize` off by one.

use std::mem::size_of;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use crate::error::{Error, Result};
use crate::shm::layout::{segment_size, Header, SharedLayout};
use crate::sync::RobustMutex;
use crate::sys::clock;
use crate::sys::futex::{self, Wake};
use crate::sys::shm::{self, Mapping};

/// Where the data area starts (page aligned).
pub const DATA_OFFSET: usize = 4096;
/// The smallest data area.
pub const MIN_CAPACITY: usize = 256;
/// The largest data area (positions are masked with `capacity - 1`, which must fit a usize).
pub const MAX_CAPACITY: usize = 1 << 30;

/// A complete message in one frame.
pub const WHOLE: u32 = 1;
/// The first frame of a streamed message; its payload starts with the total length (u64).
pub const START: u32 = 2;
/// A middle frame of a streamed message.
pub const CHUNK: u32 = 3;
/// The last frame of a streamed message.
pub const END: u32 = 4;

const FRAME_HEADER: usize = 8;
/// Overflow-log record header: the payload length (u64) and a reserved word.
const LOG_HEADER: usize = 16;
const PAGE: u64 = 4096;
/// How long after the last consumption readers still count as active (see `reader_active`).
const READER_ACTIVE_MS: u64 = 20;
/// Spins on an empty/full ring before sleeping (a running peer usually answers in µs).
const SPIN_TRIES: u32 = 600;

/// Bytes a frame with `len` payload bytes occupies.
#[must_use]
pub const fn frame_len(len: usize) -> usize {
    FRAME_HEADER + len.next_multiple_of(8)
}

/// Encodes a frame header.
#[must_use]
pub const fn encode_header(kind: u32, len: u32) -> u64 {
    ((kind as u64) << 32) | len as u64
}

/// Decodes a frame header into `(kind, len)`.
#[must_use]
pub const fn decode_header(h: u64) -> (u32, u32) {
    ((h >> 32) as u32, h as u32)
}

/// Constant and lock words (written once at creation, then locks only).
#[repr(C, align(64))]
#[derive(Debug, Default)]
pub struct Control {
    /// Data bytes (a power of two).
    pub capacity: AtomicU64,
    /// Message bound (`u32::MAX`: unbounded).
    pub maxsize: AtomicU32,
    /// Bit 0: joinable (count unfinished tasks).
    pub flags: AtomicU32,
    /// Serializes writers.
    pub wlock: RobustMutex,
    /// Serializes readers.
    pub rlock: RobustMutex,
    /// Pid of the writer streaming a message, 0 when none.
    pub stream_owner: AtomicU32,
    /// Non-zero once some process polls the eventfd: writers then signal it.
    pub pollers: AtomicU32,
}

/// Words the writers update.
#[repr(C, align(64))]
#[derive(Debug, Default)]
pub struct WriterSide {
    /// Bytes ever published.
    pub head: AtomicU64,
    /// Messages ever published.
    pub committed: AtomicU32,
    /// Bumped after every published frame; readers sleep on it.
    pub data_seq: AtomicU32,
    /// Readers possibly sleeping on `data_seq` (a hint: skip the wake syscall when zero).
    pub data_waiters: AtomicU32,
    /// Bytes ever appended to the overflow log.
    pub log_w: AtomicU64,
    /// Bytes ever allocated in the blob area (see `ring/blob.rs`).
    pub blob_w: AtomicU64,
}

/// Words the readers update.
#[repr(C, align(64))]
#[derive(Debug, Default)]
pub struct ReaderSide {
    /// Bytes ever freed.
    pub tail: AtomicU64,
    /// Messages ever taken.
    pub consumed: AtomicU32,
    /// Bumped after every freed frame; writers sleep on it.
    pub space_seq: AtomicU32,
    /// Writers possibly sleeping on `space_seq`.
    pub space_waiters: AtomicU32,
    /// Bytes ever taken from the overflow log.
    pub log_r: AtomicU64,
    /// `clock::coarse_ms()` of the last consumption: readers are "active" shortly after.
    pub last_read_ms: AtomicU64,
    /// Pid of the process that made the last consumption.
    pub last_reader: AtomicU32,
}

/// `JoinableQueue` bookkeeping.
#[repr(C, align(64))]
#[derive(Debug, Default)]
pub struct JoinSide {
    /// Messages put and not yet marked done.
    pub unfinished: AtomicU32,
    /// Bumped when `unfinished` reaches zero; `join` sleeps on it.
    pub seq: AtomicU32,
}

/// Freed blobs kept for reuse (see `ring/blob.rs`).
#[repr(C, align(64))]
#[derive(Debug)]
pub struct BlobSide {
    /// Each a freed blob's first page and page count, packed; 0: empty.
    pub spares: [AtomicU64; blob::SPARES],
    /// Blobs allocated and not yet freed (a hint: a process killed in between leaves it high).
    pub in_flight: AtomicU32,
    /// Bytes of those blobs (the same hint).
    pub in_flight_bytes: AtomicU64,
}

impl Default for BlobSide {
    fn default() -> Self {
        Self {
            spares: std::array::from_fn(|_| AtomicU64::new(0)),
            in_flight: AtomicU32::new(0),
            in_flight_bytes: AtomicU64::new(0),
        }
    }
}

/// The shared words of a ring (the data area follows at [`DATA_OFFSET`]).
#[repr(C)]
#[derive(Debug, Default)]
pub struct RingShared {
    /// Constants and locks.
    pub ctl: Control,
    /// Writer side.
    pub w: WriterSide,
    /// Reader side.
    pub r: ReaderSide,
    /// Join side.
    pub j: JoinSide,
    /// Blob reuse.
    pub b: BlobSide,
}

const _: () = assert!(size_of::<RingShared>() == 832);
const _: () = assert!(std::mem::align_of::<RingShared>() == 64);
const _: () = assert!(segment_size::<RingShared>() <= DATA_OFFSET);

// SAFETY: repr(C) of repr(C) structs holding only atomics (RobustMutex is one AtomicU32);
// alignment 64; all-zero is "empty ring, unlocked, no waiters" (capacity is written before the
// segment is shared).
unsafe impl SharedLayout for RingShared {
    const KIND: u32 = 0x10;
}

/// Flag bit in [`Control::flags`]: count unfinished tasks.
pub const FLAG_JOINABLE: u32 = 1;

/// Outcome of one writing step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteStep {
    /// The message is published.
    Done,
    /// Not enough room (bytes, or `maxsize` messages); wait for `space_seq` to leave `seen`.
    Full {
        /// The `space_seq` value observed before deciding.
        seen: u32,
    },
}

/// Where a writer is in its message.
#[derive(Debug, Default, Clone, Copy)]
pub struct WriteState {
    /// Bytes of the message already published.
    pub sent: usize,
    /// Whether a stream was started (frames are out; giving up must [`RingBuffer::abort_stream`]).
    pub streaming: bool,
}

/// Where a reader is in a streamed message.
#[derive(Debug, Default)]
pub struct ReadState {
    partial: Option<(Vec<u8>, usize)>,
}

impl ReadState {
    /// Whether part of a streamed message was consumed.
    #[must_use]
    pub fn in_stream(&self) -> bool {
        self.partial.is_some()
    }
}

/// What [`RingBuffer::peek`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// A complete frame of this many bytes in the ring.
    Whole(usize),
    /// A complete overflow-log record of this many bytes (the ring is empty).
    Log(usize),
    /// A streamed message or orphan pieces: use [`RingBuffer::read_step`].
    Other,
    /// Nothing to read.
    Empty,
}

/// Outcome of one reading step.
#[derive(Debug, PartialEq, Eq)]
pub enum ReadStep {
    /// A complete message.
    Message(Vec<u8>),
    /// Nothing (more) to read now; wait for `data_seq` to leave `seen`.
    Empty {
        /// The `data_seq` value observed before deciding.
        seen: u32,
    },
}

/// A message ring in a memfd mapping. Process-local handle; the shared state is in the mapping.
#[derive(Debug)]
pub struct RingBuffer {
    map: Mapping,
    fd: OwnedFd,
    capacity: usize,
    maps: blob::BlobMaps,
}

impl RingBuffer {
    /// Creates a ring with a data area of `capacity` bytes (rounded up to a power of two,
    /// clamped to [`MIN_CAPACITY`]..=[`MAX_CAPACITY`]) and a bound of `maxsize` messages.
    ///
    /// # Errors
    /// The memfd/mmap errno.
    pub fn create(capacity: usize, maxsize: u32, flags: u32) -> Result<Self> {
        let capacity = capacity
            .clamp(MIN_CAPACITY, MAX_CAPACITY)
            .next_power_of_two();
        let size = DATA_OFFSET + capacity;
        let fd = shm::create("ferroproc-queue", size)?;
        let map = Mapping::new(&fd, size)?;
        // SAFETY: the mapping is `size` > 4096 bytes, page aligned, fresh and not yet visible to
        // any other process or reference, so a plain write of the header cannot race.
        unsafe {
            map.as_ptr()
                .cast::<Header>()
                .write(Header::new::<RingShared>(size))
        };
        let ring = Self {
            map,
            fd,
            capacity,
            maps: blob::BlobMaps::default(),
        };
        let ctl = &ring.shared().ctl;
        ctl.capacity.store(capacity as u64, Ordering::Relaxed);
        ctl.maxsize.store(maxsize, Ordering::Relaxed);
        ctl.flags.store(flags, Ordering::Relaxed);
        Ok(ring)
    }

    /// Maps the ring behind `fd` after validating its header and capacity.
    ///
    /// # Errors
    /// `Error::Protocol` for a descriptor that is not a compatible ring; fstat/mmap errnos.
    pub fn attach(fd: OwnedFd) -> Result<Self> {
        let file_size = shm::size(fd.as_fd())?;
        if file_size < DATA_OFFSET + MIN_CAPACITY {
            return Err(Error::Protocol(format!(
                "queue segment too small ({file_size} bytes)"
            )));
        }
        let first = Mapping::new(&fd, DATA_OFFSET)?;
        // SAFETY: the mapping is 4096 bytes and page aligned; the header is plain integers
        // written once by the creator before the fd was shared (any bit pattern is valid).
        let header = unsafe { first.as_ptr().cast::<Header>().read() };
        drop(first);
        // The file may be longer than the mapped part: the overflow log follows it.
        let size = usize::try_from(header.size).unwrap_or(usize::MAX);
        if size > file_size {
            return Err(Error::Protocol(format!(
                "queue segment size {size} exceeds its file ({file_size})"
            )));
        }
        header
            .validate::<RingShared>(size)
            .map_err(Error::Protocol)?;
        let map = Mapping::new(&fd, size)?;
        let mut ring = Self {
            map,
            fd,
            capacity: 0,
            maps: blob::BlobMaps::default(),
        };
        let cap = usize::try_from(ring.shared().ctl.capacity.load(Ordering::Relaxed)).unwrap_or(0);
        if !cap.is_power_of_two() || cap < MIN_CAPACITY || DATA_OFFSET + cap != size {
            return Err(Error::Protocol(format!(
                "queue segment has a bad capacity ({cap})"
            )));
        }
        ring.capacity = cap;
        Ok(ring)
    }

    /// The shared words.
    #[must_use]
    #[inline]
    pub fn shared(&self) -> &RingShared {
        let p = self.map.as_ptr().wrapping_add(64).cast::<RingShared>();
        // SAFETY: the mapping is ≥ DATA_OFFSET bytes, so [64, 64 + 256) is in range; offset 64
        // of a page-aligned base is 64-aligned; the bytes are a valid RingShared (zeroed at
        // creation, atomics since); the borrow is tied to `self`, which keeps the mapping.
        unsafe { &*p }
    }

    /// The memfd (to hand to a child).
    #[must_use]
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Data bytes.
    #[must_use]
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The message bound.
    #[must_use]
    pub fn maxsize(&self) -> u32 {
        self.shared().ctl.maxsize.load(Ordering::Relaxed)
    }

    /// Whether this is a joinable queue.
    #[must_use]
    pub fn joinable(&self) -> bool {
        self.shared().ctl.flags.load(Ordering::Relaxed) & FLAG_JOINABLE != 0
    }

    /// Messages published and not yet taken (never negative).
    #[must_use]
    pub fn len(&self) -> u32 {
        let sh = self.shared();
        let c = sh.w.committed.load(Ordering::SeqCst);
        let t = sh.r.consumed.load(Ordering::SeqCst);
        let d = c.wrapping_sub(t);
        if d > u32::MAX / 2 {
            0
        } else {
            d
        }
    }

    /// Whether no frame is waiting (a streamed message in progress counts as data).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        let sh = self.shared();
        sh.w.head.load(Ordering::Acquire) == sh.r.tail.load(Ordering::Acquire)
            && sh.w.log_w.load(Ordering::Acquire) == sh.r.log_r.load(Ordering::Acquire)
    }

    /// What the next read would find, for readers that copy straight into their own buffer
    /// (reader lock held). Streams and orphan pieces are left to [`Self::read_step`].
    ///
    /// # Errors
    /// `Error::Protocol` for a corrupted log record; the log read errno.
    pub fn peek(&self) -> Result<Next> {
        let sh = self.shared();
        let tail = sh.r.tail.load(Ordering::Relaxed);
        let head = sh.w.head.load(Ordering::Acquire);
        if head == tail {
            return Ok(match self.peek_log()? {
                Some(len) => Next::Log(len),
                None => Next::Empty,
            });
        }
        let (kind, len) = decode_header(self.read_u64(tail));
        let len = len as usize;
        if kind == WHOLE && frame_len(len) as u64 <= head - tail {
            Ok(Next::Whole(len))
        } else {
            Ok(Next::Other)
        }
    }

    /// Copies the message [`Self::peek`] announced into `buf` (exactly its length) and frees
    /// it. `next` must be the `Whole`/`Log` value just returned, under the same reader lock.
    ///
    /// # Errors
    /// The log read errno; `Error::Protocol` for a misuse (another `next` or length).
    pub fn take_into(&self, next: Next, buf: &mut [u8]) -> Result<()> {
        // Cheap re-validation (the header is re-read), so a misuse cannot desynchronize the
        // ring: only the message that is really next, with its real length, is taken.
        let sh = self.shared();
        let tail = sh.r.tail.load(Ordering::Relaxed);
        let ring_empty = sh.w.head.load(Ordering::Acquire) == tail;
        match next {
            Next::Whole(len)
                if len == buf.len()
                    && !ring_empty
                    && decode_header(self.read_u64(tail)) == (WHOLE, len as u32) =>
            {
                self.copy_out(tail + FRAME_HEADER as u64, buf);
                self.free_to(tail + frame_len(len) as u64, true);
                Ok(())
            }
            Next::Log(len) if len == buf.len() && ring_empty && self.peek_log()? == Some(len) => {
                self.take_log_into(buf)
            }
            _ => Err(Error::Protocol(
                "take_into without a matching peek".to_owned(),
            )),
        }
    }

    /// Largest payload sent as one frame.
    #[must_use]
    pub fn max_whole(&self) -> usize {
        self.capacity / 2 - FRAME_HEADER
    }

    fn data(&self) -> *mut u8 {
        self.map.as_ptr().wrapping_add(DATA_OFFSET)
    }

    /// Copies `src` into the data area at position `pos` (wrapping at the end).
    fn copy_in(&self, pos: u64, src: &[u8]) {
        let off = (pos as usize) & (self.capacity - 1);
        let first = src.len().min(self.capacity - off);
        // SAFETY: `off + first ≤ capacity` and the data area is `capacity` bytes inside the
        // mapping. The range lies in [head, head + free), which no reader touches until the
        // writer (the wlock holder, our caller) publishes `head`; `src` is local memory.
        unsafe {
            std::ptr::copy_nonoverlapping(src.as_ptr(), self.data().wrapping_add(off), first);
        }
        if first < src.len() {
            // SAFETY: the rest (`len - first < capacity`) goes to the start of the data area,
            // same ownership argument as above.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    src.as_ptr().wrapping_add(first),
                    self.data(),
                    src.len() - first,
                );
            }
        }
    }

    /// Copies `dst.len()` bytes out of the data area from position `pos` (wrapping).
    fn copy_out(&self, pos: u64, dst: &mut [u8]) {
        let off = (pos as usize) & (self.capacity - 1);
        let first = dst.len().min(self.capacity - off);
        // SAFETY: `off + first ≤ capacity`, inside the mapping. The range lies in [tail, head),
        // published by a writer (acquire load of `head` by our caller) and not reused until
        // the reader (the rlock holder, our caller) publishes `tail`; `dst` is local memory.
        unsafe {
            std::ptr::copy_nonoverlapping(self.data().wrapping_add(off), dst.as_mut_ptr(), first);
        }
        if first < dst.len() {
            // SAFETY: the wrapped rest from the start of the data area, as above.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    self.data(),
                    dst.as_mut_ptr().wrapping_add(first),
                    dst.len() - first,
                );
            }
        }
    }

    fn read_u64(&self, pos: u64) -> u64 {
        let mut b = [0u8; 8];
        self.copy_out(pos, &mut b);
        u64::from_ne_bytes(b)
    }

    /// Publishes a frame of `kind` with `parts` (concatenated) at `head`; returns the new head.
    fn put_frame(&self, head: u64, kind: u32, parts: &[&[u8]]) -> u64 {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        debug_assert!(len <= u32::MAX as usize);
        self.copy_in(head, &encode_header(kind, len as u32).to_ne_bytes());
        let mut pos = head + FRAME_HEADER as u64;
        for p in parts {
            self.copy_in(pos, p);
            pos += p.len() as u64;
        }
        let new_head = head + frame_len(len) as u64;
        let w = &self.shared().w;
        w.head.store(new_head, Ordering::Release);
        new_head
    }

    fn after_publish(&self, message_done: bool) {
        let sh = self.shared();
        if message_done {
            sh.w.committed.fetch_add(1, Ordering::SeqCst);
            if self.joinable() {
                sh.j.unfinished.fetch_add(1, Ordering::SeqCst);
            }
        }
        sh.w.data_seq.fetch_add(1, Ordering::SeqCst);
        if sh.w.data_waiters.load(Ordering::SeqCst) != 0 {
            futex::wake(&sh.w.data_seq, u32::MAX);
        }
    }

    /// Whether the eventfd should be signalled after a publish.
    #[must_use]
    pub fn has_pollers(&self) -> bool {
        self.shared().ctl.pollers.load(Ordering::Relaxed) != 0
    }

    /// Writes as much of `msg` as fits now. Call with `wlock` held, with a fresh
    /// [`WriteState`] per message. Below `maxsize`, a message that does not fit the ring goes
    /// to the overflow log, so only a stream (a large message handed to a waiting reader
    /// piece by piece) can report [`WriteStep::Full`] for lack of bytes. `nonblocking` never
    /// starts a stream.
    ///
    /// # Errors
    /// The errno of an overflow-log write (ENOSPC, ENOMEM); nothing was published then.
    pub fn write_step(
        &self,
        msg: &[u8],
        st: &mut WriteState,
        nonblocking: bool,
    ) -> Result<WriteStep> {
        self.write_parts_step(&[msg], st, nonblocking)
    }

    /// [`Self::write_step`] for a message given as consecutive `parts` (written without
    /// joining them, except to stream a message given in several parts).
    ///
    /// # Errors
    /// As [`Self::write_step`].
    pub fn write_parts_step(
        &self,
        parts: &[&[u8]],
        st: &mut WriteState,
        nonblocking: bool,
    ) -> Result<WriteStep> {
        let total: usize = parts.iter().map(|p| p.len()).sum();
        if total > self.max_whole() && parts.len() > 1 {
            // Streams slice one contiguous buffer; large multi-part messages are rare (the
            // caller joins them first), so this copy is a fallback.
            return self.write_parts_step(&[&parts.concat()], st, nonblocking);
        }
        // A stream (only ever of a single part, see above) slices this.
        let msg: &[u8] = parts.first().copied().unwrap_or_default();
        let sh = self.shared();
        let cap = self.capacity as u64;
        let seen = sh.r.space_seq.load(Ordering::SeqCst);
        let mut head = sh.w.head.load(Ordering::Relaxed);
        if !st.streaming {
            if self.len() >= self.maxsize() {
                return Ok(WriteStep::Full { seen });
            }
            let log_empty =
                sh.w.log_w.load(Ordering::Relaxed) == sh.r.log_r.load(Ordering::Acquire);
            let free = cap - (head - sh.r.tail.load(Ordering::Acquire));
            if !log_empty {
                self.append_log(parts)?;
                return Ok(WriteStep::Done);
            }
            if total <= self.max_whole() {
                if (frame_len(total) as u64) > free {
                    // Readers at work free room soon: wait for them (backpressure keeps the
                    // fast path); with none around, buffer in the log as the stdlib would.
                    if !nonblocking && self.reader_active() {
                        return Ok(WriteStep::Full { seen });
                    }
                    self.append_log(parts)?;
                    return Ok(WriteStep::Done);
                }
                self.put_frame(head, WHOLE, parts);
                self.after_publish(true);
                return Ok(WriteStep::Done);
            }
            // Large: stream it to a reader that is waiting, else use the log.
            let chunk_max = self.max_whole() - 8;
            let first_min = (FRAME_HEADER + 8 + chunk_max.min(4096)) as u64;
            if nonblocking || !self.reader_active() {
                self.append_log(parts)?;
                return Ok(WriteStep::Done);
            }
            if free < first_min {
                return Ok(WriteStep::Full { seen });
            }
            let n = chunk_max.min(free as usize - FRAME_HEADER - 8) & !7;
            sh.ctl.stream_owner.store(futex::pid(), Ordering::SeqCst);
            let total = (msg.len() as u64).to_ne_bytes();
            head = self.put_frame(head, START, &[&total, &msg[..n]]);
            st.streaming = true;
            st.sent = n;
            self.after_publish(false);
        }
        let chunk_max = self.max_whole();
        while st.sent < msg.len() {
            let seen = sh.r.space_seq.load(Ordering::SeqCst);
            let free = cap - (head - sh.r.tail.load(Ordering::Acquire));
            let left = msg.len() - st.sent;
            let want = left.min(chunk_max);
            if (free as usize) < FRAME_HEADER + want.min(4096) {
                return Ok(WriteStep::Full { seen });
            }
            let n = if want <= free as usize - FRAME_HEADER {
                want
            } else {
                (free as usize - FRAME_HEADER) & !7
            };
            let last = n == left;
            head = self.put_frame(
                head,
                if last { END } else { CHUNK },
                &[&msg[st.sent..st.sent + n]],
            );
            st.sent += n;
            if last {
                sh.ctl.stream_owner.store(0, Ordering::SeqCst);
            }
            self.after_publish(last);
        }
        Ok(WriteStep::Done)
    }

    /// Whether a process holds the reader lock (and, with `check_alive`, is still running):
    /// only then is a large message streamed, since a reader is there to take the pieces.
    #[must_use]
    pub fn reader_present(&self, check_alive: bool) -> bool {
        match self.shared().ctl.rlock.owner() {
            None => false,
            Some(p) => !check_alive || p == futex::pid() || futex::pid_is_alive(p),
        }
    }

    /// Whether readers are at work: one holds the reader lock, or one consumed a message in
    /// the last few milliseconds. Writers then wait for room instead of using the log.
    #[must_use]
    pub fn reader_active(&self) -> bool {
        let sh = self.shared();
        if sh.ctl.rlock.owner().is_some() {
            return true;
        }
        // A recent read by this very process (say, a thread that alternates put and get)
        // does not count: nobody else is there to make room.
        sh.r.last_reader.load(Ordering::Relaxed) != futex::pid()
            && clock::coarse_ms().saturating_sub(sh.r.last_read_ms.load(Ordering::Relaxed))
                < READER_ACTIVE_MS
    }

    /// Moves a message that no reader is making room for to the overflow log, whole (giving
    /// up its stream if one was started). Writer lock held.
    ///
    /// # Errors
    /// The errno of the log write (a stream is given up either way).
    pub fn divert(&self, parts: &[&[u8]], st: &mut WriteState) -> Result<()> {
        self.abort_stream(st);
        self.append_log(parts)
    }

    /// Gives up a started stream (deadline, interrupt): readers drop what they took of it.
    pub fn abort_stream(&self, st: &mut WriteState) {
        if st.streaming {
            self.shared().ctl.stream_owner.store(0, Ordering::SeqCst);
            st.streaming = false;
            // Wake a reader waiting for the next chunk, so it notices at once.
            let w = &self.shared().w;
            w.data_seq.fetch_add(1, Ordering::SeqCst);
            futex::wake(&w.data_seq, u32::MAX);
        }
    }

    fn free_to(&self, tail: u64, message_done: bool) {
        let r = &self.shared().r;
        r.tail.store(tail, Ordering::Release);
        if message_done {
            r.consumed.fetch_add(1, Ordering::SeqCst);
        }
        self.free_space_signal();
    }

    /// Tells writers waiting for room (bytes, `maxsize` or a spare blob) to look again.
    pub(super) fn free_space_signal(&self) {
        let r = &self.shared().r;
        r.last_read_ms.store(clock::coarse_ms(), Ordering::Relaxed);
        r.last_reader.store(futex::pid(), Ordering::Relaxed);
        r.space_seq.fetch_add(1, Ordering::SeqCst);
        if r.space_waiters.load(Ordering::SeqCst) != 0 {
            futex::wake(&r.space_seq, u32::MAX);
        }
    }

    /// Reads frames until a complete message is out or the ring is empty. Call with `rlock`
    /// held, keeping `st` across calls for the same message.
    ///
    /// # Errors
    /// `Error::Protocol` for a corrupted frame header.
    pub fn read_step(&self, st: &mut ReadState) -> Result<ReadStep> {
        let sh = self.shared();
        loop {
            let seen = sh.w.data_seq.load(Ordering::SeqCst);
            let tail = sh.r.tail.load(Ordering::Relaxed);
            let head = sh.w.head.load(Ordering::Acquire);
            if head == tail {
                if st.partial.is_some() {
                    if self.stream_abandoned(tail) {
                        st.partial = None;
                        continue;
                    }
                    return Ok(ReadStep::Empty { seen });
                }
                if let Some(m) = self.take_log()? {
                    return Ok(ReadStep::Message(m));
                }
                return Ok(ReadStep::Empty { seen });
            }
            let (kind, len) = decode_header(self.read_u64(tail));
            let len = len as usize;
            let flen = frame_len(len) as u64;
            if flen > head - tail {
                return Err(Error::Protocol(format!(
                    "corrupted queue frame (kind {kind}, length {len})"
                )));
            }
            let body = tail + FRAME_HEADER as u64;
            match kind {
                WHOLE => {
                    st.partial = None;
                    let mut v = vec![0u8; len];
                    self.copy_out(body, &mut v);
                    self.free_to(tail + flen, true);
                    return Ok(ReadStep::Message(v));
                }
                START if len >= 8 => {
                    let total = usize::try_from(self.read_u64(body)).unwrap_or(usize::MAX);
                    let n = len - 8;
                    if n > total {
                        return Err(Error::Protocol("corrupted stream start".to_owned()));
                    }
                    // Reserve what the stream announces, but never trust more than 1 GiB up
                    // front: the vector grows if a (valid) message is bigger.
                    let mut v = Vec::with_capacity(total.min(1 << 30));
                    v.resize(n, 0);
                    self.copy_out(body + 8, &mut v);
                    self.free_to(tail + flen, false);
                    st.partial = Some((v, total));
                }
                CHUNK | END => {
                    let done = kind == END;
                    match st.partial.take() {
                        None => {
                            // Orphan pieces of a message whose reader died: skip them.
                            self.free_to(tail + flen, done);
                        }
                        Some((mut v, total)) => {
                            let at = v.len();
                            if at + len > total || (done && at + len != total) {
                                self.free_to(tail + flen, done);
                                continue;
                            }
                            v.resize(at + len, 0);
                            self.copy_out(body, &mut v[at..]);
                            self.free_to(tail + flen, done);
                            if done {
                                return Ok(ReadStep::Message(v));
                            }
                            st.partial = Some((v, total));
                        }
                    }
                }
                _ => {
                    return Err(Error::Protocol(format!(
                        "corrupted queue frame (kind {kind}, length {len})"
                    )));
                }
            }
        }
    }

    /// With the ring empty at `tail` mid-stream: whether the streaming writer is gone.
    fn stream_abandoned(&self, tail: u64) -> bool {
        let sh = self.shared();
        let owner = sh.ctl.stream_owner.load(Ordering::SeqCst);
        // Re-check: the END frame may have been published right before the owner was cleared.
        if sh.w.head.load(Ordering::Acquire) != tail {
            return false;
        }
        owner == 0 || !futex::pid_is_alive(owner)
    }

    /// Sleeps at most `slice` until `data_seq` leaves `seen` (spinning briefly first).
    ///
    /// # Errors
    /// Only futex misuse errors.
    pub fn wait_data(&self, seen: u32, slice: Duration) -> Result<()> {
        let w = &self.shared().w;
        for _ in 0..SPIN_TRIES {
            if w.data_seq.load(Ordering::Relaxed) != seen {
                return Ok(());
            }
            std::hint::spin_loop();
        }
        w.data_waiters.fetch_add(1, Ordering::SeqCst);
        let r = futex::wait(&w.data_seq, seen, Some(slice));
        w.data_waiters.fetch_sub(1, Ordering::SeqCst);
        r.map(|_| ())
    }

    /// Sleeps at most `slice` until `space_seq` leaves `seen`.
    ///
    /// # Errors
    /// Only futex misuse errors.
    pub fn wait_space(&self, seen: u32, slice: Duration) -> Result<()> {
        let r = &self.shared().r;
        for _ in 0..SPIN_TRIES {
            if r.space_seq.load(Ordering::Relaxed) != seen {
                return Ok(());
            }
            std::hint::spin_loop();
        }
        r.space_waiters.fetch_add(1, Ordering::SeqCst);
        let res = futex::wait(&r.space_seq, seen, Some(slice));
        r.space_waiters.fetch_sub(1, Ordering::SeqCst);
        res.map(|_| ())
    }

    /// Marks one task done. `Ok(false)`: more calls than messages put (nothing changes).
    pub fn task_done(&self) -> bool {
        let j = &self.shared().j;
        let mut v = j.unfinished.load(Ordering::SeqCst);
        loop {
            if v == 0 {
                return false;
            }
            match j
                .unfinished
                .compare_exchange_weak(v, v - 1, Ordering::SeqCst, Ordering::SeqCst)
            {
                Ok(_) => break,
                Err(now) => v = now,
            }
        }
        if v == 1 {
            j.seq.fetch_add(1, Ordering::SeqCst);
            futex::wake(&j.seq, u32::MAX);
        }
        true
    }

    /// Messages put and not yet marked done.
    #[must_use]
    pub fn unfinished(&self) -> u32 {
        self.shared().j.unfinished.load(Ordering::SeqCst)
    }

    /// Waits at most `slice` for the unfinished count to reach zero; `true` once it is.
    ///
    /// # Errors
    /// Only futex misuse errors.
    pub fn join_slice(&self, slice: Duration) -> Result<bool> {
        let j = &self.shared().j;
        let seen = j.seq.load(Ordering::SeqCst);
        if j.unfinished.load(Ordering::SeqCst) == 0 {
            return Ok(true);
        }
        match futex::wait(&j.seq, seen, Some(slice))? {
            Wake::Woken | Wake::Interrupted | Wake::TimedOut => {
                Ok(j.unfinished.load(Ordering::SeqCst) == 0)
            }
        }
    }

    /// Marks the ring as polled through an eventfd (writers start signalling it).
    pub fn enable_pollers(&self) {
        self.shared().ctl.pollers.store(1, Ordering::SeqCst);
    }
}

mod blob;
mod lease;
mod log;
pub use blob::{Blob, BLOB_BASE};
pub(crate) use lease::BlobLease;
pub(crate) mod fork_hooks {
    //! What `os.register_at_fork` runs for blob leases (see `lease.rs`).
    pub(crate) use super::lease::{after_fork, before_fork, end_all};
}

#[cfg(test)]
mod tests;
