#!/usr/bin/env python
"""Run CPython's own ``test/_test_multiprocessing.py`` against ferroproc (or the stdlib).

The installed test file runs unmodified, with ferroproc substituted for ``multiprocessing`` in
the parent and in every child (fork, spawn, forkserver). Each start method runs in its own
worker interpreter (``_worker.py``) under a whole-run time limit; inside it every test has a
per-test time limit. See README.md for the rules (what is counted, what is not run, why).

Examples::

    .venv/bin/python tests/compat/run_suite.py --ci
    .venv/bin/python tests/compat/run_suite.py --ci --compare --json /tmp/compat.json
    .venv/bin/python tests/compat/run_suite.py --start-method spawn --classes '*TestProcess'
    .venv/bin/python tests/compat/run_suite.py --impl multiprocessing --start-method fork
    .venv/bin/python tests/compat/run_suite.py --list-classes
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import fnmatch
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
SUBSTITUTE_DIR = os.path.join(HERE, "_substitute")
WORKER = os.path.join(HERE, "_worker.py")
KNOWN_FAILURES = os.path.join(HERE, "known_failures.toml")

sys.path.insert(0, HERE)
sys.path.insert(1, SUBSTITUTE_DIR)

import requirements as req  # noqa: E402

METHODS = ("fork", "spawn", "forkserver")
BAD = ("failed", "error", "hung")
COLUMNS = ("passed", "failed", "error", "skipped", "needs_api", "hung")


def ferroproc_features() -> frozenset | None:
    """ferroproc's subsystems, found without running anything (None: not importable)."""
    code = (
        "import json, _ferroproc_substitute as s; import ferroproc; "
        "print(json.dumps(sorted(s.ferroproc_features())))"
    )
    env = dict(os.environ, PYTHONPATH=_pythonpath())
    env.pop("FERROPROC_SUBSTITUTE", None)
    try:
        out = subprocess.run(
            [sys.executable, "-c", code],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return None
    if out.returncode != 0:
        sys.stderr.write("ferroproc is not importable:\n" + out.stderr[-2000:] + "\n")
        return None
    return frozenset(json.loads(out.stdout.strip().splitlines()[-1]))


def _pythonpath() -> str:
    old = os.environ.get("PYTHONPATH")
    return SUBSTITUTE_DIR + (os.pathsep + old if old else "")


# ---------------------------------------------------------------------------------------------
# One start method, one implementation
# ---------------------------------------------------------------------------------------------


@dataclass
class ClassReport:
    name: str
    not_run: str | None = None
    planned: list[str] = field(default_factory=list)
    tests: dict[str, dict] = field(default_factory=dict)
    never: dict[str, str] = field(default_factory=dict)
    fixture: list[str] = field(default_factory=list)
    n_tests: int = 0

    def counts(self) -> dict[str, int]:
        c = dict.fromkeys((*COLUMNS, "not_reached"), 0)
        for t in self.tests.values():
            c[t["outcome"]] = c.get(t["outcome"], 0) + 1
        c["not_run_tests"] = len(self.never)
        return c


@dataclass
class MethodRun:
    impl: str
    method: str
    workdir: str
    classes: dict[str, ClassReport] = field(default_factory=dict)
    probe: dict | None = None
    fatal: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    attempts: int = 0
    finished: bool = False
    seconds: float = 0.0
    module_errors: list[str] = field(default_factory=list)

    def cls(self, name: str) -> ClassReport:
        if name not in self.classes:
            self.classes[name] = ClassReport(name)
        return self.classes[name]

    # -- probe ----------------------------------------------------------------------------
    def probe_ok(self) -> tuple[bool, str]:
        p = self.probe
        if not p:
            return False, "no probe result (worker died before the probe)"
        if "error" in p or "child" not in p:
            return False, f"probe failed: {p.get('error', 'no child report')}"
        child, parent = p["child"], p["parent"]
        want = self.impl == "ferroproc"
        checks = [
            ("parent multiprocessing is ferroproc", parent["multiprocessing_is_ferroproc"]),
            ("child multiprocessing is ferroproc", child["multiprocessing_is_ferroproc"]),
            ("child test module sees ferroproc", child["test_module_is_ferroproc"]),
        ]
        bad = [name for name, value in checks if value != want]
        if child.get("pid") == parent.get("pid"):
            bad.append("child ran in the parent process")
        if bad:
            return False, "substitution NOT verified: " + "; ".join(
                ("not " if want else "unexpectedly ") + b for b in bad
            )
        what = "ferroproc" if want else "stdlib multiprocessing"
        return True, (
            f"verified: a {self.method} child (pid {child['pid']}, exit {p.get('exitcode')}) "
            f"and its test module see multiprocessing = {what} "
            f"({child['multiprocessing_module']})"
        )

    def totals(self) -> dict[str, int]:
        tot = dict.fromkeys((*COLUMNS, "not_reached", "not_run_tests"), 0)
        tot["classes_run"] = tot["classes_not_run"] = tot["tests_in_not_run_classes"] = 0
        for c in self.classes.values():
            if c.not_run:
                tot["classes_not_run"] += 1
                tot["tests_in_not_run_classes"] += c.n_tests
                continue
            tot["classes_run"] += 1
            for k, v in c.counts().items():
                tot[k] = tot.get(k, 0) + v
        return tot

    def to_json(self) -> dict:
        ok, probe_msg = self.probe_ok()
        return {
            "impl": self.impl,
            "start_method": self.method,
            "finished": self.finished,
            "attempts": self.attempts,
            "seconds": round(self.seconds, 1),
            "workdir": self.workdir,
            "substitution_verified": ok,
            "probe": {"ok": ok, "message": probe_msg, "raw": self.probe},
            "fatal": self.fatal,
            "notes": self.notes,
            "module_errors": self.module_errors,
            "totals": self.totals(),
            "classes": {
                name: {
                    "not_run": c.not_run,
                    "counts": None if c.not_run else c.counts(),
                    "tests_in_class": c.n_tests,
                    "fixture": c.fixture,
                    "never_run_tests": c.never,
                    "tests": c.tests,
                }
                for name, c in sorted(self.classes.items())
            },
        }


class EventReader:
    def __init__(self, path: str):
        self.path = path
        self.offset = 0

    def read_new(self) -> list[dict]:
        try:
            with open(self.path, encoding="utf-8") as f:
                f.seek(self.offset)
                data = f.read()
        except OSError:
            return []
        # Only complete lines: a worker killed mid-write leaves a partial one.
        end = data.rfind("\n") + 1
        self.offset += len(data[:end].encode("utf-8"))
        out = []
        for line in data[:end].splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                out.append(json.loads(line))
        return out


def _fixture_class(description: str) -> str | None:
    # "setUpClass (_ferroproc_compat_suite.WithProcessesTestProcess)"
    if "(" in description and description.endswith(")"):
        inner = description[description.index("(") + 1 : -1]
        return inner.rsplit(".", 1)[-1]
    return None


def run_method(impl: str, method: str, opts, selection: frozenset | None) -> MethodRun:
    workdir = tempfile.mkdtemp(prefix=f"ferroproc-compat-{impl}-{method}-")
    run = MethodRun(impl, method, workdir)
    events_path = os.path.join(workdir, "events.jsonl")
    usage_path = os.path.join(workdir, "usage.log")
    skip_path = os.path.join(workdir, "skip.txt")
    log_path = os.path.join(workdir, "worker.log")
    env = dict(os.environ)
    env["PYTHONPATH"] = _pythonpath()
    env["FERROPROC_COMPAT_START_METHOD"] = method
    env.pop("PYTHONSAFEPATH", None)
    env.pop("FERROPROC_COMPAT_DIAGNOSE_FALLBACK", None)
    if impl == "ferroproc":
        env["FERROPROC_SUBSTITUTE"] = "1"
        env["FERROPROC_COMPAT_USAGE_LOG"] = usage_path
        if opts.diagnose_fallback:
            env["FERROPROC_COMPAT_DIAGNOSE_FALLBACK"] = "1"
    else:
        env.pop("FERROPROC_SUBSTITUTE", None)
        env.pop("FERROPROC_COMPAT_USAGE_LOG", None)

    reader = EventReader(events_path)
    skip: set[str] = set()
    t_start = time.monotonic()
    deadline = t_start + opts.run_timeout
    while True:
        run.attempts += 1
        with open(skip_path, "w", encoding="utf-8") as f:
            f.write("\n".join(sorted(skip)))
        cmd = [
            sys.executable,
            WORKER,
            "--impl",
            impl,
            "--start-method",
            method,
            "--events",
            events_path,
            "--skip-file",
            skip_path,
            "--per-test-timeout",
            str(opts.per_test_timeout),
        ]
        if selection is not None:
            cmd += ["--only-runnable-with", ",".join(sorted(selection))]
        if opts.verbose:
            cmd.append("--verbose")
        if opts.classes:
            cmd += ["--classes", *opts.classes]
        remaining = deadline - time.monotonic()
        with open(log_path, "ab") as log:
            log.write(f"\n==== attempt {run.attempts}: {' '.join(cmd)}\n".encode())
            log.flush()
            proc = subprocess.Popen(
                cmd,
                cwd=workdir,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
            try:
                rc = proc.wait(timeout=max(remaining, 1))
            except subprocess.TimeoutExpired:
                rc = None
            finally:
                # The worker leads its own process group: whatever it left behind goes too.
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        last_start = None
        last_fixture = None
        done = False
        for ev in reader.read_new():
            kind = ev.get("event")
            if kind == "probe":
                run.probe = ev
            elif kind == "fatal":
                run.fatal.append(ev)
            elif kind == "class_not_run":
                c = run.cls(ev["class"])
                c.not_run, c.n_tests = ev["reason"], ev["tests"]
            elif kind == "test_not_run":
                run.cls(ev["class"]).never[ev["test"]] = ev["reason"]
            elif kind == "plan":
                c = run.cls(ev["class"])
                for t in ev["tests"]:
                    if t not in c.planned:
                        c.planned.append(t)
                c.n_tests = len(c.planned) + len(c.never)
            elif kind == "fixture":
                last_fixture, last_start = ev["class"], None
            elif kind == "start":
                last_start = (ev["class"], ev["test"])
            elif kind == "result":
                c = run.cls(ev["class"])
                c.tests[ev["test"]] = {
                    k: ev.get(k) for k in ("outcome", "raw", "detail", "notes", "tb", "seconds")
                }
                skip.add(f"{ev['class']}.{ev['test']}")
                last_start = None
            elif kind == "fixture_error":
                name = _fixture_class(ev["description"])
                msg = f"{ev['description']}: {ev['detail']}"
                if name and name in run.classes:
                    run.cls(name).fixture.append("error " + msg)
                else:
                    run.module_errors.append(msg + "\n" + ev.get("tb", ""))
            elif kind == "fixture_skip":
                name = _fixture_class(ev["description"])
                if name:
                    run.cls(name).fixture.append(f"skip {ev['description']}: {ev['detail']}")
            elif kind == "done":
                done = True
        if done:
            run.finished = True
            if rc is None:
                run.notes.append("worker hung at interpreter exit after the last test (killed)")
            elif rc != 0:
                run.notes.append(f"worker exited with status {rc} after the last test")
            break
        why = "whole-run time limit reached" if rc is None else f"worker died (status {rc})"
        if last_start is not None:
            cname, tname = last_start
            run.cls(cname).tests[tname] = {
                "outcome": "hung",
                "raw": "killed",
                "detail": f"{why} while this test ran (did not return; watchdog or crash)",
                "notes": [],
                "tb": _tail(log_path),
                "seconds": None,
            }
            skip.add(f"{cname}.{tname}")
        elif last_fixture is not None:
            run.cls(last_fixture).fixture.append(f"hung/crashed in setUpClass: {why}")
            skip.add(f"class:{last_fixture}")
        else:
            run.notes.append(f"{why} outside any test")
        if run.fatal or rc is None or run.attempts > opts.max_restarts:
            if not run.fatal:
                run.notes.append(f"gave up after {run.attempts} attempt(s): {why}")
            break
        run.notes.append(f"attempt {run.attempts}: {why}; restarted, skipping finished tests")
    # Planned tests that never reported (class or module fixture failed, or run cut short).
    for c in run.classes.values():
        failed_fixture = any(f.startswith(("error", "hung")) for f in c.fixture)
        skipped_fixture = any(f.startswith("skip") for f in c.fixture)
        for t in c.planned:
            if t in c.tests:
                continue
            if failed_fixture:
                c.tests[t] = {
                    "outcome": "error",
                    "raw": "fixture",
                    "detail": c.fixture[0],
                    "notes": [],
                    "tb": "",
                    "seconds": None,
                }
            elif skipped_fixture:
                c.tests[t] = {
                    "outcome": "skipped",
                    "raw": "fixture",
                    "detail": c.fixture[0],
                    "notes": [],
                    "tb": "",
                    "seconds": None,
                }
            elif run.module_errors:
                c.tests[t] = {
                    "outcome": "error",
                    "raw": "module",
                    "detail": run.module_errors[0].splitlines()[0],
                    "notes": [],
                    "tb": "",
                    "seconds": None,
                }
            else:
                c.tests[t] = {
                    "outcome": "not_reached",
                    "raw": "",
                    "detail": "run cut short",
                    "notes": [],
                    "tb": "",
                    "seconds": None,
                }
    run.seconds = time.monotonic() - t_start
    return run


def _tail(path: str, n: int = 4000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - n))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


# ---------------------------------------------------------------------------------------------
# Known failures
# ---------------------------------------------------------------------------------------------


def load_known_failures(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        data = tomllib.load(f)
    entries = data.get("failure", [])
    for e in entries:
        if not e.get("test") or not e.get("reason"):
            raise SystemExit(f"{path}: every [[failure]] needs 'test' and a one-line 'reason'")
    return entries


def known_reason(entries, impl, method, cname, tname) -> str | None:
    _, base = req.split_name(cname)
    for e in entries:
        if e.get("impl", "ferroproc") != impl:
            continue
        if "methods" in e and method not in e["methods"]:
            continue
        if any(fnmatch.fnmatchcase(k, e["test"]) for k in (f"{cname}.{tname}", f"{base}.{tname}")):
            return e["reason"]
    return None


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------


def unexpected_outcomes(run: MethodRun, known) -> list[str]:
    """The tests of `run` that failed, errored or hung and are not in known_failures.toml."""
    return [
        f"{cname}.{t}"
        for cname, c in run.classes.items()
        for t, r in c.tests.items()
        if r["outcome"] in BAD and not known_reason(known, run.impl, run.method, cname, t)
    ]


def is_clean(run: MethodRun, known) -> bool:
    """No unexpected outcome, substitution verified, nothing fatal, the run finished."""
    return (
        not unexpected_outcomes(run, known)
        and run.probe_ok()[0]
        and not run.fatal
        and not run.module_errors
        and run.finished
    )


def print_method(
    run: MethodRun, known, show_not_run: bool, keep_logs: bool = True, out=sys.stdout
) -> None:
    ok, msg = run.probe_ok()
    head = f"{run.impl} / {run.method}"
    logs = run.workdir if keep_logs or not is_clean(run, known) else "removed (a clean run)"
    print(
        f"\n=== {head}  ({run.seconds:.0f}s, {run.attempts} attempt(s), logs: {logs})",
        file=out,
    )
    print(f"    substitution: {'OK' if ok else 'FAILED'} - {msg}", file=out)
    for f in run.fatal:
        print(f"    FATAL ({f.get('stage')}): {f.get('detail')}", file=out)
        tb = (f.get("tb") or "").strip().splitlines()
        for line in tb[-8:]:
            print(f"      {line}", file=out)
    for m in run.module_errors:
        print(f"    MODULE FIXTURE: {m.splitlines()[0]}", file=out)
    for n in run.notes:
        print(f"    note: {n}", file=out)
    width = max([len(n) for n in run.classes] + [30])
    hdr = (
        f"    {'class':<{width}} "
        + " ".join(f"{h:>6}" for h in ("pass", "fail", "error", "skip", "needapi", "hung"))
        + "  not run / notes"
    )
    print(hdr, file=out)
    hidden: dict[str, int] = {}
    for name in sorted(run.classes):
        c = run.classes[name]
        if c.not_run:
            if show_not_run:
                print(
                    f"    {name:<{width}} "
                    + " ".join(f"{'-':>6}" for _ in COLUMNS)
                    + f"  could not run ({c.not_run}; {c.n_tests} tests)",
                    file=out,
                )
            else:
                key = c.not_run.split(" (")[0] if c.not_run.startswith("not in") else c.not_run
                hidden[key] = hidden.get(key, 0) + 1
            continue
        cnt = c.counts()
        extra = []
        if cnt["not_run_tests"]:
            extra.append(f"{cnt['not_run_tests']} test(s) never run")
        if cnt["not_reached"]:
            extra.append(f"{cnt['not_reached']} not reached")
        n_known = sum(
            1
            for t, r in c.tests.items()
            if r["outcome"] in BAD and known_reason(known, run.impl, run.method, name, t)
        )
        if n_known:
            extra.append(f"{n_known} known failure(s)")
        extra += c.fixture[:1]
        print(
            f"    {name:<{width}} "
            + " ".join(f"{cnt[k]:>6}" for k in COLUMNS)
            + ("  " + "; ".join(extra) if extra else ""),
            file=out,
        )
    tot = run.totals()
    print(
        f"    {'TOTAL':<{width}} "
        + " ".join(f"{tot[k]:>6}" for k in COLUMNS)
        + f"  ({tot['classes_run']} classes run; {tot['classes_not_run']} classes /"
        f" {tot['tests_in_not_run_classes']} tests could not run;"
        f" {tot['not_run_tests']} single tests never run)",
        file=out,
    )
    for reason, n in sorted(hidden.items()):
        print(f"    ({n} classes not shown: {reason})", file=out)
    bad = []
    for name in sorted(run.classes):
        for t, r in sorted(run.classes[name].tests.items()):
            if r["outcome"] in BAD:
                kr = known_reason(known, run.impl, run.method, name, t)
                bad.append(
                    f"      {r['outcome'].upper():6} {name}.{t}: {r['detail']}"
                    + (f"  [known: {kr}]" if kr else "")
                    + ("  {" + "; ".join(r["notes"]) + "}" if r.get("notes") else "")
                )
    if bad:
        print("    failures / errors / hangs:", file=out)
        for line in bad:
            print(line, file=out)


def print_needs_api(run: MethodRun, out=sys.stdout) -> None:
    """What the needs-api tests were missing, aggregated."""
    agg: dict[str, int] = {}
    for c in run.classes.values():
        for r in c.tests.values():
            if r["outcome"] != "needs_api":
                continue
            for note in r.get("notes") or []:
                head, _, rest = note.partition(": ")
                for item in rest.split(", "):
                    key = f"{head}: {item}"
                    agg[key] = agg.get(key, 0) + 1
    if agg:
        print(f"    needs-unimplemented-API tests ({run.method}) touched:", file=out)
        for key, n in sorted(agg.items(), key=lambda kv: (-kv[1], kv[0])):
            print(f"      {n:4} x {key}", file=out)


def print_diagnosis(run: MethodRun, out=sys.stdout) -> None:
    """--diagnose-fallback: needs-api tests that did not pass even with stdlib factories."""
    print(
        f"    DIAGNOSTIC ({run.method}; stdlib factories allowed, NOT ferroproc results):"
        " needs-api tests whose raw outcome was not a pass:",
        file=out,
    )
    for name in sorted(run.classes):
        for t, r in sorted(run.classes[name].tests.items()):
            if r["outcome"] == "needs_api" and r["raw"] not in ("passed", "skipped"):
                print(f"      {r['raw'].upper():6} {name}.{t}: {r['detail']}", file=out)


def print_compare(fp: MethodRun, std: MethodRun, out=sys.stdout) -> None:
    print(f"\n=== compare ferroproc vs stdlib / {fp.method} (same classes)", file=out)
    names = sorted(n for n in fp.classes if not fp.classes[n].not_run)
    width = max([len(n) for n in names] + [30])
    print(f"    {'class':<{width}}   ferroproc p/f/e/s/na/h      stdlib p/f/e/s/h", file=out)
    for name in names:
        a = fp.classes[name].counts()
        b = std.classes[name].counts() if name in std.classes else None
        sa = "/".join(str(a[k]) for k in COLUMNS)
        sb = "/".join(str(b[k]) for k in COLUMNS if k != "needs_api") if b else "-"
        print(f"    {name:<{width}}   {sa:<26}  {sb}", file=out)
    ta, tb = fp.totals(), std.totals()
    print(
        f"    {'TOTAL':<{width}}   "
        + f"{'/'.join(str(ta[k]) for k in COLUMNS):<26}  "
        + "/".join(str(tb[k]) for k in COLUMNS if k != "needs_api"),
        file=out,
    )
    regress = []
    for name in names:
        for t, r in sorted(fp.classes[name].tests.items()):
            s = std.classes.get(name)
            sr = s.tests.get(t) if s else None
            if r["outcome"] in BAD and sr and sr["outcome"] == "passed":
                regress.append(f"      {name}.{t}: ferroproc {r['outcome']}: {r['detail']}")
    if regress:
        print("    passes on the stdlib, not on ferroproc:", file=out)
        for line in regress:
            print(line, file=out)


def list_classes(present) -> None:
    import unittest

    env = dict(os.environ, FERROPROC_COMPAT_START_METHOD="fork")
    os.environ.update(env)
    import _ferroproc_compat_suite as mod

    print(f"ferroproc subsystems present: {sorted(present) if present else 'none'}")
    for name in sorted(dir(mod)):
        cls = getattr(mod, name)
        if (
            isinstance(cls, type)
            and issubclass(cls, unittest.TestCase)
            and cls.__module__ == mod.__name__
        ):
            needs = req.needs_of(name)
            reason = req.not_run_reason(name, present or frozenset())
            status = "runnable" if reason is None else reason
            print(f"  {name:<44} needs {','.join(needs) if needs else '?':<48} {status}")


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--start-method", default="all", choices=(*METHODS, "all"))
    ap.add_argument("--impl", default="ferroproc", choices=("ferroproc", "multiprocessing"))
    ap.add_argument(
        "--compare",
        action="store_true",
        help="run ferroproc and the stdlib on the same classes and compare",
    )
    ap.add_argument(
        "--classes",
        nargs="+",
        metavar="PATTERN",
        default=[],
        help="fnmatch patterns on class names (generated or base names)",
    )
    ap.add_argument("--json", metavar="FILE", help="write the full report as JSON")
    ap.add_argument("--per-test-timeout", type=float, default=60.0, metavar="S")
    ap.add_argument(
        "--run-timeout",
        type=float,
        default=3600.0,
        metavar="S",
        help="bound for one start method's whole run (default 3600)",
    )
    ap.add_argument(
        "--max-restarts",
        type=int,
        default=8,
        help="worker restarts after a hang/crash per start method",
    )
    ap.add_argument(
        "--ci",
        action="store_true",
        help="only classes whose ferroproc subsystems exist; exit 1 on any failure,"
        " error or hang not in known_failures.toml",
    )
    ap.add_argument("--jobs", type=int, default=1, help="start methods run in parallel")
    ap.add_argument(
        "--show-not-run",
        action="store_true",
        help="list every class that could not run (default outside --ci)",
    )
    ap.add_argument(
        "--diagnose-fallback",
        action="store_true",
        help="diagnostic only: missing ferroproc factories (Queue, Pipe, Event, ...) call the"
        " stdlib instead of raising; such tests stay needs-api, and their raw outcomes are"
        " listed to show whether ferroproc's own part copes",
    )
    ap.add_argument(
        "--keep-logs",
        action="store_true",
        help="keep each start method's work directory (events, worker log) even when its run"
        " was clean; a run with unexpected outcomes always keeps it",
    )
    ap.add_argument("--list-classes", action="store_true")
    ap.add_argument("--verbose", action="store_true")
    opts = ap.parse_args(argv)

    methods = METHODS if opts.start_method == "all" else (opts.start_method,)
    features = ferroproc_features()
    if opts.list_classes:
        list_classes(features)
        return 0
    impls = ["ferroproc", "multiprocessing"] if opts.compare else [opts.impl]
    # The class selection: with --ci or --compare, the classes runnable with ferroproc's
    # subsystems (so the stdlib runs exactly the same classes).
    selection = None
    if opts.ci or opts.compare or opts.impl == "ferroproc":
        selection = features if features is not None else frozenset()
    if opts.impl == "ferroproc" or opts.compare:
        print(f"ferroproc subsystems present: {sorted(features) if features else 'NONE'}")
    known = load_known_failures(KNOWN_FAILURES)

    jobs = [(impl, m) for impl in impls for m in methods]
    results: dict[tuple[str, str], MethodRun] = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, opts.jobs)) as pool:
        futs = {
            pool.submit(
                run_method,
                impl,
                m,
                opts,
                selection
                if (impl == "multiprocessing" and (opts.ci or opts.compare)) or impl == "ferroproc"
                else None,
            ): (impl, m)
            for impl, m in jobs
        }
        for fut in concurrent.futures.as_completed(futs):
            results[futs[fut]] = fut.result()

    show_not_run = opts.show_not_run or not (opts.ci or opts.compare)
    for impl, m in jobs:
        print_method(results[(impl, m)], known, show_not_run, opts.keep_logs)
        if impl == "ferroproc":
            print_needs_api(results[(impl, m)])
            if opts.diagnose_fallback:
                print_diagnosis(results[(impl, m)])
    if opts.compare:
        for m in methods:
            print_compare(results[("ferroproc", m)], results[("multiprocessing", m)])

    print("\n=== summary")
    first = results[jobs[0]]
    ran = sorted(n for n, c in first.classes.items() if not c.not_run)
    label = "CI classes" if opts.ci else "classes run"
    print(f"  {label} ({len(ran)}): {', '.join(ran)}")
    exit_code = 0
    gate_impl = "ferroproc" if (opts.compare or opts.impl == "ferroproc") else opts.impl
    used_known: set[str] = set()
    for impl, m in jobs:
        run = results[(impl, m)]
        tot = run.totals()
        ok, _ = run.probe_ok()
        unexpected = []
        for cname, c in run.classes.items():
            for t, r in c.tests.items():
                if r["outcome"] in BAD:
                    kr = known_reason(known, impl, m, cname, t)
                    if kr:
                        used_known.add(kr)
                    else:
                        unexpected.append(f"{cname}.{t}")
        print(
            f"  {impl:<16} {m:<11} passed {tot['passed']:4}  failed {tot['failed']:3}  "
            f"errors {tot['error']:3}  skipped {tot['skipped']:3}  needs-api "
            f"{tot['needs_api']:3}  hung {tot['hung']:2}  | substitution "
            f"{'verified' if ok else 'NOT VERIFIED'}"
            + (f"  | {len(unexpected)} unexpected" if unexpected else "")
        )
        if opts.ci and impl == gate_impl and not opts.diagnose_fallback:
            if unexpected or not ok or run.fatal or run.module_errors or not run.finished:
                exit_code = 1
    ran_ids = [
        (impl, m, cname, t)
        for (impl, m), run in results.items()
        for cname, c in run.classes.items()
        for t in c.tests
    ]
    stale = [
        e["test"]
        for e in known
        if e["reason"] not in used_known
        and any(known_reason([e], impl, m, cname, t) for impl, m, cname, t in ran_ids)
    ]
    if stale and opts.ci:
        print(f"  note: known_failures.toml entries that did not fail this run: {stale}")
    if opts.json:
        with open(opts.json, "w", encoding="utf-8") as f:
            json.dump(
                {
                    "ferroproc_features": sorted(features) if features else None,
                    "ci": opts.ci,
                    "runs": [results[j].to_json() for j in jobs],
                },
                f,
                indent=1,
            )
        print(f"  JSON report: {opts.json}")
    if not opts.keep_logs:
        for run in results.values():
            if is_clean(run, known):
                shutil.rmtree(run.workdir, ignore_errors=True)
    if opts.ci and opts.diagnose_fallback:
        print("  CI: not judged (--diagnose-fallback results are not ferroproc results)")
    elif opts.ci:
        print(f"  CI: {'PASS' if exit_code == 0 else 'FAIL'}")
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
