"""SharedMemoryManager: segments made through it are visible to other processes by name and
are unlinked when the manager shuts down; on ferroproc also when its owner is killed.
Parametrized over the stdlib and ferroproc and the start methods.
"""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
import textwrap
import time

import _manager_workers as mw
import pytest
from _workers import SCRIPT_TIMEOUT, SHORT_TIMEOUT, join_ok, start

pytestmark = pytest.mark.usefixtures("shm_tracker_connection")


def _modules(impl):
    name = impl.__name__
    return importlib.import_module(f"{name}.managers"), importlib.import_module(
        f"{name}.shared_memory"
    )


def test_segments_are_shared_and_unlinked_at_shutdown(impl, ctx):
    managers, shared_memory = _modules(impl)
    smm = managers.SharedMemoryManager(ctx=ctx)
    with pytest.raises(ValueError):
        smm.SharedMemory(size=9)  # not started: no address to reach
    smm.start()
    sl = smm.ShareableList(["howdy", 7, None])
    shm = smm.SharedMemory(size=64)
    shm.buf[:5] = b"HELLO"
    names = (sl.shm.name, shm.name)
    reader, writer = ctx.Pipe(duplex=False)
    p = start(ctx, mw.read_shared, impl.__name__, *names, writer)
    writer.close()
    assert reader.poll(SHORT_TIMEOUT)
    assert reader.recv() == (["howdy", 7, None], b"HELLO")
    join_ok(p)
    reader.close()
    sl.shm.close()
    shm.close()
    smm.shutdown()
    for name in names:
        with pytest.raises(FileNotFoundError):
            shared_memory.SharedMemory(name=name)


def _request(managers, smm, name, *args):
    """One control request to the manager's server (one per connection, as the protocol has)."""
    conn = smm._Client(smm.address, authkey=smm._authkey)
    try:
        return managers.dispatch(conn, None, name, args)
    finally:
        conn.close()


def test_context_manager_and_release(impl):
    managers, shared_memory = _modules(impl)
    with managers.SharedMemoryManager() as smm:
        kept = smm.SharedMemory(size=32)
        gone = smm.ShareableList(range(3))
        assert sorted(_request(managers, smm, "list_segments")) == sorted(
            [kept.name, gone.shm.name]
        )
        _request(managers, smm, "release_segment", gone.shm.name)
        with pytest.raises(FileNotFoundError):
            shared_memory.SharedMemory(name=gone.shm.name)
        name = kept.name
        kept.close()
        gone.shm.close()
    with pytest.raises(FileNotFoundError):
        shared_memory.SharedMemory(name=name)


_KILLED_OWNER = textwrap.dedent(
    """
    import os, sys
    from ferroproc.managers import SharedMemoryManager
    smm = SharedMemoryManager()
    smm.start()
    shm = smm.SharedMemory(size=4096)
    print(shm.name, flush=True)
    os.kill(os.getpid(), 9)
    """
)


def test_segments_go_when_the_owner_is_killed(tmp_path):
    # ferroproc only: the stdlib's manager server outlives a killed owner, and so do its
    # segments.
    out = tmp_path / "out"
    with out.open("w") as f:
        proc = subprocess.run(
            [sys.executable, "-c", _KILLED_OWNER],
            stdout=f,
            stderr=subprocess.PIPE,
            timeout=SCRIPT_TIMEOUT,
            check=False,
        )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    name = out.read_text().split()[0]
    path = "/dev/shm/" + name.lstrip("/")
    deadline = time.monotonic() + 10
    while os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not os.path.exists(path), "a segment outlived its killed manager"
