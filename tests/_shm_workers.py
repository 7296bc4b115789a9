"""Module-level child targets for ``test_sharedctypes.py`` and ``test_shared_memory.py``
(importable by spawn/forkserver children). Every wait is bounded by ``SHORT_TIMEOUT``."""

from __future__ import annotations

import importlib
import sys
import time

SHORT_TIMEOUT = 30.0


def modify_shared(value, array, raw_value, raw_array, text):
    """Changes every object it was given, so the parent can check it sees the changes."""
    value.value = value.value * 2
    for i in range(len(array)):
        array[i] = array[i] + 1.0
    raw_value.value = -5
    raw_array[:] = [x * 10 for x in raw_array]
    text.value = b"child"


def count_up(value, n):
    """``n`` locked increments of `value`."""
    for _ in range(n):
        with value.get_lock():
            value.value += 1


def atomic_count_up(value, n):
    """``n`` lock-free increments (ferroproc extension)."""
    for _ in range(n):
        value.fetch_add(1)


def hold_lock(value, held, release):
    """Holds `value`'s lock until `release` is set."""
    with value.get_lock():
        held.set()
        release.wait(SHORT_TIMEOUT)


def attach_and_write(impl_name, name_or_obj, data):
    """Opens the segment (by name or a pickled object) and writes `data` at its start."""
    shared_memory = importlib.import_module(impl_name + ".shared_memory")
    shm = shared_memory.SharedMemory(name_or_obj) if isinstance(name_or_obj, str) else name_or_obj
    shm.buf[: len(data)] = data
    shm.close()


def create_and_report(impl_name, queue, hang):
    """Creates a segment, writes into it, reports its name, then hangs if asked (to be killed)."""
    shared_memory = importlib.import_module(impl_name + ".shared_memory")
    shm = shared_memory.SharedMemory(create=True, size=4096)
    shm.buf[:4] = b"used"
    queue.put(shm.name)
    if hang:
        time.sleep(SHORT_TIMEOUT * 2)
        sys.exit(4)
    shm.close()


def attach_report_and_hang(impl_name, name, queue):
    """Attaches `name`, reports, and hangs until killed."""
    shared_memory = importlib.import_module(impl_name + ".shared_memory")
    shm = shared_memory.SharedMemory(name)
    queue.put(bytes(shm.buf[:4]))
    time.sleep(SHORT_TIMEOUT * 2)
    sys.exit(4)


def double_value(value):
    """Doubles a (stdlib or ferroproc) shared value under its lock."""
    with value.get_lock():
        value.value *= 2
