"""Clone activation in one step: a clone's inherited verdicts recorded and reported at once.

When a shim registers a clone, the appliance lists the clone's root itself (``lstat`` only, in
a thread: no file is opened, no symlink followed) and, for every regular file whose identity
is one the appliance recorded while copying it from the master (:mod:`offscan.clones`) and
whose master content has a clean verdict under the current pattern version, records that
verdict (source ``clone``) with one event-log group commit for the whole clone, and reports
the files in the ``register`` reply (``inherited``: ``[path, ino, size, mtime_ns,
ctime_ns]`` each). The shim's activation walk then skips exactly those files whose identity it
finds unchanged: one message per clone instead of one scan per file. A file written since the
copy has a new identity, is not listed (or does not match), and is scanned as usual.
"""

from __future__ import annotations

import asyncio
import os
import stat
from typing import TYPE_CHECKING, Any

from ..cache import Identity
from .fastpath import VerdictCodec

if TYPE_CHECKING:
    from .facade import Appliance
    from .inventory import VMRecord

MAX_INHERITED_LISTED = 50_000  # files one register reply lists (a frame holds ~4 MiB)
# One codec for every activation (on the event loop only): clones of one master share their
# contents, so a content's encoded verdict is made once for all of them, not once per clone.
_CODEC = VerdictCodec()


def _list_tree(root: str, limit: int) -> list[tuple[str, os.stat_result]] | None:
    """(relative path, lstat) of every regular file under ``root``, symlinks not followed;
    None if there are more than ``limit`` (the shim then walks and asks per file)."""
    out: list[tuple[str, os.stat_result]] = []
    stack = [""]
    while stack:
        rel = stack.pop()
        try:
            it = os.scandir(os.path.join(root, rel) if rel else root)
        except OSError:
            continue
        with it:
            for de in it:
                child = f"{rel}/{de.name}" if rel else de.name
                try:
                    st = de.stat(follow_symlinks=False)
                except OSError:
                    continue
                if stat.S_ISDIR(st.st_mode):
                    stack.append(child)
                elif stat.S_ISREG(st.st_mode):
                    out.append((child, st))
                    if len(out) > limit:
                        return None
    return out


async def activate_clone(app: Appliance, rec: VMRecord) -> dict[str, Any]:
    """Record the inherited verdicts of clone ``rec`` and return the ``register`` reply's
    ``inherited`` listing ({} when nothing is inherited)."""
    pipeline = app.pipeline
    if rec.clone_of is None or len(pipeline.inherited) == 0:
        return {}
    listing = await asyncio.get_running_loop().run_in_executor(
        app.pool, _list_tree, rec.root, MAX_INHERITED_LISTED
    )
    if not listing:
        return {}
    version = pipeline.engine.version
    codec = _CODEC
    line = codec.lines(app.clock.time(), 0.0)
    listed: list[list[Any]] = []
    lines: list[str] = []
    for relpath, st in listing:
        ident = Identity.from_stat("local", st)
        digest = pipeline.inherited.get(ident)
        cached = None if digest is None else pipeline.cache.get(digest, st.st_size, version)
        if cached is None or cached.status != "clean":
            continue  # the shim's walk sends it: matched, or acted on, the usual way
        pipeline.locations.add(digest, rec.name, relpath, ident)  # type: ignore[arg-type]
        lines.append(line(rec.name, relpath, codec.tail(cached, "clone")))
        listed.append([relpath, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns])
    app.events.write_lines(lines)
    app.events.flush()  # logged before the reply reports them
    app.counters.served_clone += len(listed)
    app.counters.verdicts += len(listed)
    return {"inherited": listed} if listed else {}
