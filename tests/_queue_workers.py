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
        self.data = data

    def __reduce_ex__(self, protocol):
        if protocol >= 5:
            return Blob, (pickle.PickleBuffer(self.data),)
        return Blob, (bytes(self.data),)

    def __eq__(self, other):
        return type(other) is Blob and bytes(self.data) == bytes(other.data)

    __hash__ = None


def check_after_go(obj, go, expected_sum):
    """Waits for ``go``, then checks that ``obj`` (inherited through fork) is still intact."""
    go.get(timeout=SHORT_TIMEOUT)
    sys.exit(0 if sum(bytes(obj.data)) == expected_sum else 3)
