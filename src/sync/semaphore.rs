//! A counting semaphore on one futex word, with a waiter count so `release` skips the wake
//! syscall when nobody sleeps.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use crate::deadline::Deadline;
use crate::error::Result;
use crate::sys::futex;

/// `release` would raise the value above the bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooManyReleases;

/// A process-shared counting semaphore.
#[repr(C)]
#[derive(Debug, Default)]
pub struct Semaphore {
    value: AtomicU32,
    waiters: AtomicU32,
}

impl Semaphore {
    /// Sets the initial value (before the semaphore is shared).
    pub fn init(&self, value: u32) {
        self.value.store(value, Ordering::Relaxed);
    }

    /// The current value (a snapshot).
    #[must_use]
    pub fn value(&self) -> u32 {
        self.value.load(Ordering::Relaxed)
    }

    /// Takes one unit if available, without waiting.
    #[inline]
    pub fn try_acquire(&self) -> bool {
        let mut v = self.value.load(Ordering::Relaxed);
        while v > 0 {
            match self
                .value
                .compare_exchange_weak(v, v - 1, Ordering::Acquire, Ordering::Relaxed)
            {
                Ok(_) => return true,
                Err(now) => v = now,
            }
        }
        false
    }

    /// Takes one unit, waiting at most `slice` for one to appear. `Ok(false)`: not yet.
    ///
    /// # Errors
    /// Only futex misuse errors.
    pub fn acquire_slice(&self, slice: Duration) -> Result<bool> {
        if self.try_acquire() {
            return Ok(true);
        }
        // SeqCst pairs with `release`: either we see its increment or it sees our count.
        self.waiters.fetch_add(1, Ordering::SeqCst);
        let r = if self.value.load(Ordering::SeqCst) == 0 {
            futex::wait(&self.value, 0, Some(slice)).map(|_| self.try_acquire())
        } else {
            Ok(self.try_acquire())
        };
        self.waiters.fetch_sub(1, Ordering::SeqCst);
        r
    }

    /// Takes one unit, waiting until `deadline`. `Ok(false)` on timeout.
    ///
    /// # Errors
    /// Only futex misuse errors.
    pub fn acquire_deadline(&self, deadline: Deadline) -> Result<bool> {
        Ok(super::until(deadline, |s| Ok(self.acquire_slice(s)?.then_some(())))?.is_some())
    }

    /// Adds one unit unless the value already is `maxvalue`, and wakes one waiter.
    ///
    /// # Errors
    /// [`TooManyReleases`] at the bound (the value is unchanged).
    pub fn release(&self, maxvalue: u32) -> std::result::Result<(), TooManyReleases> {
        let mut v = self.value.load(Ordering::Relaxed);
        loop {
            if v >= maxvalue {
                return Err(TooManyReleases);
            }
            match self
                .value
                .compare_exchange_weak(v, v + 1, Ordering::SeqCst, Ordering::Relaxed)
            {
                Ok(_) => break,
                Err(now) => v = now,
            }
        }
        if self.waiters.load(Ordering::SeqCst) > 0 {
            futex::wake(&self.value, 1);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Instant;

    use super::*;
    use crate::sync::testing::{fork_run, shared};
    use crate::sync::{Mode, SemLockShared};

    #[test]
    fn counts_and_bounds() {
        let s = Semaphore::default();
        s.init(2);
        assert!(s.try_acquire());
        assert!(s.try_acquire());
        assert!(!s.try_acquire());
        assert_eq!(s.release(2), Ok(()));
        assert_eq!(s.release(2), Ok(()));
        assert_eq!(s.release(2), Err(TooManyReleases));
        assert_eq!(s.value(), 2);
    }

    #[test]
    fn timed_acquire_times_out() {
        let s = Semaphore::default();
        let t = Instant::now();
        assert!(!s
            .acquire_deadline(Deadline::after_secs(Some(0.05)))
            .unwrap());
        assert!(t.elapsed() >= Duration::from_millis(45));
        assert!(!s
            .acquire_deadline(Deadline::after_secs(Some(-1.0)))
            .unwrap());
    }

    #[test]
    fn threads_hand_off_units() {
        let s = Arc::new(Semaphore::default());
        let s2 = Arc::clone(&s);
        let h = std::thread::spawn(move || {
            for _ in 0..1000 {
                assert!(s2
                    .acquire_deadline(Deadline::after_secs(Some(10.0)))
                    .unwrap());
            }
        });
        for _ in 0..1000 {
            while s.release(u32::MAX).is_err() {}
        }
        h.join().unwrap();
        assert_eq!(s.value(), 0);
    }

    #[test]
    fn processes_hand_off_units() {
        let seg = shared();
        seg.get().init(Mode::Semaphore, 0, 1);
        let code = fork_run(Duration::from_secs(20), || {
            for _ in 0..200 {
                if !seg
                    .get()
                    .sem
                    .acquire_deadline(Deadline::after_secs(Some(10.0)))
                    .unwrap()
                {
                    return 3;
                }
            }
            0
        });
        for _ in 0..200 {
            while seg.get().sem.release(1).is_err() {
                std::thread::yield_now();
            }
        }
        assert_eq!(code.join(), 0);
        let _: &SemLockShared = seg.get();
    }
}
