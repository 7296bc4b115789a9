//! Unix-socket helpers: messages with descriptors attached (`SCM_RIGHTS`).

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::sys::socket::{
    recvmsg, sendmsg, socketpair, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags,
    SockFlag, SockType,
};

use crate::error::{Error, Result};

/// Most descriptors one message may carry (the kernel's `SCM_MAX_FD` is 253).
pub const MAX_FDS: usize = 253;

/// A connected pair of close-on-exec unix `SOCK_SEQPACKET` sockets: message boundaries are
/// kept, so several writers (one at a time) can share one end.
///
/// # Errors
/// The `socketpair` errno (EMFILE, ENFILE).
pub fn seqpacket_pair() -> Result<(OwnedFd, OwnedFd)> {
    Ok(socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )?)
}

/// Sends `data` with `fds` attached to its first byte; the rest of `data` follows as plain
/// stream bytes if the kernel takes it in pieces.
///
/// # Errors
/// EINVAL for more than [`MAX_FDS`] descriptors or empty `data`; the `sendmsg` errno.
pub fn send_with_fds(sock: BorrowedFd<'_>, data: &[u8], fds: &[RawFd]) -> Result<()> {
    send_parts_with_fds(sock, data, &[], fds)
}

/// [`send_with_fds`] for `head` followed by `tail`, in one `sendmsg` when the socket has room:
/// the reader is woken once, with the whole message there (a second write would wake it
/// again after it had blocked for the rest).
///
/// # Errors
/// As [`send_with_fds`] (`head` must not be empty).
pub fn send_parts_with_fds(
    sock: BorrowedFd<'_>,
    head: &[u8],
    tail: &[u8],
    fds: &[RawFd],
) -> Result<()> {
    if fds.len() > MAX_FDS || head.is_empty() {
        return Err(Errno::EINVAL.into());
    }
    let cmsg = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &cmsg };
    let sent = loop {
        match sendmsg::<()>(
            sock.as_raw_fd(),
            &[IoSlice::new(head), IoSlice::new(tail)],
            cmsgs,
            MsgFlags::MSG_NOSIGNAL,
            None,
        ) {
            Ok(n) => break n,
            Err(Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    };
    if sent < head.len() {
        send_all(sock, &head[sent..])?;
        send_all(sock, tail)?;
    } else if sent < head.len() + tail.len() {
        send_all(sock, &tail[sent - head.len()..])?;
    }
    Ok(())
}

/// Sends all of `data` on a stream socket, without SIGPIPE if the peer has gone (EPIPE then).
fn send_all(sock: BorrowedFd<'_>, mut data: &[u8]) -> Result<()> {
    while !data.is_empty() {
        match nix::sys::socket::send(sock.as_raw_fd(), data, MsgFlags::MSG_NOSIGNAL) {
            Ok(n) => data = &data[n..],
            Err(Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Receives exactly `buf.len()` bytes, collecting descriptors sent with them. Received
/// descriptors are close-on-exec.
///
/// # Errors
/// [`Error::Eof`] if the peer closed first; [`Error::Protocol`] if descriptors were truncated.
pub fn recv_with_fds(sock: BorrowedFd<'_>, buf: &mut [u8]) -> Result<Vec<OwnedFd>> {
    let mut fds = Vec::new();
    let mut cmsg_space = nix::cmsg_space!([RawFd; MAX_FDS]);
    let mut got = 0;
    while got < buf.len() {
        let mut iov = [IoSliceMut::new(&mut buf[got..])];
        let msg = match recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg_space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(m) => m,
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        };
        let n = msg.bytes;
        let truncated = msg.flags.contains(MsgFlags::MSG_CTRUNC);
        for c in msg.cmsgs().map_err(Error::from)? {
            if let ControlMessageOwned::ScmRights(raw) = c {
                for fd in raw {
                    // SAFETY: the kernel installed these descriptors in our table for this
                    // message; nothing else owns them yet.
                    fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                }
            }
        }
        if truncated {
            return Err(Error::Protocol(
                "descriptors were truncated in transit".into(),
            ));
        }
        if n == 0 {
            return Err(Error::Eof);
        }
        got += n;
    }
    Ok(fds)
}

/// Sends all of `data` with `fd` attached, without blocking: `Ok(false)` (nothing sent) when
/// the socket has no room for it now, or a signal interrupted the call. Meant for a short
/// frame, which a stream socket takes whole or not at all.
///
/// # Errors
/// EINVAL for empty `data`; `Protocol` if the kernel took only part of it; the `sendmsg`
/// errno (EPIPE when the peer has gone: never SIGPIPE).
pub fn send_nowait_with_fd(sock: BorrowedFd<'_>, data: &[u8], fd: BorrowedFd<'_>) -> Result<bool> {
    if data.is_empty() {
        return Err(Errno::EINVAL.into());
    }
    let fds = [fd.as_raw_fd()];
    let cmsg = [ControlMessage::ScmRights(&fds)];
    match sendmsg::<()>(
        sock.as_raw_fd(),
        &[IoSlice::new(data)],
        &cmsg,
        MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT,
        None,
    ) {
        Ok(n) if n == data.len() => Ok(true),
        Ok(_) => Err(Error::Protocol("a short frame was split".into())),
        Err(Errno::EAGAIN | Errno::EINTR) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Reads into `buf` without blocking, keeping the first descriptor that comes with the bytes
/// (close-on-exec; any others are closed). `Io::Again` when nothing is there or a signal
/// interrupted the call.
///
/// # Errors
/// The `recvmsg` errno.
pub fn recv_nowait_keeping_fd(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
) -> Result<(super::stream::Io, Option<OwnedFd>)> {
    use super::stream::Io;
    let mut cmsg_space = nix::cmsg_space!([RawFd; 4]);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = match recvmsg::<()>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg_space),
        MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC,
    ) {
        Ok(m) => m,
        Err(Errno::EAGAIN | Errno::EINTR) => return Ok((Io::Again, None)),
        Err(e) => return Err(e.into()),
    };
    let n = msg.bytes;
    let mut kept = None;
    for c in msg.cmsgs().map_err(Error::from)? {
        if let ControlMessageOwned::ScmRights(raw) = c {
            for fd in raw {
                // SAFETY: the kernel installed this descriptor in our table for this message;
                // nothing else owns it yet.
                let owned = unsafe { OwnedFd::from_raw_fd(fd) };
                if kept.is_none() {
                    kept = Some(owned);
                }
            }
        }
    }
    Ok((Io::Done(n), kept))
}
