"""The registry of benchmark cases.

A case is a plain function that exercises the *module under test*, which is either the stdlib
``multiprocessing`` or ``ferroproc``, so one body of code measures both. Subsystems add their
cases with the :func:`case` decorator, in :mod:`ferroproc.bench.cases` or in a module that
file imports.

Contract of a case function::

    @case("pipe_pingpong_64b", n=5000, unit="round trip")
    def pipe_pingpong(mod, n):
        ...            # setup, not timed
        t0 = time.perf_counter()
        ...            # n operations
        return time.perf_counter() - t0

* It receives the module under test and ``n``, the number of operations to time, and returns
  the total seconds those ``n`` operations took. The runner divides by ``n``, so every result
  is *seconds per operation* and lower is better. Measuring inside the case lets it leave setup
  and teardown out of the timing.
* Parametrized cases (``params=...``) also receive the parameter as a third argument and are
  listed as ``name[param]``.
* When the module lacks what the case needs (no ``Queue`` yet, a start method it does not
  support), raise :class:`SkipCase` with a short reason. ``AttributeError``,
  ``NotImplementedError`` and ``ImportError`` raised during the warm-up call count as skips
  too; after a successful warm-up, any exception is an error of that implementation.
* Reference cases (``reference=True``) measure a floor without multiprocessing, are called
  with ``None`` instead of a module, and run once per repeat rather than once per module.
  A case names its floor with ``floor=`` and the report shows how many floors it costs.
* Peers (:func:`peer`) are other libraries doing a case's work with their own API
  (``concurrent.futures``, mpire, loky). A peer function takes ``(None, n)`` like a reference
  case and is timed right after the rounds of the case it belongs to; each sample runs in a
  fresh interpreter (``python -m ferroproc.bench.peer_run``): importing a peer library, its
  threads and helper processes would otherwise slow every later fork of the benchmark
  process, for both implementations. An ``ImportError`` there (the library is not
  installed) skips the peer. A case with peers also runs itself on ferroproc the same way
  (label :data:`FRESH`), and peers are compared with that: a fresh interpreter forks faster
  than the long-running benchmark process, which would otherwise favour the peers.

This module is imported by spawn and forkserver children (through ``cases``), so it stays
cheap to import: no dataclasses, no typing at run time.
"""

from __future__ import annotations

# `typing.TYPE_CHECKING`, without importing `typing`: the benchmark's host interpreters import
# these modules, and what a process imports changes what its forks cost.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping, Sequence

__all__ = [
    "FRESH",
    "MISSING_API",
    "PEERS",
    "PEER_BODIES",
    "REGISTRY",
    "Case",
    "SkipCase",
    "case",
    "describe",
    "peer",
    "prepare_module",
    "select",
    "trim_heap",
]


class SkipCase(Exception):
    """Raised by a case when the module under test cannot run it; the message says why."""


class Case:
    """One runnable benchmark: a registered function, bound to one parameter if any."""

    __slots__ = (
        "description",
        "floor",
        "func",
        "n",
        "name",
        "param",
        "reference",
        "unit",
        "warmup",
    )

    def __init__(
        self,
        name: str,
        func: Callable[..., float],
        *,
        param: object,
        n: int,
        unit: str,
        description: str,
        reference: bool,
        floor: str | None,
        warmup: int,
    ) -> None:
        self.name = name
        self.func = func
        self.param = param
        self.n = n
        self.unit = unit
        self.description = description
        self.reference = reference
        self.floor = floor
        self.warmup = warmup

    def __call__(self, mod: object, n: int) -> float:
        """Runs ``n`` operations on ``mod`` and returns the total seconds they took."""
        if self.param is None:
            return self.func(mod, n)
        return self.func(mod, n, self.param)

    def __repr__(self) -> str:
        return f"Case({self.name!r}, n={self.n}, unit={self.unit!r})"


#: Every registered case by name, in registration order.
REGISTRY: dict[str, Case] = {}


def case(
    name: str,
    *,
    n: int | Mapping[str, int],
    unit: str = "op",
    params: Sequence[str] | None = None,
    reference: bool = False,
    floor: str | None = None,
    warmup: int = 1,
    description: str | None = None,
) -> Callable[[Callable[..., float]], Callable[..., float]]:
    """Registers the decorated function as a benchmark case (see the module docstring).

    Args:
        name: case name; parametrized cases become ``name[param]``.
        n: operations per timed repeat, or a mapping from parameter to that count. Choose it
            so one repeat of the stdlib takes roughly 0.1 to 1 second.
        unit: what one operation is, for the table ("process", "round trip", "MiB"...).
        params: optional parameter values, each registered as its own case.
        reference: a floor measured without multiprocessing; run once, not per module.
        floor: name of the reference case this one is compared against.
        warmup: operations run once per module before timing, to pay one-time costs
            (forkserver start, resource tracker, imports) outside the samples.
        description: one line for ``--list``; defaults to the first docstring line.
    """

    def register(func: Callable[..., float]) -> Callable[..., float]:
        doc = description
        if doc is None:
            doc = (func.__doc__ or "").strip().splitlines()[0] if func.__doc__ else ""
        for param in params if params is not None else (None,):
            full = name if param is None else f"{name}[{param}]"
            if full in REGISTRY:
                raise ValueError(f"benchmark case {full!r} is registered twice")
            if isinstance(n, int):
                count = n
            elif param is not None:
                count = n[param]
            else:
                raise TypeError(f"case {name!r}: a mapping for n needs params")
            if count < 1 or warmup < 0:
                raise ValueError(f"case {full!r}: n must be >= 1 and warmup >= 0")
            REGISTRY[full] = Case(
                full,
                func,
                param=param,
                n=count,
                unit=unit,
                description=doc,
                reference=reference,
                floor=floor,
                warmup=warmup,
            )
        return func

    return register


#: Peers of a case, by case name: ``{label: Case}`` in registration order. Calling one runs
#: the peer in a fresh interpreter.
PEERS: dict[str, dict[str, Case]] = {}

#: The function of each peer, by ``(case name, label)``, for ``peer_run``.
PEER_BODIES: dict[tuple[str, str], Callable[..., float]] = {}

#: The participant that runs a case on ferroproc in a fresh interpreter, like its peers.
FRESH = "ferroproc, fresh"

#: Longest a peer sample may take, warm-up included.
PEER_TIMEOUT = 600.0

#: ``peer_run``'s exit status when the peer's library is not installed.
PEER_MISSING = 3


def _isolated(of: str, label: str) -> Callable[..., float]:
    def run(_mod: None, n: int) -> float:
        import subprocess
        import sys

        proc = subprocess.run(
            [sys.executable, "-m", "ferroproc.bench.peer_run", of, label, str(n)],
            capture_output=True,
            text=True,
            timeout=PEER_TIMEOUT,
            check=False,
        )
        if proc.returncode == PEER_MISSING:
            raise ImportError(proc.stdout.strip())
        if proc.returncode != 0:
            lines = proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"]
            raise RuntimeError(f"peer run failed: {lines[-1]}")
        return float(proc.stdout.split()[-1])

    return run


def _peer_case(base: Case, label: str, description: str) -> Case:
    return Case(
        f"{base.name}[{label}]",
        _isolated(base.name, label),
        param=None,
        n=base.n,
        unit=base.unit,
        description=description,
        reference=True,
        floor=None,
        warmup=base.warmup,
    )


def peer(
    of: str, label: str, *, description: str | None = None
) -> Callable[[Callable[..., float]], Callable[..., float]]:
    """Registers the decorated function as `label`'s way of doing case `of`'s work.

    The case must be registered first; the peer runs the case's ``n`` and ``warmup``.
    """

    def register(func: Callable[..., float]) -> Callable[..., float]:
        base = REGISTRY.get(of)
        if base is None:
            raise ValueError(f"peer {label!r} of unregistered case {of!r}")
        peers = PEERS.setdefault(of, {})
        if label in peers or label in {"stdlib", "ferroproc", FRESH}:
            raise ValueError(f"case {of!r} already has a participant {label!r}")
        doc = description
        if doc is None:
            doc = (func.__doc__ or "").strip().splitlines()[0] if func.__doc__ else ""
        if not peers:
            peers[FRESH] = _peer_case(base, FRESH, "the case itself, on ferroproc")
        PEER_BODIES[of, label] = func
        peers[label] = _peer_case(base, label, doc)
        return func

    return register


def prepare_module(mod: object) -> None:
    """Settings the benchmark applies to a module under test before its first case."""
    # A script's forkserver preloads its `__main__`, and with it the script's targets; run as
    # `-m ferroproc.bench` there is no such main, so name the targets module instead. Without
    # this every forkserver child would import it, for both libraries alike.
    set_preload = getattr(mod, "set_forkserver_preload", None)
    if set_preload is not None:
        set_preload(["__main__", "ferroproc.bench.targets"])


#: Exceptions from the warm-up call that mean "this module lacks the API", not "it is broken".
MISSING_API = (AttributeError, NotImplementedError, ImportError)


def trim_heap() -> None:
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


_malloc_trim: object = None


def describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _matches(pattern: str, name: str) -> bool:
    """Exact name, prefix, or a glob where only ``*`` and ``?`` are special.

    Square brackets are literal, because parametrized names contain them:
    ``process_*[fork]`` selects every fork process case.
    """
    if name == pattern or name.startswith(pattern):
        return True
    literal_brackets = pattern.replace("[", "[[]")
    import fnmatch  # here: it imports `re`, which the host interpreters need not load

    return fnmatch.fnmatchcase(name, literal_brackets)


def select(patterns: Iterable[str] | None) -> list[Case]:
    """The cases matching any of ``patterns`` (all when empty), in registration order.

    Reference cases named as a ``floor`` by a selected case are added, so the report can
    always show how far a result is from its floor.

    Raises:
        KeyError: a pattern matches no case; the message lists it.
    """
    pats = list(patterns or ())
    if not pats:
        chosen = set(REGISTRY)
    else:
        chosen = set()
        unmatched = []
        for pat in pats:
            hits = {name for name in REGISTRY if _matches(pat, name)}
            if not hits:
                unmatched.append(pat)
            chosen |= hits
        if unmatched:
            raise KeyError(", ".join(unmatched))
    floors = {REGISTRY[name].floor for name in chosen} - {None}
    unknown = sorted(f for f in floors if f not in REGISTRY)
    if unknown:
        raise KeyError(f"unregistered floor case(s): {', '.join(unknown)}")
    chosen |= floors
    return [c for name, c in REGISTRY.items() if name in chosen]
