"""Child targets of the benchmark cases.

Spawn and forkserver children import the module their target lives in, so this one imports
nothing beyond `sys`: the timings then show the libraries' own start-up cost, not the
benchmark harness's imports (`typing`, the case registry), which real programs do not have.
"""

import sys


def noop():
    """Returns at once."""


def put_value(q, value):
    """Puts `value` on `q`."""
    q.put(value)


def exit_with(arg):
    """Exits with status `arg % 256` through `SystemExit`."""
    sys.exit(arg % 256)


# -- queues (ferroproc.bench.queue_cases) --------------------------------------------------


def queue_consume(q, done, n):
    """Gets `n` messages from `q` one at a time, then reports on `done`."""
    get = q.get
    for _ in range(n):
        get()
    done.put(n)


def queue_consume_batched(q, done, n):
    """Gets `n` messages with `get_many` where the queue has it, then reports on `done`."""
    get_many = getattr(q, "get_many", None)
    got = 0
    if get_many is None:
        get = q.get
        for _ in range(n):
            get()
        got = n
    while got < n:
        got += len(get_many(4096))
    done.put(got)


def queue_consume_until_none(q, done):
    """Gets until `None`, then reports how many it got on `done`."""
    get = q.get
    count = 0
    while get() is not None:
        count += 1
    done.put(count)


def queue_produce(q, go, n):
    """Waits for a token on `go`, then puts the integers 0..n-1 on `q`."""
    go.get()
    put = q.put
    for i in range(n):
        put(i)


def queue_echo(q_in, q_out, n):
    """Answers `n` messages from `q_in` on `q_out`."""
    get, put = q_in.get, q_out.put
    for _ in range(n):
        put(get())
