//! A `Pipe()` end's shared-memory lane: where its large payloads wait for the peer, instead of
//! travelling through the socket.
//!
//! Through a unix socket, 1 MiB costs the sender a copy into freshly allocated socket buffers
//! (about 32 of them) and the receiver a system call per buffer; on the test machine that is
//! 100-200 us, most of it the sender's copy into cold pages. Through a lane it is a `memcpy`
//! into pages that stay mapped on each side (~20 us each). The socket still carries every
//! message, in order: for a lane payload, a 16-byte *lane frame* (`framing::LANE_MARKER`, the
//! slot, the length) with the lane's descriptor attached (`SCM_RIGHTS`). Sending the
//! descriptor with every frame keeps each frame self-contained: the receiving end may have
//! been pickled into another process since the last one. The receiver maps a lane once and
//! closes the descriptors that come after it (it knows them by inode).
//!
//! A lane is a memfd of one header page and [`SLOTS`] slots of [`SLOT_CAP`] bytes, created by
//! the sending end on its first large payload. A slot is `FREE` or `BUSY`: the sender takes a
//! free one, copies the payload in and sends the frame; the receiver copies the payload out
//! and frees the slot. A sender that finds no free slot within [`PATIENCE`] (its reader is
//! slow, stuck or dead) sends through the socket, and keeps doing so: the lane is only ever a
//! faster path, never one a message waits for.
//!
//! Both ends belong to the program (`Pipe()` made them), so the lane is trusted no more than
//! the socket: a receiver checks the slot number, the length, the slot's state and the file's
//! size and header, and a frame that fails any check is a bad message, not a crash.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::channel::pybuf::Unfilled;
use crate::error::{Error, Result};
use crate::sys::futex;
use crate::sys::shm::{self, Mapping};

/// Slots per lane: one the sender fills while the receiver empties the other.
pub const SLOTS: u32 = 2;

/// Largest payload a slot holds; larger ones go through the socket.
pub const SLOT_CAP: usize = 2 << 20;

/// Smallest payload sent through the lane: below it the socket's copies are cheap next to the
/// frame's descriptor passing.
pub const LANE_MIN: usize = 128 << 10;

/// Longest a sender waits for a free slot before it sends through the socket for good.
pub const PATIENCE: Duration = Duration::from_millis(5);

const PAGE: usize = 4096;

/// Where a slot's bytes start in its first page: half a page from where large Python buffers
/// start in theirs (see `ring/blob.rs`, "4K aliasing").
const DATA_SHIFT: usize = 2048;

const SLOT_SPAN: usize = (DATA_SHIFT + SLOT_CAP).next_multiple_of(PAGE);

/// Bytes of a lane's file.
const SIZE: usize = PAGE + SLOTS as usize * SLOT_SPAN;

const MAGIC: u64 = u64::from_le_bytes(*b"FPLANE01");

const FREE: u32 = 0;
const BUSY: u32 = 1;

/// The header page's words.
#[repr(C)]
#[derive(Debug)]
struct LaneShared {
    magic: AtomicU64,
    slot_cap: AtomicU64,
    state: [AtomicU32; SLOTS as usize],
    /// Bumped whenever a slot is freed; senders sleep on it.
    seq: AtomicU32,
    /// Senders possibly sleeping on `seq`.
    waiters: AtomicU32,
}

/// A lane, mapped.
#[derive(Debug)]
pub struct Lane {
    map: Mapping,
    /// The memfd: kept by the sending end (it goes with every frame), dropped by a receiver.
    fd: Option<OwnedFd>,
    id: (u64, u64),
}

/// The (device, inode) of a descriptor's file: what tells lanes apart.
///
/// # Errors
/// The `fstat` errno.
pub fn file_id(fd: BorrowedFd<'_>) -> Result<(u64, u64)> {
    let st = nix::sys::stat::fstat(fd)?;
    Ok((st.st_dev, st.st_ino))
}

fn bad(what: &str) -> Error {
    Error::Protocol(format!("bad lane frame ({what})"))
}

impl Lane {
    /// A new lane for the sending end.
    ///
    /// # Errors
    /// The memfd/mmap errno.
    pub fn create() -> Result<Self> {
        let fd = shm::create("ferroproc-lane", SIZE)?;
        let map = Mapping::new(&fd, SIZE)?;
        let id = file_id(fd.as_fd())?;
        let lane = Self {
            map,
            fd: Some(fd),
            id,
        };
        // The file is fresh and zeroed: every slot is FREE.
        let sh = lane.shared();
        sh.slot_cap.store(SLOT_CAP as u64, Ordering::Relaxed);
        sh.magic.store(MAGIC, Ordering::Release);
        Ok(lane)
    }

    /// Maps the lane a frame came with, after checking it is one; `fd` is closed either way.
    ///
    /// # Errors
    /// `Protocol` for a descriptor that is not a lane; the fstat/mmap errno.
    pub fn attach(fd: OwnedFd) -> Result<Self> {
        if shm::size(fd.as_fd()).map_err(|_| bad("not a file"))? != SIZE {
            return Err(bad("wrong size"));
        }
        let id = file_id(fd.as_fd())?;
        let map = Mapping::new(&fd, SIZE)?;
        let lane = Self { map, fd: None, id };
        let sh = lane.shared();
        if sh.magic.load(Ordering::Acquire) != MAGIC
            || sh.slot_cap.load(Ordering::Relaxed) != SLOT_CAP as u64
        {
            return Err(bad("not a lane"));
        }
        Ok(lane)
    }

    /// The file's (device, inode).
    #[must_use]
    pub fn id(&self) -> (u64, u64) {
        self.id
    }

    /// The memfd of a sending end's lane.
    #[must_use]
    pub fn fd(&self) -> Option<BorrowedFd<'_>> {
        self.fd.as_ref().map(AsFd::as_fd)
    }

    fn shared(&self) -> &LaneShared {
        // SAFETY: the mapping is SIZE > PAGE bytes and page aligned, so the header (well under
        // a page, align 8) is in range and aligned; its bytes are atomics or zero-initialized
        // integers, valid at any bit pattern; the borrow is tied to `self`, which keeps the
        // mapping.
        unsafe { &*self.map.as_ptr().cast::<LaneShared>() }
    }

    fn slot_ptr(&self, slot: u32) -> *mut u8 {
        // In range: slot < SLOTS is checked by every caller, so the slot's DATA_SHIFT +
        // SLOT_CAP bytes end within SIZE.
        self.map
            .as_ptr()
            .wrapping_add(PAGE + slot as usize * SLOT_SPAN + DATA_SHIFT)
    }

    /// Takes a free slot, waiting up to `patience` for the receiver to free one. `None` when
    /// none came free in time.
    ///
    /// # Errors
    /// Only futex misuse errors.
    pub fn acquire(&self, patience: Duration) -> Result<Option<u32>> {
        let sh = self.shared();
        let start = Instant::now();
        loop {
            let seen = sh.seq.load(Ordering::SeqCst);
            for (i, state) in sh.state.iter().enumerate() {
                if state
                    .compare_exchange(FREE, BUSY, Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok()
                {
                    return Ok(Some(i as u32));
                }
            }
            let left = patience.saturating_sub(start.elapsed());
            if left.is_zero() {
                return Ok(None);
            }
            sh.waiters.fetch_add(1, Ordering::SeqCst);
            let r = futex::wait(&sh.seq, seen, Some(left));
            sh.waiters.fetch_sub(1, Ordering::SeqCst);
            r?;
        }
    }

    /// Copies `data` into `slot`, which the caller took with [`Lane::acquire`].
    ///
    /// # Panics
    /// If `data` is longer than [`SLOT_CAP`] or `slot` is out of range (callers check).
    pub fn fill(&self, slot: u32, data: &[u8]) {
        assert!(slot < SLOTS && data.len() <= SLOT_CAP, "lane slot overrun");
        // SAFETY: the slot's SLOT_CAP bytes lie inside the mapping (checked above) and are this
        // sender's alone while the slot is BUSY and its frame unsent: receivers only touch a
        // slot named by a frame. The source is a live slice, not inside the mapping.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.slot_ptr(slot), data.len()) };
    }

    /// Frees `slot` (the receiver, once it copied the payload out; or a sender that gave up
    /// sending its frame) and wakes a waiting sender.
    pub fn release(&self, slot: u32) {
        let sh = self.shared();
        if let Some(state) = sh.state.get(slot as usize) {
            state.store(FREE, Ordering::Release);
            sh.seq.fetch_add(1, Ordering::SeqCst);
            if sh.waiters.load(Ordering::SeqCst) != 0 {
                futex::wake(&sh.seq, u32::MAX);
            }
        }
    }

    /// Checks that a frame's `slot` and `len` name a payload waiting in this lane.
    ///
    /// # Errors
    /// `Protocol` when they do not.
    pub fn check(&self, slot: u32, len: usize) -> Result<()> {
        if slot >= SLOTS {
            return Err(bad("no such slot"));
        }
        if len > SLOT_CAP {
            return Err(bad("longer than a slot"));
        }
        if self.shared().state[slot as usize].load(Ordering::Acquire) != BUSY {
            return Err(bad("slot not filled"));
        }
        Ok(())
    }

    /// Copies the payload of `dst.len()` bytes out of `slot` (after [`Lane::check`]).
    ///
    /// # Errors
    /// `Protocol` when the frame does not check out.
    pub fn read(&self, slot: u32, dst: &mut [u8]) -> Result<()> {
        self.check(slot, dst.len())?;
        // SAFETY: `check` bounds the slot and length, so the bytes lie inside the mapping; the
        // slot is BUSY with this frame's payload, which its sender does not touch again until
        // the receiver frees it. `dst` is a live exclusive slice outside the mapping.
        unsafe { std::ptr::copy_nonoverlapping(self.slot_ptr(slot), dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }

    /// Fills `dest` (a new Python buffer) with the payload in `slot` (after [`Lane::check`]).
    ///
    /// # Errors
    /// `Protocol` when the frame does not check out.
    pub fn read_into(&self, slot: u32, dest: &mut Unfilled) -> Result<()> {
        self.check(slot, dest.len())?;
        // SAFETY: as in `read`: `dest.len()` checked bytes of a filled, unchanging slot.
        unsafe { dest.fill_from_memory(self.slot_ptr(slot)) };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_payload_goes_through_a_slot_and_the_slot_comes_back() {
        let lane = Lane::create().unwrap();
        let fd = crate::sys::fd::dup_cloexec(lane.fd().unwrap()).unwrap();
        let peer = Lane::attach(fd).unwrap();
        assert_eq!(peer.id(), lane.id());
        assert!(peer.fd().is_none());
        let data: Vec<u8> = (0..SLOT_CAP).map(|i| (i % 253) as u8).collect();
        let a = lane.acquire(Duration::ZERO).unwrap().unwrap();
        let b = lane.acquire(Duration::ZERO).unwrap().unwrap();
        assert_ne!(a, b);
        // Both slots busy: a sender gives up after its patience.
        let t = Instant::now();
        assert_eq!(lane.acquire(Duration::from_millis(20)).unwrap(), None);
        assert!(t.elapsed() >= Duration::from_millis(20));
        lane.fill(a, &data);
        let mut back = vec![0; data.len()];
        peer.read(a, &mut back).unwrap();
        assert!(back == data);
        peer.release(a);
        assert_eq!(lane.acquire(Duration::ZERO).unwrap(), Some(a));
    }

    #[test]
    fn frames_that_do_not_check_out_are_refused() {
        let lane = Lane::create().unwrap();
        let mut buf = vec![0; 16];
        assert!(lane.read(0, &mut buf).is_err(), "slot not filled");
        let slot = lane.acquire(Duration::ZERO).unwrap().unwrap();
        assert!(lane.read(SLOTS, &mut buf).is_err(), "slot out of range");
        assert!(lane.check(slot, SLOT_CAP + 1).is_err(), "too long");
        assert!(lane.read(slot, &mut buf).is_ok());
        // A descriptor that is not a lane.
        let other = shm::create("not-a-lane", SIZE).unwrap();
        assert!(Lane::attach(other).is_err());
        let (r, _w) = crate::sys::fd::pipe().unwrap();
        assert!(Lane::attach(r).is_err());
    }

    #[test]
    fn a_waiting_sender_wakes_when_a_slot_is_freed() {
        let lane = std::sync::Arc::new(Lane::create().unwrap());
        let slots: Vec<u32> = (0..SLOTS)
            .map(|_| lane.acquire(Duration::ZERO).unwrap().unwrap())
            .collect();
        let freer = std::sync::Arc::clone(&lane);
        let first = slots[0];
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            freer.release(first);
        });
        let start = Instant::now();
        assert_eq!(lane.acquire(Duration::from_secs(10)).unwrap(), Some(first));
        assert!(start.elapsed() < Duration::from_secs(5));
        t.join().unwrap();
    }
}
