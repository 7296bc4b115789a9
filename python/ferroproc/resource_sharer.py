"""Descriptors handed to other processes outside process start: what lets a `Connection` or a
socket be sent to a process that is already running (the stdlib's
`multiprocessing.resource_sharer`, Unix API: `DupFd`, `stop`).

A process that shares a descriptor runs one daemon thread serving a unix socket in the
abstract namespace (nothing on disk, gone with the process). `DupFd(fd)` keeps a duplicate of
`fd` under a random 128-bit token; the pickled handle carries the socket's address and the
token, and `detach()` in the receiving process connects, sends the token and gets the
descriptor back with `SCM_RIGHTS`. The token is the capability (it exists only in the pickle);
the server also checks with `SO_PEERCRED` that the peer runs as the same user, which is what
the stdlib's authkey handshake amounts to between processes of one program. Each descriptor
is served once; `stop()` closes those never claimed.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import struct
import threading

from . import util

__all__ = ["DupFd", "stop"]

_TOKEN_BYTES = 16
#: How long the server waits for a connected peer to name its descriptor.
_PEER_TIMEOUT = 10.0


class _Sharer:
    """This process's server of shared descriptors (started on first use)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._fds = {}  # token -> duplicate descriptor
        self._sock = None
        self._address = None
        self._thread = None
        self._hooked = False

    def _arm(self):
        # The after-fork reset is registered on first use: until then there is nothing to
        # reset, and every hook is Python code each forked child runs (and pays faults for).
        if not self._hooked:
            # Registered before the flag is set: a thread that sees the flag may take the
            # lock at once. (Two registrations are harmless.)
            os.register_at_fork(after_in_child=self._after_fork_in_child)
            self._hooked = True

    def share(self, fd):
        """Keeps a duplicate of `fd` to be claimed once; returns `(address, token)`."""
        self._arm()
        dup = os.dup(fd)
        try:
            with self._lock:
                if self._sock is None:
                    self._start()
                token = secrets.token_bytes(_TOKEN_BYTES)
                self._fds[token] = dup
                return self._address, token
        except BaseException:
            os.close(dup)
            raise

    def _start(self):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        address = f"\0ferroproc-fds-{os.getpid()}-{secrets.token_hex(8)}"
        try:
            sock.bind(address)
            sock.listen(16)
        except BaseException:
            sock.close()
            raise
        util.debug("serving shared descriptors at %r", address)
        thread = threading.Thread(
            target=self._serve, args=(sock,), name="ferroproc-resource-sharer", daemon=True
        )
        thread.start()
        self._sock, self._address, self._thread = sock, address, thread

    def _serve(self, sock):
        # Signals are the main thread's business.
        signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return  # `stop()` shut the socket down
            with conn:
                try:
                    self._answer(conn)
                except OSError as e:
                    util.debug("a shared-descriptor request failed: %r", e)

    def _answer(self, conn):
        conn.settimeout(_PEER_TIMEOUT)
        token = b""
        while len(token) < _TOKEN_BYTES:
            chunk = conn.recv(_TOKEN_BYTES - len(token))
            if not chunk:
                return
            token += chunk
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _pid, uid, _gid = struct.unpack("3i", creds)
        if uid != os.geteuid():
            return
        with self._lock:
            fd = self._fds.pop(token, None)
        if fd is None:
            return  # unknown or already claimed: the peer sees the connection close
        try:
            socket.send_fds(conn, [b"F"], [fd])
        finally:
            os.close(fd)

    def stop(self, timeout=None):
        """Stops serving and closes the descriptors nobody claimed."""
        self._arm()
        with self._lock:
            sock, thread = self._sock, self._thread
            self._sock = self._address = self._thread = None
            fds, self._fds = self._fds, {}
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
            except OSError:
                pass
            if thread is not None:
                thread.join(timeout)
                if thread.is_alive():
                    util.sub_warning("the resource sharer's thread did not stop when asked")
            sock.close()
        for fd in fds.values():
            os.close(fd)

    def _after_fork_in_child(self):
        # The serving thread stayed in the parent, which keeps serving what it shared; this
        # process drops its copies.
        self._lock = threading.Lock()
        sock, self._sock = self._sock, None
        self._address = self._thread = None
        fds, self._fds = self._fds, {}
        if sock is not None:
            sock.close()
        for fd in fds.values():
            try:
                os.close(fd)
            except OSError:
                pass


_sharer = _Sharer()


def stop(timeout=None):
    """Stops this process's descriptor server and closes unclaimed descriptors."""
    _sharer.stop(timeout)


class DupFd:
    """A picklable handle for a duplicate of `fd`, claimable once by any process of this
    user."""

    def __init__(self, fd):
        self._address, self._token = _sharer.share(fd)

    def detach(self):
        """The descriptor, received from the process that shared it (call once)."""
        gone = "the shared descriptor is gone (already claimed, or its sharer stopped)"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(self._address)
            try:
                s.sendall(self._token)
                _msg, fds, _flags, _addr = socket.recv_fds(s, 1, 1)
            except (BrokenPipeError, ConnectionResetError) as e:  # refused early
                raise ConnectionError(gone) from e
        if not fds:
            raise ConnectionError(gone)
        return fds[0]
