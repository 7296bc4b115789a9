"""Stdlib objects handed to ferroproc children keep working (DESIGN §1.3).

A `concurrent.futures` executor given a ferroproc context passes *stdlib* queues to the
children it starts; those pickle only while a process is being started and rely on the
stdlib's after-fork and exit hooks, which a ferroproc child must run too.
"""

from __future__ import annotations

import multiprocessing
import os

import _interop_workers
import pytest
from _workers import SHORT_TIMEOUT


@pytest.fixture(scope="module", autouse=True)
def _helpers_running():
    # Per-process helpers that live until exit (the stdlib's resource tracker, ferroproc's
    # forkserver and own pidfd) start before the per-test leak baseline is taken.
    import multiprocessing.resource_tracker

    import ferroproc
    import ferroproc.reduction as ferroproc_reduction

    multiprocessing.resource_tracker.ensure_running()
    # The resource sharer's listener (started on first use, lives until exit): one local
    # round trip starts it.
    r, w = os.pipe()
    try:
        os.close(ferroproc_reduction.DupFd(r).detach())
    finally:
        os.close(r)
        os.close(w)
    for method in ferroproc.get_all_start_methods():
        p = ferroproc.get_context(method).Process(target=_interop_workers.noop)
        p.start()
        p.join(SHORT_TIMEOUT)
        assert p.exitcode == 0


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_stdlib_queue_reaches_a_ferroproc_child(method):
    import ferroproc

    q = multiprocessing.get_context(method).Queue()
    try:
        p = ferroproc.get_context(method).Process(target=_interop_workers.put_pair, args=(q, 42))
        p.start()
        # get() before join(): the child's feeder thread must be flushed by the stdlib's exit
        # hook, which the ferroproc child runs.
        assert q.get(timeout=SHORT_TIMEOUT) == ("from child", 42)
        p.join(SHORT_TIMEOUT)
        assert p.exitcode == 0
        assert not p.is_alive()
    finally:
        q.close()
        q.join_thread()
        q._writer.close()  # the stdlib closes it only from a feeder thread this process lacks


def test_stdlib_queue_refuses_pickling_outside_a_start():
    import pickle

    q = multiprocessing.Queue()
    try:
        with pytest.raises(RuntimeError, match="inheritance"):
            pickle.dumps(q)
    finally:
        q.close()
        q.join_thread()


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_connection_sent_to_a_running_child(method):
    # Outside process start, descriptors travel through ferroproc's resource sharer.
    import ferroproc

    ctx = ferroproc.get_context(method)
    control, child_control = ctx.Pipe()
    mine, theirs = ctx.Pipe()
    p = ctx.Process(target=_interop_workers.echo_over_received_connection, args=(child_control,))
    p.start()
    try:
        control.send(theirs)
        theirs.close()
        mine.send("ping")
        assert mine.poll(SHORT_TIMEOUT)
        assert mine.recv() == ("echo", "ping")
        p.join(SHORT_TIMEOUT)
        assert p.exitcode == 0
    finally:
        if p.is_alive():
            p.kill()
            p.join(SHORT_TIMEOUT)
        for c in (control, child_control, mine):
            c.close()
