"""Ports on this machine's loopback interface, and what an address may hold."""

from __future__ import annotations

import re
import socket

LOOPBACK = "127.0.0.1"
ENDPOINT_FORM = "http(s)://host[:port] or host:port"
_HOST = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?(\.[A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?)*\.?"
                   r"|\[[0-9A-Fa-f:.]+\]", re.ASCII)


def control_character(text: str) -> str | None:
    """The first control character (NUL, newline, DEL, ...) in `text`, as `repr` writes it, or None: no path, URI
    or endpoint holds one, and a NUL ends a C string early (open() raises ValueError on it)."""
    for char in text:
        if ord(char) < 32 or ord(char) == 127:
            return repr(char)
    return None


def parse_endpoint(endpoint: str) -> tuple[str, bool]:
    """(host[:port], use TLS) of an S3 endpoint `http(s)://host[:port][/]` or `host:port` (TLS); raises ValueError
    saying what is wrong: a host of DNS name characters or a bracketed IPv6 address, a port of 1-65535, no path."""
    if not isinstance(endpoint, str) or not endpoint:
        raise ValueError(f"{endpoint!r} is not {ENDPOINT_FORM}")
    if (bad := control_character(endpoint)) is not None:
        raise ValueError(f"{endpoint!r} holds the control character {bad}; write {ENDPOINT_FORM}")
    scheme, sep, rest = endpoint.partition("://")
    if not sep:
        scheme, rest = "https", endpoint
    address = rest[:-1] if rest.endswith("/") else rest
    if scheme not in ("http", "https") or not address or "/" in address:
        raise ValueError(f"{endpoint!r} is not {ENDPOINT_FORM}")
    host, port = address, None
    if address.startswith("["):
        host, _, after = address.partition("]")
        host += "]"
        if after:
            if not after.startswith(":"):
                raise ValueError(f"{endpoint!r} is not {ENDPOINT_FORM}")
            port = after[1:]
    elif ":" in address:
        host, _, port = address.rpartition(":")
    if not _HOST.fullmatch(host):
        raise ValueError(f"{endpoint!r}: the host {host!r} has characters a host name cannot hold; write "
                         f"{ENDPOINT_FORM}")
    if port is not None and (not port.isascii() or not port.isdigit() or not 1 <= int(port) <= 65535):
        raise ValueError(f"{endpoint!r}: the port {port!r} is not a number from 1 to 65535; write {ENDPOINT_FORM}")
    return address, scheme == "https"


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
