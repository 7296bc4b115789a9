"""ferroproc's forkserver keeps two children forked ahead of the next requests (the *spares*):
the armed one takes the next request, the standby the one after.

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

# The server's waiting spares, once there are `count` (or the time is up).
def spares(server, count=2):
    deadline = time.monotonic() + SHORT_TIMEOUT
    while True:
        found = [
            pid
            for pid, (state, ppid, _) in proc_table().items()
            if ppid == server and state not in ("Z", "X") and is_forkserver_spare(pid)
        ]
        if len(found) >= count or time.monotonic() > deadline:
            return sorted(found)
        time.sleep(0.01)

def gone(pid):
    deadline = time.monotonic() + SHORT_TIMEOUT
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                    return True
        except OSError:  # reaped (ENOENT, or ESRCH while the entry goes)
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
            assert len(first) == 2, first
            pid = run_one(ctx)
            # The child that ran is one of the processes that were waiting; the other still
            # waits, and a new one joins it.
            assert pid in first, (pid, first)
            second = spares(server)
            assert len(second) == 2 and pid not in second, (first, second)
            assert set(first) - {pid} < set(second), (first, second)
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
                with open(f"/proc/{spare[-1]}/maps") as f:
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
            ctx, server, waiting = started()
            os.kill(server, signal.SIGKILL)
            print(all(gone(pid) for pid in waiting) and len(waiting) == 2)
            run_one(ctx)
            print(_forkserver._forkserver_pid != server)
        """
    )
    assert out == ["True", "True"]


def test_a_killed_spare_is_replaced():
    out = run(
        """
        if __name__ == "__main__":
            ctx, server, waiting = started()
            # Both, one after the other: the standby (forked last; another replaces it), then
            # the armed one (the new standby takes over).
            for spare in reversed(waiting):
                os.kill(spare, signal.SIGKILL)
                assert gone(spare)
                time.sleep(0.05)
            pids = [run_one(ctx) for _ in range(3)]
            now = spares(server)
            print(
                not set(waiting) & set(pids + now), len(now), _forkserver._forkserver_pid == server
            )
        """
    )
    assert out == ["True", "2", "True"]


def test_stopping_the_server_stops_its_spare():
    out = run(
        """
        if __name__ == "__main__":
            ctx, server, waiting = started()
            _forkserver._stop()
            print(gone(server), len(waiting) == 2 and all(gone(pid) for pid in waiting))
        """
    )
    assert out == ["True", "True"]


@pytest.mark.parametrize("protocol", [None, 1])
def test_a_server_refuses_a_parent_of_another_build(protocol):
    # A parent still running an older ferroproc than the one a new server imports (upgraded
    # in place) speaks another request format: the server says so and exits, where it would
    # otherwise misread the first request and both sides would wait forever.
    source = f"from ferroproc.forkserver import main; main(0, [], 0, {protocol!r})"
    result, leftovers = w.run_interpreter(["-c", source])
    assert not leftovers, leftovers
    assert result.returncode == 1
    assert "protocol" in result.stderr, result.stderr


def test_a_rehearsal_refuses_a_malformed_payload_and_changes_nothing():
    # `ForkChild.serve` is what a spare runs on its request; rehearsing, it must put back
    # what it set (the name, the inherited descriptors) whether the payload loads or not.
    out = run(
        """
        from ferroproc import process, spawn, forkserver

        if __name__ == "__main__":
            child = process._native_entry()
            fs = forkserver._forkserver
            me = mp.current_process()
            before = (me.name, fs._inherited_fds)
            good = forkserver._make_rehearsal()
            cases = [
                (b"", [-1, -1]),
                ((1000).to_bytes(4, "little") + b"short", [-1, -1]),
                ((12).to_bytes(4, "little") + b"not a pickle" + good[4:], [-1, -1]),
                (good, [-1]),
                (good, [-1, -1, 7]),
            ]
            results = []
            for payload, fds in cases:
                try:
                    child.serve(payload, fds, fs, spawn.prepare, None, True)
                    results.append("ok")
                except Exception as e:
                    results.append(type(e).__name__)
                assert (me.name, fs._inherited_fds) == before, (me.name, fs._inherited_fds)
            print(*results)
        """
    )
    assert out == ["ValueError", "ValueError", "UnpicklingError", "ValueError", "ok"]
