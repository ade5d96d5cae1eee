"""The pattern database the appliance runs, and how it changes under load.

:class:`Engine` is the unit of an atomic swap (a compiled matcher and its version);
:class:`Patterns` holds the current one, compiles and swaps in new databases (from the signed
pattern store and update server, or by re-reading the ``-d`` databases), and after a swap brings
the verdict cache up to date by matching cached contents against the added signatures only
(:class:`Revalidation`), reading one known copy of each through the pipeline. It reads
``/proc/self/status`` for memory figures; the pattern store writes its own files.
"""

from __future__ import annotations

import asyncio
import functools
import os
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..cache import CachedVerdict, Identity
from ..confine import open_confined
from ..engine import Matcher
from ..signatures import PatternDB, load_database
from .common import log
from .config import ApplianceConfig
from .inventory import Inventory
from .pipeline import PRIORITIES

if TYPE_CHECKING:
    from ..protocol.messages import PatternSwap
    from ..updates import AppliedUpdate, PatternStore, UpdateClient
    from .pipeline import Pipeline

Spawn = Callable[[Coroutine[Any, Any, None]], None]


@dataclass(frozen=True)
class Revalidation:
    """How cached verdicts of the previous pattern version become current without a full
    rescan: clean ones are matched against the added signatures only (``delta``; None when the
    update only removed signatures), those naming a removed signature are rescanned."""

    old_version: str
    delta: Matcher | None
    removed: frozenset[str]


@dataclass(frozen=True)
class Engine:
    """The unit of an atomic pattern swap: a request takes one Engine and keeps it to the end."""

    matcher: Matcher
    version: str
    db: PatternDB
    revalidation: Revalidation | None = None


def open_pattern_source(config: ApplianceConfig) -> tuple[PatternStore | None, UpdateClient | None]:
    """The signed pattern store (with ``trust``) and its update client (with ``updates``)."""
    state = config.state_path
    if not config.trust or state is None:  # ApplianceConfig refuses trust without state
        return None, None
    from ..updates import PatternStore, UpdateClient

    store = PatternStore(state / "patterns", config.trust)
    client = UpdateClient(config.updates, store) if config.updates else None
    return store, client


def initial_engine(config: ApplianceConfig, store: PatternStore | None) -> Engine:
    """The store's current version if it has one, else the ``-d`` databases, compiled."""
    if store is not None and store.current_version is not None:
        db = store.load()
        version = str(store.current_version)
    else:
        db = load_database(*config.databases)
        version = db.version
    return Engine(Matcher(db, impl=config.impl), version, db)


def _rss_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _signature_names(filename: str, lines: Sequence[str]) -> list[str]:
    """Signature names in database lines (.ndb: first field; .hdb/.hsb: third)."""
    field_ = 0 if filename.endswith(".ndb") else 2
    out = []
    for line in lines:
        parts = line.split(":")
        if len(parts) > field_:
            out.append(parts[field_])
    return out


class Patterns:
    """The current :class:`Engine`, its swaps, the update loop and post-swap revalidation."""

    def __init__(
        self,
        engine: Engine,
        *,
        pipeline: Pipeline,
        inventory: Inventory,
        spawn: Spawn,
        impl: str = "auto",
        databases: Sequence[str] = (),
        store: PatternStore | None = None,
        update_client: UpdateClient | None = None,
        poll: float = 60.0,
    ) -> None:
        self.engine = engine
        self.pipeline = pipeline
        self.inventory = inventory
        self.spawn = spawn
        self.impl = impl
        self.databases = tuple(databases)
        self.store = store
        self.update_client = update_client
        self.poll = poll
        self.update_error: str | None = None
        self.last_swap: PatternSwap | None = None  # status.last_swap

    # -- swapping -------------------------------------------------------------------------

    async def swap(
        self,
        db: PatternDB,
        version: str,
        *,
        added: PatternDB | None = None,
        removed: Sequence[str] = (),
    ) -> PatternSwap:
        """Compile ``db`` in the background, then switch atomically: running scans finish on
        the old matcher, new ones use the new one. ``added`` (a PatternDB of the added
        signatures) and ``removed`` (signature names) drive revalidation of cached verdicts."""
        loop = asyncio.get_running_loop()
        clock = self.pipeline.clock
        rss0 = _rss_bytes()
        t = clock.monotonic()
        matcher = await loop.run_in_executor(None, lambda: Matcher(db, impl=self.impl))
        delta = None
        if added is not None and (added.body or added.hashes):
            delta = await loop.run_in_executor(None, lambda: Matcher(added, impl=self.impl))
        old = self.engine
        # "*": unknown lineage (a full reload): no shortcut, every content is matched again
        rv = None if "*" in removed else Revalidation(old.version, delta, frozenset(removed))
        self.engine = Engine(matcher, version, db, rv)
        self.pipeline.counters.swaps += 1
        swap: PatternSwap = {
            "from": old.version,
            "to": version,
            "time": clock.time(),
            "compile_seconds": round(clock.monotonic() - t, 3),
            "rss_before": rss0,
            "rss_peak_during": _rss_bytes(),
            "added": (len(added.body) + len(added.hashes)) if added is not None else None,
            "removed": len(removed),
        }
        self.last_swap = swap
        log.info(
            "patterns swapped %s -> %s (%s); compile %.2f s, RSS %d -> %d MB",
            old.version,
            version,
            db.summary(),
            swap["compile_seconds"],
            rss0 >> 20,
            swap["rss_peak_during"] >> 20,
        )
        if rv is not None:
            self.spawn(self.revalidate_cached(self.engine))
        return swap

    async def check_updates(self) -> list[AppliedUpdate]:
        """Fetch and apply what the update server has beyond our version, then swap."""
        from ..updates import UpdateError

        client, store = self.update_client, self.store
        if client is None or store is None:
            return []
        try:
            applied = await asyncio.get_running_loop().run_in_executor(None, client.update)
        except (UpdateError, OSError) as exc:
            self.update_error = str(exc)
            log.error(
                "pattern update failed, version %s keeps serving: %s", self.engine.version, exc
            )
            applied = list(client.last_applied or [])
        else:
            self.update_error = None
        if not applied:
            return []
        last = applied[-1]
        db = last.database or store.load()
        added, removed = self._changes(applied)
        await self.swap(db, str(last.version), added=added, removed=removed)
        return applied

    def _changes(self, applied: Sequence[AppliedUpdate]) -> tuple[PatternDB | None, list[str]]:
        """The signatures ``applied`` added and removed relative to the running version; an
        unknown lineage removes "*" (match everything again)."""
        if applied[0].parent is None or str(applied[0].parent) != self.engine.version:
            return None, ["*"]
        merged: dict[str, list[str]] = {}
        removed: list[str] = []
        for a in applied:
            for name, lines in a.added.items():
                merged.setdefault(name, []).extend(lines)
            for name, lines in a.removed.items():
                removed.extend(_signature_names(name, lines))
        added = PatternDB.from_text((n, "\n".join(ls)) for n, ls in sorted(merged.items()) if ls)
        return added, removed

    async def update_loop(self) -> None:
        while True:
            try:
                await self.check_updates()
            except Exception:  # keep polling; the running patterns stay
                log.exception("pattern update check failed")
            await asyncio.sleep(self.poll)

    async def reload(self) -> dict[str, Any]:
        """The ``reload`` command: poll the update server now, or re-read the -d databases."""
        if self.update_client is not None:
            applied = await self.check_updates()
            return {
                "pattern_version": self.engine.version,
                "applied": [a.version for a in applied],
                "error": self.update_error,
            }
        db = await asyncio.get_running_loop().run_in_executor(None, load_database, *self.databases)
        if db.version == self.engine.version:
            return {"pattern_version": self.engine.version, "changed": False}
        await self.swap(db, db.version, removed=["*"])
        return {"pattern_version": self.engine.version, "changed": True}

    # -- revalidation after a swap --------------------------------------------------------

    async def revalidate_cached(self, eng: Engine) -> None:
        """After a swap: bring cached verdicts of the previous version up to date, hottest
        first, reading one known copy of each content; an infected result is reported for
        every VM holding that content."""
        rv = eng.revalidation
        assert rv is not None
        pipe = self.pipeline
        done = 0
        t0 = pipe.clock.monotonic()
        for entry in list(pipe.cache.entries()):
            if self.engine is not eng:
                return  # superseded by a newer swap
            if entry.pattern_version != rv.old_version:
                continue
            if pipe.cache.get(entry.digest, entry.size, eng.version) is not None:
                continue
            new = await self._revalidate_one_copy(eng, entry)
            if new is None and rv.delta is None and entry.status == "clean":
                new = CachedVerdict(
                    "clean", (), eng.version, entry.digest, entry.size, pipe.clock.time()
                )
                pipe.cache.put(new)  # removals alone cannot make clean content infected
                pipe.counters.revalidations += 1
            done += 1
            if new is not None and new.infected:
                await self._report_copies(new)
        log.info(
            "revalidated %d cached verdict(s) for pattern version %s in %.2f s",
            done,
            eng.version,
            pipe.clock.monotonic() - t0,
        )

    async def _revalidate_one_copy(self, eng: Engine, entry: CachedVerdict) -> CachedVerdict | None:
        """Revalidate ``entry`` by reading the first known copy that can be opened unchanged
        since it was seen (admitted as on-demand work); None if there is none, or if the copy
        must be matched in full."""
        pipe = self.pipeline
        loop = asyncio.get_running_loop()
        for vm_name, path, ident in pipe.locations.get(entry.digest):
            vm = self.inventory.vms.get(vm_name)
            if vm is None:
                continue
            try:
                fd = await loop.run_in_executor(
                    pipe.pool, functools.partial(open_confined, vm.root, path, strict_root=True)
                )
            except OSError:
                continue
            try:
                if Identity.from_stat("local", os.fstat(fd)) != ident:
                    continue  # changed since: its own next event rescans it
                async with pipe.gate.slot(PRIORITIES["demand"]):
                    return await pipe.revalidate(eng, entry.digest, entry.size, fd, ident)
            finally:
                os.close(fd)
        return None

    async def _report_copies(self, verdict: CachedVerdict) -> None:
        """A content became infected under new patterns: a verdict for every copy we know of."""
        pipe = self.pipeline
        for vm_name, path, ident in pipe.locations.get(verdict.digest):
            vm = self.inventory.vms.get(vm_name)
            if vm is None:
                continue
            try:
                st = os.stat(os.path.join(vm.root, path), follow_symlinks=False)
            except OSError:
                continue
            if Identity.from_stat("local", st) != ident:
                continue
            await pipe.verdicts.finish(
                vm,
                path,
                verdict,
                "revalidated",
                verdict.digest,
                pipe.clock.monotonic(),
                version=verdict.pattern_version,
                ino=st.st_ino,
            )
