"""Managers: SyncManager types, BaseManager subclasses, remote managers, interop, failures.

Every behavioural test runs on the stdlib and on ferroproc (``impl``), most under each start
method (``ctx``); the interop tests pair a server of one library with a client of the other.
"""

from __future__ import annotations

import gc
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time

import _manager_workers as mw
import pytest
from _workers import SCRIPT_TIMEOUT, SHORT_TIMEOUT

LOCALHOST = ("127.0.0.1", 0)


@pytest.fixture(scope="module", autouse=True)
def _per_process_helpers():
    # Helpers that live until exit (ferroproc's own pidfd and forkserver, the stdlib's
    # forkserver) start before the first per-test leak baseline, also when only the interop
    # tests (which take no `impl`) are selected.
    import multiprocessing

    import ferroproc

    for lib in (multiprocessing, ferroproc):
        for method in ("fork", "forkserver"):
            p = lib.get_context(method).Process(target=mw.slow_call, args=(0,))
            p.start()
            _join(p)


def _join(p):
    p.join(SHORT_TIMEOUT)
    assert not p.is_alive()
    assert p.exitcode == 0


def _managers(impl):
    import importlib

    return importlib.import_module(f"{impl.__name__}.managers")


def _stop_remote(impl, address, authkey):
    """Asks a server run by get_server().serve_forever() to stop."""
    managers = _managers(impl)
    conn = managers.listener_client["pickle"][1](address, authkey=authkey)
    try:
        managers.dispatch(conn, None, "shutdown")
    finally:
        conn.close()


# ---------------------------------------------------------------------------------------------
# SyncManager types, also through proxies handed to children
# ---------------------------------------------------------------------------------------------


def test_containers_in_parent_and_child(ctx):
    with ctx.Manager() as m:
        d = m.dict(a=1)
        lst = m.list([1, 2, 3])
        ns = m.Namespace(given=21)
        value = m.Value("i", 41)
        arr = m.Array("i", [0, 2, 3])
        q = m.Queue()
        d["b"] = 2
        assert d["a"] + d["b"] == 3
        assert len(d) == 2 and "a" in d and d.get("zz", 9) == 9
        assert sorted(iter(d)) == ["a", "b"]  # an Iterator proxy (a "#PROXY" reply)
        p = ctx.Process(target=mw.fill_containers, args=(d, lst, ns, value, arr, q))
        p.start()
        assert q.get(timeout=SHORT_TIMEOUT) == ("done", ["a", "b", "child", "sum"])
        _join(p)
        assert d["child"] == p.pid
        assert d["sum"] == 6
        assert lst[:] == [1, 2, 3, 3]
        lst += [7]
        lst *= 1
        assert list(lst) == [1, 2, 3, 3, 7]
        assert ns.seen == 42
        del ns.seen
        with pytest.raises(AttributeError):
            _ = ns.seen
        assert value.value == 42
        assert list(arr[:]) == [5, 2, 3] and len(arr) == 3
        assert d.copy() == {"a": 1, "b": 2, "child": p.pid, "sum": 6}
        assert str(lst) == "[1, 2, 3, 3, 7]"
        assert repr(ns).startswith("<NamespaceProxy object, typeid 'Namespace'")
        assert m._process.is_alive()
    assert m._process is None or m._process.exitcode == 0


def test_iterate_managed_dict_in_child(ctx):
    if type(ctx).__module__.startswith("multiprocessing"):
        pytest.skip("stdlib: a proxy in a child has no manager to build a '#PROXY' reply with")
    with ctx.Manager() as m:
        d, out = m.dict(b=2, a=1), m.list()
        p = ctx.Process(target=mw.iterate_in_child, args=(d, out))
        p.start()
        _join(p)
        assert out[:] == [["a", "b"]]


def test_threads_share_a_proxy(impl):
    with impl.Manager() as m:
        d = m.dict()
        assert mw.count_in_threads(d, 4, 50) == [(t, 49) for t in range(4)]
        with pytest.raises((TypeError, AttributeError, pickle.PicklingError)):
            d["f"] = lambda: None  # not picklable: nothing is sent
        assert len(d) == 4
        del d


def test_nested_proxies(impl):
    with impl.Manager() as m:
        outer = m.dict()
        outer["inner"] = m.list([1])
        inner = outer["inner"]
        inner.append(2)
        assert outer["inner"][:] == [1, 2]
        outer["ns"] = m.Namespace(x=1)
        outer["ns"].x = 5
        assert outer["ns"].x == 5
        del inner
        del outer


def test_sync_types_across_processes(impl):
    ctx = impl.get_context("fork")
    with ctx.Manager() as m:
        lock, counter = m.Lock(), m.Value("i", 0)
        workers = [
            ctx.Process(target=mw.bump_under_lock, args=(lock, counter, 50)) for _ in range(2)
        ]
        for p in workers:
            p.start()
        for p in workers:
            _join(p)
        assert counter.value == 100

        ev_in, ev_out = m.Event(), m.Event()
        p = ctx.Process(target=mw.wait_event_then_set, args=(ev_in, ev_out))
        p.start()
        assert not ev_out.is_set()
        ev_in.set()
        assert ev_out.wait(SHORT_TIMEOUT)
        _join(p)
        ev_in.clear()
        assert not ev_in.is_set()

        barrier, results = m.Barrier(2), m.list()
        p = ctx.Process(target=mw.cross_barrier, args=(barrier, results))
        p.start()
        results.append(barrier.wait(SHORT_TIMEOUT))
        _join(p)
        assert sorted(results) == [0, 1]
        assert barrier.parties == 2 and barrier.n_waiting == 0 and not barrier.broken

        rlock = m.RLock()
        assert rlock.acquire() and rlock.acquire()
        rlock.release()
        rlock.release()
        sem = m.BoundedSemaphore(1)
        assert sem.acquire(timeout=1)
        assert not sem.acquire(True, 0.05)
        sem.release()
        with pytest.raises(ValueError):
            sem.release()
        cond = m.Condition()
        with cond:
            cond.notify_all()
            assert cond.wait_for(lambda: False, timeout=0.05) is False
            assert cond.wait(0.01) is False
        jq = m.JoinableQueue()
        jq.put(1)
        assert jq.get(timeout=SHORT_TIMEOUT) == 1
        jq.task_done()
        jq.join()


def test_errors_and_remote_traceback(impl):
    cls = mw.make_manager_class(impl.__name__)
    managers = _managers(impl)
    with cls() as m:
        thing = m.Thing(1)
        assert thing.add(2) == 3
        assert not hasattr(thing, "_hidden")
        with pytest.raises(ValueError, match="raised in the server"):
            thing.fail()
        with pytest.raises(managers.RemoteError) as info:
            thing._callmethod("_hidden")
        text = str(info.value)
        assert "Traceback (most recent call last)" in text and "_hidden" in text
        assert thing._getvalue().n == 3
        assert m._number_of_objects() == 1
        assert "refcount=1" in m._debug_info()
        # A raised exception's traceback holds the proxy in a cycle until collected.
        del thing, info
        gc.collect()
        assert m._number_of_objects() == 0


def test_start_with_initializer_and_states(ctx):
    impl_name = type(ctx).__module__.split(".")[0]
    cls = mw.make_manager_class(impl_name)
    m = cls(ctx=ctx)
    with pytest.raises(TypeError):
        m.start(initializer=5)
    m.start(mw.set_marker, ("from initializer",))
    try:
        with pytest.raises(ctx.ProcessError):
            m.start()
        thing = m.Thing()
        assert thing.marker() == "from initializer"
        assert thing.pid() == m._process.pid
        del thing
    finally:
        m.shutdown()
    assert m._process.exitcode == 0
    with pytest.raises(ctx.ProcessError):
        m.start()
    m.join(SHORT_TIMEOUT)


def test_shutdown_request_stops_a_started_server_promptly(impl):
    m = impl.Manager()
    try:
        start = time.monotonic()
        _stop_remote(impl, m.address, m._authkey)
        m._process.join(SHORT_TIMEOUT)
        assert m._process.exitcode == 0
        assert time.monotonic() - start < 0.9  # not left to a once-a-second check
    finally:
        m.shutdown()


@pytest.mark.parametrize("used", [False, True], ids=["unused-proxy", "used-proxy"])
def test_a_proxy_fails_at_once_after_shutdown(impl, used):
    # The stdlib's address is a file it removes (FileNotFoundError), or the proxy's
    # connection is closed (BrokenPipeError). ferroproc's server stops accepting before it
    # reports its exit, so a connection is refused, never accepted and then reset.
    errors = []
    for _ in range(20):
        m = impl.Manager()
        values = m.list([1])
        if used:
            values.append(2)
        m.shutdown()
        start = time.monotonic()
        with pytest.raises(OSError) as info:
            values.append(3)
        assert time.monotonic() - start < SHORT_TIMEOUT
        errors.append(type(info.value))
    if impl.__name__ == "ferroproc":
        expected = BrokenPipeError if used else ConnectionRefusedError
        assert set(errors) == {expected}, errors
    else:
        assert set(errors) == {BrokenPipeError if used else FileNotFoundError}, errors


def _threads_of(pid):
    return len(os.listdir(f"/proc/{pid}/task"))


def test_server_starts_its_accept_thread_when_the_first_client_comes():
    # ferroproc: an owned server watches its owner and its listening socket on one thread,
    # and starts the thread that accepts clients only once a client knocks.
    import ferroproc

    with ferroproc.Manager() as m:
        pid = m._process.pid
        time.sleep(0.05)
        assert _threads_of(pid) == 1
        d = m.dict(a=1)
        assert d["a"] == 1
        assert _threads_of(pid) >= 2
        del d
    assert m._process.exitcode == 0


def test_server_ignores_sigint(impl):
    # Ctrl-C in a terminal reaches the whole process group; the owner decides when to stop.
    with impl.Manager() as m:
        d = m.dict(a=1)
        os.kill(m._process.pid, signal.SIGINT)
        time.sleep(0.1)
        assert m._process.is_alive()
        assert d["a"] == 1
        del d
    assert m._process.exitcode == 0


def test_pool(impl):
    if impl.__name__ == "ferroproc":
        pytest.importorskip("ferroproc.pool")
    with impl.Manager() as m, m.Pool(2) as pool:
        assert pool.map(abs, [-1, -2, 3]) == [1, 2, 3]
        assert pool.apply_async(abs, (-4,)).get(SHORT_TIMEOUT) == 4
        assert sorted(pool.imap_unordered(abs, [-1, -2])) == [1, 2]


# ---------------------------------------------------------------------------------------------
# The server's request loop: every kind of reply. ferroproc serves its own connections with a
# native loop and any other (the xmlrpclib serializer's) with the Python one; both must answer
# as the stdlib's loop does.
# ---------------------------------------------------------------------------------------------


def _probe_manager(impl, **kwds):
    return mw.make_probe_manager_class(impl.__name__)(**kwds)


def _method_connection(impl, manager, name):
    """A raw connection to `manager` switched to method calls, as a proxy's own is."""
    managers = _managers(impl)
    conn = managers.listener_client["pickle"][1](manager.address, authkey=manager._authkey)
    managers.dispatch(conn, None, "accept_connection", (name,))
    return conn


def test_method_results_errors_and_tracebacks(impl):
    managers = _managers(impl)
    with _probe_manager(impl) as m:
        p = m.Probe(7)
        assert p.value() == 7
        assert p.kw(1) == (1, 2, [])
        assert p.kw(1, b=3, c=4) == (1, 3, [("c", 4)])
        # Raised by the method: the same exception, raised in the caller.
        with pytest.raises(mw.ProbeError, match="from the method"):
            p.fail("from the method")
        # A result that cannot be pickled: a RemoteError, and the connection stays usable.
        with pytest.raises(managers.RemoteError, match="Unserializable message"):
            p.unpicklable()
        assert p.value() == 7
        # Not exposed, and exposed but missing: the server's traceback.
        with pytest.raises(managers.RemoteError) as info:
            p._callmethod("n")
        text = str(info.value)
        assert "Traceback (most recent call last)" in text
        assert "'n'" in text and "is not in exposed" in text
        with pytest.raises(managers.RemoteError) as info:
            p.missing()
        text = str(info.value)
        assert "Traceback (most recent call last)" in text
        assert "has no attribute 'missing'" in text
        assert p.value() == 7
        del p, info
        gc.collect()  # the raised exceptions' tracebacks held the proxy in cycles
        assert m._number_of_objects() == 0


def test_str_repr_and_getvalue_stand_ins(impl):
    with _probe_manager(impl) as m:
        p = m.Probe(3)
        # None of these is exposed: the server's stand-ins answer.
        assert str(p) == "Probe(3)"  # the proxy's __str__ asks for the referent's repr
        assert p._callmethod("__repr__") == "Probe(3)"
        assert p._callmethod("__str__") == "probe #3"
        copy = p._getvalue()
        assert type(copy) is mw.Probe and copy.n == 3
        assert repr(p).startswith("<AutoProxy[Probe] object, typeid 'Probe' at ")
        del p


def test_method_to_typeid_returns_a_proxy(impl):
    with _probe_manager(impl) as m:
        p = m.Probe(1)
        child = p.spawn(5)  # a "#PROXY" reply
        assert type(child).__name__ == "AutoProxy[Probe]"
        assert child.value() == 5
        assert child.spawn(6).value() == 6
        assert m._number_of_objects() == 2
        del child
        gc.collect()
        assert m._number_of_objects() == 1
        del p


def test_raw_requests_get_the_stdlib_replies(impl):
    """Requests no proxy sends (malformed, unknown ids, odd types) get the replies of the
    stdlib's loop; ferroproc's native loop hands these to its Python steps."""
    managers = _managers(impl)
    with _probe_manager(impl) as m:
        p = m.Probe(7)
        ident = p._id
        conn = _method_connection(impl, m, "raw")
        try:

            def ask(request):
                conn.send(request)
                assert conn.poll(SHORT_TIMEOUT)
                return conn.recv()

            assert ask((ident, "value", (), {})) == ("#RETURN", 7)
            # Any sequence of four unpacks, args any iterable.
            assert ask([ident, "value", (), {}]) == ("#RETURN", 7)
            assert ask((ident, "kw", [1], {"b": 5})) == ("#RETURN", (1, 5, []))
            kind, err = ask((ident, "kw", (1,), {1: 2}))
            assert kind == "#ERROR" and type(err) is TypeError
            kind, err = ask((ident, "fail", ("boom",), {}))
            assert kind == "#ERROR" and type(err) is mw.ProbeError and err.args == ("boom",)
            kind, text = ask(("no such id", "value", (), {}))
            assert kind == "#TRACEBACK" and "KeyError: 'no such id'" in text
            kind, text = ask((ident, "value"))
            assert kind == "#TRACEBACK" and "ValueError" in text
            kind, text = ask((ident, b"value", (), {}))
            assert kind == "#TRACEBACK" and "is not in exposed" in text
            kind, text = ask((ident, "missing", (), {}))
            assert kind == "#TRACEBACK" and "has no attribute 'missing'" in text
            kind, text = ask((ident, "unpicklable", (), {}))
            assert kind == "#UNSERIALIZABLE" and "Traceback" in text
            assert ask((ident, "__repr__", (), {})) == ("#RETURN", "Probe(7)")
            kind, (exposed, token) = ask((ident, "spawn", (2,), {}))
            assert kind == "#PROXY" and token.typeid == "Probe" and "value" in exposed
            assert ask((token.id, "value", (), {})) == ("#RETURN", 2)
            # The reference the server took for the "#PROXY" reply (a proxy would adopt it).
            control = managers.listener_client["pickle"][1](m.address, authkey=m._authkey)
            try:
                managers.dispatch(control, None, "decref", (token.id,))
            finally:
                control.close()
        finally:
            conn.close()
        assert m._number_of_objects() == 1
        del p


def test_client_gone_mid_call_leaves_the_server_serving(ctx):
    impl = sys.modules[type(ctx).__module__.split(".")[0]]
    with _probe_manager(impl, ctx=ctx) as m:
        p = m.Probe(4)
        child = ctx.Process(target=mw.slow_call_through, args=(p, 0.3))
        child.start()
        deadline = time.monotonic() + SHORT_TIMEOUT
        while p.progress()[0] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert p.progress() == (1, 0)  # the child's call is running in the server
        child.kill()
        child.join(SHORT_TIMEOUT)
        assert child.exitcode == -signal.SIGKILL
        # The call completes; its reply has nobody to go to.
        while p.progress()[1] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert p.progress() == (1, 1)
        time.sleep(0.05)  # let the server try to send that reply
        assert p.value() == 4
        assert m.Probe(9).value() == 9
        assert m._process.is_alive()
        del p


def test_xmlrpclib_serializer(impl):
    """A manager on the xmlrpclib serializer: connections that are not ferroproc's native
    ones, served by the Python loop."""
    managers = _managers(impl)
    with _probe_manager(impl, serializer="xmlrpclib") as m:
        p = m.Probe(3)
        assert p.value() == 3
        assert p.kw(1, b=4) == [1, 4, []]  # xmlrpc has no tuples
        assert str(p) == "Probe(3)"
        with pytest.raises(managers.RemoteError, match="has no attribute 'missing'"):
            p.missing()
        with pytest.raises(managers.RemoteError, match="Unserializable message"):
            p.unpicklable()
        assert p.value() == 3
        del p


def test_native_loop_answers_like_the_python_loop():
    """ferroproc's two request loops, fed the same requests over a Pipe, give the same
    replies (payloads, exception types, the last line of each traceback)."""
    import threading

    from ferroproc import connection, managers

    cls = mw.make_probe_manager_class("ferroproc")
    server = managers.Server(cls._registry, None, b"key", "pickle")
    try:
        ident, _ = server.create(None, "Probe", 7)
        nested, _ = server.create(None, "Probe", 8)
        # An object only a proxy inside the server refers to (a proxy stored in a container).
        server.id_to_local_proxy_obj[nested] = server.id_to_obj.pop(nested)
        requests = [
            (ident, "value", (), {}),
            (nested, "value", (), {}),
            [ident, "value", (), {}],
            (ident, "kw", (1,), {"b": 3, "c": 4}),
            (ident, "kw", [1], {}),
            (ident, "kw", (1,), {1: 2}),
            (ident, "fail", ("boom",), {}),
            (ident, "unpicklable", (), {}),
            (ident, "missing", (), {}),
            (ident, "n", (), {}),
            (ident, "__repr__", (), {}),
            (ident, "__str__", (), {}),
            (ident, "#GETVALUE", (), {}),
            (ident, "spawn", (2,), {}),
            ("no such id", "value", (), {}),
            ("0", "value", (), {}),
            (ident, "value"),
            (ident, None, (), {}),
            (ident, ["unhashable"], (), {}),
            None,
        ]

        def run(loop):
            ours, theirs = connection.Pipe()
            done = threading.Thread(target=loop, args=(theirs,))
            done.start()
            try:
                replies = []
                for request in requests:
                    ours.send(request)
                    assert ours.poll(SHORT_TIMEOUT)
                    replies.append(ours.recv())
                ours.send_bytes(b"\x80\x05not a pickle")
                assert ours.poll(SHORT_TIMEOUT)
                replies.append(ours.recv())
            finally:
                ours.close()
                done.join(SHORT_TIMEOUT)
                theirs.close()
            assert not done.is_alive()
            return replies

        def comparable(reply):
            kind, payload = reply
            if kind in ("#TRACEBACK", "#UNSERIALIZABLE"):
                assert payload.startswith("Traceback (most recent call last)")
                return kind, payload.rstrip().splitlines()[-1]
            if kind == "#ERROR":
                return kind, type(payload), payload.args
            if kind == "#PROXY":
                exposed, token = payload
                return kind, exposed, token.typeid
            if isinstance(payload, mw.Probe):
                return kind, vars(payload)
            return kind, payload

        native = [comparable(r) for r in run(server.serve_client)]
        python = [comparable(r) for r in run(server._serve_client_py)]
        assert native == python
        assert [r[0] for r in native] == [
            "#RETURN",
            "#RETURN",
            "#RETURN",
            "#RETURN",
            "#RETURN",
            "#ERROR",
            "#ERROR",
            "#UNSERIALIZABLE",
            "#TRACEBACK",
            "#TRACEBACK",
            "#RETURN",
            "#RETURN",
            "#RETURN",
            "#PROXY",
            "#TRACEBACK",
            "#TRACEBACK",
            "#TRACEBACK",
            "#TRACEBACK",
            "#TRACEBACK",
            "#TRACEBACK",
            "#TRACEBACK",
        ]
    finally:
        server.listener.close()


# ---------------------------------------------------------------------------------------------
# Remote managers over TCP, and the two libraries talking to each other
# ---------------------------------------------------------------------------------------------


def test_remote_manager_on_localhost(ctx):
    impl_name = type(ctx).__module__.split(".")[0]
    impl = sys.modules[impl_name]
    authkey = os.urandom(16)
    r, w = ctx.Pipe(duplex=False)
    server = ctx.Process(target=mw.serve_remote, args=(impl_name, authkey, w))
    server.start()
    w.close()
    try:
        assert r.poll(SHORT_TIMEOUT)
        address = r.recv()
        assert address[0] == "127.0.0.1"
        m = mw.make_manager_class(impl_name)(address=address, authkey=authkey)
        m.connect()
        thing = m.Thing(1)
        assert thing.add(1) == 2
        assert thing.pid() == server.pid
        # Another process connects to the same server.
        out_r, out_w = ctx.Pipe(duplex=False)
        p = ctx.Process(target=mw.use_remote, args=(impl_name, address, authkey, out_w))
        p.start()
        out_w.close()
        assert out_r.poll(SHORT_TIMEOUT)
        assert out_r.recv() == 15
        _join(p)
        out_r.close()
        with pytest.raises(impl.AuthenticationError):
            mw.make_manager_class(impl_name)(address=address, authkey=b"wrong key").connect()
        assert thing.add(1) == 3  # the server survived the failed handshake
        del thing
        _stop_remote(impl, address, authkey)
        server.join(SHORT_TIMEOUT)
        assert server.exitcode == 0
    finally:
        r.close()
        if server.is_alive():
            server.kill()
            server.join(SHORT_TIMEOUT)


@pytest.mark.parametrize("address", [LOCALHOST, None], ids=["tcp", "default"])
@pytest.mark.parametrize("client_name", ["multiprocessing", "ferroproc"])
@pytest.mark.parametrize("server_name", ["multiprocessing", "ferroproc"])
def test_interop_client_and_server(server_name, client_name, address):
    server_mgrs = _managers(pytest.importorskip(server_name))
    client_mgrs = _managers(pytest.importorskip(client_name))
    authkey = os.urandom(16)
    srv = server_mgrs.SyncManager(address=address, authkey=authkey)
    srv.start()
    try:
        client = client_mgrs.SyncManager(address=srv.address, authkey=authkey)
        client.connect()
        d = client.dict()
        d["a"] = [1, 2]
        assert d["a"] == [1, 2]
        assert list(iter(d)) == ["a"]  # a "#PROXY" reply built by the other library
        ns = client.Namespace(x=1)
        ns.y = 2
        assert ns.x + ns.y == 3
        lst = client.list(range(3))
        lst.append(3)
        assert lst[:] == [0, 1, 2, 3]
        lock = client.Lock()
        assert lock.acquire(timeout=1)
        lock.release()
        with pytest.raises(client_mgrs.RemoteError, match="Traceback"):
            d._callmethod("no_such_method")
        with pytest.raises(KeyError):
            d["missing"]
        del d, ns, lst, lock
        gc.collect()  # the raised exceptions' tracebacks held proxies in cycles
        assert srv._number_of_objects() == 0
    finally:
        srv.shutdown()
    assert srv._process.exitcode == 0


def test_wrong_authkey(impl):
    managers = _managers(impl)
    authkey = os.urandom(16)
    with managers.SyncManager(address=LOCALHOST, authkey=authkey) as m:
        with pytest.raises(impl.AuthenticationError):
            managers.SyncManager(address=m.address, authkey=b"not the key").connect()
        client = managers.SyncManager(address=m.address, authkey=authkey)
        client.connect()
        d = client.dict()
        d[1] = 2
        assert d[1] == 2
        del d


# ---------------------------------------------------------------------------------------------
# Failures: dead server, client killed mid-call, owner gone
# ---------------------------------------------------------------------------------------------


def test_dead_server_gives_a_clear_error(impl):
    m = impl.Manager()
    try:
        d = m.dict()
        d[1] = 1
        os.kill(m._process.pid, signal.SIGKILL)
        m._process.join(SHORT_TIMEOUT)
        start = time.monotonic()
        with pytest.raises((EOFError, ConnectionError)):
            d[1] = 2
            d[1]
        with pytest.raises(OSError):
            m.list()
        assert time.monotonic() - start < SHORT_TIMEOUT / 2
    finally:
        m.shutdown()
    del d


def test_server_killed_before_its_first_client(ctx):
    # `Manager()` may return before its server is up (ferroproc binds a fork child's socket
    # in the owner): killed then, the next call must be refused at once, not left waiting in
    # a listen backlog that a copy of the socket in the owner would keep alive.
    m = ctx.Manager()
    try:
        os.kill(m._process.pid, signal.SIGKILL)
        m._process.join(SHORT_TIMEOUT)
        assert m._process.exitcode == -signal.SIGKILL
        start = time.monotonic()
        with pytest.raises(OSError):
            m.dict()
        assert time.monotonic() - start < SHORT_TIMEOUT / 2
    finally:
        m.shutdown()


def test_client_killed_mid_call(ctx):
    with ctx.Manager() as m:
        q, started, d = m.Queue(), m.Event(), m.dict()
        p = ctx.Process(target=mw.block_on_queue, args=(q, started))
        p.start()
        assert started.wait(SHORT_TIMEOUT)
        time.sleep(0.05)  # let the child's q.get() reach the server
        p.kill()
        p.join(SHORT_TIMEOUT)
        assert p.exitcode == -signal.SIGKILL
        d["still"] = "serving"
        assert d["still"] == "serving"
        assert m.list([1])[:] == [1]
        assert m._process.is_alive()


def test_interrupted_call_leaves_the_proxy_usable(impl):
    if impl.__name__ == "multiprocessing":
        pytest.skip("stdlib: the interrupted call's reply stays pending on the connection")
    import _thread
    import threading

    with impl.Manager() as m:
        ev, d = m.Event(), m.dict()
        timer = threading.Timer(0.2, _thread.interrupt_main)
        timer.start()
        try:
            with pytest.raises(KeyboardInterrupt):
                ev.wait()  # no timeout: only the interrupt ends it
        finally:
            timer.join(SHORT_TIMEOUT)
        d["after"] = 1
        assert d["after"] == 1
        ev.set()
        assert ev.is_set()


def test_hostile_and_vanishing_clients_leave_the_server_serving(impl):
    import socket
    import struct

    managers = _managers(impl)
    connection = __import__(f"{impl.__name__}.connection", fromlist=["Client"])
    with impl.Manager() as m:
        d = m.dict()
        # Connects and goes away before the handshake.
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(m.address)
        # Authenticates, switches to method calls, then sends a frame that is not a pickle.
        c = connection.Client(m.address, authkey=m._authkey)
        managers.dispatch(c, None, "accept_connection", ("hostile",))
        c.send_bytes(b"\x80\x05not a pickle")
        kind, text = c.recv()
        assert kind == "#TRACEBACK" and "Traceback" in text
        # Then announces 100 bytes, sends 10 and leaves.
        with socket.socket(fileno=os.dup(c.fileno())) as raw:
            raw.sendall(struct.pack("!i", 100) + b"x" * 10)
        c.close()
        d["x"] = 1
        assert d["x"] == 1
        assert m._process.is_alive()
        del d


_ORPHAN_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    import ferroproc
    if __name__ == "__main__":
        m = ferroproc.get_context(sys.argv[1]).Manager()
        d = m.dict(a=1)  # a live proxy at exit too
        pids = [m._process.pid]
        if sys.argv[2] == "kill-with-child":
            # A later fork child holds the owner's end of the control pipe too, so only the
            # owner's own death (its pidfd) can tell the server.
            import time
            child = ferroproc.get_context("fork").Process(target=time.sleep, args=(60,))
            child.start()
            pids.append(child.pid)
        print(*pids, flush=True)
        if sys.argv[2].startswith("kill"):
            os.kill(os.getpid(), signal.SIGKILL)
        sys.exit(0)  # no shutdown(): the exit finalizers stop and reap the server
    """
)


def _gone(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return True
    return stat[stat.rfind(")") + 2] in "ZX"


@pytest.mark.parametrize("how", ["kill", "kill-with-child", "exit"])
@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_server_ends_with_its_owner(method, how, tmp_path):
    script = tmp_path / "orphan.py"
    script.write_text(_ORPHAN_SCRIPT)
    out, err = tmp_path / "out", tmp_path / "err"
    # Files, not pipes: a surviving grandchild would hold a pipe open past the script's end.
    with out.open("w") as out_f, err.open("w") as err_f:
        proc = subprocess.run(
            [sys.executable, str(script), method, how],
            stdout=out_f,
            stderr=err_f,
            timeout=SCRIPT_TIMEOUT,
            check=False,
        )
    pid, *others = (int(p) for p in out.read_text().split())
    try:
        stderr = err.read_text()
        assert proc.returncode == (0 if how == "exit" else -signal.SIGKILL), stderr
        if how == "exit":
            assert stderr == ""
        deadline = time.monotonic() + 10
        while not _gone(pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        if not _gone(pid):
            os.kill(pid, signal.SIGKILL)
            pytest.fail("the manager server outlived its owner")
    finally:
        for other in others:  # checked above while it still held the control pipe
            os.kill(other, signal.SIGKILL)
