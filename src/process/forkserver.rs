//! The forkserver: a clean Python process that forks children on request.
//!
//! Protocol on a unix stream socketpair between the user process (client) and the server:
//! - request: a 12-byte header `[payload_len: u32 LE][nfds: u32 LE][hint: u32 LE]` carrying
//!   `nfds` descriptors (`SCM_RIGHTS`), then `payload_len` bytes of payload (the pickled
//!   preparation data and process object; opaque here, framed by the Python side and split
//!   by `ForkChild.serve`), sent with the header in one `sendmsg`. The first descriptor is the
//!   write end of the child's status pipe. `hint` is opaque here too: the spare relays it to
//!   the server (see [`Server::take_imports`]).
//! - reply: the child's pid as `i32 LE`, or `-errno` when the fork failed.
//!
//! The server keeps *spares* forked ahead of time: forks of the server that wait for a request,
//! read it from the control socket themselves, reply with their own pid and become the child.
//! Forking and CPython's after-fork work (a fork of even a small interpreter costs ~0.6 ms
//! here) then happen before the request instead of between a request and its reply. There are
//! two: the *armed* one reads the control socket (only one reader may own the stream); the
//! *standby* waits on a private pipe until the server arms it, which the server does as soon as
//! the armed one is taken. Back-to-back starts then always find a spare whose fork finished a
//! whole start earlier (with one spare, each start waited ~0.5 ms for the fork that the
//! previous start had just set off). A spare tells the server on a private `SOCK_SEQPACKET`
//! pair that it was taken (handing over a copy of the status pipe) or that the client has
//! gone; the server then forks the next standby, or exits.
//!
//! The server keeps a copy of each child's status pipe and writes the child's exit code there
//! (`i32 LE`) once it reaps it, so the client learns about abnormal deaths too; a child that
//! exits normally reports its own code first, and the client reads only the first report.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::time::Duration;

use nix::errno::Errno;

use crate::error::{Error, Result};
use crate::sys::{fd, sock, wait};

/// Largest payload the server accepts (a pickled process object); guards against a corrupt
/// header making the server allocate gigabytes.
pub const MAX_PAYLOAD: usize = 1 << 30;

/// How often children without a pidfd are swept with `waitpid(WNOHANG)`.
const SWEEP: Duration = Duration::from_millis(50);

/// Spare -> server messages: `[kind: u8][pid: i32 LE][hint: u32 LE]`; `TAKEN` carries the
/// status pipe and the request's hint.
const TAKEN: u8 = b'T';
const CLIENT_GONE: u8 = b'E';
const NOTICE_LEN: usize = 9;
/// Bytes of a request header.
pub const HEADER_LEN: usize = 12;
/// Version of this wire format, checked by a server against its parent's (both sides must come
/// from the same build). Bump it with any change to the messages above, or to the payload's
/// framing.
pub const PROTOCOL: u32 = 3;

#[derive(Debug)]
struct Child {
    pid: i32,
    pidfd: Option<OwnedFd>,
    /// `None` while the process is the spare (it has not taken a request yet).
    status_w: Option<OwnedFd>,
}

/// One fork request, as received.
#[derive(Debug)]
pub struct Request {
    /// Opaque bytes for the child (the pickled preparation data and process object).
    pub payload: Vec<u8>,
    /// Descriptors sent with the request; `fds[0]` is the status pipe's write end.
    pub fds: Vec<OwnedFd>,
    /// The client's hint word, relayed to the server.
    pub hint: u32,
}

/// Why [`Server::wait`] returned.
#[derive(Debug, PartialEq, Eq)]
pub enum Wake {
    /// The spare took a request (or died unused): fork the next one.
    SpareUsed,
    /// The client is gone: the server should exit.
    Shutdown,
}

/// The server side: owns the control socket, the spares and the children it still has to
/// report on.
#[derive(Debug)]
pub struct Server {
    ctl: OwnedFd,
    notify_r: OwnedFd,
    notify_w: OwnedFd,
    /// The spare reading the control socket.
    armed: Option<Child>,
    /// The next spare and the write end of its arming pipe.
    standby: Option<(Child, OwnedFd)>,
    /// The arming pipe made for the spare about to be forked ([`Server::before_fork`]): the
    /// spare takes the read end, the server keeps the write end.
    next_arm_r: Option<OwnedFd>,
    next_arm_w: Option<OwnedFd>,
    children: Vec<Child>,
    /// Hint bits of the requests taken since [`Server::take_imports`] last cleared them.
    imports: u32,
}

/// What a spare keeps of the server after the fork: the control socket, its way to report and
/// the pipe on which the server arms it.
#[derive(Debug)]
pub struct Spare {
    ctl: OwnedFd,
    notify_w: OwnedFd,
    arm_r: OwnedFd,
}

impl Server {
    /// Wraps the server's end of the control socket.
    ///
    /// # Errors
    /// The spare channel (a socketpair) could not be made.
    pub fn new(ctl: OwnedFd) -> Result<Self> {
        let (notify_r, notify_w) = sock::seqpacket_pair()?;
        Ok(Self {
            ctl,
            notify_r,
            notify_w,
            armed: None,
            standby: None,
            next_arm_r: None,
            next_arm_w: None,
            children: Vec::new(),
            imports: 0,
        })
    }

    /// Called right before forking a spare: makes its arming pipe.
    ///
    /// # Errors
    /// The `pipe` errno (EMFILE).
    pub fn before_fork(&mut self) -> Result<()> {
        let (r, w) = fd::pipe()?;
        self.next_arm_r = Some(r);
        self.next_arm_w = Some(w);
        Ok(())
    }

    /// Records `pid`, just forked, as a spare: armed at once when no spare is, the standby
    /// otherwise. True when the server should fork another spare before waiting.
    ///
    /// # Errors
    /// [`Server::before_fork`] was not called.
    pub fn spare_forked(&mut self, pid: i32) -> Result<bool> {
        self.next_arm_r = None;
        let arm_w = self.next_arm_w.take().ok_or_else(no_arming_pipe)?;
        // Without pidfd (kernels before 5.3) the loop sweeps with waitpid(WNOHANG) instead.
        let spare = Child {
            pid,
            pidfd: wait::pidfd_open(pid).ok(),
            status_w: None,
        };
        if self.armed.is_none() {
            self.arm(spare, &arm_w);
        } else {
            self.standby = Some((spare, arm_w));
        }
        Ok(self.standby.is_none())
    }

    fn arm(&mut self, spare: Child, arm_w: &OwnedFd) {
        // EPIPE when the spare died unarmed: its pidfd tells `wait`, which forks another.
        let _ = fd::write_all(arm_w.as_fd(), b"A");
        self.armed = Some(spare);
    }

    /// The standby becomes the armed spare, if there is one.
    fn promote(&mut self) {
        if let Some((spare, arm_w)) = self.standby.take() {
            self.arm(spare, &arm_w);
        }
    }

    /// Ends the standby (its arming pipe closes unused) and waits for it.
    fn dismiss_standby(&mut self) {
        if let Some((spare, arm_w)) = self.standby.take() {
            drop(arm_w);
            let _ = wait::waitpid(spare.pid, true);
        }
    }

    /// The union of the hint words of the requests taken (or refused) since the last call,
    /// and clears it. The Python server maps bits to modules to import before its next fork.
    pub fn take_imports(&mut self) -> u32 {
        std::mem::take(&mut self.imports)
    }

    /// Blocks until the spare has taken a request or died ([`Wake::SpareUsed`]: fork the
    /// next one) or the client has gone ([`Wake::Shutdown`], the spare reaped), reaping and
    /// reporting children meanwhile.
    ///
    /// # Errors
    /// A failing system call.
    pub fn wait(&mut self) -> Result<Wake> {
        loop {
            let ready = self.poll(&[self.notify_r.as_fd()])?;
            if ready.contains(&0) {
                if let Some(wake) = self.on_notice()? {
                    return Ok(wake);
                }
            }
            self.reap();
            // A spare killed before it took a request: nothing to report to anyone.
            if let Some(spare) = &self.armed {
                if let Ok(Some(_)) = wait::waitpid(spare.pid, false) {
                    self.armed = None;
                    self.promote();
                    return Ok(Wake::SpareUsed);
                }
            }
            if let Some((spare, _)) = &self.standby {
                if let Ok(Some(_)) = wait::waitpid(spare.pid, false) {
                    self.standby = None;
                    return Ok(Wake::SpareUsed);
                }
            }
        }
    }

    /// After a failed fork: with a spare still armed, waits as [`Server::wait`] (it takes the
    /// next request); with none, reads the next request and replies `-errno`. Returns false
    /// when the client has gone instead.
    ///
    /// # Errors
    /// A malformed request ([`Error::Protocol`]) or a failing system call.
    pub fn refuse_next(&mut self, errno: i32) -> Result<bool> {
        if self.armed.is_some() {
            return Ok(self.wait()? == Wake::SpareUsed);
        }
        loop {
            let ready = self.poll(&[self.ctl.as_fd()])?;
            self.reap();
            if ready.contains(&0) {
                return match read_request(self.ctl.as_fd()) {
                    Ok(req) => {
                        self.imports |= req.hint;
                        fd::write_all(self.ctl.as_fd(), &(-errno.abs().max(1)).to_le_bytes())?;
                        Ok(true)
                    }
                    // ECONNRESET: the client closed the socket with an answer unread.
                    Err(Error::Eof | Error::Os(Errno::ECONNRESET)) => Ok(false),
                    Err(e) => Err(e),
                };
            }
        }
    }

    /// The spare's handles on the server: duplicates of the control socket and of the server
    /// channel, and the read end of the arming pipe made by [`Server::before_fork`]. In a
    /// freshly forked spare, take them and drop the server: that closes the rest, the copies
    /// of other children's status pipes above all (their readers wait for them to close), and
    /// the write end of its own arming pipe, so that the server's is the only one.
    ///
    /// # Errors
    /// The `dup` errno (EMFILE), or no arming pipe.
    pub fn spare(&mut self) -> Result<Spare> {
        Ok(Spare {
            ctl: fd::dup_cloexec(&self.ctl)?,
            notify_w: fd::dup_cloexec(&self.notify_w)?,
            arm_r: self.next_arm_r.take().ok_or_else(no_arming_pipe)?,
        })
    }

    /// Polls `first` (indices from 0) plus the pidfds of the spares and the children.
    fn poll(&self, first: &[BorrowedFd<'_>]) -> Result<Vec<usize>> {
        let tracked = self
            .armed
            .iter()
            .chain(self.standby.iter().map(|(c, _)| c))
            .chain(self.children.iter());
        let needs_sweep = tracked.clone().any(|c| c.pidfd.is_none());
        let mut fds = first.to_vec();
        fds.extend(tracked.filter_map(|c| c.pidfd.as_ref().map(AsFd::as_fd)));
        wait::poll_readable(&fds, needs_sweep.then_some(SWEEP))
    }

    /// Handles one message from the spare.
    fn on_notice(&mut self) -> Result<Option<Wake>> {
        let mut msg = [0u8; NOTICE_LEN];
        let mut fds = match sock::recv_with_fds(self.notify_r.as_fd(), &mut msg) {
            Ok(fds) => fds,
            // Cannot happen while we hold notify_w ourselves; treat it as the end.
            Err(Error::Eof) => return Ok(Some(Wake::Shutdown)),
            Err(e) => return Err(e),
        };
        let pid = i32::from_le_bytes([msg[1], msg[2], msg[3], msg[4]]);
        let Some(spare) = self.armed.take_if(|s| s.pid == pid) else {
            return Ok(None);
        };
        match msg[0] {
            TAKEN => {
                self.imports |= u32::from_le_bytes([msg[5], msg[6], msg[7], msg[8]]);
                self.children.push(Child {
                    status_w: fds.pop(),
                    ..spare
                });
                self.promote();
                Ok(Some(Wake::SpareUsed))
            }
            CLIENT_GONE => {
                // It exits right after saying so.
                let _ = wait::waitpid(spare.pid, true);
                self.dismiss_standby();
                Ok(Some(Wake::Shutdown))
            }
            other => Err(Error::Protocol(format!(
                "unknown forkserver spare message {other}"
            ))),
        }
    }

    fn reap(&mut self) {
        self.children.retain(|c| match wait::waitpid(c.pid, false) {
            Ok(None) => true,
            Ok(Some(code)) => {
                // The client may have gone or closed its end: nothing left to tell.
                if let Some(w) = &c.status_w {
                    let _ = fd::write_all(w.as_fd(), &code.to_le_bytes());
                }
                false
            }
            Err(_) => false,
        });
    }
}

impl Spare {
    /// Blocks for the next request, replies to the client with `my_pid` and tells the server it
    /// was taken. `None` when the client has gone (the server is told so too). Consumes the
    /// spare: the control socket and the server channel are closed on return, so the child
    /// holds only the request's descriptors.
    ///
    /// # Errors
    /// A malformed request ([`Error::Protocol`]) or a failing system call.
    pub fn take(self, my_pid: i32) -> Result<Option<Request>> {
        self.take_with(my_pid, || Ok(()))
    }

    /// [`Spare::take`], running `before_reply` once a request has arrived and before the
    /// client learns the pid: whatever ties the spare to the server (its parent-death
    /// signal) must be undone before `start()` returns, or a server killed right after
    /// would take the started child along.
    ///
    /// # Errors
    /// As [`Spare::take`], and `before_reply`'s.
    pub fn take_with(
        self,
        my_pid: i32,
        before_reply: impl FnOnce() -> Result<()>,
    ) -> Result<Option<Request>> {
        // Armed, or dismissed (end of file: the server ended, or shut down with the client).
        let mut armed = [0u8; 1];
        if fd::read_full(self.arm_r.as_fd(), &mut armed)? == 0 {
            return Ok(None);
        }
        let req = match read_request(self.ctl.as_fd()) {
            Ok(req) => req,
            // ECONNRESET: the client closed the socket with an answer unread.
            Err(Error::Eof | Error::Os(Errno::ECONNRESET)) => {
                self.notify(CLIENT_GONE, my_pid, 0, &[])?;
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        before_reply()?;
        fd::write_all(self.ctl.as_fd(), &my_pid.to_le_bytes())?;
        // A server that died meanwhile cannot report abnormal deaths; the child still runs.
        let _ = self.notify(TAKEN, my_pid, req.hint, &[req.fds[0].as_raw_fd()]);
        Ok(Some(req))
    }

    fn notify(&self, kind: u8, pid: i32, hint: u32, fds: &[RawFd]) -> Result<()> {
        let mut msg = [kind, 0, 0, 0, 0, 0, 0, 0, 0];
        msg[1..5].copy_from_slice(&pid.to_le_bytes());
        msg[5..].copy_from_slice(&hint.to_le_bytes());
        sock::send_with_fds(self.notify_w.as_fd(), &msg, fds)
    }
}

fn no_arming_pipe() -> Error {
    Error::Protocol("forkserver spare forked without its arming pipe".into())
}

/// Reads one request from the control socket.
fn read_request(ctl: BorrowedFd<'_>) -> Result<Request> {
    let mut header = [0u8; HEADER_LEN];
    let fds = sock::recv_with_fds(ctl, &mut header)?;
    let (len, nfds, hint) = decode_header(header)?;
    if nfds != fds.len() || fds.is_empty() {
        return Err(Error::Protocol(format!(
            "forkserver request announced {nfds} descriptors but carried {}",
            fds.len()
        )));
    }
    let mut payload = vec![0u8; len];
    if fd::read_full(ctl, &mut payload)? != len {
        return Err(Error::Eof);
    }
    Ok(Request { payload, fds, hint })
}

/// Encodes a request header.
#[must_use]
pub fn encode_header(len: usize, nfds: usize, hint: u32) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..4].copy_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_le_bytes());
    h[4..8].copy_from_slice(&u32::try_from(nfds).unwrap_or(u32::MAX).to_le_bytes());
    h[8..].copy_from_slice(&hint.to_le_bytes());
    h
}

/// Decodes and validates a request header: `(payload_len, nfds, hint)`.
///
/// # Errors
/// [`Error::Protocol`] for a payload over [`MAX_PAYLOAD`] or more than [`sock::MAX_FDS`] fds.
pub fn decode_header(h: [u8; HEADER_LEN]) -> Result<(usize, usize, u32)> {
    let len = u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as usize;
    let nfds = u32::from_le_bytes([h[4], h[5], h[6], h[7]]) as usize;
    let hint = u32::from_le_bytes([h[8], h[9], h[10], h[11]]);
    if len > MAX_PAYLOAD || nfds > sock::MAX_FDS {
        return Err(Error::Protocol(format!(
            "bad forkserver request header ({len} bytes, {nfds} fds)"
        )));
    }
    Ok((len, nfds, hint))
}

/// Client side: asks the server behind `ctl` to fork a child for `payload`, handing it `fds`
/// (`fds[0]` must be the status pipe's write end) and relaying `hint` to the server. Returns
/// the child's pid.
///
/// # Errors
/// [`Error::Eof`] when the server is gone; `Error::Os` with the server's fork errno.
pub fn request(
    ctl: std::os::fd::BorrowedFd<'_>,
    payload: &[u8],
    fds: &[RawFd],
    hint: u32,
) -> Result<i32> {
    if payload.len() > MAX_PAYLOAD {
        return Err(Errno::E2BIG.into());
    }
    let header = encode_header(payload.len(), fds.len(), hint);
    sock::send_parts_with_fds(ctl, &header, payload, fds)?;
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
        assert_eq!(
            decode_header(encode_header(1234, 3, 0b101)).unwrap(),
            (1234, 3, 0b101)
        );
    }

    #[test]
    fn absurd_headers_are_refused_without_allocating() {
        assert!(matches!(
            decode_header(encode_header(usize::MAX, 1, 0)),
            Err(Error::Protocol(_))
        ));
        assert!(matches!(
            decode_header(encode_header(10, 10_000, 0)),
            Err(Error::Protocol(_))
        ));
    }
}
