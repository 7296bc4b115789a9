"""Queue, JoinableQueue and SimpleQueue, on the stdlib and on ferroproc, for every start method.

Where the two differ on purpose (ferroproc has no feeder thread) the test asserts each side's
behaviour; the kill -9 tests run on ferroproc only, because the stdlib is known to break there
(a producer killed while holding the queue's write lock, or in the middle of writing a
message into the pipe, leaves the lock held forever or a partial message that garbles the
stream for everyone else).
"""

from __future__ import annotations

import concurrent.futures
import importlib
import os
import pickle
import queue
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time

import _queue_workers as w
import pytest
from _workers import SCRIPT_TIMEOUT, SHORT_TIMEOUT, TESTS_DIR, join_ok, start

START_METHODS = ("fork", "spawn", "forkserver")


def is_ferro(obj):
    return type(obj).__module__.startswith("ferroproc") or getattr(obj, "__name__", "").startswith(
        "ferroproc"
    )


def kill(p):
    os.kill(p.pid, signal.SIGKILL)
    p.join(SHORT_TIMEOUT)
    assert p.exitcode == -signal.SIGKILL
    p.close()


def finish(q):
    """Closes a queue so that the stdlib's feeder thread and pipes go away before hygiene."""
    q.close()
    if hasattr(q, "join_thread"):
        q.join_thread()


def wait_not_empty(q):
    # The stdlib's put returns before its feeder thread wrote the message.
    deadline = time.monotonic() + SHORT_TIMEOUT
    while q.empty():
        assert time.monotonic() < deadline
        time.sleep(0.001)


# ---------------------------------------------------------------------------------------------
# Local API
# ---------------------------------------------------------------------------------------------


def test_put_get_order_qsize_empty(ctx):
    q = ctx.Queue()
    assert q.empty()
    assert q.qsize() == 0
    objs = [1, "two", (3, 3.0), {"four": [4]}, None, b"x" * 100_000]
    for obj in objs:
        q.put(obj)
    assert q.qsize() == len(objs)
    wait_not_empty(q)
    assert not q.full()
    assert [q.get(timeout=SHORT_TIMEOUT) for _ in objs] == objs
    assert q.qsize() == 0
    assert q.empty()
    q.put_nowait(5)
    assert q.get(timeout=SHORT_TIMEOUT) == 5
    with pytest.raises(queue.Empty):
        q.get_nowait()
    with pytest.raises(queue.Empty):
        q.get(False)
    finish(q)


def test_maxsize_full_and_timeouts(ctx):
    q = ctx.Queue(2)
    q.put(1)
    q.put(2)
    assert q.full()
    assert q.qsize() == 2
    with pytest.raises(queue.Full):
        q.put_nowait(3)
    with pytest.raises(queue.Full):
        q.put(3, block=False)
    with pytest.raises(queue.Full):
        q.put(3, timeout=-1)  # a negative timeout counts as zero
    t0 = time.monotonic()
    with pytest.raises(queue.Full):
        q.put(3, timeout=0.1)
    assert 0.08 <= time.monotonic() - t0 < 5
    wait_not_empty(q)
    assert q.get(timeout=-1) == 1  # available at once: a negative timeout still gets it
    assert not q.full()
    assert q.get() == 2
    with pytest.raises(queue.Empty):
        q.get(timeout=-1)
    t0 = time.monotonic()
    with pytest.raises(queue.Empty):
        q.get(timeout=0.1)
    assert 0.08 <= time.monotonic() - t0 < 5
    finish(q)


@pytest.mark.parametrize("maxsize", [0, -5])
def test_unbounded_when_maxsize_not_positive(ctx, maxsize):
    q = ctx.Queue(maxsize)
    for i in range(1000):
        q.put_nowait(i)
    assert not q.full()
    assert sum(q.get(timeout=SHORT_TIMEOUT) for _ in range(1000)) == 499500
    finish(q)


def test_closed_queue(ctx):
    q = ctx.Queue()
    with pytest.raises(AssertionError, match="not closed"):
        q.join_thread()
    q.put(1)
    q.close()
    with pytest.raises(ValueError, match=r"^Queue .* is closed$"):
        q.put(2)
    with pytest.raises(ValueError, match="is closed"):
        q.get()
    with pytest.raises(ValueError, match="is closed"):
        q.get(timeout=1)
    with pytest.raises(ValueError, match="is closed"):
        q.get_nowait()
    q.close()  # twice is fine
    q.join_thread()
    q.cancel_join_thread()


def test_cancel_join_thread(ctx):
    q = ctx.Queue()
    q.cancel_join_thread()
    q.put(1)
    assert q.get(timeout=SHORT_TIMEOUT) == 1
    finish(q)


def test_simple_queue(ctx):
    q = ctx.SimpleQueue()
    assert q.empty()
    q.put([1, 2])
    q.put("x")
    assert not q.empty()
    assert q.get() == [1, 2]
    assert q.get() == "x"
    assert q.empty()
    q.close()
    for call in (q.get, q.empty, lambda: q.put(1)):
        with pytest.raises(OSError, match="handle is closed"):
            call()


def test_simple_queue_generic_alias(ctx):
    sq = ctx.SimpleQueue()
    cls = type(sq)
    assert cls[int].__origin__ is cls
    sq.close()


def test_joinable_queue(ctx):
    q = ctx.JoinableQueue()
    with pytest.raises(ValueError, match=r"^task_done\(\) called too many times$"):
        q.task_done()
    for i in range(5):
        q.put(i)
    p = start(ctx, w.take_and_mark_done, q, 5)
    t = threading.Thread(target=q.join, daemon=True)
    t.start()
    t.join(SHORT_TIMEOUT)
    assert not t.is_alive()
    join_ok(p)
    with pytest.raises(ValueError, match="too many times"):
        q.task_done()
    q.join()  # nothing unfinished: returns at once
    finish(q)


def test_pickling_outside_process_start_is_refused(ctx):
    for q in (ctx.Queue(), ctx.JoinableQueue(), ctx.SimpleQueue()):
        with pytest.raises(RuntimeError, match="only be shared between processes"):
            pickle.dumps(q)
        finish(q)


@pytest.mark.parametrize("factory", ["Queue", "JoinableQueue", "SimpleQueue"])
def test_fork_context_queue_is_refused_by_spawn_children(impl, factory):
    q = getattr(impl.get_context("fork"), factory)()
    for method in ("spawn", "forkserver"):
        p = impl.get_context(method).Process(target=w.put_objects, args=(q, []))
        with pytest.raises(RuntimeError, match="fork context is being shared"):
            p.start()
    q.close()
    if hasattr(q, "join_thread"):
        q.join_thread()


def test_unpicklable_object(ctx, capsys):
    q = ctx.Queue()
    bad = threading.Lock()
    if is_ferro(q):
        # No feeder thread: the error is raised by put itself and nothing is enqueued.
        with pytest.raises(TypeError, match="pickle"):
            q.put(bad)
        assert q.empty()
        assert q.qsize() == 0
        q.put("next")
        assert q.get(timeout=SHORT_TIMEOUT) == "next"
    else:
        # The stdlib's put returns; its feeder thread prints the error and drops the object.
        q.put(bad)
        q.put("next")
        assert q.get(timeout=SHORT_TIMEOUT) == "next"
        assert "cannot pickle" in capsys.readouterr().err
    finish(q)


def test_copyreg_and_forking_pickler_registrations_apply(impl):
    class Point:
        def __init__(self, x):
            self.x = x

    reduction = importlib.import_module(impl.__name__ + ".reduction")
    reduction.ForkingPickler.register(Point, lambda p: (complex, (p.x, 1)))
    try:
        q = impl.get_context("fork").Queue()
        q.put(Point(3))
        assert q.get(timeout=SHORT_TIMEOUT) == complex(3, 1)
        finish(q)
    finally:
        reduction.ForkingPickler._extra_reducers.pop(Point, None)


# ---------------------------------------------------------------------------------------------
# Across processes
# ---------------------------------------------------------------------------------------------


def test_child_producer_and_consumer(ctx):
    q_in, q_out = ctx.Queue(), ctx.Queue()
    objs = [0, "a", b"b" * 10, list(range(100)), b"c" * 3_000_000]
    p = start(ctx, w.echo, q_in, q_out, len(objs))
    for obj in objs:
        q_in.put(obj)
    assert [q_out.get(timeout=SHORT_TIMEOUT) for _ in objs] == objs
    join_ok(p)
    finish(q_in)
    finish(q_out)


def test_many_producers_many_consumers(ctx):
    q, results = ctx.Queue(50), ctx.Queue()
    n, producers, consumers = 2000, 3, 2
    ps = [start(ctx, w.put_range, q, k * n, n) for k in range(producers)]
    cs = [start(ctx, w.sum_until_none, q, results) for _ in range(consumers)]
    for p in ps:
        join_ok(p)
    for _ in cs:
        q.put(None)
    got = [results.get(timeout=SHORT_TIMEOUT) for _ in cs]
    for c in cs:
        join_ok(c)
    total = producers * n
    assert sum(c for c, _ in got) == total
    assert sum(s for _, s in got) == total * (total - 1) // 2
    finish(q)
    finish(results)


def test_simple_queue_across_processes(ctx):
    q_in, q_out = ctx.SimpleQueue(), ctx.SimpleQueue()
    p = start(ctx, w.echo_simple, q_in, q_out, 3)
    for obj in (1, "x" * 500_000, None):
        q_in.put(obj)
    assert [q_out.get() for _ in range(3)] == [1, "x" * 500_000, None]
    join_ok(p)
    q_in.close()
    q_out.close()


@pytest.mark.fork_only
def test_message_larger_than_the_ring(impl, monkeypatch):
    ctx = impl.get_context("fork")
    if impl.__name__ == "ferroproc":
        monkeypatch.setattr(importlib.import_module("ferroproc.queues").Queue, "_ring_bytes", 4096)
    q_in, q_out = ctx.Queue(), ctx.Queue()
    if impl.__name__ == "ferroproc":
        assert q_in._capacity == 4096
    big = bytes(range(256)) * 4096  # 1 MiB: 256 times the ring
    objs = ["before", big, "after", big[:5000], 7]
    p = start(ctx, w.echo, q_in, q_out, len(objs))
    # Put from a thread: without a feeder thread, a put that does not fit waits for a reader,
    # and the child waits for us to read q_out before it reads more of q_in.
    t = threading.Thread(target=lambda: [q_in.put(obj, timeout=SHORT_TIMEOUT) for obj in objs])
    t.start()
    assert [q_out.get(timeout=SHORT_TIMEOUT) for _ in objs] == objs
    t.join(SHORT_TIMEOUT)
    join_ok(p)
    finish(q_in)
    finish(q_out)


# ---------------------------------------------------------------------------------------------
# Robustness (ferroproc only: see the module docstring)
# ---------------------------------------------------------------------------------------------


def _drain(q):
    got = []
    while True:
        try:
            got.append(q.get(timeout=0.3))
        except queue.Empty:
            return got


@pytest.mark.fork_only
def test_producer_killed_mid_put_never_yields_partial_messages(ctx, monkeypatch):
    if not is_ferro(ctx):
        pytest.skip("stdlib: a producer killed mid-put can leave a partial message or a held lock")
    monkeypatch.setattr(importlib.import_module("ferroproc.queues").Queue, "_ring_bytes", 1 << 16)
    q = ctx.Queue()
    rng = random.Random(1234)
    received = 0
    for round_ in range(8):
        p = start(ctx, w.put_forever, q, round_, 100_000)  # some messages are streamed
        deadline = time.monotonic() + rng.uniform(0.01, 0.15)
        while time.monotonic() < deadline:
            try:
                msg = q.get(timeout=0.05)
            except queue.Empty:
                continue
            assert w.check(msg)
            received += 1
        kill(p)
        for msg in _drain(q):
            assert w.check(msg)
            received += 1
    assert received > 0
    # Still usable by new producers and consumers.
    q.put(w.message(1, 200_000), timeout=SHORT_TIMEOUT)
    assert w.check(q.get(timeout=SHORT_TIMEOUT))
    finish(q)


@pytest.mark.fork_only
def test_consumer_killed_mid_get_leaves_the_queue_usable(ctx, monkeypatch):
    if not is_ferro(ctx):
        pytest.skip("stdlib: a consumer killed mid-get can leave a partial message in the pipe")
    monkeypatch.setattr(importlib.import_module("ferroproc.queues").Queue, "_ring_bytes", 1 << 16)
    q, ready = ctx.Queue(), ctx.Queue()
    rng = random.Random(99)
    for round_ in range(8):
        c = start(ctx, w.get_forever, q, ready)
        assert ready.get(timeout=SHORT_TIMEOUT) == c.pid
        for i in range(rng.randrange(1, 40)):
            q.put(w.message(i, rng.choice((0, 100, 5000, 60_000))), timeout=SHORT_TIMEOUT)
        time.sleep(rng.uniform(0, 0.02))
        kill(c)
        for msg in _drain(q):
            assert w.check(msg), round_
    q.put(w.message(5, 300_000), timeout=SHORT_TIMEOUT)
    assert w.check(q.get(timeout=SHORT_TIMEOUT))
    assert q.qsize() == 0
    finish(q)
    finish(ready)


@pytest.mark.slow
@pytest.mark.fork_only
def test_soak_random_kills_of_producers_and_consumers(ctx, monkeypatch):
    if not is_ferro(ctx):
        pytest.skip("stdlib: see the module docstring")
    monkeypatch.setattr(importlib.import_module("ferroproc.queues").Queue, "_ring_bytes", 1 << 16)
    q, ready = ctx.Queue(), ctx.Queue()
    rng = random.Random(7)
    for round_ in range(40):
        producers = [start(ctx, w.put_forever, q, round_ * 10 + k, 100_000) for k in range(2)]
        consumer = start(ctx, w.get_forever, q, ready)
        assert ready.get(timeout=SHORT_TIMEOUT) == consumer.pid
        time.sleep(rng.uniform(0.005, 0.1))
        victims = [*producers, consumer]
        rng.shuffle(victims)
        for p in victims:
            assert p.is_alive(), f"round {round_}: child exited with {p.exitcode}"
            kill(p)
        for msg in _drain(q):
            assert w.check(msg), round_
    q.put(w.message(3, 500_000), timeout=SHORT_TIMEOUT)
    assert w.check(q.get(timeout=SHORT_TIMEOUT))
    finish(q)
    finish(ready)


def test_memory_is_anonymous(impl):
    if impl.__name__ != "ferroproc":
        pytest.skip("the stdlib's queues use pipes and named semaphores")
    before = set(os.listdir("/dev/shm"))
    ctx = impl.get_context("fork")
    qs = [ctx.Queue(), ctx.JoinableQueue(), ctx.SimpleQueue()]
    p = start(ctx, w.put_objects, qs[0], [1, 2])
    assert [qs[0].get(timeout=SHORT_TIMEOUT) for _ in range(2)] == [1, 2]
    join_ok(p)
    assert set(os.listdir("/dev/shm")) == before
    for q in qs:
        finish(q)


# ---------------------------------------------------------------------------------------------
# ferroproc extensions
# ---------------------------------------------------------------------------------------------


def test_put_many_get_many(ctx):
    if not is_ferro(ctx):
        pytest.skip("ferroproc extension")
    q = ctx.Queue()
    q.put_many(range(10))
    q.put_many([])
    assert q.get_many(4) == [0, 1, 2, 3]
    assert q.get_many(100) == [4, 5, 6, 7, 8, 9]
    # Natively encoded and pickled messages interleaved, from a generator: order kept.
    mixed = [{"a": 1}, 1, "s", [3], (1, 2.5), None, b"b" * 300, {"z"}, -(2**70)]
    q.put_many(m for m in mixed)
    got = []
    while len(got) < len(mixed):
        got += q.get_many(100, timeout=SHORT_TIMEOUT)
    assert got == mixed
    with pytest.raises(queue.Empty):
        q.get_many(5, block=False)
    with pytest.raises(TypeError):
        q.put_many([1, threading.Lock()])
    assert q.empty()  # everything is pickled before anything is written
    small = ctx.Queue(3)
    with pytest.raises(queue.Full) as e:
        small.put_many(range(5), timeout=0.05)
    assert e.value.args == (3,)
    p = start(ctx, w.put_objects, q, [b"z" * 2_000_000, 1])
    got = []
    while len(got) < 2:
        got += q.get_many(10, timeout=SHORT_TIMEOUT)
    assert got == [b"z" * 2_000_000, 1]
    join_ok(p)
    sq = ctx.SimpleQueue()
    sq.put_many("abc")
    assert sq.get_many(10) == ["a", "b", "c"]
    sq.close()
    finish(q)
    finish(small)


# ---------------------------------------------------------------------------------------------
# Signals and real clients
# ---------------------------------------------------------------------------------------------

CTRL_C_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from _workers import expect_interrupt
import {impl} as mp

ctx = mp.get_context("fork")
q = ctx.Queue(1)
sq = ctx.SimpleQueue()

def interrupted(name, call):
    expect_interrupt(name, call, 3.0)

interrupted("get", q.get)
interrupted("get_timeout", lambda: q.get(timeout=20))
interrupted("simple_get", sq.get)
q.put(1)
interrupted("put_full", lambda: q.put(2))
# Everything still works afterwards.
assert q.get(timeout=5) == 1
q.put(3)
assert q.get(timeout=5) == 3
sq.put(4)
assert sq.get() == 4
q.close(); q.join_thread(); sq.close()
print("ok")
"""


def test_ctrl_c_interrupts_blocked_calls(impl):
    script = textwrap.dedent(CTRL_C_SCRIPT.format(impl=impl.__name__, tests=TESTS_DIR))
    r = subprocess.run(
        [sys.executable, "-c", script],
        check=False,
        capture_output=True,
        text=True,
        timeout=SCRIPT_TIMEOUT,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[-1] == "ok", r.stdout
    assert r.stdout.count("interrupted") == 4, r.stdout


@pytest.mark.parametrize("method", START_METHODS)
def test_process_pool_executor(impl, method):
    ctx = impl.get_context(method)
    with concurrent.futures.ProcessPoolExecutor(max_workers=2, mp_context=ctx) as ex:
        assert list(ex.map(w.square, range(30))) == [x * x for x in range(30)]
        assert ex.submit(w.square, 7).result(timeout=SHORT_TIMEOUT) == 49


@pytest.mark.parametrize("method", START_METHODS)
def test_process_pool_executor_with_large_results(impl, method):
    # The executor reads results with `result_queue._reader.recv()`.
    ctx = impl.get_context(method)
    size = 6 << 20
    with concurrent.futures.ProcessPoolExecutor(max_workers=2, mp_context=ctx) as ex:
        got = list(ex.map(w.held_of, range(4), [size] * 4, timeout=SCRIPT_TIMEOUT))
    assert got == [w.held_of(i, size) for i in range(4)]


def test_reader_recv_gives_the_object_itself(impl):
    q = impl.Queue()  # (the stdlib's feeder thread writes while this thread reads)
    q.put(w.held_of(3, 6 << 20))
    got = q._reader.recv()
    assert got == w.held_of(3, 6 << 20)
    if impl.__name__ == "ferroproc":
        # Received where it came, not loaded, pickled again and loaded once more.
        assert type(got.data.obj).__name__ == "RecvBuffer"
    q.close()
    q.join_thread()


EXIT_SCRIPT = """
import {impl} as mp
if __name__ == "__main__":
    q = mp.get_context("fork").Queue()
    for i in range(8):  # 800 kB: fits ferroproc's ring, fills the stdlib's pipe many times
        q.put(b"x" * 100_000)
    print("done")
"""


def test_exit_with_unread_data(impl, tmp_path):
    path = tmp_path / "script.py"
    path.write_text(textwrap.dedent(EXIT_SCRIPT.format(impl=impl.__name__)))
    cmd = [sys.executable, str(path)]
    if impl.__name__ == "multiprocessing":
        # Known stdlib hang: at exit it joins the feeder thread, which blocks forever writing
        # into a full pipe that nobody reads.
        with pytest.raises(subprocess.TimeoutExpired):
            subprocess.run(cmd, check=False, capture_output=True, timeout=3)
        return
    # No feeder thread: nothing to flush, the program exits.
    r = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=SCRIPT_TIMEOUT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "done"
