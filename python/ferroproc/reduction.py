"""Pickling for inter-process use: `ForkingPickler`, fd passing, `DupFd`.

`ForkingPickler` honours `copyreg` and its own `register`ed reducers (and the stdlib's
`multiprocessing.reduction.ForkingPickler` registrations when that module is loaded, so stdlib
objects such as its `Connection` pickle into ferroproc children). Unlike the stdlib, the merged
dispatch table is cached and rebuilt only when one of its sources changes.
"""

# The C pickler itself: `pickle.py` would pull in `re` and friends, which a spawned child's
# start-up should not pay for.
import _pickle
import copyreg
import io
import sys

from . import context

__all__ = ["DupFd", "ForkingPickler", "dump", "recv_handle", "register", "send_handle"]

HAVE_SEND_HANDLE = True
# Our send_handle waits for no acknowledgement on Linux, like the stdlib's.
ACKNOWLEDGE = False


class ForkingPickler(_pickle.Pickler):
    """A pickler that also knows the reducers registered with `register`."""

    _extra_reducers: dict = {}  # noqa: RUF012 - the shared registry `register` fills
    _copyreg_dispatch_table = copyreg.dispatch_table

    def __init__(self, *args):
        super().__init__(*args)
        self.dispatch_table = _dispatch_table(type(self))

    @classmethod
    def register(cls, type, reduce):
        """Registers `reduce(obj)` as the way to pickle objects of `type`."""
        cls._extra_reducers[type] = reduce
        _cache.clear()

    @classmethod
    def dumps(cls, obj, protocol=None):
        buf = io.BytesIO()
        cls(buf, protocol).dump(obj)
        return buf.getbuffer()

    loads = staticmethod(_pickle.loads)


class _BufferPickler(ForkingPickler):
    """`ForkingPickler` at protocol 5 with a ``buffer_callback``: the queues' pickler (see
    src/py/queues/pickling.rs) and the pool's (`ferroproc._poolworker.dumps_with_buffers`)."""

    def __init__(self, file, buffer_callback):
        _pickle.Pickler.__init__(self, file, 5, buffer_callback=buffer_callback)
        self.dispatch_table = _dispatch_table(ForkingPickler)


# cls -> (copyreg snapshot, stdlib extras snapshot, merged table)
_cache: dict = {}


def _stdlib_extras():
    std = context.process._stdlib_module("reduction")
    if std is None:
        return None
    return getattr(std.ForkingPickler, "_extra_reducers", None)


def _dispatch_table(cls):
    if not _socket_registered and "socket" in sys.modules:
        _register_socket()
    copyreg_table = cls._copyreg_dispatch_table
    std = _stdlib_extras()
    hit = _cache.get(cls)
    if hit is not None and hit[0] == copyreg_table and hit[1] == std:
        return hit[2]
    merged = dict(copyreg_table)
    if std:
        merged.update(std)
    merged.update(cls._extra_reducers)
    _cache[cls] = (dict(copyreg_table), dict(std) if std else std, merged)
    return merged


register = ForkingPickler.register


def dump(obj, file, protocol=None):
    """Pickles `obj` to `file` with `ForkingPickler`."""
    ForkingPickler(file, protocol).dump(obj)


def sendfds(sock, fds):
    """Sends the descriptors `fds` over the unix socket `sock` (stdlib wire format)."""
    import array
    import socket

    fds = array.array("i", fds)
    sock.sendmsg([bytes([len(fds) % 256])], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
    if ACKNOWLEDGE and sock.recv(1) != b"A":
        raise RuntimeError("did not receive acknowledgement of fd")


def recvfds(sock, size):
    """Receives up to `size` descriptors sent with `sendfds`."""
    import array
    import socket

    fds = array.array("i")
    msg, ancdata, _flags, _addr = sock.recvmsg(1, socket.CMSG_SPACE(fds.itemsize * size))
    if not msg and not ancdata:
        raise EOFError
    try:
        if ACKNOWLEDGE:
            sock.send(b"A")
        if len(ancdata) != 1:
            raise RuntimeError(f"received {len(ancdata)} items of ancdata")
        level, kind, data = ancdata[0]
        if level != socket.SOL_SOCKET or kind != socket.SCM_RIGHTS:
            raise RuntimeError("unexpected ancillary data")
        if len(data) % fds.itemsize:
            raise ValueError("ancillary data is not a whole number of descriptors")
        fds.frombytes(data)
        if len(fds) % 256 != msg[0]:
            raise AssertionError(f"Len is {len(fds)} but msg[0] is {msg[0]!r}")
        return list(fds)
    except (ValueError, IndexError):
        pass
    raise RuntimeError("Invalid data received")


def send_handle(conn, handle, destination_pid):
    """Sends the descriptor `handle` over the connection `conn` (a unix socket)."""
    import socket

    with socket.fromfd(conn.fileno(), socket.AF_UNIX, socket.SOCK_STREAM) as s:
        sendfds(s, [handle])


def recv_handle(conn):
    """Receives a descriptor sent with `send_handle`."""
    import socket

    with socket.fromfd(conn.fileno(), socket.AF_UNIX, socket.SOCK_STREAM) as s:
        return recvfds(s, 1)[0]


def DupFd(fd):
    """A picklable handle for `fd` that yields a duplicate descriptor in the receiving process.

    While a process is being started, the descriptor is handed to that child directly;
    otherwise a resource sharer serves it on request.
    """
    popen_obj = context.get_spawning_popen()
    if popen_obj is None:
        # A stdlib process being started (a ferroproc object in its arguments): hand the
        # descriptor to that child directly, as the stdlib would.
        std_context = context.process._stdlib_module("context")
        if std_context is not None:
            popen_obj = std_context.get_spawning_popen()
    if popen_obj is not None:
        return popen_obj.DupFd(popen_obj.duplicate_for_child(fd))
    from . import resource_sharer

    return resource_sharer.DupFd(fd)


def _reduce_method(m):
    if m.__self__ is None:
        return getattr, (m.__class__, m.__func__.__name__)
    return getattr, (m.__self__, m.__func__.__name__)


class _C:
    def f(self):
        pass


register(type(_C().f), _reduce_method)


def _reduce_method_descriptor(m):
    return getattr, (m.__objclass__, m.__name__)


register(type(list.append), _reduce_method_descriptor)
register(type(int.__add__), _reduce_method_descriptor)


def _reduce_socket(s):
    df = DupFd(s.fileno())
    return _rebuild_socket, (df, s.family, s.type, s.proto)


def _rebuild_socket(df, family, type, proto):
    import socket

    return socket.socket(family, type, proto, fileno=df.detach())


# Sockets can only exist once `socket` is imported; registering then keeps `socket` out of
# the start-up path of spawned children.
_socket_registered = False


def _register_socket():
    global _socket_registered
    import socket

    _socket_registered = True
    register(socket.socket, _reduce_socket)


class AbstractReducer:
    """Base for alternative reduction modules assigned to `context.reducer`."""

    ForkingPickler = ForkingPickler
    register = register
    dump = dump
    send_handle = send_handle
    recv_handle = recv_handle
    sendfds = sendfds
    recvfds = recvfds
    DupFd = DupFd
    _reduce_method = _reduce_method
    _reduce_method_descriptor = _reduce_method_descriptor
    _rebuild_socket = _rebuild_socket
    _reduce_socket = _reduce_socket

    def __init__(self, *args):
        register(type(_C().f), _reduce_method)
        register(type(list.append), _reduce_method_descriptor)
        register(type(int.__add__), _reduce_method_descriptor)
        _register_socket()
