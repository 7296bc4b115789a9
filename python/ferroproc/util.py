"""Helpers shared by the package: logging, finalizers, after-fork hooks, exit handling.

Names and behaviour follow `multiprocessing.util`, so code that configures
`multiprocessing.get_logger()` or registers `Finalize` callbacks keeps working.
"""

import _thread
import atexit
import itertools
import os
import sys
import weakref

from . import process

__all__ = [
    "SUBDEBUG",
    "SUBWARNING",
    "Finalize",
    "ForkAwareLocal",
    "ForkAwareThreadLock",
    "close_all_fds_except",
    "debug",
    "get_logger",
    "get_temp_dir",
    "info",
    "is_abstract_socket_namespace",
    "is_exiting",
    "log_to_stderr",
    "register_after_fork",
    "sub_debug",
    "sub_warning",
]

NOTSET = 0
SUBDEBUG = 5
DEBUG = 10
INFO = 20
SUBWARNING = 25

# The stdlib's logger name: existing logging configuration keeps applying after the import swap.
LOGGER_NAME = "multiprocessing"
DEFAULT_LOGGING_FORMAT = "[%(levelname)s/%(processName)s] %(message)s"

_logger = None
_log_to_stderr = False


def sub_debug(msg, *args):
    if _logger:
        _logger.log(SUBDEBUG, msg, *args, stacklevel=2)


def debug(msg, *args):
    if _logger:
        _logger.log(DEBUG, msg, *args, stacklevel=2)


def info(msg, *args):
    if _logger:
        _logger.log(INFO, msg, *args, stacklevel=2)


def sub_warning(msg, *args):
    if _logger:
        _logger.log(SUBWARNING, msg, *args, stacklevel=2)


def get_logger():
    """The package logger (named like the stdlib's), created on first use."""
    global _logger
    import logging

    with logging._lock if hasattr(logging, "_lock") else _LoggingLock():
        if not _logger:
            from ._ferroproc import init_logging

            init_logging()
            _logger = logging.getLogger(LOGGER_NAME)
            _logger.propagate = 0  # the stdlib sets 0, and users may print it
            # Our exit handler must run before logging's own shutdown flushes handlers.
            atexit.unregister(_exit_function)
            atexit.register(_exit_function)
    return _logger


class _LoggingLock:
    """Holds logging's module lock (3.11 exposes it only through acquire/release helpers)."""

    def __enter__(self):
        import logging

        logging._acquireLock()

    def __exit__(self, *exc):
        import logging

        logging._releaseLock()


def log_to_stderr(level=None):
    """Adds a stderr handler with the stdlib's format to the package logger and returns it."""
    global _log_to_stderr
    import logging

    logger = get_logger()
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(DEFAULT_LOGGING_FORMAT))
    logger.addHandler(handler)
    if level:
        logger.setLevel(level)
    _log_to_stderr = True
    return _logger


def _platform_supports_abstract_sockets():
    return sys.platform == "linux"


def is_abstract_socket_namespace(address):
    """Whether an AF_UNIX address lives in Linux's abstract namespace (leading NUL)."""
    if not address:
        return False
    if isinstance(address, bytes):
        return address[0] == 0
    if isinstance(address, str):
        return address[0] == "\0"
    raise TypeError(f"address type of {address!r} unrecognized")


abstract_sockets_supported = _platform_supports_abstract_sockets()


def _remove_temp_dir(rmtree, tempdir):
    rmtree(tempdir)
    current = process.current_process()
    if current is not None:
        current._config["tempdir"] = None


def get_temp_dir():
    """A private temporary directory for this process, removed at exit."""
    tempdir = process.current_process()._config.get("tempdir")
    if tempdir is None:
        import shutil
        import tempfile

        tempdir = tempfile.mkdtemp(prefix="pymp-")
        info("created temp directory %s", tempdir)
        # Registered with a priority below every default so it runs last.
        Finalize(None, _remove_temp_dir, args=(shutil.rmtree, tempdir), exitpriority=-100)
        process.current_process()._config["tempdir"] = tempdir
    return tempdir


_afterfork_registry: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_afterfork_counter = itertools.count()


def _run_after_forkers():
    if not _afterfork_registry:
        return
    for (_index, _ident, func), obj in sorted(_afterfork_registry.items()):
        try:
            func(obj)
        except Exception as e:
            info("after forker raised exception %s", e)


def register_after_fork(obj, func):
    """Calls `func(obj)` in every child started by fork, while `obj` is alive."""
    _afterfork_registry[(next(_afterfork_counter), id(obj), func)] = obj


_finalizer_registry: dict = {}
_finalizer_counter = itertools.count()


class Finalize:
    """Runs `callback(*args, **kwargs)` once: when `obj` is collected, when called, or at exit.

    Finalizers with an `exitpriority` run at exit, highest priority first and, within a
    priority, newest first. A finalizer only ever runs in the process that created it.
    """

    def __init__(self, obj, callback, args=(), kwargs=None, exitpriority=None):
        if exitpriority is not None and not isinstance(exitpriority, int):
            raise TypeError(
                f"Exitpriority ({exitpriority!r}) must be None or int, not {type(exitpriority)!s}"
            )
        if obj is not None:
            self._weakref = weakref.ref(obj, self)
        elif exitpriority is None:
            raise ValueError("Without object, exitpriority cannot be None")
        self._callback = callback
        self._args = args
        self._kwargs = kwargs or {}
        self._key = (exitpriority, next(_finalizer_counter))
        self._pid = os.getpid()
        _finalizer_registry[self._key] = self

    def __call__(self, wr=None, _registry=_finalizer_registry, getpid=os.getpid):
        """Runs the callback unless it already ran or was cancelled; returns its result."""
        if _registry.pop(self._key, None) is None:
            sub_debug("finalizer no longer registered")
            return None
        res = None
        if self._pid == getpid():
            sub_debug("finalizer calling %s with args %s", self._callback, self._args)
            res = self._callback(*self._args, **self._kwargs)
        else:
            sub_debug("finalizer ignored because different process")
        self._weakref = self._callback = self._args = self._kwargs = self._key = None
        return res

    def cancel(self):
        """Forgets the callback without running it."""
        if _finalizer_registry.pop(self._key, None) is not None:
            self._weakref = self._callback = self._args = self._kwargs = self._key = None

    def still_active(self):
        """Whether the callback has neither run nor been cancelled."""
        return self._key in _finalizer_registry

    def __repr__(self):
        try:
            obj = self._weakref()
        except (AttributeError, TypeError):
            obj = None
        if obj is None:
            return f"<{type(self).__name__} object, dead>"
        text = f"<{type(self).__name__} object, callback="
        text += str(getattr(self._callback, "__name__", self._callback))
        if self._args:
            text += f", args={self._args}"
        if self._kwargs:
            text += f", kwargs={self._kwargs}"
        if self._key[0] is not None:
            text += f", exitpriority={self._key[0]}"
        return text + ">"


def _run_finalizers(minpriority=None):
    """Runs finalizers that have an exit priority (at least `minpriority` when given)."""
    if not _finalizer_registry:
        return
    keys = [
        k
        for k in list(_finalizer_registry)
        if k[0] is not None and (minpriority is None or k[0] >= minpriority)
    ]
    for key in sorted(keys, reverse=True):
        finalizer = _finalizer_registry.get(key)
        if finalizer is not None:
            sub_debug("calling %s", finalizer)
            try:
                finalizer()
            except Exception:
                import traceback

                traceback.print_exc()
    if minpriority is None:
        _finalizer_registry.clear()


_exiting = False


def is_exiting():
    """Whether the process is shutting down."""
    return _exiting or _exiting is None


def _exit_function(
    info=info,
    debug=debug,
    _run_finalizers=_run_finalizers,
    active_children=process.active_children,
    current_process=process.current_process,
):
    # At exit: high-priority finalizers, then terminate daemonic children and join the others,
    # then the remaining finalizers -- the stdlib's order.
    global _exiting
    if _exiting:
        return
    _exiting = True
    info("process shutting down")
    debug('running all "atexit" finalizers with priority >= 0')
    _run_finalizers(0)
    if current_process() is not None:
        for p in active_children():
            if p.daemon:
                info("calling terminate() for daemon %s", p.name)
                p._popen.terminate()
        for p in active_children():
            info("calling join() for process %s", p.name)
            p.join()
    debug('running the remaining "atexit" finalizers')
    _run_finalizers()


atexit.register(_exit_function)


class ForkAwareThreadLock:
    """A thread lock that is fresh (unlocked) in every forked child."""

    def __init__(self):
        self._lock = _thread.allocate_lock()
        self.acquire = self._lock.acquire
        self.release = self._lock.release
        register_after_fork(self, ForkAwareThreadLock._at_fork_reinit)

    def _at_fork_reinit(self):
        self._lock._at_fork_reinit()

    def __enter__(self):
        return self._lock.__enter__()

    def __exit__(self, *args):
        return self._lock.__exit__(*args)


class ForkAwareLocal(_thread._local):
    """Thread-local storage that is emptied in forked children."""

    def __init__(self):
        register_after_fork(self, lambda obj: obj.__dict__.clear())

    def __reduce__(self):
        return type(self), ()


try:
    MAXFD = os.sysconf("SC_OPEN_MAX")
except (ValueError, OSError):
    MAXFD = 256


def close_all_fds_except(fds):
    """Closes every descriptor from 0 up to MAXFD except those in `fds`."""
    keep = sorted({-1, MAXFD, *fds})
    for lo, hi in itertools.pairwise(keep):
        os.closerange(lo + 1, hi)


_own_pidfds: dict = {}


def _own_pidfd():
    """A pidfd of this process, opened once: children watch it to learn when we exit."""
    pid = os.getpid()
    fd = _own_pidfds.get(pid)
    if fd is None:
        # Entries of other pids were inherited from a parent by fork; their fds stay open
        # because a forked child uses its parent's pidfd as its parent sentinel.
        _own_pidfds.clear()
        fd = _own_pidfds[pid] = os.pidfd_open(pid)
    return fd


# Made in the parent before a fork, so a forked child replaces stdin with /dev/null without
# allocating or asking stdin for its descriptor (every page a fork child writes is a
# copy-on-write fault): a descriptor open on /dev/null, a spare text wrapper for descriptor 0,
# and the `sys.stdin` seen reading descriptor 0. A child that uses the spare forgets it, so its
# own children get a fresh one.
_devnull_fd = None
_spare_stdin = None
_fd0_stdin = None
# The /dev/null `sys.stdin` that `_close_stdin` opened last (in this process or an ancestor),
# and the (device, inode) of its descriptor then.
_devnull_stdin = None
_devnull_stdin_id = None


def _prepare_fork_stdin():
    global _devnull_fd, _spare_stdin, _fd0_stdin
    stdin = sys.stdin
    try:
        if stdin is None or stdin.closed:
            # A closed stdin no longer owns descriptor 0 (it may be reused by a pipe): the
            # child keeps descriptor 0 as it is and opens /dev/null elsewhere.
            _fd0_stdin = None
            return
        if stdin is _fd0_stdin and _spare_stdin is not None:
            return
        if stdin.fileno() != 0:
            return
        if _devnull_fd is None:
            _devnull_fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        if _spare_stdin is None:
            _spare_stdin = open(0, encoding="utf-8", closefd=False)
    except (AttributeError, OSError, ValueError):
        return
    _fd0_stdin = stdin


def _close_stdin():
    global _spare_stdin, _fd0_stdin, _devnull_stdin, _devnull_stdin_id
    stdin = sys.stdin
    if stdin is None:
        return
    if stdin is _devnull_stdin and not stdin.closed and _still_devnull(stdin):
        # Made by this function in an ancestor (a forkserver, say): already reading
        # /dev/null, and a fresh one would be no different. Skipped, the child writes fewer
        # pages (the text wrapper and its buffers are a tenth of a forkserver child's
        # copy-on-write faults).
        return
    spare = _spare_stdin
    on_fd0 = spare is not None and stdin is _fd0_stdin
    try:
        stdin.close()
    except (OSError, ValueError):
        pass
    if on_fd0:
        _spare_stdin = _fd0_stdin = None
        try:
            os.dup2(_devnull_fd, 0, False)
        except OSError:
            pass
        else:
            sys.stdin = spare
            return
    try:
        fd = os.open(os.devnull, os.O_RDONLY)
        try:
            sys.stdin = _devnull_stdin = open(fd, encoding="utf-8", closefd=False)
            _devnull_stdin_id = _file_id(fd)
        except BaseException:
            os.close(fd)
            raise
    except (OSError, ValueError):
        pass


def _file_id(fd):
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def _still_devnull(stdin):
    # Its descriptor may have been closed under it, and the number reused.
    try:
        return _file_id(stdin.fileno()) == _devnull_stdin_id
    except (OSError, ValueError):
        return False


def _flush_std_streams():
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, ValueError):
            pass


def spawnv_passfds(path, args, passfds):
    """Starts `path` with `args`, keeping exactly `passfds` open in the child; returns the pid."""
    return _spawnv_passfds(path, args, passfds)


def _spawnv_passfds(path, args, passfds, extra_env=None):
    """`spawnv_passfds`, with `extra_env` (str to str) added to (or overriding) this
    process's environment in the child's."""
    from ._ferroproc import spawn

    environ = dict(os.environb)
    if extra_env:
        environ.update((os.fsencode(k), os.fsencode(v)) for k, v in extra_env.items())
    env = [k + b"=" + v for k, v in environ.items()]
    return spawn(os.fsencode(path), [os.fsencode(a) for a in args], env, sorted(set(passfds)))


def close_fds(*fds):
    """Closes each descriptor."""
    for fd in fds:
        os.close(fd)


def _cleanup_tests():
    """Resets module state between tests (the stdlib's test-support hook)."""
    from . import forkserver

    process._cleanup()
    forkserver._forkserver._stop()
    _run_finalizers()
    process._current_process._config.pop("tempdir", None)


# The child's bootstrap reaches this module without an import statement (see process.py).
process._util = sys.modules[__name__]
