"""Runs one peer sample in this fresh interpreter: ``python -m ferroproc.bench.peer_run CASE
LABEL N`` runs the peer's warm-up, then times N operations and prints the seconds they took.
``LABEL`` ``registry.FRESH`` runs the case itself on ferroproc.
Exit status ``registry.PEER_MISSING`` (with the reason on stdout) when the peer's library is
not installed. Used by the runner; see ``registry.peer``.
"""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    from ferroproc.bench import cases  # noqa: F401 - registers every case and peer
    from ferroproc.bench.registry import FRESH, PEER_BODIES, PEER_MISSING, REGISTRY

    of, label, n = argv[0], argv[1], int(argv[2])
    if label == FRESH:
        import ferroproc

        def body(_mod, count, _case=REGISTRY[of]):
            return _case(ferroproc, count)
    else:
        body = PEER_BODIES[of, label]
    warmup = REGISTRY[of].warmup
    try:
        if warmup:
            body(None, warmup)
    except ImportError as exc:
        print(f"{type(exc).__name__}: {exc}")
        return PEER_MISSING
    print(repr(body(None, n)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
