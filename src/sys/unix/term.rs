//! Reporting a death by `SIGTERM` before the kernel tears the process down.
//!
//! A fork child writes its exit code on a status pipe just before `_exit`, so its parent's
//! `join()` returns as soon as the child is done rather than once its address space is gone
//! (for a fork of a large interpreter, a millisecond or more later). A child ended by
//! `SIGTERM` (a pool being terminated) writes nothing, and its parent waits for the teardown.
//! [`report_on_term`] closes that gap for a process that chooses it: its `SIGTERM` handler
//! writes `-SIGTERM` as the exit report, then restores the default action and re-raises, so
//! the process still ends by the signal and its wait status is the usual one.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicI32, Ordering};

use nix::errno::Errno;
use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};

use crate::error::Result;

/// The status pipe to report on, or -1.
static REPORT_FD: AtomicI32 = AtomicI32::new(-1);
/// The process that armed the report: a fork of it inherits the handler but must not write
/// on a pipe that is not its own.
static REPORT_PID: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_term(sig: libc::c_int) {
    let fd = REPORT_FD.load(Ordering::Relaxed);
    // SAFETY: getpid(2) is async-signal-safe and cannot fail.
    let me = unsafe { libc::getpid() };
    if fd >= 0 && me == REPORT_PID.load(Ordering::Relaxed) {
        let code = (-sig).to_le_bytes();
        // SAFETY: write(2) is async-signal-safe and reads only the 4 live bytes of `code`. A
        // failed or refused write leaves the parent to learn the status by waitpid.
        let _ = unsafe { libc::write(fd, code.as_ptr().cast(), code.len()) };
    }
    // SAFETY: signal(2) restoring the default action is async-signal-safe and touches no
    // memory of ours.
    unsafe { libc::signal(sig, libc::SIG_DFL) };
    // SAFETY: raise(3) is async-signal-safe. The signal is blocked while this handler runs, so
    // it is delivered, with the default action that ends the process, when the handler returns.
    unsafe { libc::raise(sig) };
}

/// Makes `SIGTERM` write `-SIGTERM` (an `i32 LE` exit report) on the status pipe `fd` before
/// it ends this process, if `SIGTERM` still has its default action; returns whether it did. A
/// handler installed before (or later, by `signal.signal`) is left in charge.
///
/// # Errors
/// The `sigaction` errno.
pub fn report_on_term(fd: RawFd) -> Result<bool> {
    // SAFETY: an all-zero `sigaction` is a valid value for the kernel to overwrite.
    let mut current: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: a null new action only reads the current one into `current`, a live struct.
    Errno::result(unsafe { libc::sigaction(libc::SIGTERM, std::ptr::null(), &mut current) })?;
    if current.sa_sigaction != libc::SIG_DFL {
        return Ok(false);
    }
    REPORT_FD.store(fd, Ordering::Relaxed);
    REPORT_PID.store(nix::unistd::getpid().as_raw(), Ordering::Relaxed);
    let action = SigAction::new(
        SigHandler::Handler(on_term),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    // SAFETY: `on_term` calls only async-signal-safe functions and reads atomics.
    unsafe { sigaction(Signal::SIGTERM, &action) }?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;

    use nix::sys::signal::{kill, signal, SigHandler, Signal};
    use nix::sys::wait::{waitpid, WaitStatus};
    use nix::unistd::{pipe, read, ForkResult, Pid};

    use super::report_on_term;

    /// Forks a child that runs `body` (async-signal-safe calls only) and then waits for a
    /// signal; returns its pid.
    fn fork_waiting(body: impl FnOnce()) -> Pid {
        // SAFETY: the child runs only `body`, which makes async-signal-safe calls, then sleeps
        // in `pause` until a signal ends it or `_exit`s; it never returns into the harness.
        match unsafe { nix::unistd::fork() }.expect("fork") {
            ForkResult::Child => {
                body();
                loop {
                    nix::unistd::pause();
                }
            }
            ForkResult::Parent { child } => child,
        }
    }

    #[test]
    fn sigterm_is_reported_then_ends_the_process_by_the_signal() {
        let (report_r, report_w) = pipe().expect("pipe");
        let (ready_r, ready_w) = pipe().expect("pipe");
        let child = fork_waiting(|| {
            let armed = report_on_term(report_w.as_raw_fd()) == Ok(true);
            let _ = nix::unistd::write(&ready_w, &[u8::from(armed)]);
        });
        let mut armed = [0u8; 1];
        assert_eq!(read(&ready_r, &mut armed), Ok(1));
        assert_eq!(armed, [1]);
        kill(child, Signal::SIGTERM).expect("kill");
        let mut code = [0u8; 4];
        assert_eq!(read(&report_r, &mut code), Ok(4));
        assert_eq!(i32::from_le_bytes(code), -libc::SIGTERM);
        assert_eq!(
            waitpid(child, None),
            Ok(WaitStatus::Signaled(child, Signal::SIGTERM, false))
        );
    }

    #[test]
    fn a_handler_already_in_place_is_left_alone() {
        let (report_r, report_w) = pipe().expect("pipe");
        let (ready_r, ready_w) = pipe().expect("pipe");
        let child = fork_waiting(|| {
            // SAFETY: SIG_IGN is not a function of ours; nothing runs on delivery.
            let _ = unsafe { signal(Signal::SIGTERM, SigHandler::SigIgn) };
            let armed = report_on_term(report_w.as_raw_fd()) == Ok(true);
            let _ = nix::unistd::write(&ready_w, &[u8::from(armed)]);
        });
        drop(report_w);
        let mut armed = [1u8; 1];
        assert_eq!(read(&ready_r, &mut armed), Ok(1));
        assert_eq!(armed, [0]);
        kill(child, Signal::SIGTERM).expect("kill"); // ignored
        kill(child, Signal::SIGKILL).expect("kill");
        assert_eq!(
            waitpid(child, None),
            Ok(WaitStatus::Signaled(child, Signal::SIGKILL, false))
        );
        let mut rest = [0u8; 4];
        assert_eq!(read(&report_r, &mut rest), Ok(0), "no report was written");
    }
}
