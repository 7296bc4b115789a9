"""Shared fixtures: implementation x start-method parametrization and leak hygiene (STYLE B6).

* ``impl`` is parametrized over ``multiprocessing`` (id ``stdlib``) and ``ferroproc``;
  ``ctx`` over the three POSIX start methods, ``impl.get_context(method)``. Tests build every
  object from ``ctx`` and never call ``set_start_method``.
* ``_hygiene`` (autouse) snapshots live children of both implementations, this process's open
  fds and its descendant processes before each test; afterwards it terminates/kills leftovers
  and fails the test naming what leaked.
* Persistent per-parent helpers (the forkserver server and its control socket, the stdlib's
  resource tracker, ferroproc's equivalents) are started once by a session warm-up before the
  first test, so they are part of every test's baseline.
"""

from __future__ import annotations

import gc
import importlib
import os
import sys
import time

import pytest

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
if TESTS_DIR not in sys.path:
    # spawn/forkserver children get sys.path through the preparation data, so they can import
    # _workers as well.
    sys.path.insert(0, TESTS_DIR)

import _workers  # noqa: E402

START_METHODS = ("fork", "spawn", "forkserver")
IMPL_IDS = {"multiprocessing": "stdlib", "ferroproc": "ferroproc"}

_modules: dict[str, object] = {}
_import_errors: dict[str, BaseException] = {}


def _load(name):
    if name not in _modules and name not in _import_errors:
        try:
            _modules[name] = importlib.import_module(name)
        except Exception as e:  # reported by the fixture of every test that needs it
            _import_errors[name] = e
    return _modules.get(name)


def loaded_impls():
    """The implementation modules that imported successfully (in this session)."""
    return [m for m in (_load(n) for n in _workers.IMPL_NAMES) if m is not None]


@pytest.fixture(params=list(IMPL_IDS), ids=list(IMPL_IDS.values()))
def impl(request):
    """The implementation under test: ``multiprocessing`` or ``ferroproc``."""
    mod = _load(request.param)
    if mod is None:
        pytest.fail(f"cannot import {request.param}: {_import_errors[request.param]!r}")
    return mod


@pytest.fixture
def impl_name(impl):
    return impl.__name__


@pytest.fixture
def ctx(impl, request):
    """``impl.get_context(method)`` for each start method (parametrized below)."""
    return impl.get_context(request.param)


def pytest_generate_tests(metafunc):
    # Parametrize ctx here rather than with fixture params so that ids always read
    # "<impl>-<method>" (e.g. test_x[ferroproc-spawn]) whatever the order of the arguments.
    # Tests marked fork_only get only the fork context.
    if "ctx" in metafunc.fixturenames:
        fork_only = metafunc.definition.get_closest_marker("fork_only") is not None
        metafunc.parametrize("ctx", ("fork",) if fork_only else START_METHODS, indirect=True)


# ---------------------------------------------------------------------------------------------
# Hygiene
# ---------------------------------------------------------------------------------------------


def _open_fds():
    """``{fd: target}`` for this process (the listing's own directory fd drops out)."""
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            pass
    return fds


def _descendants():
    """``{pid: (ppid, state, cmdline)}`` of every descendant of this process (forkserver spares
    excepted)."""
    table = {pid: (ppid, state) for pid, (state, ppid, _) in _workers.proc_table().items()}
    me = os.getpid()
    result = {}
    frontier = [me]
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, state) in table.items():
            if ppid == parent and pid not in result and not _workers.is_forkserver_spare(pid):
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
                except OSError:
                    cmd = "?"
                result[pid] = (ppid, state, cmd[:120])
                frontier.append(pid)
    return result


def _warm_up(wanted):
    """Start one process per implementation and start method so that persistent per-parent
    helpers (forkserver, resource tracker, ...) exist before the first baseline is taken."""
    for mod in loaded_impls():
        if mod.__name__ not in wanted:
            continue
        for method in START_METHODS:
            try:
                p = mod.get_context(method).Process(target=_workers.noop)
                p.start()
                p.join(_workers.SHORT_TIMEOUT)
                if p.is_alive():
                    p.kill()
                    p.join(_workers.SHORT_TIMEOUT)
                p.close()
            except Exception as e:  # the tests themselves will report the breakage
                sys.stderr.write(f"warm-up of {mod.__name__}/{method} failed: {e!r}\n")
    gc.collect()


@pytest.fixture(scope="session")
def _warmed_up(request):
    # Only warm up the implementations the selected tests use (so `-k stdlib` never depends
    # on the state of ferroproc, and vice versa).
    wanted = {
        item.callspec.params["impl"]
        for item in request.session.items
        if "impl" in getattr(getattr(item, "callspec", None), "params", {})
    }
    _warm_up(wanted)


def _new_descendants(before):
    now = _descendants()
    return {
        pid: info
        for pid, info in now.items()
        if info[1] != "X" and (pid not in before or (info[1] == "Z" and before[pid][1] != "Z"))
    }


@pytest.fixture(autouse=True)
def _hygiene(_warmed_up):
    fds_before = _open_fds()
    desc_before = _descendants()
    yield
    problems = []

    for mod in loaded_impls():
        try:
            alive = mod.active_children()
        except Exception as e:
            problems.append(f"{mod.__name__}.active_children() raised {e!r}")
            continue
        for p in alive:
            problems.append(f"{mod.__name__}: child still running after the test: {p!r}")
            try:
                p.terminate()
                p.join(2)
                if p.is_alive():
                    p.kill()
                    p.join(_workers.SHORT_TIMEOUT)
                p.close()  # so its sentinel is not reported again as a leaked fd
            except Exception as e:
                problems.append(f"  could not stop it: {e!r}")
        del alive

    # New descendants (live or zombie) must be gone once the children are joined/reaped. Give
    # exiting children a moment: forkserver children are reaped by the server, and a library
    # may reap a child that was still exiting when join() returned at its next
    # active_children() call (which is how this fixture lets it do so).
    deadline = time.monotonic() + 3.0
    new = _new_descendants(desc_before)
    while new and time.monotonic() < deadline:
        time.sleep(0.02)
        for mod in loaded_impls():
            mod.active_children()
        new = _new_descendants(desc_before)
    for pid, (ppid, state, cmd) in sorted(new.items()):
        kind = "zombie" if state == "Z" else "process"
        problems.append(f"leaked {kind} pid={pid} ppid={ppid} state={state} cmd={cmd!r}")
        if state != "Z":
            try:
                os.kill(pid, 9)
            except OSError:
                pass

    fds_after = _open_fds()
    if fds_after != fds_before:
        gc.collect()  # a Process object in a reference cycle still owns its sentinel
        fds_after = _open_fds()
    leaked_fds = {fd: target for fd, target in fds_after.items() if fds_before.get(fd) != target}
    for fd, target in sorted(leaked_fds.items()):
        problems.append(f"leaked fd {fd} -> {target}")

    if problems:
        pytest.fail("test leaked resources:\n  " + "\n  ".join(problems), pytrace=False)


@pytest.fixture(scope="module")
def shm_tracker_connection():
    """A ferroproc process keeps one connection to the segment tracker (and may have started
    it) for the rest of its life: make both exist before any hygiene baseline."""
    from ferroproc import shared_memory

    shm = shared_memory.SharedMemory(create=True, size=16)
    shm.close()
    shm.unlink()
