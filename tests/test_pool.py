"""`Pool`, `ThreadPool`, `dummy`: the stdlib's behaviour on both implementations, and what
ferroproc does better (a killed worker fails its own tasks instead of hanging the pool).

Scenarios where the stdlib hangs run the stdlib in a throwaway interpreter with a timeout.
"""

from __future__ import annotations

import concurrent.futures
import importlib
import math
import multiprocessing
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import threading
import time

import _pool_workers as pw
import _queue_workers as qw
import pytest
from _workers import SCRIPT_TIMEOUT, SHORT_TIMEOUT, TESTS_DIR, impl_name_of

T = SHORT_TIMEOUT


def _pool_module(impl):
    return importlib.import_module(impl.__name__ + ".pool")


def _is_ferroproc(impl_or_ctx):
    return type(impl_or_ctx).__module__.startswith("ferroproc") or getattr(
        impl_or_ctx, "__name__", ""
    ).startswith("ferroproc")


def _close(pool):
    pool.close()
    pool.join()


# ---------------------------------------------------------------------------------------------
# The stdlib's API, on both implementations and every start method
# ---------------------------------------------------------------------------------------------


def test_api_round_trip(ctx):
    calls, errors = [], []
    with ctx.Pool(2) as p:
        assert p.apply(pw.square, (5,)) == 25
        assert p.apply(pw.add, (), {"a": 1, "b": 2}) == 3
        r = p.apply_async(pw.square, (6,), callback=calls.append)
        assert r.get(T) == 36
        assert r.ready() and r.successful()
        assert calls == [36]
        assert p.map(pw.square, range(50)) == [x * x for x in range(50)]
        assert p.map(pw.square, range(50), chunksize=7) == [x * x for x in range(50)]
        assert p.starmap(pw.add, [(1, 2), (3, 4)]) == [3, 7]
        assert p.starmap_async(pw.add, [(5, 5)]).get(T) == [10]
        assert p.map_async(pw.square, [], chunksize=1).get(T) == []
        assert list(p.imap(pw.square, range(20))) == [x * x for x in range(20)]
        assert list(p.imap(pw.square, iter(range(20)), chunksize=3)) == [x * x for x in range(20)]
        assert sorted(p.imap_unordered(pw.square, range(20))) == [x * x for x in range(20)]
        m = p.map_async(pw.fail_on, [1, 2, 3], callback=calls.append, error_callback=errors.append)
        with pytest.raises(ValueError, match="bad item 2"):
            m.get(T)
        assert not m.successful()
        assert isinstance(errors[0], ValueError)
        assert _pool_module(_impl_of(ctx)).RUN == "RUN"
    with pytest.raises(ValueError, match="Pool not running"):
        p.apply_async(pw.square, (1,))
    p.join()


def _impl_of(ctx):
    return importlib.import_module(type(ctx).__module__.split(".")[0])


def test_worker_exception_carries_remote_traceback(ctx):
    mod = _pool_module(_impl_of(ctx))
    with ctx.Pool(1) as p:
        with pytest.raises(KeyError) as info:
            p.apply(pw.raise_key_error, ("k",))
        cause = info.value.__cause__
        assert type(cause) is mod.RemoteTraceback
        assert "raise KeyError(key)" in cause.tb
        # imap re-raises per item and keeps going.
        it = p.imap(pw.fail_on, range(4), 1)
        assert next(it) == 0
        assert next(it) == 1
        with pytest.raises(ValueError):
            next(it)
        assert next(it) == 3
    p.join()


def test_unpicklable_task_result_and_exception_fail_that_task_only(ctx):
    mod = _pool_module(_impl_of(ctx))
    with ctx.Pool(2) as p:
        r = p.apply_async(pw.return_unpicklable)
        with pytest.raises(mod.MaybeEncodingError):
            r.get(T)
        r = p.apply_async(pw.raise_unpicklable)
        with pytest.raises(mod.MaybeEncodingError):
            r.get(T)
        with pytest.raises(RuntimeError, match="cannot pickle"):
            p.map(pw.square, [pw.RefusesPickle()] * 3)
        # The pool is intact.
        assert p.map(pw.square, range(10)) == [x * x for x in range(10)]
    p.join()


def test_large_results_come_back_intact_beside_unpicklable_ones(ctx):
    mod = _pool_module(_impl_of(ctx))
    with ctx.Pool(2) as p:
        it = p.imap(pw.held_or_unpicklable, range(6), 1)
        for i in range(6):
            if i % 2 == 0:
                assert it.next(T) == qw.held_of(i, pw.HELD_SIZE)
            else:
                with pytest.raises(mod.MaybeEncodingError):
                    it.next(T)
    p.join()


def test_large_numpy_results(ctx):
    np = pytest.importorskip("numpy")
    with ctx.Pool(2) as p:
        got = p.starmap(pw.numpy_full, [(i, 1 << 20) for i in range(4)])
    p.join()
    for i, a in enumerate(got):
        assert a.shape == (1 << 20,) and a.dtype == np.float64 and (a == i).all()
        assert a.flags.writeable
        a[0] = -1  # the caller's own


def test_large_arguments_reach_the_workers_intact(ctx):
    size = 6 << 20
    args = [qw.held_of(i, size) for i in range(4)]
    with ctx.Pool(2) as p:
        got = p.map(pw.describe_held, args, chunksize=1)
    p.join()
    for i, (first, last, length, holder) in enumerate(got):
        assert (first, last, length) == (i, i, size)
        if _is_ferroproc(ctx):
            assert holder == "RecvBuffer"  # received in its blob, not copied out


def test_a_large_result_is_made_on_the_queue_memory(ctx):
    if not _is_ferroproc(ctx):
        pytest.skip("ferroproc's out-of-band results")
    with ctx.Pool(1) as p:
        got = p.apply(qw.held_of, (5, 6 << 20))
    p.join()
    assert got == qw.held_of(5, 6 << 20)
    assert type(got.data.obj).__name__ == "RecvBuffer"


def test_timeouts_raise_multiprocessing_timeout_error(ctx):
    with ctx.Pool(1) as p:
        r = p.apply_async(pw.sleep_then, (1.0, "late"))
        t0 = time.monotonic()
        with pytest.raises(multiprocessing.TimeoutError):
            r.get(0.1)
        assert time.monotonic() - t0 < 0.9
        with pytest.raises(ValueError):
            r.successful()
        it = p.imap(pw.sleep_then, [1.0])
        with pytest.raises(multiprocessing.TimeoutError):
            it.next(timeout=0.05)
        assert r.get(T) == "late"
    p.join()


def test_wait_timeouts_and_many_waiting_threads(ctx):
    with ctx.Pool(1) as p:
        r = p.apply_async(pw.sleep_then, (0.5, "done"))
        for timeout in (-1, 0, 0.05):
            t0 = time.monotonic()
            r.wait(timeout)
            assert not r.ready()
            assert time.monotonic() - t0 < 0.4
        seen = []
        waiters = [threading.Thread(target=lambda: seen.append(r.get(T))) for _ in range(3)]
        for t in waiters:
            t.start()
        r.wait(T)  # a fourth waiter, in this thread
        for t in waiters:
            t.join(T)
        assert r.ready() and r.successful()
        assert seen == ["done"] * 3
        r.wait(-1)  # ready: returns at once whatever the timeout
    p.join()


def test_initializer_and_maxtasksperchild(ctx):
    p = ctx.Pool(2, initializer=pw.set_initialized, initargs=("yes",), maxtasksperchild=2)
    try:
        assert p.map(pw.get_initialized, range(4), chunksize=1) == ["yes"] * 4
        before = {w.pid for w in p._pool}
        pids = [p.apply_async(pw.pid_after, (0.01,)).get(T) for _ in range(8)]
        assert len(set(pids)) >= 3  # each worker ran at most two tasks
        assert {w.pid for w in p._pool} != before
    finally:
        _close(p)


def test_failing_initializer_does_not_run_tasks(ctx):
    # As the stdlib: each worker dies in its initializer and is replaced; tasks never run.
    p = ctx.Pool(1, initializer=pw.failing_initializer)
    try:
        r = p.apply_async(pw.square, (2,))
        with pytest.raises(multiprocessing.TimeoutError):
            r.get(0.5)
    finally:
        p.terminate()
        p.join()


def test_state_errors(ctx):
    p = ctx.Pool(1)
    with pytest.raises(ValueError, match="still running"):
        p.join()
    with pytest.raises(NotImplementedError):
        pickle.dumps(p)
    with pytest.raises(ValueError):
        ctx.Pool(0)
    with pytest.raises(ValueError):
        ctx.Pool(1, maxtasksperchild=0)
    with pytest.raises(TypeError):
        ctx.Pool(1, initializer=3)
    with pytest.raises(ValueError, match="Chunksize must be 1"):
        p.imap(pw.square, [1, 2], chunksize=0)
    if impl_name_of(ctx) == "ferroproc":
        # The stdlib's map returns [None, None] here (its MapResult counts no chunk).
        for call in (p.map, p.map_async, p.starmap, p.starmap_async):
            with pytest.raises(ValueError, match="Chunksize must be 1"):
                call(pw.square, [1, 2], chunksize=0)
    p.close()
    with pytest.raises(ValueError, match="Pool not running"):
        p.map(pw.square, [1])
    with pytest.raises(ValueError, match="Pool not running"):
        with p:
            pass
    p.join()


def test_thread_pool_and_dummy(impl):
    pool_mod = _pool_module(impl)
    dummy = importlib.import_module(impl.__name__ + ".dummy")
    with pool_mod.ThreadPool(3) as p:
        assert p.map(pw.square, range(30)) == [x * x for x in range(30)]
        with pytest.raises(KeyError) as info:
            p.apply(pw.raise_key_error)
        assert info.value.__cause__ is None  # threads do not wrap exceptions
    p.join()
    with dummy.Pool(2) as p:
        assert sorted(p.imap_unordered(pw.square, range(10))) == [x * x for x in range(10)]
    p.join()
    proc = dummy.Process(target=pw.square, args=(2,))
    proc.start()
    proc.join(T)
    assert proc.exitcode == 0
    a, b = dummy.Pipe()
    a.send(1)
    assert b.recv() == 1


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_thread_pool_worker_ended_by_system_exit_is_replaced(impl, capfd):
    """A task raising `SystemExit` ends its worker thread. The stdlib's thread pool then
    waits forever for that task; ferroproc fails it with `WorkerLostError` naming the thread
    and starts another. (Its scheduler used to ask the thread for a pid, and die.)"""
    if impl.__name__ != "ferroproc":
        pytest.skip("the stdlib's pool waits forever for the task")
    pool_mod = _pool_module(impl)
    with pool_mod.ThreadPool(1) as p:
        with pytest.raises(pool_mod.WorkerLostError, match=r"pool worker thread .+ ended"):
            p.apply_async(pw.identity_or_raise, (SystemExit(3),)).get(T)
        assert p.map_async(pw.square, range(4)).get(T) == [0, 1, 4, 9]
    p.join()
    assert "Traceback" not in capfd.readouterr().err


def test_apply_async_from_many_threads(ctx):
    with ctx.Pool(2) as p:
        results = {}

        def submit(k):
            results[k] = [p.apply_async(pw.add, (k, i)) for i in range(200)]

        threads = [threading.Thread(target=submit, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(T)
        for k, rs in results.items():
            assert [r.get(T) for r in rs] == [k + i for i in range(200)]
    p.join()


@pytest.mark.fork_only
def test_many_pools_leave_nothing_behind(ctx):
    # The autouse hygiene fixture fails the test on any leaked process or descriptor.
    n = 100 if _is_ferroproc(ctx) else 20
    for i in range(n):
        with ctx.Pool(2) as p:
            assert p.apply(pw.square, (i,)) == i * i
        p.join()


@pytest.mark.parametrize("end", ["close", "terminate"])
def test_joined_pool_has_reaped_its_workers(ctx, end):
    # Right after join() returns, no worker is left, not even as a zombie. Forkserver workers
    # are the server's children: ferroproc's join() returns on their own exit report
    # (difference 1) and the server reaps them, so for them only "soon" holds.
    import _workers

    later = _is_ferroproc(ctx) and ctx.get_start_method() == "forkserver"
    for _ in range(5):
        p = ctx.Pool(2)
        pids = [w.pid for w in p._pool]
        assert p.map(pw.square, range(4)) == [0, 1, 4, 9]
        getattr(p, end)()
        p.join()
        deadline = time.monotonic() + (SHORT_TIMEOUT if later else 0)
        while True:
            table = _workers.proc_table()
            left = [pid for pid in pids if pid in table]
            if not left or time.monotonic() >= deadline:
                break
            time.sleep(0.01)
        assert left == [], {pid: table.get(pid) for pid in pids}


def test_pool_whose_process_factory_fails_releases_what_it_started(impl):
    # A context whose Process objects are not processes at all (no pid, no _popen), the
    # third of which fails to start: Pool() raises that error and stops the ones started.
    made = []

    class Stand_in:
        def __init__(self, **kwargs):
            self.name, self.daemon, self.exitcode, self.state = "stand-in", False, None, None
            made.append(self)

        def start(self):
            if len(made) > 2:
                raise OSError("third start refused")
            self.state = "started"

        def terminate(self):
            self.state = "stopped"

        def kill(self):
            self.state = "stopped"

        def join(self, timeout=None):
            pass

        def is_alive(self):
            return self.state == "started"

    class Context:
        Process = Stand_in
        SimpleQueue = impl.get_context("fork").SimpleQueue  # the stdlib's pool wants one

    with pytest.raises(OSError, match="third start refused"):
        _pool_module(impl).Pool(4, context=Context())
    assert len(made) == 3
    assert not any(p.is_alive() for p in made)


def test_pool_whose_second_fork_fails_stops_the_first_worker(impl, monkeypatch):
    # ferroproc forks a plain pool's workers back to back: the one started before the
    # failure is stopped and reaped, as the stdlib's Pool does with the ones it started.
    real_fork, forked = os.fork, []

    def fork():
        if forked:
            raise BlockingIOError(11, "Resource temporarily unavailable")
        pid = real_fork()
        if pid:
            forked.append(pid)
        return pid

    fds_before = set(os.listdir("/proc/self/fd"))
    monkeypatch.setattr(os, "fork", fork)
    with pytest.raises(BlockingIOError):
        impl.get_context("fork").Pool(3)
    monkeypatch.setattr(os, "fork", real_fork)
    if not _is_ferroproc(impl):
        # The stdlib's popen_fork leaks the two pipes it made for a fork that failed (the
        # hygiene fixture checks ferroproc's descriptors).
        for fd in set(os.listdir("/proc/self/fd")) - fds_before:
            os.close(int(fd))
    assert len(forked) == 1
    assert impl.active_children() == []
    with pytest.raises(ChildProcessError):  # reaped, not left as a zombie
        os.waitpid(forked[0], os.WNOHANG)


_EMFILE_SWEEP = """
    import gc, os, resource, time

    def children():
        return [pid for pid, (state, ppid, _) in proc_table().items()
                if ppid == os.getpid() and state not in ("Z", "X")]

    def fds():
        return set(os.listdir("/proc/self/fd"))

    if __name__ == "__main__":
        ctx = mp.get_context("fork")
        p = ctx.Pool(1)  # what a pool imports and caches, before the first count
        p.terminate()
        p.join()
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        outcomes = set()
        for free in range(2, 40):
            gc.collect()
            before = fds()
            # Exactly `free` descriptors left: the limit just above the highest, holes filled.
            limit = max(int(fd) for fd in before) + 1 + free
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
            fill = []
            try:
                while True:
                    fill.append(os.open("/dev/null", os.O_RDONLY))
            except OSError:
                pass
            for fd in fill[len(fill) - free:]:
                os.close(fd)
            del fill[len(fill) - free:]
            error = None
            try:
                p = ctx.Pool(4)
            except OSError as e:
                error = e.errno
            finally:
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
                for fd in fill:
                    os.close(fd)
            if error is None:
                p.terminate()
                p.join()
                del p
            outcomes.add(str(error or "ok"))
            time.sleep(0.05)
            gc.collect()
            mp.active_children()
            left, opened = children(), fds() - before
            if not CHECK_FDS:  # the stdlib leaks the two pipes of a start that failed
                opened = ()
            if left or opened:
                print("free", free, "error", error, "children", left, "fds", sorted(opened))
                sys.exit(1)
        print(sorted(outcomes))
"""


def test_pool_started_out_of_descriptors_leaves_nothing_behind(impl_name):
    # Pool(4) with 2 to 39 descriptors left: it starts, or raises EMFILE having stopped the
    # workers it had started and closed what it had opened (ferroproc once left workers
    # running when a pidfd could not be opened after the forks).
    body = f"from _workers import proc_table\nCHECK_FDS = {impl_name == 'ferroproc'}\n"
    body += textwrap.dedent(_EMFILE_SWEEP)
    r, leftovers = _run_in_interpreter(impl_name, body)
    assert not leftovers, leftovers
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip() == "['24', 'ok']", r.stdout


def test_pool_with_sigchld_ignored_and_workers_exiting_at_once(impl_name):
    # SIGCHLD ignored: the kernel reaps each child as it ends, so a worker that exits at once
    # may be gone before the parent opens a handle on it. Pool() must still return, and
    # terminate/join must finish.
    body = """
        import os, signal

        def die():
            os._exit(3)

        def leave():
            sys.exit(3)

        if __name__ == "__main__":
            signal.signal(signal.SIGCHLD, signal.SIG_IGN)
            ctx = mp.get_context("fork")
            for _ in range(5):
                p = ctx.Pool(8, initializer=die)
                p.terminate()
                p.join()
            q = ctx.Process(target=leave)
            q.start()
            q.join(30)
            print("done", q.exitcode)
    """
    r, leftovers = _run_in_interpreter(impl_name, body)
    assert not leftovers, leftovers
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout.split()
    assert out[0] == "done", r.stdout
    if impl_name == "ferroproc":
        # The child's exit report survives the reaping; the stdlib's waitpid finds no child.
        assert out[1] == "3", r.stdout


def _run_in_interpreter(impl_name, body):
    import _workers as w

    return w.run_interpreter(["-c", w.script_source(impl_name, textwrap.dedent(body))])


def test_joined_pool_has_reaped_its_replaced_workers(ctx):
    # maxtasksperchild=1: every task ends its worker, which the pool replaces; after join()
    # none of them is left.
    import _workers

    later = _is_ferroproc(ctx) and ctx.get_start_method() == "forkserver"
    p = ctx.Pool(2, maxtasksperchild=1)
    pids = set(p.map(pw.pid_after, [0.0] * 6, chunksize=1))
    p.close()
    p.join()
    deadline = time.monotonic() + (SHORT_TIMEOUT if later else 0)
    while True:
        table = _workers.proc_table()
        left = sorted(pid for pid in pids if pid in table)
        if not left or time.monotonic() >= deadline:
            break
        time.sleep(0.01)
    assert len(pids) >= 3
    assert left == [], {pid: table.get(pid) for pid in left}


# ---------------------------------------------------------------------------------------------
# Dead workers: ferroproc fails what they held; the stdlib hangs
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def fctx(ctx):
    if not _is_ferroproc(ctx):
        pytest.skip("the stdlib's pool hangs when a worker dies (see the scripted test below)")
    return ctx


def _busy_worker_pid(p, result):
    deadline = time.monotonic() + T
    while time.monotonic() < deadline:
        core = p._core
        with core.lock:
            for slot in core.slots:
                held = core.ledger.batches(slot.index)
                for recs in held:
                    if any(rec[0] is result for rec in recs):
                        if slot.proc is not None and slot.taskq.qsize() < len(held):
                            return slot.proc.pid
        time.sleep(0.01)
    raise AssertionError("no worker took the task")


def test_worker_killed_mid_task_fails_that_task(fctx):
    mod = _pool_module(_impl_of(fctx))
    with fctx.Pool(2) as p:
        r = p.apply_async(pw.sleep_then, (60,))
        other = p.apply_async(pw.sleep_then, (0.3, "fine"))
        pid = _busy_worker_pid(p, r)
        t0 = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(mod.WorkerLostError, match=rf"{pid} was killed by signal 9 \(SIGKILL\)"):
            r.get(5)
        assert time.monotonic() - t0 < 1.0
        assert other.get(T) == "fine"
        # Replaced: the pool keeps serving with its full size.
        assert p.map(pw.square, range(20)) == [x * x for x in range(20)]
        assert len(p._pool) == 2 and pid not in {w.pid for w in p._pool}
    p.join()


def test_idle_worker_killed_is_replaced(fctx):
    with fctx.Pool(2) as p:
        assert p.apply(pw.square, (3,)) == 9
        victim = p._pool[0].pid
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + T
        while victim in {w.pid for w in p._pool} and time.monotonic() < deadline:
            time.sleep(0.01)
        assert p.map(pw.square, range(100), chunksize=1) == [x * x for x in range(100)]
        assert victim not in {w.pid for w in p._pool}
    p.join()


def test_worker_killed_during_map(fctx):
    mod = _pool_module(_impl_of(fctx))
    with fctx.Pool(2) as p:
        r = p.map_async(pw.sleep_then, [0.2] * 10, chunksize=1)
        time.sleep(0.3)
        os.kill(p._pool[0].pid, signal.SIGKILL)
        with pytest.raises(mod.WorkerLostError):
            r.get(5)
        assert p.starmap(pw.add, [(1, 1)] * 4) == [2] * 4
    p.join()


@pytest.mark.fork_only
def test_segfaulting_task_names_the_signal(fctx):
    mod = _pool_module(_impl_of(fctx))
    with fctx.Pool(1) as p:
        with pytest.raises(mod.WorkerLostError, match="SIGSEGV"):
            p.apply(pw.segfault)
        assert p.apply(pw.square, (4,)) == 16
    p.join()


def test_terminate_fails_pending_results(fctx):
    mod = _pool_module(_impl_of(fctx))
    p = fctx.Pool(1)
    r = p.apply_async(pw.sleep_then, (60,))
    time.sleep(0.1)
    p.terminate()
    p.join()
    with pytest.raises(mod.WorkerLostError, match="terminated"):
        r.get(1)


KILL_SCRIPT = """
import os, signal, sys, time
sys.path.insert(0, {tests!r})
import _pool_workers as pw
import {impl} as mp
if __name__ == "__main__":
    p = mp.get_context("fork").Pool(1)
    r = p.apply_async(pw.sleep_then, (60,))
    time.sleep(0.5)
    os.kill(p._pool[0].pid, signal.SIGKILL)
    try:
        r.get()
    except Exception as e:
        print(type(e).__name__)
    p.terminate()
"""


def test_killed_worker_script(impl, tmp_path):
    path = tmp_path / "kill.py"
    path.write_text(textwrap.dedent(KILL_SCRIPT.format(tests=TESTS_DIR, impl=impl.__name__)))
    cmd = [sys.executable, str(path)]
    if impl.__name__ == "multiprocessing":
        # Known stdlib hang (CPython issue): the task held by a killed worker never completes.
        with pytest.raises(subprocess.TimeoutExpired):
            subprocess.run(cmd, check=False, capture_output=True, timeout=3)
        return
    r = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=SCRIPT_TIMEOUT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "WorkerLostError"


CTRL_C_SCRIPT = """
import os, signal, sys, threading, time
sys.path.insert(0, {tests!r})
import _pool_workers as pw
import {impl} as mp
if __name__ == "__main__":
    pids = []
    t0 = None
    try:
        with mp.get_context("fork").Pool(2) as p:
            pids = [w.pid for w in p._pool]
            threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()
            t0 = time.monotonic()
            p.map(pw.sleep_then, [5] * 4, chunksize=1)
    except KeyboardInterrupt:
        print("interrupted", round(time.monotonic() - t0, 2))
    p.join()
    deadline = time.monotonic() + 5
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = []
        for pid in pids:
            try:
                os.kill(pid, 0)
                alive.append(pid)
            except ProcessLookupError:
                pass
        time.sleep(0.02)
    print("alive", alive)
"""


def test_ctrl_c_during_map(impl, tmp_path):
    path = tmp_path / "ctrlc.py"
    path.write_text(textwrap.dedent(CTRL_C_SCRIPT.format(tests=TESTS_DIR, impl=impl.__name__)))
    r = subprocess.run(
        [sys.executable, str(path)],
        check=False,
        capture_output=True,
        text=True,
        timeout=SCRIPT_TIMEOUT,
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("interrupted"), r.stdout
    assert float(lines[0].split()[1]) < 2.0, r.stdout
    assert lines[-1] == "alive []", r.stdout


def test_process_pool_executor_with_a_killed_worker(ctx):
    with concurrent.futures.ProcessPoolExecutor(max_workers=2, mp_context=ctx) as ex:
        assert list(ex.map(pw.square, range(20))) == [x * x for x in range(20)]
        fut = ex.submit(pw.kill_self)
        with pytest.raises(concurrent.futures.process.BrokenProcessPool):
            fut.result(T)


def test_results_are_awaitable_ferroproc_extension(fctx):
    import asyncio

    async def main(p):
        rs = await asyncio.gather(*(p.apply_async(pw.sleep_then, (0.05, i)) for i in range(4)))
        assert rs == [0, 1, 2, 3]
        assert await p.map_async(pw.square, range(5)) == [0, 1, 4, 9, 16]
        with pytest.raises(KeyError):
            await p.apply_async(pw.raise_key_error)

    with fctx.Pool(2) as p:
        asyncio.run(asyncio.wait_for(main(p), T))
    p.join()


def _same_values(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert type(g) is type(w), (g, w)
        if isinstance(w, float) and math.isnan(w):
            assert math.isnan(g)
        else:
            assert g == w
            if isinstance(w, float):
                assert math.copysign(1, g) == math.copysign(1, w)


@pytest.mark.parametrize(
    "values",
    [
        [*range(-5, 3000, 7), 2**31, -(2**31) - 1, 2**63 - 1, -(2**63)],
        [0.0, -0.0, 1.5, float("inf"), float("-inf"), float("nan"), 1e308, 5e-324],
        [True, False, 1, 0],  # bools stay bools
        [1, 2.0, 3],  # mixed
        [2**63, 1, -(2**63) - 1],  # beyond 64 bits
        [pw.Level.LOW, 7],  # an int subclass
        [],
    ],
    ids=["ints", "floats", "bools", "mixed", "big-ints", "int-subclass", "empty"],
)
def test_map_results_keep_their_values_and_types(ctx, values):
    """What comes back from map is what the function returned, whatever the encoding
    (ferroproc packs lists of plain ints or floats natively)."""
    with ctx.Pool(2) as p:
        for chunksize in (None, 1, 3):
            _same_values(p.map(pw.identity, values, chunksize=chunksize), values)
        _same_values(list(p.imap(pw.identity, values, 2)), values)
    p.join()


@pytest.mark.parametrize(
    "values",
    [
        [1, 2, 3, ValueError("late"), 5],  # after results that pack
        [1.5, 2.5, "x", ValueError("late")],  # after the chunk stopped packing
        [ValueError("first"), 1, 2],
    ],
    ids=["after-packed", "after-spill", "first"],
)
def test_map_exception_fails_its_chunk_with_the_remote_traceback(ctx, values):
    """An exception anywhere in a chunk fails the map with that exception and the worker's
    traceback as its cause (ferroproc runs `map` chunks natively, packing results as they
    come), and the pool keeps serving."""
    mod = _pool_module(_impl_of(ctx))
    with ctx.Pool(2) as p:
        with pytest.raises(ValueError) as info:
            p.map(pw.identity_or_raise, values, chunksize=len(values))
        assert str(info.value) == str(next(v for v in values if isinstance(v, ValueError)))
        assert type(info.value.__cause__) is mod.RemoteTraceback
        assert "raise x" in info.value.__cause__.tb
        assert p.map(pw.identity_or_raise, [1, 2.0, "3"], chunksize=3) == [1, 2.0, "3"]
    p.join()


def test_bad_call_arguments_fail_the_result_not_the_submission(ctx):
    """Arguments that are not a sequence (or keywords not a mapping) fail the task in the
    worker, as the stdlib's ``func(*args, **kwds)`` does there: `apply_async` returns, the
    result raises, `error_callback` runs. A list is a sequence like any other."""
    mod = _pool_module(_impl_of(ctx))
    errors = []
    with ctx.Pool(1) as p:
        r = p.apply_async(pw.square, 5, error_callback=errors.append)
        with pytest.raises(TypeError, match=r"after \* must be an iterable, not int") as info:
            r.get(T)
        assert type(info.value.__cause__) is mod.RemoteTraceback
        assert [type(e) for e in errors] == [TypeError]
        with pytest.raises(TypeError, match=r"after \*\* must be a mapping, not int"):
            p.apply_async(pw.square, (5,), 7).get(T)
        with pytest.raises(TypeError, match="'int' object is not iterable"):
            p.starmap(pw.add, [(1, 2), 5])
        with pytest.raises(TypeError, match="'int' object is not iterable"):
            p.starmap(pw.add, [(1, 2), 5, (3, 4)], chunksize=1)
        assert p.apply(pw.add, [1, 2]) == 3
        assert p.starmap(pw.add, [[1, 2], (3, 4)]) == [3, 7]
    p.join()


def test_map_task_raising_system_exit_fails_instead_of_hanging(fctx):
    """`SystemExit` is not an `Exception`: it ends the worker, as in the stdlib (whose pool
    then waits forever for the task); ferroproc fails the task and replaces the worker."""
    mod = _pool_module(_impl_of(fctx))
    with fctx.Pool(1) as p:
        with pytest.raises(mod.WorkerLostError):
            p.map(pw.identity_or_raise, [1, 2, SystemExit(3)], chunksize=3)
        assert p.map(pw.square, range(5), chunksize=5) == [0, 1, 4, 9, 16]
    p.join()


def test_packed_outcomes_refuse_damaged_input(impl):
    if impl.__name__ != "ferroproc":
        pytest.skip("ferroproc's native outcome packing")
    from ferroproc import _ferroproc as native

    packed = native.pool_pack_outcomes([(True, [1, 2, 3]), (True, [0.5])])
    assert native.pool_is_packed(packed)
    assert native.pool_unpack_outcomes(packed) == [(True, [1, 2, 3]), (True, [0.5])]
    assert not native.pool_is_packed(pickle.dumps([(True, [1])]))
    for bad in (packed[:-1], packed + b"x", packed[:5], packed.replace(b"f", b"z")):
        with pytest.raises(ValueError):
            native.pool_unpack_outcomes(bad)
    # Only all-successful batches of plain numeric lists are packed.
    for outcomes in ([(False, ValueError())], [(True, 3)], [(True, [1, "a"])], [(1, [1])]):
        assert native.pool_pack_outcomes(outcomes) is None


class _Bar:
    """A tqdm look-alike: ``update(n)``, a settable ``total``, ``refresh``."""

    def __init__(self, total=None):
        self.total, self.n, self.refreshed = total, 0, 0

    def update(self, n):
        self.n += n

    def refresh(self):
        self.refreshed += 1


def _checked_calls(calls, total):
    """The progress calls end at (total, total) and count up in steps that add up to total."""
    dones = [done for done, _ in calls]
    assert dones == sorted(dones) and dones[-1] == total
    assert all(t == total for _, t in calls)


def test_map_reports_progress_ferroproc_extension(fctx):
    calls = []
    with fctx.Pool(2) as p:
        out = p.map(pw.square, range(300), chunksize=7, progress=lambda d, t: calls.append((d, t)))
        # Every item is reported before map returns.
        assert out == [x * x for x in range(300)]
        _checked_calls(calls, 300)
        assert len(calls) == len(range(0, 300, 7))  # one report per chunk
        calls.clear()
        r = p.starmap_async(
            pw.add, [(i, i) for i in range(40)], progress=lambda *a: calls.append(a)
        )
        assert r.get(T) == [2 * i for i in range(40)]
        _checked_calls(calls, 40)
        calls.clear()
        # A failing chunk counts as done too; the failure is what get() raises.
        with pytest.raises(ValueError):
            p.map(pw.fail_on, range(10), chunksize=1, progress=lambda *a: calls.append(a))
        _checked_calls(calls, 10)
        assert p.map(pw.square, [], progress=lambda *a: calls.append(a)) == []
    p.join()


def test_imap_reports_progress_with_total_when_known_ferroproc_extension(fctx):
    with fctx.Pool(2) as p:
        calls = []
        got = list(p.imap(pw.square, range(50), progress=lambda *a: calls.append(a)))
        assert got == [x * x for x in range(50)]
        _checked_calls(calls, 50)
        # A lazy iterable: the total is None until the pool has read all of it.
        calls = []
        got = sorted(
            p.imap_unordered(pw.square, iter(range(60)), 4, progress=lambda *a: calls.append(a))
        )
        assert got == sorted(x * x for x in range(60))
        assert calls[-1] == (60, 60)
        assert all(t in (None, 60) for _, t in calls)
    p.join()


def test_progress_bar_object_gets_updates_and_its_total_ferroproc_extension(fctx):
    bar = _Bar()
    with fctx.Pool(2) as p:
        assert p.map(pw.square, range(100), chunksize=10, progress=bar) == [
            x * x for x in range(100)
        ]
        assert (bar.n, bar.total) == (100, 100)
        fixed = _Bar(total=999)  # a total the caller set is left alone
        assert len(list(p.imap(pw.square, iter(range(20)), progress=fixed))) == 20
        assert (fixed.n, fixed.total, fixed.refreshed) == (20, 999, 0)
    p.join()


def test_progress_true_draws_a_tqdm_bar_ferroproc_extension(fctx, capsys):
    pytest.importorskip("tqdm")
    with fctx.Pool(2) as p:
        assert p.map(pw.square, range(64), chunksize=8, progress=True) == [x * x for x in range(64)]
    p.join()
    assert "64/64" in capsys.readouterr().err


def test_bad_progress_is_refused_and_a_failing_one_is_reported(fctx, monkeypatch, capsys):
    with fctx.Pool(2) as p:
        with pytest.raises(TypeError, match="progress must be"):
            p.map(pw.square, range(3), progress=3)
        with pytest.raises(TypeError, match="progress must be"):
            p.imap(pw.square, range(3), progress="bar")
        monkeypatch.setitem(sys.modules, "tqdm", None)
        monkeypatch.setitem(sys.modules, "tqdm.auto", None)
        with pytest.raises(ImportError, match="needs the tqdm package"):
            p.map(pw.square, range(3), progress=True)

        def broken(done, total):
            raise RuntimeError("progress display broke")

        # A progress callback that raises is printed like a failing result callback; the
        # map itself still completes.
        assert p.map(pw.square, range(5), progress=broken) == [0, 1, 4, 9, 16]
        assert p.map(pw.square, range(3)) == [0, 1, 4]
        assert not p._cache
    p.join()
    assert "progress display broke" in capsys.readouterr().err


def test_thread_pool_reports_progress_ferroproc_extension(impl):
    if impl.__name__ != "ferroproc":
        pytest.skip("ferroproc extension")
    calls = []
    with _pool_module(impl).ThreadPool(3) as p:
        assert p.map(pw.square, range(30), progress=lambda *a: calls.append(a))[-1] == 841
    p.join()
    _checked_calls(calls, 30)


ORPHAN_SCRIPT = """
import sys, time
import {impl} as mp
if __name__ == "__main__":
    p = mp.get_context({method!r}).Pool(2)
    print(" ".join(str(w.pid) for w in p._pool), flush=True)
    time.sleep(60)
"""


def _running(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


@pytest.mark.parametrize("method", ["fork", "forkserver"])
def test_workers_exit_when_the_pool_owner_is_killed(impl, method, tmp_path):
    path = tmp_path / "orphan.py"
    path.write_text(textwrap.dedent(ORPHAN_SCRIPT.format(impl=impl.__name__, method=method)))
    owner = subprocess.Popen([sys.executable, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(x) for x in owner.stdout.readline().split()]
    finally:
        owner.kill()
        owner.wait(T)
        owner.stdout.close()
    assert len(pids) == 2
    deadline = time.monotonic() + 10
    while any(_running(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = [pid for pid in pids if _running(pid)]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert left == []


class _RaisesAfter:
    """Sized, so `map` does not list it first: it raises while being dispatched."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n + 1

    def __iter__(self):
        yield from range(self.n)
        raise LookupError("iterable broke")


def test_error_callback_may_use_the_pool(ctx):
    # The callback runs without the pool's lock held, so it may submit more work.
    done = threading.Event()
    seen = []

    def on_error(exc):
        seen.append((exc, p.apply_async(pw.square, (3,))))
        done.set()

    with ctx.Pool(2) as p:
        r = p.map_async(pw.square, _RaisesAfter(5), chunksize=1, error_callback=on_error)
        with pytest.raises(LookupError):
            r.get(T)
        assert done.wait(T)
        assert seen[0][1].get(T) == 9
    p.join()


def test_interrupted_starts_leave_no_untracked_child():
    # ferroproc only (the stdlib loses the pid when KeyboardInterrupt is raised as
    # `os.fork()` returns, and the child runs on untracked). Interrupts at random points of
    # Pool(4) and of Process.start(): every child that exists afterwards is one the library
    # knows (`active_children()`), and is gone once the script ends.
    body = """
        import os, random, signal, time
        from _workers import proc_table

        ARMED = [False]

        def interrupt(*_):
            # Only while armed: an alarm whose handler runs after the round was disarmed
            # would otherwise raise outside the `try` (the test's race, not the library's).
            if ARMED[0]:
                raise KeyboardInterrupt

        def noop():
            time.sleep(0.2)

        def children():
            return {pid for pid, (state, ppid, _) in proc_table().items()
                    if ppid == os.getpid() and state not in ("Z", "X")}

        if __name__ == "__main__":
            ctx = mp.get_context("fork")
            ballast = [bytearray(4096) for _ in range(5000)]  # slower forks
            # Imports first, outside any alarm: the first Pool() imports modules that build
            # namedtuples with eval(), and in CPython 3.11 a KeyboardInterrupt that passes
            # through an eval() or exec() of a string makes the interpreter exit by SIGINT at
            # the end even when caught (seen 2 times in 37 runs: "True 0", then status -2).
            with ctx.Pool(1) as warm:
                warm.map(abs, [1])
            warm.join()
            signal.signal(signal.SIGALRM, interrupt)
            random.seed(7)
            interrupted = untracked = 0
            for i in range(60):
                started = None
                try:
                    ARMED[0] = True
                    signal.setitimer(signal.ITIMER_REAL, random.uniform(0.0001, 0.003))
                    if i % 2:
                        started = ctx.Pool(4)
                    else:
                        started = ctx.Process(target=noop)
                        started.start()
                    signal.setitimer(signal.ITIMER_REAL, 0)
                    ARMED[0] = False
                except KeyboardInterrupt:
                    interrupted += 1
                signal.setitimer(signal.ITIMER_REAL, 0)
                ARMED[0] = False
                untracked += len(children() - {p.pid for p in mp.active_children()})
                if started is None:
                    pass
                elif hasattr(started, "pid"):  # the Process
                    if started._popen is not None:
                        started.join(30)
                else:  # the Pool
                    started.terminate()
                    started.join()
                for p in mp.active_children():
                    p.terminate()
                    p.join(30)
                # A joined child may still be exiting (README, difference 1): gone before
                # the next round counts.
                deadline = time.monotonic() + 10
                while children() and time.monotonic() < deadline:
                    time.sleep(0.005)
            print(interrupted > 10, untracked)
    """
    r, leftovers = _run_in_interpreter("ferroproc", body)
    assert not leftovers, leftovers
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.split() == ["True", "0"], r.stdout
