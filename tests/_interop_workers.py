"""Child targets for tests/test_interop.py (module level, importable by spawn children)."""


def put_pair(q, value):
    q.put(("from child", value))


def noop():
    pass


def echo_over_received_connection(control):
    """Receives a connection over `control` (outside process start) and echoes one message."""
    conn = control.recv()
    conn.send(("echo", conn.recv()))
    conn.close()
    control.close()
