"""An interpreter that runs one implementation's samples: ``python -c "...host.main(...)"
MODULE`` (see ``runner._HOST_MAIN``; ``python -m ferroproc.bench.host MODULE`` works too)
imports the benchmark's cases and ``MODULE`` (``multiprocessing``, ``ferroproc``, or
``-`` for the reference floors, which take no module), then answers requests until its
standard input ends.

Why: a user's program imports one of the two libraries, and what a process has imported
changes what each of its forks costs. The stdlib's package imports ``threading``, whose at-fork
hook then runs in every forked child (about 120 copy-on-write faults); ferroproc does not
import it. In one process holding both libraries, ferroproc's children pay for the stdlib's
imports. So by default the runner (:mod:`ferroproc.bench.runner`) gives each implementation of
each case an interpreter of its own, started fresh for that case, and still alternates the two
every round.

Protocol, one line each way: the runner writes ``NAME N`` (a case and its number of
operations) to standard input; the host collects garbage, runs the case and answers on its
original standard output ``seconds S``, ``skip REASON``, ``missing TEXT`` (the module lacks the
API) or ``error TEXT``. Everything else the case or its children print goes to standard error.
The host imports no more than the cases and the module (no ``json``, which imports ``re``; no
``ctypes`` to trim the C heap, which only the shared process needs, between cases).
"""

from __future__ import annotations

import sys

# Imports wait in `main`: run as ``-m``, spawn and forkserver children import this module again.


def main(argv: list[str]) -> int:
    import gc
    import importlib
    import os

    # Answers go to a private copy of stdout; stdout itself (inherited by children) joins
    # stderr, so nothing a case prints can corrupt the protocol.
    reply = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)

    from ferroproc.bench import cases  # noqa: F401 - registers every case
    from ferroproc.bench.registry import MISSING_API, REGISTRY, SkipCase, describe, prepare_module

    mod = None
    if argv[0] != "-":
        mod = importlib.import_module(argv[0])
        prepare_module(mod)
    for line in sys.stdin:
        name, _, count = line.rstrip("\n").rpartition(" ")
        case = REGISTRY.get(name)
        if case is None:
            answer = f"error no case {name!r}"
        else:
            gc.collect()
            try:
                answer = f"seconds {case(mod, int(count))!r}"
            except SkipCase as exc:
                answer = f"skip {exc}"
            except MISSING_API as exc:
                answer = f"missing {describe(exc)}"
            except Exception as exc:
                answer = f"error {describe(exc)}"
        reply.write(" ".join(answer.split("\n")) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
