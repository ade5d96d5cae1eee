"""Matcher throughput on realistic data: signatures cut from this machine's ELF files, a corpus
of its other real files (see ``realistic_data``), offscan's native core side by side with
Hyperscan, yara-python, YARA-X and pyahocorasick in one session, on the *realistic* sets (many
signatures occur in the corpus) and the *distinctive* ones (only a few do).

Every engine must report exactly the set of signatures that pyahocorasick found in the corpus
when the set was built, so each benchmark also checks correctness. One more benchmark runs
whole processes on the corpus as files: ``clamscan -r`` against ``offscan scan -r`` with the
10k realistic set, and both must report the same (file, signature) pairs.

``OFFSCAN_BENCH_QUICK=1`` shrinks the corpus to 8 MiB and the sets to 500–2000 signatures.
"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Record, release_free_memory, rss_bytes
from realistic_data import SIZES, RealisticSet, build

from offscan import engine as offscan_engine
from offscan.signatures import PatternDB

DATA = build()
CORPUS = DATA.corpus
SETS = DATA.sets
ROUNDS = {"offscan-native": 3, "hyperscan": 3, "yara-x": 1, "yara-python": 1, "pyahocorasick": 1}
Scanner = Callable[[], set[str]]


def _ndb(sigs: tuple[tuple[str, bytes], ...]) -> str:
    return "".join(f"{name}:0:*:{data.hex()}\n" for name, data in sigs)


def _offscan(sigs: tuple[tuple[str, bytes], ...]) -> Scanner:
    db = PatternDB.from_text([("real.ndb", _ndb(sigs))])
    matcher = offscan_engine.Matcher(db, impl="c", max_file_size=1 << 40)
    assert matcher.native, "native matcher did not build"
    return lambda: set(matcher.scan_bytes(CORPUS, allmatch=True).matches)


def _hyperscan(sigs: tuple[tuple[str, bytes], ...]) -> Scanner:
    import hyperscan

    db = hyperscan.Database(mode=hyperscan.HS_MODE_BLOCK)
    flags = hyperscan.HS_FLAG_SINGLEMATCH | hyperscan.HS_FLAG_DOTALL
    db.compile(
        expressions=["".join(f"\\x{b:02x}" for b in data).encode() for _n, data in sigs],
        ids=list(range(len(sigs))),
        elements=len(sigs),
        flags=[flags] * len(sigs),
    )
    scratch = hyperscan.Scratch(db)
    names = [n for n, _d in sigs]

    def scan() -> set[str]:
        hits: set[int] = set()

        def on_match(i: int, start: int, end: int, flags: int, ctx: object) -> None:
            hits.add(i)

        db.scan(CORPUS, match_event_handler=on_match, scratch=scratch)
        return {names[i] for i in hits}

    return scan


def _yara_source(sigs: tuple[tuple[str, bytes], ...]) -> str:
    return "\n".join(
        f"rule r{i} {{ strings: $a = {{ {data.hex(' ')} }} condition: $a }}"
        for i, (_n, data) in enumerate(sigs)
    )


def _yara(sigs: tuple[tuple[str, bytes], ...]) -> Scanner:
    import yara

    rules = yara.compile(source=_yara_source(sigs))
    names = [n for n, _d in sigs]
    return lambda: {names[int(m.rule[1:])] for m in rules.match(data=CORPUS)}


def _yara_x(sigs: tuple[tuple[str, bytes], ...]) -> Scanner:
    import yara_x

    rules = yara_x.compile(_yara_source(sigs))
    scanner = yara_x.Scanner(rules)
    names = [n for n, _d in sigs]
    return lambda: {names[int(r.identifier[1:])] for r in scanner.scan(CORPUS).matching_rules}


def _pyahocorasick(sigs: tuple[tuple[str, bytes], ...]) -> Scanner:
    import ahocorasick

    auto = ahocorasick.Automaton()
    for name, data in sigs:
        auto.add_word(data.decode("latin-1"), name)
    auto.make_automaton()
    return lambda: {name for _end, name in auto.iter(CORPUS.decode("latin-1"))}


ENGINES: dict[str, Callable[[tuple[tuple[str, bytes], ...]], Scanner]] = {
    "offscan-native": _offscan,
    "hyperscan": _hyperscan,
    "yara-x": _yara_x,
    "yara-python": _yara,
    "pyahocorasick": _pyahocorasick,
}


def _run(benchmark, record, s: RealisticSet, engine: str) -> Record:  # type: ignore[no-untyped-def]
    times: list[float] = []
    cpu_times: list[float] = []
    release_free_memory()
    rss0 = rss_bytes()
    t0 = time.perf_counter()
    scanner = ENGINES[engine](s.sigs)
    build_s = time.perf_counter() - t0
    release_free_memory()
    memory = rss_bytes() - rss0

    def timed() -> set[str]:
        t, c = time.perf_counter(), time.thread_time()
        found = scanner()
        times.append(time.perf_counter() - t)
        cpu_times.append(time.thread_time() - c)
        return found

    found = benchmark.pedantic(timed, rounds=ROUNDS[engine], iterations=1, warmup_rounds=0)
    kind = "distinctive" if s.name.startswith("distinct") else "realistic"
    rec = record(
        group=f"{len(s.sigs)} signatures, {kind}, {len(CORPUS) / 2**20:.0f} MiB real files",
        engine=engine,
        size_bytes=len(CORPUS),
        build_s=build_s,
        memory_bytes=memory,
        memory_kind="rss growth",
        times=times,
        cpu_times=cpu_times,
    )
    benchmark.extra_info.update(
        mb_per_s=round(rec.mb_per_s, 1),
        cpu_mb_per_s=round(rec.cpu_mb_per_s, 1),
        build_s=round(build_s, 3),
        memory_mib=round(memory / 2**20, 1),
        hits=len(s.hits),
    )
    assert found == s.hits, (
        f"{engine}: missed {sorted(s.hits - found)[:5]}, extra {sorted(found - s.hits)[:5]}"
    )
    return rec


REAL = [k for k in SETS if k.startswith("real")]
DISTINCT = [k for k in SETS if k.startswith("distinct")]


@pytest.mark.benchmark(group="realistic signatures")
@pytest.mark.parametrize("engine", list(ENGINES))
@pytest.mark.parametrize("which", REAL)
def test_scan_realistic_sigs(benchmark, record, which, engine):  # type: ignore[no-untyped-def]
    _run(benchmark, record, SETS[which], engine)


@pytest.mark.benchmark(group="distinctive signatures")
@pytest.mark.parametrize("engine", list(ENGINES))
@pytest.mark.parametrize("which", DISTINCT)
def test_scan_distinctive_sigs(benchmark, record, which, engine):  # type: ignore[no-untyped-def]
    _run(benchmark, record, SETS[which], engine)


# -- whole processes on files: clamscan -r vs offscan scan -r ----------------------------------

CLAMSCAN_SET = f"real{SIZES[1] // 1000}k" if SIZES[1] % 1000 == 0 else f"real{SIZES[1]}"
# clamscan would also unpack archives (.gz docs), normalise HTML and parse ELF; the comparison
# is about raw body matching, so both read every file as bytes only
CLAMSCAN_RAW = [
    "--scan-archive=no",
    "--scan-html=no",
    "--scan-elf=no",
    "--scan-pe=no",
    "--scan-pdf=no",
    "--scan-ole2=no",
    "--scan-mail=no",
    "--scan-swf=no",
    "--scan-xmldocs=no",
    "--scan-hwp3=no",
    "--scan-image=no",
]


def _found_lines(out: str, root: Path) -> set[tuple[str, str]]:
    pairs = set()
    for line in out.splitlines():
        if line.endswith(" FOUND"):
            path, name = line[: -len(" FOUND")].rsplit(": ", 1)
            pairs.add((os.path.relpath(path, root), name.removesuffix(".UNOFFICIAL")))
    return pairs


def _timed_process(argv: list[str]) -> tuple[str, float, float]:
    """Run a whole process: its stdout, wall seconds and CPU seconds (user + system)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, check=False)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    if proc.returncode not in (0, 1):
        raise RuntimeError(
            f"{argv[0]} exit {proc.returncode}: {proc.stderr.decode(errors='replace')}"
        )
    return proc.stdout.decode(errors="replace"), wall, cpu


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("realistic-corpus")
    for k, p in enumerate(DATA.files):
        if os.path.getsize(p) > 5:  # ClamAV never scans files of 5 bytes or fewer
            shutil.copyfile(p, root / f"{k:05d}-{os.path.basename(p)}")
    return root


@pytest.mark.benchmark(group="whole process on files")
@pytest.mark.parametrize("engine", ["offscan scan -r", "clamscan -r"])
def test_whole_process_on_realistic_files(benchmark, record, corpus_dir, tmp_path, engine):  # type: ignore[no-untyped-def]
    s = SETS[CLAMSCAN_SET]
    db = tmp_path / "real.ndb"
    db.write_text(_ndb(s.sigs))
    if engine.startswith("clamscan"):
        exe = shutil.which("clamscan")
        assert exe, "clamscan not found: install Debian's clamav (scripts/install-test-deps)"
        argv = [exe, "--no-summary", "--allmatch", "--stdout", *CLAMSCAN_RAW, "-r", "-d", str(db)]
    else:
        argv = [sys.executable, "-m", "offscan", "scan", "--no-summary", "--allmatch", "--infected"]
        argv += ["-r", "-d", str(db)]
    argv.append(str(corpus_dir))
    runs: list[tuple[str, float, float]] = []
    benchmark.pedantic(lambda: runs.append(_timed_process(argv)), rounds=1, iterations=1)
    out, wall, cpu = runs[0]
    size = sum(f.stat().st_size for f in corpus_dir.iterdir())
    record(
        group=f"{len(s.sigs)} realistic signatures, whole process, {size / 2**20:.0f} MiB files",
        engine=engine,
        size_bytes=size,
        build_s=0.0,
        memory_bytes=0,
        memory_kind="peak rss",
        times=[wall],
        cpu_times=[cpu],
    )
    pairs = _found_lines(out, corpus_dir)
    benchmark.extra_info.update(mb_per_s=round(size / 1e6 / wall, 1), pairs=len(pairs))
    WHOLE_PROCESS[engine] = pairs
    if len(WHOLE_PROCESS) == 2:
        a, b = WHOLE_PROCESS.values()
        assert a == b, f"offscan and clamscan disagree: {sorted(a ^ b)[:5]}"


WHOLE_PROCESS: dict[str, set[tuple[str, str]]] = {}
