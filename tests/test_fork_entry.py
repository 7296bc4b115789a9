"""A fork child's start and end, in each state of the parent that changes its path.

ferroproc's fork children, and a forkserver's, enter and leave natively (`ForkChild` in the
native module) when the process they are forked from has loaded neither `threading`,
`logging` nor the stdlib's package, and has no logger or after-fork hooks (the parent's
finalizers are cleared natively, and a stdin the parent prepared a spare for is swapped
natively). Otherwise, or after a `run()` that leaves work (a finalizer, a child, an
exception), they go through `BaseProcess._run_child` in Python. Each variant runs in a
throwaway interpreter, since the test session has `threading` loaded, and the same script
runs on the stdlib.
"""

from __future__ import annotations

import json
import textwrap

import _workers
import pytest

_SCRIPT = textwrap.dedent(
    """
    import json
    import os
    import sys

    VARIANT = sys.argv[1]
    TMP = sys.argv[2]
    METHOD = sys.argv[3]
    if VARIANT == "hooks":
        import logging, threading
    if VARIANT == "stdin":
        import io
        sys.stdin = io.StringIO("parent's input")

    import {impl} as mp
    from {impl} import util

    if VARIANT == "logger":
        import logging
        util.log_to_stderr(logging.INFO)


    def unflushed():
        sys.stdout.write("unflushed-" + VARIANT)


    def fails():
        raise ValueError("boom-" + VARIANT)


    def exits_with_text():
        sys.exit("bye-" + VARIANT)


    def exits_with_code():
        sys.exit(7)


    def finalizes(path):
        util.Finalize(None, _write, (path, "finalized"), exitpriority=1)


    def leaves_child(path):
        mp.get_context(METHOD).Process(target=_write, args=(path, "grandchild")).start()


    def _write(path, text):
        with open(path, "w") as f:
            f.write(text)


    def observes(path):
        parent = mp.parent_process()
        _write(path, json.dumps({{
            "name": mp.current_process().name,
            "parent_pid": parent.pid if parent else None,
            "stdin_read": sys.stdin.read(),
            "children": len(mp.active_children()),
            "start_method": mp.get_start_method(),
            "finalizers": len(util._finalizer_registry),
        }}))


    if __name__ == "__main__":
        ctx = mp.get_context(METHOD)
        results = {{}}
        # Kept: each start after the first has the earlier ones' finalizers registered.
        processes = []
        for name, target, with_path in [
            ("unflushed", unflushed, False),
            ("fails", fails, False),
            ("exits_with_text", exits_with_text, False),
            ("exits_with_code", exits_with_code, False),
            ("finalizes", finalizes, True),
            ("leaves_child", leaves_child, True),
            ("observes", observes, True),
        ]:
            path = os.path.join(TMP, name)
            p = ctx.Process(target=target, args=(path,) if with_path else (), name=name)
            processes.append(p)
            p.start()
            p.join(30)
            written = None
            if os.path.exists(path):
                with open(path) as f:
                    written = f.read()
            results[name] = {{"exitcode": p.exitcode, "written": written}}
        entry = None
        if mp.__name__ == "ferroproc":
            from ferroproc import process
            entry = process._fork_entry()
        stdin_fd0 = sys.stdin is sys.__stdin__ and sys.stdin is not None and not sys.stdin.closed
        sys.stdout.flush()
        print()
        print(json.dumps({{
            "results": results, "parent_pid": os.getpid(), "entry": entry, "stdin_fd0": stdin_fd0,
        }}))
    """
)

VARIANTS = ["plain", "hooks", "stdin", "logger"]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("method", ["fork", "forkserver"])
@pytest.mark.parametrize("impl", ["multiprocessing", "ferroproc"])
def test_fork_child_start_and_end(impl, method, variant, tmp_path):
    script = tmp_path / "script.py"
    script.write_text(_SCRIPT.format(impl=impl))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    argv = [str(script), variant, str(out_dir), method]
    done, leftovers = _workers.run_interpreter(argv, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert leftovers == []
    report = json.loads(done.stdout.splitlines()[-1])
    results = report["results"]

    # Output a child left in its buffer is flushed before it ends.
    assert results["unflushed"]["exitcode"] == 0
    assert f"unflushed-{variant}" in done.stdout
    # An exception is printed after the process's name, and exits with 1.
    assert results["fails"]["exitcode"] == 1
    assert "Process fails:" in done.stderr
    assert f"ValueError: boom-{variant}" in done.stderr
    assert results["exits_with_text"]["exitcode"] == 1
    assert f"bye-{variant}" in done.stderr
    assert results["exits_with_code"]["exitcode"] == 7
    # Work `run()` leaves behind is done before the end: finalizers, non-daemon children.
    assert results["finalizes"] == {"exitcode": 0, "written": "finalized"}
    assert results["leaves_child"] == {"exitcode": 0, "written": "grandchild"}
    observed = json.loads(results["observes"]["written"])
    assert observed == {
        "name": "observes",
        "parent_pid": report["parent_pid"],
        "stdin_read": "",
        "children": 0,
        "start_method": method,
        "finalizers": 0,
    }
    if impl == "ferroproc" and method == "fork":
        # The path each variant took: native hooks or not, a spare stdin or not.
        from ferroproc import _ferroproc

        if variant in ("hooks", "logger"):
            hooks = _ferroproc.ENTRY_HOOKS
        else:
            hooks = _ferroproc.ENTRY_LOG_HOOK | _ferroproc.ENTRY_CLEAR_FINALIZERS
        spare = _ferroproc.ENTRY_SPARE_STDIN if report["stdin_fd0"] else 0
        assert report["entry"] == hooks | spare
        assert report["stdin_fd0"] == (variant != "stdin")
    if variant == "logger":
        assert "child process calling self.run()" in done.stderr
        assert "process exiting with exitcode 0" in done.stderr


_HUGE_EXIT = textwrap.dedent(
    """
    import sys
    import ferroproc as mp

    def exits_huge():
        sys.exit(2**40)

    if __name__ == "__main__":
        p = mp.get_context("fork").Process(target=exits_huge)
        p.start()
        p.join(30)
        print("exitcode", p.exitcode)
    """
)


def test_fork_child_exit_code_beyond_a_c_int_ends_the_child(tmp_path):
    # ferroproc only: the stdlib's child (and ferroproc's before the native entry) passed
    # 2**40 to `os._exit`, whose OverflowError sent the child back into its parent's code
    # after `start()`: it printed a traceback there and exited through the parent's exit.
    # The status is the low byte, as `exit(2)` keeps it.
    script = tmp_path / "huge.py"
    script.write_text(_HUGE_EXIT)
    done, leftovers = _workers.run_interpreter([str(script)], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert leftovers == []
    assert done.stdout.splitlines() == ["exitcode 0"]
    assert "Traceback" not in done.stderr
