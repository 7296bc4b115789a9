"""A spawn child's payload (preparation data, process object) loaded without `_pickle`.

ferroproc's spawn child loads "plain" pickles natively (``_ferroproc.load_plain_pickle``) and
hands anything else to ``_pickle``. The loader is checked against the stdlib's own unpickler
on the same bytes; a throwaway interpreter checks that a light child never imports
``_pickle`` and that a payload outside the plain subset still arrives.
"""

from __future__ import annotations

import pickle
import subprocess
import sys
import textwrap

import _workers as w
import pytest
from _workers import SCRIPT_TIMEOUT
from ferroproc._ferroproc import load_plain_pickle


class Point:
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __eq__(self, other):
        return type(other) is Point and vars(self) == vars(other)

    __hash__ = None


class Slotted:
    __slots__ = ("a", "b")

    def __init__(self, a, b):
        self.a, self.b = a, b

    def __eq__(self, other):
        return type(other) is Slotted and (self.a, self.b) == (other.a, other.b)

    __hash__ = None


class WithState:
    def __init__(self, v):
        self.v = v

    def __getstate__(self):
        return {"stored": self.v}

    def __setstate__(self, state):
        self.v = state["stored"] * 2

    def __eq__(self, other):
        return type(other) is WithState and self.v == other.v

    __hash__ = None


class Outer:
    class Inner:
        pass


def module_function():
    return 42


PLAIN = [
    None,
    {"a": [1, 2.5, None, True, False], "b": ("x", b"y"), 3: -(2**40)},
    [(), (1,), (1, 2), (1, 2, 3), (1, 2, 3, 4)],
    "snowman \u2603",
    b"\x00" * 300,
    Point(1, [2, 3]),
    Slotted(1, "two"),
    module_function,
    Outer.Inner,
    complex(1, 2),
    {"nested": {"deeper": [Point(0, 0), {"k": (None,)}]}},
]


@pytest.mark.parametrize("protocol", [4, 5])
@pytest.mark.parametrize("obj", PLAIN, ids=lambda o: type(o).__name__)
def test_plain_pickles_load_as_pickle_loads_them(obj, protocol):
    data = pickle.dumps(obj, protocol)
    loaded = load_plain_pickle(data, 0)
    assert loaded is not None, "expected a plain pickle"
    value, end = loaded
    assert end == len(data)
    expected = pickle.loads(data)
    assert type(value) is type(expected)
    assert value == expected


def test_setstate_and_shared_objects():
    shared = [1, 2]
    data = pickle.dumps({"one": shared, "two": shared, "w": WithState(5)}, 4)
    value, _ = load_plain_pickle(data, 0)
    assert value["one"] is value["two"]
    assert value["w"].v == 10  # went through __setstate__


def test_instance_dict_keys_are_interned():
    value, _ = load_plain_pickle(pickle.dumps(Point(1, 2), 4), 0)
    key = next(iter(vars(value)))
    assert sys.intern(key) is key


def test_consecutive_pickles_are_read_in_turn():
    first, second = pickle.dumps({"a": 1}, 4), pickle.dumps([Point(1, 2)], 4)
    data = first + second
    one, pos = load_plain_pickle(data, 0)
    two, end = load_plain_pickle(data, pos)
    assert (one, pos) == ({"a": 1}, len(first))
    assert (two, end) == ([Point(1, 2)], len(data))


@pytest.mark.parametrize(
    ("obj", "protocol"),
    [({1, 2}, 4), (frozenset({3}), 4), (2**100, 4), (bytearray(b"x"), 5)],
    ids=lambda o: type(o).__name__,
)
def test_other_pickles_are_left_to_pickle(obj, protocol):
    assert load_plain_pickle(pickle.dumps(obj, protocol), 0) is None


@pytest.mark.parametrize("protocol", [0, 1, 2, 3])
def test_older_protocols_are_left_to_pickle_or_loaded_alike(protocol):
    obj = {"a": [1, "x"], "b": Point(1, 2)}
    data = pickle.dumps(obj, protocol)
    loaded = load_plain_pickle(data, 0)
    # Protocols 0-3 name classes with GLOBAL, outside the subset (protocol 0/1: no PROTO).
    assert loaded is None


def test_truncated_pickles_are_refused():
    data = pickle.dumps({"a": [Point(1, 2)], "f": module_function}, 4)
    for cut in range(len(data)):
        assert load_plain_pickle(data[:cut], 0) is None


def _stack_global(module, name):
    """A protocol 4 pickle of the object ``module.name``, whoever can find it or not."""
    out = b"\x80\x04"
    for s in (module, name):
        raw = s.encode()
        out += b"\x8c" + bytes([len(raw)]) + raw + b"\x94"
    return out + b"\x93."


def test_a_missing_attribute_is_the_same_error_as_pickle():
    data = _stack_global(__name__, "nope")
    with pytest.raises(AttributeError, match="Can't get attribute 'nope' on <module"):
        pickle.loads(data)
    with pytest.raises(AttributeError, match="Can't get attribute 'nope' on <module"):
        load_plain_pickle(data, 0)
    local = _stack_global(__name__, "module_function.<locals>.f")
    with pytest.raises(AttributeError, match="Can't pickle local attribute"):
        pickle.loads(local)
    with pytest.raises(AttributeError, match="Can't pickle local attribute"):
        load_plain_pickle(local, 0)


def test_a_stack_underflow_is_an_unpickling_error():
    with pytest.raises(pickle.UnpicklingError):
        load_plain_pickle(b"\x80\x04N\x86.", 0)  # TUPLE2 with one item
    with pytest.raises(pickle.UnpicklingError):
        load_plain_pickle(b"\x80\x04NN.", 0)  # two objects left at STOP


CHILD_SCRIPT = """
import sys


def report(expected_args, *args):
    # Exit code: 0 if the arguments arrived, +2 if `_pickle` was imported in this child.
    ok = args == expected_args
    sys.exit((0 if ok else 1) + (2 if "_pickle" in sys.modules else 0))


if __name__ == "__main__":
    mod = __import__(sys.argv[1])
    ctx = mod.get_context("spawn")
    args = eval(sys.argv[2])
    p = ctx.Process(target=report, args=(args, *args))
    p.start()
    p.join(30)
    print(p.exitcode)
"""


@pytest.mark.parametrize(
    ("args", "plain"),
    [("(1, 'two', b'3', (4.0, None), [5], {'six': 6})", True), ("({7}, 2**100)", False)],
    ids=["plain-args", "set-and-bigint-args"],
)
def test_spawn_child_loads_its_payload(impl, tmp_path, args, plain):
    path = tmp_path / "child.py"
    path.write_text(textwrap.dedent(CHILD_SCRIPT))
    r = subprocess.run(
        [sys.executable, str(path), impl.__name__, args],
        check=False,
        capture_output=True,
        text=True,
        timeout=SCRIPT_TIMEOUT,
    )
    assert r.returncode == 0, r.stderr
    code = int(r.stdout.split()[-1])
    assert code & 1 == 0, "the arguments did not arrive intact"
    imported_pickle = bool(code & 2)
    if impl.__name__ == "ferroproc":
        assert imported_pickle == (not plain)
    else:
        assert imported_pickle


def test_a_large_payload_is_not_kept_while_the_child_runs(impl, tmp_path):
    # The child holds its 64 MiB argument once (in the process object), not also the bytes it
    # was unpickled from.
    path = tmp_path / "rss"
    p = impl.get_context("spawn").Process(target=w.report_rss, args=(str(path), b"x" * (64 << 20)))
    p.start()
    p.join(w.SHORT_TIMEOUT)
    assert p.exitcode == 0
    rss_mib = int(path.read_text()) / 1024
    assert 64 < rss_mib < 64 + 48, rss_mib
