"""Command line of ``python -m ferroproc.bench``."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Sequence

#: Debug hook: run another module in the "ferroproc" column (e.g. ``multiprocessing``, to
#: compare the stdlib with itself while ferroproc is incomplete). Same as the hidden ``--impl``.
IMPL_ENV = "FERROPROC_BENCH_IMPL"


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (kept separate so tests and docs can inspect it)."""
    parser = argparse.ArgumentParser(
        prog="python -m ferroproc.bench",
        description=(
            "Time the same workloads on the stdlib's multiprocessing and on ferroproc, in one "
            "run, and print medians and the ratio ferroproc/stdlib (time per operation; below "
            "1.00 means ferroproc is faster)."
        ),
    )
    parser.add_argument(
        "--case",
        action="append",
        metavar="NAME",
        help=(
            "run only matching cases; repeatable. NAME is an exact name, a prefix, or a glob "
            "with * and ? (brackets are literal: 'process_*[fork]'). Default: all cases."
        ),
    )
    parser.add_argument(
        "--repeat",
        type=_positive_int,
        default=5,
        metavar="N",
        help="timed repeats per case and implementation; the median is reported (default 5)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print one JSON document with every sample to stdout instead of the table",
    )
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    parser.add_argument(
        "--quiet", action="store_true", help="no progress lines on stderr while running"
    )
    parser.add_argument(
        "--shared-process",
        action="store_true",
        help=(
            "run every case in this one process, which has both libraries loaded, instead of "
            "giving each implementation of each case a fresh interpreter importing only it "
            "(the default; a fork's cost depends on what the forking process has imported)"
        ),
    )
    parser.add_argument("--impl", default=None, help=argparse.SUPPRESS)
    return parser


def _list_cases(cases: Sequence[Any]) -> str:
    from ferroproc.bench.registry import PEERS

    rows = [("case", "ops/repeat", "unit", "description")]
    for case in cases:
        desc = ("[reference] " if case.reference else "") + case.description
        if case.floor:
            desc += f" (floor: {case.floor})"
        peers = PEERS.get(case.name)
        if peers:
            desc += f" (peers: {', '.join(peers)})"
        rows.append((case.name, str(case.n), case.unit, desc))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return "\n".join(
        f"{a:<{widths[0]}}  {b:>{widths[1]}}  {c:<{widths[2]}}  {d}".rstrip() for a, b, c, d in rows
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the CLI; returns the exit status (1 if any case failed, 2 on usage errors)."""
    parser = build_parser()
    args = parser.parse_args(argv)

    from ferroproc.bench import cases as _cases  # noqa: F401 -- registers the cases
    from ferroproc.bench.registry import REGISTRY, prepare_module, select

    if args.list:
        print(_list_cases(list(REGISTRY.values())))
        return 0
    try:
        selected = select(args.case)
    except KeyError as exc:
        parser.error(f"no case matches {exc.args[0]} (see --list)")

    import multiprocessing

    from ferroproc.bench.report import format_table, machine_info, to_json
    from ferroproc.bench.runner import run_all

    impl_name = args.impl or os.environ.get(IMPL_ENV) or "ferroproc"
    try:
        under_test = importlib.import_module(impl_name)
    except ImportError as exc:
        print(f"cannot import {impl_name!r}: {exc}", file=sys.stderr)
        return 2
    impls = [("stdlib", multiprocessing), ("ferroproc", under_test)]
    for _, mod in impls:
        prepare_module(mod)

    def progress(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    machine = machine_info(impls)
    machine["isolated"] = not args.shared_process
    records = run_all(
        selected,
        impls,
        args.repeat,
        None if args.quiet else progress,
        isolated=not args.shared_process,
    )
    if args.json:
        json.dump(to_json(machine, args.repeat, records), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(format_table(machine, args.repeat, records))
    return 1 if any(r["errors"] for r in records) else 0
