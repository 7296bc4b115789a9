"""Contexts: one object per start method exposing the package's factories.

The exception classes are the stdlib's own, so `except multiprocessing.TimeoutError` catches
ferroproc's timeouts and the other way round.
"""

import _thread
import os
import sys

from . import process

__all__ = [
    "AuthenticationError",  # noqa: F822 - resolved lazily by __getattr__
    "BaseContext",
    "BufferTooShort",  # noqa: F822 - resolved lazily by __getattr__
    "DefaultContext",
    "ForkContext",
    "ForkProcess",
    "ForkServerContext",
    "ForkServerProcess",
    "Process",
    "ProcessError",  # noqa: F822 - resolved lazily by __getattr__
    "SpawnContext",
    "SpawnProcess",
    "TimeoutError",
    "assert_spawning",
    "get_spawning_popen",
    "set_spawning_popen",
]


_EXCEPTIONS = ("ProcessError", "BufferTooShort", "TimeoutError", "AuthenticationError")


def __getattr__(name):
    # The exception classes are the stdlib's own. They are looked up on first use, so a spawned
    # child that never touches them does not pay for importing the stdlib package.
    if name in _EXCEPTIONS:
        std = process._stdlib_module("context")
        if std is None:
            if sys.modules.get("multiprocessing.context") is sys.modules[__name__]:
                raise ImportError(
                    "multiprocessing.context is aliased to ferroproc.context: import the stdlib's"
                    " multiprocessing before aliasing it, so the shared exception classes exist"
                )
            from multiprocessing import context as std
        for n in _EXCEPTIONS:
            globals()[n] = getattr(std, n)
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if "multiprocessing.context" in sys.modules:
    # Already paid for: resolve now, while `multiprocessing.context` is surely the stdlib's
    # (tools that alias `multiprocessing` to ferroproc later still get the stdlib classes).
    __getattr__("TimeoutError")


class _StdException:
    """Class attribute resolving to the stdlib exception of the same name on first access."""

    def __set_name__(self, owner, name):
        self.name = name

    def __get__(self, obj, owner=None):
        return globals().get(self.name) or __getattr__(self.name)


class BaseContext:
    """Factories and settings shared by every start method."""

    ProcessError = _StdException()
    BufferTooShort = _StdException()
    TimeoutError = _StdException()
    AuthenticationError = _StdException()

    current_process = staticmethod(process.current_process)
    parent_process = staticmethod(process.parent_process)
    active_children = staticmethod(process.active_children)

    def Pipe(self, duplex=True):
        """Two connected `Connection` ends (see `ferroproc.connection.Pipe`)."""
        from .connection import Pipe

        return Pipe(duplex)

    def allow_connection_pickling(self):
        """Makes connections picklable (loading `ferroproc.connection` registers them)."""
        from . import connection  # noqa: F401

    def cpu_count(self):
        """The number of CPUs in the system."""
        num = os.cpu_count()
        if num is None:
            raise NotImplementedError("cannot determine number of cpus")
        return num

    def freeze_support(self):
        """Lets a frozen Windows executable act as a child; nothing to do on Linux."""
        if sys.platform == "win32" and getattr(sys, "frozen", False):
            from .spawn import freeze_support

            freeze_support()

    def get_logger(self):
        """The package logger, shared with the stdlib's name `multiprocessing`."""
        from .util import get_logger

        return get_logger()

    def log_to_stderr(self, level=None):
        """Turns on logging to stderr at `level`."""
        from .util import log_to_stderr

        return log_to_stderr(level)

    def set_executable(self, executable):
        """Sets the interpreter that spawn uses to start children."""
        from .spawn import set_executable

        set_executable(executable)

    def set_forkserver_preload(self, module_names):
        """Sets modules the forkserver imports once, so its children start with them loaded."""
        from .forkserver import set_forkserver_preload

        set_forkserver_preload(module_names)

    def Lock(self):
        """A non-recursive lock shared between processes."""
        from .synchronize import Lock

        return Lock(ctx=self.get_context())

    def RLock(self):
        """A recursive lock shared between processes."""
        from .synchronize import RLock

        return RLock(ctx=self.get_context())

    def Condition(self, lock=None):
        """A condition variable over `lock` (a new RLock by default)."""
        from .synchronize import Condition

        return Condition(lock, ctx=self.get_context())

    def Semaphore(self, value=1):
        """A semaphore shared between processes."""
        from .synchronize import Semaphore

        return Semaphore(value, ctx=self.get_context())

    def BoundedSemaphore(self, value=1):
        """A semaphore that refuses to be released above its initial value."""
        from .synchronize import BoundedSemaphore

        return BoundedSemaphore(value, ctx=self.get_context())

    def Event(self):
        """An event flag shared between processes."""
        from .synchronize import Event

        return Event(ctx=self.get_context())

    def Barrier(self, parties, action=None, timeout=None):
        """A barrier for `parties` processes."""
        from .synchronize import Barrier

        return Barrier(parties, action, timeout, ctx=self.get_context())

    def RawValue(self, typecode_or_type, *args):
        """A ctypes object in shared memory (see `ferroproc.sharedctypes.RawValue`)."""
        from .sharedctypes import RawValue

        return RawValue(typecode_or_type, *args)

    def RawArray(self, typecode_or_type, size_or_initializer):
        """A ctypes array in shared memory (see `ferroproc.sharedctypes.RawArray`)."""
        from .sharedctypes import RawArray

        return RawArray(typecode_or_type, size_or_initializer)

    def Value(self, typecode_or_type, *args, lock=True):
        """A shared ctypes object guarded by a lock (see `ferroproc.sharedctypes.Value`)."""
        from .sharedctypes import Value

        return Value(typecode_or_type, *args, lock=lock, ctx=self.get_context())

    def Array(self, typecode_or_type, size_or_initializer, *, lock=True):
        """A shared ctypes array guarded by a lock (see `ferroproc.sharedctypes.Array`)."""
        from .sharedctypes import Array

        return Array(typecode_or_type, size_or_initializer, lock=lock, ctx=self.get_context())

    def Queue(self, maxsize=0):
        """A FIFO queue shared between processes (no feeder thread: see `ferroproc.queues`)."""
        from .queues import Queue

        return Queue(maxsize, ctx=self.get_context())

    def JoinableQueue(self, maxsize=0):
        """A `Queue` with ``task_done()`` and ``join()``."""
        from .queues import JoinableQueue

        return JoinableQueue(maxsize, ctx=self.get_context())

    def SimpleQueue(self):
        """A minimal queue: blocking ``put``/``get``, ``empty`` and ``close``."""
        from .queues import SimpleQueue

        return SimpleQueue(ctx=self.get_context())

    def Manager(self):
        """A started `SyncManager`: a server process holding shared objects for proxies."""
        from .managers import SyncManager

        m = SyncManager(ctx=self.get_context())
        m.start()
        return m

    def Pool(self, processes=None, initializer=None, initargs=(), maxtasksperchild=None):
        """A pool of worker processes (see `ferroproc.pool`)."""
        from .pool import Pool

        return Pool(processes, initializer, initargs, maxtasksperchild, context=self.get_context())

    def get_context(self, method=None):
        """The context for `method`, or this one when `method` is None."""
        if method is None:
            return self
        try:
            ctx = _concrete_contexts[method]
        except KeyError:
            raise ValueError(f"cannot find context for {method!r}") from None
        ctx._check_available()
        return ctx

    def get_start_method(self, allow_none=False):
        return self._name

    def set_start_method(self, method, force=False):
        raise ValueError("cannot set start method of concrete context")

    @property
    def reducer(self):
        """The pickling module used to send objects to children."""
        if "reduction" not in globals():
            # Imported on first use: a spawned child unpickles with the C pickler directly.
            from . import reduction

            globals()["reduction"] = reduction
        return globals()["reduction"]

    @reducer.setter
    def reducer(self, reduction):
        globals()["reduction"] = reduction

    def _check_available(self):
        pass


class Process(process.BaseProcess):
    """A process started with the default context's start method."""

    _start_method = None

    @staticmethod
    def _Popen(process_obj):
        return _default_context.get_context().Process._Popen(process_obj)

    @staticmethod
    def _after_fork():
        return _default_context.get_context().Process._after_fork()


class DefaultContext(BaseContext):
    """The module-level context: follows `set_start_method`."""

    Process = Process

    def __init__(self, context):
        self._default_context = context
        self._actual_context = None

    def get_context(self, method=None):
        if method is None:
            if self._actual_context is None:
                self._actual_context = self._default_context
            return self._actual_context
        return super().get_context(method)

    def set_start_method(self, method, force=False):
        """Fixes the start method used by the module-level factories (once, unless forced)."""
        if self._actual_context is not None and not force:
            raise RuntimeError("context has already been set")
        if method is None and force:
            self._actual_context = None
            return
        self._actual_context = self.get_context(method)

    def get_start_method(self, allow_none=False):
        if self._actual_context is None:
            if allow_none:
                return None
            self._actual_context = self._default_context
        return self._actual_context._name

    def get_all_start_methods(self):
        """The start methods this platform supports, the default first."""
        return ["fork", "spawn", "forkserver"]


class ForkProcess(process.BaseProcess):
    _start_method = "fork"

    @staticmethod
    def _Popen(process_obj):
        from .popen_fork import Popen

        return Popen(process_obj)


class SpawnProcess(process.BaseProcess):
    _start_method = "spawn"

    @staticmethod
    def _Popen(process_obj):
        from .popen_spawn_posix import Popen

        return Popen(process_obj)

    @staticmethod
    def _after_fork():
        # A spawned child is a fresh interpreter: there are no after-fork hooks to run.
        pass


class ForkServerProcess(process.BaseProcess):
    _start_method = "forkserver"

    @staticmethod
    def _Popen(process_obj):
        from .popen_forkserver import Popen

        return Popen(process_obj)


class ForkContext(BaseContext):
    _name = "fork"
    Process = ForkProcess


class SpawnContext(BaseContext):
    _name = "spawn"
    Process = SpawnProcess


class ForkServerContext(BaseContext):
    _name = "forkserver"
    Process = ForkServerProcess


_concrete_contexts = {
    "fork": ForkContext(),
    "spawn": SpawnContext(),
    "forkserver": ForkServerContext(),
}
# Python 3.11's default on Linux.
_default_context = DefaultContext(_concrete_contexts["fork"])


def _force_start_method(method):
    _default_context._actual_context = _concrete_contexts[method]


_tls = _thread._local()


def get_spawning_popen():
    """The popen of the process being started by this thread, or None."""
    return getattr(_tls, "spawning_popen", None)


def set_spawning_popen(popen):
    _tls.spawning_popen = popen


def assert_spawning(obj):
    """Refuses to pickle `obj` except while a child process is being started."""
    if get_spawning_popen() is None:
        raise RuntimeError(
            f"{type(obj).__name__} objects should only be shared between processes"
            " through inheritance"
        )


# The child's bootstrap reaches this module without an import statement (see process.py).
process._context = sys.modules[__name__]
