"""Benchmark cases for ``managers``: a proxied dict set+get pair, and a Manager's life.

Imported by :mod:`ferroproc.bench.cases`. Both cases use the fork start method (the default on
Linux for 3.11), as a user's ``Manager()`` would.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from ferroproc.bench.registry import SkipCase, case

if TYPE_CHECKING:
    from types import ModuleType

_perf = time.perf_counter


def _ctx(mod: ModuleType):
    ctx = mod.get_context("fork")
    if not hasattr(ctx, "Manager"):
        raise SkipCase(f"{mod.__name__} has no Manager")
    return ctx


@case("manager_dict_set_get", n=5_000, unit="pair")
def manager_dict_set_get(mod: ModuleType, n: int) -> float:
    """``d[k] = v`` then ``d[k]`` through a ``Manager().dict()`` proxy (two round trips)."""
    with _ctx(mod).Manager() as manager:
        d = manager.dict()
        d[0] = 0  # the first call opens this thread's connection
        t0 = _perf()
        for i in range(n):
            d[i] = i
            _ = d[i]
        elapsed = _perf() - t0
        del d
    return elapsed


@case("manager_start_shutdown", n=20, unit="manager")
def manager_start_shutdown(mod: ModuleType, n: int) -> float:
    """``Manager()`` (server process up, address known) then ``shutdown()`` (process joined)."""
    ctx = _ctx(mod)
    ctx.Manager().shutdown()  # the first one pays for importing the managers module
    t0 = _perf()
    for _ in range(n):
        ctx.Manager().shutdown()
    return _perf() - t0
