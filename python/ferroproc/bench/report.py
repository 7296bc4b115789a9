"""Machine description, the text table and the JSON document.

Convention, used in the table and the JSON alike: every result is **time per operation**
(lower is better) and ``ratio = ferroproc median / stdlib median``. A ratio of 0.25 means
ferroproc needs a quarter of the stdlib's time, i.e. it is 4x faster; above 1.00 it is slower.
"""

from __future__ import annotations

import datetime
import os
import platform
import sys
from typing import TYPE_CHECKING, Any

from ferroproc.bench.registry import FRESH, PEERS
from ferroproc.bench.runner import FLOOR, REFERENCE

if TYPE_CHECKING:
    from collections.abc import Sequence

SCHEMA_VERSION = 1

CONVENTION = (
    "time per operation, lower is better; ratio = ferroproc median / stdlib median "
    "(below 1.00: ferroproc is faster, 0.25 = 4x faster)"
)

_SCALES = ((1.0, "s"), (1e-3, "ms"), (1e-6, "us"), (1e-9, "ns"))


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            for line in info:
                key, _, value = line.partition(":")
                if key.strip() in {"model name", "Hardware", "cpu model"}:
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _version_of(module: Any) -> str:
    """Version string of a module under test: ferroproc's native module, else the stdlib's."""
    name = getattr(module, "__name__", "?")
    if name.split(".")[0] == "ferroproc":
        native = getattr(module, "_ferroproc", None)
        version = getattr(native, "__version__", None)
        if version is None:
            try:
                from ferroproc import _ferroproc

                version = _ferroproc.__version__
            except (ImportError, AttributeError):
                version = "unknown (native module missing)"
        return f"{version} (ferroproc._ferroproc.__version__)"
    if name == "multiprocessing":
        return f"(stdlib of Python {platform.python_version()})"
    return str(getattr(module, "__version__", "unknown"))


def machine_info(impls: Sequence[tuple[str, Any]]) -> dict[str, Any]:
    """What the results depend on: CPU, cores, kernel, interpreter and module versions."""
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count()
    try:
        load: list[float] | None = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {
        "date_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S"),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_usable": usable,
        "kernel": f"{platform.system()} {platform.release()}",
        "arch": platform.machine(),
        "loadavg": load,
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "python_build": " ".join(platform.python_build()),
        "executable": sys.executable,
        "modules": {
            label: {"module": getattr(mod, "__name__", "?"), "version": _version_of(mod)}
            for label, mod in impls
        },
    }


def to_json(machine: dict[str, Any], repeat: int, records: list[dict[str, Any]]) -> dict[str, Any]:
    """The document printed by ``--json``; all times are seconds per operation."""
    return {
        "schema": SCHEMA_VERSION,
        "convention": CONVENTION,
        "repeat": repeat,
        "machine": machine,
        "cases": records,
    }


# -- text table ----------------------------------------------------------------------------


def _scale_for(seconds: float) -> tuple[float, str]:
    for factor, unit in _SCALES:
        if seconds >= factor:
            return factor, unit
    return _SCALES[-1]


def _num(value: float) -> str:
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _cell(result: dict[str, Any] | None, factor: float) -> str:
    if result is None:
        return "-"
    lo, hi = result["min"] / factor, result["max"] / factor
    return f"{_num(result['median'] / factor)} [{_num(lo)}-{_num(hi)}]"


def _multiple(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}x"


def _render(rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [
            cell.rjust(width) if i in right else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def format_table(machine: dict[str, Any], repeat: int, records: list[dict[str, Any]]) -> str:
    """Header with the machine, the comparison table, the floors and the notes."""
    mods = machine["modules"]
    out = [
        f"ferroproc.bench  {machine['date_utc']} UTC",
        f"machine    {machine['cpu_model']}, {machine['cpu_count']} CPUs "
        f"({machine['cpu_usable']} usable), {machine['kernel']} {machine['arch']}, "
        f"load {' '.join(str(x) for x in machine['loadavg'] or ['?'])}",
        f"python     {machine['python']} ({machine['executable']})",
    ]
    for label, info in mods.items():
        out.append(f"{label:<10} {info['module']} {info['version']}")
    if "ferroproc" in mods and mods["ferroproc"]["module"].split(".")[0] != "ferroproc":
        out.append("WARNING    the ferroproc column runs a substitute module (debug run)")
    out += [
        f"method     median of {repeat} repeat(s), stdlib/ferroproc alternated each repeat; "
        "[min-max] of the repeats",
        f"reading    {CONVENTION}",
        "",
    ]

    compared = [r for r in records if not r["reference"]]
    floors = [r for r in records if r["reference"]]
    notes: list[str] = []

    def note(text: str) -> str:
        notes.append(text)
        return f"({len(notes)})"

    def status(record: dict[str, Any], label: str, factor: float) -> str:
        if label in record["errors"]:
            return "ERROR " + note(f"{record['name']} {label}: {record['errors'][label]}")
        if label in record["skipped"]:
            return "skipped " + note(f"{record['name']} {label}: {record['skipped'][label]}")
        return _cell(record["results"].get(label), factor)

    def floor_cell(record: dict[str, Any], factor: float) -> str:
        if record["floor"] is None:
            return "-"
        if FLOOR in record["errors"] or FLOOR in record["skipped"]:
            return status(record, FLOOR, factor)
        result = record.get("floor_result")
        return "-" if result is None else _num(result["median"] / factor)

    if compared:
        header = ["case", "unit", "stdlib", "ferroproc", "fp/std", "floor", "std/floor", "fp/floor"]
        rows = [header]
        for record in compared:
            medians = [r["median"] for r in record["results"].values()]
            factor, unit = _scale_for(min(medians)) if medians else (1e-3, "ms")
            mult = record.get("floor_multiple", {})
            ratio = record["ratio"]
            rows.append(
                [
                    record["name"],
                    f"{unit}/{record['unit']}",
                    status(record, "stdlib", factor),
                    status(record, "ferroproc", factor),
                    "-" if ratio is None else f"{ratio:.2f}",
                    floor_cell(record, factor),
                    _multiple(mult.get("stdlib")),
                    _multiple(mult.get("ferroproc")),
                ]
            )
        out += _render(rows, right={2, 3, 4, 5, 6, 7})
        out.append(
            "floor: median of the case's reference floor (named in --list), timed in the same "
            "rounds; std/floor, fp/floor: medians as multiples of it"
        )

    with_peers = [r for r in compared if PEERS.get(r["name"])]
    if with_peers:
        out += [
            "",
            "peers: other libraries doing the same work, timed right after the case, each "
            "sample in a fresh interpreter, as is the ferroproc column here "
            "(fp/peer = its median / the peer's):",
        ]
        rows = [["case", "peer", "unit", "peer", "ferroproc", "fp/peer"]]
        for record in with_peers:
            fp = record["peers"].get(FRESH)
            for label in PEERS[record["name"]]:
                if label == FRESH:
                    continue
                result = record["peers"].get(label)
                medians = [r["median"] for r in (result, fp) if r is not None]
                factor, unit = _scale_for(min(medians)) if medians else (1e-3, "ms")
                ratio = record["peer_ratio"].get(label)
                rows.append(
                    [
                        record["name"],
                        label,
                        f"{unit}/{record['unit']}",
                        _cell(result, factor) if result else status(record, label, factor),
                        _cell(fp, factor) if fp else status(record, FRESH, factor),
                        "-" if ratio is None else f"{ratio:.2f}",
                    ]
                )
        out += _render(rows, right={3, 4, 5})

    if floors:
        out += ["", "reference floors on their own (plain os calls, no multiprocessing):"]
        rows = [["floor", "unit", "median [min-max]"]]
        for record in floors:
            result = record["results"].get(REFERENCE)
            factor, unit = _scale_for(result["median"]) if result else (1e-3, "ms")
            rows.append(
                [record["name"], f"{unit}/{record['unit']}", status(record, REFERENCE, factor)]
            )
        out += _render(rows, right={2})

    if notes:
        out += ["", "notes:"] + [f"  ({i}) {text}" for i, text in enumerate(notes, 1)]
    return "\n".join(out)
