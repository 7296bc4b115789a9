"""What goes through a queue comes out equal, of the same type, with the same sharing: the
values ferroproc encodes natively (small ints, floats, strings, bytes, tuples of them), the
ones just outside that subset (which take the pickler), and large buffers that ferroproc sends
out-of-band. Parametrized over the stdlib and ferroproc and every start method; the checks on
ferroproc's blob memory run on ferroproc only.
"""

from __future__ import annotations

import ctypes
import enum
import gc
import math
import os
import pickle
import queue
import signal
from collections import namedtuple

import _queue_workers as w
import pytest
from _workers import SHORT_TIMEOUT, join_ok, run_interpreter, script_source, start

Point = namedtuple("Point", "x y")


class Color(enum.IntEnum):
    RED = 1


class Text(str):
    pass


#: Where `tricky_values` puts the tuple that holds one string object twice.
SHARED_PAIR_INDEX = 33


def tricky_values():
    shared = "s" * 40
    deep = 0
    for _ in range(20):
        deep = (deep,)
    values = [
        None, True, False, 0, 255, 256, 65535, 65536, -1, 2**31 - 1, -(2**31), 2**31,
        2**63 - 1, -(2**63), 2**63, -(2**63) - 1, 2**100, 1.5, float("inf"), -0.0,
        float("nan"), "", "é€😀", "\udc80", Text("sub"), b"", b"\x00" * 300, (), (1,),
        (1, 2, 3, 4, 5), ((1, (2, (3,))),), deep, tuple(range(100)), (shared, shared),
        Color.RED, Point(1, 2), ("a" * 20_000,), b"b" * 20_000, [1, (2, "x")],
    ]  # fmt: skip
    assert values[SHARED_PAIR_INDEX] == (shared, shared)
    return values


def same(a, b):
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        if math.isnan(a):
            return math.isnan(b)
        return a == b and math.copysign(1, a) == math.copysign(1, b)
    if isinstance(a, tuple | list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def echo_through_child(ctx, values):
    q_in, q_out = ctx.Queue(), ctx.Queue()
    p = start(ctx, w.echo, q_in, q_out, len(values))
    for v in values:
        q_in.put(v)
    out = [q_out.get(timeout=SHORT_TIMEOUT) for _ in values]
    join_ok(p)
    for q in (q_in, q_out):
        q.close()
        q.join_thread()
    return out


def test_values_round_trip_with_types_and_sharing(ctx):
    values = tricky_values()
    out = echo_through_child(ctx, values)
    for v, r in zip(values, out, strict=True):
        assert same(v, r), (v, r)
    pair = out[SHARED_PAIR_INDEX]
    assert pair[0] is pair[1], "an object appearing twice in a message is one object on arrival"


def test_values_round_trip_in_batches(impl):
    q = impl.Queue()
    values = tricky_values()
    put_many = getattr(q, "put_many", None)
    if put_many is None:
        for v in values:
            q.put(v)
        got = [q.get(timeout=SHORT_TIMEOUT) for _ in values]
    else:
        put_many(values)
        got = q.get_many(len(values), timeout=SHORT_TIMEOUT)
    assert all(same(v, r) for v, r in zip(values, got, strict=True))
    q.close()
    q.join_thread()


def large_values():
    one_mib = bytes(range(256)) * 4096
    return [
        one_mib,
        bytearray(one_mib),
        w.Blob(bytearray(one_mib)),
        w.Blob(bytearray((1 << 20) + 1)),  # just above the out-of-band threshold
        w.Blob(bytearray(100 << 10)),  # below it: in-band
        b"L" * (3 << 20),  # bytes too large for one ring frame
        (one_mib, w.Blob(bytearray(b"z" * (1 << 20))), 7),
        [w.Blob(bytearray(b"%d" % i * (1100 << 10))) for i in range(3)],
        w.Held(bytearray(b"h" * (5 << 20))),  # received where it came, on ferroproc
        bytearray(b"B" * (5 << 20)),  # a top-level bytearray goes out-of-band too
        (bytearray(b"b" * (2 << 20)), "s" * (3 << 20), 1),  # a large pickle
        list(range(300_000)),
    ]


def test_large_payloads_round_trip(ctx):
    values = large_values()
    out = echo_through_child(ctx, values)
    for v, r in zip(values, out, strict=True):
        assert type(v) is type(r)
        assert v == r


def test_numpy_arrays_round_trip(ctx):
    np = pytest.importorskip("numpy")
    arrays = [
        np.arange(1 << 20, dtype="f8").reshape(1024, 1024),
        np.arange(1 << 20, dtype="i4").reshape(1024, 1024).T,  # Fortran order
        np.arange(1 << 20, dtype="u1")[::2],  # not contiguous: in-band
        np.zeros(10),
    ]
    out = echo_through_child(ctx, arrays)
    for a, r in zip(arrays, out, strict=True):
        assert r.dtype == a.dtype and r.shape == a.shape and (r == a).all()
        assert r.flags.writeable
        r[...] = 1  # writable memory of its own
    assert (arrays[0] == np.arange(1 << 20, dtype="f8").reshape(1024, 1024)).all()


def test_read_only_array_arrives_read_only_on_ferroproc(impl):
    # Documented difference: protocol 5 keeps a buffer read-only (the stdlib's protocol 4
    # makes a writable copy). Both the native-size and the out-of-band sizes.
    np = pytest.importorskip("numpy")
    q = impl.Queue()
    for n in (1000, 1 << 18):
        a = np.arange(n)
        a.setflags(write=False)
        q.put(a)
        r = q.get(timeout=SHORT_TIMEOUT)
        assert (r == a).all()
        assert r.flags.writeable == (impl.__name__ == "multiprocessing")
    q.close()
    q.join_thread()


@pytest.mark.fork_only
def test_received_buffer_is_private_memory_across_fork(ctx):
    q = ctx.Queue()
    data = bytearray(os.urandom(1 << 20))
    q.put(w.Blob(data))
    obj = q.get(timeout=SHORT_TIMEOUT)
    p = start(ctx, w.write_into, obj)  # the child overwrites its inherited copy
    join_ok(p)
    assert obj == w.Blob(data)
    q.close()
    q.join_thread()


@pytest.mark.fork_only
def test_received_buffer_survives_fork_and_parent_dropping_it(ctx):
    q, go = ctx.Queue(), ctx.Queue()
    data = bytearray(os.urandom(1 << 20))
    q.put(w.Blob(data))
    obj = q.get(timeout=SHORT_TIMEOUT)
    p = start(ctx, w.check_after_go, obj, go, sum(data))
    del obj
    gc.collect()
    # More traffic through the queue's memory while the child waits.
    q.put(w.Blob(bytearray(b"\xff" * (1 << 20))))
    q.get(timeout=SHORT_TIMEOUT)
    go.put(True)
    join_ok(p)
    for qq in (q, go):
        qq.close()
        qq.join_thread()


def buffer_address(buf):
    """Where a writable buffer's bytes are (the export is released before returning)."""
    view = ctypes.c_char.from_buffer(buf)
    try:
        return ctypes.addressof(view)
    finally:
        del view


def test_large_writable_buffer_arrives_in_memory_reused_after_it_is_dropped(ferro):
    # Extension (README, semantic differences): a writable out-of-band buffer of 4 MiB or
    # more comes back as a `RecvBuffer`, not a `bytearray`; it pickles as a bytearray.
    q = ferro.Queue()
    data = bytearray(os.urandom(8 << 20))
    q.put(pickle.PickleBuffer(data))
    got = q.get(timeout=SHORT_TIMEOUT)
    assert type(got).__name__ == "RecvBuffer"
    assert len(got) == len(data) and bytes(got) == data
    view = memoryview(got)
    assert not view.readonly and view.format == "B" and view.nbytes == len(data)
    view[:4] = b"abcd"  # its memory is the receiver's own
    view.release()
    again = pickle.loads(pickle.dumps(got))
    assert type(again) is bytearray and again[:4] == b"abcd" and again[4:] == data[4:]
    where = buffer_address(got)
    del got
    gc.collect()
    q.put(pickle.PickleBuffer(bytearray(b"\x01" * (8 << 20))))
    got = q.get(timeout=SHORT_TIMEOUT)
    assert buffer_address(got) == where  # the same pages, filled again
    assert bytes(got) == b"\x01" * (8 << 20)
    q.close()


def test_small_writable_buffer_still_arrives_as_a_bytearray(ferro):
    # (The stdlib pickles with protocol 4, which refuses a PickleBuffer.)
    q = ferro.Queue()
    q.put(pickle.PickleBuffer(bytearray(b"z" * (1 << 20))))
    got = q.get(timeout=SHORT_TIMEOUT)
    assert type(got) is bytearray and got == b"z" * (1 << 20)
    q.close()


@pytest.mark.fork_only
def test_received_buffer_survives_fork_and_parent_reusing_the_queue(ctx):
    if ctx.Queue.__module__.startswith("multiprocessing"):
        pytest.skip("ferroproc's RecvBuffer")
    q, go = ctx.Queue(), ctx.Queue()
    data = bytearray(os.urandom(8 << 20))
    q.put(pickle.PickleBuffer(data))
    buf = q.get(timeout=SHORT_TIMEOUT)
    p = start(ctx, w.check_buffer_after_go, buf, go, sum(data))
    del buf
    gc.collect()
    # The parent's next large messages take the blob the buffer was received in (freed at the
    # fork): the child's copy must not change with them.
    for _ in range(3):
        q.put(pickle.PickleBuffer(bytearray(b"\xff" * (8 << 20))))
        buf = q.get(timeout=SHORT_TIMEOUT)
        assert memoryview(buf)[:1] == b"\xff"
        del buf
    go.put(True)
    join_ok(p)
    for qq in (q, go):
        qq.close()
        qq.join_thread()


@pytest.mark.fork_only
def test_a_buffer_kept_by_its_object_is_private_across_fork(ctx):
    # `Held` keeps the buffer it is rebuilt from, as a numpy array does: on ferroproc that is
    # the queue's memory itself. Neither side of a fork sees the other's writes.
    q, go = ctx.Queue(), ctx.Queue()
    data = bytearray(os.urandom(8 << 20))
    q.put(w.Held(data))
    obj = q.get(timeout=SHORT_TIMEOUT)
    assert obj.data == data and not obj.data.readonly
    p = start(ctx, w.check_held_after_go, obj, go, sum(data))
    obj.data[:] = b"\x02" * len(data)  # the parent writes after the fork
    go.put(True)
    join_ok(p)
    join_ok(start(ctx, w.write_held, obj))  # the child writes
    assert obj.data == b"\x02" * len(data)
    for qq in (q, go):
        qq.close()
        qq.join_thread()


@pytest.mark.fork_only
def test_a_buffer_kept_by_its_object_survives_fork_and_parent_reusing_the_queue(ctx):
    q, go = ctx.Queue(), ctx.Queue()
    data = bytearray(os.urandom(8 << 20))
    q.put(w.Held(data))
    obj = q.get(timeout=SHORT_TIMEOUT)
    p = start(ctx, w.check_held_after_go, obj, go, sum(data))
    del obj
    gc.collect()
    # Messages of the same size take the blob back (freed at the fork): the child's copy must
    # not change with them.
    for _ in range(3):
        q.put(w.Held(bytearray(b"\xff" * (8 << 20))))
        assert q.get(timeout=SHORT_TIMEOUT).data[:1] == b"\xff"
    go.put(True)
    join_ok(p)
    for qq in (q, go):
        qq.close()
        qq.join_thread()


def mapping_of(address):
    """The line of /proc/self/maps whose range holds ``address``."""
    with open("/proc/self/maps") as f:
        for line in f:
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            if lo <= address < hi:
                return line
    raise AssertionError(f"{address:#x} is not mapped")


def test_a_large_writable_buffer_is_received_without_a_copy(ferro):
    # Extension (README, out-of-band buffers): the object is rebuilt on the queue's memory.
    q = ferro.Queue()
    data = os.urandom(8 << 20)
    q.put(w.Held(bytearray(data)))
    obj = q.get(timeout=SHORT_TIMEOUT)
    assert obj.data == data
    assert "ferroproc-queue" in mapping_of(buffer_address(obj.data))
    q.put(w.Held(bytearray(1 << 20)))  # below 4 MiB: copied out into a bytearray
    small = q.get(timeout=SHORT_TIMEOUT)
    assert type(small.data.obj) is bytearray
    q.close()


def test_a_numpy_array_is_received_without_a_copy(ferro):
    np = pytest.importorskip("numpy")
    q = ferro.Queue()
    array = np.arange(1 << 20, dtype=np.float64)
    q.put(array)
    got = q.get(timeout=SHORT_TIMEOUT)
    assert np.array_equal(got, array) and got.flags.writeable
    assert "ferroproc-queue" in mapping_of(got.ctypes.data)
    got += 1  # the receiver's to write
    assert got[0] == 1.0
    q.close()


def test_held_buffers_keep_their_blobs_until_dropped(ferro):
    q = ferro.Queue()
    base = blob_memory(q)
    held = []
    for _ in range(4):
        q.put(w.Held(bytearray(8 << 20)))
        held.append(q.get(timeout=SHORT_TIMEOUT))
    assert blob_memory(q) >= base + 4 * (8 << 20)
    most = blob_memory(q)
    del held
    gc.collect()
    # The dropped objects' blobs are spares now: the next messages take them.
    for _ in range(4):
        q.put(w.Held(bytearray(8 << 20)))
        assert q.get(timeout=SHORT_TIMEOUT).data == bytes(8 << 20)
    assert blob_memory(q) <= most
    q.close()


@pytest.mark.fork_only
def test_a_fork_frees_the_blob_of_a_held_buffer_at_once(ferro):
    # Before a fork, the holder copies the bytes into its own memory and frees the blob: a
    # child that is killed (here with kill -9) can hold nothing of the queue.
    ctx = ferro.get_context("fork")
    q = ctx.Queue()
    data = os.urandom(8 << 20)
    q.put(w.Held(bytearray(data)))
    obj = q.get(timeout=SHORT_TIMEOUT)
    most = blob_memory(q)
    p = start(ctx, w.sleep_then_exit, 60)
    os.kill(p.pid, signal.SIGKILL)
    p.join(SHORT_TIMEOUT)
    assert p.exitcode == -signal.SIGKILL
    # The next message of that size takes the freed blob while the object lives on.
    q.put(w.Held(bytearray(b"\xff" * (8 << 20))))
    assert q.get(timeout=SHORT_TIMEOUT).data[:1] == b"\xff"
    assert blob_memory(q) <= most
    assert obj.data == data  # its bytes are its own now
    q.close()


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_a_child_gives_back_what_it_still_holds_when_it_exits(ferro, method):
    ctx = ferro.get_context(method)
    q, done = ctx.Queue(), ctx.Queue()
    q.put(w.Held(bytearray(8 << 20)))
    # The child keeps what it got in a global until it exits.
    join_ok(start(ctx, w.get_into_global, q, done))
    assert done.get(timeout=SHORT_TIMEOUT) == 8 << 20
    most = blob_memory(q)
    q.put(w.Held(bytearray(8 << 20)))  # takes the blob the child gave back
    q.get(timeout=SHORT_TIMEOUT)
    assert blob_memory(q) <= most
    for qq in (q, done):
        qq.close()


def test_a_buffer_dropped_between_the_fork_hooks_and_the_fork_is_freed_once(ferro):
    # A `before` hook registered earlier runs after ferroproc's, which has freed the buffer's
    # blob by then (the buffer is the parent's own memory): dropping it frees nothing more.
    body = """
        import gc, os
        import _queue_workers as w
        held = {}
        os.register_at_fork(before=held.clear)
        q = mp.Queue()
        q.put(w.Held(bytearray(8 << 20)))
        held["x"] = q.get(timeout=10)
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        assert os.waitpid(pid, 0)[1] == 0
        assert not held
        # Two messages in flight: a blob freed twice would be handed to both.
        q.put(w.Held(bytearray(b"\\x01" * (8 << 20))))
        q.put(w.Held(bytearray(b"\\x02" * (8 << 20))))
        first, second = q.get(timeout=10), q.get(timeout=10)
        print(first.data == b"\\x01" * (8 << 20), second.data == b"\\x02" * (8 << 20))
    """
    res, leftovers = run_interpreter(["-c", script_source("ferroproc", body)])
    assert not leftovers
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["True", "True"]


def blob_memory(q):
    """Bytes of memory the queue's memfd holds (ferroproc only)."""
    return os.fstat(q._handles[0]).st_blocks * 512


@pytest.fixture
def ferro(impl):
    if impl.__name__ != "ferroproc":
        pytest.skip("ferroproc's blob memory")
    return impl


#: Freed blobs a ferroproc queue keeps for reuse, and most bytes they hold together (`SPARES`,
#: `SPARE_BYTES` in src/channel/ring/blob.rs); the memory a blob takes for a 1 MiB and an
#: 8 MiB buffer (its bytes start 2 KiB into a page).
SPARES = 64
SPARE_BYTES = 256 << 20
BLOB_1MIB = (1 << 20) + 4096
BLOB_8MIB = (8 << 20) + 4096
#: Ring pages the small pickles naming the blobs may touch besides.
RING = 1 << 20


def test_blob_memory_is_reused_not_grown(ferro):
    q = ferro.Queue()
    base = blob_memory(q)
    kept = []
    for _ in range(10):
        q.put(w.Blob(bytearray(8 << 20)))
        assert blob_memory(q) >= base + (8 << 20)
        kept.append(q.get(timeout=SHORT_TIMEOUT))  # the object lives on in its own memory
        # The freed blob is kept and taken again by the next put: one blob's memory in all.
        assert base + (8 << 20) <= blob_memory(q) <= base + BLOB_8MIB + RING
    q.put(b"x" * (4 << 20))
    assert blob_memory(q) <= base + (4 << 20) + 4096 + RING  # the 8 MiB spare was trimmed to fit
    assert q.get(timeout=SHORT_TIMEOUT) == b"x" * (4 << 20)
    assert all(k == w.Blob(bytearray(8 << 20)) for k in kept)
    q.close()


def test_blob_memory_beyond_the_spares_is_freed_when_read(ferro):
    q = ferro.Queue()
    base = blob_memory(q)
    n = SPARES + 3
    for _ in range(n):
        q.put(w.Blob(bytearray(1 << 20)))
    assert blob_memory(q) >= base + n * (1 << 20)
    for _ in range(n):
        assert q.get(timeout=SHORT_TIMEOUT) == w.Blob(bytearray(1 << 20))
    assert blob_memory(q) <= base + SPARES * BLOB_1MIB + RING
    q.close()


def test_spares_are_bounded_in_bytes(ferro):
    q = ferro.Queue()
    base = blob_memory(q)
    size = 40 << 20
    kept = SPARE_BYTES // (size + 4096)
    n = kept + 2
    for _ in range(n):
        q.put(w.Blob(bytearray(size)))
    assert blob_memory(q) >= base + n * size
    for _ in range(n):
        assert len(q.get(timeout=SHORT_TIMEOUT).data) == size
    assert blob_memory(q) <= base + kept * (size + 4096) + RING
    q.close()


def test_blobs_of_messages_lost_to_a_failed_get_many_are_freed(ferro):
    q = ferro.Queue()
    base = blob_memory(q)
    n = 6
    for _ in range(2):
        q.put_many([w.Unloadable()] + [w.Blob(bytearray(8 << 20)) for _ in range(n)])
        with pytest.raises(ValueError, match="cannot be unpickled"):
            q.get_many(10, timeout=SHORT_TIMEOUT)
        assert q.empty()
        # The second round takes the blobs the first one freed: the memory does not grow.
        assert blob_memory(q) <= base + n * BLOB_8MIB + RING
    q.close()


#: Blobs in flight from which a writer waits for an active reader to free one (`PACE`).
PACE = 32


@pytest.mark.fork_only
def test_writer_ahead_of_an_active_reader_reuses_blobs_instead_of_growing(ctx):
    if ctx.Queue.__module__.startswith("multiprocessing"):
        pytest.skip("ferroproc's blob memory")
    q, ready, results = ctx.Queue(), ctx.Queue(), ctx.Queue()
    n = 150
    p = start(ctx, w.slow_sum_of_blobs, q, ready, n, results)
    assert ready.get(timeout=SHORT_TIMEOUT)
    base = blob_memory(q)
    peak = 0
    for i in range(n):
        q.put(w.Blob(bytearray([i % 256]) * (1 << 20)))
        peak = max(peak, blob_memory(q) - base)
    assert results.get(timeout=SHORT_TIMEOUT) == sum(i % 256 for i in range(n))
    join_ok(p)
    # Without pacing the writer would hold all n blobs at once (the reader takes a
    # millisecond per message); with it, about PACE in flight and a few spares.
    assert peak <= (PACE + 8) * BLOB_1MIB + RING, peak
    for qq in (q, ready, results):
        qq.close()


@pytest.mark.fork_only
def test_writer_does_not_wait_for_a_reader_killed_mid_stream(ctx):
    if ctx.Queue.__module__.startswith("multiprocessing"):
        pytest.skip("ferroproc's blob pacing")
    q, ready, results = ctx.Queue(), ctx.Queue(), ctx.Queue()
    p = start(ctx, w.slow_sum_of_blobs, q, ready, 10_000, results)
    assert ready.get(timeout=SHORT_TIMEOUT)
    for i in range(PACE + 20):
        q.put(w.Blob(bytearray([i % 256]) * (1 << 20)))
    os.kill(p.pid, signal.SIGKILL)
    p.join(SHORT_TIMEOUT)
    assert p.exitcode == -signal.SIGKILL
    # Nobody reads any more: each put allocates at once (at most one short wait while the
    # dead reader still looks active), and every message is there for a new reader.
    for _ in range(2 * PACE):
        q.put(w.Blob(bytearray([7]) * (1 << 20)))
    got = 0
    while True:
        try:
            q.get(timeout=0.5)
        except queue.Empty:
            break
        got += 1
    assert got >= 2 * PACE
    for qq in (q, ready, results):
        qq.close()


def test_blob_of_a_refused_put_is_freed(ferro):
    q = ferro.Queue(maxsize=1)
    base = blob_memory(q)
    q.put(1)
    with pytest.raises(queue.Full):
        q.put(w.Blob(bytearray(8 << 20)), timeout=0.01)
    assert blob_memory(q) <= base + BLOB_8MIB + RING  # kept as a spare
    for _ in range(3):
        with pytest.raises(queue.Full):
            q.put_many([w.Blob(bytearray(8 << 20)), b"y" * (8 << 20)], timeout=0.01)
        assert blob_memory(q) <= base + 2 * BLOB_8MIB + RING  # the same two blobs, taken again
    q.close()


@pytest.mark.parametrize(
    "value",
    [
        w.Blob(bytearray(b"q" * (1 << 20))),
        bytearray(b"r" * (5 << 20)),
        ("s" * (3 << 20), 1),
    ],
    ids=["out-of-band-buffer", "bytearray", "large-pickle"],
)
def test_recv_bytes_of_an_out_of_band_message_is_a_plain_pickle(ferro, value):
    q = ferro.Queue()
    q.put(value)
    got = pickle.loads(q._reader.recv_bytes())
    assert type(got) is type(value) and got == value
    q.close()


@pytest.mark.parametrize(
    "value",
    [bytearray(b"y" * (8 << 20)), ("s" * (8 << 20), 1), [b"%d" % i for i in range(1 << 20)]],
    ids=["bytearray", "large-string-in-a-tuple", "list-of-a-million-bytes"],
)
def test_large_messages_that_are_not_buffers_travel_in_a_blob(ferro, value):
    q = ferro.Queue()
    base = blob_memory(q)
    q.put(value)
    got = q.get(timeout=SHORT_TIMEOUT)
    assert type(got) is type(value) and got == value
    # The blob the message came in is kept for the next large one; a message that went
    # through the ring's overflow log would have given its memory back when read.
    assert blob_memory(q) >= base + (4 << 20)
    q.close()
