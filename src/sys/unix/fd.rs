//! File-descriptor helpers: close-on-exec pipes, inheritability, whole reads and writes.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, FdFlag, OFlag};

use crate::error::Result;

/// A close-on-exec pipe: `(read end, write end)`.
///
/// # Errors
/// The `pipe2` errno (EMFILE, ENFILE).
pub fn pipe() -> Result<(OwnedFd, OwnedFd)> {
    Ok(nix::unistd::pipe2(OFlag::O_CLOEXEC)?)
}

/// Sets or clears `FD_CLOEXEC` on `fd`.
///
/// # Errors
/// EBADF for a closed descriptor.
pub fn set_cloexec(fd: BorrowedFd<'_>, cloexec: bool) -> Result<()> {
    let flags = FdFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFD)?);
    let new = if cloexec {
        flags | FdFlag::FD_CLOEXEC
    } else {
        flags - FdFlag::FD_CLOEXEC
    };
    if new != flags {
        fcntl(fd, FcntlArg::F_SETFD(new))?;
    }
    Ok(())
}

/// Writes all of `buf`, retrying on EINTR and short writes.
///
/// # Errors
/// The first errno other than EINTR (EPIPE when the reader is gone).
pub fn write_all(fd: BorrowedFd<'_>, mut buf: &[u8]) -> Result<()> {
    while !buf.is_empty() {
        match nix::unistd::write(fd, buf) {
            Ok(n) => buf = &buf[n..],
            Err(Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Reads until `buf` is full or end of file; returns how many bytes were read.
///
/// # Errors
/// The first errno other than EINTR.
pub fn read_full(fd: BorrowedFd<'_>, buf: &mut [u8]) -> Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match nix::unistd::read(fd, &mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(got)
}

/// Borrows a raw descriptor the caller keeps open for the duration of the borrow.
///
/// Returns EBADF for a negative number instead of constructing an invalid borrow.
///
/// # Errors
/// EBADF when `fd` is negative.
pub fn borrow_raw<'a>(fd: RawFd) -> Result<BorrowedFd<'a>> {
    if fd < 0 {
        return Err(Errno::EBADF.into());
    }
    // SAFETY: `fd` is non-negative, and every caller passes a descriptor owned by the Python
    // object it was taken from, which stays alive (and open) while the borrow is used: the
    // borrow never outlives the native call it is made in.
    Ok(unsafe { BorrowedFd::borrow_raw(fd) })
}

/// Closes a raw descriptor handed over from Python (the caller owns it and drops its number).
///
/// # Errors
/// EBADF when `fd` is not open.
pub fn close_raw(fd: RawFd) -> Result<()> {
    // SAFETY: `close` takes any integer and touches no memory of ours; the caller owns `fd` and
    // no Rust `OwnedFd` holds the number (every caller passes a number Python handed over).
    Errno::result(unsafe { libc::close(fd) })?;
    Ok(())
}

/// Makes descriptor number `target` a close-on-exec duplicate of `fd` (`dup3`), closing
/// what `target` was open on, as `os.dup2(fd, target, inheritable=False)`.
///
/// # Errors
/// EBADF, EINVAL (`fd == target`).
pub fn dup_onto(fd: BorrowedFd<'_>, target: RawFd) -> Result<()> {
    // SAFETY: `dup3` touches no memory of ours; `fd` is open for the borrow, and the caller
    // owns `target` (no Rust `OwnedFd` holds that number).
    Errno::result(unsafe { libc::dup3(fd.as_raw_fd(), target, libc::O_CLOEXEC) })?;
    Ok(())
}

/// Duplicates `fd` into a new close-on-exec descriptor.
///
/// # Errors
/// The `fcntl(F_DUPFD_CLOEXEC)` errno.
pub fn dup_cloexec(fd: impl AsFd) -> Result<OwnedFd> {
    Ok(fd
        .as_fd()
        .try_clone_to_owned()
        .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EBADF)))?)
}

/// The raw number of an owned descriptor, for handing to Python.
#[must_use]
pub fn raw(fd: &OwnedFd) -> RawFd {
    fd.as_raw_fd()
}
