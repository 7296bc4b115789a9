"""ferroproc: a drop-in replacement for `multiprocessing` whose hot paths run in Rust.

Use it as ``import ferroproc as multiprocessing``. The module-level functions are bound to the
default context, exactly as in the stdlib. Names of `multiprocessing.__all__` that ferroproc
does not implement yet are absent (see the README's coverage table), never stubs.
"""

from . import context
from .process import active_children, current_process, parent_process

__all__ = [
    "Array",
    "AuthenticationError",
    "Barrier",
    "BoundedSemaphore",
    "BufferTooShort",
    "Condition",
    "Event",
    "JoinableQueue",
    "Lock",
    "Manager",
    "Pipe",
    "Pool",
    "Process",
    "ProcessError",
    "Queue",
    "RLock",
    "RawArray",
    "RawValue",
    "Semaphore",
    "SimpleQueue",
    "TimeoutError",
    "Value",
    "active_children",
    "allow_connection_pickling",
    "cpu_count",
    "current_process",
    "freeze_support",
    "get_all_start_methods",
    "get_context",
    "get_logger",
    "get_start_method",
    "log_to_stderr",
    "parent_process",
    "reducer",
    "set_executable",
    "set_forkserver_preload",
    "set_start_method",
]

_ctx = context._default_context

Pipe = _ctx.Pipe
Pool = _ctx.Pool
allow_connection_pickling = _ctx.allow_connection_pickling
Process = context.Process
Barrier = _ctx.Barrier
BoundedSemaphore = _ctx.BoundedSemaphore
Condition = _ctx.Condition
Event = _ctx.Event
JoinableQueue = _ctx.JoinableQueue
Lock = _ctx.Lock
Manager = _ctx.Manager
Queue = _ctx.Queue
RLock = _ctx.RLock
Semaphore = _ctx.Semaphore
SimpleQueue = _ctx.SimpleQueue
Array = _ctx.Array
RawArray = _ctx.RawArray
RawValue = _ctx.RawValue
Value = _ctx.Value
cpu_count = _ctx.cpu_count
freeze_support = _ctx.freeze_support
get_all_start_methods = _ctx.get_all_start_methods
get_context = _ctx.get_context
get_logger = _ctx.get_logger
get_start_method = _ctx.get_start_method
log_to_stderr = _ctx.log_to_stderr
set_executable = _ctx.set_executable
set_forkserver_preload = _ctx.set_forkserver_preload
set_start_method = _ctx.set_start_method

SUBDEBUG = 5
SUBWARNING = 25


def __getattr__(name):
    # ProcessError, BufferTooShort, TimeoutError, AuthenticationError: the stdlib's classes,
    # resolved on first use (see context.__getattr__). `reducer`: the reduction module, also
    # imported on first use so a spawned child's start-up does not pay for it.
    if name in context._EXCEPTIONS:
        return getattr(context, name)
    if name == "reducer":
        return _ctx.reducer
    return _missing(name)


def _missing(name):
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
