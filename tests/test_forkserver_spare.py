"""ferroproc's forkserver keeps one child forked ahead of the next request (the *spare*).

These tests are ferroproc-only: the stdlib's server forks on request and has no spare. Each runs
in a sacrificial interpreter, because they kill or stop the forkserver, and the interpreter's
whole session is checked for leftovers afterwards (a spare that outlived its server would be one).
"""

from __future__ import annotations

import textwrap

import _workers as w
import pytest

pytestmark = pytest.mark.timeout(120)

# Helpers the scripts share: the server's children by name, and bounded waits.
PRELUDE = """
import os, signal, time
from ferroproc.forkserver import _forkserver
from _workers import FORKSERVER_SPARE, SHORT_TIMEOUT, is_forkserver_spare, noop, proc_table

def spares(server):
    deadline = time.monotonic() + SHORT_TIMEOUT
    while True:
        found = [
            pid
            for pid, (state, ppid, _) in proc_table().items()
            if ppid == server and state not in ("Z", "X") and is_forkserver_spare(pid)
        ]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.01)

def gone(pid):
    deadline = time.monotonic() + SHORT_TIMEOUT
    while time.monotonic() < deadline:
        if not os.path.exists(f"/proc/{pid}"):
            return True
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                return True
        time.sleep(0.01)
    return False

def run_one(ctx):
    p = ctx.Process(target=noop)
    p.start()
    p.join(SHORT_TIMEOUT)
    assert p.exitcode == 0, p.exitcode
    return p.pid

# A forkserver context whose server has run one child: (ctx, server pid, spare pids).
def started():
    ctx = mp.get_context("forkserver")
    run_one(ctx)
    server = _forkserver._forkserver_pid
    return ctx, server, spares(server)
"""


def run(body):
    source = w.script_source("ferroproc", PRELUDE + textwrap.dedent(body))
    result, leftovers = w.run_interpreter(["-c", source])
    assert result.returncode == 0, result.stderr
    assert not leftovers, f"processes outlived the interpreter: {leftovers}"
    return result.stdout.split()


def test_the_next_child_is_the_waiting_spare():
    out = run(
        """
        if __name__ == "__main__":
            ctx, server, first = started()
            assert len(first) == 1, first
            pid = run_one(ctx)
            # The child that ran is the process that was waiting, and a new one waits now.
            assert pid == first[0], (pid, first)
            second = spares(server)
            assert len(second) == 1 and second != first, (first, second)
            print("ok")
        """
    )
    assert out == ["ok"]


def test_the_spare_has_the_unpickler_loaded_before_its_request():
    # A child unpickles its process; the server imports `_pickle` so that no child imports it
    # (with `functools` and `collections`, ~4 ms here) after the fork. The spare is a fork of
    # the server taken before any request: its mappings show what every child starts with.
    out = run(
        """
        import sys
        if __name__ == "__main__":
            ctx, server, spare = started()
            if "_pickle" in sys.builtin_module_names:
                print("builtin")
            else:
                with open(f"/proc/{spare[0]}/maps") as f:
                    print(any("/_pickle." in line for line in f))
        """
    )
    assert out in (["True"], ["builtin"])


def test_a_started_child_no_longer_looks_like_a_spare():
    out = run(
        """
        import _workers
        if __name__ == "__main__":
            ctx, _, _ = started()
            ready = ctx.Event()
            release = ctx.Event()
            p = ctx.Process(target=_workers.set_and_wait, args=(ready, release))
            p.start()
            assert ready.wait(SHORT_TIMEOUT)
            with open(f"/proc/{p.pid}/comm") as f:
                name = f.read().strip()
            release.set()
            p.join(SHORT_TIMEOUT)
            print(name != FORKSERVER_SPARE, p.exitcode)
        """
    )
    assert out == ["True", "0"]


def test_a_killed_server_takes_its_spare_along_and_is_replaced():
    out = run(
        """
        if __name__ == "__main__":
            ctx, server, (spare,) = started()
            os.kill(server, signal.SIGKILL)
            print(gone(spare))
            run_one(ctx)
            print(_forkserver._forkserver_pid != server)
        """
    )
    assert out == ["True", "True"]


def test_a_killed_spare_is_replaced():
    out = run(
        """
        if __name__ == "__main__":
            ctx, server, (spare,) = started()
            os.kill(spare, signal.SIGKILL)
            assert gone(spare)
            pids = [run_one(ctx) for _ in range(3)]
            print(spare not in pids, len(spares(server)), _forkserver._forkserver_pid == server)
        """
    )
    assert out == ["True", "1", "True"]


def test_stopping_the_server_stops_its_spare():
    out = run(
        """
        if __name__ == "__main__":
            ctx, server, (spare,) = started()
            _forkserver._stop()
            print(gone(server), gone(spare))
        """
    )
    assert out == ["True", "True"]
