"""Benchmark cases for ``queues``: throughput of small and large messages (and of numpy arrays,
when numpy is installed), fan-in/fan-out, and put→get latency, on the fork start method.

Imported by :mod:`ferroproc.bench.cases`. Child targets live in the import-free
:mod:`ferroproc.bench.targets`. The batched case uses ferroproc's ``put_many``/``get_many``
extension where the module has it and the plain loop otherwise, so its stdlib column is the
stdlib's one-at-a-time figure.
"""

from __future__ import annotations

import time

from ferroproc.bench import targets
from ferroproc.bench.cases import stop
from ferroproc.bench.registry import SkipCase, case

# `typing.TYPE_CHECKING`, without importing `typing`: the benchmark's host interpreters import
# these modules, and what a process imports changes what its forks cost.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from types import ModuleType

#: Upper bound on any single wait in a case; reaching it means the implementation hung.
WAIT_TIMEOUT = 120.0

_perf = time.perf_counter


def _ctx(mod: ModuleType):
    ctx = mod.get_context("fork")
    if not hasattr(ctx, "Queue"):
        raise SkipCase(f"{mod.__name__} has no Queue")
    return ctx


def _close(*queues) -> None:
    for q in queues:
        q.close()
        join = getattr(q, "join_thread", None)
        if join is not None:
            join()


def _to_child(mod: ModuleType, n: int, produce, warm_up, consume=targets.queue_consume) -> float:
    """Times `produce(q)` putting n messages while a forked child running `consume` gets them
    all (after it took `warm_up`, so its start is not timed)."""
    ctx = _ctx(mod)
    q, done = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=consume, args=(q, done, n + 1))
    proc.start()
    q.put(warm_up)
    while not q.empty():
        time.sleep(0.001)
    t0 = _perf()
    produce(q)
    if done.get(timeout=WAIT_TIMEOUT) != n + 1:
        raise RuntimeError("lost messages")
    elapsed = _perf() - t0
    stop(proc, WAIT_TIMEOUT)
    _close(q, done)
    return elapsed


def _one_to_one(mod: ModuleType, n: int, batched: bool) -> float:
    def produce(q):
        put_many = getattr(q, "put_many", None) if batched else None
        if put_many is not None:
            for start in range(0, n, 4096):
                put_many(range(start, min(start + 4096, n)))
        else:
            put = q.put
            for i in range(n):
                put(i)

    consume = targets.queue_consume_batched if batched else targets.queue_consume
    return _to_child(mod, n, produce, -1, consume)


def _stream(mod: ModuleType, n: int, payload, warm_up) -> float:
    """Times the parent putting `payload` n times while a forked child gets them all."""

    def produce(q):
        for _ in range(n):
            q.put(payload)

    return _to_child(mod, n, produce, warm_up)


@case("queue_1to1_small", n=200_000, unit="msg")
def queue_1to1_small(mod: ModuleType, n: int) -> float:
    """Parent puts n small ints one at a time, a forked child gets them one at a time."""
    return _one_to_one(mod, n, batched=False)


@case("queue_1to1_small_batched", n=200_000, unit="msg")
def queue_1to1_small_batched(mod: ModuleType, n: int) -> float:
    """As queue_1to1_small with put_many/get_many batches of 4096 (stdlib: one at a time)."""
    return _one_to_one(mod, n, batched=True)


@case("queue_2to2_small", n=200_000, unit="msg")
def queue_2to2_small(mod: ModuleType, n: int) -> float:
    """Two forked producers put n small ints in all, two forked consumers get them."""
    ctx = _ctx(mod)
    q, go, done = ctx.Queue(), ctx.Queue(), ctx.Queue()
    half = n // 2
    producers = [ctx.Process(target=targets.queue_produce, args=(q, go, half)) for _ in range(2)]
    consumers = [
        ctx.Process(target=targets.queue_consume_until_none, args=(q, done)) for _ in range(2)
    ]
    for p in producers + consumers:
        p.start()
    t0 = _perf()
    go.put(1)
    go.put(1)
    for p in producers:
        stop(p, WAIT_TIMEOUT)
    q.put(None)
    q.put(None)
    got = done.get(timeout=WAIT_TIMEOUT) + done.get(timeout=WAIT_TIMEOUT)
    elapsed = _perf() - t0
    if got != 2 * half:
        raise RuntimeError(f"got {got} of {2 * half} messages")
    for p in consumers:
        stop(p, WAIT_TIMEOUT)
    _close(q, go, done)
    return elapsed


@case("queue_1mib_payloads", n=300, unit="MiB")
def queue_1mib_payloads(mod: ModuleType, n: int) -> float:
    """Parent puts n 1 MiB bytes objects, a forked child gets them."""
    return _stream(mod, n, b"\x5a" * (1 << 20), b"")


@case("queue_tuple_16mib", n=20, unit="message")
def queue_tuple_16mib(mod: ModuleType, n: int) -> float:
    """Parent puts n (name, index, 16 MiB bytes) tuples, a forked child gets them."""
    return _stream(mod, n, ("chunk", 7, b"\x5a" * (16 << 20)), ())


@case("queue_numpy_64mib", n=8, unit="64 MiB array")
def queue_numpy_64mib(mod: ModuleType, n: int) -> float:
    """Parent puts n 64 MiB numpy arrays, a forked child gets them (skipped without numpy)."""
    try:
        import numpy as np
    except ImportError:
        raise SkipCase("numpy is not installed") from None
    array = np.ones(8 << 20)
    return _stream(mod, n, array, array[:1])


@case("queue_pingpong", n=5_000, unit="round trip")
def queue_pingpong(mod: ModuleType, n: int) -> float:
    """Parent puts, a forked child gets and puts it back on a second queue, parent gets it."""
    ctx = _ctx(mod)
    q_in, q_out = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=targets.queue_echo, args=(q_in, q_out, n + 1))
    proc.start()
    q_in.put(0)
    q_out.get(timeout=WAIT_TIMEOUT)
    put, get = q_in.put, q_out.get
    t0 = _perf()
    for i in range(n):
        put(i)
        get()
    elapsed = _perf() - t0
    stop(proc, WAIT_TIMEOUT)
    _close(q_in, q_out)
    return elapsed
