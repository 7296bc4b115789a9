"""Named shared memory: `SharedMemory` and `ShareableList`.

Same API as `multiprocessing.shared_memory` (and 3.13's ``track`` keyword), and the same
objects in the kernel: a ferroproc process and a stdlib process can open each other's segments
by name, and a `ShareableList` uses the stdlib's byte layout, so either library can attach
the other's list.

Lifetime, where ferroproc differs from the stdlib's resource tracker: every process that
creates or opens a segment (with ``track=True``, the default) *holds* it until it calls
``unlink()`` or exits. A small tracker process (``ferroproc._shm_tracker``) unlinks a segment
once every process holding it has ended, however it ended (``kill -9`` included), and does so
silently. So a segment is never unlinked while a process that opened it is alive (the
stdlib's tracker unlinks a segment when a process that merely attached it exits), never
reported as "leaked" because another process attached it, and never left in ``/dev/shm``
after all its users are gone. ``close()`` does not give up the hold: closing and reopening by
name keeps working while the process lives. ``track=False`` opts out; the caller then owns
the segment's lifetime entirely.
"""

from __future__ import annotations

import _posixshmem
import _thread
import errno
import mmap
import os
import secrets
import socket
import struct
import sys
import types
from functools import partial

__all__ = ["ShareableList", "SharedMemory"]

_USE_POSIX = True
_O_CREX = os.O_CREAT | os.O_EXCL
_SHM_SAFE_NAME_LENGTH = 14
_SHM_NAME_PREFIX = "/psm_"


# How long a running tracker may take to greet a new client before a new tracker is started.
_GREETING_TIMEOUT = 10.0


def _make_filename():
    """A random name with the stdlib's prefix and length."""
    nbytes = (_SHM_SAFE_NAME_LENGTH - len(_SHM_NAME_PREFIX)) // 2
    return _SHM_NAME_PREFIX + secrets.token_hex(nbytes)


# -- the tracker client -----------------------------------------------------------------------


class _Tracker:
    """This process's connection to the segment tracker (one per process, never inherited)."""

    def __init__(self):
        self._lock = _thread.allocate_lock()
        self._sock = None
        self._held = {}
        self._hooked = False

    def _arm(self):
        # The after-fork reset is registered on first use: until then there is nothing to
        # reset, and every hook is Python code each forked child runs (and pays faults for).
        if not self._hooked:
            # Registered before the flag is set: a thread that sees the flag may take the
            # lock at once. (Two registrations are harmless.)
            os.register_at_fork(after_in_child=self._forget_after_fork)
            self._hooked = True

    def _forget_after_fork(self):
        # The forked child must not speak on (or keep alive) its parent's connection: close
        # only our copy of the descriptor. The parent's holds stay the parent's.
        self._lock = _thread.allocate_lock()
        if self._sock is not None:
            os.close(self._sock.detach())
        self._sock = None
        self._held = {}

    def _start(self, address):
        """Starts the tracker listening on `address`, and returns a connection made before it
        runs (the connection waits in the backlog). Another process may have won the race
        to start one: then this connects to that one."""
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            try:
                listener.bind(address)
            except OSError as e:
                if e.errno != errno.EADDRINUSE:
                    raise
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.connect(address)
                return sock
            listener.listen(128)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(address)
            src = listener.fileno()
            moved = None
            if src == 3:
                # dup2(3, 3) would keep close-on-exec set: hand over a copy instead.
                moved = src = os.dup(src)
            try:
                script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_shm_tracker.py")
                exe = sys._base_executable
                if not os.path.exists(exe):
                    exe = sys.executable
                pid = os.posix_spawn(
                    exe,
                    [exe, "-I", "-S", script],
                    {},
                    file_actions=[
                        (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                        (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
                        (os.POSIX_SPAWN_OPEN, 2, os.devnull, os.O_WRONLY, 0),
                        (os.POSIX_SPAWN_DUP2, src, 3),
                    ],
                    setsid=True,
                )
            finally:
                if moved is not None:
                    os.close(moved)
            # The tracker forks and its first process exits at once: reap that one.
            os.waitpid(pid, 0)
            return sock
        finally:
            listener.close()

    def _connect(self):
        # One tracker per user (abstract socket, so nothing on disk), shared by every
        # process whatever started it: a hold is seen by the one tracker that will unlink.
        address = f"\0ferroproc-shm-tracker-{os.getuid()}"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(address)
            # A running tracker may be closing down (no clients left): only its greeting
            # proves this connection was taken, so no hold sent on it can be lost.
            sock.settimeout(_GREETING_TIMEOUT)
            if sock.recv(1) == b"+":
                sock.settimeout(None)
                return sock
        except OSError:
            pass
        sock.close()
        return self._start(address)

    def _send(self, line):
        for _attempt in range(2):
            if self._sock is None:
                self._sock = self._connect()
                if self._held and line is not None:
                    # A new tracker (the old one died): announce what we hold again.
                    self._sock.sendall(b"".join(_line(b"H", n) for n in self._held))
            try:
                self._sock.sendall(line)
                return
            except OSError:
                self._sock.close()
                self._sock = None
        raise OSError(errno.EPIPE, "cannot reach ferroproc's shared memory tracker")

    # Holds are counted per process (several objects of one process may open one name);
    # the tracker hears only about the first hold and the last release.
    def hold(self, name):
        self._arm()
        with self._lock:
            count = self._held.get(name, 0)
            if count == 0:
                self._send(_line(b"H", name))
            self._held[name] = count + 1

    def release(self, name):
        self._arm()
        with self._lock:
            count = self._held.get(name, 0)
            if count > 1:
                self._held[name] = count - 1
            elif count == 1:
                del self._held[name]
                self._send(_line(b"R", name))

    def unlinked(self, name):
        self._arm()
        with self._lock:
            self._held.pop(name, None)
            self._send(_line(b"U", name))


def _line(verb, name):
    return verb + b" " + name.encode("utf-8").hex().encode("ascii") + b"\n"


_tracker = _Tracker()


# -- SharedMemory -----------------------------------------------------------------------------


class SharedMemory:
    """A named block of shared memory: creates one (``create=True``) or opens an existing one.

    `name` is the block's name without the leading slash (random when None and creating);
    `size` is the size to create (ignored when opening: the block's own size is used).
    ``track=True`` (default) makes this process hold the block until it unlinks it or exits;
    the block is unlinked once no process holds it (see the module documentation).

    Differences: lifetime tracking as described in the module documentation.
    """

    _name = None
    _fd = -1
    _mmap = None
    _buf = None
    _flags = os.O_RDWR
    _mode = 0o600
    _prepend_leading_slash = True
    _track = True

    def __init__(self, name=None, create=False, size=0, *, track=True):
        if not size >= 0:
            raise ValueError("'size' must be a positive integer")
        if create:
            self._flags = _O_CREX | os.O_RDWR
            if size == 0:
                raise ValueError("'size' must be a positive number different from zero")
        if name is None and not self._flags & os.O_EXCL:
            raise ValueError("'name' can only be None if create=True")
        self._track = track
        if name is None:
            while True:
                candidate = _make_filename()
                try:
                    self._open(candidate)
                except FileExistsError:
                    continue
                break
        else:
            self._open("/" + name if self._prepend_leading_slash else name)
        try:
            if create and size:
                os.ftruncate(self._fd, size)
            size = os.fstat(self._fd).st_size
            self._mmap = mmap.mmap(self._fd, size)
        except OSError:
            self.unlink()
            raise
        self._size = size
        self._buf = memoryview(self._mmap)

    def _open(self, name):
        creating = bool(self._flags & os.O_CREAT)
        if self._track and creating:
            # Hold the name before it exists, so a kill between creation and announcement
            # cannot leak it; a failed creation gives the hold back.
            _tracker.hold(name)
        try:
            self._fd = _posixshmem.shm_open(name, self._flags, mode=self._mode)
        except BaseException:
            if self._track and creating:
                _tracker.release(name)
            raise
        self._name = name
        if self._track and not creating:
            _tracker.hold(name)

    def __del__(self):
        try:
            self.close()
        except OSError:
            pass

    def __reduce__(self):
        return (self.__class__, (self.name, False, self.size))

    def __repr__(self):
        return f"{type(self).__name__}({self.name!r}, size={self.size})"

    @property
    def buf(self):
        """A memoryview of the block's bytes."""
        return self._buf

    @property
    def name(self):
        """The block's name (without the leading slash)."""
        reported = self._name
        if self._prepend_leading_slash and reported.startswith("/"):
            reported = reported[1:]
        return reported

    @property
    def size(self):
        """The block's size in bytes."""
        return self._size

    def close(self):
        """Releases this object's view of the block (the block itself stays)."""
        if self._buf is not None:
            self._buf.release()
            self._buf = None
        if self._mmap is not None:
            self._mmap.close()
            self._mmap = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def unlink(self):
        """Removes the block's name, so no further process can open it; the memory goes away
        once every process has closed it. Call it once, from one process."""
        if self._name:
            try:
                _posixshmem.shm_unlink(self._name)
            finally:
                if self._track:
                    _tracker.unlinked(self._name)

    __class_getitem__ = classmethod(types.GenericAlias)


# -- ShareableList ----------------------------------------------------------------------------

_encoding = "utf8"
# Byte layout (the stdlib's, so both libraries read each other's lists):
#   q                 number of items N
#   (N + 1) x q       start of each item in the data area, then the data area's length
#   data area         item i packed with its format at its start
#   N x 8s            each item's struct format, NUL-padded
#   N x b             each item's kind: 0 number/bool, 1 str, 2 bytes, 3 None
_FORMAT_OF = {int: "q", float: "d", bool: "xxxxxxx?", type(None): "xxxxxx?x"}
_KIND_NUMBER, _KIND_STR, _KIND_BYTES, _KIND_NONE = range(4)
_SLOT = 8


def _kind_of(value):
    if isinstance(value, str):
        return _KIND_STR
    if isinstance(value, bytes):
        return _KIND_BYTES
    if value is None:
        return _KIND_NONE
    return _KIND_NUMBER


def _decode(kind, raw):
    if kind == _KIND_STR:
        return raw.rstrip(b"\x00").decode(_encoding)
    if kind == _KIND_BYTES:
        return raw.rstrip(b"\x00")
    if kind == _KIND_NONE:
        return None
    return raw


class ShareableList:
    """A fixed-length list of int, float, bool, str, bytes and None in a `SharedMemory` block.

    ``ShareableList(sequence)`` creates a block holding `sequence` (named `name` when given);
    ``ShareableList(name=...)`` attaches to an existing list, made by ferroproc or the stdlib.
    Items can be replaced but the length is fixed; a str or bytes item may be replaced by one
    that fits in the space first reserved for that position.
    """

    def __init__(self, sequence=None, *, name=None):
        if name is None or sequence is not None:
            items = list(sequence or ())
            formats = []
            sizes = []
            for item in items:
                if isinstance(item, (str, bytes)) and type(item) in (str, bytes):
                    raw = item.encode(_encoding) if isinstance(item, str) else item
                    # The stdlib sizes a str by its characters; so do we (same layout), but
                    # never below what its UTF-8 needs (the stdlib would truncate it).
                    room = _SLOT * (len(item) // _SLOT + 1)
                    if len(raw) > room:
                        room = _SLOT * (len(raw) // _SLOT + 1)
                    formats.append(f"{room}s")
                    sizes.append(room)
                else:
                    formats.append(_FORMAT_OF[type(item)])
                    sizes.append(_SLOT)
            starts = [0]
            for size in sizes:
                starts.append(starts[-1] + size)
            n = len(items)
            total = 8 + 8 * (n + 1) + starts[-1] + 8 * n + n
            self.shm = SharedMemory(name, create=True, size=total)
            self._list_len = n
            self._allocated_offsets = starts
            buf = self.shm.buf
            struct.pack_into(f"{n + 2}q", buf, 0, n, *starts)
            for i, (fmt, item) in enumerate(zip(formats, items, strict=True)):
                self._write(i, fmt, item)
        else:
            self.shm = SharedMemory(name)
            n = struct.unpack_from("q", self.shm.buf, 0)[0]
            self._list_len = n
            self._allocated_offsets = list(struct.unpack_from(f"{n + 1}q", self.shm.buf, 8))

    # -- layout ----------------------------------------------------------------------------
    @property
    def _offset_data_start(self):
        return 8 * (self._list_len + 2)

    @property
    def _offset_packing_formats(self):
        return self._offset_data_start + self._allocated_offsets[-1]

    @property
    def _offset_back_transform_codes(self):
        return self._offset_packing_formats + 8 * self._list_len

    def _position(self, position):
        if position < 0:
            position += self._list_len
        if not 0 <= position < self._list_len:
            raise IndexError(position)
        return position

    def _get_packing_format(self, position):
        raw = struct.unpack_from("8s", self.shm.buf, self._offset_packing_formats + 8 * position)[0]
        return raw.rstrip(b"\x00").decode(_encoding)

    def _write(self, position, fmt, value):
        buf = self.shm.buf
        struct.pack_into("8s", buf, self._offset_packing_formats + 8 * position, fmt.encode())
        struct.pack_into("b", buf, self._offset_back_transform_codes + position, _kind_of(value))
        if isinstance(value, str):
            value = value.encode(_encoding)
        struct.pack_into(
            fmt, buf, self._offset_data_start + self._allocated_offsets[position], value
        )

    # -- list protocol -----------------------------------------------------------------------
    def __getitem__(self, position):
        try:
            position = self._position(position)
        except IndexError:
            raise IndexError("index out of range") from None
        buf = self.shm.buf
        (raw,) = struct.unpack_from(
            self._get_packing_format(position),
            buf,
            self._offset_data_start + self._allocated_offsets[position],
        )
        kind = struct.unpack_from("b", buf, self._offset_back_transform_codes + position)[0]
        return _decode(kind, raw)

    def __setitem__(self, position, value):
        try:
            position = self._position(position)
        except IndexError:
            raise IndexError("assignment index out of range") from None
        if isinstance(value, (str, bytes)):
            room = self._allocated_offsets[position + 1] - self._allocated_offsets[position]
            raw = value.encode(_encoding) if isinstance(value, str) else value
            if len(raw) > room:
                raise ValueError("bytes/str item exceeds available storage")
            current = self._get_packing_format(position)
            fmt = current if current.endswith("s") else f"{room}s"
        else:
            fmt = _FORMAT_OF[type(value)]
        self._write(position, fmt, value)

    def __reduce__(self):
        return partial(self.__class__, name=self.shm.name), ()

    def __len__(self):
        return struct.unpack_from("q", self.shm.buf, 0)[0]

    def __repr__(self):
        return f"{type(self).__name__}({list(self)}, name={self.shm.name!r})"

    @property
    def format(self):
        """The struct formats of all items, concatenated."""
        return "".join(self._get_packing_format(i) for i in range(self._list_len))

    def count(self, value):
        """How many items equal `value`."""
        return sum(value == item for item in self)

    def index(self, value):
        """The position of the first item equal to `value` (ValueError if none)."""
        for position, item in enumerate(self):
            if value == item:
                return position
        raise ValueError(f"{value!r} not in this container")

    __class_getitem__ = classmethod(types.GenericAlias)
