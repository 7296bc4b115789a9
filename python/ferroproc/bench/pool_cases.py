"""Benchmark cases for ``pool``: per-task overhead (``apply_async``, ``map`` with
``chunksize=1``, ``imap_unordered``), bulk ``map`` with the default chunksize, and a pool's
whole life (create, one ``map``, teardown). Two workers, fork start method.

Imported by :mod:`ferroproc.bench.cases`. Tasks live in the import-free
:mod:`ferroproc.bench.pool_targets`. Only the work is timed, except in ``pool_lifecycle``.
"""

from __future__ import annotations

import os
import time
from _signal import SIGTERM as _SIGTERM  # not `signal`, whose enums cost the host's forks

from ferroproc.bench.pool_targets import square
from ferroproc.bench.registry import SkipCase, case

# `typing.TYPE_CHECKING`, without importing `typing`: the benchmark's host interpreters import
# these modules, and what a process imports changes what its forks cost.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from types import ModuleType

#: Upper bound on any single wait in a case; reaching it means the implementation hung.
WAIT_TIMEOUT = 120.0
WORKERS = 2

_perf = time.perf_counter


def _pool(mod: ModuleType):
    ctx = mod.get_context("fork")
    if not hasattr(ctx, "Pool"):
        raise SkipCase(f"{mod.__name__} has no Pool")
    pool = ctx.Pool(WORKERS)
    pool.apply(square, (1,))  # both workers are up before the clock starts
    return pool


def _done(pool) -> None:
    pool.close()
    pool.join()


@case("pool_apply_async", n=20_000, unit="task")
def pool_apply_async(mod: ModuleType, n: int) -> float:
    """n apply_async(square, (i,)) of a trivial function, then get() every result."""
    pool = _pool(mod)
    t0 = _perf()
    results = [pool.apply_async(square, (i,)) for i in range(n)]
    for i, r in enumerate(results):
        if r.get(WAIT_TIMEOUT) != i * i:
            raise RuntimeError("wrong result")
    elapsed = _perf() - t0
    _done(pool)
    return elapsed


@case("pool_map_default_chunksize", n=1_000_000, unit="item")
def pool_map_default_chunksize(mod: ModuleType, n: int) -> float:
    """map(square, range(n)) with the default chunksize."""
    pool = _pool(mod)
    t0 = _perf()
    out = pool.map(square, range(n))
    elapsed = _perf() - t0
    if len(out) != n or out[-1] != (n - 1) ** 2:
        raise RuntimeError("wrong result")
    _done(pool)
    return elapsed


@case("pool_map_chunksize1", n=20_000, unit="item")
def pool_map_chunksize1(mod: ModuleType, n: int) -> float:
    """map(square, range(n), chunksize=1)."""
    pool = _pool(mod)
    t0 = _perf()
    out = pool.map(square, range(n), chunksize=1)
    elapsed = _perf() - t0
    if len(out) != n or out[-1] != (n - 1) ** 2:
        raise RuntimeError("wrong result")
    _done(pool)
    return elapsed


@case("pool_imap_unordered", n=100_000, unit="item")
def pool_imap_unordered(mod: ModuleType, n: int) -> float:
    """sum(imap_unordered(square, range(n))) with the default chunksize (1)."""
    pool = _pool(mod)
    t0 = _perf()
    total = sum(pool.imap_unordered(square, range(n)))
    elapsed = _perf() - t0
    if total != sum(i * i for i in range(n)):
        raise RuntimeError("wrong result")
    _done(pool)
    return elapsed


#: The reference floor of a pool's life.
POOL_FLOOR = "floor_os_two_workers"


@case(POOL_FLOOR, n=20, unit="pool", reference=True)
def floor_two_workers(_mod: None, n: int) -> float:
    """Two raw os.fork() children, one pipe round trip with the first, SIGTERM to
    both, os.waitpid() both: the system calls of a two-worker pool's life, no multiprocessing."""
    total = 0.0
    for _ in range(n):
        t0 = _perf()
        task_r, task_w = os.pipe()
        done_r, done_w = os.pipe()
        pids = []
        try:
            for _ in range(WORKERS):
                pid = os.fork()
                if pid == 0:
                    try:
                        os.read(task_r, 1)
                        os.write(done_w, b"1")
                        os.read(task_r, 1)  # blocks until the signal
                    finally:
                        os._exit(0)  # never back into the caller's code (Ctrl-C, say)
                pids.append(pid)
            os.write(task_w, b"1")
            if os.read(done_r, 1) != b"1":
                raise RuntimeError("wrong result")
        finally:
            for pid in pids:
                os.kill(pid, _SIGTERM)
            statuses = [os.waitpid(pid, 0)[1] for pid in pids]
            for fd in (task_r, task_w, done_r, done_w):
                os.close(fd)
        total += _perf() - t0
        for status in statuses:
            if os.waitstatus_to_exitcode(status) != -_SIGTERM:
                raise RuntimeError(f"forked child ended with wait status {status:#x}")
    return total


@case("pool_lifecycle", n=20, unit="pool", floor=POOL_FLOOR)
def pool_lifecycle(mod: ModuleType, n: int) -> float:
    """``with Pool(2) as p: p.map(square, [1])`` then join(): create to teardown."""
    ctx = mod.get_context("fork")
    if not hasattr(ctx, "Pool"):
        raise SkipCase(f"{mod.__name__} has no Pool")
    t0 = _perf()
    for _ in range(n):
        with ctx.Pool(WORKERS) as p:
            if p.map(square, [1]) != [1]:
                raise RuntimeError("wrong result")
        p.join()
    return _perf() - t0


#: `pool_lifecycle` as a user's script: its own interpreter, importing only the library (see
#: `cases._SCRIPT` for why a fork's cost depends on that).
_LIFECYCLE_SCRIPT = """\
import sys
import time


def square(x):
    return x * x


if __name__ == "__main__":
    mod = __import__(sys.argv[1])
    ctx = mod.get_context("fork")
    n = int(sys.argv[2])
    total = 0.0
    for i in range(n + 2):
        t0 = time.perf_counter()
        with ctx.Pool(2) as p:
            if p.map(square, [1]) != [1]:
                sys.exit("wrong result")
        p.join()
        if i >= 2:  # the first two warm up this interpreter
            total += time.perf_counter() - t0
    print(total)
"""


@case("pool_lifecycle_from_script", n=20, unit="pool", warmup=0)
def pool_lifecycle_from_script(mod: ModuleType, n: int) -> float:
    """As pool_lifecycle, timed inside a script run as ``python script.py`` that imports only
    the library."""
    from ferroproc.bench.cases import run_user_script

    if not hasattr(mod.get_context("fork"), "Pool"):
        raise SkipCase(f"{mod.__name__} has no Pool")
    return run_user_script(_LIFECYCLE_SCRIPT, mod, n)
