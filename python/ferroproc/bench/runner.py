"""Runs selected cases on each implementation, interleaved, and summarizes the samples.

For one case the order of work is:

1. warm-up: each implementation runs ``case.warmup`` operations, untimed. This pays one-time
   costs (forkserver and resource-tracker start, first imports) and decides whether the module
   can run the case at all (a :class:`SkipCase` or a missing attribute marks it skipped);
2. ``repeat`` rounds; each round times ``case.n`` operations on every implementation that
   passed the warm-up. The order flips every round (stdlib, ferroproc, then ferroproc,
   stdlib, ...) so slow drift of the machine affects both sides alike;
3. each sample is seconds per operation; the summary is the median, with min, max and the
   quartiles as the spread. Before each sample the runner collects garbage and returns free
   C-heap memory to the system (``malloc_trim``), so no sample pays for what an earlier one
   left behind.

By default (``isolated``) each implementation runs a case in an interpreter of its own that
imports only it (:mod:`ferroproc.bench.host`, started afresh for each case), as a user's
program does; the floors get one too. ``--shared-process`` runs everything in the benchmark's
own process instead, where both libraries are loaded.

Reference cases run the same way with a single pseudo-implementation, ``reference``. A case
that names a ``floor`` also times that floor in every round, as a third participant of the
rotation, so "how many floors" compares numbers taken under the same machine conditions
rather than minutes apart. A case's peers (other libraries, see ``registry.peer``) are timed
right after the case's own rounds, in rounds of their own.
"""

from __future__ import annotations

import gc
import statistics
import time
from typing import TYPE_CHECKING, Any

from ferroproc.bench.registry import FRESH, MISSING_API, PEERS, SkipCase, describe, trim_heap

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from ferroproc.bench.registry import Case

#: Label used for reference (floor) cases, which do not run per module.
REFERENCE = "reference"

#: Label of a case's floor when it is timed alongside the case.
FLOOR = "floor"


#: The host's command: run with ``-c`` rather than ``-m``, a spawn or forkserver child has no
#: main module to import again (runpy and the module: about 3 ms per child here), as when the
#: benchmark runs as ``-m ferroproc.bench``, a package's ``__main__``, which children skip.
_HOST_MAIN = "import sys; from ferroproc.bench.host import main; sys.exit(main(sys.argv[1:]))"


class _Host:
    """One implementation's interpreter for one case (see :mod:`ferroproc.bench.host`)."""

    def __init__(self, module: str) -> None:
        import subprocess
        import sys

        self.proc = subprocess.Popen(
            [sys.executable, "-c", _HOST_MAIN, module],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            encoding="utf-8",
        )

    def run(self, name: str, n: int) -> float:
        """Runs `n` operations of case `name` there; its seconds, or its exception."""
        stdin, stdout = self.proc.stdin, self.proc.stdout
        assert stdin is not None and stdout is not None
        try:
            stdin.write(f"{name} {n}\n")
            stdin.flush()
        except BrokenPipeError:
            pass  # reported below
        line = stdout.readline()
        if not line:
            raise RuntimeError(f"the benchmark's host process exited ({self.proc.wait()})")
        kind, _, text = line.rstrip("\n").partition(" ")
        if kind == "seconds":
            return float(text)
        if kind == "skip":
            raise SkipCase(text)
        if kind == "missing":
            raise AttributeError(text)
        raise RuntimeError(text)

    def close(self) -> None:
        import subprocess

        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def _sample(bench: Case, mod: Any, n: int) -> float:
    """Total seconds of `n` operations of `bench` on `mod` (in its host, if it is one)."""
    if isinstance(mod, _Host):
        return mod.run(bench.name, n)  # the host collects garbage itself
    gc.collect()
    trim_heap()
    return bench(mod, n)


def summarize(samples: Sequence[float]) -> dict[str, Any]:
    """Median and spread of per-operation times (seconds)."""
    ordered = sorted(samples)
    if len(ordered) >= 2:
        q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
    else:
        q1 = q3 = ordered[0]
    return {
        "samples": list(samples),
        "median": statistics.median(ordered),
        "min": ordered[0],
        "max": ordered[-1],
        "q1": q1,
        "q3": q3,
    }


def run_case(
    case: Case,
    impls: Sequence[tuple[str, Any]],
    repeat: int,
    progress: Callable[[str], None] | None = None,
    floor: Case | None = None,
    *,
    isolated: bool = False,
) -> dict[str, Any]:
    """Runs one case (and its ``floor``, if given, in the same rounds); returns its record.

    `isolated`: each implementation, and the floors, run in an interpreter of their own
    (:mod:`ferroproc.bench.host`), started for this case; peers always do.
    """
    targets: list[tuple[str, Any]] = [(REFERENCE, None)] if case.reference else list(impls)
    peers = {} if case.reference else PEERS.get(case.name, {})

    def bench_of(label: str) -> Case:
        if label == FLOOR and floor is not None:
            return floor
        return peers.get(label, case)

    if floor is not None:
        targets.append((FLOOR, None))
    hosts: list[_Host] = []
    if isolated:
        hosts = [_Host(getattr(mod, "__name__", "-")) for _, mod in targets]
        targets = [(label, host) for (label, _), host in zip(targets, hosts, strict=True)]
    try:
        return _run_rounds(case, targets, peers, bench_of, repeat=repeat, progress=progress)
    finally:
        for host in hosts:
            host.close()


def _run_rounds(case, targets, peers, bench_of, *, repeat, progress):
    skipped: dict[str, str] = {}
    errors: dict[str, str] = {}
    live: list[tuple[str, Any]] = []
    targets = targets + [(label, None) for label in peers]
    for label, mod in targets:
        bench = bench_of(label)
        try:
            if bench.warmup:
                _sample(bench, mod, bench.warmup)
        except SkipCase as exc:
            skipped[label] = str(exc) or "skipped by the case"
        except MISSING_API as exc:
            skipped[label] = f"lacks the API: {describe(exc)}"
        except Exception as exc:
            errors[label] = f"warm-up failed: {describe(exc)}"
        else:
            live.append((label, mod))

    samples: dict[str, list[float]] = {label: [] for label, _ in live}
    main = [(label, mod) for label, mod in live if label not in peers]
    others = [(label, mod) for label, mod in live if label in peers]
    # Peers run after the case's own rounds, not among them: a peer's exiting helper
    # processes would otherwise still be freeing memory while stdlib or ferroproc is timed.
    rounds = [main if i % 2 == 0 else main[::-1] for i in range(repeat)]
    rounds += [others if i % 2 == 0 else others[::-1] for i in range(repeat if others else 0)]
    for index, order in enumerate(rounds):
        round_no = index % repeat
        for label, mod in order:
            if label in errors or label in skipped:
                continue
            bench = bench_of(label)
            if progress is not None:
                progress(f"{case.name}: {label} repeat {round_no + 1}/{repeat}")
            try:
                seconds = _sample(bench, mod, bench.n)
            except SkipCase as exc:
                skipped[label] = str(exc) or "skipped by the case"
            except Exception as exc:
                errors[label] = f"repeat {round_no + 1} failed: {describe(exc)}"
            else:
                samples[label].append(seconds / bench.n)

    summaries = {
        label: summarize(values)
        for label, values in samples.items()
        if values and label not in errors and label not in skipped
    }
    floor_result = summaries.pop(FLOOR, None)
    peer_results = {label: summaries.pop(label) for label in peers if label in summaries}
    results = summaries
    ratio = None
    if "stdlib" in results and "ferroproc" in results and results["stdlib"]["median"] > 0:
        ratio = results["ferroproc"]["median"] / results["stdlib"]["median"]
    floor_multiple = {}
    if floor_result is not None and floor_result["median"] > 0:
        floor_multiple = {
            label: result["median"] / floor_result["median"] for label, result in results.items()
        }
    # Peers ran in fresh interpreters: compare them with ferroproc run the same way.
    fp = peer_results.get(FRESH) or results.get("ferroproc")
    peer_ratio = {
        label: fp["median"] / result["median"]
        for label, result in peer_results.items()
        if label != FRESH and fp is not None and result["median"] > 0
    }
    return {
        "name": case.name,
        "description": case.description,
        "unit": case.unit,
        "n": case.n,
        "reference": case.reference,
        "floor": case.floor,
        "results": results,
        "ratio": ratio,
        "floor_result": floor_result,
        "floor_multiple": floor_multiple,
        "peers": peer_results,
        "peer_ratio": peer_ratio,
        "skipped": skipped,
        "errors": errors,
    }


def run_all(
    cases: Sequence[Case],
    impls: Sequence[tuple[str, Any]],
    repeat: int,
    progress: Callable[[str], None] | None = None,
    *,
    isolated: bool = False,
) -> list[dict[str, Any]]:
    """Runs every case in order; a case's floor must be among ``cases`` to be timed with it."""
    by_name = {c.name: c for c in cases}
    records = []
    for index, case in enumerate(cases, 1):
        started = time.perf_counter()
        floor = by_name.get(case.floor) if case.floor else None
        record = run_case(case, impls, repeat, progress, floor, isolated=isolated)
        record["wall_seconds"] = time.perf_counter() - started
        records.append(record)
        if progress is not None:
            progress(f"[{index}/{len(cases)}] {case.name} done in {record['wall_seconds']:.1f} s")
    return records
