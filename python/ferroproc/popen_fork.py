"""Fork start method: `os.fork()` (CPython's at-fork protocol runs), child exits with `_exit`.

The child reports its exit code on a status pipe just before `_exit`, so `join()` returns as
soon as the child's work is done instead of after the kernel has torn its address space down;
the pid is reaped right after, or at the next start/`active_children()` if still exiting.
`sentinel` is a pidfd: readable exactly when the process has ended.
"""

import _signal
import os

from . import process, util
from ._ferroproc import read_exit_report, wait_readable, waitpid

__all__ = ["Popen"]


def _before_start():
    util._flush_std_streams()
    if process._unreaped:
        process._reap_unreaped()


def _before_forks():
    """Returns the parent sentinel of children forked next (our pidfd, inherited), and has
    the spare stdin of a forked child made."""
    parent_sentinel = util._own_pidfd()
    util._prepare_fork_stdin()
    return parent_sentinel


def _abandon(pid, report_r):
    """Stops a child this process could not get a handle on, rather than leave it untracked."""
    try:
        os.kill(pid, _signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass
    os.close(report_r)


class Popen:
    """Handle on a child started by fork."""

    method = "fork"

    def __init__(self, process_obj):
        _before_start()
        self._clear()
        self._launch(process_obj)

    def _clear(self):
        self.returncode = None
        self.finalizer = None
        self._report = None

    @classmethod
    def launch_all(cls, process_objs, started, mask):
        """Starts a child for each of `process_objs`, forking them back to back, and appends
        each one's Popen to `started` once it exists (a fork that fails leaves the earlier
        ones there for the caller to finish or stop).

        A page the parent writes between two forks is a copy-on-write fault after each of
        them: a pool's workers started one `start()` at a time cost the parent about 120
        more faults (the first worker's bookkeeping, the next one's process object) than
        forks made together.

        The caller holds signals until it has recorded the children (see
        `process._fork_all`); `mask` is what `hold_signals()` returned, which each child
        releases first."""
        _before_start()
        parent_sentinel = _before_forks()
        prepared = [obj._child_state(parent_sentinel) for obj in process_objs]
        entry = process._fork_entry()
        popens = [cls.__new__(cls) for _ in process_objs]
        for popen in popens:
            popen._clear()
        try:
            for popen, obj, state in zip(popens, process_objs, prepared, strict=True):
                popen._fork(obj, parent_sentinel, state, entry, mask)
                started.append(popen)
        finally:
            for popen in started:
                popen._watch()

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
        self._send_signal(_signal.SIGTERM)

    def kill(self):
        self._send_signal(_signal.SIGKILL)

    def _launch(self, process_obj):
        parent_sentinel = _before_forks()
        prepared = process_obj._child_state(parent_sentinel)
        self._fork(process_obj, parent_sentinel, prepared, process._fork_entry())
        self._watch()

    def _fork(self, process_obj, parent_sentinel, prepared, entry, mask=None):
        # `prepared` was made before the fork so the child only assigns (its pages are
        # copy-on-write faults): its process counter, children and parent handle. `entry`:
        # what the child's native entry does beyond that (`process._fork_entry`). `mask`:
        # the signal mask the caller blocked signals from, for the child to restore.
        child = process._native_entry()  # a local: the child looks nothing up
        report_r, report_w = os.pipe()
        try:
            self.pid = os.fork()
        except BaseException:
            os.close(report_r)
            os.close(report_w)
            raise
        if self.pid == 0:
            try:
                child.run(process_obj, prepared, report_r, report_w, mask, entry)
            finally:
                # Not reached: `run` ends the process. (A Python exception there, unlikely,
                # must not return into the parent's code.)
                os._exit(1)
        # Closed before any other fork: a sibling holding the write end would hide this
        # child's exit from `_collect`.
        os.close(report_w)
        self._report = report_r
        # Opened now, not after the next fork: by then the child may have ended and been
        # reaped (SIGCHLD ignored), or its pid reused.
        try:
            try:
                self.sentinel = os.pidfd_open(self.pid)
            except ProcessLookupError:
                # Ended and reaped by the kernel already: what is left to wait for is its
                # exit report (or the end of file of one that was killed).
                self.sentinel = os.dup(report_r)
        except BaseException:
            _abandon(self.pid, report_r)
            raise

    def _watch(self):
        self.finalizer = util.Finalize(self, util.close_fds, (self._report, self.sentinel))

    def close(self):
        if self.finalizer is not None:
            self.finalizer()
