//! Positional I/O on a (memfd) file shared between processes: a queue's overflow log and blobs.

use std::io::IoSlice;
use std::os::fd::{AsRawFd, BorrowedFd};

use nix::errno::Errno;
use nix::fcntl::{fallocate, FallocateFlags};
use nix::sys::uio::pwritev;

use crate::error::{Error, Result};

fn off(pos: u64) -> Result<libc::off_t> {
    libc::off_t::try_from(pos).map_err(|_| Errno::EFBIG.into())
}

/// Writes all of `parts`, one after the other, at file offset `pos` (extending the file).
///
/// # Errors
/// The `pwritev` errno (ENOSPC, ENOMEM, EFBIG).
pub fn write_all_at(fd: BorrowedFd<'_>, parts: &[&[u8]], mut pos: u64) -> Result<()> {
    let mut parts: Vec<&[u8]> = parts.iter().copied().filter(|p| !p.is_empty()).collect();
    while !parts.is_empty() {
        let iov: Vec<IoSlice<'_>> = parts.iter().map(|p| IoSlice::new(p)).collect();
        let mut n = match pwritev(fd, &iov, off(pos)?) {
            Ok(n) => n,
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        };
        pos += n as u64;
        while n > 0 {
            if n >= parts[0].len() {
                n -= parts[0].len();
                parts.remove(0);
            } else {
                parts[0] = &parts[0][n..];
                n = 0;
            }
        }
    }
    Ok(())
}

/// Fills `buf` from file offset `pos`.
///
/// # Errors
/// `Error::Eof` if the file ends first; the `pread` errno.
pub fn read_exact_at(fd: BorrowedFd<'_>, buf: &mut [u8], pos: u64) -> Result<()> {
    // SAFETY: `buf` is a live, exclusively borrowed slice: its `len` bytes are writable and
    // nothing else accesses them while the borrow lasts.
    unsafe { read_exact_at_raw(fd, buf.as_mut_ptr(), buf.len(), pos) }
}

/// Fills the `len` bytes at `ptr` from file offset `pos`, for a destination that is not yet
/// initialized (no Rust reference to it may exist before it is filled).
///
/// # Errors
/// `Error::Eof` if the file ends first; the `pread` errno. On error the destination is
/// partly written and must not be read.
///
/// # Safety
/// `ptr` must be valid for writes of `len` bytes, and nothing else may access them, for the
/// duration of the call.
pub unsafe fn read_exact_at_raw(
    fd: BorrowedFd<'_>,
    ptr: *mut u8,
    len: usize,
    pos: u64,
) -> Result<()> {
    let mut done = 0;
    while done < len {
        let at = off(pos + done as u64)?;
        // Stays inside the caller's range: `done < len`.
        let dest = ptr.wrapping_add(done);
        // SAFETY: the caller guarantees `[ptr, ptr + len)` is writable and ours alone; `dest`
        // starts `done < len` bytes into it, so the `len - done` bytes from `dest` lie inside
        // it. `pread` writes at most that many bytes there and reads none.
        let n = unsafe { libc::pread(fd.as_raw_fd(), dest.cast(), len - done, at) };
        match n {
            0 => return Err(Error::Eof),
            n if n > 0 => done += n as usize,
            _ => match Errno::last() {
                Errno::EINTR => {}
                e => return Err(e.into()),
            },
        }
    }
    Ok(())
}

/// Frees the memory behind `[pos, pos + len)` (the file keeps its size; reads give zeros).
/// Best effort: a failure only keeps the memory in use.
pub fn punch_hole(fd: BorrowedFd<'_>, pos: u64, len: u64) {
    if let (Ok(o), Ok(l)) = (off(pos), off(len)) {
        let _ = fallocate(
            fd,
            FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
            o,
            l,
        );
    }
}

/// Whether this process may write files of any size (`RLIMIT_FSIZE` is unlimited). A failed
/// query counts as limited.
#[must_use]
pub fn file_size_unlimited() -> bool {
    matches!(
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_FSIZE),
        Ok((soft, _)) if soft == nix::sys::resource::RLIM_INFINITY
    )
}
