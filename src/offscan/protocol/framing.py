"""The codec: one message to one frame (4-byte big-endian length + msgpack payload) and back.

:func:`pack` encodes (and enforces the frame size limit; :func:`encode` is its payload), :func:`unpack` decodes and
validates; :func:`validate` is re-exported from :mod:`.validation` as part of the codec's
interface. Pure functions on bytes: no sockets, no I/O.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import Any

import msgpack

from .errors import ProtocolError
from .messages import MAX_FRAME
from .validation import validate

__all__ = ["HEADER", "encode", "pack", "unpack", "validate"]

HEADER = struct.Struct(">I")


def encode(msg: Mapping[str, Any]) -> bytes:
    """One message's msgpack payload (what :func:`pack` frames), not validated."""
    try:
        return msgpack.packb(msg, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ProtocolError("malformed", f"cannot encode message: {exc}") from None


def pack(msg: Mapping[str, Any], *, max_frame: int = MAX_FRAME) -> bytes:
    """Encode one message as a frame: 4-byte big-endian length + msgpack payload."""
    payload = encode(msg)
    if len(payload) > max_frame:
        raise ProtocolError(
            "oversized", f"{msg.get('t', '?')} frame of {len(payload)} bytes exceeds {max_frame}"
        )
    return HEADER.pack(len(payload)) + payload


def unpack(payload: bytes) -> dict[str, Any]:
    """Decode one frame's payload (without its header) and :func:`validate` it."""
    try:
        msg = msgpack.unpackb(
            payload,
            raw=False,
            strict_map_key=True,
            max_array_len=1 << 16,
            max_map_len=1 << 16,
        )
    except Exception as exc:  # msgpack raises a zoo of ValueError, TypeError and its own types
        raise ProtocolError("malformed", f"payload is not valid msgpack: {exc}") from None
    return validate(msg)
