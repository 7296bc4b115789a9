"""Startup probe of the compat harness: verifies the substitution *inside a child*.

``check(path, expect)`` is the target of one Process started under the run's start method
before any test runs; it writes what it sees to ``path`` as JSON.
"""

import json
import os
import sys


def snapshot() -> dict:
    """What this interpreter's ``multiprocessing`` really is."""
    mp = sys.modules.get("multiprocessing")
    fp = sys.modules.get("ferroproc")
    subs = {}
    for name, mod in sorted(sys.modules.items()):
        if name.startswith("multiprocessing."):
            subs[name] = getattr(mod, "__name__", repr(mod)) if mod is not None else None
    from test import _test_multiprocessing as source

    return {
        "pid": os.getpid(),
        "multiprocessing_module": getattr(mp, "__name__", None),
        "multiprocessing_is_ferroproc": fp is not None and mp is fp,
        "test_module_sees": getattr(source.multiprocessing, "__name__", None),
        "test_module_is_ferroproc": fp is not None and source.multiprocessing is fp,
        "submodules": subs,
        "start_method": mp.get_start_method(allow_none=True) if mp else None,
    }


def check(path: str) -> None:
    """Probe target: record the child's view."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(snapshot(), f)
