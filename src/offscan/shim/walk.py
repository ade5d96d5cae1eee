"""Directory walks of a VM root: the activation scan, moved-in directories and re-walks.

Plain functions meant for the shim's walker threads: they list directories under a VM root
(``os.scandir``, never following symlinks, never opening a file) and queue what they find in
the :class:`~offscan.shim.backlog.Backlog`; files that are not scanned are reported to
:class:`~offscan.shim.watch.Skips`. Scheduling the walks (pools, futures) is the shim's job.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from .backlog import Backlog, Prio
from .watch import _VM, Skips, _skip_reason

log = logging.getLogger("offscan.shim")


def walk_head(backlog: Backlog, vm: _VM, limit: int) -> int:
    """Queue up to ``limit`` files near the top of the VM root without waiting for room
    (not for a clone whose registration already brought its verdicts: ``vm.inherited``)."""
    if vm.inherited:
        return 0
    queued, queue = 0, [""]
    while queue and queued < limit:
        rel = queue.pop(0)
        try:
            with os.scandir(os.path.join(vm.root, rel) if rel else vm.root) as it:
                for de in it:
                    child = f"{rel}/{de.name}" if rel else de.name
                    if de.is_dir(follow_symlinks=False):
                        queue.append(child)
                    elif de.is_file(follow_symlinks=False) and queued < limit:
                        queued += backlog.record_head(vm.name, child)
        except OSError:
            continue  # the full walk reports what it cannot list
    return queued


def inherited_listing(reply: object) -> dict[str, tuple[int, int, int, int]] | None:
    """The ``inherited`` files of a ``register`` reply (docs/protocol.md), None without."""
    items = reply.get("inherited") if isinstance(reply, dict) else None
    if not isinstance(items, list):
        return None
    out: dict[str, tuple[int, int, int, int]] = {}
    for item in items:
        if (
            isinstance(item, list)
            and len(item) == 5
            and isinstance(item[0], str)
            and all(type(v) is int for v in item[1:])
        ):
            out[item[0]] = (item[1], item[2], item[3], item[4])
    return out


def walk_tree(
    backlog: Backlog,
    skips: Skips,
    vm: _VM,
    start: str,
    prio: Prio,
    cancelled: Callable[[], bool],
    inherited: Callable[[list[str]], None] | None = None,
) -> int:
    """Queue every regular file under ``root/start`` (no symlink following); runs in a thread.

    On a clone's activation walk (``start`` is the root), a file the appliance reported as
    verdicted by inheritance (``vm.inherited``) whose ``lstat`` identity is still the one it
    reported is not queued: ``inherited(relpaths)`` reports their verdicts instead, once per
    directory (one hand-off to the event loop for a directory's files, not one per file)."""
    queued = 0
    listed = None
    if start == "":  # the activation walk uses the listing once; later walks send every file
        listed, vm.inherited = (vm.inherited if inherited is not None else None), None
    stack = [start]
    while stack:
        if cancelled():
            return queued
        rel = stack.pop()
        path = os.path.join(vm.root, rel) if rel else vm.root
        try:
            it = os.scandir(path)
        except FileNotFoundError:
            continue  # gone since its event / since its parent was listed
        except NotADirectoryError:
            if rel == start and start:  # a directory event whose path is now a file
                queued += backlog.record_walk(vm.name, rel, prio=prio, cancelled=cancelled)
            continue
        except OSError as exc:
            log.warning("VM %s: cannot list %s: %s", vm.name, rel or "/", exc.strerror or exc)
            continue
        found: list[str] = []  # this directory's inherited files, reported together
        with it:
            for de in it:
                child = f"{rel}/{de.name}" if rel else de.name
                try:
                    if de.is_dir(follow_symlinks=False):
                        stack.append(child)
                        continue
                    if de.is_file(follow_symlinks=False):
                        if listed and _unchanged(listed.get(child), de):
                            found.append(child)
                            continue
                        if not backlog.record_walk(vm.name, child, prio=prio, cancelled=cancelled):
                            return queued
                        queued += 1
                        continue
                    reason = _skip_reason(de.stat(follow_symlinks=False).st_mode)
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    reason = f"unreadable: {exc.strerror or exc}"
                skips.note(vm.name, child, reason or "special file")
        if found:
            assert inherited is not None
            inherited(found)
    log.debug("VM %s: walk of %s queued %d file(s)", vm.name, start or "/", queued)
    return queued


def _unchanged(known: tuple[int, int, int, int] | None, de: os.DirEntry[str]) -> bool:
    """Whether the file still has the identity the appliance reported."""
    if known is None:
        return False
    try:
        st = de.stat(follow_symlinks=False)
    except OSError:
        return False
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns) == known
