"""ferroproc's tracker of named shared memory: unlinks a segment once no live process holds it.

Runs as its own small process (``python -I -S _shm_tracker.py``; only stdlib imports), in its
own session and re-parented away from its starter, started on demand by the first process
that opens a named segment. Every process that opens or creates a segment keeps one stream
connection to it (not shared with its children) and announces the names it holds; a process
that dies, however it dies (even by ``kill -9``), closes its connection, and the tracker
unlinks every name whose holders are all gone. A name somebody unlinked explicitly is
forgotten. When its last client is gone, the tracker exits.

Protocol: newline-terminated ASCII lines ``<verb> <hex of the name's UTF-8>``, verbs ``H``
(this process holds the name), ``R`` (it no longer does: an open that failed) and ``U`` (the
name was unlinked: forget it everywhere). The tracker greets each accepted client with one
byte ``+``. Only clients of the same user are accepted.
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
            try:
                # Tells a client that connected to a running tracker that its connection was
                # taken (not dropped by a tracker that was just closing its listener).
                conn.send(b"+")
            except OSError:
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

    def read(socks, dead):
        """Reads what each socket has; a closed one is unregistered and added to `dead`."""
        for sock in socks:
            try:
                data = sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            if not data:
                sel.unregister(sock)
                dead.append(sock)
                continue
            *lines, pending[sock] = (pending[sock] + data).split(b"\n")
            for line in lines:
                handle(sock, line)

    accept_all()
    while True:
        if not pending:
            # Nobody left: take any connection still queued, else stop listening and exit.
            accept_all()
            if not pending:
                listener.close()
                return
        ready = [key.fileobj for key, _ in sel.select()]
        if listener in ready:
            ready.remove(listener)
            accept_all()
        dead = []
        read(ready, dead)
        if dead:
            # Causality: a hold announced before these processes died (say, by a process that
            # attached a segment and then told the killer so) is already waiting in some
            # connection, maybe one not accepted yet. Take all of it before releasing.
            while True:
                accept_all()
                more = [key.fileobj for key, _ in sel.select(0) if key.fileobj is not listener]
                if not more:
                    break
                read(more, dead)
            for conn in dead:
                drop(conn)


def main():
    """Entry point of the tracker process.

    Forks once and lets the starter reap the first process at once, so the tracker is nobody's
    child (no zombie, no stray descendant in the starter's process tree).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if os.fork() != 0:
        os._exit(0)
    serve(socket.socket(fileno=_FD))


if __name__ == "__main__":
    main()
