"""Module-level child targets for ``test_queues.py`` (importable by spawn/forkserver children).

Every wait is bounded by ``SHORT_TIMEOUT``; a child that times out exits non-zero.
"""

from __future__ import annotations

import os
import pickle
import random
import sys
import time

SHORT_TIMEOUT = 30.0


def put_range(q, start, n):
    """Puts the integers ``start .. start + n - 1``."""
    for i in range(start, start + n):
        q.put(i, timeout=SHORT_TIMEOUT)


def sum_until_none(q, results):
    """Gets integers until ``None``; reports ``(count, sum)`` on `results`."""
    count = total = 0
    while True:
        x = q.get(timeout=SHORT_TIMEOUT)
        if x is None:
            break
        count += 1
        total += x
    results.put((count, total))


def echo(q_in, q_out, n):
    """Gets `n` objects from `q_in` and puts each on `q_out`."""
    for _ in range(n):
        q_out.put(q_in.get(timeout=SHORT_TIMEOUT))


def put_objects(q, objs):
    for obj in objs:
        q.put(obj)


def take_and_mark_done(q, n):
    """Gets `n` objects from a JoinableQueue, marking each done after a short pause."""
    for _ in range(n):
        q.get(timeout=SHORT_TIMEOUT)
        time.sleep(0.01)
        q.task_done()


def message(i, size):
    """A self-checking message: a partial or mixed-up one fails `check`."""
    return (i, size, bytes([i % 256]) * size)


def check(msg):
    i, size, payload = msg
    return len(payload) == size and payload == bytes([i % 256]) * size


def put_forever(q, seed, big):
    """Puts self-checking messages of random sizes (some larger than the ring) until killed."""
    rng = random.Random(seed)
    i = 0
    while True:
        size = rng.choice((0, 10, 1000, big)) if big else rng.randrange(0, 3000)
        q.put(message(i, size), timeout=SHORT_TIMEOUT)
        i += 1


def get_forever(q, ready):
    """Gets until killed, checking every message (exits 7 on a bad one)."""
    ready.put(os.getpid())
    while True:
        if not check(q.get(timeout=SHORT_TIMEOUT)):
            sys.exit(7)


def square(x):
    return x * x


def echo_simple(q_in, q_out, n):
    """`echo` for SimpleQueues (whose get has no timeout)."""
    for _ in range(n):
        q_out.put(q_in.get())


class Blob:
    """Pickles its bytearray as a protocol 5 ``PickleBuffer`` (out-of-band where the pickler
    takes it so), and as plain bytes under older protocols."""

    def __init__(self, data):
        self.data = data if isinstance(data, bytearray) else bytearray(data)

    def __reduce_ex__(self, protocol):
        if protocol >= 5:
            return Blob, (pickle.PickleBuffer(self.data),)
        return Blob, (bytes(self.data),)

    def __eq__(self, other):
        return type(other) is Blob and bytes(self.data) == bytes(other.data)

    __hash__ = None


class Held:
    """Keeps the buffer it is rebuilt from, as numpy arrays do: pickles its data as a protocol
    5 ``PickleBuffer`` (out-of-band where the pickler takes it so), as a ``bytearray`` under
    older protocols."""

    def __init__(self, data):
        self.data = memoryview(data).cast("B")

    def __reduce_ex__(self, protocol):
        if protocol >= 5:
            return Held, (pickle.PickleBuffer(self.data),)
        return Held, (bytearray(self.data),)

    def __eq__(self, other):
        return type(other) is Held and self.data == other.data

    __hash__ = None


def held_of(i, size):
    """A `Held` of ``size`` bytes, each ``i % 256``."""
    return Held(bytearray([i % 256]) * size)


def check_held_after_go(obj, go, expected_sum):
    """Waits for ``go``, then checks that the `Held` ``obj`` (inherited through fork) still
    has the bytes it had at the fork."""
    go.get(timeout=SHORT_TIMEOUT)
    sys.exit(0 if sum(obj.data) == expected_sum else 3)


def write_held(obj):
    """Overwrites the (inherited) `Held` object's bytes, then exits."""
    obj.data[:] = b"\x01" * len(obj.data)


def sleep_then_exit(seconds):
    """Sleeps, then exits (a child to kill)."""
    time.sleep(seconds)


#: What `get_into_global` got.
KEPT = None


def get_into_global(q, done):
    """Gets a `Held` object from ``q`` into a module global, reports its size on ``done`` and
    returns, the object still referenced."""
    global KEPT  # the point: a reference that outlives the target
    KEPT = q.get(timeout=SHORT_TIMEOUT)
    done.put(len(KEPT.data))


def check_after_go(obj, go, expected_sum):
    """Waits for ``go``, then checks that ``obj`` (inherited through fork) is still intact."""
    go.get(timeout=SHORT_TIMEOUT)
    sys.exit(0 if sum(bytes(obj.data)) == expected_sum else 3)


def check_buffer_after_go(buf, go, expected_sum):
    """Waits for ``go``, then checks that the buffer ``buf`` (inherited through fork) is still
    intact."""
    go.get(timeout=SHORT_TIMEOUT)
    sys.exit(0 if sum(bytes(buf)) == expected_sum else 3)


def slow_sum_of_blobs(q, ready, n, results):
    """Says it is ready, then gets `n` Blobs, one a millisecond, and reports the sum of
    their first bytes."""
    ready.put(True)
    total = 0
    for _ in range(n):
        total += q.get(timeout=SHORT_TIMEOUT).data[0]
        time.sleep(0.001)
    results.put(total)


def soak_produce(q, producer, n, seed):
    """Puts ``(producer, 0) .. (producer, n - 1)`` in order, in random batches (``put_many``
    where the queue has it), with the odd large message among them."""
    rng = random.Random(seed)
    put_many = getattr(q, "put_many", None)
    seq = 0
    while seq < n:
        k = min(n - seq, rng.randrange(1, 1024))
        batch = [(producer, s) for s in range(seq, seq + k)]
        if rng.random() < 0.01:
            size = rng.randrange(1, 300_000)
            if rng.random() < 0.3:  # sent out-of-band where the queue does that
                size += 1 << 20
            payload = bytearray(b"\xab" * size)
            batch[-1] = (producer, seq + k - 1, Blob(payload) if size > 1 << 20 else payload)
        if put_many is not None and rng.random() < 0.9:
            put_many(batch, timeout=SHORT_TIMEOUT)
        else:
            for m in batch:
                q.put(m, timeout=SHORT_TIMEOUT)
        seq += k


def soak_consume(q, results, producers):
    """Gets until a ``None``; checks each producer's sequence numbers only grow, then reports
    per producer: count, sum and sum of squares of the sequence numbers it got."""
    get_many = getattr(q, "get_many", None)
    last = [-1] * producers
    stats = [[0, 0, 0] for _ in range(producers)]
    while True:
        batch = (
            get_many(4096, timeout=SHORT_TIMEOUT) if get_many else [q.get(timeout=SHORT_TIMEOUT)]
        )
        for i, m in enumerate(batch):
            if m is None:
                # One None per consumer, put after all the data: hand on any others taken.
                for extra in batch[i + 1 :]:
                    q.put(extra)
                results.put((os.getpid(), stats))
                return
            p, s = m[0], m[1]
            intact = True
            if len(m) == 3:
                payload = m[2].data if isinstance(m[2], Blob) else m[2]
                intact = set(bytes(payload)) == {0xAB}
            if s <= last[p] or not intact:
                results.put((os.getpid(), f"bad message {m[:2]} after {last[p]}"))
                return
            last[p] = s
            st = stats[p]
            st[0] += 1
            st[1] += s
            st[2] += s * s


def _refuse_to_load():
    raise ValueError("this object cannot be unpickled")


class Unloadable:
    """Pickles fine; unpickling it raises ValueError."""

    def __reduce__(self):
        return _refuse_to_load, ()


def write_into(obj):
    """Overwrites the (inherited) object's data, then exits."""
    obj.data[:] = b"\x01" * len(obj.data)
