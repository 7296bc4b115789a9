"""Module-level pool task targets (importable by spawn and forkserver workers)."""

from __future__ import annotations

import enum
import os
import time

_initialized = None


def square(x):
    return x * x


def add(a, b):
    return a + b


def sleep_then(seconds, value=None):
    time.sleep(seconds)
    return value


def pid_after(seconds=0.0):
    time.sleep(seconds)
    return os.getpid()


def raise_key_error(key="key"):
    raise KeyError(key)


def fail_on(x, bad=2):
    if x == bad:
        raise ValueError(f"bad item {x}")
    return x


def return_unpicklable():
    return lambda: 42


#: Bytes of the buffers `held_or_unpicklable` returns.
HELD_SIZE = 6 << 20


def held_or_unpicklable(i):
    """A large `Held` buffer for an even ``i``, something that cannot be pickled for an odd
    one."""
    import _queue_workers

    return _queue_workers.held_of(i, HELD_SIZE) if i % 2 == 0 else (lambda: i)


def describe_held(obj):
    """``(first byte, last byte, length, type of the object holding the bytes)`` of a `Held`
    argument."""
    data = obj.data
    return data[0], data[-1], len(data), type(data.obj).__name__


def numpy_full(i, n):
    import numpy as np

    return np.full(n, i, dtype=np.float64)


class UnpicklableError(Exception):
    def __reduce__(self):
        raise TypeError("this exception refuses to be pickled")


def raise_unpicklable():
    raise UnpicklableError("boom")


class RefusesPickle:
    def __reduce__(self):
        raise RuntimeError("cannot pickle this argument")


def set_initialized(value):
    global _initialized
    _initialized = value


def get_initialized(_=None):
    return _initialized


def failing_initializer():
    raise RuntimeError("initializer failed on purpose")


def segfault():
    import ctypes
    import faulthandler

    faulthandler.disable()  # a worker forked from pytest inherits its crash dump
    ctypes.string_at(0)


def kill_self(_=None):
    os.kill(os.getpid(), 9)


def identity(x):
    return x


def identity_or_raise(x):
    """``x`` itself, except that an exception instance is raised."""
    if isinstance(x, BaseException):
        raise x
    return x


class Level(enum.IntEnum):
    """An int subclass, to come back from a pool as itself."""

    LOW = 1
