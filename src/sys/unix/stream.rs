//! Byte-stream I/O for connections: socketpairs, non-blocking reads and writes on descriptors
//! that other processes share (so `O_NONBLOCK` is never set), closing raw descriptors.
//!
//! A descriptor shared with a peer process (or with a stdlib `Connection` in the same process)
//! must keep its blocking mode: the file status flags belong to the open file description,
//! not to us. Per-call non-blocking I/O is used instead: `MSG_DONTWAIT` on sockets and
//! `RWF_NOWAIT` (`preadv2`/`pwritev2`) on pipes.

use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::sys::socket::{recv, sendmsg, socketpair as nix_socketpair, AddressFamily, MsgFlags};
use nix::sys::socket::{SockFlag, SockType};
use nix::sys::stat::{fstat, SFlag};

use crate::error::Result;

/// How a descriptor can be read or written without blocking and without touching its flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum NoWait {
    /// A socket: `recv`/`sendmsg` with `MSG_DONTWAIT`.
    Socket = 0,
    /// A pipe (FIFO): `preadv2`/`pwritev2` with `RWF_NOWAIT`.
    Pipe = 1,
    /// Anything else (or a kernel without `RWF_NOWAIT` on pipes): poll before a blocking call.
    Unsupported = 2,
}

impl NoWait {
    /// Decodes the `repr(u8)` value (for storage in an atomic); unknown values are `Unsupported`.
    #[must_use]
    pub const fn from_u8(v: u8) -> Self {
        match v {
            0 => Self::Socket,
            1 => Self::Pipe,
            _ => Self::Unsupported,
        }
    }
}

/// Classifies `fd` by its file type.
#[must_use]
pub fn nowait_kind(fd: BorrowedFd<'_>) -> NoWait {
    match fstat(fd) {
        Ok(st) => {
            let kind = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT;
            if kind == SFlag::S_IFSOCK {
                NoWait::Socket
            } else if kind == SFlag::S_IFIFO {
                NoWait::Pipe
            } else {
                NoWait::Unsupported
            }
        }
        Err(_) => NoWait::Unsupported,
    }
}

/// A connected, close-on-exec `AF_UNIX` stream socket pair (blocking).
///
/// # Errors
/// The `socketpair` errno (EMFILE, ENFILE).
pub fn socketpair() -> Result<(OwnedFd, OwnedFd)> {
    Ok(nix_socketpair(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        SockFlag::SOCK_CLOEXEC,
    )?)
}

/// Closes a raw descriptor the caller owns and will not use again.
///
/// # Errors
/// EBADF for a descriptor that was not open. EINTR is not retried (on Linux the descriptor is
/// released even then) and reported as success.
pub fn close(fd: RawFd) -> Result<()> {
    if fd < 0 {
        return Err(Errno::EBADF.into());
    }
    match nix::unistd::close(fd) {
        Ok(()) | Err(Errno::EINTR) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Outcome of one non-blocking or blocking I/O attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Io {
    /// This many bytes moved (0 on a read means end of file).
    Done(usize),
    /// Nothing moved: the call would block, or a signal interrupted it (callers run signal
    /// handlers and retry).
    Again,
}

fn classify(r: std::result::Result<usize, Errno>) -> Result<Io> {
    match r {
        Ok(n) => Ok(Io::Done(n)),
        Err(Errno::EAGAIN | Errno::EINTR) => Ok(Io::Again),
        Err(e) => Err(e.into()),
    }
}

/// Reads into `buf` without blocking. For [`NoWait::Unsupported`] this is a plain (possibly
/// blocking) `read`; callers poll for readability first.
///
/// # Errors
/// EOPNOTSUPP when the kernel refuses `RWF_NOWAIT` on this pipe (callers downgrade to
/// [`NoWait::Unsupported`]); any other read errno (ECONNRESET, EBADF).
pub fn read_nowait(fd: BorrowedFd<'_>, buf: &mut [u8], how: NoWait) -> Result<Io> {
    match how {
        NoWait::Socket => classify(recv(fd.as_raw_fd(), buf, MsgFlags::MSG_DONTWAIT)),
        NoWait::Pipe => {
            let iov = [IoSliceMut::new(buf)];
            // SAFETY: `iov` holds one valid, writable slice that outlives the call; offset -1
            // means "current position" (required for pipes); the kernel writes at most
            // `buf.len()` bytes into it and reads nothing else of ours.
            let r = unsafe {
                libc::preadv2(fd.as_raw_fd(), iov.as_ptr().cast(), 1, -1, libc::RWF_NOWAIT)
            };
            classify(Errno::result(r).map(|n| n.unsigned_abs()))
        }
        NoWait::Unsupported => classify(nix::unistd::read(fd, buf)),
    }
}

/// Appends up to `max` bytes read without blocking to `v`, growing its allocation only by what
/// the kernel actually delivered. `v`'s spare capacity must already be reserved by the caller;
/// at most `min(max, spare capacity)` bytes are read.
///
/// # Errors
/// As [`read_nowait`].
pub fn read_nowait_append(
    fd: BorrowedFd<'_>,
    v: &mut Vec<u8>,
    max: usize,
    how: NoWait,
) -> Result<Io> {
    let spare: &mut [MaybeUninit<u8>] = v.spare_capacity_mut();
    let want = spare.len().min(max);
    if want == 0 {
        return Ok(Io::Done(0));
    }
    let ptr = spare.as_mut_ptr().cast::<libc::c_void>();
    let raw = fd.as_raw_fd();
    let r = match how {
        NoWait::Socket => {
            // SAFETY: `ptr` points to `want` bytes of `v`'s spare capacity, which is writable
            // and stays allocated during the call; recv only writes into that range.
            let r = unsafe { libc::recv(raw, ptr, want, libc::MSG_DONTWAIT) };
            Errno::result(r)
        }
        NoWait::Pipe => {
            let iov = libc::iovec {
                iov_base: ptr,
                iov_len: want,
            };
            // SAFETY: `iov` describes `want` writable bytes of `v`'s spare capacity; offset -1
            // reads at the pipe's current position; the kernel writes only inside the iovec.
            let r = unsafe { libc::preadv2(raw, &iov, 1, -1, libc::RWF_NOWAIT) };
            Errno::result(r)
        }
        NoWait::Unsupported => {
            // SAFETY: as above: `want` writable bytes of spare capacity, written only by read.
            let r = unsafe { libc::read(raw, ptr, want) };
            Errno::result(r)
        }
    };
    let io = classify(r.map(|n| n.unsigned_abs()))?;
    if let Io::Done(n) = io {
        debug_assert!(n <= want);
        let len = v.len() + n.min(want);
        // SAFETY: the kernel initialised the first `n` (<= `want` <= spare capacity) bytes
        // after `v.len()`; everything before them was already initialised.
        unsafe { v.set_len(len) };
    }
    Ok(io)
}

/// Writes (part of) `bufs` without blocking. For [`NoWait::Unsupported`] nothing is written
/// ([`Io::Again`]): such descriptors are only written by [`write_blocking`].
///
/// # Errors
/// EPIPE/ECONNRESET when the reader has gone, EOPNOTSUPP as for [`read_nowait`], other errnos.
pub fn write_nowait(fd: BorrowedFd<'_>, bufs: &[IoSlice<'_>], how: NoWait) -> Result<Io> {
    match how {
        NoWait::Socket => classify(sendmsg::<()>(
            fd.as_raw_fd(),
            bufs,
            &[],
            MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
            None,
        )),
        NoWait::Pipe => {
            let cnt = libc::c_int::try_from(bufs.len()).map_err(|_| Errno::EINVAL)?;
            // SAFETY: `IoSlice` is ABI-compatible with `iovec` on Unix (std guarantees it);
            // `bufs` outlives the call and the kernel only reads from the described ranges.
            let r = unsafe {
                libc::pwritev2(
                    fd.as_raw_fd(),
                    bufs.as_ptr().cast(),
                    cnt,
                    -1,
                    libc::RWF_NOWAIT,
                )
            };
            classify(Errno::result(r).map(|n| n.unsigned_abs()))
        }
        NoWait::Unsupported => Ok(Io::Again),
    }
}

/// Writes (part of) `bufs`, blocking until the kernel takes at least one byte. Returns
/// [`Io::Again`] when a signal interrupted the call before anything was written.
///
/// # Errors
/// EPIPE/ECONNRESET when the reader has gone, or the `writev`/`sendmsg` errno.
pub fn write_blocking(fd: BorrowedFd<'_>, bufs: &[IoSlice<'_>], how: NoWait) -> Result<Io> {
    match how {
        // MSG_NOSIGNAL: a vanished reader is an EPIPE error, never a SIGPIPE.
        NoWait::Socket => classify(sendmsg::<()>(
            fd.as_raw_fd(),
            bufs,
            &[],
            MsgFlags::MSG_NOSIGNAL,
            None,
        )),
        NoWait::Pipe | NoWait::Unsupported => classify(nix::sys::uio::writev(fd, bufs)),
    }
}

/// Polls `fds` for readability for up to `timeout`, the way `select.poll` reports to
/// `multiprocessing.connection.wait`: hang-up, error and an invalid descriptor (`POLLNVAL`)
/// all count as ready, so the caller's next operation on it reports the problem. Empty on
/// timeout or EINTR.
///
/// # Errors
/// The `poll` errno (EINVAL for too many descriptors, ENOMEM).
pub fn poll_any_ready(fds: &[BorrowedFd<'_>], timeout: std::time::Duration) -> Result<Vec<usize>> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

    let mut pfds: Vec<PollFd<'_>> = fds
        .iter()
        .map(|fd| PollFd::new(*fd, PollFlags::POLLIN))
        .collect();
    let ms = timeout.as_micros().div_ceil(1000).min(i32::MAX as u128);
    let ms =
        PollTimeout::try_from(i32::try_from(ms).unwrap_or(i32::MAX)).unwrap_or(PollTimeout::MAX);
    match poll(&mut pfds, ms) {
        Ok(0) | Err(Errno::EINTR) => Ok(Vec::new()),
        Ok(_) => Ok(pfds
            .iter()
            .enumerate()
            .filter(|(_, p)| p.revents().is_some_and(|r| !r.is_empty()))
            .map(|(i, _)| i)
            .collect()),
        Err(e) => Err(e.into()),
    }
}

/// Asks for a send buffer of `bytes` on a socket (best effort: the kernel caps it at
/// `net.core.wmem_max` for unprivileged processes). For a unix stream socket this bounds how
/// much the writer may queue before blocking, so a bigger one means fewer sleep/wake
/// hand-offs per large message.
pub fn set_send_buffer(fd: BorrowedFd<'_>, bytes: usize) {
    let _ = nix::sys::socket::setsockopt(&fd, nix::sys::socket::sockopt::SndBuf, &bytes);
}
