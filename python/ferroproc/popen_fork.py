"""Fork start method: `os.fork()` (CPython's at-fork protocol runs), child exits with `_exit`.

The child reports its exit code on a status pipe just before `_exit`, so `join()` returns as
soon as the child's work is done instead of after the kernel has torn its address space down;
the pid is reaped right after, or at the next start/`active_children()` if still exiting.
`sentinel` is a pidfd: readable exactly when the process has ended.
"""

import os
import signal

from . import process, util
from ._ferroproc import read_exit_report, wait_readable, waitpid, write_exit_report

__all__ = ["Popen"]


class Popen:
    """Handle on a child started by fork."""

    method = "fork"

    def __init__(self, process_obj):
        util._flush_std_streams()
        if process._unreaped:
            process._reap_unreaped()
        self.returncode = None
        self.finalizer = None
        self._report = None
        self._launch(process_obj)

    def duplicate_for_child(self, fd):
        return fd

    def _set_returncode(self, code, reaped):
        self.returncode = code
        if not reaped:
            try:
                if waitpid(self.pid, False) is None:
                    process._unreaped.add(self.pid)
            except ChildProcessError:
                pass

    def _collect(self, ready_pidfd):
        """Records the exit code if the child has reported or ended; returns it or None."""
        if self._report is not None:
            try:
                code = read_exit_report(self._report)
            except EOFError:
                code = None
                ready_pidfd = True
            if code is not None:
                self._set_returncode(code, reaped=False)
                return code
        if ready_pidfd:
            try:
                code = waitpid(self.pid, True)
            except ChildProcessError:
                # Reaped behind our back (e.g. os.waitpid(-1) by user code): nothing to learn.
                code = None
            if code is not None:
                self._set_returncode(code, reaped=True)
            return code
        return None

    def poll(self, flag=os.WNOHANG):
        if self.returncode is None:
            if flag == 0:
                return self.wait()
            fds = [self.sentinel] if self._report is None else [self._report, self.sentinel]
            ready = wait_readable(fds, 0)
            if ready:
                self._collect(ready_pidfd=(self._report is None or 1 in ready))
        return self.returncode

    def wait(self, timeout=None):
        if self.returncode is None:
            if timeout is not None and timeout < 0:
                timeout = 0
            fds = [self.sentinel] if self._report is None else [self._report, self.sentinel]
            ready = wait_readable(fds, timeout)
            if not ready:
                return None
            self._collect(ready_pidfd=(self._report is None or 1 in ready))
        return self.returncode

    def _send_signal(self, sig):
        if self.returncode is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass
            except OSError:
                if self.wait(timeout=0.1) is None:
                    raise

    def terminate(self):
        self._send_signal(signal.SIGTERM)

    def kill(self):
        self._send_signal(signal.SIGKILL)

    def _launch(self, process_obj):
        code = 1
        report_r, report_w = os.pipe()
        # Prepared here so the child only assigns (its pages are copy-on-write faults): its
        # parent sentinel is our pidfd (inherited), its new stdin a spare wrapper on /dev/null,
        # its process counter, children and parent handle made before the fork.
        parent_sentinel = util._own_pidfd()
        util._prepare_fork_stdin()
        prepared = process_obj._child_state(parent_sentinel)
        self.pid = os.fork()
        if self.pid == 0:
            try:
                os.close(report_r)
                code = process_obj._bootstrap(parent_sentinel, prepared)
            finally:
                try:
                    write_exit_report(report_w, code & 0xFF)
                finally:
                    os._exit(code)
        os.close(report_w)
        self._report = report_r
        self.sentinel = os.pidfd_open(self.pid)
        self.finalizer = util.Finalize(self, util.close_fds, (report_r, self.sentinel))

    def close(self):
        if self.finalizer is not None:
            self.finalizer()
