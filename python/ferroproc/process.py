"""Process objects: the `Process` API of `multiprocessing.process`, started by native popens.

The module keeps the stdlib's module-level state names (`_children`, `_current_process`,
`_parent_process`, `_process_counter`, `_dangling`) because tools and CPython's own test suite
reach for them.
"""

import itertools
import os
import sys
from _weakrefset import WeakSet

from ._ferroproc import _release_received_buffers, hold_signals

__all__ = ["BaseProcess", "active_children", "current_process", "parent_process"]


def current_process():
    """The `Process` object of the running process."""
    return _current_process


def active_children():
    """Child processes that are still running (finished ones are reaped first)."""
    _cleanup()
    return list(_children)


def parent_process():
    """The process that started this one, or None in the main process."""
    return _parent_process


# Children that reported their exit code but had not finished exiting when it was read; they
# are reaped at the next process start, `active_children()` or exit.
_unreaped: set = set()


def _reap_unreaped(wait_for=()):
    """Reaps the children in `_unreaped` that have ended; those in `wait_for` are waited for
    (they have reported, so only their teardown is left)."""
    from ._ferroproc import waitpid

    for pid in list(_unreaped):
        try:
            done = waitpid(pid, pid in wait_for) is not None
        except ChildProcessError:
            done = True
        if done:
            _unreaped.discard(pid)


def _cleanup():
    # Forget children whose exit has been observed; polling also reaps them.
    if _unreaped:
        _reap_unreaped()
    for p in list(_children):
        popen = p._popen
        if popen is not None and popen.poll() is not None:
            _children.discard(p)


_fork_popen = None


def _forks_plainly(proc):
    global _fork_popen
    if _fork_popen is None:
        from .context import ForkProcess

        _fork_popen = ForkProcess._Popen
    return type(proc)._Popen is _fork_popen


def _fork_all(procs, started, mask):
    """Starts `procs`, plain fork processes, as their `start()` would, forked back to back (see
    `popen_fork.Popen.launch_all`), appending each to `started` once recorded.

    The caller holds signals (`mask = hold_signals()`, then `mask.release()`) from before the
    forks until it has recorded the children: a Ctrl-C during a fork (its longest step)
    otherwise raised KeyboardInterrupt as `os.fork()` returned, before the pid was kept, and
    the child ran on untracked (10 in 60 interrupted starts in a test). Pending signals are
    handled once released; each child restores `mask` first."""
    for p in procs:
        p._check_startable()
    _cleanup()
    from .popen_fork import Popen

    popens = []
    try:
        Popen.launch_all(procs, popens, mask)
    finally:
        for p, popen in zip(procs, popens, strict=False):  # the started ones
            p._popen = popen
            p._started()
            started.append(p)


class BaseProcess:
    """A unit of work run in a separate process, shaped like `threading.Thread`."""

    def _Popen(self):
        raise TypeError(f"{type(self).__name__} has no start method; use a context's Process")

    def __init__(self, group=None, target=None, name=None, args=(), kwargs={}, *, daemon=None):  # noqa: B006 - the stdlib's signature
        assert group is None, "group argument must be None for now"
        identity = (*_current_process._identity, next(_process_counter))
        self._identity = identity
        self._config = _current_process._config.copy()
        self._parent_pid = os.getpid()
        self._parent_name = _current_process.name
        self._popen = None
        self._closed = False
        self._target = target
        self._args = tuple(args)
        self._kwargs = dict(kwargs)
        self._name = name or f"{type(self).__name__}-{':'.join(map(str, identity))}"
        if daemon is not None:
            self.daemon = daemon
        _dangling.add(self)

    def _check_closed(self):
        if self._closed:
            raise ValueError("process object is closed")

    def run(self):
        """Runs in the child: calls the target. Override in a subclass to do other work."""
        if self._target:
            self._target(*self._args, **self._kwargs)

    def start(self):
        """Starts the child process."""
        if _forks_plainly(self):
            mask = hold_signals()  # until the child is recorded
            try:
                _fork_all([self], [], mask)
            finally:
                mask.release()
            return
        self._check_startable()
        _cleanup()
        self._popen = self._Popen(self)
        self._started()

    def _check_startable(self):
        self._check_closed()
        assert self._popen is None, "cannot start a process twice"
        assert self._parent_pid == os.getpid(), (
            "can only start a process object created by current process"
        )
        assert not _current_process._config.get("daemon"), (
            "daemonic processes are not allowed to have children"
        )

    def _started(self):
        self._sentinel = self._popen.sentinel
        # The child has its own copies; dropping ours lets arguments be collected early.
        del self._target, self._args, self._kwargs
        _children.add(self)

    def terminate(self):
        """Sends SIGTERM to the child."""
        self._check_closed()
        self._popen.terminate()

    def kill(self):
        """Sends SIGKILL to the child."""
        self._check_closed()
        self._popen.kill()

    def join(self, timeout=None):
        """Waits for the child to end, for at most `timeout` seconds when given."""
        self._check_closed()
        assert self._parent_pid == os.getpid(), "can only join a child process"
        assert self._popen is not None, "can only join a started process"
        if self._popen.wait(timeout) is not None:
            _children.discard(self)

    def is_alive(self):
        """Whether the child has started and not yet ended."""
        self._check_closed()
        if self is _current_process:
            return True
        assert self._parent_pid == os.getpid(), "can only test a child process"
        if self._popen is None:
            return False
        if self._popen.poll() is None:
            return True
        _children.discard(self)
        return False

    def close(self):
        """Releases the resources held for a finished child; refuses while it runs."""
        if self._popen is not None:
            if self._popen.poll() is None:
                raise ValueError(
                    "Cannot close a process while it is still running. "
                    "You should first call join() or terminate()."
                )
            self._popen.close()
            self._popen = None
            del self._sentinel
            _children.discard(self)
        self._closed = True

    @property
    def name(self):
        return self._name

    @name.setter
    def name(self, name):
        assert isinstance(name, str), "name must be a string"
        self._name = name

    @property
    def daemon(self):
        """Whether the process is daemonic (terminated, not joined, when its parent exits)."""
        return self._config.get("daemon", False)

    @daemon.setter
    def daemon(self, daemonic):
        assert self._popen is None, "process has already started"
        self._config["daemon"] = daemonic

    @property
    def authkey(self):
        return self._config["authkey"]

    @authkey.setter
    def authkey(self, authkey):
        self._config["authkey"] = AuthenticationString(authkey)

    @property
    def exitcode(self):
        """The exit code, `-N` for death by signal N, or None while running/unstarted."""
        self._check_closed()
        if self._popen is None:
            return None
        return self._popen.poll()

    @property
    def ident(self):
        """The process id, or None before start."""
        self._check_closed()
        if self is _current_process:
            return os.getpid()
        return self._popen and self._popen.pid

    pid = ident

    @property
    def sentinel(self):
        """A file descriptor that becomes readable when the process ends."""
        self._check_closed()
        try:
            return self._sentinel
        except AttributeError:
            raise ValueError("process not started") from None

    def __repr__(self):
        exitcode = None
        if self is _current_process:
            status = "started"
        elif self._closed:
            status = "closed"
        elif self._parent_pid != os.getpid():
            status = "unknown"
        elif self._popen is None:
            status = "initial"
        else:
            exitcode = self._popen.poll()
            status = "started" if exitcode is None else "stopped"
        parts = [type(self).__name__, f"name={self._name!r}"]
        if self._popen is not None:
            parts.append(f"pid={self._popen.pid}")
        parts.append(f"parent={self._parent_pid}")
        parts.append(status)
        if exitcode is not None:
            parts.append(f"exitcode={_exitcode_name(exitcode)}")
        if self.daemon:
            parts.append("daemon")
        return f"<{' '.join(parts)}>"

    def _bootstrap(self, parent_sentinel=None, prepared=None):
        """Runs in the child: becomes the current process, runs `run()`, returns the exit code.

        `prepared` is what `_child_state` made in the parent before a fork: every page a fork
        child writes is a copy-on-write fault (about 3 µs here), so the child only assigns.
        """
        return self._run_child(parent_sentinel, prepared)

    def _run_child(self, parent_sentinel, prepared, entered=False, entry_error=None, ran=None):
        """`_bootstrap`'s body. From the native entry of a fork child (`ForkChild.run`),
        `entered` is true: `_enter_child`'s work is done, or failed with `entry_error`; and
        `ran` is True when `run()` has returned, or the exception it raised."""
        util = _util
        try:
            if entry_error is not None:
                raise entry_error
            if not entered:
                self._enter_child(parent_sentinel, prepared)
            if util._logger and ran is None:
                util.info("child process calling self.run()")
            try:
                if ran is None:
                    self.run()
                elif ran is not True:
                    raise ran  # the exception `self.run()` raised, in the native entry
                exitcode = 0
            finally:
                if util._finalizer_registry or _children or util._logger:
                    util._exit_function()
                else:
                    # What `_exit_function` would do with nothing registered, no child and
                    # no logger.
                    util._exiting = True
                std_util = _stdlib_module("util")  # maybe first imported by `run()`
                if std_util is not None:
                    std_process = _stdlib_module("process")
                    if std_util._finalizer_registry or (
                        std_process is not None and std_process._children
                    ):
                        # Stdlib objects used here (a stdlib Queue handed over by a
                        # concurrent.futures executor, say) flush and join through its hooks.
                        std_util._exit_function()
        except SystemExit as e:
            if e.code is None:
                exitcode = 0
            elif isinstance(e.code, int):
                exitcode = e.code
            else:
                sys.stderr.write(f"{e.code}\n")
                exitcode = 1
        except BaseException:
            exitcode = 1
            import traceback

            sys.stderr.write(f"Process {self.name}:\n")
            traceback.print_exc()
        finally:
            threading = sys.modules.get("threading")
            if threading is not None:
                threading._shutdown()
            if util._logger:
                util.info(f"process exiting with exitcode {exitcode}")
            util._flush_std_streams()
            # Large arrays received from a queue and still referenced (by a global, say) hold
            # their blobs of the queue's memory: give them back for the processes that go on.
            _release_received_buffers()
        return exitcode

    def _enter_child(self, parent_sentinel, prepared):
        """The child's bookkeeping before `run()`: it becomes the current process of a fresh
        process tree, with /dev/null as stdin. `ForkChild.run` does the same natively when
        `_fork_entry` found the common case."""
        # Module references instead of `from . import`: the import machinery is Python code.
        context, util = _context, _util
        global _current_process, _parent_process, _process_counter, _children
        if self._start_method is not None:
            context._force_start_method(self._start_method)
        if prepared is None:
            prepared = self._child_state(parent_sentinel)
        _process_counter, _children, _parent_process = prepared
        util._close_stdin()
        _current_process = self
        self._enter_child_hooks()

    def _enter_child_hooks(self):
        """The part of `_enter_child` for what the parent had loaded or registered (see
        `_fork_entry`)."""
        threading = sys.modules.get("threading")
        if threading is not None and threading._HAVE_THREAD_NATIVE_ID:
            threading.main_thread()._set_native_id()
        std_process = _stdlib_module("process")
        if std_process is not None:
            # The stdlib's bookkeeping was copied from the parent too: its children are
            # not ours to join at exit. Its `current_process()` is this process, as in a
            # child the stdlib started (`logging` names records after it).
            std_process._process_counter = itertools.count(1)
            std_process._children = set()
            std_process._current_process = self
            std_process._parent_process = _parent_process
        logging = sys.modules.get("logging")
        if logging is not None:
            _name_log_records(logging)
        elif _LoggingImport not in sys.meta_path:
            sys.meta_path.insert(0, _LoggingImport)
        self._after_fork()

    def _child_state(self, parent_sentinel):
        """A fresh child's process counter, set of children and parent handle."""
        parent = _ParentProcess(self._parent_name, self._parent_pid, parent_sentinel)
        return itertools.count(1), set(), parent

    @staticmethod
    def _after_fork():
        util = _util
        if util._finalizer_registry:
            util._finalizer_registry.clear()
        if util._afterfork_registry.data:  # its len() is Python code
            util._run_after_forkers()
        std_util = _stdlib_module("util")
        if std_util is not None:
            # Stdlib objects inherited by fork (locks, queues) reset themselves through the
            # stdlib's own after-fork registry.
            std_util._finalizer_registry.clear()
            if std_util._afterfork_registry:
                std_util._run_after_forkers()


# The stdlib's multiprocessing modules, remembered once seen: tools that alias
# `sys.modules["multiprocessing.*"]` to ferroproc afterwards must not hide them from us.
_stdlib_modules: dict = {}


def _name_log_records(logging):
    """Makes this child's log records carry its name (``%(processName)s``). `logging` takes it
    from ``sys.modules["multiprocessing"].current_process()``: the stdlib's, which is not
    loaded in many ferroproc children and, when a child loads it, names the process
    "MainProcess". Records with that name get the current ferroproc process's instead."""
    global _log_make
    make = logging.getLogRecordFactory()
    if make is _log_factory:  # a fork of a child that installed it
        return
    _log_make = make
    logging.setLogRecordFactory(_log_factory)


def _log_factory(*args, **kwargs):
    """The record factory of a ferroproc child (see `_name_log_records`); one function, set
    up without allocating in the child (each page it writes is a copy-on-write fault)."""
    record = _log_make(*args, **kwargs)
    if record.processName == "MainProcess":
        record.processName = _current_process.name
    return record


_log_make = None


class _AfterImport:
    """A meta path finder that runs ``callback(module)`` right after the first import of the
    module `name`, which goes through the usual finders and loader. It leaves
    `sys.meta_path` at that import. See `after_import`."""

    __slots__ = ("callback", "name")

    def __init__(self, name, callback):
        self.name = name
        self.callback = callback

    def find_spec(self, name, path=None, target=None):
        if name != self.name:
            return None
        try:
            sys.meta_path.remove(self)
        except ValueError:
            pass
        import importlib.util

        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _CallbackLoader(spec.loader, self.callback)
        return spec


class _CallbackLoader:
    """Loads a module with `loader`, then calls `callback` with it."""

    def __init__(self, loader, callback):
        self._loader = loader
        self._callback = callback

    def __getattr__(self, name):  # get_source, get_filename, is_package, ...
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        self._callback(module)


def after_import(name, callback):
    """Calls ``callback(module)`` once module `name` is imported: now if it is loaded, else
    right after its first import (without importing it, nor anything, meanwhile)."""
    module = sys.modules.get(name)
    if module is not None:
        callback(module)
    else:
        sys.meta_path.insert(0, _AfterImport(name, callback))


#: For a child that has not loaded `logging`: its records are named once it is imported.
_LoggingImport = _AfterImport("logging", _name_log_records)


def _fork_entry():
    """The entry flags of children forked now (see `ForkChild.run`, which defines them),
    decided in the parent: their state is its state, and reading it here costs a child
    nothing. Run `_enter_child_hooks` when `threading`, `logging` or the stdlib's package is
    loaded or after-fork callbacks are registered; else add `_LoggingImport` to
    `sys.meta_path` and clear `util._finalizer_registry`; and swap in the spare stdin
    `util._prepare_fork_stdin` made. Worked out natively (`ForkChild.entry_flags`): a
    forkserver's child does it too, after unpickling its process."""
    return _native_entry().entry_flags()


def _native_entry():
    """The native entry of fork children (`ForkChild`), made once by a process that forks
    them (a forkserver, or a parent at its first fork)."""
    global _native_child
    if _native_child is None:
        from . import context, util
        from ._ferroproc import ForkChild

        _native_child = ForkChild(
            globals(),
            vars(util),
            context._default_context,
            context._concrete_contexts,
            _LoggingImport,
        )
    return _native_child


_native_child = None


def _stdlib_module(name):
    """The stdlib's `multiprocessing.<name>` if it is loaded (never ferroproc's own)."""
    mod = _stdlib_modules.get(name)
    if mod is None:
        mod = sys.modules.get(f"multiprocessing.{name}")
        if mod is None or mod.__name__.startswith("ferroproc"):
            return None
        _stdlib_modules[name] = mod
    return mod


for _name in ("context", "process", "reduction", "util"):
    _stdlib_module(_name)
del _name


class AuthenticationString(bytes):
    """A process's authentication key: bytes that refuse to be pickled except to a new child."""

    def __reduce__(self):
        from .context import get_spawning_popen

        if get_spawning_popen() is None:
            raise TypeError(
                "Pickling an AuthenticationString object is disallowed for security reasons"
            )
        return AuthenticationString, (bytes(self),)


class _ParentProcess(BaseProcess):
    """The parent as seen from a child: pid, name, and a sentinel to watch it."""

    def __init__(self, name, pid, sentinel):
        self._identity = ()
        self._name = name
        self._pid = pid
        self._parent_pid = None
        self._popen = None
        self._closed = False
        self._sentinel = sentinel
        self._config = {}

    def is_alive(self):
        from ._ferroproc import wait_readable

        return self._sentinel is not None and not wait_readable([self._sentinel], 0)

    @property
    def ident(self):
        return self._pid

    def join(self, timeout=None):
        """Waits until the parent process ends."""
        from ._ferroproc import wait_readable

        if self._sentinel is not None:
            wait_readable([self._sentinel], timeout)

    pid = ident


class _MainProcess(BaseProcess):
    def __init__(self):
        self._identity = ()
        self._name = "MainProcess"
        self._parent_pid = None
        self._popen = None
        self._closed = False
        self._config = {"authkey": AuthenticationString(os.urandom(32)), "semprefix": "/mp"}

    def close(self):
        pass


_parent_process = None
_current_process = _MainProcess()
if _stdlib_module("process") is not None:
    # Both libraries' main processes share one authkey, so children started by either one
    # authenticate with the other's helpers (the stdlib's resource sharer). A spawned child
    # replaces it with the inherited key while it prepares.
    _current_process._config["authkey"] = AuthenticationString(
        _stdlib_module("process").current_process().authkey
    )
_process_counter = itertools.count(1)
_children: set = set()
del _MainProcess

_exitcode_names: dict = {}


def _exitcode_name(code):
    """`-SIGTERM` style names for death-by-signal exit codes (built on first use)."""
    if not _exitcode_names:
        import signal

        _exitcode_names.update(
            {-int(sig): f"-{sig.name}" for sig in signal.Signals if "_" not in sig.name}
        )
    return _exitcode_names.get(code, code)


_dangling = WeakSet()

# Set by `util` and `context` when they are imported (they import this module).
_util = None
_context = None

try:
    ORIGINAL_DIR = os.path.abspath(os.getcwd())
except OSError:
    ORIGINAL_DIR = None
