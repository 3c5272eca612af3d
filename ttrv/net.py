"""Ports on this machine's loopback interface, and what an address may hold."""

from __future__ import annotations

import socket

LOOPBACK = "127.0.0.1"


def free_ports(count: int) -> list[int]:
    """`count` distinct ports free on 127.0.0.1 now (held open together while drawn, so none is drawn twice). Free
    now is all it promises: another process may take a port before its user binds it."""
    sockets = []
    try:
        for _ in range(count):
            sockets.append(socket.socket())
            sockets[-1].bind((LOOPBACK, 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def free_port() -> int:
    """A port free on 127.0.0.1 now."""
    return free_ports(1)[0]


def holds_userinfo(address: str) -> bool:
    """Whether `address` (an endpoint `scheme://host[:port]` or `host:port`, or the bucket of an s3:// URI) carries
    `user[:password]@`. Everything after the scheme counts, not only the authority: an AWS secret key may hold a '/',
    which would end the authority early and leave the rest of the secret in what looks like a path."""
    return "@" in address.split("://", 1)[-1]
