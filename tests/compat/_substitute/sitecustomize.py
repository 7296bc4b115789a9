"""ferroproc compat harness: substitute ferroproc for multiprocessing at interpreter start.

This directory is prepended to ``PYTHONPATH`` by ``tests/compat/run_suite.py`` only. The
substitution is active only when ``FERROPROC_SUBSTITUTE=1``; otherwise this file does nothing.
The swap itself happens at the first ``import multiprocessing`` (or ``import ferroproc``), see
``_ferroproc_substitute``.
"""

import os

if os.environ.get("FERROPROC_SUBSTITUTE") == "1":
    import _ferroproc_substitute

    _ferroproc_substitute.install_lazy()
