"""Module-level child targets for the connection tests (spawn/forkserver children import them)."""

from __future__ import annotations

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
