"""Forkserver start method: one clean server process per parent forks children on request.

The server is spawned once (`posix_spawn` of the interpreter), imports the preload modules,
then runs ferroproc's native request loop. Parent and server talk over a private unix
socketpair: no filesystem address, nothing to clean up, and the server exits when the parent
(and every process holding the parent's end) is gone. Each request carries the pickled process
and its descriptors (`SCM_RIGHTS`); the server forks, replies with the pid, and reports the
child's exit code on the child's status pipe when it reaps it.
"""

# Imported here, by the server, so that its children (which unpickle their process) find it
# loaded instead of each importing it, with `functools` and `collections`, after the fork.
import _pickle
import _signal
import _thread
import gc
import os
import sys

from . import process, spawn, util
from ._ferroproc import FORKSERVER_PROTOCOL, forkserver_request, waitpid
from ._ferroproc import ForkServer as NativeServer

__all__ = [
    "ForkServer",
    "ensure_running",
    "get_inherited_fds",
    "main",
    "set_forkserver_preload",
]

MAXFDS_TO_SEND = 256

#: Set, with ``LD_BIND_NOW``, in the server's environment when the parent added that one.
_BIND_NOW_ADDED = "_FERROPROC_FORKSERVER_BIND_NOW"

#: ferroproc modules whose objects (connections, queues, locks, shared values, proxies) reach
#: children as arguments. The server imports, after the preload list, those its parent had
#: imported when it started, and later those the parent imports afterwards (a request's hint
#: names them, one bit each in this order; the server imports them before its next fork). A
#: child that unpickles a `Pipe()` end otherwise imports `connection` and what it imports
#: (socket, pickle, threading...) itself: about 8 ms per child here.
_IPC_MODULES = (
    "ferroproc.reduction",
    "ferroproc.connection",
    "ferroproc.synchronize",
    "ferroproc.queues",
    "ferroproc.sharedctypes",
    "ferroproc.heap",
    "ferroproc.shared_memory",
    "ferroproc.resource_sharer",
    "ferroproc.managers",
)


class ForkServer:
    """Client-side state: the control socket of this process's server, started lazily."""

    def __init__(self):
        self._ctl = None
        self._forkserver_pid = None  # the stdlib's attribute name: tests and tools read it
        self._lock = _thread.allocate_lock()
        self._preload_modules = ["__main__"]
        self._inherited_fds = None
        self._hooked = False
        # The preparation data the running server applied to itself (with "name" None), when
        # its children may take it as theirs; see `_payload`.
        self._server_prep = None
        # The `_IPC_MODULES` the running server has imported or been told to import.
        self._server_modules = set()

    def _arm(self):
        # The after-fork reset is registered on first use: until then there is nothing to
        # reset, and every hook is Python code each forked child runs (and pays faults for).
        if not self._hooked:
            # Registered before the flag is set: a thread that sees the flag may take the
            # lock at once. (Two registrations are harmless.)
            os.register_at_fork(after_in_child=self._after_fork_in_child)
            self._hooked = True

    def _stop(self):
        self._arm()
        with self._lock:
            self._stop_unlocked()

    def _stop_unlocked(self):
        if self._ctl is None:
            return
        ctl, pid = self._ctl, self._forkserver_pid
        self._ctl = self._forkserver_pid = None
        ctl.close()
        # Closing our end makes the server's loop see EOF and exit.
        try:
            waitpid(pid, True)
        except ChildProcessError:
            pass

    def _after_fork_in_child(self):
        # A forked child must not share its parent's server connection (requests would
        # interleave); it starts its own server if it needs one.
        self._lock._at_fork_reinit()
        if self._ctl is not None:
            self._ctl.close()
        self._ctl = self._forkserver_pid = None

    def set_forkserver_preload(self, modules_names):
        """Sets the modules the server imports at start-up."""
        if not all(type(mod) is str for mod in modules_names):
            raise TypeError("module_names must be a list of strings")
        self._preload_modules = modules_names

    def get_inherited_fds(self):
        """Descriptors handed to this process by the forkserver request, or None."""
        return self._inherited_fds

    def ensure_running(self):
        """Starts the server if this process has none running."""
        self._arm()
        with self._lock:
            self._ensure_running_unlocked()

    def _ensure_running_unlocked(self):
        if self._ctl is not None:
            if self._forkserver_pid is not None and _exited(self._forkserver_pid):
                self._ctl.close()
                self._ctl = self._forkserver_pid = None
            else:
                return
        import socket

        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            prep = spawn.get_preparation_data(None)
            # The setup goes over the socket, ahead of the first request: a long `sys.argv`
            # does not fit one command-line argument (the kernel's limit is 128 KiB).
            setup = _dumps_for_child(prep)
            preload = [*self._preload_modules]
            preload += [m for m in _IPC_MODULES if m in sys.modules and m not in preload]
            self._server_modules = {m for m in preload if m in _IPC_MODULES}
            # The dynamic linker binds every symbol as the server starts, once: a child would
            # otherwise bind those the server never called (the after-fork ones above all),
            # writing the linker's tables in each child. The server drops the variable again
            # (told so by `_BIND_NOW_ADDED`: a server of another build ignores it, and stops
            # at the protocol check).
            extra_env = None
            if "LD_BIND_NOW" not in os.environ:
                extra_env = {"LD_BIND_NOW": "1", _BIND_NOW_ADDED: "1"}
            prog = (
                "from ferroproc.forkserver import main; "
                f"main({theirs.fileno()}, {preload!r}, {len(setup)}, {FORKSERVER_PROTOCOL})"
            )
            from subprocess import _args_from_interpreter_flags

            exe = spawn.get_executable()
            args = [exe, *_args_from_interpreter_flags(), "-c", prog]
            self._forkserver_pid = util._spawnv_passfds(exe, args, [theirs.fileno()], extra_env)
            ours.sendall(setup)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self._ctl = ours
        # Logging set up in the parent is set up by each child (the server stays quiet). A
        # snapshot: `sys_argv` is the parent's own list, which it may change in place.
        if _configures_logging(prep):
            self._server_prep = None
        else:
            self._server_prep = {k: list(v) if type(v) is list else v for k, v in prep.items()}

    def request(self, prep, process_pickled, fds):
        """Asks the server to fork a child for a process object; returns its pid.

        `prep` is the child's preparation data (``spawn.get_preparation_data``);
        `process_pickled` is the process object."""
        if len(fds) + 1 > MAXFDS_TO_SEND:
            raise ValueError("too many fds")
        self._arm()
        with self._lock:
            self._ensure_running_unlocked()
            # The child's parent sentinel: a pidfd of this process, sent along.
            fds = [fds[0], util._own_pidfd(), *fds[1:]]
            try:
                return self._request(prep, process_pickled, fds)
            except (EOFError, BrokenPipeError, ConnectionResetError):
                # The server died (killed from outside): start a fresh one and retry once.
                self._ctl.close()
                self._ctl = self._forkserver_pid = self._server_prep = None
                self._ensure_running_unlocked()
                return self._request(prep, process_pickled, fds)

    def _request(self, prep, process_pickled, fds):
        hint, names = self._imports_hint()
        pid = forkserver_request(
            self._ctl.fileno(), self._payload(prep, process_pickled), fds, hint
        )
        if names:
            # Taken by a spare, which tells the server (a request that failed may not have).
            self._server_modules.update(names)
        return pid

    def _imports_hint(self):
        """``(bits, names)`` of the `_IPC_MODULES` imported here that the server has not been
        told about."""
        known = self._server_modules
        if len(known) == len(_IPC_MODULES):
            return 0, ()
        hint, names = 0, []
        modules = sys.modules
        for bit, name in enumerate(_IPC_MODULES):
            if name in modules and name not in known:
                hint |= 1 << bit
                names.append(name)
        return hint, names

    def _payload(self, prep, process_pickled):
        # A child's preparation is its parent's import environment, which rarely changes
        # between starts: the server applied it to itself when it started, so its children
        # have it already, and the request carries only the child's name. Unpickling and
        # applying it in each child cost about as much as the rest of the child's start.
        server = self._server_prep
        if server is not None and {**prep, "name": None} == server:
            # In a tuple: a dict is the full preparation, and a name may be a `str` subclass.
            return _frame(_pickle.dumps((prep["name"],), protocol=4), process_pickled)
        return _frame(_dumps_for_child(prep), process_pickled)


class _DupFd:
    """A descriptor sent with a forkserver request: its index in the child's inherited fds.
    Defined here, not in `popen_forkserver`: a child unpickles it, and the server has this
    module loaded (importing `popen_forkserver` and what it imports cost each child handed a
    queue or a lock about 1.5 ms)."""

    def __init__(self, ind):
        self.ind = ind

    def detach(self):
        return _forkserver.get_inherited_fds()[self.ind]


def _frame(prep_pickled, process_pickled):
    """A request's payload: the preparation's length (4 bytes, little-endian), then the two
    pickles (`ForkChild.serve` splits them)."""
    return len(prep_pickled).to_bytes(4, "little") + prep_pickled + process_pickled


def _dumps_for_child(obj):
    """`obj` pickled as for a child being started (an authkey refuses to be pickled
    otherwise)."""
    from .context import get_spawning_popen, set_spawning_popen

    previous = get_spawning_popen()
    set_spawning_popen(_forkserver)
    try:
        return _pickle.dumps(obj, protocol=4)
    finally:
        set_spawning_popen(previous)


def _configures_logging(prep):
    return bool(prep.get("log_to_stderr")) or "log_level" in prep


def _exited(pid):
    try:
        return waitpid(pid, False) is not None
    except ChildProcessError:
        return True


_forkserver = ForkServer()
ensure_running = _forkserver.ensure_running
get_inherited_fds = _forkserver.get_inherited_fds
set_forkserver_preload = _forkserver.set_forkserver_preload
request = _forkserver.request


#: In the server: the part of the preparation data its children must still apply themselves
#: when a request carries only their name (the main module, when it was not preloaded).
_unapplied_prep = None


def main(ctl_fd, preload, setup, protocol=None):
    """The server process: preload, then serve fork requests until the parent is gone.

    The first `setup` bytes on `ctl_fd` are the parent's pickled preparation data
    (``spawn.get_preparation_data``): the server applies it to itself, as a spawned child
    does, except for logging and the main module (preloaded when ``"__main__"`` is in
    `preload`; each child imports it otherwise). `protocol` is the parent's
    ``FORKSERVER_PROTOCOL``: a parent running another ferroproc build than the one this
    server imported (upgraded in place) would otherwise misread every request."""
    global _unapplied_prep
    if os.environ.pop(_BIND_NOW_ADDED, None):
        # The parent set LD_BIND_NOW for this process only (see `_ensure_running_unlocked`).
        os.environ.pop("LD_BIND_NOW", None)
    if protocol != FORKSERVER_PROTOCOL:
        sys.stderr.write(
            f"ferroproc forkserver: the parent speaks protocol {protocol}, this server "
            f"{FORKSERVER_PROTOCOL} (ferroproc was reinstalled while the parent ran?)\n"
        )
        sys.exit(1)
    prep = _read_exactly(ctl_fd, setup)
    main_prep = {k: prep[k] for k in ("init_main_from_name", "init_main_from_path") if k in prep}
    # What the preloaded modules see at module level, as in a spawned child.
    if "sys_path" in prep:
        sys.path[:] = prep["sys_path"]
    if "sys_argv" in prep:
        sys.argv = list(prep["sys_argv"])
    main_path = main_prep.get("init_main_from_path")
    if preload:
        if "__main__" in preload and main_path is not None and _preload_main(main_path):
            main_prep = {}
        for modname in preload:
            try:
                __import__(modname)
            except ImportError:
                pass
    # Applied here, after the preloading (which may have changed any of it), as a child
    # applies it when its request carries it: import path, arguments, directory, authkey,
    # start method. Children whose request carries only their name start from this.
    process.current_process()._inheriting = True
    try:
        spawn.prepare({k: v for k, v in prep.items() if k not in _NOT_IN_SERVER})
    finally:
        del process.current_process()._inheriting
    _unapplied_prep = main_prep or None
    util._close_stdin()
    # Ctrl-C in the terminal reaches the whole process group: the server must survive it.
    # (`_signal`, not `signal`: the server stays small, and so does every fork of it.) A
    # write to the pipe of a spare or child that died must not kill it either, whatever the
    # preloaded script did with SIGPIPE; each child gets the script's setting back.
    old_sigint = _signal.signal(_signal.SIGINT, _signal.SIG_IGN)
    old_sigpipe = _signal.signal(_signal.SIGPIPE, _signal.SIG_IGN)
    server = NativeServer(ctl_fd)
    os.close(ctl_fd)
    # A spare's life is native (`ForkServer.run_spare`): Python functions that only spares
    # ran would be cold in each of them, writing their code objects as they warm up.
    server.configure(
        process._native_entry(),
        _make_rehearsal(),
        _forkserver,
        spawn.prepare,
        _unapplied_prep,
        old_sigint,
        old_sigpipe,
    )
    for _ in range(_WARM_UP):
        server.rehearse()
    # Start-up garbage goes now, and the young generations are empty when children are forked:
    # a child's first collections then visit only its own objects, not (copying) the server's.
    gc.collect()
    me = os.getpid()
    # Children are forked before their requests arrive, two ahead (see the native module):
    # the fork and the interpreter's after-fork work are off the client's path.
    while hint := server.serve(me):
        _import_hinted(hint)
        # Importing evicted much of the type cache: warm it again.
        for _ in range(_WARM_UP // 4):
            server.rehearse()
    sys.exit(0)


def _import_hinted(hint):
    """Imports the `_IPC_MODULES` whose bits are set (see `ForkServer._imports_hint`), so
    the spares forked from now on have them."""
    for bit, name in enumerate(_IPC_MODULES):
        if hint >> bit & 1:
            try:
                __import__(name)
            except Exception:  # a child that needs it imports it and reports the error
                pass
    gc.collect()  # as at start-up: the young generations are empty at each fork


def _read_exactly(fd, size):
    """The object pickled in the next `size` bytes of `fd` (never reading past them)."""
    chunks = []
    while size:
        chunk = os.read(fd, size)
        if not chunk:
            raise EOFError("the forkserver's parent closed the socket before its setup")
        chunks.append(chunk)
        size -= len(chunk)
    return _pickle.loads(b"".join(chunks))


#: Preparation the server does not apply to itself: the child's name (each request carries
#: it), logging (the server stays quiet) and the main module (see `main`).
_NOT_IN_SERVER = frozenset(
    ("name", "log_to_stderr", "log_level", "init_main_from_name", "init_main_from_path")
)


def _preload_main(main_path):
    """Runs the parent's main script once, here, as `__mp_main__`, with the parent's
    `sys.argv` (module-level code reads it as it does in a spawned child); True if it ran.
    If the script raises, the server carries on without it: each child then runs the script
    itself, as a spawned child (and the stdlib's forkserver child) does, and reports the
    error there."""
    process.current_process()._inheriting = True
    try:
        spawn.import_main_path(main_path)
    except BaseException:
        return False
    finally:
        del process.current_process()._inheriting
    return True


#: Rehearsals the server runs itself before its first fork (see `ForkServer.rehearse`): the
#: specializing interpreter settles a function's code after a few runs.
_WARM_UP = 16


def _make_rehearsal():
    """A request's payload, for spares to rehearse with (None if one cannot be made)."""
    from .context import ForkServerProcess

    proc = ForkServerProcess(name="ForkServerProcess-0")
    try:
        return _frame(_pickle.dumps((proc.name,), protocol=4), _dumps_for_child(proc))
    except Exception:
        return None
