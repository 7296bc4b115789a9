"""Smoke test of ``python -m ferroproc.bench``: it runs, and its JSON has what users compare.

The benchmark runs in its own interpreter, so a hang costs one subprocess. No timing
assertions: only the shape of the output is checked.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

CASE = "process_start_join[fork]"


def _ferroproc_imports() -> bool:
    try:
        return importlib.util.find_spec("ferroproc._ferroproc") is not None
    except ImportError:
        return False


pytestmark = pytest.mark.skipif(not _ferroproc_imports(), reason="ferroproc does not import")


def _bench_json(case: str, timeout: float) -> dict:
    """The ``--json`` report of one repeat of `case`, run in its own interpreter."""
    proc = subprocess.run(
        [sys.executable, "-m", "ferroproc.bench", "--case", case, "--repeat", "1", "--json"],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.mark.timeout(150)
def test_json_has_both_implementations_and_a_ratio() -> None:
    report = _bench_json(CASE, 120)

    assert report["repeat"] == 1
    # By default each implementation runs in an interpreter of its own.
    assert report["machine"]["isolated"] is True
    assert report["machine"]["modules"]["ferroproc"]["module"] == "ferroproc"
    by_name = {record["name"]: record for record in report["cases"]}
    record = by_name[CASE]
    assert record["errors"] == {}
    assert record["skipped"] == {}
    assert set(record["results"]) == {"stdlib", "ferroproc"}
    for result in record["results"].values():
        assert len(result["samples"]) == 1
        assert result["median"] > 0
    assert isinstance(record["ratio"], float)
    assert record["ratio"] > 0
    # The floor this case names is timed along with it, and on its own.
    assert record["floor_result"]["median"] > 0
    assert set(record["floor_multiple"]) == {"stdlib", "ferroproc"}
    assert record["floor"] in by_name


@pytest.mark.timeout(300)
def test_pool_case_reports_its_peers() -> None:
    """Peers (other libraries) of a pool case are timed after it, each in its own interpreter;
    one that is not installed is reported as skipped, not as an error."""
    case = "pool_lifecycle"
    record = {r["name"]: r for r in _bench_json(case, 280)["cases"]}[case]
    assert record["errors"] == {}
    # Its floor: two raw forked children, one round trip, SIGTERM, waitpid.
    assert record["floor"] == "floor_os_two_workers"
    assert record["floor_result"]["median"] > 0
    labels = {"concurrent.futures", "loky", "mpire"}
    assert labels <= set(record["peers"]) | set(record["skipped"])
    assert "concurrent.futures" in record["peers"]  # the stdlib's executor is always there
    # ferroproc also runs in a fresh interpreter, and the peers are compared with that.
    assert "ferroproc, fresh" in record["peers"]
    assert set(record["peer_ratio"]) == set(record["peers"]) - {"ferroproc, fresh"}
    fresh = record["peers"]["ferroproc, fresh"]["median"]
    for label, result in record["peers"].items():
        assert len(result["samples"]) == 1
        assert result["median"] > 0
        if label != "ferroproc, fresh":
            assert record["peer_ratio"][label] == pytest.approx(fresh / result["median"])
    for label in labels - set(record["peers"]):
        assert record["skipped"][label].startswith("lacks the API")
    assert set(record["results"]) == {"stdlib", "ferroproc"}


@pytest.mark.timeout(150)
def test_shared_process_mode_runs_both_in_the_benchmarks_process() -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ferroproc.bench",
            "--case",
            "lock_uncontended[Lock]",
            "--repeat",
            "2",
            "--json",
            "--shared-process",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["machine"]["isolated"] is False
    (record,) = report["cases"]
    assert record["errors"] == {}
    assert set(record["results"]) == {"stdlib", "ferroproc"}


@pytest.mark.timeout(120)
def test_host_answers_each_request_and_keeps_stdout_for_answers() -> None:
    # One implementation's interpreter for a case (the default, isolated mode): a line per
    # request, whatever the case or its children print.
    requests = ["lock_uncontended[Lock] 50", "no_such_case 1", "process_start_join[fork] 2"]
    proc = subprocess.run(
        [sys.executable, "-m", "ferroproc.bench.host", "ferroproc"],
        input="".join(r + "\n" for r in requests),
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    answers = proc.stdout.splitlines()
    assert len(answers) == 3, proc.stdout
    assert answers[0].startswith("seconds ") and float(answers[0].split()[1]) > 0
    assert answers[1] == "error no case 'no_such_case'"
    assert answers[2].startswith("seconds ") and float(answers[2].split()[1]) > 0
