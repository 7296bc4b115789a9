"""``util``: logging helpers, Finalize, register_after_fork, is_exiting."""

from __future__ import annotations

import gc
import importlib
import logging
import textwrap

import _workers as w
import pytest
from _workers import SHORT_TIMEOUT


@pytest.fixture
def util(impl):
    return importlib.import_module(f"{impl.__name__}.util")


@pytest.fixture
def restore_logger(util):
    """Undo what get_logger()/log_to_stderr() do to the shared 'multiprocessing' logger."""
    logger = logging.getLogger("multiprocessing")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    had_flag = hasattr(util, "_log_to_stderr")
    flag = getattr(util, "_log_to_stderr", None)
    yield logger
    logger.handlers[:] = saved[0]
    logger.setLevel(saved[1])
    logger.propagate = saved[2]
    if had_flag:
        util._log_to_stderr = flag


def run_script(impl_name, body, method=None, **kwargs):
    result, leftovers = w.run_interpreter(
        ["-c", w.script_source(impl_name, body, method)], **kwargs
    )
    assert not leftovers, f"sacrificial interpreter left processes behind: {leftovers}"
    return result


# ---------------------------------------------------------------------------------------------
# Logging
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
@pytest.mark.parametrize(
    "imports",
    ["logging", "logging, multiprocessing", "multiprocessing", "os"],
    ids=["logging", "logging+stdlib", "stdlib-then-logging-in-child", "logging-in-child"],
)
def test_log_records_in_a_child_carry_its_name(tmp_path, impl_name, method, imports):
    """``%(processName)s`` in a child is the child's name, as with the stdlib, whether or not
    the stdlib's `multiprocessing` is loaded (`logging` asks it for the current process)."""
    body = f"""
        import {imports}
        from _workers import log_process_name

        if __name__ == "__main__":
            ctx = mp.get_context(METHOD)
            log_process_name("parent")
            p = ctx.Process(target=log_process_name, args=("child",), name="Kid-1")
            p.start()
            p.join(30)
            print("exit", p.exitcode)
    """
    script = tmp_path / "log_names.py"
    script.write_text(w.script_source(impl_name, textwrap.dedent(body), method))
    r, leftovers = w.run_interpreter([str(script)], cwd=tmp_path)
    assert not leftovers, leftovers
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["MainProcess|parent", "Kid-1|child", "exit 0"], (
        r.stdout,
        r.stderr,
    )


def test_get_logger_is_the_multiprocessing_logger(impl, util, restore_logger):
    # Drop-in: existing logging configuration for "multiprocessing" keeps working.
    logger = impl.get_logger()
    assert logger is logging.getLogger("multiprocessing")
    assert logger.name == "multiprocessing"
    assert util.get_logger() is logger
    assert not logger.propagate


def test_log_to_stderr(impl, restore_logger, capsys):
    logger = restore_logger
    before = list(logger.handlers)
    returned = impl.log_to_stderr(logging.INFO)
    assert returned is logger
    added = [h for h in logger.handlers if h not in before]
    assert len(added) == 1
    assert isinstance(added[0], logging.StreamHandler)
    assert logger.level == logging.INFO
    logger.info("hello %s", "there")
    logger.debug("not shown")
    err = capsys.readouterr().err
    assert "[INFO/MainProcess] hello there" in err
    assert "not shown" not in err


def test_log_to_stderr_without_level_keeps_level(impl, restore_logger):
    logger = restore_logger
    logger.setLevel(logging.WARNING)
    n = len(logger.handlers)
    impl.log_to_stderr()
    assert logger.level == logging.WARNING
    assert len(logger.handlers) == n + 1


def test_level_constants(impl, util):
    assert util.SUBDEBUG == impl.SUBDEBUG == 5
    assert util.SUBWARNING == impl.SUBWARNING == 25
    assert util.DEBUG == logging.DEBUG
    assert util.INFO == logging.INFO


# ---------------------------------------------------------------------------------------------
# Finalize
# ---------------------------------------------------------------------------------------------


class Owner:
    pass


def test_finalize_runs_when_object_dies(util):
    calls = []
    obj = Owner()
    f = util.Finalize(obj, calls.append, args=("collected",))
    assert f.still_active()
    del obj
    gc.collect()
    assert calls == ["collected"]
    assert not f.still_active()
    assert f() is None
    assert calls == ["collected"]


def test_finalize_called_directly_runs_once(util):
    calls = []

    def callback(*args, **kwargs):
        calls.append((args, kwargs))
        return "result"

    obj = Owner()
    f = util.Finalize(obj, callback, args=(1, 2), kwargs={"k": 3})
    assert f() == "result"
    assert f() is None
    assert calls == [((1, 2), {"k": 3})]
    assert not f.still_active()
    del obj
    gc.collect()
    assert len(calls) == 1


def test_finalize_cancel(util):
    calls = []
    obj = Owner()
    f = util.Finalize(obj, calls.append, args=("x",))
    f.cancel()
    assert not f.still_active()
    del obj
    gc.collect()
    assert calls == []
    assert f() is None


def test_finalize_argument_checks(util):
    with pytest.raises(ValueError, match="exitpriority"):
        util.Finalize(None, print)
    with pytest.raises(TypeError, match=r"[Ee]xitpriority"):
        util.Finalize(Owner(), print, exitpriority="high")


def test_finalize_exitpriority_order_and_is_exiting(impl, tmp_path):
    done = tmp_path / "child-done"
    result = run_script(
        impl.__name__,
        f"""
        import importlib, os, _workers
        util = importlib.import_module(mp.__name__ + ".util")

        def note(tag):
            print(tag, util.is_exiting(), os.path.exists({str(done)!r}), flush=True)

        if __name__ == "__main__":
            for tag, prio in [("p0-first", 0), ("p10", 10), ("m1", -1), ("p0-second", 0),
                              ("p5", 5)]:
                util.Finalize(None, note, args=(tag,), exitpriority=prio)
            cancelled = util.Finalize(None, note, args=("cancelled",), exitpriority=3)
            cancelled.cancel()
            p = mp.get_context("fork").Process(target=_workers.sleep_then_touch,
                                               args=(1.5, {str(done)!r}))
            p.start()
            note("main")
        """,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "main False False",
        # priority >= 0, highest first, equal priorities in reverse order of creation; they
        # run before non-daemon children are joined ...
        "p10 True False",
        "p5 True False",
        "p0-second True False",
        "p0-first True False",
        # ... and negative priorities after the join.
        "m1 True True",
    ]


def test_is_exiting_false_while_running(util):
    assert util.is_exiting() is False


# ---------------------------------------------------------------------------------------------
# register_after_fork
# ---------------------------------------------------------------------------------------------


@pytest.mark.fork_only
def test_register_after_fork_runs_in_fork_child(impl, util):
    marker = w.Marker()
    util.register_after_fork(marker, w.mark_after_fork)
    p = impl.get_context("fork").Process(target=w.exit_with_after_fork_calls, args=(marker,))
    p.start()
    p.join(SHORT_TIMEOUT)
    assert not p.is_alive()
    assert p.exitcode == 21
    assert marker.after_fork_calls == 0
