"""ctypes objects in shared memory: `RawValue`, `RawArray`, `Value`, `Array`, `synchronized`.

Same API as `multiprocessing.sharedctypes`. The objects are real ctypes instances whose bytes
live in this process's shared arena (`ferroproc.heap`: anonymous memfd chunks, nothing in
``/dev/shm``), so ``.value``, indexing, slicing, ``.raw`` of char arrays, ``ctypes.addressof``,
``memoryview`` and ``numpy.frombuffer`` all work on them. Forked children share them with the
address space; spawn/forkserver children receive them (only while being started, as in the
stdlib) as a descriptor of the chunk plus the block's position.

`Value`/`Array` wrap the object with a lock (a new `RLock` unless told otherwise), and their
``value``/item access takes it, as in the stdlib.

ferroproc extension: integer values also offer lock-free atomic operations on the shared
integer itself (``load``, ``store``, ``exchange``, ``fetch_add``, ``add``,
``compare_exchange``): methods of a synchronized integer `Value`, and of ``atomic(raw)`` for a
`RawValue`. They are atomic with respect to each other in every process, need no lock, and
do not take the wrapper's lock.
"""

from __future__ import annotations

import ctypes
import weakref

from . import _ferroproc, context, heap

__all__ = ["Array", "RawArray", "RawValue", "Value", "copy", "synchronized"]
# ferroproc extension (not in __all__, which matches the stdlib): `atomic`, `Atomic`.

typecode_to_type = {
    "c": ctypes.c_char,
    "u": ctypes.c_wchar,
    "b": ctypes.c_byte,
    "B": ctypes.c_ubyte,
    "h": ctypes.c_short,
    "H": ctypes.c_ushort,
    "i": ctypes.c_int,
    "I": ctypes.c_uint,
    "l": ctypes.c_long,
    "L": ctypes.c_ulong,
    "q": ctypes.c_longlong,
    "Q": ctypes.c_ulonglong,
    "f": ctypes.c_float,
    "d": ctypes.c_double,
}

_SIGNED = (ctypes.c_byte, ctypes.c_short, ctypes.c_int, ctypes.c_long, ctypes.c_longlong)
_UNSIGNED = (ctypes.c_ubyte, ctypes.c_ushort, ctypes.c_uint, ctypes.c_ulong, ctypes.c_ulonglong)


def _default_ctx():
    return context._default_context.get_context()


def _ctype_of(typecode_or_type):
    return typecode_to_type.get(typecode_or_type, typecode_or_type)


def _new_value(type_):
    wrapper = heap.BufferWrapper(ctypes.sizeof(type_))
    return rebuild_ctype(type_, wrapper, None)


def RawValue(typecode_or_type, *args):
    """A ctypes object of the given type (or typecode) in shared memory, built from `args`
    (zero when there are none)."""
    obj = _new_value(_ctype_of(typecode_or_type))
    ctypes.memset(ctypes.addressof(obj), 0, ctypes.sizeof(obj))
    obj.__init__(*args)
    return obj


def RawArray(typecode_or_type, size_or_initializer):
    """A ctypes array in shared memory: `size_or_initializer` zeros, or a copy of the
    sequence given."""
    type_ = _ctype_of(typecode_or_type)
    if isinstance(size_or_initializer, int):
        obj = _new_value(type_ * size_or_initializer)
        ctypes.memset(ctypes.addressof(obj), 0, ctypes.sizeof(obj))
        return obj
    obj = _new_value(type_ * len(size_or_initializer))
    obj.__init__(*size_or_initializer)
    return obj


def _lock_for(lock, ctx):
    if lock in (True, None):
        return (ctx or _default_ctx()).RLock()
    if not hasattr(lock, "acquire"):
        raise AttributeError(f"{lock!r} has no method 'acquire'")
    return lock


def Value(typecode_or_type, *args, lock=True, ctx=None):
    """A `RawValue` wrapped with a lock: a new `RLock` for ``lock=True``, the object given,
    or no wrapper at all for ``lock=False``."""
    obj = RawValue(typecode_or_type, *args)
    if lock is False:
        return obj
    return synchronized(obj, _lock_for(lock, ctx), ctx=ctx)


def Array(typecode_or_type, size_or_initializer, *, lock=True, ctx=None):
    """A `RawArray` wrapped with a lock (see `Value` for `lock`)."""
    obj = RawArray(typecode_or_type, size_or_initializer)
    if lock is False:
        return obj
    return synchronized(obj, _lock_for(lock, ctx), ctx=ctx)


def copy(obj):
    """A new shared ctypes object of the same type holding a copy of `obj`."""
    new_obj = _new_value(type(obj))
    ctypes.pointer(new_obj)[0] = obj
    return new_obj


def synchronized(obj, lock=None, ctx=None):
    """Wraps the shared ctypes object `obj` so its fields are read and written under `lock`
    (a new `RLock` when None)."""
    assert not isinstance(obj, SynchronizedBase), "object already synchronized"
    ctx = ctx or _default_ctx()
    if isinstance(obj, ctypes._SimpleCData):
        return Synchronized(obj, lock, ctx)
    if isinstance(obj, ctypes.Array):
        if obj._type_ is ctypes.c_char:
            return SynchronizedString(obj, lock, ctx)
        return SynchronizedArray(obj, lock, ctx)
    cls = type(obj)
    scls = _class_cache.get(cls)
    if scls is None:
        fields = {f[0]: _locked_property(f[0]) for f in cls._fields_}
        scls = _class_cache[cls] = type("Synchronized" + cls.__name__, (SynchronizedBase,), fields)
    return scls(obj, lock, ctx)


_class_cache = weakref.WeakKeyDictionary()
# The stdlib's public helper names, for code that reaches for them.
class_cache = _class_cache


# -- pickling (only while a child is being started) ------------------------------------------


def reduce_ctype(obj):
    _assert_spawning(obj)
    if isinstance(obj, ctypes.Array):
        return rebuild_ctype, (obj._type_, obj._wrapper, obj._length_)
    return rebuild_ctype, (type(obj), obj._wrapper, None)


def rebuild_ctype(type_, wrapper, length):
    """The ctypes object of `type_` (an array of `length` when given) over `wrapper`'s block."""
    if length is not None:
        type_ = type_ * length
    from .reduction import ForkingPickler

    if ForkingPickler._extra_reducers.get(type_) is not reduce_ctype:
        # Registering clears the picklers' dispatch cache: do it once per type.
        ForkingPickler.register(type_, reduce_ctype)
    # Only the wrapper's `create_memoryview` is used, so a stdlib wrapper works here and the
    # stdlib's `rebuild_ctype` works with ours (whichever library's reducer a pickler picks).
    obj = type_.from_buffer(wrapper.create_memoryview())
    # The wrapper keeps the block (and its arena's mapping) alive as long as the object.
    obj._wrapper = wrapper
    return obj


def _assert_spawning(obj):
    from .synchronize import _spawning_popen

    if _spawning_popen() is None:
        context.assert_spawning(obj)


# -- synchronized wrappers --------------------------------------------------------------------


def _locked_property(name):
    """A data descriptor reading and writing ``self._obj.<name>`` under ``self._lock``.

    Native (`_ferroproc.LockedAttr`): a ferroproc lock is taken and released directly, any
    other lock through its ``__enter__``/``__exit__``.
    """
    return _ferroproc.LockedAttr(name)


def make_property(name):
    """A property reading and writing attribute `name` of ``self._obj`` under ``self._lock``
    (the stdlib's helper of the same name)."""
    return _locked_property(name)


class SynchronizedBase:
    """A shared ctypes object plus the lock that guards it."""

    def __init__(self, obj, lock=None, ctx=None):
        self._obj = obj
        if lock:
            self._lock = lock
        else:
            self._lock = (ctx or _default_ctx()).RLock()
        self.acquire = self._lock.acquire
        self.release = self._lock.release

    def __enter__(self):
        return self._lock.__enter__()

    def __exit__(self, *args):
        return self._lock.__exit__(*args)

    def __reduce__(self):
        _assert_spawning(self)
        return synchronized, (self._obj, self._lock)

    def get_obj(self):
        """The wrapped ctypes object (access to it is not locked)."""
        return self._obj

    def get_lock(self):
        """The lock guarding the object."""
        return self._lock

    def __repr__(self):
        return f"<{type(self).__name__} wrapper for {self._obj}>"


def _atomic_target(obj):
    """(chunk, offset, width, signed, type) of a shared ctypes integer, or TypeError."""
    t = type(obj)
    if issubclass(t, _SIGNED):
        signed = True
    elif issubclass(t, _UNSIGNED):
        signed = False
    else:
        raise TypeError(f"atomic operations need a shared integer, not {t.__name__}")
    wrapper = getattr(obj, "_wrapper", None)
    if not isinstance(wrapper, heap.BufferWrapper):
        raise TypeError("atomic operations need an integer allocated by ferroproc")
    chunk, start = wrapper._chunk_offset()
    offset = start + ctypes.addressof(obj) - wrapper._address()
    return chunk, offset, ctypes.sizeof(t), signed, t


class _AtomicOps:
    """Lock-free operations on a shared integer (ferroproc extension).

    Subclasses set ``_atomic`` to the tuple `_atomic_target` returns.
    """

    __slots__ = ()

    def load(self):
        """The current value, read atomically. ferroproc extension."""
        chunk, off, width, signed, _ = self._atomic
        return chunk.load(off, width, signed)

    def store(self, value):
        """Sets the value atomically (OverflowError if it does not fit). ferroproc extension."""
        chunk, off, width, signed, _ = self._atomic
        chunk.swap(off, width, signed, value)

    def exchange(self, value):
        """Sets the value atomically; returns the previous one. ferroproc extension."""
        chunk, off, width, signed, _ = self._atomic
        return chunk.swap(off, width, signed, value)

    def fetch_add(self, delta=1):
        """Adds `delta` atomically, wrapping around like C; returns the previous value.
        ferroproc extension."""
        chunk, off, width, signed, _ = self._atomic
        return chunk.fetch_add(off, width, signed, delta)

    def add(self, delta=1):
        """Adds `delta` atomically, wrapping around like C; returns the new value.
        ferroproc extension."""
        chunk, off, width, signed, t = self._atomic
        # ctypes integers wrap on construction, exactly as the shared addition did.
        return t(chunk.fetch_add(off, width, signed, delta) + delta).value

    def compare_exchange(self, expected, new):
        """Stores `new` if the value equals `expected`, atomically. Returns
        ``(swapped, previous value)``. ferroproc extension."""
        chunk, off, width, signed, _ = self._atomic
        return chunk.compare_exchange(off, width, signed, expected, new)


class Atomic(_AtomicOps):
    """Lock-free operations on a shared integer `RawValue` (or the object inside an integer
    `Value`). ferroproc extension."""

    __slots__ = ("_atomic", "_obj")

    def __init__(self, obj):
        self._atomic = _atomic_target(obj)
        self._obj = obj  # keeps the block alive

    def __repr__(self):
        return f"<{type(self).__name__} of {self._obj}>"


def atomic(obj):
    """`Atomic` operations on the shared integer `obj` (a `RawValue`, or a synchronized
    integer `Value`). ferroproc extension."""
    if isinstance(obj, SynchronizedBase):
        obj = obj.get_obj()
    return Atomic(obj)


class Synchronized(SynchronizedBase, _AtomicOps):
    """A shared simple value with a locked ``value`` property.

    For integer types it also has the lock-free `load`, `store`, `exchange`, `fetch_add`,
    `add` and `compare_exchange` (ferroproc extension; they do not take the lock).
    """

    value = _locked_property("value")

    @property
    def _atomic(self):
        target = self.__dict__.get("_atomic_cache")
        if target is None:
            target = self.__dict__["_atomic_cache"] = _atomic_target(self._obj)
        return target


# Element types whose slices are read through a memoryview (the same floats as ctypes gives,
# faster: no per-item ctypes conversion).
_FAST_SLICE_CODES = {ctypes.c_double: "d", ctypes.c_float: "f"}


class SynchronizedArray(SynchronizedBase):
    """A shared array whose items and slices are read and written under the lock.

    Slices of ``double``/``float`` arrays are read through a memoryview of the array (the same
    values as through ctypes), which makes bulk reads faster.
    """

    def __init__(self, obj, lock=None, ctx=None):
        super().__init__(obj, lock, ctx)
        code = _FAST_SLICE_CODES.get(getattr(obj, "_type_", None))
        self._view = memoryview(obj).cast("B").cast(code) if code else None

    def __len__(self):
        return len(self._obj)

    def __getitem__(self, i):
        with self._lock:
            if self._view is not None and type(i) is slice:
                return self._view[i].tolist()
            return self._obj[i]

    def __setitem__(self, i, value):
        with self._lock:
            self._obj[i] = value

    def __getslice__(self, start, stop):
        return self[start:stop]

    def __setslice__(self, start, stop, values):
        self[start:stop] = values


class SynchronizedString(SynchronizedArray):
    """A shared ``c_char`` array with locked ``value`` and ``raw``."""

    value = _locked_property("value")
    raw = _locked_property("raw")
