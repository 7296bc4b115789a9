"""Peers of the pool cases: the same work done with ``concurrent.futures.ProcessPoolExecutor``
(on the stdlib's fork context), mpire's ``WorkerPool`` (fork) and loky's
``ProcessPoolExecutor`` (its own start method), two workers each, when installed.

Each peer uses its library's normal API for the work. Where a peer's default would turn the
case into a different workload, the peer is told what the case means:

* ``map`` with the default chunksize: ``ProcessPoolExecutor.map`` and loky default to one
  item per task, which on a million items measures per-task overhead instead of bulk
  throughput, so they get the stdlib ``Pool``'s default chunksize (``len / (4 * workers)``);
  mpire chooses its own chunk size, as a user would leave it;
* ``imap_unordered`` one item at a time: only mpire has it; the executors have no
  unordered map.

As in ``pool_cases``, pools are started (and both workers up) before the clock starts, except
in ``pool_lifecycle``, whose subject is the pool's life.
"""

from __future__ import annotations

import time

from ferroproc.bench.pool_cases import WAIT_TIMEOUT, WORKERS
from ferroproc.bench.pool_targets import square
from ferroproc.bench.registry import peer

_perf = time.perf_counter


def _futures():
    import concurrent.futures
    import multiprocessing

    return concurrent.futures.ProcessPoolExecutor(
        WORKERS, mp_context=multiprocessing.get_context("fork")
    )


def _mpire():
    from mpire import WorkerPool

    return WorkerPool(n_jobs=WORKERS, start_method="fork")


def _loky():
    from loky import ProcessPoolExecutor

    return ProcessPoolExecutor(max_workers=WORKERS)


_EXECUTORS = {"concurrent.futures": _futures, "loky": _loky}


def _started_executor(label: str):
    ex = _EXECUTORS[label]()
    # Both workers up before the clock starts.
    list(ex.map(square, range(WORKERS * 2)))
    return ex


def _timed_map(started, n: int, **kwds) -> float:
    """Times ``map(square, range(n), **kwds)`` (its results all in hand) on a started pool or
    executor, which it then shuts down; checks the results."""
    with started as pool:
        t0 = _perf()
        out = pool.map(square, range(n), **kwds)
        if not isinstance(out, list):  # an executor's lazy iterator
            out = list(out)
        elapsed = _perf() - t0
    if len(out) != n or (n and out[-1] != (n - 1) ** 2):
        raise RuntimeError("wrong result")
    return elapsed


def _stdlib_chunksize(n: int) -> int:
    chunks, extra = divmod(n, WORKERS * 4)
    return chunks + 1 if extra else max(chunks, 1)


def _register_executor(label: str) -> None:
    @peer("pool_apply_async", label)
    def apply_async(_mod: None, n: int) -> float:
        """submit(square, i) n times, then result() each."""
        with _started_executor(label) as ex:
            t0 = _perf()
            futs = [ex.submit(square, i) for i in range(n)]
            for i, f in enumerate(futs):
                if f.result(WAIT_TIMEOUT) != i * i:
                    raise RuntimeError("wrong result")
            return _perf() - t0

    @peer("pool_map_default_chunksize", label)
    def map_default(_mod: None, n: int) -> float:
        """map(square, range(n), chunksize=<the stdlib Pool's default>)."""
        return _timed_map(_started_executor(label), n, chunksize=_stdlib_chunksize(n))

    @peer("pool_map_chunksize1", label)
    def map_chunksize1(_mod: None, n: int) -> float:
        """map(square, range(n)) one item per task (the executor's default)."""
        return _timed_map(_started_executor(label), n)

    @peer("pool_lifecycle", label)
    def lifecycle(_mod: None, n: int) -> float:
        """Create a 2-worker executor, map(square, [1]), shut it down (waiting)."""
        t0 = _perf()
        for _ in range(n):
            ex = _EXECUTORS[label]()
            if list(ex.map(square, [1])) != [1]:
                raise RuntimeError("wrong result")
            ex.shutdown(wait=True)
        return _perf() - t0


for _label in _EXECUTORS:
    _register_executor(_label)


def _started_mpire():
    pool = _mpire()
    pool.map(square, range(WORKERS * 2))  # both workers up before the clock starts
    return pool


@peer("pool_apply_async", "mpire")
def mpire_apply_async(_mod: None, n: int) -> float:
    """apply_async(square, (i,)) n times, then get() each."""
    with _started_mpire() as pool:
        t0 = _perf()
        results = [pool.apply_async(square, (i,)) for i in range(n)]
        for i, r in enumerate(results):
            if r.get(WAIT_TIMEOUT) != i * i:
                raise RuntimeError("wrong result")
        return _perf() - t0


@peer("pool_map_default_chunksize", "mpire")
def mpire_map_default(_mod: None, n: int) -> float:
    """map(square, range(n)) with mpire's own chunk size."""
    return _timed_map(_started_mpire(), n)


@peer("pool_map_chunksize1", "mpire")
def mpire_map_chunksize1(_mod: None, n: int) -> float:
    """map(square, range(n), chunk_size=1)."""
    return _timed_map(_started_mpire(), n, chunk_size=1)


@peer("pool_imap_unordered", "mpire")
def mpire_imap_unordered(_mod: None, n: int) -> float:
    """sum(imap_unordered(square, range(n), chunk_size=1))."""
    with _started_mpire() as pool:
        t0 = _perf()
        total = sum(pool.imap_unordered(square, range(n), chunk_size=1))
        elapsed = _perf() - t0
    if total != sum(i * i for i in range(n)):
        raise RuntimeError("wrong result")
    return elapsed


@peer("pool_lifecycle", "mpire")
def mpire_lifecycle(_mod: None, n: int) -> float:
    """``with WorkerPool(2) as p: p.map(square, [1])``: create to teardown."""
    t0 = _perf()
    for _ in range(n):
        with _mpire() as pool:
            if pool.map(square, [1]) != [1]:
                raise RuntimeError("wrong result")
    return _perf() - t0
