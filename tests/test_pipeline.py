"""The scan pipeline and pattern revalidation in process: no sockets, no subprocess.

A real VerdictCache (persisted in tmp_path), real IdentityMemo and real Matchers built from small
databases, driven through :class:`offscan.appliance.Pipeline` with a fake clock. The matchers
count the files they read, so "served from cache" and "matched once" are observed, not assumed.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from conftest import EICAR, make_db

from offscan import Matcher, PatternDB, ScanResult
from offscan.appliance import (
    Actions,
    Counters,
    Engine,
    EventLog,
    Inventory,
    Patterns,
    Pipeline,
    PriorityGate,
    Registry,
    Revalidation,
    Verdicts,
)
from offscan.cache import CachedVerdict, IdentityMemo, VerdictCache, digest_bytes

SHIM, VM = "shim-1", "vm1"
EICAR_SIG = f"Eicar-Test-Signature:0:*:{EICAR.hex()}"
OLD_SIG = f"Old.Sig:0:*:{b'OLD-MALWARE-MARKER'.hex()}"
NEW_MARKER = b"NEW-MALWARE-MARKER"
NEW_SIG = f"New.Sig:0:*:{NEW_MARKER.hex()}"


class FakeClock:
    """Time that moves only when a test says so."""

    def __init__(self) -> None:
        self.now = 1_700_000_000.0
        self.mono = 500.0

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.mono


class CountingMatcher(Matcher):
    """A real Matcher that records the inode of every file it is asked to read."""

    def __init__(self, db: PatternDB) -> None:
        super().__init__(db, impl="auto")
        self.read_inodes: list[int] = []

    def scan_fd(self, fd: int, **kwargs: Any) -> ScanResult:
        self.read_inodes.append(os.fstat(fd).st_ino)
        return super().scan_fd(fd, **kwargs)


class TouchingMatcher(CountingMatcher):
    """Changes the file's mtime just before reading it: a write racing the scan."""

    def scan_fd(self, fd: int, **kwargs: Any) -> ScanResult:
        st = os.fstat(fd)
        os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
        return super().scan_fd(fd, **kwargs)


class Rig:
    """A pipeline over one VM rooted at ``base/vm``, with every collaborator at hand.
    ``patterns.engine`` is what the pipeline runs; a test swaps it by assigning it or through
    :meth:`Patterns.swap`, whose background revalidation lands in ``spawned`` (run it by
    awaiting it)."""

    patterns: Patterns

    def __init__(self, base: Path, matcher: Matcher, version: str = "v1") -> None:
        self.clock = FakeClock()
        self.root = base / "vm"
        self.root.mkdir(parents=True, exist_ok=True)
        self.cache = VerdictCache(1000, state_dir=base / "cache")
        self.memo = IdentityMemo()
        self.counters = Counters()
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="test-scan")
        self.stream_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="test-stream")
        self.registry = Registry(Inventory(None))
        actions = Actions(self.registry, self.counters, pool=self.pool)
        self.events_path = base / "events.jsonl"
        self.events = EventLog(self.events_path)
        self.verdicts = Verdicts(self.events, self.counters, actions, self.clock)
        self.pipeline = Pipeline(
            lambda: self.patterns.engine,
            cache=self.cache,
            memo=self.memo,
            registry=self.registry,
            verdicts=self.verdicts,
            gate=PriorityGate(2),
            pool=self.pool,
            stream_pool=self.stream_pool,
            counters=self.counters,
            clock=self.clock,
        )
        self.spawned: list[Coroutine[Any, Any, None]] = []
        self.patterns = Patterns(
            Engine(matcher, version, matcher.db),
            pipeline=self.pipeline,
            inventory=self.registry.inventory,
            spawn=self.spawned.append,
        )
        self.registry.register(SHIM, VM, str(self.root), {}, None)
        self._closed = False

    def write(self, name: str, data: bytes) -> Path:
        path = self.root / name
        path.write_bytes(data)
        return path

    async def scan(self, name: str) -> dict[str, Any]:
        msg = {"vm": VM, "path": name, "mode": "path", "prio": "access"}
        return await self.pipeline.scan_request(SHIM, msg, [])

    def cached(self, name: str, version: str) -> CachedVerdict | None:
        data = (self.root / name).read_bytes()
        return self.cache.get(digest_bytes(data), len(data), version)

    def logged(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.events_path.read_text().splitlines()]

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.pool.shutdown(wait=True)
        self.stream_pool.shutdown(wait=True)
        self.cache.close()
        self.events.close()


@pytest.fixture
def rigs(tmp_path: Path) -> Iterator[list[Rig]]:
    made: list[Rig] = []
    yield made
    for rig in made:
        rig.close()


def test_same_content_in_n_files_is_matched_exactly_once(tmp_path: Path, rigs: list[Rig]) -> None:
    matcher = CountingMatcher(make_db(EICAR_SIG))
    rig = Rig(tmp_path, matcher)
    rigs.append(rig)
    shared = os.urandom(20_000)
    names = [f"copy{i}.bin" for i in range(12)]
    for name in names:
        rig.write(name, shared)
    rig.write("other.bin", os.urandom(20_000))

    async def run() -> list[dict[str, Any]]:
        return await asyncio.gather(*(rig.scan(n) for n in [*names, "other.bin"]))

    verdicts = asyncio.run(run())
    assert [v["status"] for v in verdicts] == ["clean"] * 13
    assert len(matcher.read_inodes) == 2  # the shared content once, the other content once
    assert rig.counters.contents_matched == 2
    assert len({v["digest"] for v in verdicts[:12]}) == 1
    c = rig.counters
    # every other copy was served from the cache or joined the one match in flight
    assert c.served_digest + c.served_identity + c.joined_in_flight == 11
    # rescanning every copy reads nothing: the identity memo knows each file
    again = asyncio.run(run())
    assert {v["source"] for v in again} == {"identity"}
    assert len(matcher.read_inodes) == 2


def test_cached_verdict_is_served_without_matching(tmp_path: Path, rigs: list[Rig]) -> None:
    matcher = CountingMatcher(make_db(EICAR_SIG))
    rig = Rig(tmp_path, matcher)
    rigs.append(rig)
    data = b"harmless content, but the cache says otherwise " * 50
    rig.write("f.bin", data)
    digest = digest_bytes(data)
    # a verdict the matcher could never produce: only the cache can be the source of it
    rig.cache.put(CachedVerdict("infected", ("Cached.Only",), "v1", digest, len(data), 42.0))

    v = asyncio.run(rig.scan("f.bin"))
    assert matcher.read_inodes == []
    assert v["status"] == "infected" and v["matches"] == ["Cached.Only"]
    assert v["source"] == "digest" and v["digest"] == digest.hex()
    assert rig.counters.served_digest == 1 and rig.counters.contents_matched == 0

    # a verdict cached under another pattern version is not served: the content is matched
    other = b"other harmless content " * 50
    rig.write("g.bin", other)
    rig.cache.put(
        CachedVerdict("infected", ("Stale",), "v0", digest_bytes(other), len(other), 42.0)
    )
    w = asyncio.run(rig.scan("g.bin"))
    assert w["status"] == "clean" and w["source"] == "scan"
    assert len(matcher.read_inodes) == 1
    stored = rig.cached("g.bin", "v1")
    assert stored is not None and stored.status == "clean"
    assert stored.scanned_at == rig.clock.now  # the pipeline stamps with its clock


def test_cache_survives_a_new_pipeline_and_memo(tmp_path: Path, rigs: list[Rig]) -> None:
    first = CountingMatcher(make_db(EICAR_SIG))
    rig = Rig(tmp_path, first)
    rigs.append(rig)
    rig.write("a.bin", b"persisted verdict " * 100)
    assert asyncio.run(rig.scan("a.bin"))["source"] == "scan"
    rig.close()
    second = CountingMatcher(make_db(EICAR_SIG))
    again = Rig(tmp_path, second)  # same cache directory, empty memo
    rigs.append(again)
    v = asyncio.run(again.scan("a.bin"))
    assert v["source"] == "digest" and v["status"] == "clean"
    assert second.read_inodes == []


def test_eicar_is_infected_with_its_name(tmp_path: Path, rigs: list[Rig]) -> None:
    rig = Rig(tmp_path, CountingMatcher(make_db(EICAR_SIG)))
    rigs.append(rig)
    rig.write("eicar.com", EICAR)
    rig.write("clean.txt", b"nothing to see")

    async def run() -> tuple[dict[str, Any], dict[str, Any]]:
        return await rig.scan("eicar.com"), await rig.scan("clean.txt")

    infected, clean = asyncio.run(run())
    assert infected["status"] == "infected"
    assert infected["matches"] == ["Eicar-Test-Signature"]
    assert infected["action"] == "deny"  # the default policy
    assert infected["pattern_version"] == "v1"
    assert clean["status"] == "clean" and clean["matches"] == []
    assert rig.counters.detections == 1
    assert [d["path"] for d in rig.verdicts.detections] == ["eicar.com"]
    assert "virus_found" in rig.registry.vms[VM].tags
    assert "threat=low" in rig.registry.vms[VM].tags
    verdict_events = [e for e in rig.logged() if e["event"] == "verdict"]
    assert [e["path"] for e in verdict_events] == ["eicar.com", "clean.txt"]
    # stamped and timed on the pipeline's clock (which did not move)
    assert all(e["time"] == rig.clock.now and e["latency_ms"] == 0.0 for e in verdict_events)


def test_swap_revalidates_clean_verdicts_by_the_added_signatures_only(
    tmp_path: Path, rigs: list[Rig]
) -> None:
    rig = Rig(tmp_path, CountingMatcher(make_db(OLD_SIG)), version="v1")
    rigs.append(rig)
    rig.write("carrier.bin", b"prefix " + NEW_MARKER + b" suffix" * 100)
    rig.write("plain.bin", b"plain " * 200)

    async def both() -> tuple[dict[str, Any], dict[str, Any]]:
        return await asyncio.gather(rig.scan("carrier.bin"), rig.scan("plain.bin"))

    first = asyncio.run(both())
    assert [v["status"] for v in first] == ["clean", "clean"]

    full = CountingMatcher(make_db(OLD_SIG, NEW_SIG))
    delta = CountingMatcher(make_db(NEW_SIG))
    rig.patterns.engine = Engine(full, "v2", full.db, Revalidation("v1", delta, frozenset()))
    carrier, plain = asyncio.run(both())

    assert full.read_inodes == []  # nothing was matched against the whole new database
    assert len(delta.read_inodes) == 2
    assert carrier["status"] == "infected" and carrier["matches"] == ["New.Sig"]
    assert carrier["source"] == "revalidated" and carrier["pattern_version"] == "v2"
    assert plain["status"] == "clean" and plain["source"] == "revalidated"
    assert rig.counters.revalidations == 2
    assert rig.counters.contents_matched == 2  # the first two scans only
    # the revalidated verdicts are now cached under v2: served without any reading
    again = asyncio.run(rig.scan("plain.bin"))
    assert again["source"] == "identity" and len(delta.read_inodes) == 2


def test_cached_verdict_naming_a_removed_signature_is_rescanned(
    tmp_path: Path, rigs: list[Rig]
) -> None:
    rig = Rig(tmp_path, CountingMatcher(make_db(OLD_SIG)), version="v1")
    rigs.append(rig)
    rig.write("old.bin", b"xx OLD-MALWARE-MARKER yy")
    assert asyncio.run(rig.scan("old.bin"))["matches"] == ["Old.Sig"]
    full = CountingMatcher(make_db(NEW_SIG))  # Old.Sig was withdrawn
    delta = CountingMatcher(make_db(NEW_SIG))
    rig.patterns.engine = Engine(
        full, "v2", full.db, Revalidation("v1", delta, frozenset({"Old.Sig"}))
    )
    v = asyncio.run(rig.scan("old.bin"))
    assert v["status"] == "clean" and v["source"] == "scan"
    assert len(full.read_inodes) == 1 and delta.read_inodes == []
    assert rig.counters.revalidation_rescans == 1


def test_background_revalidation_after_a_swap_reports_the_new_detection(
    tmp_path: Path, rigs: list[Rig]
) -> None:
    rig = Rig(tmp_path, CountingMatcher(make_db(OLD_SIG)), version="v1")
    rigs.append(rig)
    patterns = rig.patterns
    rig.write("carrier.bin", b"head " + NEW_MARKER + b" tail")
    rig.write("plain.bin", b"plain " * 300)

    async def run() -> dict[str, Any]:
        for name in ("carrier.bin", "plain.bin"):
            assert (await rig.scan(name))["status"] == "clean"
        swap = await patterns.swap(make_db(OLD_SIG, NEW_SIG), "v2", added=make_db(NEW_SIG))
        assert len(rig.spawned) == 1
        await rig.spawned.pop()  # the revalidation the swap started, run to its end here
        return swap

    swap = asyncio.run(run())
    assert swap["from"] == "v1" and swap["to"] == "v2" and swap["added"] == 1
    assert patterns.engine.revalidation is not None
    assert patterns.engine.revalidation.delta is not None
    assert rig.counters.revalidations == 2
    assert rig.counters.contents_matched == 2  # no full rescan after the swap
    assert rig.counters.revalidation_bytes == sum(
        (rig.root / n).stat().st_size for n in ("carrier.bin", "plain.bin")
    )
    reported = [e for e in rig.logged() if e["event"] == "verdict" and e["source"] == "revalidated"]
    assert [(e["path"], e["matches"], e["pattern_version"]) for e in reported] == [
        ("carrier.bin", ["New.Sig"], "v2")
    ]
    for name, status in (("carrier.bin", "infected"), ("plain.bin", "clean")):
        cached = rig.cached(name, "v2")
        assert cached is not None and cached.status == status


def test_a_file_whose_identity_changed_while_read_is_not_cached(
    tmp_path: Path, rigs: list[Rig]
) -> None:
    matcher = TouchingMatcher(make_db(EICAR_SIG))
    rig = Rig(tmp_path, matcher)
    rigs.append(rig)
    data = b"being written while scanned " * 40
    rig.write("racy.bin", data)
    first = asyncio.run(rig.scan("racy.bin"))
    assert first["status"] == "clean" and first["source"] == "scan"
    assert rig.cached("racy.bin", "v1") is None
    assert len(rig.cache) == 0
    second = asyncio.run(rig.scan("racy.bin"))  # so it is matched again, not served
    assert second["source"] == "scan"
    assert len(matcher.read_inodes) == 2 and rig.counters.contents_matched == 2

    # the same content in a file left alone is cached as usual
    steady = Rig(tmp_path / "steady", CountingMatcher(make_db(EICAR_SIG)))
    rigs.append(steady)
    steady.write("calm.bin", data)
    asyncio.run(steady.scan("calm.bin"))
    assert steady.cached("calm.bin", "v1") is not None
