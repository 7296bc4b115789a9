//! Process-shared futex waits and wakes, plus the identity a futex owner writes into a word.
//!
//! Waits never use `FUTEX_PRIVATE_FLAG`: the words live in `MAP_SHARED` mappings that other
//! processes map at other addresses, and only the shared (inode + offset keyed) futex finds them.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Once;
use std::time::Duration;

use nix::errno::Errno;

use crate::error::Result;

/// How a single [`wait`] ended. Every outcome is a hint: callers re-check their word.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// Woken by a `wake`, or the word did not hold `expected` on entry (EAGAIN).
    Woken,
    /// The timeout elapsed.
    TimedOut,
    /// A signal arrived (EINTR): the caller should run signal handlers.
    Interrupted,
}

/// Sleeps while `*word == expected`, for at most `timeout` (`None`: until woken).
///
/// The timeout is relative and measured on `CLOCK_MONOTONIC` by the kernel.
///
/// # Errors
/// Errno values other than EAGAIN/ETIMEDOUT/EINTR (EFAULT, EINVAL) — only for a misuse.
pub fn wait(word: &AtomicU32, expected: u32, timeout: Option<Duration>) -> Result<Wake> {
    let ts = timeout.map(|d| libc::timespec {
        // Slices are at most a few hundred milliseconds; saturate anyway.
        tv_sec: libc::time_t::try_from(d.as_secs()).unwrap_or(libc::time_t::MAX),
        tv_nsec: libc::c_long::from(d.subsec_nanos()),
    });
    let ts_ptr = ts.as_ref().map_or(std::ptr::null(), std::ptr::from_ref);
    // SAFETY: `word` is a live `&AtomicU32` (4-byte aligned, valid for the call); the kernel only
    // reads it atomically and compares it with `expected`. `ts_ptr` is null or points to `ts`,
    // which outlives the call. FUTEX_WAIT without the private flag keys the wait by the
    // mapping's backing object, which is what cross-process waiters need.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            ts_ptr,
            0usize,
            0u32,
        )
    };
    if ret == 0 {
        return Ok(Wake::Woken);
    }
    match Errno::last() {
        Errno::EAGAIN => Ok(Wake::Woken),
        Errno::ETIMEDOUT => Ok(Wake::TimedOut),
        Errno::EINTR => Ok(Wake::Interrupted),
        e => Err(e.into()),
    }
}

/// Wakes at most `n` waiters sleeping on `word` (in any process); returns how many woke.
pub fn wake(word: &AtomicU32, n: u32) -> u32 {
    let n = i32::try_from(n).unwrap_or(i32::MAX);
    // SAFETY: `word` is a live `&AtomicU32`; FUTEX_WAKE reads no memory, it only uses the
    // address as the key of the wait queue. Shared scope, as for `wait`.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE,
            n,
            0usize,
            0usize,
            0u32,
        )
    };
    // Only EFAULT/EINVAL can fail FUTEX_WAKE on a valid word; a failed wake wakes nobody.
    u32::try_from(ret).unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// Owner identity

/// This process's pid, cached (glibc no longer caches `getpid`) and refreshed after `fork`.
static PID: AtomicU32 = AtomicU32::new(0);
/// Bumped in every forked child: per-process bookkeeping tagged with an older generation is stale.
static FORK_GENERATION: AtomicU32 = AtomicU32::new(0);
/// Bumped in both the parent and the child of every fork (see [`forks`]).
static FORKS: AtomicU32 = AtomicU32::new(0);
static HOOK: Once = Once::new();

extern "C" fn after_fork_child() {
    // Async-signal-safe: getpid and atomic stores only.
    PID.store(std::process::id(), Ordering::Relaxed);
    FORK_GENERATION.fetch_add(1, Ordering::Relaxed);
    FORKS.fetch_add(1, Ordering::Relaxed);
}

extern "C" fn after_fork_parent() {
    FORKS.fetch_add(1, Ordering::Relaxed);
}

/// Registers the after-fork hook that keeps [`pid`] and [`fork_generation`] right in children.
/// Idempotent; called at module init and lazily by [`pid`].
pub fn install_fork_hook() {
    HOOK.call_once(|| {
        PID.store(std::process::id(), Ordering::Relaxed);
        // SAFETY: `after_fork_parent`/`after_fork_child` are `extern "C" fn()`s with static
        // lifetime that only perform async-signal-safe work; pthread_atfork stores the
        // pointers and calls them after every fork() made through libc (os.fork, our fork
        // helper), in the parent and in the child.
        let rc =
            unsafe { libc::pthread_atfork(None, Some(after_fork_parent), Some(after_fork_child)) };
        debug_assert_eq!(rc, 0, "pthread_atfork only fails with ENOMEM");
    });
}

/// This process's pid as written into owner words (pids are < 2^22 on Linux).
#[must_use]
#[inline]
pub fn pid() -> u32 {
    let p = PID.load(Ordering::Relaxed);
    if p != 0 {
        return p;
    }
    install_fork_hook();
    PID.load(Ordering::Relaxed)
}

/// A number that changes in each forked child (see [`install_fork_hook`]).
#[must_use]
#[inline]
pub fn fork_generation() -> u32 {
    FORK_GENERATION.load(Ordering::Relaxed)
}

/// A number that changes after every fork, in the parent as well as in the child: memory that
/// was mapped before it may now be shared with another process.
#[must_use]
#[inline]
pub fn forks() -> u32 {
    install_fork_hook();
    FORKS.load(Ordering::Relaxed)
}

/// Whether process `pid` is still running. A zombie (exited, not yet reaped) counts as dead:
/// a pidfd polls readable as soon as its process exits. Errors other than "no such process"
/// (EPERM, EMFILE) count as alive, the safe answer for lock recovery.
#[must_use]
pub fn pid_is_alive(pid: u32) -> bool {
    let Ok(raw) = i32::try_from(pid) else {
        return false;
    };
    if raw <= 0 {
        return false;
    }
    match super::wait::pidfd_open(raw) {
        Ok(fd) => {
            use std::os::fd::AsFd;
            match super::wait::poll_readable(&[fd.as_fd()], Some(Duration::ZERO)) {
                Ok(ready) => ready.is_empty(),
                Err(_) => true,
            }
        }
        Err(crate::error::Error::Os(Errno::ESRCH)) => false,
        Err(_) => {
            // No pidfd (old kernel, fd limit): fall back to kill(pid, 0), zombies look alive.
            !matches!(
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(raw), None),
                Err(Errno::ESRCH)
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Instant;

    use super::*;

    #[test]
    fn wait_on_changed_word_returns_at_once() {
        let w = AtomicU32::new(1);
        assert_eq!(
            wait(&w, 0, Some(Duration::from_secs(5))).unwrap(),
            Wake::Woken
        );
    }

    #[test]
    fn wait_times_out_on_the_monotonic_clock() {
        let w = AtomicU32::new(0);
        let t = Instant::now();
        assert_eq!(
            wait(&w, 0, Some(Duration::from_millis(20))).unwrap(),
            Wake::TimedOut
        );
        assert!(t.elapsed() >= Duration::from_millis(19));
    }

    #[test]
    fn wake_reaches_a_sleeping_thread() {
        let w = Arc::new(AtomicU32::new(0));
        let w2 = Arc::clone(&w);
        let h = std::thread::spawn(move || {
            while w2.load(Ordering::SeqCst) == 0 {
                wait(&w2, 0, Some(Duration::from_secs(5))).unwrap();
            }
        });
        std::thread::sleep(Duration::from_millis(20));
        w.store(1, Ordering::SeqCst);
        wake(&w, 1);
        h.join().unwrap();
    }

    #[test]
    fn liveness() {
        assert!(pid_is_alive(pid()));
        assert!(!pid_is_alive(0));
        assert!(!pid_is_alive(u32::MAX));
    }
}
