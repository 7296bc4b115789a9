"""Benchmark cases for ``sharedctypes``: a contended locked counter and bulk array access.

Imported by :mod:`ferroproc.bench.cases`; the child target lives in the lean
:mod:`ferroproc.bench.targets_shm`. Results are timed only: the exact final count is asserted
by ``tests/test_sharedctypes.py``, not here.
"""

from __future__ import annotations

import time

from ferroproc.bench.cases import stop
from ferroproc.bench.registry import SkipCase, case
from ferroproc.bench.targets_shm import locked_increments

# `typing.TYPE_CHECKING`, without importing `typing`: the benchmark's host interpreters import
# these modules, and what a process imports changes what its forks cost.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from types import ModuleType

_perf = time.perf_counter

#: Items of the bulk-access arrays (doubles: 8 MB).
ARRAY_LEN = 1_000_000


def _ctx(mod: ModuleType, method: str = "fork"):
    ctx = mod.get_context(method)
    if not hasattr(ctx, "Value"):
        raise SkipCase(f"{mod.__name__} has no Value/Array")
    return ctx


@case("value_locked_incr_2proc", n=100_000, unit="incr/proc")
def value_locked_incr_2proc(mod: ModuleType, n: int) -> float:
    """Two forked processes each doing ``with v.get_lock(): v.value += 1`` n times."""
    ctx = _ctx(mod)
    value = ctx.Value("i", 0)
    procs = [ctx.Process(target=locked_increments, args=(value, n)) for _ in range(2)]
    t0 = _perf()
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    elapsed = _perf() - t0
    for p in procs:
        stop(p)
    if value.value != 2 * n:
        raise RuntimeError(f"lost increments: {value.value} != {2 * n}")
    return elapsed


@case("array_slice_rw", n=5, unit="8 MB read+write")
def array_slice_rw(mod: ModuleType, n: int) -> float:
    """``a[:]`` then ``a[:] = data`` on ``Array('d', 1_000_000)`` (through its lock)."""
    ctx = _ctx(mod)
    arr = ctx.Array("d", ARRAY_LEN)
    data = [float(i) for i in range(ARRAY_LEN)]
    t0 = _perf()
    for _ in range(n):
        arr[:] = data
        got = arr[:]
    elapsed = _perf() - t0
    if got[-1] != data[-1]:
        raise RuntimeError("bad read back")
    return elapsed


@case("array_numpy_view_rw", n=50, unit="8 MB read+write")
def array_numpy_view_rw(mod: ModuleType, n: int) -> float:
    """Copy into and out of ``np.frombuffer(Array('d', 1_000_000).get_obj())``."""
    try:
        import numpy as np
    except ImportError:
        raise SkipCase("numpy is not installed") from None
    ctx = _ctx(mod)
    arr = ctx.Array("d", ARRAY_LEN)
    view = np.frombuffer(arr.get_obj())
    src = np.arange(ARRAY_LEN, dtype=np.float64)
    dst = np.empty_like(src)
    t0 = _perf()
    for _ in range(n):
        view[:] = src
        dst[:] = view
    elapsed = _perf() - t0
    if dst[-1] != src[-1]:
        raise RuntimeError("bad read back")
    return elapsed
