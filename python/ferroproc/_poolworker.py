"""The loop a `ferroproc.pool` worker runs, and the exception wrappers that cross back.

Kept apart from `ferroproc.pool` so a worker (a spawned child in particular) imports only
this: nothing of the parent's scheduler and not the stdlib's ``multiprocessing.context``.

Wire format (private; parent and worker always come from the same install):

* task message, parent -> worker, on the worker's own queue: ``(batch_id, blob)`` where
  ``blob`` is the pickled list of chunks ``(kind, func, args, kwds)`` (or ``(pickle,
  buffers)``, see `dumps_with_buffers`); ``None`` asks the worker to exit.
* result message, worker -> parent, on the pool's one result queue:
  ``(batch_id, seconds, blob)`` with ``blob`` the pickled list of per-chunk outcomes (or
  ``(pickle, buffers)``: a protocol 5 pickle and its out-of-band buffers, which the queue
  carries out-of-band in turn, when a result holds a large one such as a numpy array), or
  ``(batch_id, seconds, None, error)`` when the batch as a whole failed (its tasks could not
  be unpickled, or its outcomes could not be pickled even one by one).

A chunk's outcome is ``(ok, value)`` for `APPLY`, `MAP` and `STAR`, and a list of
``(ok, value)``, one per item, for `EACH` and `EACH_STAR` (items that fail independently).
"""

from __future__ import annotations

import _signal
import io
import os
import signal
import sys
import time
from itertools import starmap as _starmap

from ._ferroproc import pool_worker_loop

__all__ = ["ExceptionWithTraceback", "MaybeEncodingError", "RemoteTraceback", "worker"]

APPLY, MAP, STAR, EACH, EACH_STAR = range(5)


class RemoteTraceback(Exception):
    """Carries the formatted traceback of an exception raised in a worker; it becomes the
    ``__cause__`` of the exception re-raised in the parent."""

    def __init__(self, tb):
        self.tb = tb

    def __str__(self):
        return self.tb


def rebuild_exc(exc, tb):
    exc.__cause__ = RemoteTraceback(tb)
    return exc


class ExceptionWithTraceback:
    """Pickles as the wrapped exception with its formatted traceback attached as cause."""

    def __init__(self, exc, tb):
        # Imported here, on a task's first failure: `traceback` (with `linecache`, `tokenize`)
        # is a third of this module's import, which every spawn or forkserver worker pays.
        import traceback

        text = "".join(traceback.format_exception(type(exc), exc, tb))
        self.exc = exc
        self.tb = f'\n"""\n{text}"""'

    def __reduce__(self):
        return rebuild_exc, (self.exc, self.tb)


class MaybeEncodingError(Exception):
    """A result or exception that could not be sent back from a worker."""

    def __init__(self, exc, value):
        self.exc = repr(exc)
        self.value = repr(value)
        super().__init__(self.exc, self.value)

    def __str__(self):
        return f"Error sending result: '{self.value}'. Reason: '{self.exc}'"

    def __repr__(self):
        return f"<{type(self).__name__}: {self}>"


def _failure(exc, wrap):
    if wrap and type(exc) is not ExceptionWithTraceback:
        return False, ExceptionWithTraceback(exc, exc.__traceback__)
    return False, exc


def run_chunk(kind, func, args, kwds, wrap):
    """Runs one chunk and returns its outcome (see the module docstring)."""
    if kind in {EACH, EACH_STAR}:
        out = []
        for item in args:
            try:
                if kind == EACH_STAR:
                    # `starmap`, as the stdlib's workers call it (its error for an item
                    # that is not iterable is starmap's).
                    out.append((True, next(_starmap(func, (item,)))))
                else:
                    out.append((True, func(item)))
            except Exception as e:
                out.append(_failure(e, wrap))
        return out
    try:
        if kind == APPLY:
            return True, func(*args, **kwds)
        if kind == MAP:
            return True, list(map(func, args))
        return True, list(_starmap(func, args))
    except Exception as e:
        return _failure(e, wrap)


def _encodable(outcome):
    value = outcome[1]
    try:
        dumps_with_buffers(value)
    except Exception as e:
        return False, MaybeEncodingError(e, value)
    return outcome


#: Smallest buffer of a result sent out-of-band (as the queue does, see src/py/oob.rs).
_OOB_MIN = 1 << 20

_BytesIO = io.BytesIO
_BufferPickler = None  # imported on first use (see the module docstring)


def dumps_with_buffers(obj):
    """Pickles ``obj`` with protocol 5, keeping C-contiguous buffers of 1 MiB or more (a numpy
    array's data) out of the pickle: ``bytes``, or ``(bytes, buffers)`` when there are any.
    The queue sends those buffers out-of-band, so a large array is copied once, into the
    queue, and the receiver's array is made on the queue's memory."""
    global _BufferPickler
    if _BufferPickler is None:
        from .reduction import _BufferPickler
    buffers = []

    def keep(pb):
        try:
            size = pb.raw().nbytes
        except BufferError:  # not contiguous: in-band
            return True
        if size < _OOB_MIN:
            return True
        buffers.append(pb)
        return False

    out = _BytesIO()
    _BufferPickler(out, keep).dump(obj)
    data = out.getvalue()
    return (data, buffers) if buffers else data


def loads_with_buffers(payload):
    """Loads what `dumps_with_buffers` made (its buffers as the queue delivered them)."""
    from .reduction import ForkingPickler

    if type(payload) is tuple:
        return ForkingPickler.loads(payload[0], buffers=payload[1])
    return ForkingPickler.loads(payload)


def pickle_outcomes(outcomes, kinds):
    """Pickles a batch's outcomes (the native loop has found they do not pack, see
    ``src/py/pool.rs``); a value that cannot be pickled becomes a `MaybeEncodingError` for
    its task alone."""
    try:
        return dumps_with_buffers(outcomes)
    except Exception:
        pass
    fixed = []
    for kind, outcome in zip(kinds, outcomes, strict=True):
        if kind in {EACH, EACH_STAR}:
            fixed.append([_encodable(o) for o in outcome])
        else:
            fixed.append(_encodable(outcome))
    return dumps_with_buffers(fixed)


def worker(  # noqa: PLR0917 - the stdlib's worker takes these positionally
    taskq, resultq, initializer=None, initargs=(), maxtasks=None, wrap_exception=True
):
    """A pool worker: takes batches from its queue, runs them, sends outcomes back, until it
    receives ``None`` or has run `maxtasks` chunks. The loop itself is native
    (``pool_worker_loop``); it calls back here only to unpickle, run and pickle."""
    # The parent turns Ctrl-C into terminating the pool; a worker must not die half-way
    # through a task (or print a KeyboardInterrupt traceback) because the terminal's whole
    # foreground group received the signal. `_signal`, not `signal.signal`: that wrapper turns
    # the previous handler into an enum member, and running that much of `enum` in a fresh fork
    # child cost 200-310 us (about 70 copy-on-write faults) against 45-65 us here.
    try:
        _signal.signal(_signal.SIGINT, _signal.SIG_IGN)
    except ValueError:  # not the main thread (a thread pool)
        pass
    if initializer is not None:
        initializer(*initargs)
    from .reduction import ForkingPickler

    def dumps(obj, _dumps=ForkingPickler.dumps):
        return bytes(_dumps(obj))

    hooks = (
        loads_with_buffers,
        run_chunk,
        pickle_outcomes,
        lambda exc: _error_blob(exc, dumps),
        _parent_watch(),
    )
    try:
        pool_worker_loop(
            taskq, resultq, hooks, maxtasks, bool(wrap_exception), _PARENT_CHECK_SECONDS
        )
    finally:
        _flush()


#: How often an idle worker checks that the process that owns its pool still exists.
_PARENT_CHECK_SECONDS = 1.0


def _parent_watch():
    """A function telling whether the pool's owner has gone."""
    from .process import parent_process

    parent = parent_process()
    ppid = os.getppid()
    if parent is not None and getattr(parent, "_sentinel", None) is not None:
        return lambda: not parent.is_alive()
    # No sentinel to watch: being re-parented means the parent died.
    return lambda: os.getppid() != ppid


def _error_blob(exc, dumps):
    try:
        return dumps(exc)
    except Exception:
        return dumps(RuntimeError(f"{type(exc).__name__}: {exc}"))


def thread_worker(taskq, resultq, initializer=None, initargs=(), maxtasks=None):
    """The same loop for a thread pool: batches and outcomes are passed as objects."""
    if initializer is not None:
        initializer(*initargs)
    done = 0
    clock = time.perf_counter
    while maxtasks is None or done < maxtasks:
        msg = taskq.get()
        if msg is None:
            break
        bid, chunks = msg
        del msg
        start = clock()
        outcomes = [run_chunk(k, f, a, kw, False) for k, f, a, kw in chunks]
        done += len(chunks)
        del chunks
        resultq.put((bid, clock() - start, outcomes))
        del outcomes


def _flush():
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except Exception:
            pass


# Names the parent refers to when it formats a lost worker's exit.
SIGNAL_NAMES = {int(s): s.name for s in signal.Signals}
