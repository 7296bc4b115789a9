//! A process-shared condition variable, used together with a `SemLock` the caller holds.
//!
//! Waiters *register* (with the lock held), release the lock, then sleep on `futex` until they
//! can *consume* a wake-up token. `notify(n)` (lock held) grants up to `n` tokens, never more
//! than there are registered, not yet woken waiters, and bumps `futex`. A waiter whose deadline
//! passes *withdraws*: atomically it either consumes a token granted meanwhile (and reports
//! being notified) or grants-and-consumes one for itself, which unregisters it. Grants and
//! consumptions share one 64-bit word, so these decisions are single CASes.
//!
//! A waiter may only consume tokens granted after it registered (`wakeup != ticket`), so a
//! notify never wakes a later waiter in place of every earlier one... except that any earlier
//! waiter may take any granted token (no FIFO order, as with the stdlib's semaphores). A waiter
//! killed while registered leaves at most one token that a later waiter consumes spuriously.

use std::sync::atomic::{AtomicI32, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use crate::sys::futex;

/// Register state: the `wakeup` counter when the waiter registered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket(u32);

/// Shared words of a condition variable.
#[repr(C)]
#[derive(Debug, Default)]
pub struct Condition {
    /// Bumped by each notify that granted tokens; waiters sleep on it.
    futex: AtomicU32,
    /// Registrations so far (wrapping).
    total: AtomicU32,
    /// Low half: tokens granted so far (`wakeup`); high half: tokens consumed (`woken`).
    counts: AtomicU64,
    /// Free words for users of the condition (the Barrier keeps its state and count here).
    pub user: [AtomicI32; 4],
}

const _: () = assert!(std::mem::size_of::<Condition>() == 32);

fn split(c: u64) -> (u32, u32) {
    (c as u32, (c >> 32) as u32)
}

fn join(wakeup: u32, woken: u32) -> u64 {
    u64::from(wakeup) | (u64::from(woken) << 32)
}

impl Condition {
    /// Registers a waiter. Call with the associated lock held, before releasing it.
    pub fn register(&self) -> Ticket {
        let (wakeup, _) = split(self.counts.load(Ordering::SeqCst));
        self.total.fetch_add(1, Ordering::SeqCst);
        Ticket(wakeup)
    }

    fn try_consume(&self, t: Ticket) -> bool {
        let mut c = self.counts.load(Ordering::SeqCst);
        loop {
            let (wakeup, woken) = split(c);
            if wakeup == t.0 || woken == wakeup {
                return false;
            }
            match self.counts.compare_exchange_weak(
                c,
                join(wakeup, woken.wrapping_add(1)),
                Ordering::SeqCst,
                Ordering::SeqCst,
            ) {
                Ok(_) => return true,
                Err(now) => c = now,
            }
        }
    }

    /// Waits at most `slice` for a token; `true` once one was consumed (the waiter is done).
    ///
    /// # Errors
    /// Only futex misuse errors.
    pub fn wait_slice(&self, t: Ticket, slice: Duration) -> crate::error::Result<bool> {
        let seen = self.futex.load(Ordering::SeqCst);
        if self.try_consume(t) {
            return Ok(true);
        }
        futex::wait(&self.futex, seen, Some(slice))?;
        Ok(self.try_consume(t))
    }

    /// Ends a wait that is giving up (deadline, exception): returns `true` if a token granted
    /// meanwhile was consumed after all, `false` if the waiter unregistered.
    pub fn withdraw(&self, t: Ticket) -> bool {
        let mut c = self.counts.load(Ordering::SeqCst);
        loop {
            let (wakeup, woken) = split(c);
            let (next, notified) = if wakeup != t.0 && woken != wakeup {
                (join(wakeup, woken.wrapping_add(1)), true)
            } else {
                (join(wakeup.wrapping_add(1), woken.wrapping_add(1)), false)
            };
            match self
                .counts
                .compare_exchange_weak(c, next, Ordering::SeqCst, Ordering::SeqCst)
            {
                Ok(_) => return notified,
                Err(now) => c = now,
            }
        }
    }

    /// Grants up to `n` tokens to registered waiters and wakes that many; returns the number
    /// granted. Call with the associated lock held.
    pub fn notify(&self, n: u32) -> u32 {
        let granted = self.grant(n);
        self.wake(granted);
        granted
    }

    /// The first half of [`notify`](Self::notify): grants up to `n` tokens and bumps the futex
    /// word (so no waiter goes to sleep past the grant), without the wake syscall. Callers
    /// that hold the lock call [`wake`](Self::wake) after releasing it, so that the woken
    /// waiters find the lock free instead of sleeping on it again ("wait morphing" by hand).
    pub fn grant(&self, n: u32) -> u32 {
        let mut c = self.counts.load(Ordering::SeqCst);
        let granted = loop {
            let (wakeup, woken) = split(c);
            let pending = self.total.load(Ordering::SeqCst).wrapping_sub(wakeup);
            let k = n.min(pending);
            if k == 0 {
                return 0;
            }
            match self.counts.compare_exchange_weak(
                c,
                join(wakeup.wrapping_add(k), woken),
                Ordering::SeqCst,
                Ordering::SeqCst,
            ) {
                Ok(_) => break k,
                Err(now) => c = now,
            }
        };
        self.futex.fetch_add(1, Ordering::SeqCst);
        granted
    }

    /// Wakes up to `n` sleeping waiters (after [`grant`](Self::grant)).
    pub fn wake(&self, n: u32) {
        if n > 0 {
            futex::wake(&self.futex, n);
        }
    }

    /// Registered waiters not yet granted a token.
    #[must_use]
    pub fn waiters(&self) -> u32 {
        let (wakeup, _) = split(self.counts.load(Ordering::SeqCst));
        self.total.load(Ordering::SeqCst).wrapping_sub(wakeup)
    }

    /// Tokens granted but not consumed yet.
    #[must_use]
    pub fn unconsumed(&self) -> u32 {
        let (wakeup, woken) = split(self.counts.load(Ordering::SeqCst));
        wakeup.wrapping_sub(woken)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;

    use super::*;
    use crate::deadline::Deadline;
    use crate::sync::until;

    #[test]
    fn notify_without_waiters_is_lost() {
        let c = Condition::default();
        assert_eq!(c.notify(1), 0);
        let t = c.register();
        assert!(!c.wait_slice(t, Duration::from_millis(5)).unwrap());
        assert!(!c.withdraw(t));
        assert_eq!(c.waiters(), 0);
        assert_eq!(c.unconsumed(), 0);
    }

    #[test]
    fn a_notify_after_register_is_seen() {
        let c = Condition::default();
        let t = c.register();
        assert_eq!(c.waiters(), 1);
        assert_eq!(c.notify(5), 1);
        assert!(c.wait_slice(t, Duration::ZERO).unwrap());
        assert_eq!(c.unconsumed(), 0);
    }

    #[test]
    fn withdraw_takes_a_token_granted_meanwhile() {
        let c = Condition::default();
        let t = c.register();
        c.notify(1);
        assert!(c.withdraw(t));
        assert_eq!(c.unconsumed(), 0);
        assert_eq!(c.waiters(), 0);
    }

    #[test]
    fn later_waiters_do_not_take_earlier_grants() {
        let c = Condition::default();
        let a = c.register();
        c.notify(1);
        let b = c.register();
        assert!(!c.wait_slice(b, Duration::ZERO).unwrap());
        assert!(c.wait_slice(a, Duration::ZERO).unwrap());
        assert!(!c.withdraw(b));
    }

    #[test]
    fn notify_n_wakes_exactly_n_threads() {
        let c = Arc::new(Condition::default());
        let woke = Arc::new(AtomicUsize::new(0));
        let tickets: Vec<_> = (0..4).map(|_| c.register()).collect();
        let hs: Vec<_> = tickets
            .into_iter()
            .map(|t| {
                let (c, woke) = (Arc::clone(&c), Arc::clone(&woke));
                std::thread::spawn(move || {
                    let got = until(Deadline::after_secs(Some(0.5)), |s| {
                        Ok(c.wait_slice(t, s)?.then_some(()))
                    })
                    .unwrap();
                    if got.is_some() || c.withdraw(t) {
                        woke.fetch_add(1, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(c.notify(3), 3);
        for h in hs {
            h.join().unwrap();
        }
        assert_eq!(woke.load(Ordering::SeqCst), 3);
        assert_eq!(c.waiters(), 0);
        assert_eq!(c.unconsumed(), 0);
    }

    /// Takes turns with another process: each side waits (under the mutex) until the shared
    /// counter has its parity, bumps it and notifies.
    fn take_turns(
        lock: &crate::sync::RobustMutex,
        cv: &Condition,
        parity: i32,
        turns: i32,
    ) -> bool {
        let me = crate::sys::futex::pid();
        for _ in 0..turns {
            lock.lock_deadline(me, Deadline::never()).unwrap().unwrap();
            while cv.user[0].load(Ordering::SeqCst) % 2 != parity {
                let t = cv.register();
                lock.unlock().unwrap();
                let got = until(Deadline::after_secs(Some(10.0)), |s| {
                    Ok(cv.wait_slice(t, s)?.then_some(()))
                })
                .unwrap();
                if got.is_none() && !cv.withdraw(t) {
                    return false;
                }
                lock.lock_deadline(me, Deadline::never()).unwrap().unwrap();
            }
            cv.user[0].fetch_add(1, Ordering::SeqCst);
            cv.notify(1);
            lock.unlock().unwrap();
        }
        true
    }

    #[test]
    fn processes_take_turns() {
        use crate::shm::Segment;
        use crate::sync::testing::{fork_run, shared};
        use crate::sync::Mode;

        let lock = shared();
        lock.get().init(Mode::Mutex, 1, 1);
        let cv = Segment::<Condition>::create("ferroproc-test").unwrap();
        let child = fork_run(Duration::from_secs(30), || {
            if take_turns(&lock.get().mutex, cv.get(), 1, 300) {
                0
            } else {
                1
            }
        });
        assert!(take_turns(&lock.get().mutex, cv.get(), 0, 300));
        assert_eq!(child.join(), 0);
        assert_eq!(cv.get().user[0].load(Ordering::SeqCst), 600);
        assert_eq!(cv.get().waiters(), 0);
    }
}
