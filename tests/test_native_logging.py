"""Rust `log` records reach Python `logging` under the `ferroproc` logger (pyo3-log)."""

from __future__ import annotations

import logging

import _workers
import pytest


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


def test_native_debug_records_reach_the_ferroproc_logger():
    import ferroproc
    from ferroproc import _ferroproc, util

    util.get_logger()  # installs the bridge if `logging` was not imported before ferroproc
    logger = logging.getLogger("ferroproc")
    handler = _Collect()
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    _ferroproc.reset_logging()  # pyo3-log caches levels: tell it they changed
    try:
        p = ferroproc.get_context("spawn").Process(target=_workers.noop)
        p.start()
        p.join(_workers.SHORT_TIMEOUT)
        assert p.exitcode == 0
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        _ferroproc.reset_logging()
    spawned = [r for r in handler.records if "posix_spawn" in r.getMessage()]
    assert spawned, [r.getMessage() for r in handler.records]
    assert spawned[0].name == "ferroproc"
    assert f"pid {p.pid}" in spawned[0].getMessage()


@pytest.mark.parametrize("level", [logging.INFO, logging.WARNING])
def test_disabled_levels_emit_nothing(level):
    import ferroproc
    from ferroproc import _ferroproc

    logger = logging.getLogger("ferroproc")
    handler = _Collect()
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(level)
    _ferroproc.reset_logging()
    try:
        p = ferroproc.get_context("spawn").Process(target=_workers.noop)
        p.start()
        p.join(_workers.SHORT_TIMEOUT)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        _ferroproc.reset_logging()
    assert not [r for r in handler.records if "posix_spawn" in r.getMessage()]
