"""Process pools: `Pool`, `ThreadPool` and their result objects, with the stdlib's API.

How it works (differs from the stdlib's three threads and two pipes):

* every worker has its **own task queue** (a ferroproc shared-memory ring); the pool has one
  result ring shared by all workers; a worker's loop is native (``pool_worker_loop``) and
  calls Python only to unpickle, run and pickle;
* **one scheduler thread** in the parent waits, with the GIL released, on the result ring's
  event descriptor and on every worker's sentinel (a pidfd) at once; it hands results to the
  result objects and refills the worker that answered;
* tasks are sent in **batches** (several chunks per message) with at most two batches
  outstanding per worker, so a worker never waits for the parent and the parent always knows
  which batches each worker holds (a native ledger, ``src/pool/``). Batch size adapts to the
  measured cost of a task (about 5 ms of work per message), and never takes more than a fair
  share of the remaining work;
  ``map`` without a ``chunksize`` chunks the same way instead of the stdlib's fixed
  ``len/(4*processes)``;
* a batch whose chunks all returned lists of plain ``int``s (64-bit) or ``float``s (what
  ``map`` of a numeric function gives) travels back packed as raw 8-byte values instead of
  pickled (``src/py/pool.rs``); the pickler's byte-array path for ints of 32 bits or more
  was a fifth of a million-item ``map``'s CPU;
* when a worker dies (``kill -9``, a segfault, the OOM killer), the batches it had taken off
  its queue fail at once with `WorkerLostError` naming its pid and how it ended, batches still
  waiting in its queue go to its replacement, and the pool keeps serving. The stdlib's pool
  hangs forever in that case.

Differences from the stdlib (also in the README): `terminate` fails the results still
pending with `WorkerLostError` (the stdlib leaves them unresolved, so a ``get()`` without
timeout hangs); workers ignore SIGINT (Ctrl-C is the parent's to handle; it terminates the
pool when it leaves a ``with`` block or at exit); an exception raised by a callback is
printed instead of killing the result thread; a lazy iterable given to ``imap`` is consumed as
work is dispatched (by the caller or the scheduler thread) rather than by a dedicated thread.
"""

from __future__ import annotations

import _thread
import collections
import functools
import itertools
import os
import sys
import time
import types
import warnings
from _queue import Empty, SimpleQueue
from _thread import allocate_lock as _allocate_lock

from . import context, process, util
from ._ferroproc import PoolLedger, hold_signals, pool_is_packed, pool_unpack_outcomes
from ._poolworker import (
    APPLY,
    EACH,
    EACH_STAR,
    MAP,
    SIGNAL_NAMES,
    STAR,
    ExceptionWithTraceback,
    MaybeEncodingError,
    RemoteTraceback,
    dumps_with_buffers,
    loads_with_buffers,
    rebuild_exc,
    thread_worker,
    worker,
)
from .context import ForkProcess

__all__ = ["Pool", "ThreadPool"]

RUN = "RUN"
CLOSE = "CLOSE"
TERMINATE = "TERMINATE"

job_counter = itertools.count()

# Exported for code that reads them from here, as in the stdlib.
_REEXPORTED = (ExceptionWithTraceback, MaybeEncodingError, RemoteTraceback, rebuild_exc)

#: Batches a worker may hold at once: one running and one waiting, so it never idles while
#: the parent reacts to a result. The ledger of who holds what, and the batch size (about
#: 5 ms of work once a task's cost is measured), are native: ``src/pool/mod.rs``.
_CREDIT = PoolLedger.credit
_MAX_BATCH_ITEMS = PoolLedger.max_batch_items


# What a process pool imports stays clear of `threading` (through `queue` too) and of the stdlib's
# `multiprocessing` (whose exception classes ferroproc's are): importing either makes every
# later fork of this process dearer (threading's at-fork hook runs in each child: about 120
# copy-on-write faults), and the stdlib package costs 10 ms to import. `TimeoutError`,
# `ProcessError` and `WorkerLostError`, a subclass of the latter, are made on first use.


def __getattr__(name):
    if name == "WorkerLostError":
        return _worker_lost_error()
    if name in ("ProcessError", "TimeoutError"):
        return getattr(context, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _worker_lost_error():
    cls = globals().get("_WorkerLostError")
    if cls is None:

        class WorkerLostError(context.ProcessError):
            """A pool worker ended while it held this task (ferroproc extension: the stdlib's
            pool hangs instead)."""

            __module__ = __name__
            __qualname__ = "WorkerLostError"

        cls = globals()["_WorkerLostError"] = WorkerLostError
    return cls


def _acquire_within(lock, timeout):
    """``lock.acquire()`` with a wait's timeout: None blocks, 0 or less only tries."""
    if timeout is None:
        return lock.acquire()
    if timeout > 0:
        return lock.acquire(True, timeout)
    return lock.acquire(False)


class _Condition:
    """The part of `threading.Condition` the pool uses (``with``, `wait`, `wait_for`,
    `notify_all`), over `_thread` locks, so a process pool need not import `threading`."""

    __slots__ = ("_lock", "_waiters")

    def __init__(self, lock):
        self._lock = lock
        self._waiters = []

    def __enter__(self):
        self._lock.acquire()
        return self

    def __exit__(self, *exc):
        self._lock.release()

    def wait(self, timeout=None):
        """Releases the lock until notified or `timeout` seconds pass; True if notified."""
        waiter = _allocate_lock()
        waiter.acquire()
        self._waiters.append(waiter)
        self._lock.release()
        got = False
        try:
            got = _acquire_within(waiter, timeout)
            return got
        finally:
            self._lock.acquire()
            if not got:
                try:
                    self._waiters.remove(waiter)
                except ValueError:  # notified between the timeout and here
                    pass

    def wait_for(self, predicate, timeout=None):
        """Waits until `predicate()` is true or `timeout` seconds pass; its last value."""
        deadline = None if timeout is None else time.monotonic() + timeout
        result = predicate()
        while not result:
            if deadline is None:
                self.wait()
            else:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.wait(left)
            result = predicate()
        return result

    def notify_all(self):
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.release()


def mapstar(args):
    return list(map(*args))


def starmapstar(args):
    return list(itertools.starmap(args[0], args[1]))


def _describe_exit(pid, exitcode, name=None):
    if pid is None:  # a thread pool's worker: a thread has no pid and no exit status
        return f"pool worker thread {name} ended while it held this task"
    if exitcode is None:
        how = "ended (status unknown)"
    elif exitcode < 0:
        name = SIGNAL_NAMES.get(-exitcode, "unknown signal")
        how = f"was killed by signal {-exitcode} ({name})"
    else:
        how = f"exited with status {exitcode}"
    return f"pool worker process {pid} {how} while it held this task"


def _report_callback_error():
    import traceback  # only on this error path (see `ExceptionWithTraceback`)

    sys.stderr.write("Exception in a multiprocessing.pool callback:\n")
    traceback.print_exc()


class _Progress:
    """ferroproc extension: reports how many items of one map-like call are done.

    `spec` is ``True`` (a ``tqdm`` bar this object creates and closes), an object with an
    ``update(n)`` method (a ``tqdm`` bar or look-alike, given ``n`` newly finished items; its
    ``total`` is set when the call knows it and the bar has none), or a callable
    ``spec(done, total)`` (``total`` is ``None`` while unknown, for a lazy iterable). It is
    called from the pool's scheduler thread, like result callbacks, before the items it
    counts are handed to the caller; an exception it raises is printed, as for callbacks.
    """

    __slots__ = ("_bar", "_call", "_own", "done", "total")

    def __init__(self, spec, total):
        self.done = 0
        self.total = total
        self._bar = self._call = None
        self._own = False
        if spec is True:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                raise ImportError(
                    "progress=True draws a tqdm bar and needs the tqdm package; pass a "
                    "callable(done, total) or an object with an update(n) method instead"
                ) from None
            self._bar = tqdm(total=total)
            self._own = True
        elif callable(getattr(spec, "update", None)):
            self._bar = spec
            if total is not None and getattr(spec, "total", 0) is None:
                spec.total = total
        elif callable(spec):
            self._call = spec
        else:
            raise TypeError(
                "progress must be True, a callable(done, total) or an object with an "
                f"update(n) method, not {type(spec).__name__}"
            )

    def set_total(self, total):
        if self.total == total:
            return
        self.total = total
        if self._bar is not None and getattr(self._bar, "total", 0) is None:
            try:
                self._bar.total = total
                self._bar.refresh()
            except Exception:
                _report_callback_error()

    def advance(self, count):
        self.done += count
        try:
            if self._bar is not None:
                self._bar.update(count)
            else:
                self._call(self.done, self.total)
        except Exception:
            _report_callback_error()

    def close(self):
        if self._own:
            self._own = False
            try:
                self._bar.close()
            except Exception:
                _report_callback_error()


def _progress_of(spec, total):
    return None if spec is None else _Progress(spec, total)


# -- work waiting to be dispatched ---------------------------------------------------------


class _Task:
    """One `apply_async` call: a single chunk."""

    __slots__ = ("args", "func", "job", "kwds")

    def __init__(self, job, func, args, kwds):
        self.job, self.func, self.args, self.kwds = job, func, args, kwds

    def remaining(self, pending):
        return len(pending)

    def take(self, _budget, _fair, _single, _later):
        chunk = (APPLY, self.func, self.args, self.kwds)
        self.func = self.args = self.kwds = None
        return [(self.job, 0, 1, APPLY, chunk)], True


class _Source:
    """The items of a map-like call, cut into chunks as workers become free."""

    __slots__ = ("chunksize", "done", "func", "it", "job", "left", "pos", "seq", "star")

    def __init__(self, job, func, iterable, star, chunksize):
        self.job, self.func, self.star, self.chunksize = job, func, star, chunksize
        try:
            self.left = len(iterable)
        except TypeError:
            self.left = None
        # Sequences are sliced (a `range` slice pickles as three numbers); anything else is
        # iterated.
        self.seq = iterable if isinstance(iterable, (range, list, tuple)) else None
        self.it = iter(iterable) if self.seq is None else None
        self.pos = 0
        self.done = False

    def remaining(self, _pending):
        return self.left if self.left is not None else _MAX_BATCH_ITEMS

    def take(self, budget, fair, single, later):
        """Chunks worth about `budget` items (at least one chunk); returns them and whether
        this source is exhausted. What must reach the result object without the scheduler's
        lock held (it may run an ``error_callback``) is appended to `later`."""
        c = self.chunksize
        n = max(1, min(budget, fair))
        if c is None:
            sizes = [n]
        elif c == 1:
            sizes = [1] if single else [n]
        else:
            sizes = [c] * (1 if single else max(1, n // c))
        out = []
        for size in sizes:
            try:
                if self.seq is not None:
                    items = self.seq[self.pos : self.pos + size]
                elif c == 1:
                    # Items of merged one-item chunks are taken one by one, so the ones read
                    # before the iterable raises still run (each is its own task).
                    items = []
                    for item in itertools.islice(self.it, size):
                        items.append(item)
                else:
                    items = list(itertools.islice(self.it, size))
            except Exception as e:
                if c == 1 and items:
                    kind = self._kind(c, len(items))
                    chunk = (kind, self.func, items, None)
                    out.append((self.job, self.pos, len(items), kind, chunk))
                    self.pos += len(items)
                later.append(functools.partial(self.job._source_failed, self.pos, e))
                self._finish()
                return out, True
            if not items:
                break
            kind = self._kind(c, len(items))
            out.append((self.job, self.pos, len(items), kind, (kind, self.func, items, None)))
            self.pos += len(items)
            if self.left is not None:
                self.left -= len(items)
            if len(items) < size:
                break
        else:
            if self.left != 0:
                return out, False
        self.job._set_length(self.pos)
        self._finish()
        return out, True

    def _kind(self, chunksize, count):
        if chunksize == 1 and count > 1:
            return EACH_STAR if self.star else EACH
        return STAR if self.star else MAP

    def _finish(self):
        self.it = self.func = self.seq = None
        self.done = True


class _Slot:
    """One worker position: its process (replaced when it ends) and its task queue (kept
    across replacements, so batches still queued there go to the replacement). The batches
    it holds are in the pool's ledger under its `index`."""

    __slots__ = ("fd", "index", "proc", "taskq")

    def __init__(self, index, taskq):
        self.index = index
        self.proc = None
        self.taskq = taskq
        self.fd = None


# -- the scheduler ----------------------------------------------------------------------------


class _Core:
    """Everything the scheduler thread needs, without a reference to the `Pool` object (so
    an abandoned pool can be collected and finalized)."""

    def __init__(  # noqa: PLR0917 - internal, called once
        self, processes, new_process, ctx, initializer, initargs, maxtasks, threads
    ):
        self.lock = _allocate_lock()
        self.idle = _Condition(self.lock)
        self.cache = {}
        self.pending = collections.deque()
        self.ledger = PoolLedger(processes, maxtasks is not None)
        self.state = RUN
        self.stopping = False
        self.stopped = False
        self.maxtasks = maxtasks
        self.threads = threads
        self.new_process = new_process
        self.ctx = ctx
        self.initializer, self.initargs = initializer, initargs
        self.fds_changed = True
        self.thread = None
        # Replaced workers that had not finished exiting when joined (see `release`).
        self.exiting = set()
        # Guards a result's list of waiting threads (and of awaiting futures) against its
        # completion. One per pool rather than per module: a module's would need an at-fork
        # hook to be reset in children (the scheduler thread may hold it at a fork), Python
        # code that every forked child runs and pays copy-on-write faults for.
        self.waiters_lock = _allocate_lock()
        if threads:
            self.resultq = SimpleQueue()
            self.slots = [_Slot(i, SimpleQueue()) for i in range(processes)]
            self.dumps = self.loads = None
        else:
            from .reduction import ForkingPickler

            # Tasks and results go as protocol 5 pickles with their large buffers beside
            # them, for the queues to send out-of-band (see `dumps_with_buffers`).
            self.dumps = dumps_with_buffers
            self.loads = ForkingPickler.loads
            qctx = _queue_context(ctx)
            self.resultq = qctx.Queue()
            self.slots = [_Slot(i, qctx.Queue()) for i in range(processes)]

    # -- workers ---------------------------------------------------------------------------

    def start_workers(self, slots):
        """Starts a worker in each of `slots`. The plain fork workers of a plain pool are
        forked together (see `process._fork_all`); others are made and started one by one,
        as the stdlib does (a context's `Process` may count or refuse them)."""
        if self.new_process is Pool.Process and getattr(self.ctx, "Process", None) is ForkProcess:
            procs = [self._new_worker(slot) for slot in slots]
            started = []
            mask = hold_signals()  # until every started worker has its slot
            try:
                try:
                    process._fork_all(procs, started, mask)
                finally:
                    for slot, proc in zip(slots, started, strict=False):  # the started ones
                        self._started(slot, proc)
            finally:
                mask.release()
            return
        for slot in slots:
            proc = self._new_worker(slot)
            proc.start()
            self._started(slot, proc)

    def _started(self, slot, proc):
        slot.proc = proc
        if not self.threads:
            slot.fd = getattr(proc, "sentinel", None)
        self.fds_changed = True

    def _new_worker(self, slot):
        if self.threads:
            target, args = thread_worker, (slot.taskq, self.resultq)
            args += (self.initializer, self.initargs, self.maxtasks)
        else:
            target, args = worker, (slot.taskq, self.resultq)
            args += (self.initializer, self.initargs, self.maxtasks, True)
        proc = self.new_process(self.ctx, target=target, args=args)
        proc.name = proc.name.replace("Process", "PoolWorker")
        proc.daemon = True
        return proc

    # -- dispatch (called with the lock held) ----------------------------------------------

    def submit(self, entry):
        with self.lock:
            busy = bool(self.pending)
            self.pending.append(entry)
            if busy:
                # `_fill` leaves work pending only when every worker holds all it may.
                return
            failed = self._fill()
        self._deliver_failures(failed)

    def _fill(self):
        failed = []
        live = [s.index for s in self.slots if s.proc is not None]
        if not live or self.state == TERMINATE:
            return failed
        # Each send either records a batch (using up credit) or consumes pending work.
        while self.pending:
            index = self.ledger.next_slot(live)
            if index is None:
                break
            self._send(self.slots[index], len(live), failed)
        return failed

    def _send(self, slot, nworkers, failed):
        # One item per batch until a task's cost has been measured (slow start).
        budget = self.ledger.budget()
        single = self.maxtasks is not None
        recs, chunks, items = [], [], 0
        while self.pending and items < budget:
            entry = self.pending[0]
            fair = -(-entry.remaining(self.pending) // (nworkers * _CREDIT))
            taken, exhausted = entry.take(budget - items, fair, single, failed)
            if exhausted:
                self.pending.popleft()
            for job, start, count, kind, chunk in taken:
                recs.append((job, start, count, kind))
                chunks.append(chunk)
                items += count
            if single and recs:
                break
        if not recs:
            return
        if not self.threads:
            payload = self._encode(recs, chunks, failed)
            if payload is None:
                return
        else:
            payload = chunks
        bid = self.ledger.record(slot.index, items, recs)
        slot.taskq.put((bid, payload))

    def _encode(self, recs, chunks, failed):
        try:
            return self.dumps(chunks)
        except Exception:
            pass
        # Find the chunks that cannot be pickled: they fail alone, the others go.
        good_recs, good_chunks = [], []
        for rec, chunk in zip(recs, chunks, strict=True):
            try:
                self.dumps(chunk)
            except Exception as e:
                failed.append((rec, e))
            else:
                good_recs.append(rec)
                good_chunks.append(chunk)
        recs[:] = good_recs
        if not good_chunks:
            return None
        return self.dumps(good_chunks)

    # -- results -----------------------------------------------------------------------------

    def _deliver_failures(self, failed):
        # Called without the lock: entries are (task record, exception) pairs or calls.
        for item in failed:
            if callable(item):
                try:
                    item()
                except Exception:
                    _report_callback_error()
                continue
            (job, start, count, kind), exc = item
            self._deliver(job, start, count, kind, (False, exc))

    def _deliver(self, job, start, count, kind, outcome):
        try:
            if kind in {EACH, EACH_STAR}:
                if isinstance(outcome, list):
                    job._set_each(start, outcome)
                else:
                    job._set_each(start, [outcome] * count)
            else:
                job._set_chunk(start, count, outcome)
        except Exception:
            _report_callback_error()

    def _on_result(self, msg):
        bid, seconds, payload = msg[0], msg[1], msg[2]
        with self.lock:
            # Also measures the cost of an item, from this batch alone (see the ledger).
            done = self.ledger.complete(bid, seconds)
            if done is None:  # failed already: its worker was lost, or the pool terminated
                return
            recs = done[1]
            failed = self._fill()
            if not self.pending and self.ledger.idle:
                self.idle.notify_all()
        self._deliver_failures(failed)
        if payload is None:
            outcomes = self._batch_error(msg[3])
        elif self.threads:
            outcomes = payload
        else:
            try:
                if type(payload) is not tuple and pool_is_packed(payload):
                    outcomes = pool_unpack_outcomes(payload)
                else:
                    outcomes = loads_with_buffers(payload)
            except Exception as e:
                err = MaybeEncodingError(e, "<result of a pool task>")
                outcomes = [(False, err)] * len(recs)
        for (job, start, count, kind), outcome in zip(recs, outcomes, strict=False):
            self._deliver(job, start, count, kind, outcome)

    def _batch_error(self, blob):
        try:
            exc = self.loads(blob)
        except Exception as e:
            exc = e
        return itertools.repeat((False, exc))

    # -- dead workers ------------------------------------------------------------------------

    def _on_exit(self, slot):
        proc = slot.proc
        if proc is None:
            return
        proc.join(1)
        exitcode = proc.exitcode
        pid = None if self.threads else proc.pid
        if not self.threads and process._unreaped:
            self.exiting &= process._unreaped
            if pid in process._unreaped:
                self.exiting.add(pid)
        with self.lock:
            queued = slot.taskq.qsize()
            held = self.ledger.lost(slot.index, queued)
            slot.proc = None
            slot.fd = None
            self.fds_changed = True
            replace = not self.stopping and self.state != TERMINATE
        if held:
            err = _worker_lost_error()(_describe_exit(pid, exitcode, proc.name))
            for recs in held:
                for rec in recs:
                    self._deliver(*rec, (False, err))
        if replace:
            self._replace(slot)
        with self.lock:
            if not self.pending and self.ledger.idle:
                self.idle.notify_all()

    def _replace(self, slot):
        try:
            self.start_workers([slot])
        except Exception:
            util.sub_warning("could not start a pool worker; retrying")
            return
        with self.lock:
            failed = self._fill()
        self._deliver_failures(failed)

    def repopulate(self):
        # Only the scheduler thread replaces workers (so a slot is never filled twice): wake
        # it, and it looks at every slot.
        self.wake()

    # -- the scheduler thread ----------------------------------------------------------------

    def run(self):
        try:
            if self.threads:
                self._run_threads()
            else:
                self._run_processes()
        except BaseException:
            _report_callback_error()
        finally:
            self.exited.release()

    def _run_processes(self):
        # The wait is ferroproc's native one (GIL released, in slices): the result ring's
        # eventfd and every worker's sentinel at once.
        from ._ferroproc import wait_readable

        rfd = self.resultq._reader_fileno()
        fds, owners = [rfd], [None]
        while not self.stopped:
            if self.fds_changed:
                self.fds_changed = False
                owners = [None] + [s for s in self.slots if s.fd is not None]
                fds = [rfd] + [s.fd for s in owners[1:]]
            try:
                ready = wait_readable(fds, 0.2)
            except OSError:
                if self.stopped:
                    return
                raise
            self._drain()
            for i in ready:
                slot = owners[i]
                if slot is not None and slot.fd == fds[i]:
                    self._drain()
                    self._on_exit(slot)
            for slot in self.slots:
                if slot.proc is None and not self.stopping and self.state != TERMINATE:
                    self._replace(slot)

    def _drain(self):
        q = self.resultq
        while True:
            try:
                msgs = q.get_many(256, block=False)
            except (Empty, OSError, ValueError):
                return
            for msg in msgs:
                if msg is not None:
                    self._on_result(msg)

    def _run_threads(self):
        q = self.resultq
        wait = 0.05 if self.maxtasks is not None else 0.5
        while not self.stopped:
            try:
                msg = q.get(timeout=wait)
            except Empty:
                msg = None
            while msg is not None:
                self._on_result(msg)
                try:
                    msg = q.get_nowait()
                except Empty:
                    msg = None
            for slot in self.slots:
                if slot.proc is not None and not slot.proc.is_alive():
                    self._on_exit(slot)

    def wake(self):
        try:
            self.resultq.put(None)
        except (OSError, ValueError):
            pass

    # -- shutting down -----------------------------------------------------------------------

    def wait_idle(self):
        with self.lock:
            while (self.pending or not self.ledger.idle) and self.state != TERMINATE:
                self.idle.wait(0.1)

    def stop_workers(self):
        with self.lock:
            self.stopping = True
        for slot in self.slots:
            try:
                slot.taskq.put(None)
            except (OSError, ValueError):
                pass
        for slot in self.slots:
            if slot.proc is not None:
                slot.proc.join()

    def start_thread(self):
        # A bare thread: `threading.Thread.start` waits for the new thread to be scheduled,
        # which costs a context switch per pool on a busy machine.
        self.exited = _thread.allocate_lock()
        self.exited.acquire()
        self.thread = _thread.start_new_thread(self.run, ())

    def stop_thread(self):
        self.stopped = True
        self.wake()
        if self.thread is not None and self.thread != _thread.get_ident():
            self.exited.acquire()
            self.exited.release()

    def terminate(self):
        with self.lock:
            if self.state == TERMINATE and self.stopping:
                return
            self.state = TERMINATE
            self.stopping = True
            self.pending.clear()
            self.ledger.clear()
            jobs = list(self.cache.values())
            self.idle.notify_all()
            procs = [s.proc for s in self.slots if s.proc is not None]
        # Workers get SIGTERM first, so they exit while the rest is done. The scheduler does
        # not replace them (state TERMINATE) and stops before this thread reaps them.
        if self.threads:
            for slot in self.slots:
                _drain_queue(slot.taskq)
                slot.taskq.put(None)
        else:
            for proc in procs:
                try:
                    if proc.exitcode is None:
                        proc.terminate()
                except (OSError, ValueError):
                    pass
        if jobs:
            err = _worker_lost_error()("the pool was terminated before this task completed")
            for job in jobs:
                job._abandon(err)
        self.stop_thread()
        # A replacement the scheduler was starting when the state changed.
        late = [s.proc for s in self.slots if s.proc is not None and s.proc not in procs]
        for proc in late:
            if self.threads:  # a thread ends on the None its slot's queue already holds
                continue
            try:
                proc.terminate()
            except (OSError, ValueError):
                pass
        self.reap(procs + late)

    def reap(self, procs):
        deadline = time.monotonic() + 1.0
        for proc in procs:
            if self.threads:
                # As the stdlib: a terminated thread pool does not wait for running tasks.
                if self.state != TERMINATE and proc.ident != _thread.get_ident():
                    proc.join()
                continue
            try:
                proc.join(max(0.0, deadline - time.monotonic()))
                if proc.exitcode is None:
                    proc.kill()
                    proc.join(5)
            except ValueError:  # already closed by the scheduler
                continue
        self.release(procs)

    def release(self, procs):
        if self.threads:
            return
        # A joined worker may still be exiting (`join()` returns on its exit report): a pool
        # that has been joined leaves no process behind, as the stdlib's.
        # (`_popen` rather than `pid`: the scheduler may have closed a process object, and a
        # context's `Process` may make objects that have neither.)
        popens = [getattr(p, "_popen", None) for p in procs]
        pids = {getattr(popen, "pid", None) for popen in popens} - {None}
        if process._unreaped:
            process._reap_unreaped(pids | self.exiting)
        # The process objects stay usable (``pool._pool``); their descriptors go with them.
        del procs
        for slot in self.slots:
            _close_queue(slot.taskq)
        _close_queue(self.resultq)


def _drain_queue(q):
    while True:
        try:
            q.get_nowait()
        except Empty:
            return


def _close_queue(q):
    try:
        q.close()
    except Exception:
        pass


def _queue_context(ctx):
    from .context import BaseContext, _default_context

    if isinstance(ctx, BaseContext):
        return ctx.get_context()
    return _default_context.get_context()


# -- the pool -------------------------------------------------------------------------------


class Pool:
    """A pool of worker processes running tasks submitted with `apply_async`, `map` and
    friends (the stdlib's API; see the module docstring for what differs inside)."""

    _wrap_exception = True

    @staticmethod
    def Process(ctx, *args, **kwds):
        return ctx.Process(*args, **kwds)

    def __init__(
        self, processes=None, initializer=None, initargs=(), maxtasksperchild=None, context=None
    ):
        self._state = RUN
        self._core = None
        if context is None:
            from .context import _default_context

            context = _default_context.get_context()
        self._ctx = context
        if processes is None:
            processes = os.cpu_count() or 1
        if processes < 1:
            raise ValueError("Number of processes must be at least 1")
        if maxtasksperchild is not None and (
            not isinstance(maxtasksperchild, int) or maxtasksperchild <= 0
        ):
            raise ValueError("maxtasksperchild must be a positive int or None")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        self._processes = processes
        self._initializer = initializer
        self._initargs = initargs
        self._maxtasksperchild = maxtasksperchild
        threads = not self._wrap_exception
        core = _Core(
            processes,
            type(self).Process,
            context,
            initializer,
            initargs,
            maxtasksperchild,
            threads,
        )
        self._core = core
        self._cache = core.cache
        try:
            core.start_workers(core.slots)
        except BaseException:
            # Do not leave the workers already started behind.
            started = [s.proc for s in core.slots if s.proc is not None]
            for proc in started:
                if proc.exitcode is None:
                    proc.terminate()
            for proc in started:
                proc.join()
            core.stopping = True
            core.state = TERMINATE
            core.release(started)
            self._core = None
            raise
        core.start_thread()
        self._terminate = util.Finalize(self, core.terminate, exitpriority=15)

    @property
    def _pool(self):
        core = self.__dict__.get("_core")
        if core is None:
            return []
        return [s.proc for s in core.slots if s.proc is not None]

    def _repopulate_pool(self):
        """Replaces workers that have ended (the scheduler also does this on its own)."""
        self._core.repopulate()

    def __reduce__(self):
        raise NotImplementedError("pool objects cannot be passed between processes or pickled")

    def __repr__(self):
        cls = type(self)
        return (
            f"<{cls.__module__}.{cls.__qualname__} state={self._state} pool_size={len(self._pool)}>"
        )

    def __del__(self, _warn=warnings.warn, RUN=RUN):
        if getattr(self, "_state", None) == RUN and getattr(self, "_core", None) is not None:
            _warn(f"unclosed running multiprocessing pool {self!r}", ResourceWarning, source=self)

    def _check_running(self):
        if self._state != RUN:
            raise ValueError("Pool not running")

    # -- submitting ---------------------------------------------------------------------------

    def apply(self, func, args=(), kwds={}):  # noqa: B006 - the stdlib's signature
        """Calls ``func(*args, **kwds)`` in a worker and returns its result."""
        return self.apply_async(func, args, kwds).get()

    def map(self, func, iterable, chunksize=None, *, progress=None):
        """``list(map(func, iterable))`` computed by the workers, in order.

        ``progress`` (ferroproc extension, keyword-only): ``True`` for a tqdm bar, a tqdm-like
        object with ``update(n)``, or a callable ``progress(done, total)``, told as items
        finish (see the README's Extensions).
        """
        return self._map_async(func, iterable, False, chunksize, progress=progress).get()

    def starmap(self, func, iterable, chunksize=None, *, progress=None):
        """Like `map`, with each item unpacked as ``func(*item)``."""
        return self._map_async(func, iterable, True, chunksize, progress=progress).get()

    def starmap_async(
        self, func, iterable, chunksize=None, callback=None, error_callback=None, *, progress=None
    ):
        """Asynchronous `starmap`: returns a `MapResult`."""
        return self._map_async(
            func, iterable, True, chunksize, callback, error_callback, progress=progress
        )

    def map_async(
        self, func, iterable, chunksize=None, callback=None, error_callback=None, *, progress=None
    ):
        """Asynchronous `map`: returns a `MapResult`."""
        return self._map_async(
            func, iterable, False, chunksize, callback, error_callback, progress=progress
        )

    def apply_async(self, func, args=(), kwds={}, callback=None, error_callback=None):  # noqa: B006
        """Asynchronous `apply`: returns an `ApplyResult`."""
        self._check_running()
        result = ApplyResult(self, callback, error_callback)
        # As given: the worker's ``func(*args, **kwds)`` rejects what is not a sequence or
        # a mapping, failing the result (and calling `error_callback`) as the stdlib's does.
        self._core.submit(_Task(result, func, args, kwds))
        return result

    def imap(self, func, iterable, chunksize=1, *, progress=None):
        """An iterator over ``func(item)`` for each item, in order, as results arrive.

        ``progress``: as for `map` (ferroproc extension); ``total`` is ``None`` until a lazy
        iterable is exhausted.
        """
        return self._imap(IMapIterator, func, iterable, chunksize, progress)

    def imap_unordered(self, func, iterable, chunksize=1, *, progress=None):
        """Like `imap`, yielding results in the order they complete."""
        return self._imap(IMapUnorderedIterator, func, iterable, chunksize, progress)

    def _imap(self, kind, func, iterable, chunksize, progress):
        self._check_running()
        _check_chunksize(chunksize)
        total = len(iterable) if hasattr(iterable, "__len__") else None
        result = kind(self, _progress_of(progress, total))
        self._core.submit(_Source(result, func, iterable, False, chunksize))
        return result

    def _map_async(  # noqa: PLR0917 - mirrors the public *_async signatures
        self,
        func,
        iterable,
        star,
        chunksize=None,
        callback=None,
        error_callback=None,
        *,
        progress=None,
    ):
        self._check_running()
        if not hasattr(iterable, "__len__"):
            iterable = list(iterable)
        length = len(iterable)
        if chunksize is not None:
            _check_chunksize(chunksize)
        tracker = _progress_of(progress, length)
        result = MapResult(self, chunksize, length, callback, error_callback, tracker)
        if length == 0:
            return result
        self._core.submit(_Source(result, func, iterable, star, chunksize))
        return result

    # -- lifetime -----------------------------------------------------------------------------

    def close(self):
        """Accepts no more tasks; workers exit once the submitted ones are done (`join`)."""
        if self._state == RUN:
            self._state = CLOSE
            with self._core.lock:
                if self._core.state == RUN:
                    self._core.state = CLOSE

    def terminate(self):
        """Stops the workers at once; results still pending fail with `WorkerLostError`."""
        self._state = TERMINATE
        self._terminate()

    def join(self):
        """Waits for the workers to exit; call `close` or `terminate` first."""
        if self._state == RUN:
            raise ValueError("Pool is still running")
        if self._state not in (CLOSE, TERMINATE):
            raise ValueError("In unknown state")
        core = self._core
        if core.state != TERMINATE:
            core.wait_idle()
        # The scheduler stops first, so from here on only this thread touches the workers.
        core.stop_thread()
        procs = [s.proc for s in core.slots if s.proc is not None]
        if core.state != TERMINATE:
            core.stop_workers()
        core.reap(procs)

    def __enter__(self):
        self._check_running()
        return self

    def __exit__(self, exc_type, exc_val, exc_tb):
        self.terminate()


def _check_chunksize(chunksize):
    if chunksize < 1:
        raise ValueError(f"Chunksize must be 1+, not {chunksize:n}")


# -- results --------------------------------------------------------------------------------


def _wake_future(fut):
    if not fut.done():
        fut.set_result(None)


class ApplyResult:
    """The result of `Pool.apply_async`."""

    def __init__(self, pool, callback, error_callback):
        self._pool = pool
        core = getattr(pool, "_core", None)  # a pool-like object may have none
        self._waiters_lock = core.waiters_lock if core is not None else _allocate_lock()
        self._ready = False
        self._waiters = None  # locks of the threads blocked in wait()
        self._job = next(job_counter)
        self._cache = pool._cache
        self._callback = callback
        self._error_callback = error_callback
        self._cache[self._job] = self

    def ready(self):
        """Whether the call has completed."""
        return self._ready

    def successful(self):
        """Whether the call completed without raising (ValueError if not ready)."""
        if not self.ready():
            raise ValueError(f"{self!r} not ready")
        return self._success

    def wait(self, timeout=None):
        """Waits until the result is available or `timeout` seconds pass."""
        if self._ready:
            return
        # A held lock that `_signal` releases: what `threading.Event` does underneath,
        # without its Condition's Python code (every page the parent touches after forking a
        # pool's workers is a copy-on-write fault).
        waiter = _allocate_lock()
        waiter.acquire()
        with self._waiters_lock:
            if self._ready:
                return
            if self._waiters is None:
                self._waiters = [waiter]
            else:
                self._waiters.append(waiter)
        got = False
        try:
            got = _acquire_within(waiter, timeout)
        finally:
            if not got:  # timed out or interrupted: no longer waiting
                with self._waiters_lock:
                    if self._waiters is not None and waiter in self._waiters:
                        self._waiters.remove(waiter)

    def _signal(self):
        with self._waiters_lock:
            self._ready = True
            waiters = self._waiters
            self._waiters = None
            futures = self._futures
        if waiters is not None:
            for waiter in waiters:
                waiter.release()
        if futures:
            for loop, fut in futures:
                try:
                    loop.call_soon_threadsafe(_wake_future, fut)
                except RuntimeError:  # that event loop is closed
                    pass

    _futures = None
    _progress = None  # a map's progress reporter (ferroproc extension)

    def __await__(self):
        """ferroproc extension: ``await result`` in a coroutine gives what `get` would, without
        blocking the event loop while the task runs."""
        if not self._ready:
            import asyncio

            loop = asyncio.get_running_loop()
            fut = loop.create_future()
            with self._waiters_lock:
                if self._ready:
                    fut = None
                else:
                    if self._futures is None:
                        self._futures = []
                    self._futures.append((loop, fut))
            if fut is not None:
                yield from fut
        return self.get(0)

    def get(self, timeout=None):
        """The result; re-raises the call's exception; `TimeoutError` if not ready in time."""
        self.wait(timeout)
        if not self.ready():
            raise context.TimeoutError
        if self._success:
            return self._value
        raise self._value

    def _set_chunk(self, _start, _count, outcome):
        self._success, self._value = outcome
        self._complete()

    _set_each = None  # an apply task is never merged with others

    def _complete(self):
        if self._success:
            if self._callback is not None:
                self._run_callback(self._callback, self._value)
        elif self._error_callback is not None:
            self._run_callback(self._error_callback, self._value)
        self._signal()
        self._cache.pop(self._job, None)
        self._pool = None

    @staticmethod
    def _run_callback(callback, value):
        try:
            callback(value)
        except Exception:
            _report_callback_error()

    def _abandon(self, exc):
        if self._progress is not None:
            self._progress.close()
        if not self._ready:
            self._success, self._value = False, exc
            self._signal()
        self._cache.pop(self._job, None)
        self._pool = None

    __class_getitem__ = classmethod(types.GenericAlias)


AsyncResult = ApplyResult


class MapResult(ApplyResult):
    """The result of `Pool.map_async`/`starmap_async`: a list, in order."""

    def __init__(self, pool, chunksize, length, callback, error_callback, progress=None):  # noqa: PLR0917
        super().__init__(pool, callback, error_callback=error_callback)
        self._success = True
        self._value = [None] * length
        self._chunksize = chunksize
        self._number_left = length
        self._progress = progress
        if length == 0:
            self._complete()

    def _set_chunk(self, start, count, outcome):
        ok, value = outcome
        if ok and self._success:
            self._value[start : start + count] = value
        elif not ok:
            self._fail(value)
        self._account(count)

    def _set_each(self, start, outcomes):
        for i, (ok, value) in enumerate(outcomes):
            if ok and self._success:
                self._value[start + i] = value
            elif not ok:
                self._fail(value)
        self._account(len(outcomes))

    def _fail(self, exc):
        if self._success:
            self._success = False
            self._value = exc
            if self._error_callback is not None:
                self._run_callback(self._error_callback, exc)
            self._signal()

    def _account(self, count):
        self._number_left -= count
        if self._progress is not None:
            self._progress.advance(count)
            if self._number_left <= 0:
                self._progress.close()
        if self._number_left <= 0:
            if self._success:
                if self._callback is not None:
                    self._run_callback(self._callback, self._value)
                self._signal()
            self._cache.pop(self._job, None)
            self._pool = None

    def _complete(self):
        if self._progress is not None:
            self._progress.close()
        if self._callback is not None:
            self._run_callback(self._callback, self._value)
        self._signal()
        self._cache.pop(self._job, None)
        self._pool = None

    def _set_length(self, _length):
        pass

    def _source_failed(self, _pos, exc):
        # Only reachable for a sized iterable whose iteration raises.
        self._fail(exc)
        self._cache.pop(self._job, None)
        self._pool = None


class IMapIterator:
    """The iterator returned by `Pool.imap`: results in order, ``next(timeout)``."""

    _ordered = True

    def __init__(self, pool, progress=None):
        self._pool = pool
        self._progress = progress
        self._cond = _Condition(_allocate_lock())
        self._job = next(job_counter)
        self._cache = pool._cache
        self._items = collections.deque()
        self._parked = {}
        self._expect = 0
        self._received = 0
        self._length = None
        self._cache[self._job] = self

    def __iter__(self):
        return self

    def next(self, timeout=None):
        """The next result; `TimeoutError` if none arrives within `timeout` seconds."""
        with self._cond:
            if not self._items and not self._finished():
                if timeout is None:
                    while not self._items and not self._finished():
                        self._cond.wait()
                else:
                    self._cond.wait_for(lambda: self._items or self._finished(), timeout)
            if self._items:
                ok, value = self._items.popleft()
            elif self._finished():
                self._pool = None
                raise StopIteration from None
            else:
                raise context.TimeoutError from None
        if ok:
            return value
        raise value

    __next__ = next

    def _finished(self):
        return self._length is not None and self._received >= self._length

    def _set_chunk(self, start, count, outcome):
        ok, value = outcome
        entries = [(True, v) for v in value] if ok else [(False, value)]
        self._arrive(start, count, entries)

    def _set_each(self, start, outcomes):
        self._arrive(start, len(outcomes), outcomes)

    def _arrive(self, start, count, entries):
        if self._progress is not None:
            self._progress.advance(count)
        with self._cond:
            if self._ordered:
                self._parked[start] = (count, entries)
                while self._expect in self._parked:
                    n, got = self._parked.pop(self._expect)
                    self._items.extend(got)
                    self._expect += n
                    self._received += n
            else:
                self._items.extend(entries)
                self._received += count
            self._check_done()
            self._cond.notify_all()

    def _set_length(self, length):
        if self._progress is not None:
            self._progress.set_total(length)
        with self._cond:
            self._length = length
            self._check_done()
            self._cond.notify_all()

    def _source_failed(self, pos, exc):
        self._arrive(pos, 1, [(False, exc)])
        self._set_length(pos + 1)

    def _check_done(self):
        if self._finished():
            self._cache.pop(self._job, None)
            if self._progress is not None:
                self._progress.close()

    def _abandon(self, exc):
        if self._progress is not None:
            self._progress.close()
        with self._cond:
            if not self._finished():
                self._items.append((False, exc))
                self._length = self._received = 0
            self._cache.pop(self._job, None)
            self._cond.notify_all()

    __class_getitem__ = classmethod(types.GenericAlias)


class IMapUnorderedIterator(IMapIterator):
    """The iterator returned by `Pool.imap_unordered`: results as they complete."""

    _ordered = False


class ThreadPool(Pool):
    """A `Pool` whose workers are threads of this process (nothing is pickled)."""

    _wrap_exception = False

    @staticmethod
    def Process(ctx, *args, **kwds):
        from .dummy import Process

        return Process(*args, **kwds)

    def __init__(self, processes=None, initializer=None, initargs=()):
        Pool.__init__(self, processes, initializer, initargs)
