"""shared_memory.SharedMemory and ShareableList against the stdlib and ferroproc, interop
between the two, and ferroproc's lifetime tracking: no premature unlink, nothing left in
/dev/shm after kill -9, no false warnings."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time

import _shm_workers as w
import pytest
from _workers import join_ok, start

SHORT_TIMEOUT = w.SHORT_TIMEOUT


pytestmark = pytest.mark.usefixtures("shm_tracker_connection")


def sm(impl_or_ctx):
    name = "ferroproc" if is_ferro(impl_or_ctx) else "multiprocessing"
    return __import__(name + ".shared_memory", fromlist=["x"])


def is_ferro(impl_or_ctx):
    return type(impl_or_ctx).__module__.startswith("ferroproc") or (
        getattr(impl_or_ctx, "__name__", "") == "ferroproc"
    )


def exists(name):
    return os.path.exists("/dev/shm/" + name.lstrip("/"))


def wait_gone(names, timeout=10.0):
    deadline = time.monotonic() + timeout
    left = [n for n in names if exists(n)]
    while left and time.monotonic() < deadline:
        time.sleep(0.02)
        left = [n for n in left if exists(n)]
    return left


def test_basics_and_bad_input(impl):
    shared_memory = sm(impl)
    name = f"fp_test_basics_{os.getpid()}"
    shm = shared_memory.SharedMemory(name, create=True, size=512)
    try:
        assert shm.name == name and shm.size >= 512 and len(shm.buf) >= 512
        assert name in repr(shm) and str(shm.size) in repr(shm)
        shm.buf[:5] = b"hello"
        other = shared_memory.SharedMemory(name, size=10 * 512)  # size ignored on attach
        assert bytes(other.buf[:5]) == b"hello" and other.size == shm.size
        other.close()
        with pytest.raises(FileExistsError):
            shared_memory.SharedMemory(name, create=True, size=16)
        assert exists(name)  # the failed creation did not unlink the existing segment
    finally:
        shm.close()
        shm.unlink()
    assert not exists(name)
    with pytest.raises(ValueError):
        shared_memory.SharedMemory(create=True, size=0)
    with pytest.raises(ValueError):
        shared_memory.SharedMemory(create=True, size=-1)
    with pytest.raises(ValueError):
        shared_memory.SharedMemory(create=True)
    with pytest.raises(ValueError):
        shared_memory.SharedMemory()
    with pytest.raises(FileNotFoundError):
        shared_memory.SharedMemory(f"fp_not_there_{os.getpid()}")
    random = shared_memory.SharedMemory(create=True, size=1)
    assert random.name.startswith("psm_") and len(random._name) <= 14
    random.close()
    random.unlink()
    with pytest.raises(FileNotFoundError):
        random.unlink()


def test_pickled_segment_of_an_unlinked_name_fails(impl):
    shared_memory = sm(impl)
    shm = shared_memory.SharedMemory(create=True, size=64)
    data = pickle.dumps(shm)
    shm.close()
    shm.unlink()
    with pytest.raises(FileNotFoundError):
        pickle.loads(data)


def test_children_attach_by_name_and_by_pickle(ctx):
    shared_memory = sm(ctx)
    impl_name = "ferroproc" if is_ferro(ctx) else "multiprocessing"
    shm = shared_memory.SharedMemory(create=True, size=64)
    try:
        join_ok(start(ctx, w.attach_and_write, impl_name, shm.name, b"howdy"))
        assert bytes(shm.buf[:5]) == b"howdy"
        join_ok(start(ctx, w.attach_and_write, impl_name, shm, b"HELLO"))
        assert bytes(shm.buf[:5]) == b"HELLO"
        assert exists(shm.name)  # children that attached and exited did not unlink it
    finally:
        shm.close()
        shm.unlink()


def test_shareable_list(impl):
    shared_memory = sm(impl)
    sl = shared_memory.ShareableList(["howdy", b"HoWdY", -273.154, 100, None, True, 42])
    try:
        assert sl.format == "8s8sdqxxxxxx?xxxxxxxx?q" and len(sl) == 7
        assert list(sl) == ["howdy", b"HoWdY", -273.154, 100, None, True, 42]
        sl[4] = "some"
        assert sl[4] == "some" and sl.format == "8s8sdq8sxxxxxxx?q"
        with pytest.raises(ValueError, match="exceeds available storage"):
            sl[4] = "far too many"
        with pytest.raises(IndexError):
            sl[7]
        with pytest.raises(IndexError):
            sl[7] = 1
        assert sl.index(100) == 3 and sl.count(42) == 1 and sl[-1] == 42
        with pytest.raises(ValueError):
            sl.index("absent")
        twin = pickle.loads(pickle.dumps(sl))
        assert twin.shm.name == sl.shm.name and list(twin) == list(sl)
        twin.shm.close()
        empty = shared_memory.ShareableList()
        assert len(empty) == 0 and list(empty) == []
        empty.shm.close()
        empty.shm.unlink()
    finally:
        sl.shm.close()
        sl.shm.unlink()


def test_shareable_list_utf8_never_truncated():
    from ferroproc import shared_memory

    sl = shared_memory.ShareableList(["ééééé"])  # 5 characters, 10 bytes
    try:
        assert sl[0] == "ééééé"
    finally:
        sl.shm.close()
        sl.shm.unlink()


_STDLIB_ATTACH = """
import sys
from multiprocessing import resource_tracker, shared_memory
sl = shared_memory.ShareableList(name=sys.argv[1])
print(list(sl))
sl[0] = sl[0] * 2
sl[2] = "from stdlib"
# The stdlib registers what it attaches and would unlink it at exit: undo that.
resource_tracker.unregister(sl.shm._name, "shared_memory")
sl.shm.close()
"""


def test_shareable_list_interop_with_the_stdlib():
    import multiprocessing.shared_memory as std

    from ferroproc import shared_memory as ferro

    ours = ferro.ShareableList([21, 1.5, "twelve chars", None, True, b"b"])
    try:
        out = subprocess.run(
            [sys.executable, "-c", _STDLIB_ATTACH, ours.shm.name],
            capture_output=True,
            text=True,
            timeout=SHORT_TIMEOUT,
            check=False,
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "[21, 1.5, 'twelve chars', None, True, b'b']"
        assert out.stderr == ""
        assert list(ours) == [42, 1.5, "from stdlib", None, True, b"b"]
    finally:
        ours.shm.close()
        ours.shm.unlink()
    theirs = std.ShareableList([7, "x" * 9, False, None])
    try:
        attached = ferro.ShareableList(name=theirs.shm.name)
        assert list(attached) == [7, "x" * 9, False, None]
        assert attached.format == theirs.format
        attached[1] = "y"
        assert theirs[1] == "y"
        attached.shm.close()
    finally:
        theirs.shm.close()
        theirs.shm.unlink()


# -- ferroproc's lifetime tracking -------------------------------------------------------------


def test_segment_outlives_its_creator_while_an_attacher_lives(ctx):
    if not is_ferro(ctx):
        pytest.skip("ferroproc's lifetime tracking")
    q = ctx.SimpleQueue()
    creator = start(ctx, w.create_and_report, "ferroproc", q, False)
    name = q.get()
    join_ok(creator)
    # Nobody holds it any more: the tracker unlinks it.
    assert wait_gone([name]) == []
    # Now with an attacher that outlives the creator.
    creator = start(ctx, w.create_and_report, "ferroproc", q, True)
    name = q.get()
    attacher = start(ctx, w.attach_report_and_hang, "ferroproc", name, q)
    assert q.get() == b"used"
    creator.kill()
    join_ok(creator, -signal.SIGKILL)
    time.sleep(0.2)
    assert exists(name)  # the attacher still holds it
    attacher.kill()
    join_ok(attacher, -signal.SIGKILL)
    assert wait_gone([name]) == []
    q.close()


def test_thousand_create_use_kill_cycles_leave_nothing_behind():
    import ferroproc

    ctx = ferroproc.get_context("fork")
    q = ctx.SimpleQueue()
    names = []
    batch = 50
    t0 = time.monotonic()
    for _ in range(1000 // batch):
        procs = [start(ctx, w.create_and_report, "ferroproc", q, True) for _ in range(batch)]
        names.extend(q.get() for _ in range(batch))
        for p in procs:
            p.kill()
        for p in procs:
            join_ok(p, -signal.SIGKILL)
    q.close()
    assert len(set(names)) == 1000
    assert wait_gone(names) == []
    assert time.monotonic() - t0 < 60


_KILL_ALL = """
import os, signal, sys, time
import ferroproc
from ferroproc import shared_memory

def child(name):
    shm = shared_memory.SharedMemory(name)
    shm.buf[0] = 1
    time.sleep(60)

if __name__ == "__main__":
    ctx = ferroproc.get_context(sys.argv[1])
    shm = shared_memory.SharedMemory(create=True, size=1 << 20)
    procs = [ctx.Process(target=child, args=(shm.name,)) for _ in range(3)]
    for p in procs:
        p.start()
    while shm.buf[0] == 0:
        time.sleep(0.01)
    print(shm.name, *[p.pid for p in procs], flush=True)
    time.sleep(60)
"""


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_kill_9_of_every_process_unlinks(method, tmp_path):
    script = tmp_path / "killall.py"
    script.write_text(_KILL_ALL)
    proc = subprocess.Popen(
        [sys.executable, str(script), method],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        line = proc.stdout.readline().split()
        assert line, proc.stderr.read()
        name = line[0]
        assert exists(name)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole group: parent, children, forkserver
        proc.wait(SHORT_TIMEOUT)
        proc.stdout.close()
        err = proc.stderr.read()
        proc.stderr.close()
    assert wait_gone([name]) == []
    assert "leaked" not in err


_NO_WARNINGS = """
import sys
import ferroproc
from ferroproc import shared_memory

def attach(name):
    s = shared_memory.SharedMemory(name)
    s.buf[0] = 7
    s.close()

if __name__ == "__main__":
    ctx = ferroproc.get_context(sys.argv[1])
    shm = shared_memory.SharedMemory(create=True, size=64)
    p = ctx.Process(target=attach, args=(shm.name,))
    p.start()
    p.join(30)
    assert p.exitcode == 0 and shm.buf[0] == 7
    again = shared_memory.SharedMemory(shm.name)  # not unlinked by the attacher's exit
    again.close()
    shm.close()
    shm.unlink()
    leftover = shared_memory.SharedMemory(create=True, size=64)  # never unlinked: the tracker
    print(leftover.name)                                         # removes it, silently
"""


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_no_false_leak_warnings_and_no_premature_unlink(method, tmp_path):
    script = tmp_path / "nowarn.py"
    script.write_text(_NO_WARNINGS)
    out = subprocess.run(
        [sys.executable, "-W", "error", str(script), method],
        capture_output=True,
        text=True,
        timeout=SHORT_TIMEOUT,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""
    assert wait_gone([out.stdout.strip()]) == []


def test_track_false_leaves_the_lifetime_to_the_caller():
    from ferroproc import shared_memory

    q_name = f"fp_untracked_{os.getpid()}"
    code = textwrap.dedent(f"""
        from ferroproc import shared_memory
        shared_memory.SharedMemory({q_name!r}, create=True, size=8, track=False)
    """)
    subprocess.run([sys.executable, "-c", code], timeout=SHORT_TIMEOUT, check=True)
    time.sleep(0.2)
    assert exists(q_name)
    shm = shared_memory.SharedMemory(q_name, track=False)
    shm.close()
    shm.unlink()
    assert not exists(q_name)
