"""One run of CPython's multiprocessing suite for one start method (started by run_suite.py).

Runs in its own interpreter with ``tests/compat/_substitute`` on ``PYTHONPATH``; with
``FERROPROC_SUBSTITUTE=1`` its ``sitecustomize`` has already substituted ferroproc for
``multiprocessing`` before this file runs. Writes one JSON event per line to ``--events``:
``hello``, ``probe``, ``class_not_run``, ``test_not_run``, ``fixture``, ``start``,
``result``, ``fatal``, ``done``. The parent rebuilds the report from them, so a worker killed
by its watchdog loses nothing but the test that hung.

Only the stdlib is imported at module level: spawn children import this file as
``__mp_main__``.
"""

from __future__ import annotations

import argparse
import faulthandler
import fnmatch
import json
import os
import signal
import sys
import time
import traceback
import unittest

# Watchdog slack after the per-test SIGALRM: the worker is killed (faulthandler, exit=True)
# when a test or fixture still has not returned, and the parent restarts it.
WATCHDOG_GRACE = float(os.environ.get("FERROPROC_COMPAT_WATCHDOG_GRACE", "30"))


class HarnessTimeout(BaseException):
    """Raised in the main thread by SIGALRM when a test exceeds its time limit.

    A BaseException so ``except Exception`` in test code cannot swallow it; unittest still
    records it as an error of that test.
    """


class Events:
    """Append-only JSON-lines event file."""

    def __init__(self, path: str):
        self._f = open(path, "a", encoding="utf-8")

    def emit(self, event: str, **fields) -> None:
        fields["event"] = event
        self._f.write(json.dumps(fields, default=repr) + "\n")
        self._f.flush()


def _short(exc_info) -> str:
    """The last line of the formatted exception: ``AttributeError: ...``."""
    lines = traceback.format_exception_only(exc_info[0], exc_info[1])
    return lines[-1].strip() if lines else repr(exc_info[1])


def _exc_chain(exc):
    seen = 0
    while exc is not None and seen < 8:
        yield exc
        exc = exc.__cause__ or exc.__context__
        seen += 1


class Classifier:
    """Turns unittest's raw outcome plus the usage records into the harness outcome."""

    def __init__(self, sub, present):
        self.sub = sub  # the _ferroproc_substitute module, or None for the stdlib run
        self.present = present

    def _feature(self, what: str) -> str:
        rest = what.partition("multiprocessing.")[2] or what
        return self.sub.feature_of(rest.split(".")[0])

    def missing_from_exception(self, exc) -> list[str]:
        """Missing attributes of ferroproc objects (module, context, ...) that belong to a
        subsystem ferroproc does not have yet."""
        found = []
        for e in _exc_chain(exc):
            if not isinstance(e, AttributeError) or not getattr(e, "name", None):
                continue
            if isinstance(e, self.sub.MissingFeature):
                continue  # already in the usage records
            obj = getattr(e, "obj", None)
            mod = obj.__name__ if isinstance(obj, type(sys)) else type(obj).__module__
            if not str(mod).startswith("ferroproc"):
                continue
            feature = self.sub.feature_of(e.name)
            if feature not in self.present:
                found.append(f"{mod}:{e.name} ({feature})")
        return found

    def classify(self, raw: str, exc, usage: list[tuple[int, str, str]]):
        """Returns (outcome, notes)."""
        notes: list[str] = []
        hung = raw == "error" and isinstance(exc, HarnessTimeout)
        if hung:
            raw = "hung"
        if self.sub is None or raw == "skipped":
            return raw, notes
        missing, gaps, fallback = [], [], []
        for _pid, kind, what in usage:
            if kind == "missing":
                if self._feature(what) in self.present:
                    gaps.append(what)
                else:
                    missing.append(what)
            elif kind == "stdlib":
                fallback.append(what)
        if exc is not None:
            missing.extend(self.missing_from_exception(exc))
        if gaps:
            notes.append("ferroproc lacks (implemented subsystem): " + ", ".join(sorted(set(gaps))))
        if missing or fallback:
            if hung:
                notes.append("hung after using missing API")
            if missing:
                notes.append("missing: " + ", ".join(sorted(set(missing))))
            if fallback:
                notes.append("used stdlib fallback: " + ", ".join(sorted(set(fallback))))
            return "needs_api", notes
        return raw, notes


class HarnessResult(unittest.TestResult):
    """Records one outcome per test, arms the per-test timers, attributes usage records."""

    def __init__(
        self,
        events: Events,
        classifier: Classifier,
        per_test_timeout: float,
        *,
        usage_log: str | None,
        sub,
        verbose: bool,
    ):
        super().__init__()
        self.events = events
        self.classifier = classifier
        self.timeout = per_test_timeout
        self.usage_log = usage_log
        self.sub = sub
        self.verbose = verbose
        self._cur = None

    # -- timers ---------------------------------------------------------------------------
    def _on_alarm(self, signum, frame):
        sys.stderr.write(f"\n*** compat harness: test exceeded {self.timeout:g}s; stacks:\n")
        faulthandler.dump_traceback(all_threads=True)
        raise HarnessTimeout(f"test exceeded the per-test time limit of {self.timeout:g}s")

    def arm_watchdog(self, seconds: float) -> None:
        faulthandler.dump_traceback_later(seconds, exit=True)

    # -- per test -------------------------------------------------------------------------
    def _usage_offset(self) -> int:
        if not self.usage_log:
            return 0
        try:
            return os.path.getsize(self.usage_log)
        except OSError:
            return 0

    def _usage_since(self, offset: int):
        if not self.usage_log:
            return []
        try:
            with open(self.usage_log, "rb") as f:
                f.seek(offset)
                data = f.read().decode("utf-8", "replace")
        except OSError:
            return []
        out = []
        for line in data.splitlines():
            parts = line.split("\t")
            if len(parts) == 3:
                out.append((int(parts[0]) if parts[0].isdigit() else 0, parts[1], parts[2]))
        return out

    def startTest(self, test):
        super().startTest(test)
        if self.sub is not None:
            self.sub.next_generation()
        self._cur = {
            "class": type(test).__name__,
            "test": test._testMethodName,
            "raw": "passed",
            "exc": None,
            "detail": "",
            "tb": "",
            "t0": time.monotonic(),
            "offset": self._usage_offset(),
        }
        self.events.emit("start", **{"class": self._cur["class"], "test": self._cur["test"]})
        signal.signal(signal.SIGALRM, self._on_alarm)
        signal.setitimer(signal.ITIMER_REAL, self.timeout)
        self.arm_watchdog(self.timeout + WATCHDOG_GRACE)

    def _bad(self, raw: str, err, test) -> None:
        cur = self._cur
        if cur is None:
            return
        rank = {"passed": 0, "skipped": 0, "xfail": 0, "xpass": 1, "failed": 2, "error": 3}
        if rank[raw] >= rank.get(cur["raw"], 0):
            if cur["raw"] == "error" and isinstance(cur["exc"], HarnessTimeout):
                return
            cur["raw"] = raw
            cur["exc"] = err[1] if err else None
            cur["detail"] = _short(err) if err else ""
            cur["tb"] = self._format(err, test) if err else ""

    def _format(self, err, test) -> str:
        try:
            return "".join(traceback.format_exception(*err))[-6000:]
        except Exception:
            return repr(err[1])

    def addError(self, test, err):
        if isinstance(test, unittest.suite._ErrorHolder):
            # setUpClass/tearDownClass/setUpModule failures
            self.events.emit(
                "fixture_error",
                description=test.description,
                detail=_short(err),
                tb=self._format(err, test),
            )
            return
        self._bad("error", err, test)

    def addFailure(self, test, err):
        self._bad("failed", err, test)

    def addSubTest(self, test, subtest, err):
        if err is not None:
            if issubclass(err[0], test.failureException):
                self._bad("failed", err, test)
            else:
                self._bad("error", err, test)

    def addSkip(self, test, reason):
        if isinstance(test, unittest.case._SubTest):
            return
        if isinstance(test, unittest.suite._ErrorHolder):
            self.events.emit("fixture_skip", description=test.description, detail=str(reason))
            return
        if self._cur is None:
            # A class-level skip: unittest reports each test without startTest.
            self.events.emit(
                "result",
                **{
                    "class": type(test).__name__,
                    "test": getattr(test, "_testMethodName", "?"),
                    "outcome": "skipped",
                    "raw": "skipped",
                    "detail": str(reason),
                    "notes": [],
                    "seconds": 0,
                },
            )
            return
        if self._cur["raw"] == "passed":
            self._cur["raw"] = "skipped"
            self._cur["detail"] = str(reason)

    def addExpectedFailure(self, test, err):
        self._cur["raw"] = "xfail"

    def addUnexpectedSuccess(self, test):
        self._bad("xpass", None, test)

    def stopTest(self, test):
        signal.setitimer(signal.ITIMER_REAL, 0)
        cur, self._cur = self._cur, None
        if cur is None:
            return super().stopTest(test)
        usage = self._usage_since(cur["offset"])
        raw = cur["raw"]
        if raw == "xfail":
            raw = "passed"
        elif raw == "xpass":
            raw = "failed"
        outcome, notes = self.classifier.classify(raw, cur["exc"], usage)
        if outcome == "hung":
            _reap_children()
        self.events.emit(
            "result",
            **{
                "class": cur["class"],
                "test": cur["test"],
                "outcome": outcome,
                "raw": cur["raw"],
                "detail": cur["detail"],
                "notes": notes,
                "tb": cur["tb"] if outcome != "passed" else "",
                "seconds": round(time.monotonic() - cur["t0"], 3),
            },
        )
        if self.verbose:
            sys.stderr.write(f"[compat] {cur['class']}.{cur['test']}: {outcome}\n")
        # Between tests (class fixtures, module teardown) only the watchdog runs.
        self.arm_watchdog(self.timeout + WATCHDOG_GRACE)
        return super().stopTest(test)


def _reap_children() -> None:
    """After a hung test: terminate, then kill, whatever children it left."""
    try:
        import multiprocessing

        children = multiprocessing.active_children()
    except Exception:
        return
    for p in children:
        try:
            p.terminate()
            p.join(2)
            if p.is_alive():
                p.kill()
                p.join(2)
        except Exception:
            pass


class TracingSuite(unittest.TestSuite):
    """Announces class fixtures, so a hang in setUpClass is attributed to its class."""

    events: Events | None = None

    def _handleClassSetUp(self, test, result):
        current = test.__class__
        if (
            getattr(result, "_previousTestClass", None) is not current
            and TracingSuite.events is not None
        ):
            TracingSuite.events.emit("fixture", **{"class": current.__name__})
        return super()._handleClassSetUp(test, result)


def run_probe(method: str, workdir: str, timeout: float) -> dict:
    """Start one Process under ``method`` and read what the child sees."""
    import multiprocessing

    import _ferroproc_compat_probe as probe

    path = os.path.join(workdir, f"probe-{method}.json")
    info: dict = {"method": method, "parent": probe.snapshot()}
    try:
        ctx = multiprocessing.get_context(method)
        p = ctx.Process(target=probe.check, args=(path,))
        p.start()
        p.join(timeout)
        if p.is_alive():
            p.kill()
            p.join(5)
            info["error"] = f"probe child did not finish within {timeout:g}s"
        info["exitcode"] = p.exitcode
        with open(path, encoding="utf-8") as f:
            info["child"] = json.load(f)
    except Exception as e:
        info["error"] = f"{type(e).__name__}: {e}"
    return info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--impl", choices=("ferroproc", "multiprocessing"), required=True)
    ap.add_argument("--start-method", required=True)
    ap.add_argument("--events", required=True)
    ap.add_argument("--classes", nargs="*", default=[])
    ap.add_argument(
        "--only-runnable-with",
        default=None,
        help="comma-separated ferroproc subsystems; select classes runnable with them",
    )
    ap.add_argument("--skip-file", default=None)
    ap.add_argument("--per-test-timeout", type=float, default=60.0)
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)

    here = os.path.dirname(os.path.abspath(__file__))
    if here not in sys.path:
        sys.path.insert(0, here)
    import requirements as req

    events = Events(args.events)
    TracingSuite.events = events
    faulthandler.enable()
    faulthandler.dump_traceback_later(args.per_test_timeout + WATCHDOG_GRACE, exit=True)

    sub = None
    if args.impl == "ferroproc":
        try:
            import multiprocessing  # the first import performs the substitution

            import _ferroproc_substitute as sub
        except ImportError as e:
            events.emit("fatal", stage="substitute", detail=str(e), tb=traceback.format_exc())
            return 3
        if not sub.is_installed() or sys.modules.get("multiprocessing") is not sys.modules.get(
            "ferroproc"
        ):
            events.emit(
                "fatal",
                stage="substitute",
                detail="sitecustomize did not substitute ferroproc (is FERROPROC_SUBSTITUTE"
                "=1 and tests/compat/_substitute first on PYTHONPATH?)",
                tb="".join(traceback.format_stack()),
            )
            return 3
        present = sub.present_features()
    else:
        import multiprocessing

        if "ferroproc" in multiprocessing.__name__:
            events.emit(
                "fatal",
                stage="substitute",
                detail="stdlib run but multiprocessing is substituted",
                tb="",
            )
            return 3
        present = None

    import multiprocessing

    events.emit(
        "hello",
        impl=args.impl,
        method=args.start_method,
        pid=os.getpid(),
        multiprocessing=multiprocessing.__name__,
        present=sorted(present) if present is not None else None,
    )

    # script_helper.assert_python_ok() starts `python -I`/`-E` unless the interpreter "requires
    # its environment"; claim it does, so those scripts keep PYTHONPATH (and the substitution).
    from test.support import script_helper

    setattr(script_helper, "__cached_interp_requires_environment", True)

    probe = run_probe(args.start_method, os.getcwd(), min(args.per_test_timeout, 60.0))
    events.emit("probe", **probe)

    os.environ["FERROPROC_COMPAT_START_METHOD"] = args.start_method
    try:
        import _ferroproc_compat_suite as suite_module
    except BaseException as e:
        events.emit(
            "fatal", stage="import", detail=f"{type(e).__name__}: {e}", tb=traceback.format_exc()
        )
        return 4

    selection_features = None
    if args.only_runnable_with is not None:
        selection_features = frozenset(f for f in args.only_runnable_with.split(",") if f)

    skip = set()
    if args.skip_file and os.path.exists(args.skip_file):
        with open(args.skip_file, encoding="utf-8") as f:
            skip = {line.strip() for line in f if line.strip()}

    loader = unittest.TestLoader()
    top = TracingSuite()
    for name in sorted(dir(suite_module)):
        cls = getattr(suite_module, name)
        if not (isinstance(cls, type) and issubclass(cls, unittest.TestCase)):
            continue
        if cls.__module__ != suite_module.__name__:
            continue
        _, base = req.split_name(name)
        if args.classes and not any(
            fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(base, p) for p in args.classes
        ):
            continue
        methods = loader.getTestCaseNames(cls)
        reason = req.not_run_reason(name, present)
        if reason is None and selection_features is not None:
            why = req.not_run_reason(name, selection_features)
            if why is not None:
                reason = "not in selection (" + why + ")"
        if reason is None and f"class:{name}" in skip:
            reason = "skipped after a hang in its class fixture (see previous attempt)"
        if reason is not None:
            events.emit("class_not_run", **{"class": name, "reason": reason, "tests": len(methods)})
            continue
        tests = []
        for m in methods:
            never = req.test_never_reason(name, m)
            if never is not None:
                events.emit("test_not_run", **{"class": name, "test": m, "reason": never})
                continue
            if f"{name}.{m}" in skip:
                continue
            tests.append(cls(m))
        if tests:
            events.emit("plan", **{"class": name, "tests": [t._testMethodName for t in tests]})
            top.addTest(TracingSuite(tests))

    classifier = Classifier(sub, present if present is not None else frozenset())
    result = HarnessResult(
        events,
        classifier,
        args.per_test_timeout,
        usage_log=os.environ.get("FERROPROC_COMPAT_USAGE_LOG"),
        sub=sub,
        verbose=args.verbose,
    )
    top.run(result)
    faulthandler.cancel_dump_traceback_later()
    events.emit("done", tests_run=result.testsRun)
    return 0


if __name__ == "__main__":
    sys.exit(main())
