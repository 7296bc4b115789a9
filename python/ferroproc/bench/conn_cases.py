"""Benchmark cases for connections: Pipe ping-pong, pickled objects, bulk bytes, recv into.

All cases use the fork start method (what is measured is the transport, not process start)
and a child that echoes, drains or produces messages. The reference floor is a raw ``os.pipe``
ping-pong between two Python processes.
"""

from __future__ import annotations

import os

from ferroproc.bench.cases import WAIT_TIMEOUT, get_context, reap
from ferroproc.bench.registry import case

# `typing.TYPE_CHECKING`, without importing `typing`: the benchmark's host interpreters import
# these modules, and what a process imports changes what its forks cost.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from types import ModuleType

PIPE_FLOOR = "floor_os_pipe_pingpong_64b"

_SIZES = {"1MiB": 1 << 20, "16MiB": 16 << 20}

SMALL_OBJECT = (1, "abc", 2.5)

_perf = __import__("time").perf_counter


# -- child targets -------------------------------------------------------------------------


def echo_bytes(conn, n):
    """Sends back each of `n` byte messages."""
    recv, send = conn.recv_bytes, conn.send_bytes
    for _ in range(n):
        send(recv())
    conn.close()


def echo_objects(conn, n):
    """Sends back each of `n` pickled objects."""
    recv, send = conn.recv, conn.send
    for _ in range(n):
        send(recv())
    conn.close()


def drain(conn, n):
    """Receives `n` byte messages, then acknowledges."""
    recv = conn.recv_bytes
    for _ in range(n):
        recv()
    conn.send_bytes(b"done")
    conn.close()


def produce(conn, n, size):
    """Sends `n` messages of `size` bytes."""
    data = bytes(size)
    send = conn.send_bytes
    for _ in range(n):
        send(data)
    conn.close()


# -- helpers -------------------------------------------------------------------------------


def _start(mod, target, *args):
    ctx = get_context(mod, "fork")
    ours, theirs = ctx.Pipe()
    proc = ctx.Process(target=target, args=(theirs, *args))
    proc.start()
    theirs.close()
    return ctx, ours, proc


def _finish(conn, proc):
    proc.join(WAIT_TIMEOUT)
    conn.close()
    reap(proc, 0)


# -- cases ---------------------------------------------------------------------------------


@case("pipe_pingpong_64b", n=5000, unit="round trip", floor=PIPE_FLOOR)
def pipe_pingpong_64b(mod: ModuleType, n: int) -> float:
    """send_bytes/recv_bytes of 64 B, parent to child and back."""
    _ctx, conn, proc = _start(mod, echo_bytes, n)
    msg = b"x" * 64
    send, recv = conn.send_bytes, conn.recv_bytes
    t0 = _perf()
    for _ in range(n):
        send(msg)
        recv()
    elapsed = _perf() - t0
    _finish(conn, proc)
    return elapsed


@case("pipe_pingpong_tuple", n=5000, unit="round trip", floor=PIPE_FLOOR)
def pipe_pingpong_tuple(mod: ModuleType, n: int) -> float:
    """send/recv of a small tuple (pickled), parent to child and back."""
    _ctx, conn, proc = _start(mod, echo_objects, n)
    send, recv = conn.send, conn.recv
    t0 = _perf()
    for _ in range(n):
        send(SMALL_OBJECT)
        recv()
    elapsed = _perf() - t0
    _finish(conn, proc)
    return elapsed


@case("pipe_bulk_send", n={"1MiB": 200, "16MiB": 15}, unit="message", params=list(_SIZES))
def pipe_bulk_send(mod: ModuleType, n: int, size: str) -> float:
    """send_bytes of large payloads to a child that recv_bytes them."""
    _ctx, conn, proc = _start(mod, drain, n)
    data = bytes(_SIZES[size])
    send = conn.send_bytes
    t0 = _perf()
    for _ in range(n):
        send(data)
    conn.recv_bytes()
    elapsed = _perf() - t0
    _finish(conn, proc)
    return elapsed


@case("pipe_recv_bytes_into", n={"1MiB": 200, "16MiB": 15}, unit="message", params=list(_SIZES))
def pipe_recv_bytes_into(mod: ModuleType, n: int, size: str) -> float:
    """recv_bytes_into a preallocated buffer, from a child producing large payloads."""
    nbytes = _SIZES[size]
    buf = bytearray(nbytes)
    _ctx, conn, proc = _start(mod, produce, n, nbytes)
    recv_into = conn.recv_bytes_into
    t0 = _perf()
    for _ in range(n):
        recv_into(buf)
    elapsed = _perf() - t0
    _finish(conn, proc)
    return elapsed


@case(PIPE_FLOOR, n=5000, unit="round trip", reference=True)
def floor_os_pipe_pingpong(_mod: None, n: int) -> float:
    """Raw os.write/os.read of 64 B over two os.pipe()s with a forked child: no framing."""
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            for _ in range(n):
                os.write(w2, os.read(r1, 64))
        finally:
            os._exit(0)
    msg = b"x" * 64
    t0 = _perf()
    for _ in range(n):
        os.write(w1, msg)
        os.read(r2, 64)
    elapsed = _perf() - t0
    os.waitpid(pid, 0)
    for fd in (r1, w1, r2, w2):
        os.close(fd)
    return elapsed
