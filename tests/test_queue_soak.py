"""A soak: two producers and two consumers move millions of messages through one queue in
random batches, and every message arrives exactly once, in each producer's order.
Total: 10M messages on ferroproc (2 x 5M).

The stdlib moves 100k at its speed (the behaviour checked is the
same). Fork start method only: the point is the volume, not the start-up.
"""

from __future__ import annotations

import _queue_workers as w
import pytest
from _workers import SHORT_TIMEOUT, join_ok, start

PRODUCERS = 2
CONSUMERS = 2


@pytest.mark.fork_only
@pytest.mark.timeout(240)
def test_soak_no_message_lost_duplicated_or_reordered(ctx):
    n = 5_000_000 if "ferroproc" in type(ctx).__module__ else 50_000
    q, results = ctx.Queue(), ctx.Queue()
    consumers = [start(ctx, w.soak_consume, q, results, PRODUCERS) for _ in range(CONSUMERS)]
    producers = [start(ctx, w.soak_produce, q, i, n, 1234 + i) for i in range(PRODUCERS)]
    for p in producers:
        p.join(200)
        assert p.exitcode == 0
        p.close()
    for _ in consumers:
        q.put(None)
    reports = [results.get(timeout=SHORT_TIMEOUT) for _ in consumers]
    for p in consumers:
        join_ok(p)
    for pid, stats in reports:
        assert not isinstance(stats, str), f"consumer {pid}: {stats}"
    for producer in range(PRODUCERS):
        count = sum(stats[producer][0] for _, stats in reports)
        total = sum(stats[producer][1] for _, stats in reports)
        squares = sum(stats[producer][2] for _, stats in reports)
        assert count == n
        assert total == n * (n - 1) // 2
        assert squares == (n - 1) * n * (2 * n - 1) // 6
    for qq in (q, results):
        qq.close()
        qq.join_thread()
