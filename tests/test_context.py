"""Contexts and start methods.

In-process tests only read start-method state through contexts; everything that sets the global
start method (``set_start_method``, ``get_context(None)``, ``set_executable``) or depends on a
fresh interpreter (``__mp_main__``, forkserver preload, ``os.register_at_fork``) runs in a
sacrificial interpreter.
"""

from __future__ import annotations

import importlib
import multiprocessing
import os
import sys

import _workers as w
import pytest
from _workers import SHORT_TIMEOUT


def finish(p, timeout=SHORT_TIMEOUT):
    p.join(timeout)
    assert not p.is_alive(), f"{p!r} still alive after join({timeout})"
    return p.exitcode


def run_interp(argv, **kwargs):
    result, leftovers = w.run_interpreter(argv, **kwargs)
    assert not leftovers, f"sacrificial interpreter left processes behind: {leftovers}"
    return result


def run_script(impl_name, body, method=None, **kwargs):
    return run_interp(["-c", w.script_source(impl_name, body, method)], **kwargs)


# ---------------------------------------------------------------------------------------------
# In-process
# ---------------------------------------------------------------------------------------------


def test_get_all_start_methods(impl):
    methods = impl.get_all_start_methods()
    assert methods == multiprocessing.get_all_start_methods()
    assert methods == ["fork", "spawn", "forkserver"]


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_get_context(impl, method):
    ctx = impl.get_context(method)
    assert ctx.get_start_method() == method
    assert ctx.get_start_method(allow_none=True) == method
    assert impl.get_context(method).get_start_method() == method
    assert ctx.get_context(method).get_start_method() == method
    assert isinstance(ctx.Process, type)


def test_unknown_start_method_rejected(impl):
    with pytest.raises(ValueError, match="bogus"):
        impl.get_context("bogus")
    with pytest.raises(ValueError, match="bogus"):
        impl.get_context("fork").get_context("bogus")


def _not_built_yet(impl):
    # ferroproc leaves out what it has not implemented yet; test_api_parity.NOT_YET lists it.
    from test_api_parity import NOT_YET

    return set(NOT_YET) if impl.__name__ == "ferroproc" else set()


def test_contexts_expose_reference_names(impl, ctx):
    reference = multiprocessing.get_context(ctx.get_start_method())
    public = [n for n in dir(reference) if not n.startswith("_")]
    missing = [n for n in public if not hasattr(ctx, n)]
    assert set(missing) == _not_built_yet(impl), f"context lacks {missing}"
    not_callable = [
        n
        for n in public
        if n not in missing and callable(getattr(reference, n)) and not callable(getattr(ctx, n))
    ]
    assert not not_callable, f"not callable: {not_callable}"


def test_module_exposes_reference_all(impl):
    missing = [n for n in multiprocessing.__all__ if not hasattr(impl, n)]
    assert set(missing) == _not_built_yet(impl), f"module lacks {missing}"
    assert impl.SUBDEBUG == 5
    assert impl.SUBWARNING == 25


def test_child_reports_its_start_method(ctx, tmp_path):
    out = tmp_path / "r.json"
    p = ctx.Process(target=w.report, args=(w.impl_name_of(ctx), str(out)))
    p.start()
    assert finish(p) == 0
    assert w.read_json(out)["start_method"] == ctx.get_start_method()


def test_freeze_support_is_noop(impl, ctx):
    assert impl.freeze_support() is None
    assert ctx.freeze_support() is None


def test_spawn_children_can_import_workers(ctx):
    p = ctx.Process(target=w.exit_with_sys_path_check)
    p.start()
    assert finish(p) == 0


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_register_after_fork(impl, method):
    """util.register_after_fork callbacks run in fork children (only there)."""
    ctx = impl.get_context(method)
    marker = w.Marker()
    util = importlib.import_module(f"{impl.__name__}.util")
    util.register_after_fork(marker, w.mark_after_fork)
    p = ctx.Process(target=w.exit_with_after_fork_calls, args=(marker,))
    p.start()
    assert finish(p) == (21 if method == "fork" else 20)
    assert marker.after_fork_calls == 0


# ---------------------------------------------------------------------------------------------
# Sacrificial interpreters
# ---------------------------------------------------------------------------------------------


def test_set_and_get_start_method(impl, tmp_path):
    out = tmp_path / "r.json"
    result = run_script(
        impl.__name__,
        f"""
        import json, _workers
        def show(*args):
            print(*args, flush=True)
        if __name__ == "__main__":
            show("initial", mp.get_start_method(allow_none=True))
            try:
                mp.set_start_method("bogus")
            except ValueError as e:
                show("bogus", type(e).__name__, "bogus" in str(e))
            show("after-bogus", mp.get_start_method(allow_none=True))
            mp.set_start_method("spawn")
            show("set", mp.get_start_method(), mp.get_start_method(allow_none=True))
            try:
                mp.set_start_method("fork")
            except RuntimeError as e:
                show("again", type(e).__name__, "already been set" in str(e))
            show("unchanged", mp.get_start_method())
            mp.set_start_method("forkserver", force=True)
            show("forced", mp.get_start_method())
            p = mp.Process(target=_workers.report, args=({impl.__name__!r}, {str(out)!r}))
            p.start()
            p.join(30)
            show("child", p.exitcode, json.load(open({str(out)!r}))["start_method"])
            mp.set_start_method(None, force=True)
            show("reset", mp.get_start_method(allow_none=True))
            show("default", mp.get_start_method(), mp.get_start_method(allow_none=True))
            show("get_context", mp.get_context().get_start_method())
        """,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "initial None",
        "bogus ValueError True",
        "after-bogus None",
        "set spawn spawn",
        "again RuntimeError True",
        "unchanged spawn",
        "forced forkserver",
        "child 0 forkserver",
        "reset None",
        "default fork fork",
        "get_context fork",
    ]


def test_set_executable(impl, tmp_path):
    marker = tmp_path / "wrapper-ran"
    wrapper = tmp_path / "python-wrapper"
    wrapper.write_text(f'#!/bin/sh\necho "$$" >> "{marker}"\nexec "{sys.executable}" "$@"\n')
    wrapper.chmod(0o755)
    result = run_script(
        impl.__name__,
        f"""
        import _workers
        if __name__ == "__main__":
            ctx = mp.get_context("spawn")
            assert callable(ctx.set_executable)
            mp.set_executable({str(wrapper)!r})
            p = ctx.Process(target=_workers.exit_with, args=(9,))
            p.start()
            p.join(30)
            print(p.exitcode)
        """,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "9"
    assert marker.exists(), "the spawn child was not started through set_executable()"


def test_os_register_at_fork_handlers(impl):
    result = run_script(
        impl.__name__,
        """
        import os, _workers
        events = []
        os.register_at_fork(
            before=lambda: events.append("before"),
            after_in_parent=lambda: events.append("parent"),
            after_in_child=_workers.note_at_fork_child,
        )
        if __name__ == "__main__":
            for method in ("fork", "spawn", "forkserver"):
                del events[:]
                p = mp.get_context(method).Process(target=_workers.exit_with_at_fork_child_calls)
                p.start()
                p.join(30)
                print(method, p.exitcode, ",".join(events) or "-", flush=True)
        """,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "fork 31 before,parent"
    # spawn and forkserver children start from a fresh interpreter: the handler never ran there.
    assert lines[1].split()[:2] == ["spawn", "30"]
    assert lines[2].split()[:2] == ["forkserver", "30"]


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_main_module_imported_as_mp_main(impl, method, tmp_path):
    script = tmp_path / "user_main.py"
    script.write_text(
        w.script_source(
            impl.__name__,
            """
            import os, sys
            print("imported-as", __name__, flush=True)

            def target():
                main = sys.modules["__main__"]
                ok = main.__name__ == "__mp_main__" and sys.modules["__mp_main__"] is main
                sys.exit(0 if ok else 3)

            if __name__ == "__main__":
                p = mp.get_context(METHOD).Process(target=target)
                p.start()
                p.join(30)
                print("exitcode", p.exitcode, flush=True)
            """,
            method,
        )
    )
    result = run_interp([str(script)], cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "imported-as __main__"
    assert "imported-as __mp_main__" in lines
    assert lines.count("imported-as __main__") == 1
    assert lines[-1] == "exitcode 0"


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_main_script_rerun_sees_what_runpy_gives_it(impl, method, tmp_path):
    # ferroproc re-runs a plain main script itself (not through runpy, whose imports cost a
    # spawned child milliseconds): the script must see the same module and sys state.
    script = tmp_path / "user_main.py"
    script.write_text(
        '"""The docstring."""\n'
        + w.script_source(
            impl.__name__,
            """
            import os, sys
            if __name__ != "__main__":
                me = sys.modules[__name__]
                seen = dict(
                    name=__name__, file=__file__, package=__package__, spec=__spec__,
                    loader=__loader__, cached=__cached__, doc=__doc__,
                    argv0=sys.argv[0], registered=me.__dict__ is globals(),
                    main_is_me=sys.modules["__main__"] is me,
                )
                print("during", sorted(seen.items()), flush=True)
            GLOBAL = 41

            def target():
                main = sys.modules["__main__"]
                print("after", main.GLOBAL, main.__name__, sys.argv[0],
                      main.__file__ == sys.modules["__mp_main__"].__file__, flush=True)

            if __name__ == "__main__":
                p = mp.get_context(METHOD).Process(target=target)
                p.start()
                p.join(30)
                print("exitcode", p.exitcode, flush=True)
            """,
            method,
        )
    )
    result = run_interp(["user_main.py"], cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    during = [line for line in lines if line.startswith("during ")]
    assert len(during) == 1, lines
    # The child is given the script's absolute path; sys.argv[0] is that path while the
    # script runs, and the parent's own argv[0] again afterwards.
    expected = dict(
        name="__mp_main__",
        file=str(script),
        package="",
        spec=None,
        loader=None,
        cached=None,
        doc="The docstring.",
        argv0=str(script),
        registered=True,
        main_is_me=False,
    )
    assert during[0] == f"during {sorted(expected.items())}"
    assert "after 41 __mp_main__ user_main.py True" in lines
    assert lines[-1] == "exitcode 0"


def test_main_script_without_py_suffix_is_rerun(impl, tmp_path):
    # Only ``*.py`` scripts skip runpy in ferroproc; anything else still goes through it.
    script = tmp_path / "tool"
    script.write_text(
        w.script_source(
            impl.__name__,
            """
            import sys
            print("run-as", __name__, flush=True)

            def target():
                sys.exit(7)

            if __name__ == "__main__":
                p = mp.get_context("spawn").Process(target=target)
                p.start()
                p.join(30)
                print("exitcode", p.exitcode, flush=True)
            """,
        )
    )
    result = run_interp(["tool"], cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "run-as __main__"
    assert "run-as __mp_main__" in lines
    assert lines[-1] == "exitcode 7"


def test_forkserver_preload(impl, tmp_path):
    (tmp_path / "preload_marker_mod.py").write_text("VALUE = 1\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    result = run_script(
        impl.__name__,
        """
        import _workers
        if __name__ == "__main__":
            fs = mp.get_context("forkserver")
            fs.set_forkserver_preload(["preload_marker_mod"])
            codes = []
            for ctx in (fs, mp.get_context("spawn")):
                p = ctx.Process(target=_workers.exit_if_module_loaded, args=("preload_marker_mod",))
                p.start()
                p.join(30)
                codes.append(p.exitcode)
            print(*codes)
        """,
        cwd=str(tmp_path),
        env=env,
    )
    assert result.returncode == 0, result.stderr
    # forkserver children inherit the preloaded module; spawn children do not have it.
    assert result.stdout.split() == ["0", "7"]
