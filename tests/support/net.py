"""Loopback addresses for in-process clusters (tests may only talk to 127.0.0.1)."""

from __future__ import annotations

import socket


def free_addrs(n: int = 1) -> list[str]:
    """``n`` distinct ``"127.0.0.1:PORT"`` addresses whose ports were free a moment ago (bound to port 0 at
    once, then released: the kernel does not hand the same port to two sockets bound together)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [f"127.0.0.1:{s.getsockname()[1]}" for s in socks]
    finally:
        for s in socks:
            s.close()


def free_addr() -> str:
    """One free ``"127.0.0.1:PORT"`` address (see :func:`free_addrs`)."""
    return free_addrs(1)[0]
