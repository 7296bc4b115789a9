"""Forkserver start method: a clean server process forks the child on request."""

import os

from . import forkserver, popen_fork, util
from ._ferroproc import read_exit_report, wait_readable
from .forkserver import _DupFd
from .popen_spawn_posix import pickle_for_child

__all__ = ["Popen"]


class Popen(popen_fork.Popen):
    """Handle on a child forked by the forkserver. `sentinel` is the child's status pipe: the
    child writes its exit code there, and the server writes it again once it reaps the child,
    so abnormal deaths are reported too."""

    method = "forkserver"
    DupFd = _DupFd

    def __init__(self, process_obj):
        self._fds = []
        super().__init__(process_obj)

    def duplicate_for_child(self, fd):
        self._fds.append(fd)
        return len(self._fds) - 1

    def _launch(self, process_obj):
        prep, _, process_pickled = pickle_for_child(self, process_obj, prep_pickled=False)
        status_r, status_w = os.pipe()
        try:
            self.pid = forkserver.request(prep, process_pickled, [status_w, *self._fds])
        except BaseException:
            os.close(status_r)
            raise
        finally:
            os.close(status_w)
        self.sentinel = status_r
        self.finalizer = util.Finalize(self, util.close_fds, (status_r,))

    def _collect(self, ready_pidfd):
        try:
            code = read_exit_report(self.sentinel)
        except EOFError:
            # The server went away without reporting (it was killed): the exit code is lost.
            code = 255
        if code is not None:
            self.returncode = code
        return self.returncode

    def poll(self, flag=os.WNOHANG):
        if self.returncode is None:
            if flag == 0:
                return self.wait()
            if wait_readable([self.sentinel], 0):
                self._collect(True)
        return self.returncode

    def wait(self, timeout=None):
        if self.returncode is None:
            if timeout is not None and timeout < 0:
                timeout = 0
            if not wait_readable([self.sentinel], timeout):
                return None
            self._collect(True)
        return self.returncode
