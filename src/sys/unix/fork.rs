//! `fork(2)` attached to the interpreter, through CPython's fork protocol (as `os.fork()`):
//! `PyOS_BeforeFork`, the fork, then `PyOS_AfterFork_Child` or `PyOS_AfterFork_Parent`, so
//! that `os.register_at_fork` callbacks run and the interpreter's locks and thread state stay
//! coherent in both processes.

use nix::errno::Errno;
use pyo3::{ffi, Python};

use crate::error::Result;

/// Which side of a fork the caller is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forked {
    /// The new process.
    Child,
    /// The calling process, with the child's pid.
    Parent(i32),
}

/// Forks the calling process as `os.fork()` does (without its audit event, which the caller
/// raises if it wants one, and without the warning CPython 3.12+ gives when other threads
/// run).
///
/// Threads: as with `os.fork()`, only the calling thread goes on in the child, and a lock
/// another thread held stays held there. The interpreter resets its own; callers must not
/// need any other (the forkserver, its one caller, runs no other thread). An isolated
/// subinterpreter, where `os.fork()` refuses, cannot get here: the extension module does not
/// load in subinterpreters.
///
/// # Errors
/// The `fork` errno (EAGAIN, ENOMEM); the interpreter's after-fork work has run either way.
pub fn fork_attached(_py: Python<'_>) -> Result<Forked> {
    // SAFETY: the GIL is held (the `py` token), which is all `PyOS_BeforeFork` requires; it
    // takes the interpreter's fork locks and runs the `before` callbacks.
    unsafe { ffi::PyOS_BeforeFork() };
    // SAFETY: `fork` itself is always sound to call; what a multi-threaded caller's child may
    // not do afterwards is the caller's contract (see above). The child goes on with the GIL
    // held, in the one thread that called it, and first runs the interpreter's after-fork
    // work below, as `os.fork()` does.
    let pid = unsafe { libc::fork() };
    let errno = Errno::last();
    if pid == 0 {
        // SAFETY: right after the fork in the child, with the GIL held, as required.
        unsafe { ffi::PyOS_AfterFork_Child() };
        return Ok(Forked::Child);
    }
    // SAFETY: right after the fork in the parent (or after it failed), with the GIL held.
    unsafe { ffi::PyOS_AfterFork_Parent() };
    if pid < 0 {
        return Err(errno.into());
    }
    Ok(Forked::Parent(pid))
}
