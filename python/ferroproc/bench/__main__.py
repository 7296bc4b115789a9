"""``python -m ferroproc.bench``: the stdlib-vs-ferroproc benchmark (see ``--help``).

Spawn and forkserver children re-run this file under the name ``__mp_main__`` (the stdlib
and ferroproc both re-import the parent's main module by its module name). Nothing may happen
at import time, so even the CLI import waits inside the guard below.
"""


def main() -> int:
    """Entry point; returns the exit status."""
    from ferroproc.bench.cli import main as cli_main

    return cli_main()


if __name__ == "__main__":
    raise SystemExit(main())
