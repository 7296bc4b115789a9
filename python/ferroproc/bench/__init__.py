"""Benchmarks that run the same workload on ``multiprocessing`` and on ``ferroproc``.

Run ``python -m ferroproc.bench --help``. Cases live in :mod:`ferroproc.bench.cases` and are
registered with :func:`ferroproc.bench.registry.case`; results are time per operation, and the
ratio is ferroproc / stdlib, so below 1.00 means ferroproc is faster.

Spawned children import this package (their targets live in ``cases``), so it imports nothing.
"""
