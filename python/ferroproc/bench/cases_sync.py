"""Benchmark cases for ``synchronize``: uncontended locks and cross-process round trips.

Imported by :mod:`ferroproc.bench.cases`; the child targets live in the lean
:mod:`ferroproc.bench.targets_sync`.
"""

from __future__ import annotations

import time

from ferroproc.bench.cases import stop
from ferroproc.bench.registry import SkipCase, case
from ferroproc.bench.targets_sync import condition_partner, event_partner, lock_partner

# `typing.TYPE_CHECKING`, without importing `typing`: the benchmark's host interpreters import
# these modules, and what a process imports changes what its forks cost.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from types import ModuleType

#: Upper bound on any single wait in a case; reaching it means the implementation hung.
WAIT_TIMEOUT = 60.0

_perf = time.perf_counter


def _ctx(mod: ModuleType, method: str = "fork"):
    ctx = mod.get_context(method)
    if not hasattr(ctx, "Lock"):
        raise SkipCase(f"{mod.__name__} has no synchronization primitives")
    return ctx


# -- cases ---------------------------------------------------------------------------------


@case("lock_uncontended", n=200_000, unit="with", params=("Lock", "RLock", "Semaphore"))
def lock_uncontended(mod: ModuleType, n: int, kind: str) -> float:
    """``with lock: pass`` in one thread, nobody else using the lock."""
    lock = getattr(_ctx(mod), kind)()
    t0 = _perf()
    for _ in range(n):
        with lock:
            pass
    return _perf() - t0


@case("lock_contended_2proc", n=20_000, unit="with")
def lock_contended(mod: ModuleType, n: int) -> float:
    """Two processes each doing ``with lock: pass`` n times on the same lock (fork)."""
    ctx = _ctx(mod)
    lock = ctx.Lock()
    proc = ctx.Process(target=lock_partner, args=(lock, n))
    t0 = _perf()
    proc.start()
    for _ in range(n):
        with lock:
            pass
    proc.join(WAIT_TIMEOUT)
    elapsed = _perf() - t0
    stop(proc)
    return elapsed


@case("event_roundtrip", n=2_000, unit="round trip")
def event_roundtrip(mod: ModuleType, n: int) -> float:
    """Parent sets `ping`, a forked child answers with `pong`: one Event round trip each."""
    ctx = _ctx(mod)
    ping, pong = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=event_partner, args=(ping, pong, n))
    proc.start()
    t0 = _perf()
    for _ in range(n):
        ping.set()
        if not pong.wait(WAIT_TIMEOUT):
            raise RuntimeError("no answer")
        pong.clear()
    elapsed = _perf() - t0
    stop(proc)
    return elapsed


@case("condition_roundtrip", n=1_000, unit="round trip")
def condition_roundtrip(mod: ModuleType, n: int) -> float:
    """Parent hands a token to a forked child through a Condition and waits for it to be taken."""
    ctx = _ctx(mod)
    cond, box = ctx.Condition(), ctx.Semaphore(0)
    proc = ctx.Process(target=condition_partner, args=(cond, box, n))
    proc.start()
    t0 = _perf()
    for _ in range(n):
        with cond:
            box.release()
            cond.notify()
            while box.get_value() != 0:
                if not cond.wait(WAIT_TIMEOUT):
                    raise RuntimeError("no answer")
    elapsed = _perf() - t0
    stop(proc)
    return elapsed
