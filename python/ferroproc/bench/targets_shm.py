"""Child targets of the shared-memory benchmark cases (no imports, like
:mod:`ferroproc.bench.targets`)."""


def locked_increments(value, n: int) -> None:
    """``with value.get_lock(): value.value += 1``, `n` times."""
    for _ in range(n):
        with value.get_lock():
            value.value += 1
