//! A process-shared event flag.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use crate::sys::futex;

/// `flag` is 0 or 1; `waiters` lets `set` skip the wake syscall when nobody sleeps.
#[repr(C)]
#[derive(Debug, Default)]
pub struct Event {
    flag: AtomicU32,
    waiters: AtomicU32,
}

const _: () = assert!(std::mem::size_of::<Event>() == 8);

impl Event {
    /// Whether the flag is set.
    #[inline]
    #[must_use]
    pub fn is_set(&self) -> bool {
        self.flag.load(Ordering::SeqCst) != 0
    }

    /// Sets the flag and wakes every waiter.
    pub fn set(&self) {
        self.flag.store(1, Ordering::SeqCst);
        if self.waiters.load(Ordering::SeqCst) > 0 {
            futex::wake(&self.flag, u32::MAX);
        }
    }

    /// Clears the flag.
    pub fn clear(&self) {
        self.flag.store(0, Ordering::SeqCst);
    }

    /// Waits at most `slice` for the flag; returns whether it is set.
    ///
    /// # Errors
    /// Only futex misuse errors.
    pub fn wait_slice(&self, slice: Duration) -> crate::error::Result<bool> {
        if self.is_set() {
            return Ok(true);
        }
        self.waiters.fetch_add(1, Ordering::SeqCst);
        let r = if self.is_set() {
            Ok(())
        } else {
            futex::wait(&self.flag, 0, Some(slice)).map(drop)
        };
        self.waiters.fetch_sub(1, Ordering::SeqCst);
        r.map(|()| self.is_set())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::deadline::Deadline;
    use crate::sync::until;

    #[test]
    fn set_wakes_waiters() {
        let e = Arc::new(Event::default());
        let hs: Vec<_> = (0..3)
            .map(|_| {
                let e = Arc::clone(&e);
                std::thread::spawn(move || {
                    until(Deadline::after_secs(Some(5.0)), |s| {
                        Ok(e.wait_slice(s)?.then_some(()))
                    })
                    .unwrap()
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(20));
        e.set();
        for h in hs {
            assert!(h.join().unwrap().is_some());
        }
        e.clear();
        assert!(!e.wait_slice(Duration::from_millis(1)).unwrap());
    }

    #[test]
    fn processes_ping_pong() {
        use crate::shm::Segment;
        use crate::sync::testing::fork_run;

        let ping = Segment::<Event>::create("ferroproc-test").unwrap();
        let pong = Segment::<Event>::create("ferroproc-test").unwrap();
        let wait = |e: &Event| {
            until(Deadline::after_secs(Some(10.0)), |s| {
                Ok(e.wait_slice(s)?.then_some(()))
            })
            .unwrap()
            .is_some()
        };
        let child = fork_run(Duration::from_secs(30), || {
            for _ in 0..300 {
                if !wait(ping.get()) {
                    return 1;
                }
                ping.get().clear();
                pong.get().set();
            }
            0
        });
        for _ in 0..300 {
            ping.get().set();
            assert!(wait(pong.get()));
            pong.get().clear();
        }
        assert_eq!(child.join(), 0);
    }
}
