"""The protocol's exceptions: a broken frame, a lost connection, an ``error`` reply.

Raised by every other module of the package and caught by its users (the appliance, the
shim, the CLI). Only the error codes come from :mod:`.messages`; nothing else is touched.
(offscan has no root exception class yet; these derive from ``Exception`` and
``ConnectionError`` as they always have.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .messages import ErrorCode

__all__ = ["ConnectionClosed", "ProtocolError", "RequestError"]


class ProtocolError(Exception):
    """A peer broke the protocol (or a message we were about to send would).

    ``code`` is one of :data:`ERROR_CODES` (``malformed``, ``oversized``, ``sequence``...),
    ready to put in a fatal ``error`` frame; ``str(e)`` is the human-readable reason.
    """

    def __init__(self, code: ErrorCode, message: str = "") -> None:
        super().__init__(message or code)
        self.code: ErrorCode = code


class ConnectionClosed(ConnectionError):
    """The connection is gone: closed by either side, reset, or declared dead by heartbeat.

    ``code`` is set when the peer said why in a fatal ``error`` frame (e.g. ``auth``).
    """

    def __init__(self, message: str = "connection closed", *, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


class RequestError(Exception):
    """The appliance answered a request with an ``error`` frame (``code``, ``str(e)``).

    ``code`` is any string the appliance sent (normally an ``ErrorCode``); ``reply`` is the
    whole ``error`` frame (an :class:`~offscan.protocol.messages.ErrorMessage`).
    """

    def __init__(
        self, code: str, message: str = "", *, reply: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message or code)
        self.code = code
        self.reply = reply
