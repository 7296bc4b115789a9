"""Substitute ferroproc for ``multiprocessing`` in this interpreter (compat harness only).

Imported by ``sitecustomize`` (when ``FERROPROC_SUBSTITUTE=1``) in the harness worker and in
every interpreter it starts from ``sys.executable`` (spawn children, the forkserver server,
``script_helper`` scripts). Fork children inherit the substituted ``sys.modules``.

What ``install()`` does, in this order:

1. imports the stdlib ``multiprocessing`` and all its submodules, so a submodule ferroproc
   does not have yet can fall back to a *pure* stdlib copy (its internal imports were bound
   before the swap);
2. imports ``ferroproc`` (also before the swap, so ferroproc's own module-level
   ``import multiprocessing.x`` still binds the stdlib);
3. points ``sys.modules['multiprocessing']`` at ``ferroproc`` and
   ``sys.modules['multiprocessing.<sub>']`` at ``ferroproc.<sub>`` for every submodule
   ferroproc has; a submodule ferroproc lacks becomes a :class:`FallbackModule` that forwards
   to the stdlib module and *records* every use made from inside a function (a test);
4. gives ``ferroproc`` a module ``__getattr__`` for stdlib public names it lacks: they resolve
   to :class:`MissingStub` objects that record the use and raise :class:`MissingFeature`
   (an ``AttributeError``) when called, so the test module's class bodies
   (``Queue = staticmethod(multiprocessing.Queue)``) still load but no stdlib factory is
   ever used silently.

Uses are appended to the file named by ``FERROPROC_COMPAT_USAGE_LOG`` as
``pid<TAB>kind<TAB>what`` lines (kind ``missing`` or ``stdlib``); the worker attributes
them to the test that was running.
"""

from __future__ import annotations

import functools
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
import types

ENV_FLAG = "FERROPROC_SUBSTITUTE"
ENV_LOG = "FERROPROC_COMPAT_USAGE_LOG"
# Diagnostic mode (run_suite.py --diagnose-fallback): missing top-level factories call the
# stdlib instead of raising. Such tests are still reported needs_api, never counted as passes;
# the mode only shows whether ferroproc's own part (e.g. Process) copes with stdlib objects.
ENV_DIAGNOSE = "FERROPROC_COMPAT_DIAGNOSE_FALLBACK"

# Every stdlib submodule, in an order whose imports succeed.
STDLIB_SUBMODULES = (
    "process",
    "reduction",
    "context",
    "util",
    "connection",
    "queues",
    "synchronize",
    "sharedctypes",
    "heap",
    "shared_memory",
    "resource_tracker",
    "resource_sharer",
    "spawn",
    "forkserver",
    "popen_fork",
    "popen_spawn_posix",
    "popen_forkserver",
    "pool",
    "managers",
    "dummy",
    "dummy.connection",
)

# Subsystem ("feature") of each top-level public name of the stdlib package.
FEATURE_OF_NAME = {
    "Process": "process",
    "current_process": "process",
    "active_children": "process",
    "parent_process": "process",
    "Pipe": "connection",
    "allow_connection_pickling": "connection",
    "Queue": "queues",
    "JoinableQueue": "queues",
    "SimpleQueue": "queues",
    "Lock": "synchronize",
    "RLock": "synchronize",
    "Semaphore": "synchronize",
    "BoundedSemaphore": "synchronize",
    "Condition": "synchronize",
    "Event": "synchronize",
    "Barrier": "synchronize",
    "Value": "sharedctypes",
    "Array": "sharedctypes",
    "RawValue": "sharedctypes",
    "RawArray": "sharedctypes",
    "Pool": "pool",
    "Manager": "managers",
}
# A submodule name is its own feature; ``dummy.connection`` belongs to ``dummy``.
FEATURES = tuple(dict.fromkeys(s.split(".")[0] for s in STDLIB_SUBMODULES))

_state: dict = {
    "installed": False,
    "present": frozenset(),
    "stdlib": {},  # 'multiprocessing.x' -> stdlib module object
    "generation": 0,  # bumped by the worker at every test start (dedupes records)
    "seen": set(),
    "passthrough": False,  # setUpModule's platform probe only, see allow_stdlib_probe()
}


def feature_of(name: str) -> str:
    """The subsystem a stdlib top-level public name belongs to ('context' by default)."""
    if name in FEATURE_OF_NAME:
        return FEATURE_OF_NAME[name]
    base = name.split(".", maxsplit=1)[0]
    return base if base in FEATURES else "context"


def ferroproc_features() -> frozenset:
    """Subsystems ferroproc provides: the ``ferroproc.<sub>`` modules that exist.

    Found with ``importlib.util.find_spec`` (imports only ``ferroproc/__init__``); an empty
    set if ferroproc itself cannot be imported.
    """
    found = set()
    try:
        for feat in FEATURES:
            if importlib.util.find_spec(f"ferroproc.{feat}") is not None:
                found.add(feat)
    except ImportError:
        return frozenset()
    return frozenset(found)


def present_features() -> frozenset:
    return _state["present"]


def is_installed() -> bool:
    return _state["installed"]


def next_generation() -> None:
    """Called by the worker when a test starts: records are deduplicated per test."""
    _state["generation"] += 1


def record(kind: str, what: str) -> None:
    """Append one usage record to the usage log (no-op when no log is configured)."""
    path = os.environ.get(ENV_LOG)
    if not path or _state["passthrough"]:
        return
    key = (_state["generation"], kind, what)
    if key in _state["seen"]:
        return
    _state["seen"].add(key)
    line = f"{os.getpid()}\t{kind}\t{what}\n".encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)
    except OSError:
        pass


class MissingFeature(AttributeError):
    """Raised when a test calls a stdlib public name that ferroproc does not provide yet."""


class MissingStub:
    """Stands in for ``multiprocessing.<name>`` that ferroproc lacks; never runs stdlib code."""

    def __init__(self, name: str):
        self._fp_name = name
        self._fp_feature = feature_of(name)
        self.__name__ = self.__qualname__ = name
        self.__module__ = "ferroproc"

    def _fp_raise(self, what: str):
        record("missing", what)
        raise MissingFeature(
            f"ferroproc has no {what} yet (subsystem {self._fp_feature!r})",
            name=self._fp_name,
            obj=sys.modules.get("ferroproc"),
        )

    def __call__(self, *args, **kwargs):
        std = _state["stdlib"].get("multiprocessing")
        if _state["passthrough"]:
            return getattr(std, self._fp_name)(*args, **kwargs)
        if os.environ.get(ENV_DIAGNOSE) == "1":
            record("missing", f"multiprocessing.{self._fp_name}")
            return getattr(std, self._fp_name)(*args, **kwargs)
        return self._fp_raise(f"multiprocessing.{self._fp_name}")

    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return self._fp_raise(f"multiprocessing.{self._fp_name}.{attr}")

    def __repr__(self):
        return f"<ferroproc-compat missing stub multiprocessing.{self._fp_name}>"


class allow_stdlib_probe:
    """Let stubs call the stdlib while active: only for setUpModule's ``RLock()`` probe.

    ``setUpModule`` creates one ``multiprocessing.RLock()`` just to learn whether the platform
    supports semaphores (sem_open) and drops it; no test uses that object.
    """

    def __enter__(self):
        _state["passthrough"] = True
        return self

    def __exit__(self, *exc):
        _state["passthrough"] = False
        return False


# Platform probes of test.support that touch the stdlib but run no test logic: the test module
# calls ``support.skip_if_broken_multiprocessing_synchronize()`` at import time (so in every
# spawn child), which creates one stdlib ``synchronize.Lock`` to see whether sem_open works.
_PLATFORM_PROBES = {("support/__init__.py", "skip_if_broken_multiprocessing_synchronize")}


def _is_platform_probe(frame) -> bool:
    code = frame.f_code
    path = code.co_filename.replace(os.sep, "/")
    return any(path.endswith("test/" + f) and code.co_name == n for f, n in _PLATFORM_PROBES)


def _caller() -> str:
    """`` (from file:line)`` of the first frame outside this module, for diagnosis."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename == __file__:
        frame = frame.f_back
    if frame is None:
        return ""
    parts = frame.f_code.co_filename.replace(os.sep, "/").split("/")
    return f" (from {'/'.join(parts[-2:])}:{frame.f_lineno})"


def _called_from_function(depth: int = 2) -> bool:
    """True when the attribute access comes from a function body (a test), not from
    module-level or class-body code running at import time."""
    try:
        frame = sys._getframe(depth)
    except ValueError:
        return False
    code = frame.f_code
    if code.co_filename.startswith("<frozen importlib"):
        return False
    return bool(code.co_flags & 0x1)  # CO_OPTIMIZED: functions, not module/class bodies


class FallbackModule(types.ModuleType):
    """``multiprocessing.<sub>`` when ferroproc has no ``<sub>``: forwards to the stdlib.

    Use from a function is recorded as ``stdlib``; plain functions fetched at import time
    (``from multiprocessing.connection import wait``) are wrapped so their calls are recorded.
    Classes and other objects are returned unwrapped (identity matters for pickling and
    ``isinstance``).
    """

    def __init__(self, name: str, real: types.ModuleType):
        super().__init__(name, real.__doc__)
        self.__dict__["_fp_real"] = real
        self.__dict__["__file__"] = getattr(real, "__file__", None)
        if hasattr(real, "__path__"):
            self.__dict__["__path__"] = []
        self.__dict__["__all__"] = getattr(real, "__all__", [])

    def __getattr__(self, attr):
        real = self.__dict__["_fp_real"]
        value = getattr(real, attr)
        if attr.startswith("__"):
            return value
        what = f"{self.__name__}.{attr}"
        if _called_from_function():
            if not _is_platform_probe(sys._getframe(1)):
                record("stdlib", what + _caller())
            return value
        if isinstance(value, types.FunctionType):

            @functools.wraps(value)
            def recorded(*args, **kwargs):
                record("stdlib", what)
                return value(*args, **kwargs)

            return recorded
        return value

    def __repr__(self):
        return f"<ferroproc-compat stdlib fallback for {self.__name__!r}>"


class _AliasFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """``import multiprocessing.x`` for a ferroproc-only module: alias ``ferroproc.x``."""

    def find_spec(self, fullname, path=None, target=None):
        if not fullname.startswith("multiprocessing."):
            return None
        real = "ferroproc." + fullname.partition(".")[2]
        try:
            if importlib.util.find_spec(real) is None:
                return None
        except ImportError:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        return importlib.import_module("ferroproc." + spec.name.partition(".")[2])

    def exec_module(self, module):
        return None


def _import_stdlib() -> dict:
    """Import the stdlib package and all its submodules; returns them by name."""
    std = importlib.import_module("multiprocessing")
    if "ferroproc" in getattr(std, "__name__", ""):
        raise RuntimeError("multiprocessing is already substituted")
    for sub in STDLIB_SUBMODULES:
        try:
            importlib.import_module("multiprocessing." + sub)
        except ImportError:
            pass
    stdlib = {
        name: mod
        for name, mod in sys.modules.items()
        if name == "multiprocessing" or name.startswith("multiprocessing.")
    }
    _state["stdlib"] = stdlib
    return stdlib


def _finish(ferroproc: types.ModuleType) -> None:
    """Swap ``sys.modules`` over to ferroproc (stdlib and ferroproc are both imported)."""
    stdlib = _state["stdlib"]
    std = stdlib["multiprocessing"]
    present = ferroproc_features()
    _state["present"] = present

    for name in stdlib:
        if sys.modules.get(name) is stdlib[name]:
            del sys.modules[name]
    sys.modules["multiprocessing"] = ferroproc
    fallbacks: dict[str, FallbackModule] = {}
    for sub in STDLIB_SUBMODULES:
        name = "multiprocessing." + sub
        if sub.split(".")[0] in present:
            try:
                sys.modules[name] = importlib.import_module("ferroproc." + sub)
                continue
            except ImportError:
                if "." not in sub:
                    raise
        if name in stdlib:
            fallbacks[name] = FallbackModule(name, stdlib[name])
            sys.modules[name] = fallbacks[name]
    sys.meta_path.insert(0, _AliasFinder())

    std_public = set(getattr(std, "__all__", ())) | {
        n
        for n in dir(std)
        if not n.startswith("_") and not isinstance(getattr(std, n), types.ModuleType)
    }
    original_getattr = ferroproc.__dict__.get("__getattr__")
    stubs: dict[str, MissingStub] = {}

    def __getattr__(name):
        if original_getattr is not None:
            try:
                return original_getattr(name)
            except AttributeError:
                pass
        fallback = fallbacks.get("multiprocessing." + name)
        if fallback is not None:
            return fallback
        if name in std_public:
            if name not in stubs:
                stubs[name] = MissingStub(name)
            return stubs[name]
        raise AttributeError(f"module 'ferroproc' has no attribute {name!r}")

    ferroproc.__getattr__ = __getattr__
    _state["installed"] = True


def install() -> None:
    """Perform the substitution now (idempotent)."""
    if _state["installed"]:
        return
    _remove_trigger()
    _import_stdlib()
    _finish(importlib.import_module("ferroproc"))


class _AliasLoader(importlib.abc.Loader):
    """Loads ``multiprocessing`` as the already-imported ferroproc package."""

    def __init__(self, module):
        self.module = module
        self.spec = module.__spec__

    def create_module(self, spec):
        return self.module

    def exec_module(self, module):
        module.__spec__ = self.spec  # the import system overwrote it with the alias spec
        _finish(module)


class _WrappedLoader(importlib.abc.Loader):
    """ferroproc's real loader; after ferroproc has executed, swaps ``sys.modules``."""

    def __init__(self, real):
        self.real = real

    def __getattr__(self, attr):
        return getattr(self.real, attr)

    def create_module(self, spec):
        return self.real.create_module(spec)

    def exec_module(self, module):
        self.real.exec_module(module)
        _finish(module)


class _Trigger(importlib.abc.MetaPathFinder):
    """Installs the substitution on the first ``import multiprocessing`` or ``import ferroproc``.

    Lazy, so an interpreter that never imports either (and a test asserting that
    ``multiprocessing`` is not imported at start-up) sees nothing.
    """

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in ("multiprocessing", "ferroproc") or _state["installed"]:
            return None
        _remove_trigger()
        _import_stdlib()
        if fullname == "multiprocessing":
            ferroproc = importlib.import_module("ferroproc")
            # Nothing named multiprocessing may be left in sys.modules when this returns, or
            # the import system would load the stdlib's spec again.
            for name in _state["stdlib"]:
                sys.modules.pop(name, None)
            return importlib.util.spec_from_loader(
                "multiprocessing", _AliasLoader(ferroproc), is_package=True
            )
        real = importlib.machinery.PathFinder.find_spec("ferroproc", path)
        if real is None or real.loader is None:
            return None
        real.loader = _WrappedLoader(real.loader)
        return real


def _remove_trigger() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _Trigger)]


def install_lazy() -> None:
    """Arm the substitution: it happens at the first import of multiprocessing or ferroproc."""
    if _state["installed"] or any(isinstance(f, _Trigger) for f in sys.meta_path):
        return
    if "multiprocessing" in sys.modules or "ferroproc" in sys.modules:
        install()
        return
    sys.meta_path.insert(0, _Trigger())
