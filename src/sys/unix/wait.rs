//! Waiting for processes and descriptors: pidfd, poll, waitpid.

use std::os::fd::{BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::wait::{waitpid as nix_waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::error::Result;

/// Opens a pidfd for `pid`: a descriptor that polls readable once the process has exited.
///
/// # Errors
/// ENOSYS on kernels before 5.3 (callers fall back to a pipe), ESRCH if `pid` is gone.
pub fn pidfd_open(pid: i32) -> Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and a flags word, reads no memory of ours, and returns a new
    // descriptor or -1 with errno set.
    let ret = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    let fd = Errno::result(ret)?;
    let fd = RawFd::try_from(fd).map_err(|_| Errno::EOVERFLOW)?;
    // SAFETY: the kernel just returned this descriptor to us; nobody else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Polls `fds` for readability (or hang-up/error, which a read will report) for up to `timeout`.
/// Returns the indices of the ready descriptors; empty on timeout or EINTR, so callers re-check
/// signals and their deadline.
///
/// # Errors
/// EBADF (reported as `POLLNVAL`) for a closed descriptor, or the `poll` errno.
pub fn poll_readable(fds: &[BorrowedFd<'_>], timeout: Option<Duration>) -> Result<Vec<usize>> {
    let mut pfds: Vec<PollFd<'_>> = fds
        .iter()
        .map(|fd| PollFd::new(*fd, PollFlags::POLLIN))
        .collect();
    let timeout = match timeout {
        None => PollTimeout::NONE,
        // Round up so that a sub-millisecond remainder still sleeps instead of spinning.
        Some(d) => {
            let ms = d.as_micros().div_ceil(1000);
            PollTimeout::try_from(ms.min(i32::MAX as u128) as i32).unwrap_or(PollTimeout::MAX)
        }
    };
    match poll(&mut pfds, timeout) {
        Ok(0) | Err(Errno::EINTR) => Ok(Vec::new()),
        Ok(_) => {
            let mut ready = Vec::new();
            for (i, p) in pfds.iter().enumerate() {
                let rev = p.revents().unwrap_or(PollFlags::empty());
                if rev.contains(PollFlags::POLLNVAL) {
                    return Err(Errno::EBADF.into());
                }
                if !rev.is_empty() {
                    ready.push(i);
                }
            }
            Ok(ready)
        }
        Err(e) => Err(e.into()),
    }
}

/// Converts a wait status to the stdlib's `exitcode` convention: the exit status, or
/// `-signal` for a process killed by a signal. `None` while the process is still running.
#[must_use]
pub fn exitcode(status: WaitStatus) -> Option<i32> {
    match status {
        WaitStatus::Exited(_, code) => Some(code),
        WaitStatus::Signaled(_, sig, _) => Some(-(sig as i32)),
        _ => None,
    }
}

/// Reaps `pid` if it has exited (or waits for it when `block`), returning its exit code.
///
/// # Errors
/// ECHILD if `pid` is not a child of ours (or was already reaped).
pub fn waitpid(pid: i32, block: bool) -> Result<Option<i32>> {
    let flags = if block {
        None
    } else {
        Some(WaitPidFlag::WNOHANG)
    };
    loop {
        match nix_waitpid(Pid::from_raw(pid), flags) {
            Ok(WaitStatus::StillAlive) => return Ok(None),
            Ok(st) => {
                if let Some(code) = exitcode(st) {
                    return Ok(Some(code));
                }
                // Stopped/continued reports are not exits: keep waiting (or report running).
                if !block {
                    return Ok(None);
                }
            }
            Err(Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// Ends the calling process at once with `code`, as `os._exit`: no atexit handlers, no
/// flushing of stdio buffers (a forked child must not run its parent's).
pub fn exit_now(code: i32) -> ! {
    // SAFETY: `_exit` has no preconditions and does not return; nothing of ours is left in a
    // state another thread could observe, as the process ends.
    unsafe { libc::_exit(code) }
}
