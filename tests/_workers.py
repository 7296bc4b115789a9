"""Module-level child targets and small helpers shared by the process/context tests.

Everything a child runs lives here, at module level, so that spawn and forkserver children can
import it by name (``conftest.py`` puts this directory on ``sys.path``; children inherit it through
the spawn preparation data). Targets that need "their" multiprocessing implementation take its
module name (``"multiprocessing"`` or ``"ferroproc"``) as an argument and import it lazily, so a
stdlib child never imports ferroproc and vice versa.

Children report back through their exit code or through a JSON file in the test's ``tmp_path``;
nothing here depends on queues or pipes, so these tests only exercise processes and contexts.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

#: The one bound for every wait in the suite (CPython's ``support.SHORT_TIMEOUT`` is also 30 s).
SHORT_TIMEOUT = 30.0
#: Bound for a whole sacrificial interpreter run.
SCRIPT_TIMEOUT = 45.0

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))

IMPL_NAMES = ("multiprocessing", "ferroproc")


def impl_module(impl_name: str):
    """Import ``multiprocessing`` or ``ferroproc`` by name."""
    if impl_name not in IMPL_NAMES:
        raise ValueError(f"unknown implementation {impl_name!r}")
    return importlib.import_module(impl_name)


def impl_name_of(ctx_or_module) -> str:
    """``"multiprocessing"`` or ``"ferroproc"`` for a context object or module."""
    mod = (
        ctx_or_module.__name__
        if hasattr(ctx_or_module, "__path__")
        else type(ctx_or_module).__module__
    )
    return mod.split(".")[0]


# ---------------------------------------------------------------------------------------------
# Child targets
# ---------------------------------------------------------------------------------------------


def noop():
    pass


def exit_with(code):
    sys.exit(code)


def exit_with_kwargs(a, b, *, c=0, d=0):
    """Exit code encodes the arguments so the parent can check args/kwargs were delivered."""
    sys.exit(a + 2 * b + 4 * c + 8 * d)


def raise_value_error(msg):
    raise ValueError(msg)


def sleep_for(seconds):
    time.sleep(seconds)


def set_and_wait(ready, release):
    """Sets `ready`, then waits (bounded) for `release`."""
    ready.set()
    release.wait(SHORT_TIMEOUT)


def sleep_forever():
    while True:
        time.sleep(3600)


def _touch(path):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(str(os.getpid()))
    os.replace(tmp, path)


def write_json(path, data):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def sleep_when_ready(ready_path):
    """Announce readiness by creating ``ready_path``, then sleep until killed."""
    _touch(ready_path)
    sleep_forever()


def busy_when_ready(ready_path):
    """Announce readiness, then spin on the CPU until killed."""
    _touch(ready_path)
    deadline = time.monotonic() + 10 * SHORT_TIMEOUT  # never spin forever if orphaned
    while time.monotonic() < deadline:
        pass


def ignore_sigterm_when_ready(ready_path):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sleep_when_ready(ready_path)


def sleep_then_touch(seconds, path):
    time.sleep(seconds)
    _touch(path)


def report(impl_name, path):
    """Write what this child knows about itself to ``path`` as JSON."""
    mp = impl_module(impl_name)
    me = mp.current_process()
    parent = mp.parent_process()
    main = sys.modules.get("__main__")
    write_json(
        path,
        {
            "pid": os.getpid(),
            "ppid": os.getppid(),
            "name": me.name,
            "current_pid": me.pid,
            "current_ident": me.ident,
            "daemon": me.daemon,
            "authkey": bytes(me.authkey).hex(),
            "start_method": mp.get_start_method(allow_none=True),
            "parent": None
            if parent is None
            else {"pid": parent.pid, "name": parent.name, "alive": parent.is_alive()},
            "main_name": getattr(main, "__name__", None),
            "sys_path_has_tests": TESTS_DIR in sys.path,
            "active_children": len(mp.active_children()),
        },
    )


def report_with_grandchild(impl_name, method, path, grandchild_path):
    """Start a (non-daemon) grandchild that reports, then report about ourselves."""
    mp = impl_module(impl_name)
    ctx = mp.get_context(method)
    gc = ctx.Process(target=report, args=(impl_name, grandchild_path))
    gc.start()
    gc.join(SHORT_TIMEOUT)
    if gc.exitcode != 0:
        sys.exit(10 + (gc.exitcode or 0) % 50)
    report(impl_name, path)


def exit_if_authkey(impl_name, expected):
    """Exit 0 if our authkey equals ``expected``, else 1."""
    mp = impl_module(impl_name)
    sys.exit(0 if bytes(mp.current_process().authkey) == expected else 1)


def try_to_have_children(impl_name, method):
    """Run inside a daemonic process: starting a child must raise AssertionError.

    Exit 0: AssertionError with the stdlib message; 2: AssertionError with another message;
    3: another exception; 4: the child was started.
    """
    mp = impl_module(impl_name)
    p = mp.get_context(method).Process(target=noop)
    try:
        p.start()
    except AssertionError as e:
        sys.exit(0 if "daemonic processes are not allowed to have children" in str(e) else 2)
    except BaseException:
        sys.exit(3)
    p.join(SHORT_TIMEOUT)
    sys.exit(4)


def try_to_join_self(impl_name):
    """Exit 0 if ``current_process().join()`` raises the stdlib AssertionError."""
    mp = impl_module(impl_name)
    try:
        mp.current_process().join(0.1)
    except AssertionError as e:
        sys.exit(0 if "can only join a child process" in str(e) else 2)
    except BaseException:
        sys.exit(3)
    sys.exit(4)


def start(ctx, target, *args):
    """Starts `target(*args)` in a child of `ctx` and returns the process."""
    p = ctx.Process(target=target, args=args)
    p.start()
    return p


def join_ok(p, code=0):
    """Joins `p` within SHORT_TIMEOUT, asserts it ended with `code`, and closes it."""
    p.join(SHORT_TIMEOUT)
    assert not p.is_alive()
    assert p.exitcode == code
    p.close()


def start_foreign_process(proc):
    """``proc`` was created by our parent: starting it here must raise AssertionError.

    Exit 0: the stdlib message; 2: another AssertionError; 3: another exception; 4: started.
    """
    try:
        proc.start()
    except AssertionError as e:
        sys.exit(0 if "created by current process" in str(e) else 2)
    except BaseException:
        sys.exit(3)
    proc.join(SHORT_TIMEOUT)
    sys.exit(4)


def touch_after_parent_exits(impl_name, ready_path, done_path):
    """Announce readiness, wait (bounded) on ``parent_process().sentinel``, then record whether
    ``parent_process().is_alive()`` turned False."""
    import select

    mp = impl_module(impl_name)
    parent = mp.parent_process()
    _touch(ready_path)
    ready, _, _ = select.select([parent.sentinel], [], [], SHORT_TIMEOUT)
    write_json(done_path, {"sentinel_ready": bool(ready), "alive": parent.is_alive()})


def read_stdin_twice_down(impl_name, method, out_path, depth=0, close_first=False):
    """Record what ``sys.stdin.read()`` gives here and whether the parent's stdin object is
    closed, then do the same in a child started with `method` (one level down), after closing
    this process's ``sys.stdin`` if `close_first`."""
    mp = impl_module(impl_name)
    try:
        seen = repr(sys.stdin.read())
    except Exception as e:  # a closed or broken stdin is what the test looks for
        seen = f"{type(e).__name__}: {e}"
    with open(f"{out_path}.{depth}", "w") as f:
        f.write(seen)
    if depth == 0:
        if close_first:
            sys.stdin.close()
        p = mp.get_context(method).Process(
            target=read_stdin_twice_down, args=(impl_name, method, out_path, 1)
        )
        p.start()
        p.join(SHORT_TIMEOUT)
        sys.exit(p.exitcode)


def reuse_stdin_descriptor_then_start(impl_name, method, out_path):
    """Close the descriptor under ``sys.stdin``, let a pipe holding data take its number, then
    start a child (with `method`) that records what its ``sys.stdin.read()`` gives."""
    mp = impl_module(impl_name)
    fd = sys.stdin.fileno()
    os.close(fd)
    r, w = os.pipe()
    if r != fd:
        os.dup2(r, fd)
    os.write(w, b"not for the child\n")
    os.close(w)  # a reader of the pipe gets the data, then end of file
    p = mp.get_context(method).Process(
        target=read_stdin_twice_down, args=(impl_name, method, out_path, 1)
    )
    p.start()
    p.join(SHORT_TIMEOUT)
    sys.exit(p.exitcode)


def sigterm_handler_exits_3_when_ready(ready_path):
    """Install a Python SIGTERM handler that exits 3, announce readiness, then sleep."""

    def handler(signum, frame):
        sys.exit(3)

    signal.signal(signal.SIGTERM, handler)
    sleep_when_ready(ready_path)


def report_sigterm_disposition():
    """Exit 0 if SIGTERM has the default disposition here, as Python sees it; else 5."""
    sys.exit(0 if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL else 5)


def exit_if_comm_is(expected):
    """Exit 0 if this process's kernel name (``/proc/self/comm``) is `expected`, else 9."""
    with open("/proc/self/comm") as f:
        sys.exit(0 if f.read().strip() == expected else 9)


def exit_if_module_loaded(name):
    """Exit 0 if module ``name`` is already in ``sys.modules`` (without importing it), else 7."""
    sys.exit(0 if name in sys.modules else 7)


class Marker:
    """A weak-referenceable object for ``util.register_after_fork``."""

    def __init__(self):
        self.after_fork_calls = 0


def mark_after_fork(marker):
    marker.after_fork_calls += 1


def exit_with_after_fork_calls(marker):
    sys.exit(20 + marker.after_fork_calls)


AT_FORK_CHILD_CALLS = 0


def note_at_fork_child():
    """An ``os.register_at_fork(after_in_child=...)`` handler."""
    global AT_FORK_CHILD_CALLS
    AT_FORK_CHILD_CALLS += 1


def exit_with_at_fork_child_calls():
    sys.exit(30 + AT_FORK_CHILD_CALLS)


def log_process_name(tag):
    """Logs `tag` through a handler that prints ``processName|message`` on stdout."""
    import logging

    logger = logging.getLogger("ferroproc-test-process-name")
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(processName)s|%(message)s"))
    logger.addHandler(handler)
    try:
        logger.warning(tag)
    finally:
        logger.removeHandler(handler)
        handler.flush()


def exit_with_sys_path_check():
    """Exit 0 if this directory is on sys.path (so spawn children can import us), else 1."""
    sys.exit(0 if TESTS_DIR in sys.path else 1)


# A module-level lambda: pickling it by reference fails with pickle.PicklingError.
UNPICKLABLE_LAMBDA = lambda: None  # noqa: E731


# ---------------------------------------------------------------------------------------------
# Process subclasses overriding run(). One class per (implementation, start method), created on
# first use and cached at module level under a stable name so spawn/forkserver children can
# unpickle it by reference (PEP 562 module __getattr__ re-creates it in the child).
# ---------------------------------------------------------------------------------------------

_SUBCLASS_PREFIX = "RunOverride__"
_subclasses: dict[str, type] = {}


def _make_run_override(base):
    class RunOverride(base):
        def __init__(self, code, *, extra=0, **kwargs):
            super().__init__(**kwargs)
            self.code = code
            self.extra = extra

        def run(self):
            sys.exit(self.code + self.extra)

    return RunOverride


def run_override_class(ctx):
    """The ``ctx.Process`` subclass whose ``run`` exits with ``code + extra``."""
    name = f"{_SUBCLASS_PREFIX}{impl_name_of(ctx)}__{ctx.get_start_method()}"
    return __getattr__(name)


def __getattr__(name):
    if name.startswith(_SUBCLASS_PREFIX):
        if name not in _subclasses:
            impl_name, method = name[len(_SUBCLASS_PREFIX) :].split("__")
            cls = _make_run_override(impl_module(impl_name).get_context(method).Process)
            cls.__name__ = cls.__qualname__ = name
            cls.__module__ = __name__
            _subclasses[name] = cls
        return _subclasses[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------------------------------------
# Parent-side helpers
# ---------------------------------------------------------------------------------------------


def wait_for_path(path, timeout=SHORT_TIMEOUT):
    """Wait (bounded) until ``path`` exists; return whether it does."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def read_json(path):
    return json.loads(Path(path).read_text())


def pid_gone(pid):
    """True if ``pid`` no longer runs (absent, or a zombie nobody has reaped yet)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("State:"):
                    return line.split()[1] in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):
        return True
    return False


def wait_pid_gone(pid, timeout=SHORT_TIMEOUT):
    deadline = time.monotonic() + timeout
    while not pid_gone(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def expect_interrupt(name, call, limit):
    """For sacrificial interpreters: sends this process SIGINT in 0.3 s, runs `call`, and
    checks it raised KeyboardInterrupt within `limit` seconds (prints "<name> interrupted");
    exits the interpreter if `call` returned instead."""
    import threading

    threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()
    t0 = time.monotonic()
    try:
        call()
    except KeyboardInterrupt:
        dt = time.monotonic() - t0
        assert dt < limit, (name, dt)
        print(name, "interrupted")
    else:
        sys.exit(name + " returned")


def script_source(impl_name, body, method=None):
    """A sacrificial-interpreter script: a header importing the implementation as ``mp``."""
    header = (
        "import sys\n"
        f"sys.path.insert(0, {TESTS_DIR!r})\n"
        f"import {impl_name} as mp\n"
        f"METHOD = {method!r}\n"
    )
    return header + textwrap.dedent(body)


def proc_table():
    """``{pid: (state, ppid, pgrp)}`` of every process in ``/proc`` (vanished ones skipped)."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        table[int(entry)] = (fields[0], int(fields[1]), int(fields[2]))
    return table


#: `/proc/<pid>/comm` of the child ferroproc's forkserver keeps forked ahead of the next
#: request: one per server, replaced after each start, so never a leak.
FORKSERVER_SPARE = "ferroproc-spare"


def is_forkserver_spare(pid):
    """Whether `pid` is a ferroproc forkserver's waiting spare (by its `comm` name)."""
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip() == FORKSERVER_SPARE
    except OSError:
        return False


def _processes_in_group(pgid):
    return [
        pid
        for pid, (state, _ppid, pgrp) in proc_table().items()
        if pgrp == pgid and state not in ("Z", "X")
    ]


def run_interpreter(argv, *, timeout=SCRIPT_TIMEOUT, cwd=None, env=None):
    """Run ``[sys.executable, *argv]`` in its own session; kill its whole group on timeout.

    Returns ``(CompletedProcess, leftovers)`` where ``leftovers`` lists pids of the session that
    still ran a few seconds after the interpreter exited (they are killed).
    """
    proc = subprocess.Popen(
        [sys.executable, *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=cwd,
        env=env,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(
            f"sacrificial interpreter timed out after {timeout}s\nstdout:\n{out}\nstderr:\n{err}"
        ) from None
    deadline = time.monotonic() + 5.0
    leftovers = _processes_in_group(proc.pid)
    while leftovers and time.monotonic() < deadline:
        time.sleep(0.02)
        leftovers = _processes_in_group(proc.pid)
    if leftovers:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), leftovers


def report_rss(path, payload=None):
    """Writes this process's resident set size in kB to `path` (`payload` is only carried)."""
    with open("/proc/self/status") as f:
        rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    Path(path).write_text(str(rss))
