"""Connections between threads (`multiprocessing.dummy.connection`): pairs of queues."""

from queue import Queue

__all__ = ["Client", "Listener", "Pipe"]

families = [None]


class Listener:
    """Accepts `Client` connections; its address is the queue clients announce themselves on."""

    def __init__(self, address=None, family=None, backlog=1):
        self._backlog_queue = Queue(backlog)

    def accept(self):
        """Waits for a client and returns the connection to it."""
        return Connection(*self._backlog_queue.get())

    def close(self):
        self._backlog_queue = None

    @property
    def address(self):
        return self._backlog_queue

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc_value, exc_tb):
        self.close()


def Client(address):
    """Connects to the `Listener` whose ``address`` is given."""
    inbound, outbound = Queue(), Queue()
    address.put((outbound, inbound))
    return Connection(inbound, outbound)


def Pipe(duplex=True):
    """Two connected ends (always duplex)."""
    a, b = Queue(), Queue()
    return Connection(a, b), Connection(b, a)


class Connection:
    """One end: ``send``/``recv`` (objects are passed as they are), ``poll``, ``close``."""

    def __init__(self, _in, _out):
        self._out = _out
        self._in = _in
        self.send = self.send_bytes = _out.put
        self.recv = self.recv_bytes = _in.get

    def poll(self, timeout=0.0):
        """Whether something can be received, waiting up to `timeout` seconds."""
        if self._in.qsize() > 0:
            return True
        if timeout <= 0.0:
            return False
        with self._in.not_empty:
            self._in.not_empty.wait(timeout)
        return self._in.qsize() > 0

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc_value, exc_tb):
        self.close()
