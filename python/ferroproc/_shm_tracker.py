"""ferroproc's tracker of named shared memory: unlinks a segment once no live process holds it.

Runs as its own small process (``python -I -S _shm_tracker.py``; only stdlib imports), in its
own session, started on demand by the first process that opens a named segment. Every process
that opens or creates a segment keeps one stream connection to it (not shared with its
children) and announces the names it holds; a process that dies, however it dies (even by
``kill -9``), closes its connection, and the tracker unlinks every name whose holders are all
gone. A name somebody unlinked explicitly is forgotten. When its last client is gone, the
tracker exits.

Protocol: newline-terminated ASCII lines ``<verb> <hex of the name's UTF-8>``, verbs ``H``
(this process holds the name), ``R`` (it no longer does: an open that failed) and ``U`` (the
name was unlinked: forget it everywhere). Only clients of the same user are accepted.
"""

import os
import selectors
import signal
import socket
import struct

__all__ = ["main", "serve"]

_FD = 3  # where the starter places the listening socket


def _unlink(name):
    import _posixshmem

    try:
        _posixshmem.shm_unlink(name)
    except OSError:
        pass


def serve(listener):
    """Accepts clients on `listener` until none is left; unlinks names left without holders."""
    sel = selectors.DefaultSelector()
    listener.setblocking(False)
    sel.register(listener, selectors.EVENT_READ)
    pending = {}  # conn -> partial line
    holds = {}  # conn -> set of names
    holders = {}  # name -> set of conns
    uid = os.getuid()
    cred = struct.Struct("3i")

    def accept_all():
        while True:
            try:
                conn, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            peer = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, cred.size)
            if cred.unpack(peer)[1] != uid:
                conn.close()
                continue
            conn.setblocking(False)
            pending[conn] = b""
            holds[conn] = set()
            sel.register(conn, selectors.EVENT_READ)

    def release(conn, name):
        holds.get(conn, set()).discard(name)
        who = holders.get(name)
        if who is not None:
            who.discard(conn)
            if not who:
                del holders[name]
                _unlink(name)

    def drop(conn):
        sel.unregister(conn)
        for name in holds.pop(conn):
            release(conn, name)
        del pending[conn]
        conn.close()

    def handle(conn, line):
        verb, _, arg = line.partition(b" ")
        try:
            name = bytes.fromhex(arg.decode("ascii")).decode("utf-8")
        except ValueError:
            return
        if verb == b"H":
            holds[conn].add(name)
            holders.setdefault(name, set()).add(conn)
        elif verb == b"R":
            release(conn, name)
        elif verb == b"U":
            for c in holders.pop(name, ()):
                holds[c].discard(name)

    accept_all()
    while True:
        if not pending:
            # Nobody left: take any connection still queued, else stop listening and exit.
            accept_all()
            if not pending:
                listener.close()
                return
        for key, _ in sel.select():
            sock = key.fileobj
            if sock is listener:
                accept_all()
                continue
            try:
                data = sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            if not data:
                drop(sock)
                continue
            buf = pending[sock] + data
            *lines, pending[sock] = buf.split(b"\n")
            for line in lines:
                handle(sock, line)


def main():
    """Entry point of the tracker process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    serve(socket.socket(fileno=_FD))


if __name__ == "__main__":
    main()
