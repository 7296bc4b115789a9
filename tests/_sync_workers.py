"""Module-level child targets for ``test_synchronize.py`` (importable by spawn/forkserver
children). Every wait is bounded by ``SHORT_TIMEOUT``; a child that times out exits non-zero."""

from __future__ import annotations

import sys
import time

SHORT_TIMEOUT = 30.0


def hold_until(lock, acquired, release):
    """Takes `lock`, reports it, and releases it when `release` is set."""
    if not lock.acquire(timeout=SHORT_TIMEOUT):
        sys.exit(2)
    acquired.set()
    ok = release.wait(SHORT_TIMEOUT)
    lock.release()
    sys.exit(0 if ok else 3)


def hold_and_hang(lock, acquired):
    """Takes `lock`, reports it and hangs (the test kills it with SIGKILL)."""
    if not lock.acquire(timeout=SHORT_TIMEOUT):
        sys.exit(2)
    acquired.set()
    time.sleep(SHORT_TIMEOUT * 2)
    sys.exit(4)


def acquire_semaphore_and_hang(sem, acquired):
    sem.acquire(timeout=SHORT_TIMEOUT)
    acquired.release()
    time.sleep(SHORT_TIMEOUT * 2)


def cond_waiter(cond, sleeping, woken):
    """Waits on `cond` once; counts itself in `sleeping` before and `woken` after."""
    with cond:
        sleeping.release()
        notified = cond.wait(SHORT_TIMEOUT)
        woken.release()
    sys.exit(0 if notified else 5)


def cond_wait_for(cond, state, done):
    """Waits until `state` (an Event) is set, using `wait_for` on `cond`."""
    with cond:
        ok = cond.wait_for(state.is_set, SHORT_TIMEOUT)
    done.release()
    sys.exit(0 if ok else 6)


def set_event_later(event, delay):
    time.sleep(delay)
    event.set()


def event_echo(ping, pong, rounds):
    """Ping-pong partner: waits for `ping`, clears it, sets `pong`, `rounds` times."""
    for _ in range(rounds):
        if not ping.wait(SHORT_TIMEOUT):
            sys.exit(7)
        ping.clear()
        pong.set()


def cond_echo(cond, turn, rounds):
    """Ping-pong partner over a Condition: `turn` (a Semaphore used as a flag) says whose move."""
    for _ in range(rounds):
        with cond:
            if not cond.wait_for(lambda: turn.get_value() == 1, SHORT_TIMEOUT):
                sys.exit(8)
            turn.acquire()
            cond.notify()


def barrier_action():
    """A picklable Barrier action."""


def barrier_party(barrier, passed):
    try:
        barrier.wait(SHORT_TIMEOUT)
    except Exception:
        sys.exit(9)
    passed.release()


def barrier_party_expect_broken(barrier, broke):
    import threading

    try:
        barrier.wait(SHORT_TIMEOUT)
    except threading.BrokenBarrierError:
        broke.release()
        return
    sys.exit(10)


def rlock_state(rlock, out):
    """Reports what a (forked) child sees of an RLock its parent holds."""
    if rlock._semlock._is_mine() or rlock._semlock._count() != 0:
        sys.exit(11)
    if rlock.acquire(False):
        sys.exit(12)
    out.release()


def release_lock(lock):
    """Releases a Lock another process holds (allowed for Lock, as in the stdlib)."""
    lock.release()
