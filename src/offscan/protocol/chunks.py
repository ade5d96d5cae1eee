"""The content of a ``stream`` scan, read as ``chunk`` frames' data: from memory, or from a
file object (in a worker thread unless it is in memory). Touches only the object it is given.
"""

from __future__ import annotations

import asyncio
import io
import os
from collections.abc import Awaitable, Callable
from typing import Any

from .messages import MAX_CHUNK

__all__ = ["STREAM_PREFETCH", "chunk_reader"]

STREAM_PREFETCH = MAX_CHUNK  # bytes read ahead from a file object when streaming


def _remaining(fileobj: Any) -> int:
    """Bytes left to read in a seekable binary file object."""
    if isinstance(fileobj, io.BytesIO):
        return fileobj.getbuffer().nbytes - fileobj.tell()
    try:
        return os.fstat(fileobj.fileno()).st_size - fileobj.tell()
    except (AttributeError, OSError, io.UnsupportedOperation):
        pass
    try:
        here = fileobj.tell()
        end = fileobj.seek(0, io.SEEK_END)
        fileobj.seek(here)
        return int(end - here)
    except (AttributeError, OSError, io.UnsupportedOperation):
        raise ValueError("cannot tell the size of this stream; pass size=") from None


def chunk_reader(
    content: bytes | bytearray | memoryview | io.IOBase | Any, size: int | None
) -> tuple[int, Callable[[], Awaitable[bytes]]]:
    """The content's size (at most ``size``) and a function that reads its next chunk, at
    most :data:`MAX_CHUNK` bytes, ``b""`` at the end. A file object is read from its current
    position, in a worker thread unless it is in memory."""
    if isinstance(content, (bytes, bytearray, memoryview)):
        data = memoryview(content).cast("B")
        if size is not None:
            data = data[:size]
        pieces = (bytes(data[i : i + MAX_CHUNK]) for i in range(0, len(data), MAX_CHUNK))

        async def read_memory() -> bytes:
            return next(pieces, b"")

        return len(data), read_memory

    fileobj = content
    if size is None:
        size = _remaining(fileobj)
    left = size
    in_memory = isinstance(fileobj, io.BytesIO)

    async def read_file() -> bytes:
        nonlocal left
        want = min(MAX_CHUNK, left)
        if want <= 0:
            return b""
        if in_memory:
            piece = bytes(fileobj.read(want))
        else:
            piece = bytes(await asyncio.to_thread(fileobj.read, want))
        left -= len(piece)
        return piece

    return size, read_file
