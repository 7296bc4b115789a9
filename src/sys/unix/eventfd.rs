//! Linux eventfd: a pollable counter that shared-memory channels signal for `select`-style
//! waiters (`multiprocessing.connection.wait` on a queue's reader).

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use nix::errno::Errno;

use crate::error::Result;

/// Creates a close-on-exec, non-blocking eventfd with counter 0.
///
/// # Errors
/// The `eventfd` errno (EMFILE, ENFILE, ENOMEM).
pub fn create() -> Result<OwnedFd> {
    // SAFETY: eventfd takes plain integers and returns a new descriptor or -1.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(Errno::last().into());
    }
    // SAFETY: `fd` was just returned by eventfd, is open, and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Adds 1 to the counter (makes the fd readable). A full counter (EAGAIN) is already readable.
pub fn signal(fd: BorrowedFd<'_>) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a live local u64 to a descriptor we borrow.
    let r = unsafe { libc::write(fd.as_raw_fd(), std::ptr::from_ref(&one).cast(), 8) };
    debug_assert!(r == 8 || Errno::last() == Errno::EAGAIN, "eventfd write");
}

/// Resets the counter to 0 (the fd stops polling readable). Never blocks.
pub fn drain(fd: BorrowedFd<'_>) {
    let mut v: u64 = 0;
    // SAFETY: reads at most 8 bytes into a live local u64; EAGAIN (counter 0) is fine.
    let _ = unsafe { libc::read(fd.as_raw_fd(), std::ptr::from_mut(&mut v).cast(), 8) };
}
