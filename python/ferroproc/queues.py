"""Queues shared between processes: `Queue`, `JoinableQueue` and `SimpleQueue`.

Same API as `multiprocessing.queues`, on a different engine: each queue is a ring buffer in
anonymous shared memory (one memfd, plus an eventfd for `select`-style waiting), and there is
**no feeder thread**. ``put`` pickles the object (with `reduction.ForkingPickler`, so
``copyreg`` and ``ForkingPickler.register`` apply) and copies it into the ring before it
returns; ``get`` copies the next message out and unpickles it after releasing the reader lock.
So:

* a pickling error is raised by ``put`` itself, and nothing is enqueued;
* a process never hangs at exit flushing unread data (``join_thread`` and
  ``cancel_join_thread`` have nothing to wait for);
* messages of any size work, and ``put`` never blocks for want of a reader (only for
  ``maxsize``): a message that does not fit the ring's free space waits for room only while
  readers are at work (one is in ``get``, or another process took a message in the last few
  milliseconds), and otherwise goes to an overflow log in the same memfd (freed as it is
  read), which keeps FIFO order with the ring. A message larger than half the ring (4 MiB
  by default) is streamed through it in pieces when readers are at work;
* every wait is a process-shared futex wait in short slices with signal handlers run in
  between, so Ctrl-C interrupts a blocked ``get`` or ``put``;
* nothing is left in ``/dev/shm``, even after ``kill -9``.

Robustness: writers and readers each serialize on a robust lock (a dead holder's lock is
taken over by the next waiter within a wait slice of about 50 ms). A message becomes visible
only once completely written and is freed only once completely read, so a producer or consumer
killed with ``kill -9`` in the middle of ``put`` or ``get`` never makes another process receive
a partial message: a killed writer's message is dropped, a killed reader's message is read by
the next reader (for a message streamed in pieces, the killed reader takes it with it).

Differences:
    ``put`` raises pickling errors itself (the stdlib's feeder thread prints them and drops
    the object). ``put(block=False)`` waits at most 10 ms for another writer's lock before
    raising `queue.Full`. ``empty()`` is true only when no message is waiting, right after
    ``put`` returns in any process (the stdlib's may lag behind its feeder thread).
    ``close()`` affects only this handle. A ``get`` that has started reading a streamed
    message finishes it even past its timeout. A reader interrupted (Ctrl-C) or killed in the
    middle of a streamed message takes that message with it. Messages are pickled with
    protocol 5, so a read-only numpy array arrives read-only.

Speed (ferroproc extensions, automatic): messages made only of ``None``/``bool``/``int``/
``float``/``str``/``bytes`` and tuples of them are encoded natively, without the pickler;
buffers of 1 MiB or more that pickle protocol 5 can take out-of-band (numpy arrays) and
``bytes`` too large for one ring frame are copied once into a page-aligned blob of the
queue's memfd and once out of it, straight into the object the reader gets.
"""

from __future__ import annotations

import os
import types

# `queue.Empty` itself. Not `from queue import ...`: `queue` imports `threading`, whose at-fork
# hook then runs in every forked child (about 120 copy-on-write faults each). `queue.Full`, only
# raised when a bounded queue stays full, is looked up on first use (`__getattr__` below).
from _queue import Empty  # noqa: F401 - re-exported, as the stdlib module has it

from . import _ferroproc

__all__ = ["JoinableQueue", "Queue", "SimpleQueue"]

#: Bytes of shared ring per queue (the memory is only touched as messages pass through it).
#: The native constructor reads it from the class: subclasses may set their own.
_DEFAULT_RING_BYTES = 4 << 20


def _dup_for_child(obj, fd):
    from .synchronize import _dup_for_child

    return _dup_for_child(obj, fd)


def _is_fork_ctx(ctx):
    from .synchronize import _is_fork_ctx

    return _is_fork_ctx(ctx)


def _reduce(obj):
    """Pickles a queue for a child being started: its two descriptors and its attributes."""
    if obj.__dict__.get("_is_fork_ctx"):
        from .synchronize import _FORK_MIX_MESSAGE, _spawning_popen

        if _spawning_popen() is not None:
            # The stdlib refuses this through the queue's locks; keep the rule.
            raise RuntimeError(_FORK_MIX_MESSAGE)
    ring_fd, event_fd = obj._handles
    return _rebuild, (
        type(obj),
        _dup_for_child(obj, ring_fd),
        _dup_for_child(obj, event_fd),
        dict(obj.__dict__),
    )


def _rebuild(cls, ring_dupfd, event_dupfd, state):
    fds = [ring_dupfd.detach(), event_dupfd.detach()]
    try:
        obj = cls._native.__new__(cls, fd=fds[0], efd=fds[1])
    finally:
        for fd in fds:
            os.close(fd)
    obj.__dict__.update(state)
    return obj


class _Reader:
    """The reading end as a connection-like object (``fileno``, ``poll``, ``recv``), for code
    that waits on ``queue._reader`` with `multiprocessing.connection.wait` (as
    `concurrent.futures.ProcessPoolExecutor` does). Its descriptor is an eventfd that polls
    readable while messages are waiting."""

    __slots__ = ("_queue",)

    def __init__(self, queue):
        self._queue = queue

    def fileno(self):
        return self._queue._reader_fileno()

    def poll(self, timeout=0.0):
        return self._queue._poll(timeout)

    def recv_bytes(self, maxlength=None):
        return self._queue._get_bytes()

    def recv(self):
        return self._queue._recv()

    def close(self):
        self._queue.close()

    @property
    def closed(self):
        return self._queue._closed


class _Writer:
    """The writing end as a connection-like object (``send``, ``close``)."""

    __slots__ = ("_queue",)

    def __init__(self, queue):
        self._queue = queue

    def send(self, obj):
        self._queue.put(obj)

    def close(self):
        self._queue.close()

    @property
    def closed(self):
        return self._queue._closed


class Queue(_ferroproc.RingQueue):
    """A FIFO of picklable objects shared between processes (see the module docstring).

    ``put(obj, block=True, timeout=None)`` raises `queue.Full` when ``maxsize`` messages are
    waiting (or the ring has no room) past the timeout; ``get(block=True, timeout=None)``
    raises `queue.Empty` when nothing arrives in time. Both raise ValueError once this handle
    is closed. A negative timeout counts as zero.
    """

    _native = _ferroproc.RingQueue
    _joinable = False
    _ring_bytes = _DEFAULT_RING_BYTES

    def __init__(self, maxsize=0, *, ctx):
        self._ignore_epipe = False
        self._is_fork_ctx = _is_fork_ctx(ctx)

    __reduce__ = _reduce

    def join_thread(self):
        """Returns at once: there is no feeder thread to wait for (the queue must be closed)."""
        assert self._closed, f"Queue {self!r} not closed"

    def cancel_join_thread(self):
        """Does nothing: there is no feeder thread, so exit never waits for unread data."""

    @property
    def _reader(self):
        return _Reader(self)

    @property
    def _writer(self):
        return _Writer(self)


class JoinableQueue(Queue):
    """A `Queue` that counts unfinished tasks: ``task_done()`` after each ``get``, ``join()``
    to wait until every object put was marked done."""

    _joinable = True

    def task_done(self):
        """Marks one object taken from the queue as processed."""
        if not self._task_done():
            raise ValueError("task_done() called too many times")

    def join(self):
        """Blocks until every object put has been marked done with `task_done`."""
        self._join()


class SimpleQueue(_ferroproc.SimpleRing):
    """A minimal FIFO: blocking ``put(obj)`` and ``get()``, ``empty()``, ``close()``. After
    ``close()``, every method raises ``OSError("handle is closed")`` as the stdlib's does."""

    _native = _ferroproc.SimpleRing
    _ring_bytes = _DEFAULT_RING_BYTES

    def __init__(self, *, ctx):
        self._is_fork_ctx = _is_fork_ctx(ctx)

    __reduce__ = _reduce

    @property
    def _reader(self):
        return _Reader(self)

    @property
    def _writer(self):
        return _Writer(self)

    __class_getitem__ = classmethod(types.GenericAlias)


def __getattr__(name):
    # `Full` is re-exported for code that catches it through this module, as the stdlib's.
    if name == "Full":
        from queue import Full

        return Full
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
