"""Small helpers of image scanning: member-name normalisation and printable output.

Pure functions on strings and ``tarfile`` headers; no I/O.
"""

from __future__ import annotations

import tarfile


def normalise(name: str) -> tuple[str | None, str | None]:
    """A member name as an absolute path inside the image, and a warning when the name tried to
    leave it (``../x``, ``/etc/x``): such names are resolved lexically and clamped at the image
    root, as container runtimes do. Nothing is ever written, so no name can reach the host."""
    parts: list[str] = []
    escaped = name.startswith("/")
    for part in name.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if parts:
                parts.pop()
            else:
                escaped = True
            continue
        parts.append(part)
    path = "/" + "/".join(parts) if parts else None
    warning = None
    if escaped:
        warning = (
            f"member name {name!r} points outside the image; scanned as "
            f"{path or '/'!r} (nothing is extracted)"
        )
    return path, warning


def printable(text: str) -> str:
    """A path safe to print: undecodable bytes and control characters escaped, so a file name
    cannot forge output lines."""
    raw = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in raw)


def tar_kind(ti: tarfile.TarInfo) -> str:
    if ti.ischr():
        return "character device"
    if ti.isblk():
        return "block device"
    if ti.isfifo():
        return "FIFO"
    return f"tar type {ti.type!r}"


def os_reason(exc: OSError) -> str:
    return exc.strerror or str(exc)
