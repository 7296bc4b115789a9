"""Lock, RLock, Semaphore, BoundedSemaphore, Condition, Event and Barrier, run against the
stdlib and ferroproc for every start method. Where ferroproc deliberately differs (robust
locks, argument validation), the test states both behaviours."""

from __future__ import annotations

import errno
import gc
import importlib
import logging
import os
import pickle
import subprocess
import sys
import textwrap
import threading
import time

import _sync_workers as w
import pytest
from _workers import TESTS_DIR, join_ok, start

SHORT_TIMEOUT = w.SHORT_TIMEOUT
FERRO = "ferroproc"


@pytest.fixture(scope="module", autouse=True)
def _stdlib_heap_arena():
    # The stdlib's Barrier allocates from multiprocessing.heap, whose arena (an fd and a
    # mapping) lives for the rest of the process: create it before any hygiene baseline.
    import multiprocessing

    keep = multiprocessing.get_context("fork").Barrier(1)
    yield keep


def is_ferro(impl):
    return impl.__name__ == FERRO


def kill_and_join(p):
    p.kill()
    p.join(SHORT_TIMEOUT)
    assert not p.is_alive()


# ---------------------------------------------------------------------------------------------
# Lock
# ---------------------------------------------------------------------------------------------


def test_lock_acquire_release_and_quirks(ctx):
    lock = ctx.Lock()
    assert repr(lock) == "<Lock(owner=None)>"
    assert lock.acquire() is True
    assert repr(lock) == "<Lock(owner=MainProcess)>"
    assert lock._semlock._is_mine()
    assert lock._semlock._count() == 1
    assert lock.acquire(False) is False
    assert lock.acquire(block=False, timeout=5) is False  # block=False ignores the timeout
    t0 = time.monotonic()
    assert lock.acquire(timeout=0.1) is False
    assert time.monotonic() - t0 >= 0.09
    assert lock.acquire(True, -5) is False  # a negative timeout counts as zero
    assert lock.acquire(timeout=0) is False
    assert lock.release() is None
    with pytest.raises(ValueError, match="semaphore or lock released too many times"):
        lock.release()
    with lock as entered:
        assert entered is True
        assert lock.acquire(False) is False
    assert lock.acquire(False) is True
    lock.release()


def test_lock_may_be_released_by_another_thread(ctx):
    lock = ctx.Lock()
    lock.acquire()
    seen = []

    def other():
        seen.append(repr(lock))
        lock.release()

    t = threading.Thread(target=other)
    t.start()
    t.join(SHORT_TIMEOUT)
    assert seen == ["<Lock(owner=SomeOtherThread)>"]
    assert lock.acquire(timeout=SHORT_TIMEOUT)
    lock.release()


def test_lock_held_by_child_process(ctx):
    lock, acquired, release = ctx.Lock(), ctx.Event(), ctx.Event()
    p = start(ctx, w.hold_until, lock, acquired, release)
    try:
        assert acquired.wait(SHORT_TIMEOUT)
        assert repr(lock) == "<Lock(owner=SomeOtherProcess)>"
        assert lock.acquire(timeout=0.2) is False
        release.set()
        assert lock.acquire(timeout=SHORT_TIMEOUT) is True
        lock.release()
    finally:
        release.set()
        join_ok(p)


def test_pickling_outside_process_start_is_refused(ctx):
    for obj in (ctx.Lock(), ctx.RLock(), ctx.Semaphore(), ctx.Condition(), ctx.Event()):
        with pytest.raises(RuntimeError, match="through inheritance"):
            pickle.dumps(obj)


def test_fork_context_lock_is_refused_by_spawn_children(impl):
    lock = impl.get_context("fork").Lock()
    p = impl.get_context("spawn").Process(target=w.hold_until, args=(lock, None, None))
    with pytest.raises(RuntimeError, match="A SemLock created in a fork context"):
        p.start()


# ---------------------------------------------------------------------------------------------
# RLock
# ---------------------------------------------------------------------------------------------


def test_rlock_recursion_and_ownership(ctx):
    rlock = ctx.RLock()
    assert repr(rlock) == "<RLock(None, 0)>"
    with pytest.raises(AssertionError, match="attempt to release recursive lock not owned"):
        rlock.release()
    assert rlock.acquire()
    assert rlock.acquire(False)
    assert rlock.acquire(timeout=0)
    assert rlock._semlock._count() == 3
    assert repr(rlock) == "<RLock(MainProcess, 3)>"
    errors = []

    def other():
        errors.append(repr(rlock))
        errors.append(rlock.acquire(timeout=0.05))
        try:
            rlock.release()
        except AssertionError as e:
            errors.append(str(e))

    t = threading.Thread(target=other)
    t.start()
    t.join(SHORT_TIMEOUT)
    assert errors == [
        "<RLock(SomeOtherThread, nonzero)>",
        False,
        "attempt to release recursive lock not owned by thread",
    ]
    for _ in range(3):
        rlock.release()
    assert not rlock._semlock._is_mine()
    with pytest.raises(AssertionError):
        rlock.release()
    with rlock, rlock:
        assert rlock._semlock._count() == 2


def test_forked_child_does_not_own_parents_rlock(impl):
    ctx = impl.get_context("fork")
    rlock, out = ctx.RLock(), ctx.Semaphore(0)
    with rlock:
        p = start(ctx, w.rlock_state, rlock, out)
        join_ok(p)
    assert out.acquire(timeout=SHORT_TIMEOUT)


def test_rlock_held_by_child_process(ctx):
    rlock, acquired, release = ctx.RLock(), ctx.Event(), ctx.Event()
    p = start(ctx, w.hold_until, rlock, acquired, release)
    try:
        assert acquired.wait(SHORT_TIMEOUT)
        assert repr(rlock) == "<RLock(SomeOtherProcess, nonzero)>"
        assert rlock.acquire(timeout=0.1) is False
        release.set()
        assert rlock.acquire(timeout=SHORT_TIMEOUT)
        rlock.release()
    finally:
        release.set()
        join_ok(p)


# ---------------------------------------------------------------------------------------------
# Semaphores
# ---------------------------------------------------------------------------------------------


def test_semaphore(ctx):
    sem = ctx.Semaphore(2)
    assert repr(sem) == "<Semaphore(value=2)>"
    assert sem.get_value() == 2
    assert sem.acquire() and sem.acquire(False)
    assert sem.get_value() == 0
    assert sem.acquire(False) is False
    assert sem.acquire(timeout=0.05) is False
    assert sem.acquire(timeout=-1) is False
    sem.release()
    sem.release()
    sem.release()  # an unbounded semaphore may go above its initial value
    assert sem.get_value() == 3
    with sem:
        assert sem.get_value() == 2
    assert ctx.Semaphore().get_value() == 1
    assert ctx.Semaphore(0).acquire(False) is False


def test_bounded_semaphore(ctx):
    sem = ctx.BoundedSemaphore(2)
    assert repr(sem) == "<BoundedSemaphore(value=2, maxvalue=2)>"
    with pytest.raises(ValueError, match="released too many times"):
        sem.release()
    sem.acquire()
    sem.release()
    assert sem.get_value() == 2


def test_semaphore_rejects_negative_values(ctx, impl):
    # The stdlib's sem_open fails with EINVAL; ferroproc reports the same OSError.
    for factory in (ctx.Semaphore, ctx.BoundedSemaphore):
        with pytest.raises(OSError) as info:
            factory(-1)
        assert info.value.errno == errno.EINVAL


def test_semaphore_across_processes(ctx):
    sem, acquired = ctx.Semaphore(1), ctx.Semaphore(0)
    p = start(ctx, w.acquire_semaphore_and_hang, sem, acquired)
    try:
        assert acquired.acquire(timeout=SHORT_TIMEOUT)
        assert sem.get_value() == 0
        assert sem.acquire(timeout=0.1) is False
    finally:
        kill_and_join(p)
    # A unit held by a killed process is lost (stdlib and ferroproc alike).
    assert sem.acquire(timeout=0.1) is False
    sem.release()
    assert sem.acquire(timeout=SHORT_TIMEOUT)


# ---------------------------------------------------------------------------------------------
# Robustness: kill -9 of a lock holder
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["Lock", "RLock"])
def test_killed_holder_is_recovered(ctx, impl, kind, caplog):
    lock, acquired = getattr(ctx, kind)(), ctx.Event()
    p = start(ctx, w.hold_and_hang, lock, acquired)
    try:
        assert acquired.wait(SHORT_TIMEOUT)
        assert lock.acquire(timeout=0.1) is False
    finally:
        kill_and_join(p)
    assert p.exitcode == -9
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="ferroproc"):
        got = lock.acquire(timeout=2.0)
    elapsed = time.monotonic() - t0
    if not is_ferro(impl):
        # The stdlib's POSIX semaphore stays taken forever.
        assert got is False
        return
    assert got is True
    assert elapsed < 1.0
    assert lock._semlock._is_mine()
    assert any(
        "recovered" in r.getMessage() and str(p.pid) in r.getMessage() for r in caplog.records
    ), caplog.records
    lock.release()
    assert lock.acquire(False)
    lock.release()


@pytest.mark.parametrize("kind", ["Lock", "RLock"])
def test_killed_holder_is_recovered_by_non_blocking_acquire(impl, kind):
    ctx = impl.get_context("fork")
    lock, acquired = getattr(ctx, kind)(), ctx.Event()
    p = start(ctx, w.hold_and_hang, lock, acquired)
    try:
        assert acquired.wait(SHORT_TIMEOUT)
        assert lock.acquire(False) is False
    finally:
        kill_and_join(p)
    time.sleep(0.06)  # the non-blocking probe runs at most once per 50 ms slice
    got = lock.acquire(False)
    assert got is is_ferro(impl)
    if got:
        lock.release()


def test_killed_holder_is_recovered_by_a_blocked_waiter(impl):
    if not is_ferro(impl):
        pytest.skip("the stdlib lock stays wedged (see test_killed_holder_is_recovered)")
    ctx = impl.get_context("fork")
    lock, acquired = ctx.Lock(), ctx.Event()
    p = start(ctx, w.hold_and_hang, lock, acquired)
    assert acquired.wait(SHORT_TIMEOUT)
    timer = threading.Timer(0.3, p.kill)
    timer.start()
    try:
        t0 = time.monotonic()
        assert lock.acquire(timeout=SHORT_TIMEOUT)  # waits without a short timeout
        assert time.monotonic() - t0 < 5.0
        lock.release()
    finally:
        timer.cancel()
        kill_and_join(p)


# ---------------------------------------------------------------------------------------------
# Condition
# ---------------------------------------------------------------------------------------------


def test_condition_requires_the_lock(ctx):
    cond = ctx.Condition(ctx.Lock())
    with pytest.raises(AssertionError):
        cond.wait(0)
    with pytest.raises(AssertionError):
        cond.notify()
    with cond:
        assert cond.wait(0.05) is False
        assert cond.wait(-1) is False
        cond.notify()
        cond.notify_all()
        assert cond.wait_for(lambda: 42, 0.1) == 42
        assert cond.wait_for(lambda: 0, 0.05) == 0
    assert repr(cond).startswith("<Condition(<Lock(owner=None)>, 0)")


def test_condition_methods_return_like_the_stdlib_and_can_be_overridden(ctx, impl):
    synchronize = importlib.import_module(impl.__name__ + ".synchronize")

    class Counting(synchronize.Condition):
        calls = 0

        def wait(self, timeout=None):
            Counting.calls += 1
            return super().wait(timeout)

    cond = Counting(ctx=ctx)
    with cond:
        assert cond.notify() is None
        assert cond.notify_all() is None
        assert cond.wait(0) is False
        assert cond.wait_for(lambda: False, 0.01) is False
    assert Counting.calls >= 2


def test_condition_rlock_is_fully_released_while_waiting(ctx):
    cond = ctx.Condition()  # RLock by default
    with cond, cond:
        assert cond._lock._semlock._count() == 2
        assert cond.wait(0.01) is False
        assert cond._lock._semlock._count() == 2
    assert not cond._lock._semlock._is_mine()


def _wait_value(sem, value):
    deadline = time.monotonic() + SHORT_TIMEOUT
    while sem.get_value() != value:
        assert time.monotonic() < deadline, f"value {sem.get_value()} != {value}"
        time.sleep(0.01)


def test_condition_notify_and_notify_all_across_processes(ctx):
    cond, sleeping, woken = ctx.Condition(), ctx.Semaphore(0), ctx.Semaphore(0)
    procs = [start(ctx, w.cond_waiter, cond, sleeping, woken) for _ in range(3)]
    try:
        for _ in procs:
            assert sleeping.acquire(timeout=SHORT_TIMEOUT)
        time.sleep(0.1)  # let them all reach wait()
        assert woken.get_value() == 0
        with cond:
            cond.notify()
        assert woken.acquire(timeout=SHORT_TIMEOUT)
        time.sleep(0.1)
        assert woken.get_value() == 0  # exactly one was woken
        with cond:
            cond.notify_all()
        for _ in range(2):
            assert woken.acquire(timeout=SHORT_TIMEOUT)
    finally:
        for p in procs:
            join_ok(p)


def test_condition_notify_n(ctx):
    cond, sleeping, woken = ctx.Condition(), ctx.Semaphore(0), ctx.Semaphore(0)
    procs = [start(ctx, w.cond_waiter, cond, sleeping, woken) for _ in range(3)]
    try:
        for _ in procs:
            assert sleeping.acquire(timeout=SHORT_TIMEOUT)
        time.sleep(0.1)
        with cond:
            cond.notify(2)
        _wait_value(woken, 2)
        time.sleep(0.1)
        assert woken.get_value() == 2
        with cond:
            cond.notify(5)
        _wait_value(woken, 3)
    finally:
        for p in procs:
            join_ok(p)


def test_condition_wait_for_across_processes(ctx):
    cond, state, done = ctx.Condition(), ctx.Event(), ctx.Semaphore(0)
    p = start(ctx, w.cond_wait_for, cond, state, done)
    try:
        time.sleep(0.1)
        with cond:
            cond.notify_all()  # predicate still false: keeps waiting
        assert done.acquire(timeout=0.1) is False
        with cond:
            state.set()
            cond.notify_all()
        assert done.acquire(timeout=SHORT_TIMEOUT)
    finally:
        join_ok(p)


def test_notify_then_lock_released_elsewhere(ctx):
    # The notifier's lock is released by another thread, then by another process: the waiter
    # must still wake (ferroproc issues a notify's wake-up at the lock's release).
    lock = ctx.Lock()
    cond, sleeping, woken = ctx.Condition(lock), ctx.Semaphore(0), ctx.Semaphore(0)
    procs = [start(ctx, w.cond_waiter, cond, sleeping, woken) for _ in range(2)]
    try:
        for _ in procs:
            assert sleeping.acquire(timeout=SHORT_TIMEOUT)
        time.sleep(0.1)
        cond.acquire()
        cond.notify()
        t = threading.Thread(target=lock.release)
        t.start()
        t.join(SHORT_TIMEOUT)
        assert woken.acquire(timeout=SHORT_TIMEOUT)
        cond.acquire()
        cond.notify()
        join_ok(start(ctx, w.release_lock, lock))
        assert woken.acquire(timeout=SHORT_TIMEOUT)
    finally:
        for p in procs:
            join_ok(p)


# ---------------------------------------------------------------------------------------------
# Event
# ---------------------------------------------------------------------------------------------


def test_event(ctx):
    ev = ctx.Event()
    assert ev.is_set() is False
    assert repr(ev).endswith(" unset>")
    assert ev.wait(0.05) is False
    assert ev.wait(-1) is False
    ev.set()
    assert ev.is_set() is True
    assert repr(ev).endswith(" set>")
    assert ev.wait() is True
    assert ev.wait(0) is True
    ev.set()
    ev.clear()
    assert ev.is_set() is False
    ev.clear()
    assert ev.wait(0) is False


def test_event_set_by_child(ctx):
    ev = ctx.Event()
    p = start(ctx, w.set_event_later, ev, 0.2)
    try:
        assert ev.wait(SHORT_TIMEOUT) is True
    finally:
        join_ok(p)


def test_event_ping_pong(ctx):
    ping, pong = ctx.Event(), ctx.Event()
    p = start(ctx, w.event_echo, ping, pong, 50)
    try:
        for _ in range(50):
            ping.set()
            assert pong.wait(SHORT_TIMEOUT)
            pong.clear()
    finally:
        join_ok(p)


# ---------------------------------------------------------------------------------------------
# Barrier
# ---------------------------------------------------------------------------------------------


def test_barrier_local_api(ctx, impl):
    b = ctx.Barrier(2, timeout=0.1)
    assert b.parties == 2
    assert b.n_waiting == 0
    assert b.broken is False
    with pytest.raises(threading.BrokenBarrierError):
        b.wait()  # times out alone, which breaks it
    assert b.broken is True
    b.reset()
    assert b.broken is False
    b.abort()
    assert b.broken is True
    with pytest.raises(threading.BrokenBarrierError):
        b.wait(0.01)
    b.reset()
    calls = []
    b1 = ctx.Barrier(1, action=lambda: calls.append(1))
    assert b1.wait(SHORT_TIMEOUT) == 0
    assert calls == [1]
    if is_ferro(impl):
        with pytest.raises(ValueError, match="parties must be >= 1"):
            ctx.Barrier(0)
    synchronize = importlib.import_module(impl.__name__ + ".synchronize")
    assert synchronize.Barrier.__mro__[1] is threading.Barrier


def test_barrier_across_processes(ctx):
    b, passed = ctx.Barrier(3, action=w.barrier_action), ctx.Semaphore(0)
    procs = [start(ctx, w.barrier_party, b, passed) for _ in range(2)]
    try:
        assert b.wait(SHORT_TIMEOUT) in (0, 1, 2)
        for _ in procs:
            assert passed.acquire(timeout=SHORT_TIMEOUT)
        assert b.n_waiting == 0
    finally:
        for p in procs:
            join_ok(p)


def test_barrier_abort_wakes_children(ctx):
    b, broke = ctx.Barrier(3), ctx.Semaphore(0)
    procs = [start(ctx, w.barrier_party_expect_broken, b, broke) for _ in range(2)]
    try:
        deadline = time.monotonic() + SHORT_TIMEOUT
        while b.n_waiting < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert b.n_waiting == 2
        b.abort()
        for _ in procs:
            assert broke.acquire(timeout=SHORT_TIMEOUT)
    finally:
        for p in procs:
            join_ok(p)


# ---------------------------------------------------------------------------------------------
# Ctrl-C, in a sacrificial interpreter
# ---------------------------------------------------------------------------------------------

CTRL_C_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from _workers import expect_interrupt
import {impl} as mp
ctx = mp.get_context("fork")
lock = ctx.Lock(); lock.acquire()
sem = ctx.Semaphore(0)
cond = ctx.Condition(); ev = ctx.Event(); bar = ctx.Barrier(2)
calls = {{
    "lock": lambda: lock.acquire(),
    "lock_timeout": lambda: lock.acquire(timeout=60),
    "semaphore": lambda: sem.acquire(),
    "condition": lambda: (cond.acquire(), cond.wait()),
    "event": lambda: ev.wait(),
    "barrier": lambda: bar.wait(),
}}
for name, call in calls.items():
    expect_interrupt(name, call, 2.0)
# Everything still works afterwards.
lock.release(); assert lock.acquire(timeout=1)
sem.release(); assert sem.acquire(timeout=1)
assert cond._lock._semlock._is_mine(); cond.release()
ev.set(); assert ev.wait(1)
print("ok")
"""


def test_ctrl_c_interrupts_every_blocking_call(impl):
    script = textwrap.dedent(CTRL_C_SCRIPT.format(impl=impl.__name__, tests=TESTS_DIR))
    r = subprocess.run(
        [sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[-1] == "ok", r.stdout
    assert r.stdout.count("interrupted") == 6, r.stdout


# ---------------------------------------------------------------------------------------------
# Leaks
# ---------------------------------------------------------------------------------------------


def _maps():
    with open("/proc/self/maps") as f:
        return sorted(
            line.split(None, 5)[-1].strip() for line in f if "memfd:" in line or "sem." in line
        )


def test_create_use_cycles_leave_nothing_behind(impl):
    ctx = impl.get_context("fork")
    gc.collect()
    fds = sorted(os.listdir("/proc/self/fd"))
    maps = _maps()
    for _ in range(1000):
        lock, rlock, sem = ctx.Lock(), ctx.RLock(), ctx.BoundedSemaphore(2)
        cond, ev = ctx.Condition(lock), ctx.Event()
        with lock:
            pass
        with rlock, rlock:
            pass
        sem.acquire()
        sem.release()
        with cond:
            cond.notify()
        ev.set()
        del lock, rlock, sem, cond, ev
    gc.collect()
    assert sorted(os.listdir("/proc/self/fd")) == fds
    assert _maps() == maps


def test_memory_is_anonymous(impl):
    if not is_ferro(impl):
        pytest.skip("the stdlib's semaphores are named /dev/shm objects")
    lock = impl.Lock()
    target = os.readlink(f"/proc/self/fd/{lock._semlock.handle}")
    assert target.startswith("/memfd:")
    assert lock._semlock.name is None
