"""Child targets for tests/test_interop.py (module level, importable by spawn children)."""


def put_pair(q, value):
    q.put(("from child", value))


def noop():
    pass
