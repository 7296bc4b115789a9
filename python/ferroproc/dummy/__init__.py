"""The multiprocessing API backed by threads of this process, as `multiprocessing.dummy`.

`Process` is a thread, the locks, events and queues are `threading`'s and `queue`'s, `Pool`
is `ferroproc.pool.ThreadPool` (ferroproc's scheduler with thread workers), and `Manager()`
returns this module. Nothing is pickled and nothing crosses a process boundary.
"""

import array
import sys
import threading
import weakref
from queue import Queue
from threading import Barrier, BoundedSemaphore, Condition, Event, Lock, RLock, Semaphore

from .connection import Pipe

__all__ = [
    "Barrier",
    "BoundedSemaphore",
    "Condition",
    "Event",
    "JoinableQueue",
    "Lock",
    "Manager",
    "Pipe",
    "Pool",
    "Process",
    "Queue",
    "RLock",
    "Semaphore",
    "active_children",
    "current_process",
    "freeze_support",
]


class DummyProcess(threading.Thread):
    """A thread with the `Process` interface (``exitcode`` is 0 once it has run)."""

    def __init__(self, group=None, target=None, name=None, args=(), kwargs={}):  # noqa: B006 - the stdlib's signature
        threading.Thread.__init__(self, group, target, name, args, kwargs)
        self._pid = None
        self._children = weakref.WeakKeyDictionary()
        self._start_called = False
        self._parent = current_process()

    def start(self):
        """Starts the thread; only the thread that created it may."""
        me = current_process()
        if self._parent is not me:
            raise RuntimeError(f"Parent is {self._parent!r} but current_process is {me!r}")
        self._start_called = True
        children = getattr(self._parent, "_children", None)
        if children is not None:
            children[self] = None
        threading.Thread.start(self)

    @property
    def exitcode(self):
        """0 once the thread has run to its end, else None."""
        if self._start_called and not self.is_alive():
            return 0
        return None


Process = DummyProcess
current_process = threading.current_thread
current_process()._children = weakref.WeakKeyDictionary()


def active_children():
    """The threads started by the current thread that are still running."""
    children = current_process()._children
    for child in list(children):
        if not child.is_alive():
            children.pop(child, None)
    return list(children)


def freeze_support():
    """Nothing to do for threads."""


class Namespace:
    """A plain attribute holder."""

    def __init__(self, /, **kwds):
        self.__dict__.update(kwds)

    def __repr__(self):
        shown = sorted(f"{k}={v!r}" for k, v in self.__dict__.items() if not k.startswith("_"))
        return f"{type(self).__name__}({', '.join(shown)})"


dict = dict  # noqa: PLW0127 - the stdlib's module exposes these names
list = list  # noqa: PLW0127


def Array(typecode, sequence, lock=True):
    """An `array.array` (threads share memory already)."""
    return array.array(typecode, sequence)


class Value:
    """A box holding one value, with the shared-value interface."""

    def __init__(self, typecode, value, lock=True):
        self._typecode = typecode
        self._value = value

    @property
    def value(self):
        return self._value

    @value.setter
    def value(self, value):
        self._value = value

    def __repr__(self):
        return f"<{type(self).__name__}({self._typecode!r}, {self._value!r})>"


def Manager():
    """This module: its factories already make thread-shared objects."""
    return sys.modules[__name__]


def shutdown():
    """Nothing to shut down."""


def Pool(processes=None, initializer=None, initargs=()):
    """A `ferroproc.pool.ThreadPool`."""
    from ..pool import ThreadPool

    return ThreadPool(processes, initializer, initargs)


JoinableQueue = Queue
