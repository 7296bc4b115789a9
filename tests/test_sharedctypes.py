"""Value, Array, RawValue, RawArray and sharedctypes, run against the stdlib and ferroproc
(for every start method where a child is involved), plus ferroproc's arena and atomic-Value
extension."""

from __future__ import annotations

import _thread
import ctypes
import os
import pickle
import threading

import _shm_workers as w
import pytest
from _workers import join_ok, start

SHORT_TIMEOUT = w.SHORT_TIMEOUT


@pytest.fixture(scope="module", autouse=True)
def _arenas_exist():
    # Both libraries keep a per-process arena (a descriptor and a mapping) for the rest of the
    # process: create them before any hygiene baseline.
    import multiprocessing

    import ferroproc

    keep = [multiprocessing.RawValue("i"), ferroproc.RawValue("i")]
    # A freed block of ~3 MiB leaves each heap an arena (kept, being under the release
    # threshold) that serves the tests' smaller allocations.
    for mod in (multiprocessing, ferroproc):
        mod.RawArray("b", 3 * 1024 * 1024)
    yield keep


def is_ferro(impl_or_ctx):
    return type(impl_or_ctx).__module__.startswith("ferroproc") or (
        getattr(impl_or_ctx, "__name__", "") == "ferroproc"
    )


class Point(ctypes.Structure):
    _fields_ = [("x", ctypes.c_double), ("y", ctypes.c_int)]


def test_values_of_every_typecode_and_type(impl):
    for code, init in [
        ("c", b"x"),
        ("b", -3),
        ("B", 250),
        ("h", -300),
        ("H", 65000),
        ("i", 7),
        ("I", 7),
        ("l", -(2**40)),
        ("L", 2**40),
        ("q", -(2**62)),
        ("Q", 2**63),
        ("f", 1.5),
        ("d", 2.25),
        ("u", "é"),
    ]:
        v = impl.Value(code, init)
        assert v.value == init
        raw = impl.RawValue(code, init)
        assert raw.value == init
    assert impl.Value("i").value == 0
    assert impl.RawValue(ctypes.c_double).value == 0.0
    p = impl.Value(Point, 1.5, 2)
    assert (p.x, p.y) == (1.5, 2)
    p.y = 9
    assert p.get_obj().y == 9
    assert type(p).__name__ == "SynchronizedPoint"


def test_value_lock_argument(impl):
    v = impl.Value("i", 1)
    assert type(v.get_lock()).__name__ == "RLock"
    with v:
        v.value += 1
    assert v.acquire() and v.release() is None
    raw = impl.Value("i", 3, lock=False)
    assert isinstance(raw, ctypes.c_int) and raw.value == 3
    lock = impl.Lock()
    v2 = impl.Value("d", 1.0, lock=lock)
    assert v2.get_lock() is lock
    a = impl.Array("i", 3, lock=lock)
    assert a.get_lock() is lock
    for bad in ("not a lock", 7):
        with pytest.raises(AttributeError, match="has no method 'acquire'"):
            impl.Value("i", 0, lock=bad)
        with pytest.raises(AttributeError, match="has no method 'acquire'"):
            impl.Array("i", 2, lock=bad)
    assert "Synchronized wrapper for c_int(2)" in repr(v)
    # Any object with acquire/release (and the context manager protocol) works as the lock.
    v3 = impl.Value("i", 1, lock=threading.RLock())
    v3.value += 4
    assert v3.value == 5
    # A failed write releases the lock.
    v4 = impl.Value("i", 1, lock=lock)
    with pytest.raises(TypeError):
        v4.value = "not an int"
    assert lock.acquire(False)
    lock.release()


def test_arrays_index_slice_and_strings(impl):
    a = impl.Array("i", range(10))
    assert len(a) == 10 and a[3] == 3 and a[-1] == 9
    assert a[2:5] == [2, 3, 4] and a[::3] == [0, 3, 6, 9]
    a[2:5] = [20, 30, 40]
    a[0] = -1
    assert list(a[:]) == [-1, 1, 20, 30, 40, 5, 6, 7, 8, 9]
    assert a.get_obj()._length_ == 10 and a.get_obj()._type_ is ctypes.c_int
    z = impl.RawArray("d", 5)
    assert list(z) == [0.0] * 5
    s = impl.Array("c", b"hello world")
    assert s.value == b"hello world" and s.raw == b"hello world"
    s.value = b"bye"
    assert s.value == b"bye" and s.raw == b"bye\x00o world"
    s.raw = b"x" * 11
    assert s.value == b"x" * 11
    assert type(s).__name__ == "SynchronizedString"
    assert type(impl.Array(ctypes.c_ubyte, 2)).__name__ == "SynchronizedArray"


def test_bad_input_raises_the_stdlib_exceptions(impl):
    with pytest.raises(TypeError):
        impl.Value("x")
    with pytest.raises(TypeError):
        impl.Array("z", 3)
    with pytest.raises(TypeError):
        impl.Value("i", "not an int")
    with pytest.raises(IndexError):
        impl.Array("i", 3)[3]
    with pytest.raises(ValueError):
        impl.Array("i", 3)[0:3] = [1, 2]
    with pytest.raises(TypeError):
        impl.Array("c", "str, not bytes")
    with pytest.raises(TypeError):
        impl.RawValue("i", 1, 2)


def test_copy_and_synchronized(impl):
    sc = __import__(impl.__name__ + ".sharedctypes", fromlist=["x"])
    raw = impl.RawArray("i", [1, 2, 3])
    dup = sc.copy(raw)
    dup[0] = 100
    assert raw[:] == [1, 2, 3] and dup[:] == [100, 2, 3]
    wrapped = sc.synchronized(raw)
    assert wrapped.get_obj() is raw and wrapped[1] == 2
    with pytest.raises(AssertionError):
        sc.synchronized(wrapped)
    pv = sc.synchronized(sc.RawValue(Point, 3.0, 4))
    assert (pv.x, pv.y) == (3.0, 4)


def test_pickling_outside_spawning_raises(impl):
    v = impl.Value("i", 1)
    with pytest.raises(RuntimeError, match="inheritance"):
        pickle.dumps(v)
    for obj in (impl.RawValue("i", 1), impl.RawArray("d", 3)):
        with pytest.raises(RuntimeError, match="inheritance"):
            impl.reduction.ForkingPickler.dumps(obj)


def test_children_see_and_change_shared_objects(ctx):
    value = ctx.Value("i", 21)
    array = ctx.Array("d", [0.5, 1.5])
    raw_value = ctx.RawValue("q", 3)
    raw_array = ctx.RawArray("h", [1, 2, 3])
    text = ctx.Array("c", 10)
    join_ok(start(ctx, w.modify_shared, value, array, raw_value, raw_array, text))
    assert value.value == 42
    assert array[:] == [1.5, 2.5]
    assert raw_value.value == -5
    assert raw_array[:] == [10, 20, 30]
    assert text.value == b"child"


def test_two_processes_counting_under_the_lock_is_exact(ctx):
    # 100k each for ferroproc (the benchmark's workload); the stdlib is slower, so fewer.
    n = 100_000 if is_ferro(ctx) else 10_000
    v = ctx.Value("i", 0)
    ps = [start(ctx, w.count_up, v, n) for _ in range(2)]
    for p in ps:
        join_ok(p)
    assert v.value == 2 * n


def test_ctrl_c_interrupts_a_blocked_get_lock(impl):
    if not is_ferro(impl):
        pytest.skip("the stdlib's timed acquire takes Ctrl-C only when its timeout expires")
    ctx = impl.get_context("fork")
    v = ctx.Value("i", 0)
    held, release = ctx.Event(), ctx.Event()
    p = start(ctx, w.hold_lock, v, held, release)
    try:
        assert held.wait(SHORT_TIMEOUT)
        timer = threading.Timer(0.2, _thread.interrupt_main)
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            v.get_lock().acquire(timeout=SHORT_TIMEOUT)
        timer.join()
    finally:
        release.set()
        join_ok(p)
    with v.get_lock():  # still works
        v.value = 1


def test_numpy_view(impl):
    np = pytest.importorskip("numpy")
    arr = impl.Array("d", 1000)
    view = np.frombuffer(arr.get_obj())
    view[:] = np.arange(1000)
    assert arr[999] == 999.0 and arr[10:12] == [10.0, 11.0]
    raw = impl.RawArray("i", 10)
    np.frombuffer(raw, dtype=np.intc)[:] = 7
    assert raw[:] == [7] * 10


# -- ferroproc only: the arena and the atomic-Value extension --------------------------------


def test_many_small_values_share_a_few_mappings():
    import ferroproc
    from ferroproc.heap import BufferWrapper

    fds = len(os.listdir("/proc/self/fd"))
    values = [ferroproc.Value("i", i, lock=False) for i in range(5000)]
    assert len({BufferWrapper._heap._arenas.index(v._wrapper._state[0][0]) for v in values}) <= 2
    assert len(os.listdir("/proc/self/fd")) - fds <= 2
    assert sum(v.value for v in values) == sum(range(5000))
    del values  # blocks go back to the arena


def test_arena_blocks_are_reused_and_arenas_released():
    import ferroproc
    from ferroproc.heap import BufferWrapper

    heap = BufferWrapper._heap
    fds = len(os.listdir("/proc/self/fd"))
    big = ferroproc.RawArray("d", 1_000_000)  # larger than the release threshold
    n_arenas = len(heap._arenas)
    del big
    assert len(heap._arenas) == n_arenas - 1
    assert len(os.listdir("/proc/self/fd")) == fds  # unmapped and closed at once, no GC needed
    a = ferroproc.RawValue("q", 5)
    addr = ctypes.addressof(a)
    del a
    b = ferroproc.RawValue("q")
    assert ctypes.addressof(b) == addr and b.value == 0  # reused and zeroed


def test_atomic_operations():
    import ferroproc
    from ferroproc import sharedctypes

    v = ferroproc.Value("i", 5)
    assert v.load() == 5
    assert v.fetch_add(3) == 5 and v.value == 8
    assert v.add(-10) == -2
    v.store(2**31 - 1)
    assert v.add(1) == -(2**31)  # wraps like C
    assert v.exchange(4) == -(2**31)
    assert v.compare_exchange(4, 9) == (True, 4)
    assert v.compare_exchange(4, 1) == (False, 9)
    with pytest.raises(OverflowError):
        v.store(2**31)
    u = sharedctypes.atomic(ferroproc.RawValue(ctypes.c_ubyte, 255))
    assert u.add(1) == 0 and u.fetch_add(-1) == 0 and u.load() == 255
    assert sharedctypes.atomic(ferroproc.Value("Q", 2**64 - 1)).add(2) == 1
    with pytest.raises(TypeError, match="shared integer"):
        ferroproc.Value("d", 1.0).fetch_add(1)
    with pytest.raises(TypeError, match="allocated by ferroproc"):
        sharedctypes.atomic(ctypes.c_int(3))


def test_atomic_alignment_and_bounds_are_checked():
    from ferroproc import _ferroproc

    chunk = _ferroproc.ShmChunk(4096)
    with pytest.raises(ValueError, match="alignment"):
        chunk.load(2, 4, True)
    with pytest.raises(ValueError, match="outside"):
        chunk.load(chunk.size, 8, True)
    with pytest.raises(ValueError):
        chunk.load(0, 3, True)
    assert chunk.fetch_add(8, 8, True, 5) == 0 and chunk.load(8, 8, True) == 5


def test_atomic_counting_across_processes_needs_no_lock(ctx):
    if not is_ferro(ctx):
        pytest.skip("ferroproc extension")
    v = ctx.Value("q", 0)
    ps = [start(ctx, w.atomic_count_up, v, 50_000) for _ in range(2)]
    for p in ps:
        join_ok(p)
    assert v.load() == 100_000


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_values_cross_between_the_libraries(method):
    import multiprocessing

    import ferroproc

    for maker, runner in ((ferroproc, multiprocessing), (multiprocessing, ferroproc)):
        v = maker.get_context(method).Value("i", 21)
        join_ok(start(runner.get_context(method), w.double_value, v))
        assert v.value == 42, (maker.__name__, runner.__name__)


def test_float_array_slices_behave_like_ctypes(impl):
    a = impl.Array("d", 5)
    a[:] = [1, 2.5, True, 4, 5]
    assert a[:] == [1.0, 2.5, 1.0, 4.0, 5.0] and a[1:4:2] == [2.5, 4.0]
    assert a[::-1] == [5.0, 4.0, 1.0, 2.5, 1.0]
    a[1:3] = (7, 8)
    assert a[:] == [1.0, 7.0, 8.0, 4.0, 5.0]
    with pytest.raises(ValueError):
        a[:] = [1, 2]
    with pytest.raises(ValueError):
        a[:] = (float(i) for i in range(5))
    with pytest.raises(TypeError):
        a[:] = ["x"] * 5
    assert a[:] == [1.0, 7.0, 8.0, 4.0, 5.0]  # failed writes changed nothing
    f = impl.Array("f", [0.1, 0.2])
    assert f[:] == [ctypes.c_float(0.1).value, ctypes.c_float(0.2).value]
