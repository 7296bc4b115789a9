//! Test support: shared segments and the one fork helper for multi-process tests.
//!
//! The child runs only the given body (no test harness code), under `catch_unwind`, and ends
//! with `_exit`; it dies with its parent (`PR_SET_PDEATHSIG`). The parent's `join` is a
//! watchdog: past its timeout the child is killed and the test fails. Forking tests are
//! serialized by `FORK_MTX` until their child is reaped.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use super::SemLockShared;
use crate::shm::Segment;
use crate::sys::futex;

static FORK_MTX: Mutex<()> = Mutex::new(());

/// A fresh shared `SemLockShared` segment.
pub(crate) fn shared() -> Segment<SemLockShared> {
    Segment::create("ferroproc-test").expect("memfd")
}

/// A forked child running a test body.
pub(crate) struct Child {
    pid: Pid,
    timeout: Duration,
    _serial: MutexGuard<'static, ()>,
}

impl Child {
    pub(crate) fn pid(&self) -> u32 {
        self.pid.as_raw().unsigned_abs()
    }

    /// Waits for the child (killing it after the timeout) and returns its exit code.
    pub(crate) fn join(self) -> i32 {
        let start = Instant::now();
        loop {
            match waitpid(self.pid, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(_, code)) => return code,
                Ok(WaitStatus::Signaled(_, sig, _)) => panic!("child killed by {sig:?}"),
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => panic!("waitpid: {e}"),
            }
            if start.elapsed() > self.timeout {
                let _ = kill(self.pid, Signal::SIGKILL);
                let _ = waitpid(self.pid, None);
                panic!(
                    "watchdog: child {} still running after {:?}",
                    self.pid, self.timeout
                );
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

/// Forks a child that runs `body` and exits with its return value (101 on panic).
pub(crate) fn fork_run(timeout: Duration, body: impl FnOnce() -> i32) -> Child {
    let serial = FORK_MTX
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    futex::install_fork_hook();
    // SAFETY: in the child we only run `body` (atomics, futex calls and, on failure, a panic
    // message) and then `_exit`, never returning into the test harness; the parent only
    // records the pid. The harness's other threads do not exist in the child.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        // SAFETY: prctl(PR_SET_PDEATHSIG) takes plain integers and touches no memory of ours.
        unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
        let code = catch_unwind(AssertUnwindSafe(body)).unwrap_or(101);
        // SAFETY: `_exit` ends the child at once, without running the parent's atexit handlers
        // or destructors (which belong to the parent's state).
        unsafe { libc::_exit(code) };
    }
    Child {
        pid: Pid::from_raw(pid),
        timeout,
        _serial: serial,
    }
}
