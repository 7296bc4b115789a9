//! Descriptor-backed frame I/O: the non-blocking steps that the binding layer drives from its
//! detached wait loop (`py::blocking`), so that every wait can be interrupted.

#![forbid(unsafe_code)]

use std::io::IoSlice;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use nix::errno::Errno;

use super::framing::{fill_vec, FrameWriter, HeaderReader, Length, Progress, SliceFill, Source};
use crate::error::{Error, Result};
use crate::sys::sock;
use crate::sys::stream::{self, Io, NoWait};
use crate::sys::wait::poll_readable;

/// Payloads up to this size are read together with their header, first without releasing the
/// GIL (non-blocking calls only) and into an exactly sized buffer.
pub const INLINE_MAX: usize = 64 * 1024;

/// A descriptor as a [`Source`], reading without blocking and without changing its flags.
#[derive(Debug)]
pub struct FdSource<'fd> {
    fd: BorrowedFd<'fd>,
    how: NoWait,
    /// Read with `recvmsg`, keeping a descriptor that comes with the bytes (lane frames).
    catch: bool,
    passed: Option<OwnedFd>,
}

impl<'fd> FdSource<'fd> {
    /// Reads from `fd` the way `how` says (see [`stream::nowait_kind`]).
    #[must_use]
    pub fn new(fd: BorrowedFd<'fd>, how: NoWait) -> Self {
        Self {
            fd,
            how,
            catch: false,
            passed: None,
        }
    }

    /// As [`FdSource::new`] for a socket whose peer may pass a descriptor with a frame's
    /// header: every read then keeps one (a plain read would make the kernel close it).
    #[must_use]
    pub fn catching(fd: BorrowedFd<'fd>, how: NoWait) -> Self {
        Self {
            catch: how == NoWait::Socket,
            ..Self::new(fd, how)
        }
    }

    /// The descriptor that came with the bytes read last, if any.
    pub fn take_passed(&mut self) -> Option<OwnedFd> {
        self.passed.take()
    }

    /// The (possibly downgraded) way this descriptor is read; callers store it back.
    #[must_use]
    pub fn how(&self) -> NoWait {
        self.how
    }

    /// Waits up to `timeout` for the descriptor to become readable (or hung up).
    ///
    /// # Errors
    /// EBADF for a closed descriptor, or the `poll` errno.
    pub fn wait_readable(&self, timeout: Duration) -> Result<bool> {
        Ok(!poll_readable(&[self.fd], Some(timeout))?.is_empty())
    }

    fn ready_for_plain_read(&self) -> Result<bool> {
        self.wait_readable(Duration::ZERO)
    }

    fn downgrade(&mut self, e: &Error) -> bool {
        if self.how == NoWait::Pipe && *e == Error::Os(Errno::EOPNOTSUPP) {
            self.how = NoWait::Unsupported;
            return true;
        }
        false
    }
}

impl Source for FdSource<'_> {
    fn read(&mut self, buf: &mut [u8]) -> Result<Io> {
        if self.catch {
            let (io, fd) = sock::recv_nowait_keeping_fd(self.fd, buf)?;
            if fd.is_some() {
                self.passed = fd;
            }
            return Ok(io);
        }
        if self.how == NoWait::Unsupported && !self.ready_for_plain_read()? {
            return Ok(Io::Again);
        }
        match stream::read_nowait(self.fd, buf, self.how) {
            Err(e) if self.downgrade(&e) => self.read(buf),
            other => other,
        }
    }

    fn read_append(&mut self, v: &mut Vec<u8>, max: usize) -> Result<Io> {
        if self.how == NoWait::Unsupported && !self.ready_for_plain_read()? {
            return Ok(Io::Again);
        }
        match stream::read_nowait_append(self.fd, v, max, self.how) {
            Err(e) if self.downgrade(&e) => self.read_append(v, max),
            other => other,
        }
    }
}

/// What the first phase of a receive produced.
#[derive(Debug, PartialEq, Eq)]
pub enum Head {
    /// A complete small frame.
    Inline(Vec<u8>),
    /// The header of a frame whose payload is still to be read (too big to inline, or the
    /// caller asked for the header only).
    Len(usize),
    /// The announced length exceeds the caller's limit; the payload is left unread.
    TooLong,
    /// The header is malformed (a negative length).
    Invalid,
    /// A lane frame (see `framing`): the payload of this length waits in this slot of the
    /// lane whose descriptor came with the header ([`FdSource::take_passed`]).
    Lane(u32, usize),
}

/// Receives a header and, when small enough, its payload.
#[derive(Debug, Default)]
pub struct RecvHead {
    header: HeaderReader,
    inline: Option<(Vec<u8>, usize)>,
}

impl RecvHead {
    /// A receive at a frame boundary.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Advances without blocking. `maxlength` bounds the accepted length; `inline_max` is the
    /// largest payload read in this phase (0: header only).
    ///
    /// # Errors
    /// EOF, a frame cut short, or a read error.
    pub fn step<S: Source + ?Sized>(
        &mut self,
        src: &mut S,
        maxlength: Option<usize>,
        inline_max: usize,
        lanes: bool,
    ) -> Result<Progress<Head>> {
        if self.inline.is_none() {
            let len = match self.header.step(src, lanes)? {
                Progress::Pending => return Ok(Progress::Pending),
                Progress::Ready(Length::Invalid) => return Ok(Progress::Ready(Head::Invalid)),
                Progress::Ready(Length::Lane(slot, n)) => {
                    return Ok(Progress::Ready(match usize::try_from(n) {
                        Ok(n) if !maxlength.is_some_and(|m| n > m) => Head::Lane(slot, n),
                        _ => Head::TooLong,
                    }));
                }
                Progress::Ready(Length::Valid(n)) => n,
            };
            let Ok(len) = usize::try_from(len) else {
                return Ok(Progress::Ready(Head::TooLong));
            };
            if maxlength.is_some_and(|m| len > m) {
                return Ok(Progress::Ready(Head::TooLong));
            }
            if len > inline_max {
                return Ok(Progress::Ready(Head::Len(len)));
            }
            self.inline = Some((Vec::with_capacity(len), len));
        }
        let Some((buf, len)) = self.inline.as_mut() else {
            unreachable!("set above")
        };
        match fill_vec(src, buf, *len)? {
            Progress::Pending => Ok(Progress::Pending),
            Progress::Ready(()) => Ok(Progress::Ready(Head::Inline(std::mem::take(buf)))),
        }
    }
}

/// Reads a payload of known length into a growing buffer.
///
/// # Errors
/// As [`fill_vec`].
pub fn step_vec<S: Source + ?Sized>(
    src: &mut S,
    v: &mut Vec<u8>,
    len: usize,
) -> Result<Progress<()>> {
    fill_vec(src, v, len)
}

/// Reads a payload of known length straight into `dst`.
///
/// # Errors
/// As [`SliceFill::step`].
pub fn step_slice<S: Source + ?Sized>(
    src: &mut S,
    fill: &mut SliceFill,
    dst: &mut [u8],
) -> Result<Progress<()>> {
    fill.step(src, dst)
}

/// Drives `step` until it is ready, waiting for readability in between, for at most about
/// `budget` (so the caller can run signal handlers). `Ok(None)` when the budget ran out.
/// With `poll_first`, waits for readability before the first step (the caller just saw the
/// source run dry, so trying again at once would only cost a wasted system call). A non-zero
/// `spin_window` retries without sleeping for that long each time the source runs dry (in the
/// middle of a message, the rest is usually in flight).
///
/// # Errors
/// Whatever `step` or `poll` fail with.
pub fn drive<T>(
    src: &mut FdSource<'_>,
    budget: Duration,
    poll_first: bool,
    spin_window: Duration,
    mut step: impl FnMut(&mut FdSource<'_>) -> Result<Progress<T>>,
) -> Result<Option<T>> {
    let start = Instant::now();
    if poll_first && !src.wait_readable(budget)? {
        return Ok(None);
    }
    loop {
        if let Progress::Ready(v) = step(src)? {
            return Ok(Some(v));
        }
        if !spin_window.is_zero() {
            if let Some(v) = spin(src, spin_window, &mut step)? {
                return Ok(Some(v));
            }
        }
        let left = budget.saturating_sub(start.elapsed());
        if left.is_zero() || !src.wait_readable(left)? {
            return Ok(None);
        }
    }
}

/// Retries `step` without sleeping for up to `window`: when the peer answers within a few
/// microseconds (request/response traffic between processes on different CPUs), this skips
/// the cost of going to sleep in `poll` and being woken, which dominates such round trips.
/// Between tries the thread yields its CPU instead of busy-waiting: on a loaded machine the
/// peer (or whoever it waits behind) gets to run on this CPU, where a busy spin would keep it
/// off for the whole window (measured on 2 busy CPUs: a `Connection` ping-pong took 65 us
/// with a busy spin, 15 us with yields; on an idle machine the two are alike).
/// `Ok(None)` when nothing arrived in time.
///
/// # Errors
/// Whatever `step` fails with.
pub fn spin<T>(
    src: &mut FdSource<'_>,
    window: Duration,
    mut step: impl FnMut(&mut FdSource<'_>) -> Result<Progress<T>>,
) -> Result<Option<T>> {
    let start = Instant::now();
    loop {
        if let Progress::Ready(v) = step(src)? {
            return Ok(Some(v));
        }
        if start.elapsed() >= window {
            return Ok(None);
        }
        std::thread::yield_now();
    }
}

/// Writes as much of the frame as the kernel takes without blocking.
///
/// # Errors
/// EPIPE and friends when the reader has gone.
pub fn write_nowait(
    fd: BorrowedFd<'_>,
    how: &mut NoWait,
    w: &mut FrameWriter,
    payload: &[u8],
) -> Result<bool> {
    while !w.is_done() {
        let parts = w.pending(payload);
        let parts = without_empty_header(&parts);
        match stream::write_nowait(fd, parts, *how) {
            Ok(Io::Done(n)) => w.advance(n),
            Ok(Io::Again) => return Ok(false),
            Err(Error::Os(Errno::EOPNOTSUPP)) if *how == NoWait::Pipe => {
                *how = NoWait::Unsupported;
                return Ok(false);
            }
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// The pending slices minus an already-sent (empty) header slice.
fn without_empty_header<'a, 'b>(parts: &'a [IoSlice<'b>]) -> &'a [IoSlice<'b>] {
    if parts[0].is_empty() {
        &parts[1..]
    } else {
        parts
    }
}

/// Writes the rest of the frame, blocking; returns `false` when a signal interrupted the write
/// (the caller runs handlers and calls again).
///
/// # Errors
/// EPIPE and friends when the reader has gone.
pub fn write_blocking(
    fd: BorrowedFd<'_>,
    how: NoWait,
    w: &mut FrameWriter,
    payload: &[u8],
) -> Result<bool> {
    while !w.is_done() {
        let parts = w.pending(payload);
        let parts = without_empty_header(&parts);
        match stream::write_blocking(fd, parts, how)? {
            Io::Done(n) => w.advance(n),
            Io::Again => return Ok(false),
        }
    }
    Ok(true)
}
