"""Managers: a server process owns Python objects, other processes use them through proxies.

`SyncManager` (what `ferroproc.Manager()` starts) serves dicts, lists, namespaces, queues,
locks and the rest; `BaseManager.register` adds types of your own. A proxy forwards each method
call to the server over a `Connection` and returns a copy of the result.

The wire protocol is the stdlib's, message for message: a request is the tuple
``(object_id, method_name, args, kwds)`` and a reply ``(kind, payload)`` with kind one of
``#RETURN``, ``#ERROR`` (an exception raised by the method), ``#TRACEBACK`` (a failure of the
server itself, as formatted text), ``#PROXY`` (the method's result is itself managed) and
``#UNSERIALIZABLE``. Control requests (create, incref, decref, ...) arrive on short-lived
authenticated connections; method calls on one long-lived connection per client thread. A
ferroproc client therefore works with a stdlib manager server and the other way round.

What is ferroproc's own: the connections are native (Rust framing, GIL-free waits, builtin data
pickled on a fast path), the server's per-client request loop runs in Rust over them
(`Server.serve_client`; Python only unpickles, calls the method and pickles, plus the uncommon
replies), the per-call paths on both sides are kept short, a server thread serves the
connection it accepted itself (no thread start per connection), and the server process
watches its owner, so it goes away when the owner ends even without a shutdown.

Differences:
    * A manager started with `start()` stops when the process that started it ends, also when
      that process is killed (the stdlib's server outlives it). `shutdown()` reaches the server
      over a private pipe instead of a new authenticated connection.
    * A server given no address listens on a Linux abstract-namespace socket, not on a file
      in a temporary directory (nothing to clean up after a crash; stdlib clients connect to
      it all the same).
    * A proxy in another process than its manager's (a child's copy) can still receive
      proxies as results (`iter()` of a managed dict); the stdlib's raises `AttributeError`.
"""

from __future__ import annotations

import _signal
import _thread
import array
import os
import pickle
import sys
import threading
import time
import types

from . import _ferroproc, connection, process, reduction, util
from .context import get_spawning_popen

__all__ = ["BaseManager", "BaseProxy", "SharedMemoryManager", "SyncManager", "Token"]

# Reply kinds of the protocol.
_RETURN = "#RETURN"
_ERROR = "#ERROR"
_TRACEBACK = "#TRACEBACK"
_PROXY = "#PROXY"
_UNSERIALIZABLE = "#UNSERIALIZABLE"
_GETVALUE = "#GETVALUE"

# What the server's control pipe carries from the manager that started it.
_STOP = b"stop"


# Objects commonly returned by managed containers travel as their plain equivalents.


def _reduce_array(a):
    return array.array, (a.typecode, a.tobytes())


def _rebuild_view_as_list(view):
    return list, (list(view),)


reduction.register(array.array, _reduce_array)
for _view in (type({}.keys()), type({}.values()), type({}.items())):
    reduction.register(_view, _rebuild_view_as_list)
del _view


def _format_exc():
    import traceback  # lazily: only failures need it

    return traceback.format_exc()


def _format_error(exc):
    """`_format_exc()` of `exc` raised here: a traceback that has at least this frame, also
    for an exception raised by native code (which carries none)."""
    try:
        raise exc
    except BaseException:
        return _format_exc()
    finally:
        del exc  # its traceback holds this frame: no reference cycle through it


class Token:
    """Names one shared object: its type id, the address of its server and its id there."""

    __slots__ = ("address", "id", "typeid")

    def __init__(self, typeid, address, id):
        self.typeid = typeid
        self.address = address
        self.id = id

    def __getstate__(self):
        return (self.typeid, self.address, self.id)

    def __setstate__(self, state):
        self.typeid, self.address, self.id = state

    def __repr__(self):
        return (
            f"{type(self).__name__}(typeid={self.typeid!r}, address={self.address!r},"
            f" id={self.id!r})"
        )


class RemoteError(Exception):
    """The server failed to carry out a request; the message is its traceback."""

    def __str__(self):
        rule = "-" * 75
        return f"\n{rule}\n{self.args[0]}{rule}"


def dispatch(c, id, methodname, args=(), kwds={}):  # noqa: B006 - stdlib signature
    """Sends one request on `c` and returns the result, or raises what the server reported."""
    c.send((id, methodname, args, kwds))
    kind, result = c.recv()
    if kind == _RETURN:
        return result
    raise convert_to_error(kind, result)


def convert_to_error(kind, result):
    """The exception to raise for a reply of `kind` that is not a plain return."""
    if kind == _ERROR:
        return result
    if kind in (_TRACEBACK, _UNSERIALIZABLE):
        if not isinstance(result, str):
            raise TypeError(f"Result {result!r} (kind '{kind}') type is {type(result)}, not str")
        if kind == _UNSERIALIZABLE:
            return RemoteError(f"Unserializable message: {result}\n")
        return RemoteError(result)
    return ValueError(f"Unrecognized message type {kind!r}")


def all_methods(obj):
    """Names of the callable attributes of `obj`."""
    return [name for name in dir(obj) if callable(getattr(obj, name))]


def public_methods(obj):
    """Names of the callable attributes of `obj` that do not start with an underscore."""
    return [name for name in all_methods(obj) if name[0] != "_"]


# ---------------------------------------------------------------------------------------------
# The server
# ---------------------------------------------------------------------------------------------


#: Listening sockets a fork child inherited from `BaseManager.start()`, by address: its
#: `Server` takes the one for its address instead of binding it again.
_prebound: dict = {}


def _abstract_address():
    """A fresh Linux abstract-namespace Unix socket name for a server with no given address.

    Nothing to create or remove on the filesystem (so nothing is left behind by a killed
    server), and no `tempfile` import in the server process: that import alone costs several
    milliseconds of a manager's start.
    """
    return f"\0ferroproc-manager-{os.getpid()}-{os.urandom(8).hex()}"


class Server:
    """Holds the shared objects and answers requests; runs in the manager's process."""

    public = [  # noqa: RUF012 - subclasses extend it, as with the stdlib's
        "shutdown",
        "create",
        "accept_connection",
        "get_methods",
        "debug_info",
        "number_of_objects",
        "dummy",
        "incref",
        "decref",
    ]

    def __init__(self, registry, address, authkey, serializer):
        if not isinstance(authkey, bytes):
            raise TypeError(f"Authkey {authkey!r} is type {type(authkey)!s}, not bytes")
        self.registry = registry
        self.authkey = process.AuthenticationString(authkey)
        listener_type = listener_client[serializer][0]
        if address is None and util.abstract_sockets_supported:
            address = _abstract_address()
        # Clients authenticate on their own thread, so a slow one cannot stall accept().
        self.listener = _prebound.pop(address, None)
        if self.listener is None:
            self.listener = listener_type(address=address, backlog=16)
        self.address = self.listener.address
        # id -> (object, exposed method names, method_to_typeid or None)
        self.id_to_obj = {"0": (None, ())}
        self.id_to_refcount = {}
        # Objects only referenced by proxies that live inside this server (nested proxies).
        self.id_to_local_proxy_obj = {}
        self.mutex = threading.Lock()
        self.stop_event = threading.Event()
        self._accept_turn = threading.Lock()
        self._idle_lock = threading.Lock()
        self._waiting_for_turn = 0

    # -- running -------------------------------------------------------------------------

    def serve_forever(self):
        """Accepts and serves clients until `shutdown` is requested, then exits the process."""
        stop = self.stop_event
        process.current_process()._manager_server = self
        try:
            control = getattr(self, "_owner_control", None)
            listening = _listening_socket(self.listener) if control is not None else None
            if listening is None:
                # Not `threading.Thread.start()`, which waits for the new thread to run.
                _thread.start_new_thread(self.accepter, ())
            try:
                if control is not None:
                    _watch_owner(self, control, listening)
                while not stop.is_set():
                    stop.wait(1.0)
            except (KeyboardInterrupt, SystemExit):
                pass
        finally:
            # Refused from now on, not accepted and then reset by the exit: the owner's
            # `shutdown()` returns once this process reports its exit, before the kernel has
            # closed the socket.
            stop.set()  # accepting threads woken by the shutdown below then end
            listening = _listening_socket(self.listener)
            if listening is not None:
                import socket

                try:
                    listening.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            if sys.stdout != sys.__stdout__:
                util.debug("resetting stdout, stderr")
                sys.stdout = sys.__stdout__
                sys.stderr = sys.__stderr__
            sys.exit(0)

    def accepter(self):
        """Accepts connections and serves each on the thread that accepted it.

        Threads take turns at `accept()`: the one that gets a connection passes the turn to a
        thread waiting for it (or starts one when none waits) and then serves the connection
        itself, so no request waits for a thread to be created or woken. Threads whose
        connection ended queue up for the turn again instead of exiting.
        """
        stop = self.stop_event
        turn = self._accept_turn
        counts = self._idle_lock
        while not stop.is_set():
            with counts:
                self._waiting_for_turn += 1
            turn.acquire()
            with counts:
                self._waiting_for_turn -= 1
            try:
                c = self.listener.accept()
            except OSError:
                turn.release()
                if self.listener._listener is None:  # closed: nothing more will come
                    return
                continue
            except BaseException:
                turn.release()
                raise
            with counts:
                follower = self._waiting_for_turn > 0
            turn.release()
            if not follower:
                # Not `threading.Thread.start()`, which waits for the new thread to run.
                _thread.start_new_thread(self.accepter, ())
            self.handle_request(c)

    def handle_request(self, conn):
        """Authenticates a new connection and runs its one request."""
        try:
            self._handle_request(conn)
        except SystemExit:
            pass
        finally:
            conn.close()

    def _handle_request(self, c):
        request = None
        try:
            connection.deliver_challenge(c, self.authkey)
            connection.answer_challenge(c, self.authkey)
            try:
                request = c.recv()
            except EOFError:
                return  # authenticated, then closed: nobody to answer
            _, funcname, args, kwds = request
            if funcname not in self.public:
                raise AssertionError(f"{funcname!r} unrecognized")
            func = getattr(self, funcname)
        except Exception:
            reply = (_TRACEBACK, _format_exc())
        else:
            try:
                reply = (_RETURN, func(c, *args, **kwds))
            except Exception:
                reply = (_TRACEBACK, _format_exc())
        try:
            c.send(reply)
        except Exception as e:
            try:
                c.send((_TRACEBACK, _format_exc()))
            except Exception:
                pass
            util.info("Failure to send message: %r", reply)
            util.info(" ... request was %r", request)
            util.info(" ... exception was %r", e)

    def serve_client(self, conn):
        """Answers method calls arriving on `conn` until the client goes away.

        On ferroproc's own `Connection` the loop is native (``_ferroproc.serve_manager_client``):
        frames are read and written in Rust, and Python runs only to unpickle, to call the
        method, to pickle, and for the uncommon cases, which the helpers below answer. Any
        other connection (the ``xmlrpclib`` serializer's wrapper) is served by
        `_serve_client_py`, which takes the same steps through the same helpers.
        """
        util.debug("starting server thread to service %r", threading.current_thread().name)
        if type(conn) is connection.Connection and type(self.id_to_obj) is dict:
            _ferroproc.serve_manager_client(self, conn, self.id_to_obj, self.stop_event)
        else:
            self._serve_client_py(conn)

    def _serve_client_py(self, conn):
        """`serve_client` over a connection that is not ferroproc's native one."""
        recv = conn.recv
        send = conn.send
        stop = self.stop_event
        while not stop.is_set():
            try:
                request = recv()
            except (EOFError, OSError):
                self._client_gone()
                return
            except Exception:
                reply = (_TRACEBACK, _format_exc())
            else:
                reply = self._reply(conn, request)
            try:
                send(reply)
            except Exception as e:
                if not self._send_unserializable(conn, reply, e):
                    return

    # The steps of one method call. The native loop takes the common path itself (an exact
    # `(ident, methodname, args, kwds)` tuple naming an object of `id_to_obj` and one of its
    # exposed methods) and calls these for everything else.

    def _reply(self, conn, request):
        """The reply to the method call `request`, from unpacking it to the result."""
        ident = methodname = obj = args = kwds = None
        try:
            ident, methodname, args, kwds = request
            try:
                obj, exposed, gettypeid = self.id_to_obj[ident]
            except KeyError:
                try:
                    obj, exposed, gettypeid = self.id_to_local_proxy_obj[ident]
                except KeyError:
                    raise KeyError(ident) from None
            if methodname not in exposed:
                raise AttributeError(
                    f"method {methodname!r} of {type(obj)!r} object is not in exposed={exposed!r}"
                )
            function = getattr(obj, methodname)
        except AttributeError:
            return self._fallback_reply(conn, ident, obj, methodname, args, kwds)
        except Exception:
            return (_TRACEBACK, _format_exc())
        try:
            res = function(*args, **kwds)
        except Exception as e:
            return (_ERROR, e)
        return self._result_reply(conn, ident, obj, methodname, args, kwds, gettypeid, res)

    def _getattr_failed(self, conn, ident, obj, methodname, args, kwds, exc):  # noqa: PLR0917
        """The reply when looking up the exposed method `methodname` raised `exc`."""
        try:
            raise exc
        except AttributeError:
            return self._fallback_reply(conn, ident, obj, methodname, args, kwds)
        except Exception:
            return (_TRACEBACK, _format_exc())
        finally:
            del exc  # its traceback holds this frame: no reference cycle through it

    def _result_reply(self, conn, ident, obj, methodname, args, kwds, gettypeid, res):  # noqa: PLR0917
        """The reply carrying `res`, the result of `methodname`: a proxy of a new shared object
        when `gettypeid` (the object's `method_to_typeid`) maps the method to a type id."""
        try:
            typeid = gettypeid and gettypeid.get(methodname)
            if typeid:
                rident, rexposed = self.create(conn, typeid, res)
                return (_PROXY, (rexposed, Token(typeid, self.address, rident)))
        except AttributeError:
            return self._fallback_reply(conn, ident, obj, methodname, args, kwds)
        except Exception:
            return (_TRACEBACK, _format_exc())
        return (_RETURN, res)

    def _fallback_reply(self, conn, ident, obj, methodname, args, kwds):  # noqa: PLR0917
        """The reply when an `AttributeError` (being handled) stopped a call: the stand-ins of
        `fallback_mapping` answer ``__str__``, ``__repr__`` and ``#GETVALUE``; anything else
        gets the traceback."""
        fallback = self.fallback_mapping.get(methodname) if methodname else None
        if fallback is None:
            return (_TRACEBACK, _format_exc())
        try:
            return (_RETURN, fallback(self, conn, ident, obj, *args, **kwds))
        except Exception:
            return (_TRACEBACK, _format_exc())

    def _traceback_reply(self, exc):
        """The reply when a request could not be received (unpickled) because of `exc`."""
        return (_TRACEBACK, _format_error(exc))

    def _send_unserializable(self, conn, reply, exc):
        """After `reply` could not be sent because of `exc`, tells the client why. Returns
        False (the connection closed, its loop to end) when that cannot be sent either."""
        try:
            conn.send((_UNSERIALIZABLE, _format_error(exc)))
        except Exception as e:
            util.info("exception in thread serving %r", threading.current_thread().name)
            util.info(" ... message was %r", reply)
            util.info(" ... exception was %r", e)
            conn.close()
            return False
        return True

    def _client_gone(self):
        util.debug("client of %r went away", threading.current_thread().name)

    def fallback_getvalue(self, conn, ident, obj):
        return obj

    def fallback_str(self, conn, ident, obj):
        return str(obj)

    def fallback_repr(self, conn, ident, obj):
        return repr(obj)

    fallback_mapping = {  # noqa: RUF012 - a fixed table, shared by design
        "__str__": fallback_str,
        "__repr__": fallback_repr,
        _GETVALUE: fallback_getvalue,
    }

    # -- public requests -----------------------------------------------------------------

    def dummy(self, c):
        """Does nothing (used to check that the server answers)."""

    def debug_info(self, c):
        """One line per live object with its reference count (for leak hunting)."""
        with self.mutex:
            lines = []
            for ident in sorted(self.id_to_refcount):
                if ident != "0":
                    text = str(self.id_to_obj[ident][0])[:75]
                    lines.append(
                        f"  {ident}:       refcount={self.id_to_refcount[ident]}\n    {text}"
                    )
            return "\n".join(lines)

    def number_of_objects(self, c):
        """How many shared objects are referenced from outside the server."""
        return len(self.id_to_refcount)

    def shutdown(self, c):
        """Answers, then makes `serve_forever` return."""
        try:
            util.debug("manager received shutdown message")
            c.send((_RETURN, None))
        except Exception:
            import traceback

            traceback.print_exc()
        finally:
            self.stop_event.set()

    def create(self, c, typeid, /, *args, **kwds):
        """Makes a new shared object of `typeid`; returns its id and exposed method names."""
        with self.mutex:
            factory, exposed, method_to_typeid, _proxytype = self.registry[typeid]
            if factory is None:
                if kwds or len(args) != 1:
                    raise ValueError("Without callable, must have one non-keyword argument")
                obj = args[0]
            else:
                obj = factory(*args, **kwds)
            if exposed is None:
                exposed = public_methods(obj)
            if method_to_typeid is not None:
                if not isinstance(method_to_typeid, dict):
                    raise TypeError(
                        f"Method_to_typeid {method_to_typeid!r}: type"
                        f" {type(method_to_typeid)!s}, not dict"
                    )
                exposed = list(exposed) + list(method_to_typeid)
            # A string, because xmlrpc integers are 32-bit.
            ident = f"{id(obj):x}"
            util.debug("%r callable returned object with id %r", typeid, ident)
            self.id_to_obj[ident] = (obj, set(exposed), method_to_typeid)
            self.id_to_refcount.setdefault(ident, 0)
        self.incref(c, ident)
        return ident, tuple(exposed)

    def get_methods(self, c, token):
        """The exposed method names of the object `token` names."""
        return tuple(self.id_to_obj[token.id][1])

    def accept_connection(self, c, name):
        """Turns this connection into a long-lived one for method calls."""
        threading.current_thread().name = name
        c.send((_RETURN, None))
        self.serve_client(c)

    def incref(self, c, ident):
        with self.mutex:
            try:
                self.id_to_refcount[ident] += 1
            except KeyError:
                # Only a proxy inside the server still held it; an outside reference is
                # being made from that one, so the object is tracked again.
                if ident not in self.id_to_local_proxy_obj:
                    raise
                self.id_to_refcount[ident] = 1
                self.id_to_obj[ident] = self.id_to_local_proxy_obj[ident]
                util.debug("Server re-enabled tracking & INCREF %r", ident)

    def decref(self, c, ident):
        if ident not in self.id_to_refcount and ident in self.id_to_local_proxy_obj:
            util.debug("Server DECREF skipping %r", ident)
            return
        with self.mutex:
            count = self.id_to_refcount[ident]
            if count <= 0:
                raise AssertionError(
                    f"Id {ident!s} ({self.id_to_obj[ident]!r}) has refcount {count:n}, not 1+"
                )
            if count == 1:
                del self.id_to_refcount[ident]
            else:
                self.id_to_refcount[ident] = count - 1
                return
        # Dropped in two steps, outside the mutex: the object may hold proxies of other
        # objects of this server, whose own decref needs the mutex.
        self.id_to_obj[ident] = (None, (), None)
        util.debug("disposing of obj with id %r", ident)
        with self.mutex:
            del self.id_to_obj[ident]


class State:
    """Where a manager is in its life: INITIAL, STARTED or SHUTDOWN."""

    __slots__ = ["value"]
    INITIAL = 0
    STARTED = 1
    SHUTDOWN = 2


listener_client = {
    "pickle": (connection.Listener, connection.Client),
    "xmlrpclib": (connection.XmlListener, connection.XmlClient),
}


class _WakingEvent(threading.Event):
    """An Event whose `set()` also makes a descriptor readable, for a native wait to see."""

    def __init__(self):
        super().__init__()
        self._wake_r, self._wake_w = os.pipe()

    def set(self):
        super().set()
        try:
            os.write(self._wake_w, b"\0")
        except OSError:
            pass


def _listening_socket(listener):
    """The socket `listener` accepts on, or None when it has no such socket."""
    inner = getattr(listener, "_listener", None)
    return getattr(inner, "_socket", None)


def _watch_owner(server, control, listening=None):
    """Waits until `server` is told to stop, its owner asks to over `control`, closes it, or
    ends; the server then stops. Runs on the server's main thread.

    With `listening` (the server's listening socket), the thread that accepts clients is only
    started once the first client knocks: a manager that is stopped without ever being used
    (or before its first client) never pays for creating a thread, which sat between the
    server reporting its address and it watching its owner."""
    watched = [control]
    if listening is not None:
        watched.append(listening)
    stop = server.stop_event
    wake = getattr(stop, "_wake_r", None)
    if wake is not None:
        watched.append(wake)
    parent = process.parent_process()
    if parent is not None and parent.sentinel is not None:
        watched.append(parent.sentinel)
    while not stop.is_set():
        ready = connection.wait(watched, timeout=1.0)
        if not ready or stop.is_set():
            continue
        if listening is not None and listening in ready:
            # Not `threading.Thread.start()`, which waits for the new thread to run.
            _thread.start_new_thread(server.accepter, ())
            watched.remove(listening)
            ready.remove(listening)
            listening = None
            if not ready:
                continue
        if control in ready:
            try:
                control.recv_bytes()
            except (EOFError, OSError):
                pass
        # A stop request, the owner closing its end, or the owner gone: all mean stop.
        util.info("manager stopping: asked by or lost its owner")
        server.stop_event.set()
        return


# ---------------------------------------------------------------------------------------------
# Managers
# ---------------------------------------------------------------------------------------------


def _process_error(msg):
    from . import context

    return context.ProcessError(msg)


class BaseManager:
    """Starts or connects to a manager server and creates shared objects in it."""

    _registry = {}  # noqa: RUF012 - `register` copies it per subclass
    _Server = Server

    def __init__(
        self, address=None, authkey=None, serializer="pickle", ctx=None, *, shutdown_timeout=1.0
    ):
        if authkey is None:
            authkey = process.current_process().authkey
        self._address = address
        self._authkey = process.AuthenticationString(authkey)
        self._state = State()
        self._state.value = State.INITIAL
        self._serializer = serializer
        self._Listener, self._Client = listener_client[serializer]
        if ctx is None:
            from . import context

            ctx = context._default_context.get_context()
        self._ctx = ctx
        self._shutdown_timeout = shutdown_timeout
        self._process = None

    def _check_initial(self, what="server"):
        value = self._state.value
        if value == State.INITIAL:
            return
        if value == State.STARTED:
            raise _process_error(f"Already started {what}")
        if value == State.SHUTDOWN:
            raise _process_error("Manager has shut down")
        raise _process_error(f"Unknown state {value!r}")

    def get_server(self):
        """A `Server` for this manager's address and registry, to run with `serve_forever()`."""
        self._check_initial()
        return self._Server(self._registry, self._address, self._authkey, self._serializer)

    def connect(self):
        """Attaches to a server that is already running at `address`."""
        conn = self._Client(self._address, authkey=self._authkey)
        try:
            dispatch(conn, None, "dummy")
        finally:
            conn.close()
        self._state.value = State.STARTED

    def start(self, initializer=None, initargs=()):
        """Starts the server in a new process; `initializer(*initargs)` runs there first."""
        self._check_initial()
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        # The server reports its address on this pipe, then keeps its end to learn when to stop.
        ours, theirs = connection.Pipe(duplex=True)
        listener = self._prebind(initializer)
        address = self._address if listener is None else listener.address
        self._process = self._ctx.Process(
            target=type(self)._run_server,
            args=(
                self._registry,
                address,
                self._authkey,
                self._serializer,
                theirs,
                initializer,
                initargs,
                ours,
            ),
            kwargs={} if listener is None else {"listener": listener},
        )
        ident = ":".join(str(i) for i in self._process._identity)
        self._process.name = f"{type(self).__name__}-{ident}"
        try:
            self._process.start()
        finally:
            theirs.close()
            if listener is not None:
                # The child has its own copy; ours must not keep the address alive (clients
                # of a server that died get refused instead of waiting in the backlog).
                listener.close()
        if listener is not None:
            self._address = address
        else:
            try:
                self._address = ours.recv()
            except BaseException:
                ours.close()
                self._process.join(self._shutdown_timeout)
                if self._process.is_alive():
                    self._process.kill()
                    self._process.join(self._shutdown_timeout)
                raise
        self._state.value = State.STARTED
        self.shutdown = util.Finalize(
            self,
            type(self)._finalize_manager,
            args=(
                self._process,
                self._address,
                self._authkey,
                self._state,
                self._Client,
                self._shutdown_timeout,
                ours,
            ),
            exitpriority=0,
        )

    def _prebind(self, initializer):
        """The server's listening socket, bound here, when the server is a fork child that
        would only report a fresh address: `start()` then returns without waiting for the
        child to come up (clients queue in the backlog until it accepts). Not with an
        initializer (whose failure `start()` reports), a given address (a filesystem socket's
        removal belongs to the server), another start method, or a server class whose
        `__init__` is not ours (it might bind the address itself)."""
        if (
            self._address is not None
            or initializer is not None
            or not util.abstract_sockets_supported
            or getattr(self._ctx, "_name", None) != "fork"
            or self._Server.__init__ not in _PREBINDING_SERVERS
        ):
            return None
        return self._Listener(address=_abstract_address(), backlog=16)

    @classmethod
    def _run_server(  # noqa: PLR0917 - the stdlib's positional signature
        cls,
        registry,
        address,
        authkey,
        serializer,
        writer,
        initializer=None,
        initargs=(),
        owner_end=None,
        *,
        listener=None,
    ):
        """The server process's body: make the server, report its address, serve. With
        `listener` (bound by `start()`), the owner knows the address already."""
        # Ctrl-C in a terminal reaches the whole process group; the owner decides when we stop.
        # `_signal`, not `signal.signal`: that wrapper turns the previous handler into an enum
        # member, running enough of `enum` in a fresh fork child (copy-on-write faults) to
        # cost about a tenth of a millisecond of the manager's start.
        _signal.signal(_signal.SIGINT, _signal.SIG_IGN)
        if owner_end is not None:
            owner_end.close()  # the owner's copy (a fork child inherits it)
        if initializer is not None:
            initializer(*initargs)
        if listener is not None:
            _prebound[address] = listener
        server = cls._Server(registry, address, authkey, serializer)
        if listener is None:
            writer.send(server.address)
        if getattr(writer, "readable", False):
            # `serve_forever` watches the owner on this thread; a `shutdown` request (which
            # sets the stop event) wakes that wait too.
            server._owner_control = writer
            server.stop_event = _WakingEvent()
        else:
            writer.close()
        util.info("manager serving at %r", server.address)
        server.serve_forever()

    def _create(self, typeid, /, *args, **kwds):
        """Makes a shared object in the server; returns its token and exposed names."""
        if self._state.value != State.STARTED:
            raise AssertionError("server not yet started")
        conn = self._Client(self._address, authkey=self._authkey)
        try:
            ident, exposed = dispatch(conn, None, "create", (typeid, *args), kwds)
        finally:
            conn.close()
        return Token(typeid, self._address, ident), exposed

    def join(self, timeout=None):
        """Waits for the server process started by `start()` to end."""
        if self._process is not None:
            self._process.join(timeout)
            if not self._process.is_alive():
                self._process = None

    def _control_request(self, name):
        conn = self._Client(self._address, authkey=self._authkey)
        try:
            return dispatch(conn, None, name)
        finally:
            conn.close()

    def _debug_info(self):
        """The server's list of live objects and their reference counts."""
        return self._control_request("debug_info")

    def _number_of_objects(self):
        """How many shared objects the server holds for outside references."""
        return self._control_request("number_of_objects")

    def __enter__(self):
        if self._state.value == State.INITIAL:
            self.start()
        value = self._state.value
        if value != State.STARTED:
            if value == State.INITIAL:
                raise _process_error("Unable to start server")
            if value == State.SHUTDOWN:
                raise _process_error("Manager has shut down")
            raise _process_error(f"Unknown state {value!r}")
        return self

    def __exit__(self, exc_type, exc_val, exc_tb):
        self.shutdown()

    @staticmethod
    def _finalize_manager(  # noqa: PLR0917 - finalizer arguments
        process, address, authkey, state, _Client, shutdown_timeout, control=None
    ):
        """Stops the server process (registered as a finalizer by `start()`)."""
        if process.is_alive():
            util.info("sending shutdown message to manager")
            asked = False
            if control is not None:
                try:
                    control.send_bytes(_STOP)
                    asked = True
                except OSError:
                    pass
            if not asked:
                try:
                    conn = _Client(address, authkey=authkey)
                    try:
                        dispatch(conn, None, "shutdown")
                    finally:
                        conn.close()
                except Exception:
                    pass
            process.join(timeout=shutdown_timeout)
            if process.is_alive():
                util.info("manager still alive")
                if hasattr(process, "terminate"):
                    util.info("trying to `terminate()` manager process")
                    process.terminate()
                    process.join(timeout=shutdown_timeout)
                    if process.is_alive():
                        util.info("manager still alive after terminate")
                        process.kill()
                        process.join()
            # `join()` returns on the server's exit report; like the stdlib's, this returns
            # with the server gone, its connections closed (a proxy used next gets a broken
            # pipe, not a request accepted by a dying server and then reset).
            from .process import _reap_unreaped

            _reap_unreaped({getattr(process, "pid", None)})
        if control is not None:
            control.close()
        state.value = State.SHUTDOWN
        BaseProxy._address_to_local.pop(address, None)

    @property
    def address(self):
        return self._address

    @classmethod
    def register(  # noqa: PLR0917 - the stdlib's signature
        cls,
        typeid,
        callable=None,
        proxytype=None,
        exposed=None,
        method_to_typeid=None,
        create_method=True,
    ):
        """Registers `typeid`: the server builds it with `callable`, clients get a `proxytype`.

        `exposed` limits the methods a proxy may call (default: the proxytype's `_exposed_`, or
        every public method); `method_to_typeid` maps methods whose result should come back as
        a proxy of that type id. With `create_method`, the manager gains a method `typeid`.
        """
        if "_registry" not in cls.__dict__:
            cls._registry = cls._registry.copy()
        if proxytype is None:
            proxytype = AutoProxy
        exposed = exposed or getattr(proxytype, "_exposed_", None)
        method_to_typeid = method_to_typeid or getattr(proxytype, "_method_to_typeid_", None)
        if method_to_typeid:
            for key, value in list(method_to_typeid.items()):
                if type(key) is not str:
                    raise AssertionError(f"{key!r} is not a string")
                if type(value) is not str:
                    raise AssertionError(f"{value!r} is not a string")
        cls._registry[typeid] = (callable, exposed, method_to_typeid, proxytype)
        _proxytypes[typeid] = proxytype
        if create_method:
            setattr(cls, typeid, _creator(typeid, proxytype))


# typeid -> proxy type, over every manager class of this process (latest registration wins):
# what a proxy without a manager object uses for a "#PROXY" reply.
_proxytypes = {}


def _adopt(proxytype, token, serializer, manager, authkey, exposed, client):  # noqa: PLR0917
    """A proxy for a new server object: the proxy takes its own reference, then the one the
    server took when it made the object is dropped."""
    proxy = proxytype(token, serializer, manager=manager, authkey=authkey, exposed=exposed)
    conn = client(token.address, authkey=authkey)
    try:
        dispatch(conn, None, "decref", (token.id,))
    finally:
        conn.close()
    return proxy


def _creator(typeid, proxytype):
    """The manager method that creates a shared `typeid` object and returns its proxy."""

    def create(self, /, *args, **kwds):
        util.debug("requesting creation of a shared %r object", typeid)
        token, exposed = self._create(typeid, *args, **kwds)
        return _adopt(
            proxytype, token, self._serializer, self, self._authkey, exposed, self._Client
        )

    create.__name__ = create.__qualname__ = typeid
    return create


# ---------------------------------------------------------------------------------------------
# Proxies
# ---------------------------------------------------------------------------------------------


class ProcessLocalSet(set):
    """A set emptied in a forked child (the child owns none of its parent's references)."""

    def __init__(self):
        util.register_after_fork(self, lambda obj: obj.clear())

    def __reduce__(self):
        return type(self), ()


class BaseProxy:
    """Stands for an object that lives in a manager's server; calls go to the server."""

    _address_to_local = {}  # noqa: RUF012 - shared by all proxies of a process
    _mutex = util.ForkAwareThreadLock()

    def __init__(  # noqa: PLR0917 - the stdlib's signature
        self,
        token,
        serializer,
        manager=None,
        authkey=None,
        exposed=None,
        incref=True,
        manager_owned=False,
    ):
        with BaseProxy._mutex:
            per_address = BaseProxy._address_to_local.get(token.address)
            if per_address is None:
                # One connection per thread and one set of held ids per process, shared by
                # every proxy of the same server.
                per_address = (util.ForkAwareLocal(), ProcessLocalSet())
                BaseProxy._address_to_local[token.address] = per_address
        self._tls, self._idset = per_address
        self._token = token
        self._id = token.id
        self._manager = manager
        self._serializer = serializer
        self._Client = listener_client[serializer][1]
        # True for proxies rebuilt inside their own server (a proxy stored in a managed
        # container): those hold no reference of their own.
        self._owned_by_manager = manager_owned
        if authkey is not None:
            self._authkey = process.AuthenticationString(authkey)
        elif manager is not None:
            self._authkey = manager._authkey
        else:
            self._authkey = process.current_process().authkey
        if incref:
            self._incref()
        util.register_after_fork(self, BaseProxy._after_fork)

    def _connect(self):
        util.debug("making connection to manager")
        name = process.current_process().name
        thread_name = threading.current_thread().name
        if thread_name != "MainThread":
            name += "|" + thread_name
        conn = self._Client(self._token.address, authkey=self._authkey)
        dispatch(conn, None, "accept_connection", (name,))
        self._tls.connection = conn
        return conn

    def _callmethod(self, methodname, args=(), kwds={}):  # noqa: B006 - stdlib signature
        """Calls `methodname` on the referent and returns (a copy of) the result."""
        try:
            conn = self._tls.connection
        except AttributeError:
            util.debug("thread %r does not own a connection", threading.current_thread().name)
            conn = self._connect()
        try:
            conn.send((self._id, methodname, args, kwds))
            kind, result = conn.recv()
        except BaseException as e:
            # Interrupted (Ctrl-C), or the server went away: the connection is out of step
            # with its server thread, or dead, so this thread's next call starts on a fresh
            # one. A request that could not be pickled was never sent: nothing to forget.
            if not isinstance(e, (pickle.PicklingError, TypeError, AttributeError)):
                self._forget_connection(conn)
            raise
        if kind == _RETURN:
            return result
        if kind == _PROXY:
            return self._proxy_from_reply(result)
        raise convert_to_error(kind, result)

    def _forget_connection(self, conn):
        if getattr(self._tls, "connection", None) is conn:
            del self._tls.connection
        conn.close()

    def _proxy_from_reply(self, result):
        exposed, token = result
        if self._manager is not None:
            proxytype = self._manager._registry[token.typeid][-1]
        else:
            # A proxy inherited by or sent to another process has no manager object; the
            # proxy types registered in this process stand in (the stdlib fails here).
            proxytype = _proxytypes.get(token.typeid, AutoProxy)
        token.address = self._token.address
        return _adopt(
            proxytype, token, self._serializer, self._manager, self._authkey, exposed, self._Client
        )

    def _getvalue(self):
        """A copy of the referent."""
        return self._callmethod(_GETVALUE)

    def _incref(self):
        if self._owned_by_manager:
            util.debug("owned_by_manager skipped INCREF of %r", self._token.id)
            return
        conn = self._Client(self._token.address, authkey=self._authkey)
        try:
            dispatch(conn, None, "incref", (self._id,))
        finally:
            conn.close()
        util.debug("INCREF %r", self._token.id)
        self._idset.add(self._id)
        state = self._manager and self._manager._state
        self._close = util.Finalize(
            self,
            BaseProxy._decref,
            args=(self._token, self._authkey, state, self._tls, self._idset, self._Client),
            exitpriority=10,
        )

    @staticmethod
    def _decref(token, authkey, state, tls, idset, _Client):
        idset.discard(token.id)
        if state is None or state.value == State.STARTED:
            try:
                util.debug("DECREF %r", token.id)
                conn = _Client(token.address, authkey=authkey)
                try:
                    dispatch(conn, None, "decref", (token.id,))
                finally:
                    conn.close()
            except Exception as e:
                util.debug("... decref failed %s", e)
        else:
            util.debug("DECREF %r -- manager already shutdown", token.id)
        # Nothing of this server is referenced from this process any more: let the thread's
        # connection go.
        if not idset and hasattr(tls, "connection"):
            util.debug(
                "thread %r has no more proxies so closing conn", threading.current_thread().name
            )
            tls.connection.close()
            del tls.connection

    def _after_fork(self):
        self._manager = None
        try:
            self._incref()
        except Exception as e:
            # The manager may have shut down already.
            util.info(f"incref failed: {e}")

    def __reduce__(self):
        kwds = {}
        if get_spawning_popen() is not None:
            kwds["authkey"] = self._authkey
        if getattr(self, "_isauto", False):
            kwds["exposed"] = self._exposed_
            return (RebuildProxy, (AutoProxy, self._token, self._serializer, kwds))
        return (RebuildProxy, (type(self), self._token, self._serializer, kwds))

    def __deepcopy__(self, memo):
        return self._getvalue()

    def __repr__(self):
        return f"<{type(self).__name__} object, typeid {self._token.typeid!r} at {id(self):#x}>"

    def __str__(self):
        """The referent's repr, or a note saying it could not be fetched."""
        try:
            return self._callmethod("__repr__")
        except Exception:
            return repr(self)[:-1] + "; '__str__()' failed>"


def RebuildProxy(func, token, serializer, kwds):
    """Unpickles a proxy (inside its own server, one that holds no reference)."""
    server = getattr(process.current_process(), "_manager_server", None)
    if server is not None and server.address == token.address:
        util.debug("Rebuild a proxy owned by manager, token=%r", token)
        kwds["manager_owned"] = True
        if token.id not in server.id_to_local_proxy_obj:
            server.id_to_local_proxy_obj[token.id] = server.id_to_obj[token.id]
    incref = kwds.pop("incref", True) and not getattr(
        process.current_process(), "_inheriting", False
    )
    return func(token, serializer, incref=incref, **kwds)


def _forwarder(name):
    def forward(self, /, *args, **kwds):
        return self._callmethod(name, args, kwds)

    forward.__name__ = forward.__qualname__ = name
    return forward


def MakeProxyType(name, exposed, _cache={}):  # noqa: B006 - the cache is the point
    """A `BaseProxy` subclass named `name` with one forwarding method per `exposed` name."""
    exposed = tuple(exposed)
    key = (name, exposed)
    cached = _cache.get(key)
    if cached is not None:
        return cached
    namespace = {meth: _forwarder(meth) for meth in exposed}
    proxy_type = type(name, (BaseProxy,), namespace)
    proxy_type._exposed_ = exposed
    _cache[key] = proxy_type
    return proxy_type


def AutoProxy(  # noqa: PLR0917 - the stdlib's signature
    token, serializer, manager=None, authkey=None, exposed=None, incref=True, manager_owned=False
):
    """A proxy whose methods are the referent's exposed ones (asked from the server if needed)."""
    client = listener_client[serializer][1]
    if exposed is None:
        conn = client(token.address, authkey=authkey)
        try:
            exposed = dispatch(conn, None, "get_methods", (token,))
        finally:
            conn.close()
    if authkey is None and manager is not None:
        authkey = manager._authkey
    if authkey is None:
        authkey = process.current_process().authkey
    proxy_type = MakeProxyType(f"AutoProxy[{token.typeid}]", exposed)
    proxy = proxy_type(
        token,
        serializer,
        manager=manager,
        authkey=authkey,
        incref=incref,
        manager_owned=manager_owned,
    )
    proxy._isauto = True
    return proxy


# ---------------------------------------------------------------------------------------------
# What SyncManager serves
# ---------------------------------------------------------------------------------------------


class Namespace:
    """A plain object whose attributes are the shared state."""

    def __init__(self, /, **kwds):
        self.__dict__.update(kwds)

    def __repr__(self):
        shown = sorted(f"{k}={v!r}" for k, v in list(self.__dict__.items()) if k[0] != "_")
        return f"{type(self).__name__}({', '.join(shown)})"


class Value:
    """A boxed value with `get`/`set` (the manager's `Value`; `lock` is accepted and unused)."""

    def __init__(self, typecode, value, lock=True):
        self._typecode = typecode
        self._value = value

    def get(self):
        return self._value

    def set(self, value):
        self._value = value

    def __repr__(self):
        return f"{type(self).__name__}({self._typecode!r}, {self._value!r})"

    value = property(get, set)


def Array(typecode, sequence, lock=True):
    """The manager's `Array`: an `array.array` (`lock` is accepted and unused)."""
    return array.array(typecode, sequence)


def _make_queue(maxsize=0):
    import queue  # lazily: keeps a spawned server's start-up small

    return queue.Queue(maxsize)


def _make_pool(*args, **kwds):
    # Imported inside the server, on the first Pool request only.
    from .pool import Pool

    return Pool(*args, **kwds)


class IteratorProxy(BaseProxy):
    _exposed_ = ("__next__", "send", "throw", "close")

    def __iter__(self):
        return self

    def __next__(self, *args):
        return self._callmethod("__next__", args)

    def send(self, *args):
        return self._callmethod("send", args)

    def throw(self, *args):
        return self._callmethod("throw", args)

    def close(self, *args):
        return self._callmethod("close", args)


class AcquirerProxy(BaseProxy):
    _exposed_ = ("acquire", "release")

    def acquire(self, blocking=True, timeout=None):
        args = (blocking,) if timeout is None else (blocking, timeout)
        return self._callmethod("acquire", args)

    def release(self):
        return self._callmethod("release")

    def __enter__(self):
        return self._callmethod("acquire")

    def __exit__(self, exc_type, exc_val, exc_tb):
        return self._callmethod("release")


class ConditionProxy(AcquirerProxy):
    _exposed_ = ("acquire", "release", "wait", "notify", "notify_all")

    def wait(self, timeout=None):
        return self._callmethod("wait", (timeout,))

    def notify(self, n=1):
        return self._callmethod("notify", (n,))

    def notify_all(self):
        return self._callmethod("notify_all")

    def wait_for(self, predicate, timeout=None):
        """Waits until `predicate()` is true (or `timeout` passes); returns its last value."""
        result = predicate()
        if result:
            return result
        deadline = None if timeout is None else time.monotonic() + timeout
        while not result:
            remaining = None
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
            self.wait(remaining)
            result = predicate()
        return result


class EventProxy(BaseProxy):
    _exposed_ = ("is_set", "set", "clear", "wait")

    def is_set(self):
        return self._callmethod("is_set")

    def set(self):
        return self._callmethod("set")

    def clear(self):
        return self._callmethod("clear")

    def wait(self, timeout=None):
        return self._callmethod("wait", (timeout,))


class BarrierProxy(BaseProxy):
    _exposed_ = ("__getattribute__", "wait", "abort", "reset")

    def wait(self, timeout=None):
        return self._callmethod("wait", (timeout,))

    def abort(self):
        return self._callmethod("abort")

    def reset(self):
        return self._callmethod("reset")

    @property
    def parties(self):
        return self._callmethod("__getattribute__", ("parties",))

    @property
    def n_waiting(self):
        return self._callmethod("__getattribute__", ("n_waiting",))

    @property
    def broken(self):
        return self._callmethod("__getattribute__", ("broken",))


class NamespaceProxy(BaseProxy):
    _exposed_ = ("__getattribute__", "__setattr__", "__delattr__")

    def __getattr__(self, key):
        if key[0] == "_":
            return object.__getattribute__(self, key)
        return object.__getattribute__(self, "_callmethod")("__getattribute__", (key,))

    def __setattr__(self, key, value):
        if key[0] == "_":
            return object.__setattr__(self, key, value)
        return object.__getattribute__(self, "_callmethod")("__setattr__", (key, value))

    def __delattr__(self, key):
        if key[0] == "_":
            return object.__delattr__(self, key)
        return object.__getattribute__(self, "_callmethod")("__delattr__", (key,))


class ValueProxy(BaseProxy):
    _exposed_ = ("get", "set")

    def get(self):
        return self._callmethod("get")

    def set(self, value):
        return self._callmethod("set", (value,))

    value = property(get, set)

    __class_getitem__ = classmethod(types.GenericAlias)


BaseListProxy = MakeProxyType(
    "BaseListProxy",
    (
        "__add__",
        "__contains__",
        "__delitem__",
        "__getitem__",
        "__len__",
        "__mul__",
        "__reversed__",
        "__rmul__",
        "__setitem__",
        "append",
        "count",
        "extend",
        "index",
        "insert",
        "pop",
        "remove",
        "reverse",
        "sort",
        "__imul__",
    ),
)


class ListProxy(BaseListProxy):
    def __iadd__(self, value):
        self._callmethod("extend", (value,))
        return self

    def __imul__(self, value):
        self._callmethod("__imul__", (value,))
        return self


DictProxy = MakeProxyType(
    "DictProxy",
    (
        "__contains__",
        "__delitem__",
        "__getitem__",
        "__iter__",
        "__len__",
        "__setitem__",
        "clear",
        "copy",
        "get",
        "items",
        "keys",
        "pop",
        "popitem",
        "setdefault",
        "update",
        "values",
    ),
)
DictProxy._method_to_typeid_ = {"__iter__": "Iterator"}

ArrayProxy = MakeProxyType("ArrayProxy", ("__len__", "__getitem__", "__setitem__"))

BasePoolProxy = MakeProxyType(
    "PoolProxy",
    (
        "apply",
        "apply_async",
        "close",
        "imap",
        "imap_unordered",
        "join",
        "map",
        "map_async",
        "starmap",
        "starmap_async",
        "terminate",
    ),
)
BasePoolProxy._method_to_typeid_ = {
    "apply_async": "AsyncResult",
    "map_async": "AsyncResult",
    "starmap_async": "AsyncResult",
    "imap": "Iterator",
    "imap_unordered": "Iterator",
}


class PoolProxy(BasePoolProxy):
    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc_val, exc_tb):
        self.terminate()


class SyncManager(BaseManager):
    """A manager serving the synchronization types plus `dict`, `list` and `Namespace`.

    `ferroproc.Manager()` returns a started one.
    """


SyncManager.register("Queue", _make_queue)
SyncManager.register("JoinableQueue", _make_queue)
SyncManager.register("Event", threading.Event, EventProxy)
SyncManager.register("Lock", threading.Lock, AcquirerProxy)
SyncManager.register("RLock", threading.RLock, AcquirerProxy)
SyncManager.register("Semaphore", threading.Semaphore, AcquirerProxy)
SyncManager.register("BoundedSemaphore", threading.BoundedSemaphore, AcquirerProxy)
SyncManager.register("Condition", threading.Condition, ConditionProxy)
SyncManager.register("Barrier", threading.Barrier, BarrierProxy)
SyncManager.register("Pool", _make_pool, PoolProxy)
SyncManager.register("list", list, ListProxy)
SyncManager.register("dict", dict, DictProxy)
SyncManager.register("Value", Value, ValueProxy)
SyncManager.register("Array", Array, ArrayProxy)
SyncManager.register("Namespace", Namespace, NamespaceProxy)
# Types of results of DictProxy/PoolProxy methods.
SyncManager.register("Iterator", proxytype=IteratorProxy, create_method=False)
SyncManager.register("AsyncResult", create_method=False)


# -- SharedMemoryManager ---------------------------------------------------------------------


class _SegmentRegistry:
    """The names of the shared memory segments a `SharedMemoryServer` looks after; it unlinks
    them all when the server stops."""

    def __init__(self):
        self.segment_names = []
        self._lock = threading.Lock()

    def register_segment(self, segment_name):
        from . import shared_memory

        # Opening it makes this process one of the segment's holders (see
        # `ferroproc.shared_memory`): it stays while the server lives, whoever created it.
        shared_memory.SharedMemory(segment_name).close()
        with self._lock:
            self.segment_names.append(segment_name)

    def destroy_segment(self, segment_name):
        from . import shared_memory

        with self._lock:
            self.segment_names.remove(segment_name)
        segment = shared_memory.SharedMemory(segment_name)
        segment.close()
        segment.unlink()

    def unlink(self):
        with self._lock:
            names = list(self.segment_names)
        for name in names:
            try:
                self.destroy_segment(name)
            except (FileNotFoundError, ValueError):
                pass  # already unlinked by a user, or released meanwhile


class SharedMemoryServer(Server):
    """A manager server that also tracks `SharedMemory` segments made through its manager and
    unlinks them when it stops (by `shutdown()`, or because its owner ended)."""

    public = [*Server.public, "track_segment", "release_segment", "list_segments"]  # noqa: RUF012

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.shared_memory_context = _SegmentRegistry()

    def create(self, c, typeid, /, *args, **kwargs):
        """As `Server.create`; a proxy type marked ``_shared_memory_proxy`` also receives the
        segment registry as ``shared_memory_context``."""
        if hasattr(self.registry[typeid][-1], "_shared_memory_proxy"):
            kwargs["shared_memory_context"] = self.shared_memory_context
        return super().create(c, typeid, *args, **kwargs)

    def serve_forever(self):
        try:
            super().serve_forever()
        finally:
            self.shared_memory_context.unlink()

    def track_segment(self, c, segment_name):
        """Adds `segment_name` to the segments unlinked when the server stops."""
        self.shared_memory_context.register_segment(segment_name)

    def release_segment(self, c, segment_name):
        """Unlinks `segment_name` now and stops tracking it."""
        self.shared_memory_context.destroy_segment(segment_name)

    def list_segments(self, c):
        """The names of the tracked segments."""
        return list(self.shared_memory_context.segment_names)


#: Server classes whose `__init__` takes a listener `BaseManager.start()` bound for it.
_PREBINDING_SERVERS = (Server.__init__, SharedMemoryServer.__init__)


class SharedMemoryManager(BaseManager):
    """A manager whose `SharedMemory` and `ShareableList` segments live until it shuts down.

    Each segment is created in the calling process, then registered with the server, which
    unlinks every segment it tracks when it stops.
    """

    _Server = SharedMemoryServer

    def __init__(self, *args, **kwargs):
        # The stdlib's signature; ferroproc needs no resource tracker started here.
        super().__init__(*args, **kwargs)

    def get_server(self):
        """A `SharedMemoryServer` for this manager, to run with `serve_forever()`."""
        return super().get_server()

    def _track(self, segment_name):
        with self._Client(self._address, authkey=self._authkey) as conn:
            dispatch(conn, None, "track_segment", (segment_name,))

    def SharedMemory(self, size):
        """A new `SharedMemory` of `size` bytes, tracked by the server."""
        from . import shared_memory

        if self._state.value != State.STARTED:
            # What the stdlib's connection attempt gives before `start()`.
            self._Client(self._address, authkey=self._authkey).close()
        segment = shared_memory.SharedMemory(None, create=True, size=size)
        try:
            self._track(segment.name)
        except BaseException:
            segment.unlink()
            raise
        return segment

    def ShareableList(self, sequence):
        """A new `ShareableList` holding `sequence`, tracked by the server."""
        from . import shared_memory

        if self._state.value != State.STARTED:
            self._Client(self._address, authkey=self._authkey).close()
        sl = shared_memory.ShareableList(sequence)
        try:
            self._track(sl.shm.name)
        except BaseException:
            sl.shm.unlink()
            raise
        return sl
