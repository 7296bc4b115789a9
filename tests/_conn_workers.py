"""Module-level child targets for the connection tests (spawn/forkserver children import them)."""

from __future__ import annotations

import os
import time


def echo_bytes(conn, n):
    """Sends back each of the next `n` byte messages, then closes."""
    for _ in range(n):
        conn.send_bytes(conn.recv_bytes())
    conn.close()


def echo_objects(conn, n):
    """Sends back each of the next `n` objects, then closes."""
    for _ in range(n):
        conn.send(conn.recv())
    conn.close()


def send_payload(conn, size, count):
    """Sends `count` messages of `size` bytes with a recognisable pattern."""
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    for _ in range(count):
        conn.send_bytes(data)
    conn.close()


def send_pickled_payload(conn, size):
    """Sends one `bytes` of `size` bytes with `send` (pickled), then closes."""
    conn.send(bytes(range(256)) * (size // 256))
    conn.close()


def recv_into_and_report(conn, size):
    """Receives one message into a preallocated buffer and replies with its length and sum."""
    buf = bytearray(size + 16)
    n = conn.recv_bytes_into(buf, 16)
    conn.send((n, sum(buf[16 : 16 + n])))
    conn.close()


def write_only(writer, payload):
    """Sends `payload` on a one-way pipe's write end."""
    writer.send(payload)
    writer.close()


def sleep_then_exit(seconds):
    """Sleeps, then returns (the sentinel becomes ready)."""
    time.sleep(seconds)


def lane_messages():
    """The messages of the lane tests: sizes around the lane's bounds (128 KiB to 2 MiB go
    through a ferroproc Pipe's shared-memory lane), interleaved with small ones."""
    sizes = [5, (128 << 10) - 1, 128 << 10, 1 << 20, 7, 2 << 20, (2 << 20) + 1, 300_000, 0]
    return [bytes([i % 251]) * size for i, size in enumerate(sizes * 3)]


def echo_lane_messages(conn):
    """Receives the lane messages (the big ones with `recv_bytes_into`), checks each and
    sends each back; then reports how many more descriptors it has open than before."""
    buf = bytearray((2 << 20) + 64)
    fds_before = len(os.listdir("/proc/self/fd"))
    ok = True
    for expected in lane_messages():
        if len(expected) >= 100_000:
            n = conn.recv_bytes_into(buf, 32)
            got = bytes(buf[32 : 32 + n])
        else:
            got = conn.recv_bytes()
        ok = ok and got == expected
        conn.send_bytes(got)
    conn.send((ok, len(os.listdir("/proc/self/fd")) - fds_before))
    conn.close()


def read_later(conn, delay):
    """Sleeps `delay` seconds, then receives and checks the lane messages; reports ok."""
    time.sleep(delay)
    ok = all(conn.recv_bytes() == m for m in lane_messages())
    conn.send(ok)
    conn.close()


def read_from_shared_fd(conn):
    """Receives a pickled `DupFd`, claims the descriptor, reads it to the end and reports what
    it read; then tries to claim it a second time and reports the error's type."""
    handle = conn.recv()
    fd = handle.detach()
    chunks = []
    while chunk := os.read(fd, 4096):
        chunks.append(chunk)
    os.close(fd)
    try:
        os.close(handle.detach())
        again = None
    except Exception as e:  # the type is the report
        again = type(e).__name__
    conn.send((b"".join(chunks), again))
    conn.close()


def claim_as_other_user(conn, handle):
    """Drops to uid 65534 and tries to claim `handle`; reports the error's type (or None)."""
    os.setgid(65534)
    os.setuid(65534)
    try:
        os.close(handle.detach())
        conn.send(None)
    except Exception as e:  # the type is the report
        conn.send(type(e).__name__)
    conn.close()
