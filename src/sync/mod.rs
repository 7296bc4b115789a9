//! Process-shared synchronization on futex words in shared memory.
//!
//! Every type here is `#[repr(C)]`, holds only atomics, starts valid when zeroed, and is placed
//! in a [`crate::shm::Segment`]. Blocking is split into *slices*: each `*_slice` call waits at
//! most the given duration and reports whether it made progress, so the caller (the Python
//! binding's blocking loop, or the `*_deadline` helpers here) can run signal handlers and check
//! its deadline between slices.
//!
//! # Robustness
//! [`RobustMutex`] stores its owner's pid in the futex word itself (no window between taking
//! the lock and recording the owner). A waiter whose slice expires checks whether that pid is
//! still alive (a pidfd that polls readable, i.e. exited or zombie, counts as dead) and, if not,
//! takes the lock over with a CAS; the caller learns about it through [`Acquired::Recovered`].
//! [`RobustMutex::try_recover`] does the same check without waiting (for non-blocking
//! acquires, rate-limited by the caller).
//! Whatever the dead owner protected may be half-updated. Pid reuse before a waiter notices is
//! not detected (the lock then waits for the new process with that pid).
//!
//! [`Semaphore`] counts have no single owner (any process may release), so a count held by a
//! killed process is lost, as with the stdlib's POSIX semaphores. Waiters killed while waiting
//! only leave a stale "waiters" hint behind, which costs at most a spurious wake.

pub mod condition;
pub mod event;
pub mod mutex;
pub mod semaphore;

use std::mem::size_of;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

pub use condition::{Condition, Ticket};
pub use event::Event;
pub use mutex::{Acquired, RobustMutex};
pub use semaphore::Semaphore;

use crate::deadline::Deadline;
use crate::error::Result;
use crate::shm::SharedLayout;

/// Longest single futex wait of the `*_deadline` helpers.
pub const SLICE: Duration = Duration::from_millis(50);

/// The largest semaphore value (the stdlib's `SemLock.SEM_VALUE_MAX` on Linux).
pub const SEM_VALUE_MAX: u32 = i32::MAX as u32;

/// What a [`SemLockShared`] behaves as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Mode {
    /// A recursive lock (`RLock`): a robust mutex plus per-process recursion bookkeeping.
    RecursiveMutex = 0,
    /// A counting semaphore (`Semaphore`, `BoundedSemaphore`).
    Semaphore = 1,
    /// A non-recursive lock (`Lock`): a robust mutex.
    Mutex = 2,
}

impl Mode {
    /// Decodes a stored mode.
    #[must_use]
    pub fn from_u32(v: u32) -> Option<Self> {
        match v {
            0 => Some(Self::RecursiveMutex),
            1 => Some(Self::Semaphore),
            2 => Some(Self::Mutex),
            _ => None,
        }
    }

    /// Whether this mode is a (robust, single-owner) mutex.
    #[must_use]
    pub fn is_mutex(self) -> bool {
        matches!(self, Self::RecursiveMutex | Self::Mutex)
    }
}

/// The shared state behind a `SemLock`: its mode and bound, and either a semaphore or a
/// robust mutex (the other part stays unused).
#[repr(C)]
#[derive(Debug)]
pub struct SemLockShared {
    /// A [`Mode`] as `u32`, set before the segment is shared.
    pub mode: AtomicU32,
    /// The release bound (`maxvalue`), set before the segment is shared.
    pub maxvalue: AtomicU32,
    /// Used in [`Mode::Semaphore`].
    pub sem: Semaphore,
    /// Used in the mutex modes.
    pub mutex: RobustMutex,
}

const _: () = assert!(size_of::<SemLockShared>() == 20);

// SAFETY: repr(C), only AtomicU32s (directly or in repr(C) structs of AtomicU32s), zero is a
// valid state (mode RecursiveMutex, unlocked, value 0), alignment 4.
unsafe impl SharedLayout for SemLockShared {
    const KIND: u32 = 1;
}

// SAFETY: repr(C) of atomics only (see `Condition`), zero = no waiters, no signals.
unsafe impl SharedLayout for Condition {
    const KIND: u32 = 2;
}

// SAFETY: repr(C) of two AtomicU32s, zero = unset, no waiters.
unsafe impl SharedLayout for Event {
    const KIND: u32 = 3;
}

impl SemLockShared {
    /// Initializes a freshly created (zeroed, not yet shared) segment.
    pub fn init(&self, mode: Mode, value: u32, maxvalue: u32) {
        self.mode.store(mode as u32, Ordering::Relaxed);
        self.maxvalue.store(maxvalue, Ordering::Relaxed);
        if mode.is_mutex() {
            // value 0 means "created locked" (never by the stdlib API, but keep it exact).
            if value == 0 {
                self.mutex.force_owner(crate::sys::futex::pid());
            }
        } else {
            self.sem.init(value);
        }
    }

    /// The stored mode (`None` for a corrupted word).
    #[must_use]
    pub fn mode(&self) -> Option<Mode> {
        Mode::from_u32(self.mode.load(Ordering::Relaxed))
    }
}

/// Loops `slice_fn` (each call waits at most one slice) until it succeeds or `deadline` passes.
/// The Rust-side counterpart of the binding's signal-checking loop.
///
/// # Errors
/// Whatever `slice_fn` returns.
pub fn until<T>(
    deadline: Deadline,
    mut slice_fn: impl FnMut(Duration) -> Result<Option<T>>,
) -> Result<Option<T>> {
    loop {
        if let Some(v) = slice_fn(deadline.slice(SLICE))? {
            return Ok(Some(v));
        }
        if deadline.is_expired() {
            return Ok(None);
        }
    }
}

#[cfg(test)]
pub(crate) mod testing;
