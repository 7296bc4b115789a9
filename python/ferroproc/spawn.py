"""The spawn start method's two halves: what the parent sends, and the child's entry point.

A spawned child is a fresh interpreter started by `posix_spawn` of `sys.executable`. It reads
the parent's preparation data (name, authkey, sys.path, cwd, main module) and the pickled
process object from a pipe, re-imports the parent's main module as `__mp_main__`, and runs the
process.
"""

import os
import sys

from . import process, util
from ._ferroproc import load_plain_pickle
from .context import _default_context

__all__ = [
    "freeze_support",
    "get_command_line",
    "get_executable",
    "get_preparation_data",
    "import_main_path",
    "is_forking",
    "prepare",
    "set_executable",
    "spawn_main",
]

WINEXE = False
WINSERVICE = False

_python_exe = None


def set_executable(exe):
    """Sets the interpreter used to start spawn children (None: `sys.executable`)."""
    global _python_exe
    _python_exe = None if exe is None else os.fsencode(exe)


def get_executable():
    return _python_exe


set_executable(sys.executable)


def is_forking(argv):
    """Whether `argv` is a spawn child's command line."""
    return len(argv) >= 2 and argv[1] == "--multiprocessing-fork"


def freeze_support():
    """In a frozen executable started as a child, runs the child and exits; else nothing."""
    if is_forking(sys.argv):
        kwds = {}
        for arg in sys.argv[2:]:
            name, value = arg.split("=")
            kwds[name] = None if value == "None" else int(value)
        spawn_main(**kwds)
        sys.exit()


def get_command_line(**kwds):
    """The command line that starts a spawn child reading its data from `pipe_handle`."""
    from subprocess import _args_from_interpreter_flags

    args = ", ".join(f"{k}={v!r}" for k, v in kwds.items())
    prog = f"from ferroproc.spawn import spawn_main; spawn_main({args})"
    exe = get_executable()
    return [exe, *_args_from_interpreter_flags(), "-c", prog, "--multiprocessing-fork"]


def _parent_sentinel(parent_pid):
    """A descriptor that becomes readable when the parent exits: a pidfd of the parent."""
    if parent_pid is None:
        return None
    try:
        fd = os.pidfd_open(parent_pid)
    except OSError:
        return None
    if os.getppid() != parent_pid:
        # The parent died before we looked: a pidfd of a reused pid would lie.
        os.close(fd)
        r, w = os.pipe()
        os.close(w)
        return r
    return fd


class _DupFd:
    """A descriptor kept open (at the same number) in the spawned child. Defined here, not in
    `popen_spawn_posix`: the child unpickles it, and has this module loaded already."""

    def __init__(self, fd):
        self.fd = fd

    def detach(self):
        return self.fd


def spawn_main(pipe_handle, parent_pid=None, tracker_fd=None):
    """Entry point of a spawned child: run the process sent over `pipe_handle` and exit."""
    assert is_forking(sys.argv), "Not forking"
    sys.exit(_main(pipe_handle, _parent_sentinel(parent_pid)))


def _main(fd, parent_sentinel):
    with os.fdopen(fd, "rb", closefd=True) as from_parent:
        data = from_parent.read()
    process.current_process()._inheriting = True
    try:
        preparation_data, pos = _load(data, 0)
        prepare(preparation_data)
        self, _ = _load(data, pos)
    finally:
        del process.current_process()._inheriting
    # The payload (large arguments included) must not stay alive while the process runs.
    del data, preparation_data
    return self._bootstrap(parent_sentinel)


def _load(data, pos):
    """The object pickled at `pos` in `data` and the position after it. A plain pickle (the
    usual preparation data and process object) is loaded natively: importing `_pickle` would
    import `functools` and `collections` too, a sizeable part of a child's start when the
    program does not use them. Anything else goes to `_pickle`."""
    loaded = load_plain_pickle(data, pos)
    if loaded is not None:
        return loaded
    import _pickle
    import io

    stream = io.BytesIO(data)
    stream.seek(pos)
    return _pickle.load(stream), stream.tell()


def _check_not_importing_main():
    if getattr(process.current_process(), "_inheriting", False):
        raise RuntimeError(
            """
        An attempt has been made to start a new process before the
        current process has finished its bootstrapping phase.

        This probably means that you are not using fork to start your
        child processes and you have forgotten to use the proper idiom
        in the main module:

            if __name__ == '__main__':
                freeze_support()
                ...

        The "freeze_support()" line can be omitted if the program
        is not going to be frozen to produce an executable.

        To fix this issue, refer to the "Safe importing of main module"
        section in https://docs.python.org/3/library/multiprocessing.html
        """
        )


def get_preparation_data(name):
    """What a spawn/forkserver child needs to recreate the parent's import environment."""
    _check_not_importing_main()
    data = {"log_to_stderr": util._log_to_stderr, "authkey": process.current_process().authkey}
    if util._logger is not None:
        data["log_level"] = util._logger.getEffectiveLevel()
    sys_path = [process.ORIGINAL_DIR if p == "" else p for p in sys.path]
    data.update(
        name=name,
        sys_path=sys_path,
        sys_argv=sys.argv,
        orig_dir=process.ORIGINAL_DIR,
        dir=os.getcwd(),
        start_method=_default_context.get_start_method(),
    )
    main_module = sys.modules["__main__"]
    main_name = getattr(main_module.__spec__, "name", None)
    if main_name is not None:
        data["init_main_from_name"] = main_name
    else:
        main_path = getattr(main_module, "__file__", None)
        if main_path is not None:
            if not os.path.isabs(main_path) and process.ORIGINAL_DIR is not None:
                main_path = os.path.join(process.ORIGINAL_DIR, main_path)
            data["init_main_from_path"] = os.path.normpath(main_path)
    return data


old_main_modules: list = []


def prepare(data):
    """Applies preparation data in the child, before the process object is unpickled."""
    current = process.current_process()
    if "name" in data:
        current.name = data["name"]
    if "authkey" in data:
        current.authkey = data["authkey"]
    if data.get("log_to_stderr"):
        util.log_to_stderr()
    if "log_level" in data:
        util.get_logger().setLevel(data["log_level"])
    if "sys_path" in data:
        sys.path = data["sys_path"]
    if "sys_argv" in data:
        sys.argv = data["sys_argv"]
    if "dir" in data:
        os.chdir(data["dir"])
    if "orig_dir" in data:
        process.ORIGINAL_DIR = data["orig_dir"]
    if "start_method" in data:
        _default_context.set_start_method(data["start_method"], force=True)
    if "init_main_from_name" in data:
        _fixup_main_from_name(data["init_main_from_name"])
    elif "init_main_from_path" in data:
        _fixup_main_from_path(data["init_main_from_path"])


def _install_main(run):
    import types

    old_main_modules.append(sys.modules["__main__"])
    main_module = types.ModuleType("__mp_main__")
    main_module.__dict__.update(run())
    sys.modules["__main__"] = sys.modules["__mp_main__"] = main_module


def _fixup_main_from_name(mod_name):
    # A package's __main__ (python -m pkg) is not re-run: it would start the program again.
    if mod_name == "__main__" or mod_name.endswith(".__main__"):
        return
    if getattr(sys.modules["__main__"].__spec__, "name", None) == mod_name:
        return
    import runpy

    _install_main(lambda: runpy.run_module(mod_name, run_name="__mp_main__", alter_sys=True))


def _fixup_main_from_path(main_path):
    if os.path.splitext(os.path.basename(main_path))[0] == "ipython":
        return
    if getattr(sys.modules["__main__"], "__file__", None) == main_path:
        return
    _install_main(lambda: _run_script(main_path, "__mp_main__"))


def _run_script(path, run_name):
    """Runs the script at `path` as module `run_name` and returns a copy of its globals: the
    behaviour of `runpy.run_path(path, run_name=run_name)`, done here for a plain source file
    because runpy's own import of `pkgutil` pulls in `typing`, `re` and `enum`, which was
    about 8 ms of a spawned child's start on the development machine. Anything else (a
    directory or zip file with a ``__main__``, compiled code) still goes through runpy.

    While the code runs, ``sys.modules[run_name]`` is the module being filled and
    ``sys.argv[0]`` is `path`; both are put back afterwards, as runpy does."""
    if not path.endswith((".py", ".pyw")) or not os.path.isfile(path):
        import runpy

        return runpy.run_path(path, run_name=run_name)
    import io
    import types

    with io.open_code(os.path.abspath(os.fsdecode(path))) as f:
        code = compile(f.read(), path, "exec")
    module = types.ModuleType(run_name)
    namespace = module.__dict__
    namespace.update(
        __name__=run_name,
        __file__=path,
        __cached__=None,
        __doc__=None,
        __loader__=None,
        __package__=run_name.rpartition(".")[0],
        __spec__=None,
    )
    missing = object()
    saved_module = sys.modules.get(run_name, missing)
    saved_argv0 = sys.argv[0] if sys.argv else missing
    sys.modules[run_name] = module
    if sys.argv:
        sys.argv[0] = path
    try:
        exec(code, namespace)
    finally:
        if saved_argv0 is not missing:
            sys.argv[0] = saved_argv0
        if saved_module is missing:
            sys.modules.pop(run_name, None)
        else:
            sys.modules[run_name] = saved_module
    return namespace.copy()


def import_main_path(main_path):
    """Imports the script at `main_path` as the main module (`__mp_main__`)."""
    _fixup_main_from_path(main_path)
