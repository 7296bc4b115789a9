"""Large payloads between the two ends of a ``Pipe()``: ferroproc passes those of 128 KiB to
2 MiB through a shared-memory lane beside the socket (README, Extensions). The behaviour is the
stdlib's, so every test also runs against it; the checks of lane internals (descriptors, hostile
lane frames) run on ferroproc only.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time

import _conn_workers as workers
import pytest
from _workers import SHORT_TIMEOUT

LANE_MARKER = -2


def lane_frame(slot, length):
    return struct.pack("!iIQ", LANE_MARKER, slot, length)


def open_fds():
    return len(os.listdir("/proc/self/fd"))


def test_large_and_small_messages_arrive_in_order_both_ways(ctx):
    ours, theirs = ctx.Pipe()
    p = ctx.Process(target=workers.echo_lane_messages, args=(theirs,))
    p.start()
    theirs.close()
    for m in workers.lane_messages():
        ours.send_bytes(m)
        assert ours.poll(SHORT_TIMEOUT)
        assert ours.recv_bytes() == m
    ok, more_fds = ours.recv()
    assert ok
    p.join(SHORT_TIMEOUT)
    assert p.exitcode == 0
    ours.close()
    # The child closed every descriptor that came with a lane frame; ferroproc's keeps one
    # for its own lane.
    assert more_fds <= 1


def test_sender_ahead_of_its_reader_falls_back_to_the_socket_in_order(ctx):
    # The reader starts late: the lane's slots fill up, the sender gives up on them and the
    # rest travels through the socket (blocking when it is full, as the stdlib's does), in
    # order.
    ours, theirs = ctx.Pipe()
    p = ctx.Process(target=workers.read_later, args=(theirs, 0.3))
    p.start()
    theirs.close()
    for m in workers.lane_messages():
        ours.send_bytes(m)
    assert ours.recv() is True
    p.join(SHORT_TIMEOUT)
    assert p.exitcode == 0
    ours.close()


def sending(conn, messages, reader_may_close=False):
    """Sends `messages` from a thread (a socket's buffer holds less than they need)."""

    def send():
        try:
            for m in messages:
                conn.send_bytes(m)
        except OSError:
            if not reader_may_close:
                raise

    t = threading.Thread(target=send)
    t.start()
    return t


def test_recv_bytes_into_a_short_buffer_carries_the_whole_message(impl):
    a, b = impl.Pipe()
    data = os.urandom(1 << 20)
    t = sending(a, [data, data[:300_000]])
    with pytest.raises(impl.BufferTooShort) as info:
        b.recv_bytes_into(bytearray(1000))
    assert info.value.args[0] == data
    # The connection goes on.
    assert b.recv_bytes() == data[:300_000]
    t.join(SHORT_TIMEOUT)
    a.close()
    b.close()


def test_maxlength_refuses_a_large_message(impl):
    a, b = impl.Pipe()
    t = sending(a, [bytes(1 << 20)], reader_may_close=True)
    with pytest.raises(OSError, match="bad message length"):
        b.recv_bytes(maxlength=1000)
    b.close()  # the sender may still be blocked on the socket: this ends it
    t.join(SHORT_TIMEOUT)
    a.close()


def test_a_reader_killed_with_slots_full_does_not_hang_the_sender(ctx):
    ours, theirs = ctx.Pipe()
    p = ctx.Process(target=workers.sleep_then_exit, args=(60,))
    p.start()
    t = sending(ours, [bytes([i]) * (1 << 20) for i in range(3)])
    time.sleep(0.1)
    p.kill()
    p.join(SHORT_TIMEOUT)
    # `theirs` is still open here, so the messages are all there, in order: the first two
    # through the lane's slots, the third through the socket once no slot came free in time.
    for i in range(3):
        assert theirs.recv_bytes() == bytes([i]) * (1 << 20)
    t.join(SHORT_TIMEOUT)
    assert not t.is_alive()
    ours.close()
    theirs.close()


# -- ferroproc's lanes ----------------------------------------------------------------------


@pytest.fixture
def ferro_pair(impl):
    if impl.__name__ != "ferroproc":
        pytest.skip("ferroproc's lanes")
    a, b = impl.Pipe()
    yield a, b
    a.close()
    b.close()


def test_pipe_ends_use_lanes_and_rebuilt_ends_keep_them(ferro_pair):
    # (End to end, the spawn and forkserver runs of the tests above receive lane frames on
    # an end pickled into the child.)
    from ferroproc.connection import Connection, rebuild_connection

    a, b = ferro_pair
    assert a._lanes and b._lanes
    plain = Connection(os.dup(a.fileno()))
    assert not plain._lanes  # a connection made from a descriptor: its peer may be anyone
    plain.close()

    class Fd:
        def detach(self):
            return os.dup(a.fileno())

    rebuilt = rebuild_connection(Fd(), True, True, a._lanes)
    assert rebuilt._lanes
    rebuilt.close()
    old_style = rebuild_connection(Fd(), True, True)
    assert not old_style._lanes
    old_style.close()


def test_descriptors_that_come_with_lane_frames_are_closed(ferro_pair):
    a, b = ferro_pair
    b.send_bytes(bytes(1 << 20))  # b makes its lane
    assert a.recv_bytes() == bytes(1 << 20)
    before = open_fds()
    for i in range(200):
        b.send_bytes(bytes([i]) * (1 << 20))
        assert a.recv_bytes() == bytes([i]) * (1 << 20)
    assert open_fds() == before


def _raw_socket(conn):
    return socket.socket(fileno=os.dup(conn.fileno()))


@pytest.mark.parametrize("method", ["recv_bytes", "recv_bytes_into", "recv"])
@pytest.mark.parametrize(
    "frame",
    ["no-descriptor", "not-a-lane", "slot-out-of-range", "slot-not-filled", "too-long", "cut"],
)
def test_hostile_lane_frames_are_bad_messages(ferro_pair, method, frame):
    a, b = ferro_pair
    with _raw_socket(b) as raw:
        if frame == "no-descriptor":
            raw.sendall(lane_frame(0, 1 << 20))
        elif frame == "not-a-lane":
            r, w = os.pipe()
            socket.send_fds(raw, [lane_frame(0, 1 << 20)], [r])
            os.close(r)
            os.close(w)
        elif frame == "cut":
            raw.sendall(lane_frame(0, 1 << 20)[:9])
            raw.shutdown(socket.SHUT_WR)
        else:
            # A real lane (the peer's), named wrongly.
            b.send_bytes(bytes(1 << 20))
            assert a.recv_bytes() == bytes(1 << 20)  # now a has b's lane mapped, slot 0 free
            slot, length = {
                "slot-out-of-range": (7, 1 << 20),
                "slot-not-filled": (0, 1 << 20),
                "too-long": (0, (2 << 20) + 1),
            }[frame]
            raw.sendall(lane_frame(slot, length))
    args = (bytearray(4 << 20),) if method == "recv_bytes_into" else ()
    with pytest.raises(OSError):
        getattr(a, method)(*args)
    # The process is fine.
    x, y = __import__("ferroproc").Pipe()
    x.send_bytes(bytes(1 << 20))
    assert y.recv_bytes() == bytes(1 << 20)
    x.close()
    y.close()
