"""The forkserver start method and the user's main script.

A forkserver child must see the parent's main module as a spawned child does: module-level
code runs with the parent's ``sys.argv``, and a script whose module level fails in a child
fails that child (exit code 1, the traceback on stderr), not the parent's later starts.
CPython 3.11 runs the script in every child; ferroproc's server runs it once, ahead of the
children (README, "Semantic differences"). Each test runs a script file in a sacrificial
interpreter, parametrized over both libraries.
"""

from __future__ import annotations

import json
import textwrap

import _workers as w
import pytest

pytestmark = pytest.mark.timeout(120)


def _run_script(tmp_path, impl_name, body, *args):
    script = tmp_path / "main_script.py"
    script.write_text(w.script_source(impl_name, textwrap.dedent(body), "forkserver"))
    r, leftovers = w.run_interpreter([str(script), *args], cwd=tmp_path)
    assert not leftovers, leftovers
    return r


def test_module_level_code_sees_the_parents_argv(tmp_path, impl_name):
    body = """
        import json

        FIRST = sys.argv[1]  # an IndexError unless the script runs with the parent's argv
        ARGS = sys.argv[1:]

        def report(q):
            q.put((FIRST, ARGS, __name__))

        if __name__ == "__main__":
            ctx = mp.get_context("forkserver")
            q = ctx.Queue()
            for _ in range(2):
                p = ctx.Process(target=report, args=(q,))
                p.start()
                got = q.get(timeout=30)
                p.join(30)
                print(json.dumps([p.exitcode, *got]))
    """
    r = _run_script(tmp_path, impl_name, body, "alpha", "--beta")
    assert r.returncode == 0, r.stderr
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert lines == [[0, "alpha", ["alpha", "--beta"], "__mp_main__"]] * 2, r.stdout


def test_a_script_failing_in_the_child_fails_only_that_child(tmp_path, impl_name):
    body = """
        if __name__ != "__main__":
            raise RuntimeError("module level refuses to run in a child")

        def noop():
            pass

        if __name__ == "__main__":
            ctx = mp.get_context("forkserver")
            for _ in range(2):
                p = ctx.Process(target=noop)
                p.start()
                p.join(30)
                print(p.exitcode)
    """
    r = _run_script(tmp_path, impl_name, body)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["1", "1"], (r.stdout, r.stderr)
    assert r.stderr.count("RuntimeError: module level refuses to run in a child") == 2, r.stderr


def test_a_long_argv_reaches_the_children(tmp_path, impl_name):
    """More than the 128 KiB one command-line argument may hold (ferroproc hands the server
    its setup over the control socket)."""
    body = """
        import json

        def report(q):
            q.put(len("".join(sys.argv[1:])))

        if __name__ == "__main__":
            ctx = mp.get_context("forkserver")
            q = ctx.Queue()
            p = ctx.Process(target=report, args=(q,))
            p.start()
            print(json.dumps([q.get(timeout=30), len("".join(sys.argv[1:]))]))
            p.join(30)
            print(p.exitcode)
    """
    args = ["x" * 50_000 for _ in range(6)]
    r = _run_script(tmp_path, impl_name, body, *args)
    assert r.returncode == 0, r.stderr
    first, second = r.stdout.splitlines()
    assert json.loads(first) == [300_000, 300_000]
    assert second == "0"


def test_children_see_the_parents_environment_as_it_is_at_each_start(tmp_path, impl_name):
    """What a child's preparation sets (directory, import path, argv, authkey, logging, the
    name it has while its process object is unpickled) follows the parent from one start to
    the next. ferroproc's server applies the parent's environment to itself once, and a
    request carries only the child's name while nothing has changed."""
    (tmp_path / "elsewhere").mkdir()
    body = """
        import json, os, pickle

        class Probe:
            # Unpickled in the child before its process object is: what is the child's name
            # then?
            def __reduce__(self):
                return (Probe._named, ())

            @staticmethod
            def _named():
                probe = Probe()
                probe.name = mp.current_process().name
                return probe

        def report(q, probe):
            q.put(json.dumps([
                os.path.basename(os.getcwd()),
                sys.path[-1],
                sys.argv[1:],
                bytes(mp.current_process().authkey).hex(),
                mp.util._logger is not None,
                probe.name,
                mp.current_process().name,
            ]))

        if __name__ == "__main__":
            ctx = mp.get_context("forkserver")
            q = ctx.SimpleQueue()

            def child(name):
                p = ctx.Process(target=report, args=(q, Probe()), name=name)
                p.start()
                print(q.get())
                p.join(30)
                assert p.exitcode == 0, p.exitcode

            child("first")
            child("second")  # nothing changed since the server started
            sys.argv.append("--in-place")  # alone: the same list object, changed
            child("argv")
            del sys.argv[-1]
            os.chdir("elsewhere")
            sys.path.append("/nonexistent/appended")
            sys.argv.append("--later")
            mp.current_process().authkey = b"k" * 32
            child("third")
            child("fourth")
            mp.log_to_stderr()
            child("fifth")
    """
    r = _run_script(tmp_path, impl_name, body, "alpha")
    assert r.returncode == 0, r.stderr
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(lines) == 6, (r.stdout, r.stderr)
    first, second, argv, third, fourth, fifth = lines
    assert argv[2] == ["alpha", "--in-place"] and argv[5:] == ["argv", "argv"]
    assert first[:3] == [tmp_path.name, first[1], ["alpha"]]
    assert first[4:] == [False, "first", "first"]
    assert second[:5] == first[:5] and second[5:] == ["second", "second"]
    changed = ["elsewhere", "/nonexistent/appended", ["alpha", "--later"], (b"k" * 32).hex()]
    assert third[:4] == changed and third[4:] == [False, "third", "third"]
    assert fourth[:4] == changed and fourth[4:] == [False, "fourth", "fourth"]
    assert fifth[:4] == changed and fifth[4:] == [True, "fifth", "fifth"]


@pytest.mark.parametrize("preset", [None, "yes"])
def test_children_get_the_parents_environment_and_nothing_else(tmp_path, impl_name, preset):
    """ferroproc starts its server with ``LD_BIND_NOW`` set (see `ForkServer`), and the server
    drops it: children see the parent's variables only, in `os.environ` and in the C
    environment both, and a value the parent set stays."""
    body = """
        import ctypes, json, os

        def report(q):
            libc = ctypes.CDLL(None)
            libc.getenv.restype = ctypes.c_char_p
            c_value = libc.getenv(b"LD_BIND_NOW")
            q.put(json.dumps([
                os.environ.get("LD_BIND_NOW"),
                c_value and c_value.decode(),
                sorted(k for k in os.environ if "FERROPROC" in k.upper()),
            ]))

        if __name__ == "__main__":
            if len(sys.argv) > 1:
                os.environ["LD_BIND_NOW"] = sys.argv[1]
            else:
                os.environ.pop("LD_BIND_NOW", None)
            ctx = mp.get_context("forkserver")
            q = ctx.SimpleQueue()
            p = ctx.Process(target=report, args=(q,))
            p.start()
            print(q.get())
            p.join(30)
            assert p.exitcode == 0, p.exitcode
    """
    r = _run_script(tmp_path, impl_name, body, *([preset] if preset else []))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == [preset, preset, []]


def test_a_signal_handler_of_a_preloaded_module_runs_in_the_server(tmp_path, impl_name):
    """A handler a preloaded module installs is the server's: it runs (soon after the signal,
    at the latest by the next start) in the server process."""
    (tmp_path / "sigmod.py").write_text(
        textwrap.dedent(
            """
            import os, signal

            def _mark(signum, frame):
                with open(os.path.join(os.path.dirname(__file__), "mark"), "a") as f:
                    f.write(f"{os.getpid()}\\n")

            signal.signal(signal.SIGUSR1, _mark)
            """
        )
    )
    body = """
        import os, signal, time
        from _workers import noop

        if __name__ == "__main__":
            ctx = mp.get_context("forkserver")
            ctx.set_forkserver_preload(["sigmod"])
            def run_one():
                p = ctx.Process(target=noop)
                p.start()
                p.join(30)
                assert p.exitcode == 0, p.exitcode
            run_one()
            fs = sys.modules[mp.__name__ + ".forkserver"]._forkserver
            server = fs._forkserver_pid
            os.kill(server, signal.SIGUSR1)
            deadline = time.monotonic() + 10
            while not os.path.exists("mark") and time.monotonic() < deadline:
                run_one()
                time.sleep(0.01)
            with open("mark") as f:
                print(f.read().split() == [str(server)])
    """
    r = _run_script(tmp_path, impl_name, body)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["True"], (r.stdout, r.stderr)


def test_a_child_whose_main_script_closed_stdin_gets_a_fresh_one(tmp_path, impl_name):
    """Without preloading, each child runs the main script itself; if its module level closes
    `sys.stdin`, the child's entry still gives it /dev/null, as a spawned child's does."""
    body = """
        if __name__ != "__main__":
            sys.stdin.close()  # module level, in the child only (run as __mp_main__)

        def work(q):
            try:
                q.put(repr(sys.stdin.read()))
            except Exception as e:
                q.put(f"{type(e).__name__}: {e}")

        if __name__ == "__main__":
            ctx = mp.get_context("forkserver")
            ctx.set_forkserver_preload([])
            q = ctx.SimpleQueue()
            p = ctx.Process(target=work, args=(q,))
            p.start()
            print(q.get())
            p.join(30)
            assert p.exitcode == 0, p.exitcode
    """
    r = _run_script(tmp_path, impl_name, body)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["''"], (r.stdout, r.stderr)


def test_a_name_of_a_str_subclass_and_preload_side_effects(tmp_path, impl_name):
    """A child's name may be a `str` subclass, and what the preloaded modules do to the
    import path, directory and arguments does not reach the children: they start with the
    parent's, whether or not the parent changed anything between starts."""
    (tmp_path / "meddler.py").write_text(
        "import os, sys\n"
        "sys.path.append('/added/by/meddler')\n"
        "sys.argv.append('--meddled')\n"
        "os.chdir(os.path.dirname(os.path.abspath(__file__)) + '/sub')\n"
    )
    (tmp_path / "sub").mkdir()
    body = """
        import http, json, os, signal

        signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # as command-line tools often do

        def report(q):
            q.put(json.dumps([
                type(mp.current_process().name).__name__,
                "/added/by/meddler" in sys.path,
                sys.argv[1:],
                os.path.basename(os.getcwd()),
                signal.getsignal(signal.SIGPIPE) == signal.SIG_DFL,
            ]))

        if __name__ == "__main__":
            ctx = mp.get_context("forkserver")
            ctx.set_forkserver_preload(["__main__", "meddler"])
            q = ctx.SimpleQueue()
            for i in range(3):
                if i == 2:
                    sys.argv.append("--changed")
                # A `str` subclass the stdlib's child can unpickle before its preparation
                # is applied (not one defined in `__main__`).
                p = ctx.Process(target=report, args=(q,), name=http.HTTPMethod.GET)
                p.start()
                print(q.get())
                p.join(30)
                assert p.exitcode == 0, p.exitcode
    """
    r = _run_script(tmp_path, impl_name, body)
    assert r.returncode == 0, r.stderr
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    here = tmp_path.name
    assert lines == [
        ["HTTPMethod", False, [], here, True],
        ["HTTPMethod", False, [], here, True],
        ["HTTPMethod", False, ["--changed"], here, True],
    ], (r.stdout, r.stderr)


def test_children_find_the_ipc_modules_the_parent_had_imported(tmp_path, impl_name):
    # The server imports the modules of the IPC objects its parent had imported (ferroproc),
    # or its own (the stdlib's imports its `connection`): a child handed a Pipe end does not
    # import them itself. Checked in a child that is handed only a path.
    body = """
        import json

        def report(path):
            with open(path, "w") as f:
                json.dump(sorted(sys.modules), f)

        if __name__ == "__main__":
            ctx = mp.get_context("forkserver")
            a, b = ctx.Pipe()
            p = ctx.Process(target=report, args=(sys.argv[1],))
            p.start()
            p.join(30)
            print(p.exitcode)
    """
    out = tmp_path / "modules.json"
    r = _run_script(tmp_path, impl_name, body, str(out))
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["0"], r.stdout
    assert f"{impl_name}.connection" in json.loads(out.read_text())


def test_children_find_the_ipc_modules_the_parent_imported_later(tmp_path, impl_name):
    # ferroproc: the server started before the parent imported `connection`; the next
    # request tells it, and it imports the module before forking its next spare (one spare
    # was forked before, so the second child after that request has it; the test asks the
    # fourth).
    body = """
        import json

        def noop():
            pass

        def report(path):
            with open(path, "w") as f:
                json.dump(sorted(sys.modules), f)

        if __name__ == "__main__":
            ctx = mp.get_context("forkserver")
            first = ctx.Process(target=noop)
            first.start()
            first.join(30)
            a, b = ctx.Pipe()
            codes = [first.exitcode]
            for _ in range(3):
                p = ctx.Process(target=noop)
                p.start()
                p.join(30)
                codes.append(p.exitcode)
            p = ctx.Process(target=report, args=(sys.argv[1],))
            p.start()
            p.join(30)
            codes.append(p.exitcode)
            print(json.dumps(codes))
    """
    out = tmp_path / "modules.json"
    r = _run_script(tmp_path, impl_name, body, str(out))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == [0] * 5, r.stdout
    assert f"{impl_name}.connection" in json.loads(out.read_text())


@pytest.mark.parametrize("method", ["forkserver", "spawn"])
def test_a_child_handed_ipc_objects_does_not_import_the_start_machinery(tmp_path, method):
    # ferroproc only: the descriptor handles of a started child's arguments unpickle from a
    # module the child has loaded (the stdlib's come from its popen modules). Importing
    # `popen_forkserver` and what it imports cost each forkserver child handed a queue about
    # 1.5 ms.
    body = f"""
        import json

        def report(path, *handed):
            with open(path, "w") as f:
                json.dump(sorted(m for m in sys.modules if m.startswith("ferroproc.popen")), f)

        if __name__ == "__main__":
            ctx = mp.get_context({method!r})
            q, (a, b), lock = ctx.Queue(), ctx.Pipe(), ctx.Lock()
            p = ctx.Process(target=report, args=(sys.argv[1], q, b, lock))
            p.start()
            p.join(30)
            print(p.exitcode)
    """
    out = tmp_path / "modules.json"
    script = tmp_path / "main_script.py"
    script.write_text(w.script_source("ferroproc", textwrap.dedent(body), method))
    r, leftovers = w.run_interpreter([str(script), str(out)], cwd=tmp_path)
    assert not leftovers, leftovers
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["0"], r.stdout
    assert json.loads(out.read_text()) == []
