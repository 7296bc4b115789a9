"""Connections: Pipe, Connection methods, wait, Listener/Client, wire interop, hostile peers.

Every behavioural test runs against the stdlib (``multiprocessing``) and ferroproc through the
``impl`` fixture; tests that start children also run per start method (``ctx``). Interop tests
pair a stdlib end with a ferroproc end of one socket or pipe.
"""

from __future__ import annotations

import array
import gc
import importlib
import multiprocessing
import multiprocessing.connection as std_connection
import os
import pickle
import random
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time

import _conn_workers as workers
import pytest
from _workers import SCRIPT_TIMEOUT, SHORT_TIMEOUT


def conn_mod(impl):
    if impl is multiprocessing:
        return std_connection
    return importlib.import_module("ferroproc.connection")


@pytest.fixture
def conn(impl):
    """The implementation's ``connection`` module."""
    return conn_mod(impl)


@pytest.fixture
def pair(conn):
    a, b = conn.Pipe()
    yield a, b
    a.close()
    b.close()


class Plain:
    """A module-level class, so it pickles by reference."""

    def __init__(self, x):
        self.x = x

    def __eq__(self, other):
        return isinstance(other, Plain) and other.x == self.x

    def __hash__(self):
        return hash(self.x)


# -- Pipe and the Connection methods -----------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 64, 16384, 16385, 70000, 1 << 20, 3 * (1 << 20) + 7])
def test_send_recv_bytes_sizes(pair, size):
    a, b = pair
    data = os.urandom(size)
    if size > 100_000:
        # Bigger than the socket buffer: the writer must run concurrently with the reader.
        t = threading.Thread(target=a.send_bytes, args=(data,))
        t.start()
        got = b.recv_bytes()
        t.join(SHORT_TIMEOUT)
    else:
        a.send_bytes(data)
        got = b.recv_bytes()
    assert got == data
    assert type(got) is bytes


def test_duplex_both_directions(pair):
    a, b = pair
    a.send_bytes(b"ping")
    assert b.recv_bytes() == b"ping"
    b.send_bytes(b"pong")
    assert a.recv_bytes() == b"pong"


@pytest.mark.parametrize(
    "obj",
    [
        None,
        True,
        0,
        -(2**100),
        1.5,
        "text",
        b"bytes",
        bytearray(b"ba"),
        (1, (2, [3])),
        [1] * 5000,
        {"k": {1, 2}, "f": frozenset({3})},
        Plain(7),
        [Plain(1), {"p": Plain(2)}],
        range(3),
        int,
    ],
    ids=lambda o: type(o).__name__,
)
def test_send_recv_objects(pair, obj):
    a, b = pair
    a.send(obj)
    assert b.recv() == obj


def test_send_pickles_like_forking_pickler(impl, pair):
    """The bytes on the wire are what ForkingPickler.dumps produces (fast path included)."""
    a, b = pair
    reduction = impl.reduction if hasattr(impl, "reduction") else impl.context.reduction
    for obj in [(1, "abc", 2.5), {"a": [1, 2, None]}, Plain(3)]:
        a.send(obj)
        assert b.recv_bytes() == bytes(reduction.ForkingPickler.dumps(obj))


def test_registered_reducer_is_used(impl, pair):
    a, b = pair
    reduction = impl.reduction if hasattr(impl, "reduction") else impl.context.reduction

    class Local:  # not picklable by reference: only the reducer makes it work
        pass

    reduction.ForkingPickler.register(Local, lambda obj: (Plain, (42,)))
    a.send([Local()])
    assert b.recv() == [Plain(42)]
    # Re-registering (same type, new reducer) takes effect at once.
    reduction.ForkingPickler.register(Local, lambda obj: (Plain, (43,)))
    a.send([Local()])
    assert b.recv() == [Plain(43)]


def test_copyreg_registration_is_used(pair):
    import copyreg

    a, b = pair

    class Local:
        pass

    copyreg.pickle(Local, lambda obj: (Plain, (1,)))
    try:
        a.send(Local())
        assert b.recv() == Plain(1)
        copyreg.pickle(Local, lambda obj: (Plain, (2,)))
        a.send(Local())
        assert b.recv() == Plain(2)
    finally:
        del copyreg.dispatch_table[Local]


def test_unpicklable_send_raises_and_sends_nothing(pair):
    a, b = pair
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        a.send(lambda: None)
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        a.send([1, threading.Lock()])
    assert not b.poll(0.05)
    a.send("after")
    assert b.recv() == "after"


def test_send_bytes_from_buffers(pair):
    a, b = pair
    arr = array.array("i", range(10))
    a.send_bytes(arr)
    assert b.recv_bytes() == arr.tobytes()
    a.send_bytes(arr, 8, 12)  # offsets are in bytes
    assert b.recv_bytes() == arr.tobytes()[8:20]
    a.send_bytes(memoryview(b"abcdef")[1:4])
    assert b.recv_bytes() == b"bcd"
    a.send_bytes(bytearray(b"xyz"), 1)
    assert b.recv_bytes() == b"yz"
    a.send_bytes(b"abc", 3)
    assert b.recv_bytes() == b""


@pytest.mark.parametrize(
    ("offset", "size", "message"),
    [
        (-1, None, "offset is negative"),
        (11, None, "buffer length < offset"),
        (0, -1, "size is negative"),
        (5, 6, "buffer length < offset + size"),
    ],
)
def test_send_bytes_bad_offset_size(pair, offset, size, message):
    a, b = pair
    with pytest.raises(ValueError) as info:
        a.send_bytes(b"0123456789", offset, size)
    assert str(info.value) == message
    assert not b.poll(0)


def test_send_bytes_rejects_non_buffers(pair):
    a, _b = pair
    with pytest.raises(TypeError):
        a.send_bytes("text")


def test_send_bytes_non_contiguous_is_buffer_error(pair):
    a, b = pair
    # The stdlib fails with TypeError (concatenation) or BufferError (os.write) by size.
    with pytest.raises((BufferError, TypeError)):
        a.send_bytes(memoryview(b"abcdef")[::2])
    assert not b.poll(0.02)


def test_recv_bytes_into(impl, pair):
    a, b = pair
    buf = bytearray(10)
    a.send_bytes(b"abc")
    assert b.recv_bytes_into(buf) == 3
    assert buf[:3] == b"abc"
    a.send_bytes(b"xyz")
    assert b.recv_bytes_into(buf, 7) == 3
    assert buf == bytearray(b"abc\0\0\0\0xyz")
    arr = array.array("i", [0] * 4)
    a.send_bytes(array.array("i", [1, 2, 3]))
    assert b.recv_bytes_into(arr, 4) == 12
    assert list(arr) == [0, 1, 2, 3]
    a.send_bytes(b"")
    assert b.recv_bytes_into(buf, 10) == 0


def test_recv_bytes_into_large(pair):
    a, b = pair
    data = os.urandom(5 << 20)
    buf = bytearray(len(data) + 3)
    t = threading.Thread(target=a.send_bytes, args=(data,))
    t.start()
    assert b.recv_bytes_into(buf, 3) == len(data)
    t.join(SHORT_TIMEOUT)
    assert buf[3:] == data


def test_recv_bytes_into_too_short(impl, pair):
    a, b = pair
    a.send_bytes(b"0123456789")
    with pytest.raises(impl.BufferTooShort) as info:
        b.recv_bytes_into(bytearray(4))
    assert info.value.args[0] == b"0123456789"
    a.send_bytes(b"abcd")
    with pytest.raises(impl.BufferTooShort):
        b.recv_bytes_into(bytearray(5), 2)
    a.send_bytes(b"next")
    assert b.recv_bytes() == b"next"


def test_recv_bytes_into_bad_offset(pair):
    _a, b = pair
    with pytest.raises(ValueError, match="negative offset"):
        b.recv_bytes_into(bytearray(4), -1)
    with pytest.raises(ValueError, match="offset too large"):
        b.recv_bytes_into(bytearray(4), 5)


def test_recv_bytes_maxlength(pair):
    a, b = pair
    with pytest.raises(ValueError, match="negative maxlength"):
        b.recv_bytes(-1)
    a.send_bytes(b"12345")
    assert b.recv_bytes(5) == b"12345"
    a.send_bytes(b"123456")
    with pytest.raises(OSError, match="bad message length"):
        b.recv_bytes(5)
    # The stream is out of step: a duplex end stops being readable.
    assert not b.readable
    with pytest.raises(OSError, match="connection is write-only"):
        b.recv_bytes()


def test_maxlength_on_read_only_end_closes(conn):
    r, w = conn.Pipe(duplex=False)
    w.send_bytes(b"too long")
    with pytest.raises(OSError, match="bad message length"):
        r.recv_bytes(3)
    assert r.closed
    w.close()


def test_poll(pair):
    a, b = pair
    assert b.poll() is False
    assert b.poll(0.05) is False
    assert b.poll(-1) is False
    start = time.monotonic()
    threading.Timer(0.1, a.send_bytes, args=(b"x",)).start()
    assert b.poll(SHORT_TIMEOUT) is True
    assert time.monotonic() - start < SHORT_TIMEOUT / 2
    assert b.poll(None) is True
    assert b.recv_bytes() == b"x"
    a.close()
    assert b.poll(1) is True  # end of file counts as readable
    with pytest.raises(EOFError):
        b.recv_bytes()


def test_one_way_pipe(conn):
    r, w = conn.Pipe(duplex=False)
    assert (r.readable, r.writable, w.readable, w.writable) == (True, False, False, True)
    with pytest.raises(OSError, match="connection is read-only"):
        r.send_bytes(b"x")
    with pytest.raises(OSError, match="connection is read-only"):
        r.send(1)
    with pytest.raises(OSError, match="connection is write-only"):
        w.recv_bytes()
    with pytest.raises(OSError, match="connection is write-only"):
        w.recv()
    with pytest.raises(OSError, match="connection is write-only"):
        w.poll()
    with pytest.raises(OSError, match="connection is write-only"):
        w.recv_bytes_into(bytearray(3))
    w.send({"one": "way"})
    assert r.recv() == {"one": "way"}
    big = os.urandom(300_000)
    t = threading.Thread(target=w.send_bytes, args=(big,))
    t.start()
    assert r.recv_bytes() == big
    t.join(SHORT_TIMEOUT)
    w.close()
    with pytest.raises(EOFError):
        r.recv()
    r.close()


@pytest.mark.parametrize(
    "op",
    ["fileno", "poll", "recv", "recv_bytes", "send", "send_bytes", "recv_bytes_into"],
)
def test_closed_connection_raises(conn, op):
    a, b = conn.Pipe()
    a.close()
    assert a.closed
    args = {"send": (1,), "send_bytes": (b"x",), "recv_bytes_into": (bytearray(4),)}.get(op, ())
    with pytest.raises(OSError, match="handle is closed"):
        getattr(a, op)(*args)
    a.close()  # closing twice is fine
    b.close()


def test_properties_and_context_manager(conn):
    a, b = conn.Pipe()
    assert not a.closed and a.readable and a.writable
    assert isinstance(a.fileno(), int) and a.fileno() != b.fileno()
    with a as entered:
        assert entered is a
    assert a.closed
    with b:
        pass
    assert b.closed


def test_connection_constructor_validation(conn):
    with pytest.raises(ValueError, match="invalid handle"):
        conn.Connection(-1)
    r, w = os.pipe()
    with pytest.raises(ValueError, match="at least one"):
        conn.Connection(r, readable=False, writable=False)
    c = conn.Connection(r, writable=False)
    d = conn.Connection(w, readable=False)
    d.send_bytes(b"raw")
    assert c.recv_bytes() == b"raw"
    c.close()
    d.close()


def test_fds_are_not_inherited(pair):
    a, b = pair
    assert not os.get_inheritable(a.fileno())
    assert not os.get_inheritable(b.fileno())


# -- wait ------------------------------------------------------------------------------------


def test_wait_connections_sockets_and_fds(conn):
    a, b = conn.Pipe()
    c, d = conn.Pipe(duplex=False)
    s1, s2 = socket.socketpair()
    r, w = os.pipe()
    r2, w2 = os.pipe()

    class HasFileno:
        def fileno(self):
            return r2

    objs = [b, c, s1, r, HasFileno()]
    assert conn.wait(objs, 0) == []
    assert conn.wait(objs, 0.05) == []
    a.send_bytes(b"1")
    assert conn.wait(objs, SHORT_TIMEOUT) == [b]
    s2.send(b"s")
    os.write(w, b"w")
    os.write(w2, b"w")
    ready = conn.wait(objs, SHORT_TIMEOUT)
    assert set(map(id, ready)) == {id(b), id(s1), id(r), id(objs[4])}
    threading.Timer(0.1, d.send, args=("late",)).start()
    assert conn.wait([c], SHORT_TIMEOUT) == [c]
    assert c.recv() == "late"
    for x in (a, b, c, d, s1, s2):
        x.close()
    for f in (r, w, r2, w2):
        os.close(f)


def test_wait_timeout_is_honoured(conn):
    a, b = conn.Pipe()
    start = time.monotonic()
    assert conn.wait([b], 0.2) == []
    elapsed = time.monotonic() - start
    assert 0.15 < elapsed < 5
    a.close()
    b.close()


def test_wait_process_sentinels(ctx, conn):
    p = ctx.Process(target=workers.sleep_then_exit, args=(0.2,))
    p.start()
    a, b = conn.Pipe()
    ready = conn.wait([b, p.sentinel], SHORT_TIMEOUT)
    assert ready == [p.sentinel]
    p.join(SHORT_TIMEOUT)
    assert p.exitcode == 0
    p.close()
    a.close()
    b.close()


# -- children --------------------------------------------------------------------------------


def test_child_echo_bytes_and_objects(ctx):
    a, b = ctx.Pipe()
    p = ctx.Process(target=workers.echo_bytes, args=(b, 3))
    p.start()
    b.close()
    for msg in (b"", b"hello", os.urandom(200_000)):
        t = threading.Thread(target=a.send_bytes, args=(msg,))
        t.start()
        assert a.recv_bytes() == msg
        t.join(SHORT_TIMEOUT)
    p.join(SHORT_TIMEOUT)
    assert p.exitcode == 0
    with pytest.raises(EOFError):
        a.recv_bytes()
    a.close()
    p.close()

    a, b = ctx.Pipe()
    p = ctx.Process(target=workers.echo_objects, args=(b, 2))
    p.start()
    b.close()
    for obj in ((1, "two", 3.0), {"plain": Plain(1)}):
        a.send(obj)
        assert a.recv() == obj
    p.join(SHORT_TIMEOUT)
    assert p.exitcode == 0
    a.close()
    p.close()


def test_child_one_way_pipe(ctx):
    r, w = ctx.Pipe(duplex=False)
    p = ctx.Process(target=workers.write_only, args=(w, ["from", "child"]))
    p.start()
    w.close()
    assert r.poll(SHORT_TIMEOUT)
    assert r.recv() == ["from", "child"]
    p.join(SHORT_TIMEOUT)
    assert p.exitcode == 0
    r.close()
    p.close()


def test_large_objects_in_a_row(pair):
    # ferroproc unpickles a large message from a view of its receive buffer, which the next
    # message reuses: what the first gave must not change.
    a, b = pair
    objs = [
        (i, os.urandom(3 << 20), [Plain(j) for j in range(1000)], "s" * (1 << 20)) for i in range(3)
    ]
    t = threading.Thread(target=lambda: [a.send(o) for o in objs])
    t.start()
    got = [b.recv() for _ in objs]
    t.join(SHORT_TIMEOUT)
    assert got == objs
    assert [type(g[1]) for g in got] == [bytes] * 3


def test_a_large_message_is_unpickled_without_a_copy(impl):
    # ferroproc: the pickle is loaded from a view of the receive buffer (Rust memory), so the
    # only Python allocation of its size is the object it holds.
    if impl.__name__ != "ferroproc":
        pytest.skip("ferroproc's receive path")
    import tracemalloc

    ctx = impl.get_context("fork")
    a, b = ctx.Pipe()
    size = 8 << 20
    p = ctx.Process(target=workers.send_pickled_payload, args=(b, size))
    p.start()
    b.close()
    assert a.poll(SHORT_TIMEOUT)
    tracemalloc.start()
    try:
        got = a.recv()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    p.join(SHORT_TIMEOUT)
    assert p.exitcode == 0
    assert got == bytes(range(256)) * (size // 256)
    assert peak < size * 1.5, peak  # a `bytes` copy of the message would double it
    a.close()


def test_child_bulk_and_recv_into(ctx):
    a, b = ctx.Pipe()
    size = 3 << 20
    p = ctx.Process(target=workers.send_payload, args=(b, size, 2))
    p.start()
    b.close()
    expected = bytes(range(256)) * (size // 256)
    assert a.recv_bytes() == expected
    buf = bytearray(size)
    assert a.recv_bytes_into(buf) == size
    assert buf == expected
    p.join(SHORT_TIMEOUT)
    assert p.exitcode == 0
    a.close()
    p.close()

    a, b = ctx.Pipe()
    p = ctx.Process(target=workers.recv_into_and_report, args=(b, 1 << 20))
    p.start()
    b.close()
    data = os.urandom(1 << 20)
    a.send_bytes(data)
    assert a.recv() == (len(data), sum(data))
    p.join(SHORT_TIMEOUT)
    assert p.exitcode == 0
    a.close()
    p.close()


# -- interop with the stdlib -----------------------------------------------------------------


def _ferro_connection():
    import ferroproc.connection

    return ferroproc.connection


@pytest.mark.parametrize("ferro_side", ["reader", "writer"])
@pytest.mark.parametrize("kind", ["socketpair", "pipe"])
def test_raw_framing_interop(ferro_side, kind):
    fc = _ferro_connection()
    if kind == "socketpair":
        s1, s2 = socket.socketpair()
        fd_w, fd_r = s1.detach(), s2.detach()
    else:
        fd_r, fd_w = os.pipe()
    rmod, wmod = (fc, std_connection) if ferro_side == "reader" else (std_connection, fc)
    r = rmod.Connection(fd_r, writable=kind == "socketpair")
    w = wmod.Connection(fd_w, readable=kind == "socketpair")
    messages = [b"", b"a", os.urandom(16384), os.urandom(16385), os.urandom(1 << 20)]

    def produce():
        for m in messages:
            w.send_bytes(m)
        w.send({"obj": [1, 2.5, "x"], "p": Plain(5)})
        w.send_bytes(b"into-me")

    t = threading.Thread(target=produce)
    t.start()
    for m in messages:
        assert r.recv_bytes() == m
    assert r.recv() == {"obj": [1, 2.5, "x"], "p": Plain(5)}
    buf = bytearray(10)
    assert r.recv_bytes_into(buf, 1) == 7
    assert buf[1:8] == b"into-me"
    t.join(SHORT_TIMEOUT)
    w.close()
    with pytest.raises(EOFError):
        r.recv_bytes()
    r.close()


#: Just over 2 GiB: the length no longer fits the 4-byte header, so the large-frame form
#: (-1, then an 8-byte length) is used.
HUGE = (1 << 31) + 4097


@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    ("writer_impl", "reader_impl"),
    [("ferroproc", "ferroproc"), ("ferroproc", "stdlib"), ("stdlib", "ferroproc")],
)
def test_message_over_2_gib_crosses_between_implementations(writer_impl, reader_impl):
    mods = {"ferroproc": _ferro_connection(), "stdlib": std_connection}
    s1, s2 = socket.socketpair()
    w = mods[writer_impl].Connection(s1.detach())
    r = mods[reader_impl].Connection(s2.detach())
    pattern = bytes(range(251))  # a prime period, so a shifted or dropped chunk shows
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 1
        try:
            r.close()
            w.send_bytes(pattern * (HUGE // len(pattern)) + pattern[: HUGE % len(pattern)])
            w.send_bytes(b"after")
            code = 0
        finally:
            os._exit(code)
    w.close()
    try:
        buf = bytearray(HUGE + 10)
        assert r.poll(SHORT_TIMEOUT)
        assert r.recv_bytes_into(buf, 10) == HUGE
        view = memoryview(buf)[10:]
        for at in (0, 4096, 1 << 20, (1 << 31) - 7, HUGE - 300):
            start = at - at % len(pattern)
            assert view[start : start + 251 * 2] == (pattern * 2)[: len(view[start : start + 502])]
        del view
        assert r.recv_bytes() == b"after"
    finally:
        _, status = os.waitpid(pid, 0)
        r.close()
    assert os.waitstatus_to_exitcode(status) == 0


def test_header_bytes_match_stdlib():
    fc = _ferro_connection()
    for size in (0, 5, 16384, 16385, 100_000):
        r, w = os.pipe()
        payload = b"z" * size
        c = fc.Connection(w, readable=False)
        t = threading.Thread(target=c.send_bytes, args=(payload,))
        t.start()
        got = b""
        while len(got) < size + 4:
            got += os.read(r, 1 << 20)
        t.join(SHORT_TIMEOUT)
        assert got == struct.pack("!i", size) + payload
        c.close()
        os.close(r)


def _serve_once(listener, results, reply=b"hello from listener"):
    try:
        with listener.accept() as c:
            results.append(c.recv_bytes())
            c.send_bytes(reply)
            results.append(listener.last_accepted)
    except Exception as e:
        results.append(e)


def _addresses():
    return [
        pytest.param("AF_UNIX", None, id="unix"),
        pytest.param("AF_UNIX", "\0ferroproc-test-{pid}-{n}", id="abstract"),
        pytest.param("AF_INET", ("127.0.0.1", 0), id="inet"),
    ]


_counter = iter(range(10**9))


@pytest.mark.parametrize(("family", "address"), _addresses())
@pytest.mark.parametrize("authkey", [None, b"secret"], ids=["noauth", "auth"])
@pytest.mark.parametrize(
    ("listener_impl", "client_impl"),
    [
        ("ferroproc", "ferroproc"),
        ("ferroproc", "stdlib"),
        ("stdlib", "ferroproc"),
        ("stdlib", "stdlib"),
    ],
)
def test_listener_client_interop(family, address, authkey, listener_impl, client_impl):
    fc = _ferro_connection()
    lmod = fc if listener_impl == "ferroproc" else std_connection
    cmod = fc if client_impl == "ferroproc" else std_connection
    if isinstance(address, str):
        address = address.format(pid=os.getpid(), n=next(_counter))
    with lmod.Listener(address, family=family, authkey=authkey) as listener:
        results = []
        t = threading.Thread(target=_serve_once, args=(listener, results))
        t.start()
        with cmod.Client(listener.address, family=family, authkey=authkey) as c:
            c.send_bytes(b"hello from client")
            assert c.recv_bytes() == b"hello from listener"
        t.join(SHORT_TIMEOUT)
        assert results[0] == b"hello from client"
        if family == "AF_INET":
            assert results[1][0] == "127.0.0.1"
        path = listener.address
    if family == "AF_UNIX" and isinstance(path, str):
        assert not os.path.exists(path)


@pytest.mark.parametrize(
    ("listener_impl", "client_impl"),
    [("ferroproc", "ferroproc"), ("ferroproc", "stdlib"), ("stdlib", "ferroproc")],
)
def test_wrong_authkey(listener_impl, client_impl):
    fc = _ferro_connection()
    lmod = fc if listener_impl == "ferroproc" else std_connection
    cmod = fc if client_impl == "ferroproc" else std_connection
    with lmod.Listener(authkey=b"right") as listener:
        results = []
        t = threading.Thread(target=_serve_once, args=(listener, results))
        t.start()
        with pytest.raises(multiprocessing.AuthenticationError):
            cmod.Client(listener.address, authkey=b"wrong")
        t.join(SHORT_TIMEOUT)
        assert isinstance(results[0], multiprocessing.AuthenticationError)


def test_listener_api(conn):
    with conn.Listener() as listener:
        assert conn.address_type(listener.address) == "AF_UNIX"
        assert listener.last_accepted is None
        path = listener.address
        assert os.path.exists(path)
    assert not os.path.exists(path)
    listener.close()
    with pytest.raises(OSError, match="listener is closed"):
        listener.accept()
    if conn is not std_connection:  # the stdlib leaks the bound socket here
        with pytest.raises(TypeError, match="authkey should be a byte string"):
            conn.Listener(authkey="str")
    with pytest.raises(ValueError):
        conn.Listener(family="AF_PIPE")


def test_address_helpers(conn):
    assert conn.address_type(("localhost", 1)) == "AF_INET"
    assert conn.address_type("/tmp/x") == "AF_UNIX"
    assert conn.address_type("\0abstract") == "AF_UNIX"
    assert conn.address_type("\\\\.\\pipe\\x") == "AF_PIPE"
    with pytest.raises((TypeError, ValueError)):
        conn.address_type(42)
    assert conn.arbitrary_address("AF_INET") == ("localhost", 0)
    assert isinstance(conn.arbitrary_address("AF_UNIX"), str)
    with pytest.raises(ValueError):
        conn.arbitrary_address("AF_BOGUS")


def test_challenge_functions_directly(conn):
    a, b = conn.Pipe()
    errors = []

    def deliver():
        try:
            conn.deliver_challenge(a, b"k")
        except Exception as e:
            errors.append(e)

    t = threading.Thread(target=deliver)
    t.start()
    conn.answer_challenge(b, b"k")
    t.join(SHORT_TIMEOUT)
    assert errors == []
    with pytest.raises(ValueError):
        conn.deliver_challenge(a, "not bytes")
    a.close()
    b.close()


# -- hostile peers ---------------------------------------------------------------------------


def _rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


STDLIB_ALLOCATES = "the stdlib allocates the announced length (MemoryError/huge RSS)"
STDLIB_NEGATIVE = "the stdlib returns b'' for a negative length"


@pytest.mark.parametrize(
    ("raw", "expected", "stdlib_skip"),
    [
        pytest.param(b"", EOFError, None, id="empty"),
        pytest.param(b"\x00\x00", OSError, None, id="truncated-header"),
        pytest.param(b"\xff\xff\xff\xff\x00\x00", OSError, None, id="truncated-long-header"),
        pytest.param(struct.pack("!i", 100) + b"x" * 50, OSError, None, id="cut-frame"),
        pytest.param(
            struct.pack("!iQ", -1, 1 << 62) + b"x" * 10,
            OSError,
            STDLIB_ALLOCATES,
            id="length-2**62",
        ),
        pytest.param(
            struct.pack("!iQ", -1, (1 << 64) - 1), OSError, STDLIB_ALLOCATES, id="length-2**64-1"
        ),
        pytest.param(
            struct.pack("!i", 0x7FFFFFFF) + b"y" * 1000,
            OSError,
            STDLIB_ALLOCATES,
            id="length-2**31-1",
        ),
        pytest.param(struct.pack("!i", -5) + b"zz", OSError, STDLIB_NEGATIVE, id="negative"),
    ],
)
@pytest.mark.parametrize("kind", ["socketpair", "pipe"])
@pytest.mark.parametrize("method", ["recv_bytes", "recv", "recv_bytes_into"])
def test_hostile_bytes(impl, conn, raw, expected, stdlib_skip, kind, method):  # noqa: PLR0917
    if impl is multiprocessing and stdlib_skip:
        pytest.skip(stdlib_skip)
    if kind == "socketpair":
        s1, s2 = socket.socketpair()
        peer, fd = s1, s2.detach()
    else:
        r, w = os.pipe()
        peer, fd = os.fdopen(w, "wb", buffering=0), r
    c = conn.Connection(fd, writable=kind == "socketpair")
    before = _rss()
    if raw:
        peer.sendall(raw) if kind == "socketpair" else peer.write(raw)
    peer.close()
    args = (bytearray(64),) if method == "recv_bytes_into" else ()
    with pytest.raises(expected):
        getattr(c, method)(*args)
    assert _rss() - before < 64 << 20
    c.close()
    # The process is still fine.
    a, b = conn.Pipe()
    a.send("still usable")
    assert b.recv() == "still usable"
    a.close()
    b.close()


@pytest.mark.parametrize("seed", range(8))
def test_random_garbage(impl, conn, seed):
    rng = random.Random(seed)
    s1, s2 = socket.socketpair()
    c = conn.Connection(s2.detach())
    garbage = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 4096)))
    if impl is multiprocessing:
        # Only start with a sane length: the stdlib trusts the header for allocation.
        garbage = struct.pack("!i", rng.randrange(0, 1 << 16)) + garbage
    s1.sendall(garbage)
    s1.close()
    before = _rss()
    with pytest.raises((EOFError, OSError)):
        for _ in range(10_000):
            c.recv_bytes()
    assert _rss() - before < 64 << 20
    c.close()


def test_garbage_pickle_raises_unpickling_error(pair):
    a, b = pair
    a.send_bytes(b"\x80\x04not a pickle")
    with pytest.raises(Exception):  # noqa: B017 - UnpicklingError and friends vary
        b.recv()
    a.send("ok")
    assert b.recv() == "ok"


# -- signals ---------------------------------------------------------------------------------

_INTERRUPT_SCRIPT = textwrap.dedent(
    """
    import _thread, os, signal, sys, threading, time
    impl = sys.argv[1]
    how = sys.argv[2]
    op = sys.argv[3]
    if impl == "ferroproc":
        import ferroproc.connection as connection
    else:
        import multiprocessing.connection as connection
    main_id = threading.get_ident()

    def fire():
        if how == "interrupt_main":
            _thread.interrupt_main()
        else:
            signal.pthread_kill(main_id, signal.SIGINT)

    a, b = connection.Pipe()
    listener = connection.Listener() if op == "accept" else None
    blocked = {
        "recv": b.recv,
        "recv_bytes": b.recv_bytes,
        "recv_bytes_into": lambda: b.recv_bytes_into(bytearray(8)),
        "poll": lambda: b.poll(None),
        "wait": lambda: connection.wait([b]),
        "accept": lambda: listener.accept(),
    }[op]
    threading.Timer(0.3, fire).start()
    start = time.monotonic()
    try:
        blocked()
    except KeyboardInterrupt:
        elapsed = time.monotonic() - start
    else:
        sys.exit("no KeyboardInterrupt")
    assert elapsed < 5, elapsed
    a.send("works after")
    assert b.recv() == "works after"
    print("interrupted", round(elapsed, 3))
    """
)


@pytest.mark.parametrize("op", ["recv", "recv_bytes", "recv_bytes_into", "poll", "wait", "accept"])
@pytest.mark.parametrize("how", ["interrupt_main", "pthread_kill"])
def test_ctrl_c_interrupts_blocking_calls(impl, op, how):
    if impl is multiprocessing and how == "interrupt_main":
        # It blocks in read()/accept()/poll() with no timeout: only a real signal wakes it.
        pytest.skip("the stdlib's blocking calls cannot be woken by a simulated interrupt")
    res = subprocess.run(
        [sys.executable, "-c", _INTERRUPT_SCRIPT, impl.__name__, how, op],
        capture_output=True,
        text=True,
        timeout=SCRIPT_TIMEOUT,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    assert "interrupted" in res.stdout


# -- fd hygiene ------------------------------------------------------------------------------


def _fd_count():
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("duplex", [True, False])
def test_no_fd_leak_after_10k_pipes(conn, duplex):
    gc.collect()
    before = _fd_count()
    for i in range(10_000):
        a, b = conn.Pipe(duplex)
        if i % 2:
            a.close()
            b.close()
        else:
            del a, b  # finalisation closes them too
    gc.collect()
    assert _fd_count() == before


# -- more edges ------------------------------------------------------------------------------


def test_send_to_closed_peer_is_broken_pipe(conn):
    a, b = conn.Pipe()
    b.close()
    with pytest.raises(BrokenPipeError):
        for _ in range(100):  # a socket may accept a first write
            a.send_bytes(b"x" * 1000)
    a.close()


def test_concurrent_sender_thread(pair):
    a, b = pair
    n = 2000

    def sender():
        for i in range(n):
            a.send(i)

    t = threading.Thread(target=sender)
    t.start()
    assert [b.recv() for _ in range(n)] == list(range(n))
    t.join(SHORT_TIMEOUT)


def test_wait_works_across_implementations():
    fc = _ferro_connection()
    fa, fb = fc.Pipe()
    sa, sb = std_connection.Pipe()
    fa.send_bytes(b"f")
    sa.send_bytes(b"s")
    assert std_connection.wait([fb, sb], SHORT_TIMEOUT) in ([fb, sb], [sb, fb])
    assert fc.wait([fb, sb], SHORT_TIMEOUT) == [fb, sb]
    for c in (fa, fb, sa, sb):
        c.close()


@pytest.mark.parametrize(
    "name",
    ["send_bytes", "send", "recv_bytes", "recv_bytes_into", "recv", "poll", "fileno", "close"],
)
def test_connection_method_signatures_match_stdlib(name):
    import inspect

    def params(func):
        return [
            (p.name, p.default)
            for p in inspect.signature(func).parameters.values()
            if p.name != "self"
        ]

    ours = getattr(_ferro_connection().Connection, name)
    assert params(ours) == params(getattr(std_connection.Connection, name))


_CROSS_SCRIPT = textwrap.dedent(
    """
    import sys
    import multiprocessing, multiprocessing.connection as std_connection
    import ferroproc, ferroproc.connection as fc
    import _conn_workers as workers

    if __name__ == "__main__":
        method, direction = sys.argv[1], sys.argv[2]
        if direction == "ferro-conn-in-stdlib-child":
            ctx, pipe = multiprocessing.get_context(method), fc.Pipe
        else:
            ctx, pipe = ferroproc.get_context(method), std_connection.Pipe
        a, b = pipe()
        p = ctx.Process(target=workers.echo_objects, args=(b, 1))
        p.start()
        b.close()
        a.send({"across": True})
        assert a.poll(30)
        assert a.recv() == {"across": True}
        p.join(30)
        assert p.exitcode == 0, p.exitcode
        print("crossed")
    """
)


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
@pytest.mark.parametrize("direction", ["ferro-conn-in-stdlib-child", "stdlib-conn-in-ferro-child"])
def test_connections_cross_into_the_other_implementations_children(method, direction, tmp_path):
    # A sacrificial interpreter: mixing both implementations' helper processes (forkserver,
    # resource tracker) in the pytest process would trip the leak checks of later tests.
    script = tmp_path / "cross.py"
    script.write_text(_CROSS_SCRIPT)
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([tests_dir, *sys.path]))
    res = subprocess.run(
        [sys.executable, str(script), method, direction],
        env=env,
        capture_output=True,
        text=True,
        timeout=SCRIPT_TIMEOUT,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    assert "crossed" in res.stdout


def test_send_socket_and_connection_objects_use_registered_reducers():
    import ferroproc.reduction

    fc = _ferro_connection()
    a, b = fc.Pipe()
    s1, s2 = socket.socketpair()
    fp_extras = ferroproc.reduction.ForkingPickler._extra_reducers
    assert fp_extras.get(socket.socket) is not None
    assert fp_extras.get(fc.Connection) is fc.reduce_connection
    for s in (s1, s2):
        s.close()
    a.close()
    b.close()


def test_wait_reports_a_closed_descriptor_as_ready(conn):
    r, w = os.pipe()
    os.close(w)
    os.close(r)
    assert conn.wait([r], SHORT_TIMEOUT) == [r]
