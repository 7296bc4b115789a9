"""What ferroproc imports, and the names it resolves on first use instead.

A process that has imported `threading` runs its at-fork hook in every forked child (about
120 copy-on-write faults, 0.2 ms per child on the development VM), and the stdlib's
`multiprocessing` imports `threading` and costs 10 ms to import. So ferroproc's processes,
pools, queues, pipes and locks import neither; the stdlib classes ferroproc re-exports
(`queue.Full`, `multiprocessing.TimeoutError`, ...) are looked up when first used. These
tests check both halves: the imports stay out, and every re-exported name is still the
stdlib's own object. The import checks are ferroproc-only: the stdlib's package imports
`threading` itself. `traceback` is imported only when a pool task or callback fails: with
`linecache` and `tokenize` it was a third of the pool's import time, which each spawn worker
pays.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import pickle
import queue
import sys
import textwrap
import threading

import _workers
import ferroproc
import ferroproc.connection
import ferroproc.pool
import ferroproc.queues
import ferroproc.synchronize
import pytest

_WORKLOAD = textwrap.dedent(
    """
    import sys

    import ferroproc


    def square(x):
        return x * x


    def absent():
        return [
            m for m in ("threading", "multiprocessing", "queue", "traceback") if m in sys.modules
        ]


    def report(conn):
        conn.send(absent())
        conn.close()


    if __name__ == "__main__":
        ctx = ferroproc.get_context(sys.argv[1])
        with ctx.Pool(2) as pool:  # exit terminates
            assert pool.map(square, range(10)) == [x * x for x in range(10)]
            assert sorted(pool.imap_unordered(square, range(5))) == [0, 1, 4, 9, 16]
            assert pool.apply_async(square, (3,)).get(30) == 9
        pool.join()
        pool = ctx.Pool(2)
        assert list(pool.imap(square, range(3))) == [0, 1, 4]
        pool.close()
        pool.join()
        q, sq, jq = ctx.Queue(), ctx.SimpleQueue(), ctx.JoinableQueue()
        for target, args in ((q.put, (1,)), (sq.put, (2,)), (jq.put, (3,))):
            p = ctx.Process(target=target, args=args)
            p.start()
            p.join(30)
        assert (q.get(timeout=30), sq.get(), jq.get(timeout=30)) == (1, 2, 3)
        jq.task_done()
        a, b = ctx.Pipe()
        p = ctx.Process(target=report, args=(b,))
        p.start()
        b.close()
        in_child = a.recv()
        p.join(30)
        lock, value = ctx.Lock(), ctx.Value("i", 1)
        with lock, value.get_lock():
            value.value += 1
        print(absent(), in_child)
    """
)


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_everyday_use_imports_neither_threading_nor_the_stdlib_package(method, tmp_path):
    script = tmp_path / "workload.py"
    script.write_text(_WORKLOAD)
    res, leftovers = _workers.run_interpreter([str(script), method], cwd=tmp_path)
    assert not leftovers, leftovers
    assert res.returncode == 0, res.stderr
    in_parent, in_child = res.stdout.split("\n")[0].split("] [")
    # None in a child. A spawn or forkserver parent imports `subprocess` (for the
    # interpreter's flags), which imports `threading`; that parent does not fork its children.
    assert in_child == "]", res.stdout + res.stderr
    if method == "fork":
        assert in_parent == "[", res.stdout + res.stderr
    else:
        assert "multiprocessing" not in in_parent, res.stdout + res.stderr


def test_reexported_stdlib_classes_are_the_stdlibs_own():
    assert ferroproc.queues.Empty is queue.Empty
    assert ferroproc.queues.Full is queue.Full
    assert ferroproc.pool.TimeoutError is multiprocessing.TimeoutError
    assert ferroproc.pool.ProcessError is multiprocessing.ProcessError
    assert ferroproc.connection.AuthenticationError is multiprocessing.AuthenticationError
    assert ferroproc.connection.BufferTooShort is multiprocessing.BufferTooShort
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        ferroproc.queues.nope  # noqa: B018 - the attribute access is the test
    for module in (ferroproc.pool, ferroproc.connection, ferroproc.synchronize):
        with pytest.raises(AttributeError, match="no attribute"):
            module.nope  # noqa: B018


def test_worker_lost_error_is_one_picklable_process_error():
    cls = ferroproc.pool.WorkerLostError
    assert cls is ferroproc.pool.WorkerLostError
    assert issubclass(cls, multiprocessing.ProcessError)
    assert (cls.__module__, cls.__qualname__) == ("ferroproc.pool", "WorkerLostError")
    err = pickle.loads(pickle.dumps(cls("worker 1 was killed")))
    assert type(err) is cls
    assert err.args == ("worker 1 was killed",)


def test_barrier_is_a_threading_barrier_made_once():
    cls = ferroproc.synchronize.Barrier
    assert cls is ferroproc.synchronize.Barrier
    assert issubclass(cls, threading.Barrier)
    assert (cls.__module__, cls.__qualname__) == ("ferroproc.synchronize", "Barrier")
    barrier = ferroproc.get_context("fork").Barrier(1)
    assert isinstance(barrier, cls)
    assert barrier.wait(5) == 0


_LATE_STDLIB = textwrap.dedent(
    """
    import sys

    import ferroproc.connection as fc

    STDLIB_FIRST = "multiprocessing" in sys.modules
    import multiprocessing  # after ferroproc: its pickler must still carry ferroproc's ends
    import multiprocessing.reduction as std_reduction

    import _conn_workers as workers

    if __name__ == "__main__":
        assert not STDLIB_FIRST
        assert std_reduction.ForkingPickler._extra_reducers[fc.Connection] is fc.reduce_connection
        a, b = fc.Pipe()
        p = multiprocessing.get_context(sys.argv[1]).Process(
            target=workers.echo_objects, args=(b, 1)
        )
        p.start()
        b.close()
        a.send({"across": True})
        assert a.poll(30)
        assert a.recv() == {"across": True}
        p.join(30)
        assert p.exitcode == 0, p.exitcode
        print("crossed")
    """
)


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_stdlib_imported_after_ferroproc_carries_its_connections(method, tmp_path):
    # The registration with the stdlib's pickler waits for the stdlib to be imported.
    script = tmp_path / "late.py"
    script.write_text(_LATE_STDLIB)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([_workers.TESTS_DIR, *sys.path]))
    res, leftovers = _workers.run_interpreter([str(script), method], cwd=tmp_path, env=env)
    assert not leftovers, leftovers
    assert res.returncode == 0, res.stderr
    assert "crossed" in res.stdout


def test_pool_condition_waits_times_out_and_wakes():
    # The pool's stand-in for `threading.Condition` (ferroproc internals).
    import _thread
    import time

    lock = _thread.allocate_lock()
    cond = ferroproc.pool._Condition(lock)
    with cond:
        t0 = time.monotonic()
        assert cond.wait(0.05) is False
        assert time.monotonic() - t0 >= 0.04
        assert cond.wait(0) is False
        assert cond.wait_for(lambda: 0, 0.02) == 0
        assert lock.locked() and not cond._waiters
    woken = []
    state = {"ready": False}

    def waiter():
        with cond:
            woken.append(cond.wait_for(lambda: state["ready"], 30))

    threads = [threading.Thread(target=waiter) for _ in range(3)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while len(cond._waiters) < 3 and time.monotonic() < deadline:
        time.sleep(0.001)
    with cond:
        cond.notify_all()  # a wake-up with the predicate still false: they wait again
    with cond:
        state["ready"] = True
        cond.notify_all()
    for t in threads:
        t.join(30)
    assert woken == [True, True, True]
    assert not cond._waiters and not lock.locked()
