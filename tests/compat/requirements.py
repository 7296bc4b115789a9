"""Which ferroproc subsystems each class of ``_test_multiprocessing.py`` needs.

A class runs only when every subsystem it needs exists in ferroproc (``ferroproc.<sub>``
is importable). Otherwise it is reported as "could not run (missing: ...)" and neither
executed nor counted. Tests inside a runnable class that still touch something missing are
caught at run time and reported as "needs unimplemented API" (see README.md).

Keys are the *base* names from the test file (``_TestQueue``, ``TestStartMethod``); the
generated ``WithProcessesTestQueue``/``WithThreadsTestQueue``/``WithManagerTestQueue`` add
the needs of their mixin (``MIXIN_NEEDS``). A class that is not in the table is never run
("not classified"), so a new CPython test class cannot slip through unreviewed.
"""

from __future__ import annotations

import fnmatch
import re

# Subsystems that ferroproc's process layer is built from.
CORE = ("process", "context", "util")

CLASS_NEEDS: dict[str, tuple[str, ...]] = {
    # -- processes, contexts, util, logging ---------------------------------------------
    "_TestProcess": (*CORE,),
    "_TestSubclassingProcess": (*CORE,),
    "_TestFinalize": (*CORE,),
    "_TestLogging": (*CORE,),
    "_TestPollEintr": (*CORE,),
    "_TestImportStar": (*CORE,),
    "TestInternalDecorators": (*CORE,),
    "TestStartMethod": (*CORE, "spawn", "forkserver"),
    "TestNoForkBomb": (*CORE, "spawn", "forkserver"),
    "TestStdinBadfiledescriptor": (*CORE,),
    "TestForkAwareThreadLock": (*CORE,),
    "TestCloseFds": (*CORE, "reduction"),
    "TestFlags": (*CORE,),
    "MiscTestCase": (*CORE,),
    # -- connection ----------------------------------------------------------------------
    "_TestConnection": (*CORE, "connection"),
    "_TestListener": (*CORE, "connection"),
    "_TestListenerClient": (*CORE, "connection"),
    "_TestPoll": (*CORE, "connection"),
    "_TestPicklingConnections": (*CORE, "connection", "reduction", "resource_sharer"),
    "TestInvalidHandle": (*CORE, "connection"),
    "OtherTest": (*CORE, "connection"),
    "TestWait": (*CORE, "connection"),
    "TestInvalidFamily": (*CORE, "connection"),
    "TestTimeouts": (*CORE, "connection"),
    "TestIgnoreEINTR": (*CORE, "connection"),
    # -- queues --------------------------------------------------------------------------
    "_TestQueue": (*CORE, "queues"),
    "TestSimpleQueue": (*CORE, "queues"),
    # -- synchronize ---------------------------------------------------------------------
    "_TestLock": (*CORE, "synchronize"),
    "_TestSemaphore": (*CORE, "synchronize"),
    "_TestCondition": (*CORE, "synchronize"),
    "_TestEvent": (*CORE, "synchronize"),
    "_TestBarrier": (*CORE, "synchronize"),
    "TestNamedResource": (*CORE, "synchronize", "resource_tracker"),
    "TestResourceTracker": (*CORE, "synchronize", "resource_tracker", "shared_memory"),
    # -- shared memory -------------------------------------------------------------------
    "_TestValue": (*CORE, "sharedctypes", "synchronize"),
    "_TestArray": (*CORE, "sharedctypes", "synchronize"),
    "_TestSharedCTypes": (*CORE, "sharedctypes"),
    "_TestHeap": (*CORE, "heap"),
    # ferroproc tracks named segments without a `resource_tracker` module (see
    # ferroproc.shared_memory); the SharedMemoryManager tests inside need `managers`.
    "_TestSharedMemory": (*CORE, "shared_memory", "managers"),
    # -- pool ----------------------------------------------------------------------------
    "_TestPool": (*CORE, "pool"),
    "_TestPoolWorkerErrors": (*CORE, "pool"),
    "_TestPoolWorkerLifetime": (*CORE, "pool"),
    "TestPoolNotLeakOnFailure": (*CORE, "pool"),
    # -- managers ------------------------------------------------------------------------
    "_TestContainers": (*CORE, "managers"),
    "_TestMyManager": (*CORE, "managers"),
    "_TestRemoteManager": (*CORE, "managers"),
    "_TestManagerRestart": (*CORE, "managers"),
    "TestInitializers": (*CORE, "managers", "pool"),
    "TestSyncManagerTypes": (*CORE, "managers"),
}

# What the generated variants run on top of their base class.
MIXIN_NEEDS: dict[str, tuple[str, ...]] = {
    "WithProcesses": (),
    "WithThreads": ("dummy",),  # ThreadsMixin runs multiprocessing.dummy
    "WithManager": ("managers",),  # ManagerMixin runs everything through a Manager()
}

# Classes never run: they cannot exercise ferroproc at all.
CLASS_NEVER: dict[str, str] = {
    "SemLockTests": "tests CPython's _multiprocessing.SemLock C type directly; no multiprocessing"
    " code involved",
}

# Single tests never run, with the reason. Keys are fnmatch patterns on "Class.test".
TEST_NEVER: dict[str, str] = {
    "TestFlags.test_flags": "starts `python -E -S -O`: -E drops PYTHONPATH, so that child (and"
    " its grandchild) would run the stdlib, not ferroproc",
    "*TestSharedMemory.test_shared_memory_cleaned_after_process_termination": "starts"
    " `python -E`: the child cannot be substituted and would run the stdlib",
    "TestResourceTracker.test_resource_tracker": "starts `python -E`: the child cannot be"
    " substituted and would run the stdlib",
}

_VARIANT = re.compile(r"^(WithProcesses|WithThreads|WithManager)(Test.*)$")


def split_name(cls_name: str) -> tuple[str | None, str]:
    """``WithThreadsTestQueue`` -> (``WithThreads``, ``_TestQueue``); others -> (None, name)."""
    m = _VARIANT.match(cls_name)
    if m:
        return m.group(1), "_" + m.group(2)
    return None, cls_name


def needs_of(cls_name: str) -> tuple[str, ...] | None:
    """Subsystems a generated class needs, or None when the class is not classified."""
    mixin, base = split_name(cls_name)
    if base not in CLASS_NEEDS:
        return None
    needs = list(CLASS_NEEDS[base])
    if mixin:
        needs.extend(MIXIN_NEEDS[mixin])
    return tuple(dict.fromkeys(needs))


def not_run_reason(cls_name: str, present: frozenset | set | None) -> str | None:
    """Why a class cannot run with the given ferroproc subsystems (None: it can run).

    ``present=None`` means "everything is present" (the stdlib run).
    """
    _, base = split_name(cls_name)
    if base in CLASS_NEVER:
        return "never run: " + CLASS_NEVER[base]
    needs = needs_of(cls_name)
    if needs is None:
        return "not classified in tests/compat/requirements.py"
    if present is None:
        return None
    missing = [n for n in needs if n not in present]
    if missing:
        return "missing: " + ", ".join(missing)
    return None


def test_never_reason(cls_name: str, method: str) -> str | None:
    """Why a single test is never run, or None."""
    _, base = split_name(cls_name)
    for key in (f"{cls_name}.{method}", f"{base}.{method}"):
        for pattern, reason in TEST_NEVER.items():
            if fnmatch.fnmatchcase(key, pattern):
                return reason
    return None
