"""Descriptors sent to a process that is already running (outside process start) go through
the resource sharer: `DupFd` and `stop`. Behaviour shared with the stdlib runs against both
(`multiprocessing.resource_sharer` and `ferroproc.resource_sharer`); ferroproc's own checks
(one claim per handle, user check, fork) run on ferroproc only.
"""

from __future__ import annotations

import importlib
import os

import _conn_workers as workers
import pytest
from _workers import SHORT_TIMEOUT


def sharer(impl):
    return importlib.import_module(f"{impl.__name__}.resource_sharer")


def open_fds():
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def rs(impl):
    mod = sharer(impl)
    yield mod
    mod.stop(timeout=SHORT_TIMEOUT)  # its listening socket would otherwise outlive the test


def test_a_descriptor_reaches_a_running_child(ctx, impl, rs):
    ours, theirs = ctx.Pipe()
    p = ctx.Process(target=workers.read_from_shared_fd, args=(theirs,))
    p.start()
    theirs.close()
    r, w = os.pipe()
    ours.send(rs.DupFd(r))  # pickled now, while no process is being started
    os.close(r)
    os.write(w, b"through the sharer")
    os.close(w)
    assert ours.poll(SHORT_TIMEOUT)
    data, again = ours.recv()
    assert data == b"through the sharer"
    if impl.__name__ == "ferroproc":
        assert again == "ConnectionError"  # served once
    p.join(SHORT_TIMEOUT)
    assert p.exitcode == 0
    ours.close()


@pytest.fixture
def ferro_rs(impl):
    if impl.__name__ != "ferroproc":
        pytest.skip("ferroproc's resource sharer")
    rs = sharer(impl)
    yield rs
    rs.stop()


def test_stop_closes_unclaimed_descriptors_and_refuses_claims(ferro_rs):
    before = open_fds()
    r, w = os.pipe()
    handles = [ferro_rs.DupFd(r) for _ in range(5)]
    os.close(r)
    os.close(w)
    assert open_fds() > before  # the duplicates, and the server's socket
    ferro_rs.stop(timeout=SHORT_TIMEOUT)
    assert open_fds() == before
    with pytest.raises(OSError):
        handles[0].detach()
    # The sharer starts again on next use.
    r, w = os.pipe()
    h = ferro_rs.DupFd(w)
    got = h.detach()
    os.write(got, b"x")
    assert os.read(r, 1) == b"x"
    for fd in (r, w, got):
        os.close(fd)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a child as another user")
def test_another_user_cannot_claim_a_descriptor(ferro_rs):
    import ferroproc

    ctx = ferroproc.get_context("fork")
    ours, theirs = ctx.Pipe()
    r, w = os.pipe()
    handle = ferro_rs.DupFd(r)
    p = ctx.Process(target=workers.claim_as_other_user, args=(theirs, handle))
    p.start()
    theirs.close()
    assert ours.poll(SHORT_TIMEOUT)
    assert ours.recv() == "ConnectionError"
    p.join(SHORT_TIMEOUT)
    # Still there for the right claimant.
    fd = handle.detach()
    os.write(w, b"y")
    assert os.read(fd, 1) == b"y"
    for f in (r, w, fd):
        os.close(f)
    ours.close()


def test_a_forked_child_drops_the_parents_shared_copies(ferro_rs):
    r, w = os.pipe()
    handle = ferro_rs.DupFd(r)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 0 if not ferro_rs._sharer._fds and ferro_rs._sharer._address is None else 3
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    # The parent still serves it.
    fd = handle.detach()
    os.write(w, b"z")
    assert os.read(fd, 1) == b"z"
    for f in (r, w, fd):
        os.close(f)
