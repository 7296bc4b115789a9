"""Benchmark cases for ``managers``: a proxied dict set+get pair, a Manager's life, and the
server's side of one method call.

Imported by :mod:`ferroproc.bench.cases`. The first two use the fork start method (the default
on Linux for 3.11), as a user's ``Manager()`` would; the third runs a server's request loop in
this process.
"""

from __future__ import annotations

import importlib
import os
import time

from ferroproc.bench.registry import SkipCase, case

# `typing.TYPE_CHECKING`, without importing `typing`: the benchmark's host interpreters import
# these modules, and what a process imports changes what its forks cost.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from types import ModuleType

_perf = time.perf_counter


def _ctx(mod: ModuleType):
    ctx = mod.get_context("fork")
    if not hasattr(ctx, "Manager"):
        raise SkipCase(f"{mod.__name__} has no Manager")
    return ctx


@case("manager_dict_set_get", n=5_000, unit="pair")
def manager_dict_set_get(mod: ModuleType, n: int) -> float:
    """``d[k] = v`` then ``d[k]`` through a ``Manager().dict()`` proxy (two round trips)."""
    with _ctx(mod).Manager() as manager:
        d = manager.dict()
        d[0] = 0  # the first call opens this thread's connection
        t0 = _perf()
        for i in range(n):
            d[i] = i
            _ = d[i]
        elapsed = _perf() - t0
        del d
    return elapsed


@case("manager_start_shutdown", n=20, unit="manager")
def manager_start_shutdown(mod: ModuleType, n: int) -> float:
    """``Manager()`` (server process up, address known) then ``shutdown()`` (process joined)."""
    ctx = _ctx(mod)
    ctx.Manager().shutdown()  # the first one pays for importing the managers module
    t0 = _perf()
    for _ in range(n):
        ctx.Manager().shutdown()
    return _perf() - t0


# Requests queued per connection: written before the loop runs, so they must fit in the
# socket's buffer (each small message takes about a kilobyte of it).
_QUEUED = 100


def _queued_requests(mod, ident, first, count):
    """A method-call connection (the server's end) with `count` dict requests queued on it and
    the client's end, whose writing half is shut: the loop ends after the last request."""
    client, conn = mod.Pipe()
    for i in range(first, first + count):
        if i % 2 == 0:
            client.send((ident, "__setitem__", (i, i), {}))
        else:
            client.send((ident, "__getitem__", (i - 1,), {}))
    import socket

    with socket.socket(fileno=os.dup(client.fileno())) as s:
        s.shutdown(socket.SHUT_WR)
    return client, conn


@case("manager_server_request", n=5_000, unit="request")
def manager_server_request(mod: ModuleType, n: int) -> float:
    """The server's side of one ``d[k] = v`` or ``d[k]`` call, without the client's.

    The library's own ``Server.serve_client`` receives, carries out and answers requests
    already queued on its connection (the two kinds alternate), in this process.
    """
    managers = importlib.import_module(f"{mod.__name__}.managers")
    server = managers.Server(managers.SyncManager._registry, ("127.0.0.1", 0), b"bench", "pickle")
    if not hasattr(server, "stop_event"):
        import threading  # here: a host importing it would tax every fork (see `host`)

        server.stop_event = threading.Event()  # the stdlib's makes it in serve_forever()
    try:
        ident, _ = server.create(None, "dict")
        elapsed = 0.0
        for first in range(0, n, _QUEUED):
            count = min(_QUEUED, n - first)
            client, conn = _queued_requests(mod, ident, first, count)
            try:
                t0 = _perf()
                try:
                    server.serve_client(conn)
                except SystemExit:  # the stdlib's loop ends its thread at end of input
                    pass
                elapsed += _perf() - t0
                for _ in range(count):
                    kind, _ = client.recv()
                    if kind != "#RETURN":
                        raise RuntimeError(f"unexpected {kind} reply")
            finally:
                client.close()
                conn.close()
        return elapsed
    finally:
        server.listener.close()
