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

from ferroproc.bench.registry import FRESH, PEERS, SkipCase

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from ferroproc.bench.registry import Case

#: Label used for reference (floor) cases, which do not run per module.
REFERENCE = "reference"

#: Label of a case's floor when it is timed alongside the case.
FLOOR = "floor"

#: Exceptions from the warm-up call that mean "this module lacks the API", not "it is broken".
_MISSING_API = (AttributeError, NotImplementedError, ImportError)


def _trim_heap() -> None:
    """Returns the C heap's free memory to the system before a sample (glibc only).

    Earlier cases leave this process with tens of MB of freed heap (a million-item ``map``
    result, say), and every fork copies the mappings that hold it: in one measurement a
    ferroproc pool's life took 11.9 ms after two such maps and 8.0 ms after trimming; the
    stdlib's forks pay for the same mappings. Trimming makes a case's figures less
    dependent on the cases before it.
    """
    global _malloc_trim
    if _malloc_trim is None:
        try:
            import ctypes

            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError, ImportError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim: Any = None


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


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def run_case(
    case: Case,
    impls: Sequence[tuple[str, Any]],
    repeat: int,
    progress: Callable[[str], None] | None = None,
    floor: Case | None = None,
) -> dict[str, Any]:
    """Runs one case (and its ``floor``, if given, in the same rounds); returns its record."""
    targets: list[tuple[str, Any]] = [(REFERENCE, None)] if case.reference else list(impls)
    skipped: dict[str, str] = {}
    errors: dict[str, str] = {}
    live: list[tuple[str, Any]] = []
    peers = {} if case.reference else PEERS.get(case.name, {})

    def bench_of(label: str) -> Case:
        if label == FLOOR and floor is not None:
            return floor
        return peers.get(label, case)

    if floor is not None:
        targets.append((FLOOR, None))
    targets += [(label, None) for label in peers]
    for label, mod in targets:
        bench = bench_of(label)
        try:
            if bench.warmup:
                bench(mod, bench.warmup)
        except SkipCase as exc:
            skipped[label] = str(exc) or "skipped by the case"
        except _MISSING_API as exc:
            skipped[label] = f"lacks the API: {_describe(exc)}"
        except Exception as exc:
            errors[label] = f"warm-up failed: {_describe(exc)}"
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
            gc.collect()
            _trim_heap()
            try:
                seconds = bench(mod, bench.n)
            except SkipCase as exc:
                skipped[label] = str(exc) or "skipped by the case"
            except Exception as exc:
                errors[label] = f"repeat {round_no + 1} failed: {_describe(exc)}"
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
) -> list[dict[str, Any]]:
    """Runs every case in order; a case's floor must be among ``cases`` to be timed with it."""
    by_name = {c.name: c for c in cases}
    records = []
    for index, case in enumerate(cases, 1):
        started = time.perf_counter()
        floor = by_name.get(case.floor) if case.floor else None
        record = run_case(case, impls, repeat, progress, floor)
        record["wall_seconds"] = time.perf_counter() - started
        records.append(record)
        if progress is not None:
            progress(f"[{index}/{len(cases)}] {case.name} done in {record['wall_seconds']:.1f} s")
    return records
