"""ferroproc's public names, signatures and exception classes against the installed stdlib.

Names the stdlib has and ferroproc does not implement yet must be listed in NOT_YET (with the
issue that builds them) and must be truly absent: no stubs. Signature differences must be
listed in SIGNATURE_DIFFERENCES with a reason.
"""

from __future__ import annotations

import inspect
import multiprocessing
import multiprocessing.connection
import multiprocessing.context
import multiprocessing.dummy
import multiprocessing.dummy.connection
import multiprocessing.managers
import multiprocessing.pool
import multiprocessing.process
import multiprocessing.queues
import multiprocessing.reduction
import multiprocessing.shared_memory
import multiprocessing.sharedctypes
import multiprocessing.spawn
import multiprocessing.synchronize
import multiprocessing.util

import ferroproc
import ferroproc.connection
import ferroproc.context
import ferroproc.dummy
import ferroproc.dummy.connection
import ferroproc.managers
import ferroproc.pool
import ferroproc.process
import ferroproc.queues
import ferroproc.reduction
import ferroproc.shared_memory
import ferroproc.sharedctypes
import ferroproc.spawn
import ferroproc.synchronize
import ferroproc.util
import pytest

# name -> the issue that implements it
NOT_YET = {}

# (module, qualified name) -> why ferroproc's signature differs
_NATIVE_SELF = (
    "native method: `self` is positional-only (as for the stdlib's own _multiprocessing.SemLock"
    " methods); the other parameters match"
)
SIGNATURE_DIFFERENCES: dict[tuple[str, str], str] = {
    ("multiprocessing.queues", f"{cls}.{meth}"): _NATIVE_SELF
    for cls, meths in {
        "Queue": ("put", "get", "qsize", "empty", "full", "get_nowait", "put_nowait", "close"),
        "JoinableQueue": ("put",),
        "SimpleQueue": ("put", "get", "empty", "close"),
    }.items()
    for meth in meths
}
SIGNATURE_DIFFERENCES[("multiprocessing.shared_memory", "SharedMemory")] = (
    "adds 3.13's keyword-only `track=True`; the positional parameters match"
)
SIGNATURE_DIFFERENCES[("multiprocessing.shared_memory", "SharedMemory.__init__")] = (
    SIGNATURE_DIFFERENCES[("multiprocessing.shared_memory", "SharedMemory")]
)

#: Keyword-only parameters ferroproc adds as documented extensions (README, Extensions): the
#: signature must equal the stdlib's once these are taken out.
EXTENSION_KEYWORDS: dict[tuple[str, str], tuple[str, ...]] = {
    ("multiprocessing.pool", f"Pool.{meth}"): ("progress",)
    for meth in ("map", "map_async", "starmap", "starmap_async", "imap", "imap_unordered")
}

SUBMODULES = [
    (multiprocessing.connection, ferroproc.connection),
    (multiprocessing.context, ferroproc.context),
    (multiprocessing.managers, ferroproc.managers),
    (multiprocessing.process, ferroproc.process),
    (multiprocessing.queues, ferroproc.queues),
    (multiprocessing.reduction, ferroproc.reduction),
    (multiprocessing.sharedctypes, ferroproc.sharedctypes),
    (multiprocessing.shared_memory, ferroproc.shared_memory),
    (multiprocessing.spawn, ferroproc.spawn),
    (multiprocessing.synchronize, ferroproc.synchronize),
    (multiprocessing.util, ferroproc.util),
    (multiprocessing.pool, ferroproc.pool),
    (multiprocessing.dummy, ferroproc.dummy),
    (multiprocessing.dummy.connection, ferroproc.dummy.connection),
]


def test_all_is_the_stdlib_all_minus_what_is_not_built_yet():
    std = set(multiprocessing.__all__)
    ours = set(ferroproc.__all__)
    assert ours <= std, f"names the stdlib does not export: {sorted(ours - std)}"
    missing = std - ours
    implemented_but_listed = set(NOT_YET) & ours
    assert not implemented_but_listed, f"remove from NOT_YET: {sorted(implemented_but_listed)}"
    assert missing == set(NOT_YET), f"undocumented gaps: {sorted(missing - set(NOT_YET))}"


@pytest.mark.parametrize("name", sorted(NOT_YET))
def test_unimplemented_names_are_absent_not_stubs(name):
    assert not hasattr(ferroproc, name)
    assert not hasattr(ferroproc.get_context("spawn"), name)


@pytest.mark.parametrize("name", sorted(set(multiprocessing.__all__) - set(NOT_YET)))
def test_every_exported_name_resolves(name):
    assert getattr(ferroproc, name) is not None


@pytest.mark.parametrize(
    "name", ["ProcessError", "BufferTooShort", "TimeoutError", "AuthenticationError"]
)
def test_exception_classes_are_the_stdlibs_own(name):
    assert getattr(ferroproc, name) is getattr(multiprocessing, name)
    for method in ferroproc.get_all_start_methods():
        assert getattr(ferroproc.get_context(method), name) is getattr(multiprocessing, name)


def _public_callables(module):
    names = getattr(module, "__all__", None) or [n for n in vars(module) if not n.startswith("_")]
    for name in names:
        obj = getattr(module, name, None)
        if callable(obj):
            yield name, obj


def _signature(obj):
    try:
        return inspect.signature(obj)
    except (TypeError, ValueError):
        return None


def _cases():
    for std_mod, our_mod in SUBMODULES:
        for name, std_obj in _public_callables(std_mod):
            our_obj = getattr(our_mod, name, None)
            if our_obj is None:
                continue
            yield pytest.param(
                std_mod.__name__, name, std_obj, our_obj, id=f"{std_mod.__name__}.{name}"
            )
            if inspect.isclass(std_obj):
                for attr, std_member in vars(std_obj).items():
                    if attr.startswith("_") and attr != "__init__":
                        continue
                    our_member = getattr(our_obj, attr, None)
                    if callable(std_member) and our_member is not None:
                        yield pytest.param(
                            std_mod.__name__,
                            f"{name}.{attr}",
                            std_member,
                            our_member,
                            id=f"{std_mod.__name__}.{name}.{attr}",
                        )
    for name in sorted(set(multiprocessing.__all__) - set(NOT_YET)):
        std_obj, our_obj = getattr(multiprocessing, name), getattr(ferroproc, name)
        if callable(std_obj) and not inspect.isclass(std_obj):
            yield pytest.param(
                "multiprocessing", name, std_obj, our_obj, id=f"multiprocessing.{name}"
            )


@pytest.mark.parametrize(("module", "qualname", "std_obj", "our_obj"), list(_cases()))
def test_signatures_match(module, qualname, std_obj, our_obj):
    if (module, qualname) in SIGNATURE_DIFFERENCES:
        pytest.skip(SIGNATURE_DIFFERENCES[(module, qualname)])
    std_sig, our_sig = _signature(std_obj), _signature(our_obj)
    if std_sig is None:
        return
    assert our_sig is not None, f"{qualname}: no signature"
    extra = EXTENSION_KEYWORDS.get((module, qualname), ())
    if extra:
        params = list(our_sig.parameters.values())
        added = [p for p in params if p.name in extra]
        assert [p.name for p in added] == list(extra), f"{qualname}: extension keywords"
        assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in added), qualname
        our_sig = our_sig.replace(parameters=[p for p in params if p.name not in extra])
    assert str(our_sig) == str(std_sig), f"{module}.{qualname}"


# "module.name" -> the issue that implements it (submodule names not built yet)
SUBMODULE_NOT_YET: dict[str, str] = {}


def test_stdlib_public_submodule_names_exist():
    missing = []
    for std_mod, our_mod in SUBMODULES:
        for name in getattr(std_mod, "__all__", []):
            if f"{std_mod.__name__}.{name}" in SUBMODULE_NOT_YET:
                assert not hasattr(our_mod, name), f"remove {name} from SUBMODULE_NOT_YET"
                continue
            if not hasattr(our_mod, name):
                missing.append(f"{std_mod.__name__}.{name}")
    assert missing == []


@pytest.mark.parametrize("package", ["multiprocessing", "ferroproc"])
def test_the_windows_spawn_module_exists_but_does_not_import_here(package):
    import importlib
    import importlib.util

    name = f"{package}.popen_spawn_win32"
    assert importlib.util.find_spec(name) is not None
    with pytest.raises(ImportError):
        importlib.import_module(name)
