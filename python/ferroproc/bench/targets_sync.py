"""Child targets of the synchronize benchmark cases (imports nothing beyond `sys`, like
:mod:`ferroproc.bench.targets`)."""

import sys

#: Upper bound on any single wait; reaching it means the implementation hung.
WAIT_TIMEOUT = 60.0


def event_partner(ping, pong, n: int) -> None:
    """Waits for `ping`, clears it and sets `pong`, `n` times."""
    for _ in range(n):
        if not ping.wait(WAIT_TIMEOUT):
            sys.exit(3)
        ping.clear()
        pong.set()


def condition_partner(cond, box, n: int) -> None:
    """Answers `n` turns: waits until `box` holds 1 (a Semaphore used as a flag), takes it,
    and notifies the parent."""
    for _ in range(n):
        with cond:
            while box.get_value() != 1:
                if not cond.wait(WAIT_TIMEOUT):
                    sys.exit(4)
            box.acquire()
            cond.notify()


def lock_partner(lock, n: int) -> None:
    for _ in range(n):
        with lock:
            pass
