"""Spawn start method: `posix_spawn` of the interpreter running ferroproc's child bootstrap."""

import io
import os

from . import context, popen_fork, process, reduction, spawn, util
from .spawn import _DupFd

__all__ = ["Popen"]


def set_spawning(popen):
    """Marks `popen` as the process being started, for ferroproc's and the stdlib's pickling
    checks (stdlib objects such as a `concurrent.futures` call queue consult the latter)."""
    context.set_spawning_popen(popen)
    std = process._stdlib_module("context")
    if std is not None:
        std.set_spawning_popen(popen)


def pickle_for_child(popen, process_obj, prep_pickled=True):
    """``(prep_data, pickled prep_data, pickled process_obj)``, pickled while `popen` counts as
    spawning (so descriptors and spawning-only objects, the authkey among them, can be handed
    to the child). A child reads the two pickles one after the other. The forkserver, which
    may send the process alone (see its `_payload`), passes `prep_pickled=False` and gets
    None in its place."""
    prep_data = spawn.get_preparation_data(process_obj._name)
    set_spawning(popen)
    try:
        prep = _dumps(prep_data) if prep_pickled else None
        return prep_data, prep, _dumps(process_obj)
    finally:
        set_spawning(None)


def _dumps(obj):
    fp = io.BytesIO()
    reduction.dump(obj, fp)
    return fp.getvalue()


class Popen(popen_fork.Popen):
    """Handle on a child started by spawn. `sentinel` is a pidfd of the child."""

    method = "spawn"
    DupFd = _DupFd

    def __init__(self, process_obj):
        self._fds = []
        super().__init__(process_obj)

    def duplicate_for_child(self, fd):
        self._fds.append(fd)
        return fd

    def _launch(self, process_obj):
        _, prep_pickled, process_pickled = pickle_for_child(self, process_obj)
        child_r = parent_w = None
        try:
            child_r, parent_w = os.pipe()
            cmd = spawn.get_command_line(pipe_handle=child_r, parent_pid=os.getpid())
            self._fds.append(child_r)
            self.pid = util.spawnv_passfds(spawn.get_executable(), cmd, self._fds)
            self.sentinel = os.pidfd_open(self.pid)
            self.finalizer = util.Finalize(self, util.close_fds, (self.sentinel,))
            try:
                with open(parent_w, "wb", closefd=False) as f:
                    f.write(prep_pickled)
                    f.write(process_pickled)
            except BrokenPipeError:
                # The child died before reading; its exit code tells the story.
                pass
        finally:
            for fd in (child_r, parent_w):
                if fd is not None:
                    os.close(fd)
