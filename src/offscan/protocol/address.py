"""Appliance addresses: the one string syntax for a unix socket path or a TCP endpoint.

Parsing only (no sockets are opened here): :func:`parse_address` is used by
:func:`~offscan.protocol.connection.connect` and by the shim to choose its content mode.
"""

from __future__ import annotations

from typing import Literal

__all__ = ["ADMIN_SUFFIX", "Address", "admin_socket_for", "parse_address"]

ADMIN_SUFFIX = ".admin"  # an appliance's admin socket is, by default, its socket's path + this

Address = tuple[Literal["unix"], str] | tuple[Literal["tcp"], tuple[str, int]]


def parse_address(address: str) -> Address:
    """``"unix:/p"`` or anything with a ``/`` → ``("unix", path)``; ``"host:port"``,
    ``"tcp:host:port"`` or ``"[v6]:port"`` → ``("tcp", (host, port))``."""
    if address.startswith("unix:"):
        path = address[5:]
        if not path:
            raise ValueError(f"empty unix socket path in {address!r}")
        return "unix", path
    if "/" in address:
        return "unix", address
    rest = address.removeprefix("tcp:")
    host, sep, port_text = rest.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"address {address!r} is neither a socket path nor HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return "tcp", (host or "localhost", int(port_text))


def admin_socket_for(address: str) -> str:
    """The default admin socket of the appliance at ``address``: its unix socket's path plus
    :data:`ADMIN_SUFFIX` (unchanged if it already is one). A TCP address has no admin socket
    and is returned as it is: there, ``status`` shows the counters only and operator
    commands are refused."""
    kind, target = parse_address(address)
    if kind != "unix" or not isinstance(target, str):
        return address
    return target if target.endswith(ADMIN_SUFFIX) else target + ADMIN_SUFFIX
