//! The forkserver: a clean Python process that forks children on request.
//!
//! Protocol on a unix stream socketpair between the user process (client) and the server:
//! - request: an 8-byte header `[payload_len: u32 LE][nfds: u32 LE]` carrying `nfds` descriptors
//!   (`SCM_RIGHTS`), then `payload_len` bytes of opaque payload (the pickled process). The first
//!   descriptor is the write end of the child's status pipe.
//! - reply: the child's pid as `i32 LE`, or `-errno` when the fork failed.
//!
//! The server keeps a copy of each child's status pipe and writes the child's exit code there
//! (`i32 LE`) once it reaps it, so the client learns about abnormal deaths too; a child that
//! exits normally reports its own code first, and the client reads only the first report.

use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::time::Duration;

use nix::errno::Errno;

use crate::error::{Error, Result};
use crate::sys::{fd, sock, wait};

/// Largest payload the server accepts (a pickled process object); guards against a corrupt
/// header making the server allocate gigabytes.
pub const MAX_PAYLOAD: usize = 1 << 30;

/// How often children without a pidfd are swept with `waitpid(WNOHANG)`.
const SWEEP: Duration = Duration::from_millis(50);

#[derive(Debug)]
struct Child {
    pid: i32,
    pidfd: Option<OwnedFd>,
    status_w: OwnedFd,
}

/// One fork request, as received.
#[derive(Debug)]
pub struct Request {
    /// Opaque bytes for the child (the pickled preparation data and process object).
    pub payload: Vec<u8>,
    /// Descriptors sent with the request; `fds[0]` is the status pipe's write end.
    pub fds: Vec<OwnedFd>,
}

/// What the server loop hands back to its caller.
#[derive(Debug)]
pub enum Event {
    /// Fork a child for this request, then call [`Server::forked`] or [`Server::fork_failed`].
    Request(Request),
    /// The client is gone: the server should exit.
    Shutdown,
}

/// The server side: owns the control socket and the children it still has to report on.
#[derive(Debug)]
pub struct Server {
    ctl: OwnedFd,
    children: Vec<Child>,
}

impl Server {
    /// Wraps the server's end of the control socket.
    #[must_use]
    pub fn new(ctl: OwnedFd) -> Self {
        Self {
            ctl,
            children: Vec::new(),
        }
    }

    /// Blocks until a request arrives or the client goes away, reaping and reporting children
    /// in the meantime.
    ///
    /// # Errors
    /// A malformed request ([`Error::Protocol`]) or a failing system call.
    pub fn next_event(&mut self) -> Result<Event> {
        loop {
            let needs_sweep = self.children.iter().any(|c| c.pidfd.is_none());
            let ready = {
                let mut fds = vec![self.ctl.as_fd()];
                fds.extend(
                    self.children
                        .iter()
                        .filter_map(|c| c.pidfd.as_ref().map(AsFd::as_fd)),
                );
                wait::poll_readable(&fds, needs_sweep.then_some(SWEEP))?
            };
            if ready.iter().any(|&i| i > 0) || needs_sweep {
                self.reap();
            }
            if ready.first() == Some(&0) {
                return match self.read_request() {
                    Ok(req) => Ok(Event::Request(req)),
                    Err(Error::Eof) => Ok(Event::Shutdown),
                    Err(e) => Err(e),
                };
            }
        }
    }

    fn read_request(&mut self) -> Result<Request> {
        let mut header = [0u8; 8];
        let fds = sock::recv_with_fds(self.ctl.as_fd(), &mut header)?;
        let (len, nfds) = decode_header(header)?;
        if nfds != fds.len() || fds.is_empty() {
            return Err(Error::Protocol(format!(
                "forkserver request announced {nfds} descriptors but carried {}",
                fds.len()
            )));
        }
        let mut payload = vec![0u8; len];
        if fd::read_full(self.ctl.as_fd(), &mut payload)? != len {
            return Err(Error::Eof);
        }
        Ok(Request { payload, fds })
    }

    /// Records a child forked for `req`, keeps its status pipe and replies with its pid. The
    /// request's other descriptors are closed here (the child has its own copies).
    ///
    /// # Errors
    /// The reply could not be sent (the client is gone).
    pub fn forked(&mut self, pid: i32, req_fds: Vec<OwnedFd>) -> Result<()> {
        let mut fds = req_fds.into_iter();
        let status_w = fds
            .next()
            .ok_or_else(|| Error::Protocol("no status pipe".into()))?;
        drop(fds);
        // Without pidfd (kernels before 5.3) the loop sweeps with waitpid(WNOHANG) instead.
        let pidfd = wait::pidfd_open(pid).ok();
        self.children.push(Child {
            pid,
            pidfd,
            status_w,
        });
        fd::write_all(self.ctl.as_fd(), &pid.to_le_bytes())
    }

    /// Replies that the fork failed with `errno`.
    ///
    /// # Errors
    /// The reply could not be sent.
    pub fn fork_failed(&mut self, errno: i32) -> Result<()> {
        fd::write_all(self.ctl.as_fd(), &(-errno.abs().max(1)).to_le_bytes())
    }

    fn reap(&mut self) {
        self.children.retain(|c| match wait::waitpid(c.pid, false) {
            Ok(None) => true,
            Ok(Some(code)) => {
                // The client may have gone or closed its end: nothing left to tell.
                let _ = fd::write_all(c.status_w.as_fd(), &code.to_le_bytes());
                false
            }
            Err(_) => false,
        });
    }

    /// The raw number of the control socket (the child closes it after fork).
    #[must_use]
    pub fn ctl_fd(&self) -> RawFd {
        self.ctl.as_raw_fd()
    }
}

/// Encodes a request header.
#[must_use]
pub fn encode_header(len: usize, nfds: usize) -> [u8; 8] {
    let mut h = [0u8; 8];
    h[..4].copy_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_le_bytes());
    h[4..].copy_from_slice(&u32::try_from(nfds).unwrap_or(u32::MAX).to_le_bytes());
    h
}

/// Decodes and validates a request header: `(payload_len, nfds)`.
///
/// # Errors
/// [`Error::Protocol`] for a payload over [`MAX_PAYLOAD`] or more than [`sock::MAX_FDS`] fds.
pub fn decode_header(h: [u8; 8]) -> Result<(usize, usize)> {
    let len = u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as usize;
    let nfds = u32::from_le_bytes([h[4], h[5], h[6], h[7]]) as usize;
    if len > MAX_PAYLOAD || nfds > sock::MAX_FDS {
        return Err(Error::Protocol(format!(
            "bad forkserver request header ({len} bytes, {nfds} fds)"
        )));
    }
    Ok((len, nfds))
}

/// Client side: asks the server behind `ctl` to fork a child for `payload`, handing it `fds`
/// (`fds[0]` must be the status pipe's write end). Returns the child's pid.
///
/// # Errors
/// [`Error::Eof`] when the server is gone; `Error::Os` with the server's fork errno.
pub fn request(ctl: std::os::fd::BorrowedFd<'_>, payload: &[u8], fds: &[RawFd]) -> Result<i32> {
    if payload.len() > MAX_PAYLOAD {
        return Err(Errno::E2BIG.into());
    }
    sock::send_with_fds(ctl, &encode_header(payload.len(), fds.len()), fds)?;
    fd::write_all(ctl, payload)?;
    let mut reply = [0u8; 4];
    if fd::read_full(ctl, &mut reply)? != 4 {
        return Err(Error::Eof);
    }
    let pid = i32::from_le_bytes(reply);
    if pid <= 0 {
        return Err(Errno::from_raw(-pid).into());
    }
    Ok(pid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips() {
        assert_eq!(decode_header(encode_header(1234, 3)).unwrap(), (1234, 3));
    }

    #[test]
    fn absurd_headers_are_refused_without_allocating() {
        assert!(matches!(
            decode_header(encode_header(usize::MAX, 1)),
            Err(Error::Protocol(_))
        ));
        assert!(matches!(
            decode_header(encode_header(10, 10_000)),
            Err(Error::Protocol(_))
        ));
    }
}
