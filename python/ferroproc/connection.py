"""Connections between processes: `Pipe`, `Listener`, `Client` and `wait`.

`Connection` is native (``ferroproc._ferroproc.Connection``): framing, the GIL-free waits and
the zero-copy paths of `send_bytes` and `recv_bytes_into` run in Rust. The frame format and the
authentication handshake are those of the running Python's `multiprocessing.connection`, so a
ferroproc end talks to a stdlib end of the same socket or pipe.

Differences:
    * A malformed length (negative, other than the 8-byte-length marker) raises
      `OSError("bad message length")` (the stdlib returns ``b""``); an absurd announced length
      never allocates that much: the peer closing early gives `OSError`, as for any frame cut
      short (the stdlib raises `MemoryError` or allocates it).
    * `Listener` checks `authkey` before binding (the stdlib leaks the socket on a bad key).
    * `wait` accepts an object twice (the stdlib's selector raises `KeyError`).
    * `recv_bytes_into` rejects a read-only or non-contiguous buffer before consuming the
      message; `send_bytes` of a non-contiguous buffer is always `BufferError`.
    * `Connection` pickles only through `ForkingPickler` (a plain `pickle.dumps` of a connection
      raises `TypeError`; the stdlib pickles a meaningless handle number).
    * `Pipe()` asks for a 1 MiB socket send buffer; a receiver that usually waits polls for up to
      ~25 microseconds (GIL released, yielding the CPU between tries) before sleeping.
"""

from __future__ import annotations

import _thread
import copyreg
import io
import itertools
import os
import pickle
import socket
import sys

from . import context, process, reduction, util
from ._ferroproc import Connection, Pipe, wait

__all__ = ["Client", "Listener", "Pipe", "wait"]

BUFSIZE = 8192
# Local connections get a generous connect timeout (the stdlib's value).
CONNECTION_TIMEOUT = 20.0

_mmap_counter = itertools.count()

default_family = "AF_UNIX"
families = ["AF_INET", "AF_UNIX"]

_ForkingPickler = reduction.ForkingPickler


class _SendPickler(pickle.Pickler):
    """Pickles like `ForkingPickler` for `Connection.send`, without its per-message costs.

    `ForkingPickler` builds a pickler and a merged dispatch table (`copyreg`'s, then the
    registered reducers) for every message. This pickler is reused (one per thread, memo
    cleared after each message) and keeps its merged table until one of the source tables
    compares different, so the output is the same bytes for a fraction of the cost.
    """

    def __init__(self):
        self._buf = io.BytesIO()
        super().__init__(self._buf)
        self.busy = False
        self._sources = None

    def dumps(self, obj):
        sources = _reducer_sources()
        if sources != self._sources:
            table = dict(sources[0])
            for extra in sources[1:]:
                table.update(extra)
            self.dispatch_table = table
            self._sources = tuple(dict(d) for d in sources)
        buf = self._buf
        self.busy = True
        try:
            self.dump(obj)
            return buf.getvalue()
        finally:
            self.clear_memo()
            buf.seek(0)
            buf.truncate()
            self.busy = False


def _reducer_sources():
    """The dispatch tables `ForkingPickler` merges, lowest precedence first."""
    std = sys.modules.get("multiprocessing.reduction")
    if std is None or std is reduction:
        return (copyreg.dispatch_table, _ForkingPickler._extra_reducers)
    return (
        copyreg.dispatch_table,
        std.ForkingPickler._extra_reducers,
        _ForkingPickler._extra_reducers,
    )


_local = _thread._local()  # `threading.local`, without importing `threading`


def __getattr__(name):
    # The stdlib's exception classes, re-exported as its module does, resolved on first use:
    # importing the stdlib package (and with it `threading`) up front would make every later
    # fork of this process dearer.
    if name in ("AuthenticationError", "BufferTooShort"):
        return getattr(context, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _dumps(obj):
    """The general pickling path of `Connection.send` (objects that may need reducers).

    Plain builtin data takes a faster path in the native code (`pickle.dumps`, whose output
    is identical for it).
    """
    if type(_ForkingPickler.__dict__.get("_extra_reducers")) is not dict:
        return _ForkingPickler.dumps(obj)  # an unusual reducer: use it as it is
    pickler = getattr(_local, "pickler", None)
    if pickler is None or pickler.busy:  # first use in this thread, or a reducer re-entered
        pickler = _local.pickler = _SendPickler()
    return pickler.dumps(obj)


def arbitrary_address(family):
    """A fresh address of `family` that nothing listens on yet."""
    if family == "AF_INET":
        return ("localhost", 0)
    if family == "AF_UNIX":
        import tempfile  # lazily: children that only receive a connection never need it

        return tempfile.mktemp(prefix="listener-", dir=util.get_temp_dir())
    if family == "AF_PIPE":
        import tempfile

        return tempfile.mktemp(prefix=rf"\\.\pipe\pyc-{os.getpid()}-{next(_mmap_counter)}-", dir="")
    raise ValueError("unrecognized family")


def _validate_family(family):
    if family == "AF_PIPE":
        raise ValueError(f"Family {family} is not recognized.")


def address_type(address):
    """The family an address belongs to: 'AF_INET', 'AF_UNIX' or 'AF_PIPE'."""
    if type(address) is tuple:
        return "AF_INET"
    if type(address) is str and address.startswith("\\\\"):
        return "AF_PIPE"
    if type(address) is str or util.is_abstract_socket_namespace(address):
        return "AF_UNIX"
    raise ValueError(f"address type of {address!r} unrecognized")


class SocketListener:
    """A bound, listening socket that hands out `Connection`s."""

    def __init__(self, address, family, backlog=1):
        self._socket = socket.socket(getattr(socket, family))
        try:
            self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._socket.setblocking(True)
            self._socket.bind(address)
            self._socket.listen(backlog)
            self._address = self._socket.getsockname()
        except OSError:
            self._socket.close()
            raise
        self._family = family
        self._last_accepted = None
        if family == "AF_UNIX" and not util.is_abstract_socket_namespace(address):
            # A filesystem socket is removed when the listener goes (abstract ones vanish
            # with their last descriptor).
            self._unlink = util.Finalize(self, os.unlink, args=(address,), exitpriority=0)
        else:
            self._unlink = None

    def accept(self):
        # Wait natively first, so Ctrl-C interrupts a listener with no client.
        wait([self._socket])
        s, self._last_accepted = self._socket.accept()
        s.setblocking(True)
        return Connection(s.detach())

    def close(self):
        try:
            self._socket.close()
        finally:
            unlink, self._unlink = self._unlink, None
            if unlink is not None:
                unlink()


def SocketClient(address):
    """A `Connection` to the listening socket at `address`."""
    family = address_type(address)
    with socket.socket(getattr(socket, family)) as s:
        s.setblocking(True)
        s.connect(address)
        return Connection(s.detach())


class Listener:
    """Listens on `address` (a fresh one by default) and accepts connections, optionally
    authenticating each with `authkey`."""

    def __init__(self, address=None, family=None, backlog=1, authkey=None):
        family = family or (address and address_type(address)) or default_family
        address = address or arbitrary_address(family)
        _validate_family(family)
        # Checked before binding, so a bad key leaves no socket behind.
        if authkey is not None and not isinstance(authkey, bytes):
            raise TypeError("authkey should be a byte string")
        self._listener = SocketListener(address, family, backlog)
        self._authkey = authkey

    def accept(self):
        """Waits for a client and returns the `Connection` to it."""
        if self._listener is None:
            raise OSError("listener is closed")
        c = self._listener.accept()
        if self._authkey:
            deliver_challenge(c, self._authkey)
            answer_challenge(c, self._authkey)
        return c

    def close(self):
        """Stops listening (and removes a filesystem socket)."""
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()

    @property
    def address(self):
        return self._listener._address

    @property
    def last_accepted(self):
        return self._listener._last_accepted

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc_value, exc_tb):
        self.close()


def Client(address, family=None, authkey=None):
    """Connects to the `Listener` at `address`, authenticating with `authkey` if given."""
    family = family or address_type(address)
    _validate_family(family)
    c = SocketClient(address)
    if authkey is not None and not isinstance(authkey, bytes):
        raise TypeError("authkey should be a byte string")
    if authkey is not None:
        answer_challenge(c, authkey)
        deliver_challenge(c, authkey)
    return c


# Authentication: the running Python's handshake. For 3.11 it is an HMAC-MD5 over a random
# challenge; later versions negotiate the digest, and there the stdlib's functions are used
# directly so both ends always agree.

MESSAGE_LENGTH = 20

CHALLENGE = b"#CHALLENGE#"
WELCOME = b"#WELCOME#"
FAILURE = b"#FAILURE#"

if sys.version_info >= (3, 12):  # pragma: no cover - exercised on newer interpreters only
    from multiprocessing.connection import answer_challenge, deliver_challenge
else:

    def _hmac_md5(key, message):
        import hmac  # lazily: it loads OpenSSL

        return hmac.new(key, message, "md5").digest()

    def _check_authkey(authkey):
        if not isinstance(authkey, bytes):
            raise ValueError(f"Authkey must be bytes, not {type(authkey)!s}")

    def deliver_challenge(connection, authkey):
        """Challenges the peer to prove it knows `authkey`."""
        _check_authkey(authkey)
        nonce = os.urandom(MESSAGE_LENGTH)
        connection.send_bytes(CHALLENGE + nonce)
        expected = _hmac_md5(authkey, nonce)
        answer = connection.recv_bytes(256)  # a short reply is all that is accepted
        import hmac

        if hmac.compare_digest(answer, expected):
            connection.send_bytes(WELCOME)
        else:
            connection.send_bytes(FAILURE)
            raise context.AuthenticationError("digest received was wrong")

    def answer_challenge(connection, authkey):
        """Proves to the peer that we know `authkey`."""
        _check_authkey(authkey)
        challenge = connection.recv_bytes(256)
        if not challenge.startswith(CHALLENGE):
            raise AssertionError(f"message = {challenge!r}")
        nonce = challenge[len(CHALLENGE) :]
        connection.send_bytes(_hmac_md5(authkey, nonce))
        if connection.recv_bytes(256) != WELCOME:
            raise context.AuthenticationError("digest sent was rejected")


# xmlrpc-serialised connections, as in the stdlib.


class ConnectionWrapper:
    """A connection whose `send`/`recv` use the given `dumps`/`loads`."""

    def __init__(self, conn, dumps, loads):
        self._conn = conn
        self._dumps = dumps
        self._loads = loads
        for attr in ("fileno", "close", "poll", "recv_bytes", "send_bytes"):
            setattr(self, attr, getattr(conn, attr))

    def send(self, obj):
        self._conn.send_bytes(self._dumps(obj))

    def recv(self):
        return self._loads(self._conn.recv_bytes())


def _xml_dumps(obj):
    import xmlrpc.client

    return xmlrpc.client.dumps((obj,), None, None, None, 1).encode("utf-8")


def _xml_loads(s):
    import xmlrpc.client

    (obj,), _method = xmlrpc.client.loads(s.decode("utf-8"))
    return obj


class XmlListener(Listener):
    def accept(self):
        return ConnectionWrapper(Listener.accept(self), _xml_dumps, _xml_loads)


def XmlClient(*args, **kwds):
    return ConnectionWrapper(Client(*args, **kwds), _xml_dumps, _xml_loads)


# Connections pickle into a child being started: the descriptor travels by `DupFd`.


def reduce_connection(conn):
    df = reduction.DupFd(conn.fileno())
    return rebuild_connection, (df, conn.readable, conn.writable, conn._lanes)


def rebuild_connection(df, readable, writable, lanes=False):
    # `lanes`: both ends came from `Pipe()`, so large payloads may use shared-memory lanes.
    return Connection(df.detach(), readable, writable, _lanes=lanes)


reduction.register(Connection, reduce_connection)

# `reduction` registers its socket reducer lazily, from its own pickler, once `socket` is
# imported; `send` pickles without that pickler, and this module imports `socket` anyway.
if not getattr(reduction, "_socket_registered", True):
    reduction._register_socket()


def _register_with_stdlib(std_reduction):
    # The stdlib's pickler (a stdlib Process or Queue) can then carry ferroproc connections too.
    std_reduction.register(Connection, reduce_connection)


# Once the stdlib's `multiprocessing.reduction` is loaded, not by importing it here: the stdlib
# package costs 10 ms and imports `threading`, which makes every later fork dearer.
process.after_import("multiprocessing.reduction", _register_with_stdlib)
