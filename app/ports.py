"""Is the serving port free? Checked before anything heavy is imported or loaded, so a busy port fails at once."""

from __future__ import annotations

import errno
import socket


class PortInUseError(OSError):
    """The port asked for is taken; the message names ``--port``."""


def port_in_use_message(port: int) -> str:
    """``port 7860 is in use; pass --port N``."""
    return f"port {port} is in use; pass --port N"


def check_port_free(host: str, port: int) -> None:
    """Raise :class:`PortInUseError` when something listens on ``host:port`` already (port 0: any free port).

    Binds a throw-away socket with ``SO_REUSEADDR`` (as the server will), so only a live listener counts,
    not connections lingering in TIME_WAIT. An unresolvable host is left for the server to report.

    Raises:
        ValueError: a port outside 0..65535.
    """
    if not 0 <= int(port) <= 65535:
        raise ValueError(f"port must be in 0..65535, got {port}")
    if int(port) == 0:
        return
    try:
        infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror:
        return
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    raise PortInUseError(port_in_use_message(int(port))) from None
                if e.errno != errno.EADDRNOTAVAIL:  # e.g. no IPv6 on this machine: try the next address
                    raise
