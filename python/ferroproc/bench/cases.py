"""Benchmark cases, and the child targets they start.

Every case takes the module under test (``multiprocessing`` or ``ferroproc``) and builds all it
uses from that module's contexts, so the same code times both. Child targets are module-level
functions here: spawn and forkserver children find them by importing this module.

Child targets live in ``ferroproc.bench.targets``, a module without imports: spawn and
forkserver children import it to find their target, and the timings should show the libraries'
start-up cost rather than this harness's. Under ``python -m ferroproc.bench`` the main module is
``ferroproc.bench.__main__``, which neither library re-imports in children. The CLI adds
``targets`` to both libraries' forkserver preload list, where a script's ``__main__`` (and the
targets it defines or imports) would be by default.

Later subsystems add their cases below with ``@case``, and their child targets to ``targets``.
"""

from __future__ import annotations

import os
import time

from ferroproc.bench.registry import SkipCase, case
from ferroproc.bench.targets import exit_with, noop, put_value

# `typing.TYPE_CHECKING`, without importing `typing`: the benchmark's host interpreters import
# these modules, and what a process imports changes what its forks cost.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from types import ModuleType
    from typing import Any

START_METHODS = ("fork", "spawn", "forkserver")

#: Upper bound on any single wait in a case; reaching it means the implementation hung.
WAIT_TIMEOUT = 60.0

#: The reference floor for starting and reaping one process.
FORK_FLOOR = "floor_os_fork_exit_waitpid"

_perf = time.perf_counter


# -- child targets: see ferroproc.bench.targets (kept import-free) ----------------------


# -- helpers -------------------------------------------------------------------------------


def get_context(mod: ModuleType, method: str) -> Any:
    """``mod.get_context(method)``, or :class:`SkipCase` if the module cannot provide it."""
    get = getattr(mod, "get_context", None)
    if get is None:
        raise SkipCase(f"{mod.__name__} has no get_context")
    try:
        ctx = get(method)
    except ValueError as exc:
        raise SkipCase(f"start method {method!r} not available: {exc}") from None
    if not hasattr(ctx, "Process"):
        raise SkipCase(f"{mod.__name__}.get_context({method!r}) has no Process")
    return ctx


def reap(proc: Any, expected: int) -> None:
    """Checks that a joined process exited with ``expected``, then closes it.

    A process still running after the join timeout is killed and reported as a hang.
    """
    code = proc.exitcode
    if code is None:
        proc.kill()
        proc.join(WAIT_TIMEOUT)
        raise RuntimeError(f"child {proc.pid} still running after {WAIT_TIMEOUT} s")
    if code != expected:
        raise RuntimeError(f"child {proc.pid} exited with {code}, expected {expected}")
    proc.close()


def stop(proc: Any, timeout: float = WAIT_TIMEOUT) -> None:
    """Joins a child that should exit 0 on its own, then checks and closes it (see `reap`)."""
    proc.join(timeout)
    reap(proc, 0)


# -- process start -------------------------------------------------------------------------


@case(
    "process_start_join",
    params=START_METHODS,
    n={"fork": 100, "spawn": 12, "forkserver": 30},
    unit="process",
    floor=FORK_FLOOR,
    warmup=2,
)
def process_start_join(mod: ModuleType, n: int, method: str) -> float:
    """Process(target=noop) + start() + join() for one start method."""
    ctx = get_context(mod, method)
    total = 0.0
    for _ in range(n):
        t0 = _perf()
        proc = ctx.Process(target=noop)
        proc.start()
        proc.join(WAIT_TIMEOUT)
        total += _perf() - t0
        reap(proc, 0)
    return total


@case(
    "process_roundtrip_exitcode",
    params=START_METHODS,
    n={"fork": 100, "spawn": 12, "forkserver": 30},
    unit="process",
    floor=FORK_FLOOR,
    warmup=2,
)
def process_roundtrip_exitcode(mod: ModuleType, n: int, method: str) -> float:
    """Process(target=exit_with, args=(i,)), child sys.exit(i % 256), parent checks exitcode."""
    ctx = get_context(mod, method)
    total = 0.0
    for i in range(n):
        arg = 1000 + i
        t0 = _perf()
        proc = ctx.Process(target=exit_with, args=(arg,))
        proc.start()
        proc.join(WAIT_TIMEOUT)
        code = proc.exitcode  # reading it is part of the round trip
        total += _perf() - t0
        if code is not None and code != arg % 256:
            raise RuntimeError(f"child exited with {code}, expected {arg % 256}")
        reap(proc, arg % 256)
    return total


@case(
    "process_queue_result",
    params=START_METHODS,
    n={"fork": 50, "spawn": 8, "forkserver": 20},
    unit="process",
    floor=FORK_FLOOR,
    warmup=2,
)
def process_queue_result(mod: ModuleType, n: int, method: str) -> float:
    """Process(target=put_value, args=(q, i)) handed a Queue: start(), get its result, join()."""
    ctx = get_context(mod, method)
    q = ctx.Queue()
    total = 0.0
    try:
        for i in range(n):
            t0 = _perf()
            proc = ctx.Process(target=put_value, args=(q, i))
            proc.start()
            got = q.get(timeout=WAIT_TIMEOUT)
            proc.join(WAIT_TIMEOUT)
            total += _perf() - t0
            if got != i:
                raise RuntimeError(f"child put {got!r}, expected {i}")
            reap(proc, 0)
    finally:
        q.close()
        q.join_thread()
    return total


#: The user script of `process_start_join_from_script`: nothing imported beyond what it needs,
#: its targets defined in itself, so each spawn child re-runs it as ``__mp_main__``. It is also
#: the honest setting for fork: a fork's cost grows with what the parent has imported (after
#: ``import multiprocessing`` a bare ``os.fork()`` child costs about twice as much here,
#: mostly in ``threading``'s at-fork hook and copy-on-write faults), and this benchmark's own
#: process has both libraries loaded, where a user's script has one.
_SCRIPT = """\
import sys
import time


def noop():
    pass


if __name__ == "__main__":
    mod = __import__(sys.argv[1])
    ctx = mod.get_context(sys.argv[3])
    n = int(sys.argv[2])
    total = 0.0
    for i in range(n + 2):
        t0 = time.perf_counter()
        proc = ctx.Process(target=noop)
        proc.start()
        proc.join(60)
        if i >= 2:  # the first two warm up this interpreter (and start a forkserver)
            total += time.perf_counter() - t0
        if proc.exitcode != 0:
            sys.exit(f"child exited with {proc.exitcode}")
    print(total)
"""


def run_user_script(source: str, mod: ModuleType, *args: object) -> float:
    """Runs `source` as ``python script.py <module> <args>...`` in a temporary directory (its
    own interpreter, importing only what it imports); returns the float it prints last."""
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "user_script.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(source)
        proc = subprocess.run(
            [sys.executable, path, mod.__name__, *map(str, args)],
            capture_output=True,
            text=True,
            timeout=WAIT_TIMEOUT * 10,
            check=False,
            cwd=tmp,
        )
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"]
        raise RuntimeError(f"user script failed: {lines[-1]}")
    return float(proc.stdout.split()[-1])


@case(
    "process_start_join_from_script",
    params=START_METHODS,
    n={"fork": 100, "spawn": 8, "forkserver": 30},
    unit="process",
    warmup=0,
)
def process_start_join_from_script(mod: ModuleType, n: int, method: str) -> float:
    """As process_start_join, timed inside a script run as ``python script.py`` that imports
    only the library (spawn children re-run the script)."""
    return run_user_script(_SCRIPT, mod, n, method)


# -- reference floors ----------------------------------------------------------------------


@case(FORK_FLOOR, n=200, unit="process", reference=True)
def floor_fork(_mod: None, n: int) -> float:
    """Raw os.fork() + os._exit(0) + os.waitpid() from this interpreter: no multiprocessing."""
    total = 0.0
    for _ in range(n):
        t0 = _perf()
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        total += _perf() - t0
        if os.waitstatus_to_exitcode(status) != 0:
            raise RuntimeError(f"forked child exited with wait status {status:#x}")
    return total


# Subsystem case modules (registered on import).
from ferroproc.bench import (  # noqa: E402, F401
    cases_sync,
    conn_cases,
    manager_cases,
    pool_cases,
    pool_peers,
    queue_cases,
    shm_cases,
)
