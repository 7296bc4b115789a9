"""Child targets of the benchmark cases.

Spawn and forkserver children import the module their target lives in, so this one imports
nothing beyond `sys`: the timings then show the libraries' own start-up cost, not the
benchmark harness's imports (`typing`, the case registry), which real programs do not have.
"""

import sys


def noop():
    """Returns at once."""


def exit_with(arg):
    """Exits with status `arg % 256` through `SystemExit`."""
    sys.exit(arg % 256)
