//! A robust, process-shared mutex: the futex word holds the owner's pid (0 = free) and a
//! "contended" bit, so the identity of the holder is recorded by the very CAS that takes it.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use crate::deadline::Deadline;
use crate::error::Result;
use crate::sys::futex::{self, Wake};

/// Set while some process may be sleeping on the word.
const CONTENDED: u32 = 1 << 31;
/// Busy polls of a held lock before sleeping (each a `spin_loop` hint, ~20 ns): a few
/// microseconds in all. No `sched_yield`: on a loaded machine it can hand the CPU away for a
/// whole time slice.
const SPIN_TRIES: u32 = 400;

/// How a lock was obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acquired {
    /// From a release (or free).
    Normally,
    /// Taken over from `dead_pid`, which died holding it.
    Recovered {
        /// The pid that held the lock when it died.
        dead_pid: u32,
    },
}

/// `unlock` of a mutex that is not locked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotLocked;

/// The mutex word. `0` free; otherwise `owner pid | CONTENDED?`.
#[repr(C)]
#[derive(Debug, Default)]
pub struct RobustMutex {
    word: AtomicU32,
}

impl RobustMutex {
    /// Marks the (unshared) mutex as held by `pid`.
    pub fn force_owner(&self, pid: u32) {
        self.word.store(pid & !CONTENDED, Ordering::Relaxed);
    }

    /// The pid of the current holder, `None` when free.
    #[must_use]
    pub fn owner(&self) -> Option<u32> {
        match self.word.load(Ordering::Relaxed) & !CONTENDED {
            0 => None,
            pid => Some(pid),
        }
    }

    /// Takes the lock for `me` if it is free: one CAS, no syscall.
    #[inline]
    pub fn try_lock(&self, me: u32) -> bool {
        self.word
            .compare_exchange(0, me, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
    }

    /// Takes the lock for `me`, sleeping at most `slice`. `Ok(None)`: not yet. When the slice
    /// expires with the holder dead, the lock is taken over (`Acquired::Recovered`).
    ///
    /// # Errors
    /// Only futex misuse errors.
    pub fn lock_slice(&self, me: u32, slice: Duration) -> Result<Option<Acquired>> {
        if self.spin_lock(me) {
            return Ok(Some(Acquired::Normally));
        }
        loop {
            let v = self.word.load(Ordering::Relaxed);
            if v == 0 {
                // Having waited, assume others wait too: keep the contended bit set.
                if self
                    .word
                    .compare_exchange(0, me | CONTENDED, Ordering::Acquire, Ordering::Relaxed)
                    .is_ok()
                {
                    return Ok(Some(Acquired::Normally));
                }
                continue;
            }
            if v & CONTENDED == 0
                && self
                    .word
                    .compare_exchange(v, v | CONTENDED, Ordering::Relaxed, Ordering::Relaxed)
                    .is_err()
            {
                continue;
            }
            let v = v | CONTENDED;
            return match futex::wait(&self.word, v, Some(slice))? {
                Wake::TimedOut => Ok(self.recover_from(v, me)),
                Wake::Woken | Wake::Interrupted => Ok(self
                    .word
                    .compare_exchange(0, me | CONTENDED, Ordering::Acquire, Ordering::Relaxed)
                    .ok()
                    .map(|_| Acquired::Normally)),
            };
        }
    }

    /// Briefly spins while the lock is held: a holder that is running usually releases it
    /// within microseconds (a condition's notifier, a short critical section), which saves a
    /// sleep/wake pair. Bounded to `SPIN_TRIES` polls.
    fn spin_lock(&self, me: u32) -> bool {
        for _ in 0..SPIN_TRIES {
            let v = self.word.load(Ordering::Relaxed);
            if v == 0 {
                if self.try_lock(me) {
                    return true;
                }
            } else if v & CONTENDED != 0 {
                // Others already sleep: queue behind them instead of barging.
                return false;
            }
            std::hint::spin_loop();
        }
        false
    }

    /// Without waiting: takes the lock over if its holder is dead (a liveness check costs a
    /// few syscalls; callers rate-limit it).
    pub fn try_recover(&self, me: u32) -> Option<Acquired> {
        match self.word.load(Ordering::Relaxed) {
            0 => self.try_lock(me).then_some(Acquired::Normally),
            seen => self.recover_from(seen, me),
        }
    }

    /// If the word still is `seen` and its owner is dead, takes the lock over.
    fn recover_from(&self, seen: u32, me: u32) -> Option<Acquired> {
        let owner = seen & !CONTENDED;
        if owner == me || futex::pid_is_alive(owner) {
            return None;
        }
        self.word
            .compare_exchange(seen, me | CONTENDED, Ordering::Acquire, Ordering::Relaxed)
            .ok()
            .map(|_| Acquired::Recovered { dead_pid: owner })
    }

    /// Takes the lock, waiting until `deadline`. `Ok(None)` on timeout.
    ///
    /// # Errors
    /// Only futex misuse errors.
    pub fn lock_deadline(&self, me: u32, deadline: Deadline) -> Result<Option<Acquired>> {
        if self.try_lock(me) {
            return Ok(Some(Acquired::Normally));
        }
        super::until(deadline, |s| self.lock_slice(me, s))
    }

    /// Releases the lock (whoever holds it) and wakes one waiter if any may sleep.
    ///
    /// # Errors
    /// [`NotLocked`] when it is free (nothing changes).
    #[inline]
    pub fn unlock(&self) -> std::result::Result<(), NotLocked> {
        let mut v = self.word.load(Ordering::Relaxed);
        loop {
            if v == 0 {
                return Err(NotLocked);
            }
            match self
                .word
                .compare_exchange_weak(v, 0, Ordering::Release, Ordering::Relaxed)
            {
                Ok(_) => break,
                Err(now) => v = now,
            }
        }
        if v & CONTENDED != 0 {
            futex::wake(&self.word, 1);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU64;
    use std::sync::Arc;
    use std::time::Instant;

    use super::*;
    use crate::sync::testing::{fork_run, shared};
    use crate::sync::Mode;

    #[test]
    fn lock_unlock_and_over_release() {
        let m = RobustMutex::default();
        let me = futex::pid();
        assert!(m.try_lock(me));
        assert_eq!(m.owner(), Some(me));
        assert!(!m.try_lock(me));
        assert_eq!(m.unlock(), Ok(()));
        assert_eq!(m.unlock(), Err(NotLocked));
        assert_eq!(m.owner(), None);
    }

    #[test]
    fn timed_lock_fails_while_held_by_a_live_process() {
        let m = RobustMutex::default();
        let me = futex::pid();
        assert!(m.try_lock(me));
        let t = Instant::now();
        assert_eq!(
            m.lock_deadline(me, Deadline::after_secs(Some(0.06)))
                .unwrap(),
            None
        );
        assert!(t.elapsed() >= Duration::from_millis(55));
    }

    #[test]
    fn threads_exclude_each_other() {
        let m = Arc::new(RobustMutex::default());
        let n = Arc::new(AtomicU64::new(0));
        let hs: Vec<_> = (0..4)
            .map(|_| {
                let (m, n) = (Arc::clone(&m), Arc::clone(&n));
                std::thread::spawn(move || {
                    for _ in 0..5000 {
                        m.lock_deadline(futex::pid(), Deadline::never())
                            .unwrap()
                            .unwrap();
                        // A non-atomic read-modify-write, protected by the mutex only.
                        let x = n.load(Ordering::Relaxed);
                        n.store(x + 1, Ordering::Relaxed);
                        m.unlock().unwrap();
                    }
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
        assert_eq!(n.load(Ordering::Relaxed), 20_000);
    }

    #[test]
    fn a_dead_holder_is_recovered() {
        let seg = shared();
        seg.get().init(Mode::Mutex, 1, 1);
        let child = fork_run(Duration::from_secs(10), || {
            assert!(seg.get().mutex.try_lock(futex::pid()));
            // Die holding it (as with kill -9: no unlock runs).
            0
        });
        let pid = child.pid();
        assert_eq!(child.join(), 0);
        let got = seg
            .get()
            .mutex
            .lock_deadline(futex::pid(), Deadline::after_secs(Some(5.0)))
            .unwrap();
        assert_eq!(got, Some(Acquired::Recovered { dead_pid: pid }));
        assert_eq!(seg.get().mutex.owner(), Some(futex::pid()));
    }

    #[test]
    fn try_recover_takes_over_only_from_the_dead() {
        let seg = shared();
        seg.get().init(Mode::Mutex, 1, 1);
        let me = futex::pid();
        assert!(seg.get().mutex.try_lock(me));
        assert_eq!(seg.get().mutex.try_recover(me), None);
        let child = fork_run(Duration::from_secs(10), || {
            i32::from(seg.get().mutex.try_recover(futex::pid()).is_some())
        });
        assert_eq!(child.join(), 0);
        seg.get().mutex.unlock().unwrap();
        let child = fork_run(Duration::from_secs(10), || {
            i32::from(!seg.get().mutex.try_lock(futex::pid()))
        });
        let dead = child.pid();
        assert_eq!(child.join(), 0);
        assert_eq!(
            seg.get().mutex.try_recover(me),
            Some(Acquired::Recovered { dead_pid: dead })
        );
    }

    #[test]
    fn a_zombie_holder_is_recovered_before_reaping() {
        let seg = shared();
        seg.get().init(Mode::Mutex, 1, 1);
        let child = fork_run(Duration::from_secs(10), || {
            assert!(seg.get().mutex.try_lock(futex::pid()));
            0
        });
        // Not joined yet: once it has taken the lock, the child is (or soon is) a zombie.
        let t = Instant::now();
        while seg.get().mutex.owner() != Some(child.pid()) {
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "child never took the lock"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        let got = seg
            .get()
            .mutex
            .lock_deadline(futex::pid(), Deadline::after_secs(Some(5.0)))
            .unwrap();
        assert!(matches!(got, Some(Acquired::Recovered { .. })), "{got:?}");
        assert_eq!(child.join(), 0);
    }
}
