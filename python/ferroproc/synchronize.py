"""Locks, semaphores, conditions, events and barriers shared between processes.

Same API as `multiprocessing.synchronize`. The state lives in anonymous shared memory (a memfd
per object) and waits are process-shared futex waits, so:

* the uncontended ``acquire``/``release`` and ``with lock:`` are a single atomic operation,
  with no system call;
* every blocking call waits in short slices on the monotonic clock and runs signal handlers
  in between, so Ctrl-C interrupts it;
* nothing is left behind in ``/dev/shm`` or as a named semaphore, even after ``kill -9``:
  the memory goes away with the last process that has it open.

Objects are inherited by forked children and pickle (only while a child is being started,
as in the stdlib) into a descriptor handed to the child, which maps the same memory.

Robustness: a `Lock` or `RLock` whose holder dies (even by ``kill -9``) is recovered by the
next process that tries to take it: a waiting ``acquire`` takes it over within one wait slice
(about 50 ms) of the holder's death, a timed one at the latest when its timeout expires, and a
failed non-blocking ``acquire(False)`` checks the holder at most once per slice. The lock word
holds the holder's pid; a holder counts as dead once it has exited, even if its parent has not
reaped it yet. A warning is logged on the ``ferroproc.synchronize`` logger, because the data
the lock protected may have been left half-updated: the new owner must check or rebuild it.
If the pid is reused by a new process before anyone notices, the lock waits for that process.
Semaphore units have no single owner (any process may release them), so a unit held by a
killed process stays lost, as with the stdlib. A process killed while waiting on a
`Condition` may leave one wake-up behind, which a later waiter takes as a spurious wake-up.

Differences:
    ``Barrier(0)`` raises ``ValueError`` like `threading.Barrier` (the stdlib accepts it and
    then misbehaves). A `Condition` wakes waiters without the stdlib's notifier/waiter
    hand-shake (``notify`` does not wait for the woken process to run), and a `Condition` or
    `Event` wait may report a spurious wake-up once after a waiter was killed while waiting.
"""

from __future__ import annotations

import functools
import os
import sys
import time

from . import _ferroproc, context, process

# As the stdlib: Barrier is public but not in __all__.
__all__ = ["BoundedSemaphore", "Condition", "Event", "Lock", "RLock", "Semaphore"]

# The stdlib's kind numbers (RLock uses RECURSIVE_MUTEX, everything else SEMAPHORE); MUTEX is
# ferroproc's single-owner robust lock.
RECURSIVE_MUTEX, SEMAPHORE, MUTEX = 0, 1, 2
SEM_VALUE_MAX = _ferroproc.SemLock.SEM_VALUE_MAX

_FORK_MIX_MESSAGE = (
    "A SemLock created in a fork context is being shared with a process in a spawn context. "
    "This is not supported. Please use the same context to create multiprocessing objects "
    "and Process."
)


def _spawning_popen():
    popen = context.get_spawning_popen()
    if popen is None:
        # A ferroproc object handed to a stdlib Process (or a stdlib queue's pickler).
        from multiprocessing import context as std_context

        popen = std_context.get_spawning_popen()
    return popen


def _dup_for_child(obj, fd):
    """A `DupFd` for `fd` if a child is being started, else the stdlib's RuntimeError."""
    if context.get_spawning_popen() is not None:
        from .reduction import DupFd

        return DupFd(fd)
    if _spawning_popen() is None:
        context.assert_spawning(obj)
    from multiprocessing.reduction import DupFd

    return DupFd(fd)


def _detach(dupfd):
    return dupfd.detach()


def _is_fork_ctx(ctx):
    if ctx is None:
        ctx = context._default_context.get_context()
    return ctx.get_start_method() == "fork"


def _thread_name():
    import threading  # only for a repr; see `__getattr__` for why not at the top

    name = process.current_process().name
    if threading.current_thread().name != "MainThread":
        name += "|" + threading.current_thread().name
    return name


def _rebuild_semlock(cls, dupfd):
    fd = _detach(dupfd)
    try:
        return _ferroproc.SemLock.__new__(cls, 0, 0, 0, fd=fd)
    finally:
        os.close(fd)


class SemLock(_ferroproc.SemLock):
    """Base of the lock and semaphore classes; the methods are native.

    ``acquire(block=True, timeout=None)`` returns True once acquired, False when ``block`` is
    false or the timeout passes first (a negative timeout counts as zero). ``release()``
    raises ValueError when a lock is not held or a bounded semaphore is at its bound.
    """

    def __new__(cls, kind, value, maxvalue, *, ctx):
        return super().__new__(cls, kind, value, maxvalue, fork_ctx=_is_fork_ctx(ctx))

    def __init__(self, kind, value, maxvalue, *, ctx):
        # The native state is built by __new__; __init__ only keeps the stdlib's signature.
        pass

    @property
    def _semlock(self):
        # The stdlib keeps the native object in `_semlock`; here it is the object itself.
        return self

    def __reduce__(self):
        if self._is_fork_ctx and _spawning_popen() is not None:
            raise RuntimeError(_FORK_MIX_MESSAGE)
        return _rebuild_semlock, (type(self), _dup_for_child(self, self.handle))


class Semaphore(SemLock):
    """A counter of available units shared between processes."""

    def __new__(cls, value=1, *, ctx):
        return SemLock.__new__(cls, SEMAPHORE, value, SEM_VALUE_MAX, ctx=ctx)

    def __init__(self, value=1, *, ctx):
        pass

    def get_value(self):
        """The number of units currently available."""
        return self._get_value()

    def __repr__(self):
        try:
            value = self._get_value()
        except Exception:
            value = "unknown"
        return f"<{type(self).__name__}(value={value})>"


class BoundedSemaphore(Semaphore):
    """A semaphore whose value may never be released above its initial value."""

    def __new__(cls, value=1, *, ctx):
        return SemLock.__new__(cls, SEMAPHORE, value, value, ctx=ctx)

    def __init__(self, value=1, *, ctx):
        pass

    def __repr__(self):
        try:
            value = self._get_value()
        except Exception:
            value = "unknown"
        return f"<{type(self).__name__}(value={value}, maxvalue={self.maxvalue})>"


class Lock(SemLock):
    """A non-recursive lock; any thread or process may release it. Robust to a dead holder."""

    def __new__(cls, *, ctx):
        return SemLock.__new__(cls, MUTEX, 1, 1, ctx=ctx)

    def __init__(self, *, ctx):
        pass

    def __repr__(self):
        try:
            if self._is_mine():
                name = _thread_name()
            elif self._get_value() == 1:
                name = "None"
            elif self._count() > 0:
                name = "SomeOtherThread"
            else:
                name = "SomeOtherProcess"
        except Exception:
            name = "unknown"
        return f"<{type(self).__name__}(owner={name})>"


class RLock(SemLock):
    """A recursive lock owned by one thread of one process. Robust to a dead holder."""

    def __new__(cls, *, ctx):
        return SemLock.__new__(cls, RECURSIVE_MUTEX, 1, 1, ctx=ctx)

    def __init__(self, *, ctx):
        pass

    def __repr__(self):
        try:
            if self._is_mine():
                name, count = _thread_name(), self._count()
            elif self._get_value() == 1:
                name, count = "None", 0
            elif self._count() > 0:
                name, count = "SomeOtherThread", "nonzero"
            else:
                name, count = "SomeOtherProcess", "nonzero"
        except Exception:
            name, count = "unknown", "unknown"
        return f"<{type(self).__name__}({name}, {count})>"


class _WaiterCount:
    """Read-only stand-in for the stdlib's internal semaphores, for code that inspects them."""

    def __init__(self, get):
        self._get = get

    def get_value(self):
        return self._get()


class Condition:
    """A condition variable over a `Lock` or `RLock` (a new `RLock` by default)."""

    def __init__(self, lock=None, *, ctx):
        self._lock = lock or ctx.RLock()
        self._cv = _ferroproc.CondVar()
        self._make_methods()

    def _make_methods(self):
        self.acquire = self._lock.acquire
        self.release = self._lock.release
        cv = self._cv
        # The hot methods go straight to native code (no Python frame) unless a subclass
        # overrides them; the class methods below document them.
        cls = type(self)
        if cls.wait is Condition.wait:
            self.wait = functools.partial(cv.wait, self._lock)
        if cls.notify is Condition.notify:
            self.notify = functools.partial(cv.notify, self._lock)
        if cls.notify_all is Condition.notify_all:
            self.notify_all = functools.partial(cv.notify, self._lock, sys.maxsize)
        # Read-only views for code that inspects the stdlib's internal semaphores.
        self._sleeping_count = _WaiterCount(cv.waiters)
        self._woken_count = _WaiterCount(lambda: 0)
        self._wait_semaphore = _WaiterCount(cv.unconsumed)

    def __getstate__(self):
        return (self._lock, _dup_for_child(self, self._cv.handle))

    def __setstate__(self, state):
        self._lock, dupfd = state
        fd = _detach(dupfd)
        try:
            self._cv = _ferroproc.CondVar(fd=fd)
        finally:
            os.close(fd)
        self._make_methods()

    def __enter__(self):
        return self._lock.__enter__()

    def __exit__(self, *args):
        return self._lock.__exit__(*args)

    def __repr__(self):
        try:
            num_waiters = self._cv.waiters()
        except Exception:
            num_waiters = "unknown"
        return f"<{type(self).__name__}({self._lock}, {num_waiters})>"

    def wait(self, timeout=None):
        """Releases the lock, waits for a notify or the timeout, and re-acquires the lock.

        Returns False on timeout. The lock must be held by the calling thread.
        """
        return self._cv.wait(self._lock, timeout)

    def notify(self, n=1):
        """Wakes up to `n` waiting threads or processes (the lock must be held)."""
        self._cv.notify(self._lock, n)

    def notify_all(self):
        """Wakes every waiter (the lock must be held)."""
        self._cv.notify(self._lock, sys.maxsize)

    def wait_for(self, predicate, timeout=None):
        """Waits until `predicate()` is true or the timeout passes; returns its last value."""
        result = predicate()
        if result:
            return result
        endtime = None if timeout is None else time.monotonic() + timeout
        waittime = None
        while not result:
            if endtime is not None:
                waittime = endtime - time.monotonic()
                if waittime <= 0:
                    break
            self.wait(waittime)
            result = predicate()
        return result


class Event:
    """A flag processes can set, clear and wait for."""

    def __init__(self, *, ctx):
        self._flag = _ferroproc.EventFlag()
        self._bind()

    def _bind(self):
        # The methods go straight to native code (no Python frame) unless a subclass
        # overrides them; the class methods below document them.
        cls = type(self)
        for name in ("is_set", "set", "clear", "wait"):
            if getattr(cls, name) is getattr(Event, name):
                setattr(self, name, getattr(self._flag, name))

    def __getstate__(self):
        return _dup_for_child(self, self._flag.handle)

    def __setstate__(self, dupfd):
        fd = _detach(dupfd)
        try:
            self._flag = _ferroproc.EventFlag(fd=fd)
        finally:
            os.close(fd)
        self._bind()

    def is_set(self):
        """Whether the flag is set."""
        return self._flag.is_set()

    def set(self):
        """Sets the flag and wakes every waiter."""
        self._flag.set()

    def clear(self):
        """Clears the flag."""
        self._flag.clear()

    def wait(self, timeout=None):
        """Waits until the flag is set or `timeout` passes; returns whether it is set."""
        return self._flag.wait(timeout)

    def __repr__(self) -> str:
        set_status = "set" if self.is_set() else "unset"
        return f"<{type(self).__qualname__} at {id(self):#x} {set_status}>"


def __getattr__(name):
    # `Barrier` subclasses `threading.Barrier`, so it is made on first use: importing
    # `threading` here would make every later fork of a process that uses a lock or a queue
    # dearer (its at-fork hook runs in each child: about 120 copy-on-write faults).
    if name == "Barrier":
        cls = globals()["Barrier"] = _make_barrier()
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _make_barrier():
    import threading

    class Barrier(threading.Barrier):
        """`threading.Barrier` over a shared `Condition` whose state lives in shared memory."""

        def __init__(self, parties, action=None, timeout=None, *, ctx):
            if parties < 1:
                raise ValueError("parties must be >= 1")
            cond = ctx.Condition()
            self.__setstate__((parties, action, timeout, cond))
            self._state = 0
            self._count = 0

        def __setstate__(self, state):
            (self._parties, self._action, self._timeout, self._cond) = state
            self._words = self._cond._cv

        def __getstate__(self):
            return (self._parties, self._action, self._timeout, self._cond)

        @property
        def _state(self):
            return self._words.get_word(0)

        @_state.setter
        def _state(self, value):
            self._words.set_word(0, value)

        @property
        def _count(self):
            return self._words.get_word(1)

        @_count.setter
        def _count(self, value):
            self._words.set_word(1, value)

    Barrier.__qualname__ = "Barrier"
    return Barrier
