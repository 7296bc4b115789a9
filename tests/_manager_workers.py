"""Child targets and manager classes for tests/test_managers.py (module level, so spawn and
forkserver children can import them by name)."""

from __future__ import annotations

import _thread
import importlib
import os
import sys
import time

SHORT_TIMEOUT = 30.0


def fill_containers(d, lst, ns, value, arr, q):  # noqa: PLR0917 - one per managed type
    """Works on managed objects received as proxies, from a child process."""
    d["child"] = os.getpid()
    d["sum"] = sum(lst)
    lst.append(len(lst))
    ns.seen = ns.given * 2
    value.value += 1
    arr[0] = arr[1] + arr[2]
    q.put(("done", sorted(d.keys())))


def iterate_in_child(d, out):
    """Iterates a managed dict in a child: its Iterator arrives as a "#PROXY" reply."""
    out.append(sorted(d))


def count_in_threads(d, n_threads, n):
    """Several threads of one process call through the same proxy (one connection each)."""
    import threading

    def work(t):
        for i in range(n):
            d[t] = i

    threads = [threading.Thread(target=work, args=(t,)) for t in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(SHORT_TIMEOUT)
    return sorted(d.items())


def bump_under_lock(lock, counter, n):
    for _ in range(n):
        with lock:
            counter.value += 1


def wait_event_then_set(ev_in, ev_out):
    if ev_in.wait(SHORT_TIMEOUT):
        ev_out.set()


def cross_barrier(barrier, results):
    results.append(barrier.wait(SHORT_TIMEOUT))


def block_on_queue(q, started):
    started.set()
    q.get()  # killed while waiting here


# -- a BaseManager subclass with registered types of its own ---------------------------------

_marker = None


def set_marker(value):
    global _marker
    _marker = value


class Thing:
    def __init__(self, start=0):
        self.n = start

    def add(self, k):
        self.n += k
        return self.n

    def fail(self):
        raise ValueError("raised in the server")

    def _hidden(self):
        return "hidden"

    def marker(self):
        return _marker

    def pid(self):
        return os.getpid()


def make_manager_class(impl_name):
    """A BaseManager subclass of `impl_name` with `Thing` registered (made once per library)."""
    cls = _MANAGER_CLASSES.get(impl_name)
    if cls is None:
        managers = importlib.import_module(f"{impl_name}.managers")
        cls = type(f"ThingManager_{impl_name}", (managers.BaseManager,), {"__module__": __name__})
        cls.register("Thing", Thing)
        setattr(sys.modules[__name__], cls.__name__, cls)  # picklable by name for spawn
        _MANAGER_CLASSES[impl_name] = cls
    return cls


_MANAGER_CLASSES: dict = {}


def __getattr__(name):
    # Made on first use, so a stdlib child never imports ferroproc (and the other way round);
    # a spawn child unpickling `ThingManager_<impl>._run_server` lands here.
    for prefix, make in (
        ("ThingManager_", make_manager_class),
        ("ProbeManager_", make_probe_manager_class),
    ):
        if name.startswith(prefix) and name[len(prefix) :] in ("multiprocessing", "ferroproc"):
            return make(name[len(prefix) :])
    raise AttributeError(name)


# -- a type whose calls take every path of the server's request loop ---------------------------


class ProbeError(Exception):
    """Raised by `Probe.fail` (module level, so it unpickles in the client)."""


class Probe:
    """Answers with plain values, raises, returns what cannot be pickled, has new `Probe`s
    made (returned as proxies through ``method_to_typeid``) and has a `repr` of its own."""

    def __init__(self, n=0):
        self.n = n
        self.started = 0
        self.done = 0

    def value(self):
        return self.n

    def kw(self, a, b=2, **more):
        return (a, b, sorted(more.items()))

    def fail(self, text):
        raise ProbeError(text)

    def unpicklable(self):
        return _thread.allocate_lock()  # neither pickle nor xmlrpc can send it

    def spawn(self, n):
        # Through ``method_to_typeid`` the server makes a new `Probe(n)` of this result.
        return n

    def slow(self, seconds):
        self.started += 1
        time.sleep(seconds)
        self.done += 1
        return self.done

    def progress(self):
        return (self.started, self.done)

    def __repr__(self):
        return f"Probe({self.n})"

    def __str__(self):
        return f"probe #{self.n}"


# "missing" is exposed but is no attribute of Probe: its look-up fails in the server.
PROBE_EXPOSED = ("value", "kw", "fail", "unpicklable", "spawn", "slow", "progress", "missing")


def make_probe_manager_class(impl_name):
    """A BaseManager subclass of `impl_name` serving `Probe` (made once per library)."""
    key = (impl_name, "Probe")
    cls = _MANAGER_CLASSES.get(key)
    if cls is None:
        managers = importlib.import_module(f"{impl_name}.managers")
        cls = type(f"ProbeManager_{impl_name}", (managers.BaseManager,), {"__module__": __name__})
        cls.register("Probe", Probe, exposed=PROBE_EXPOSED, method_to_typeid={"spawn": "Probe"})
        setattr(sys.modules[__name__], cls.__name__, cls)
        _MANAGER_CLASSES[key] = cls
    return cls


def slow_call_through(proxy, seconds):
    """Calls `proxy.slow(seconds)` in a child (killed in the middle of it by the test)."""
    proxy.slow(seconds)


def serve_remote(impl_name, authkey, address_conn):
    """Runs a ThingManager server on 127.0.0.1 with get_server().serve_forever()."""
    cls = make_manager_class(impl_name)
    manager = cls(address=("127.0.0.1", 0), authkey=authkey)
    server = manager.get_server()
    address_conn.send(server.address)
    address_conn.close()
    server.serve_forever()


def use_remote(impl_name, address, authkey, out):
    """A separate process connecting to a remote manager and using one of its objects."""
    cls = make_manager_class(impl_name)
    manager = cls(address=tuple(address), authkey=authkey)
    manager.connect()
    thing = manager.Thing(5)
    out.send(thing.add(10))
    out.close()


def slow_call(seconds):
    time.sleep(seconds)


def read_shared(impl_name, list_name, shm_name, out):
    """Attaches a manager's ShareableList and SharedMemory by name and reports what it sees."""
    import importlib

    shared_memory = importlib.import_module(f"{impl_name}.shared_memory")
    sl = shared_memory.ShareableList(name=list_name)
    shm = shared_memory.SharedMemory(name=shm_name)
    out.send((list(sl), bytes(shm.buf[:5])))
    sl.shm.close()
    shm.close()
    out.close()
