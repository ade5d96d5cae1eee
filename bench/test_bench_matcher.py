"""Matcher throughput: offscan (native and Python twin) side by side with the engines a user
would pick instead — pyahocorasick, Hyperscan, yara-python, YARA-X and clamscan — in one
session. (``test_bench_realistic.py`` does the same on signatures cut from real files.)

Inputs are built at import, seeded: a buffer that is half random bytes and half English-like
text, literal signature sets of 1k, 10k and 100k random 8–64 byte strings, and a 10k set in
which every tenth signature uses wildcards (``??``, nibbles, ``{n}``, ``{n-m}``, ``*`` and
alternatives). A few signatures of every set are planted in the buffer (one across a 1 MiB
window edge) and every engine must report them, so each benchmark also checks correctness.

``OFFSCAN_BENCH_QUICK=1`` shrinks everything (1 MiB, 500–2000 signatures) for CI:
``OFFSCAN_BENCH_QUICK=1 python -m pytest bench --benchmark-disable -q``. Missing peers fail,
they are not skipped: a benchmark without its peers is not the benchmark the issue asks for.
"""

from __future__ import annotations

import functools
import os
import random
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import Record, release_free_memory, rss_bytes

from offscan import engine as offscan_engine
from offscan.signatures import PatternDB

QUICK = os.environ.get("OFFSCAN_BENCH_QUICK") == "1"
SEED = 20_261_127
MiB = 1 << 20
BUFFER_SIZE = (1 if QUICK else 64) * MiB  # bytes
SET_SIZES = (
    {"1k": 500, "10k": 1_000, "100k": 2_000, "wild10k": 1_000}
    if QUICK
    else {"1k": 1_000, "10k": 10_000, "100k": 100_000, "wild10k": 10_000}
)
WILDCARD_EVERY = 10  # every tenth signature of the wildcard set has wildcards
PLANTED_LITERALS = (1, 3, 11, 42, 123, 321)  # indexes below the smallest set size
PLANTED_WILDCARDS = (0, 10, 20, 30, 40, 50)  # wildcard signatures of the wildcard set

# rounds per engine: fast engines are timed several times, slow ones once (their run is long
# enough to be stable and a whole session must stay within minutes)
ROUNDS = {
    "offscan-native": 5,
    "hyperscan": 5,
    "yara-python": 3,
    "yara-x": 3,
    "pyahocorasick": 1,
    "offscan-twin": 1,
    "clamscan": 1,
}

# -- inputs -----------------------------------------------------------------------------------

_WORD_TEXT = (
    "the of and to a in is you that it he was for on are as with his they I at be this have "
    "from or one had by word but not what all were we when your can said there use an each "
    "which she do how their if will up other about out many then them these so some her would "
    "make like him into time has look two more write go see number no way could people my than "
    "first water been call who oil its now find long down day did get come made may part over "
    "new sound take only little work know place year live me back give most very after thing "
    "our just name good sentence man think say great where help through much before line right "
    "too mean old any same tell boy follow came want show also around form three small set put "
    "end does another well large must big even such because turn here why ask went men read "
    "need land different home us move try kind hand picture again change off play spell air "
    "away animal house point page letter mother answer found study still learn should America "
    "world scanner appliance signature virtual machine file cache update policy network"
)
_WORDS = tuple(_WORD_TEXT.split())


def english_like_text(n: int, rng: np.random.Generator) -> bytes:
    """Zipf-weighted common English words in sentences and paragraphs, exactly n bytes."""
    weights = 1.0 / np.arange(1, len(_WORDS) + 1)
    weights /= weights.sum()
    n_words = n // 3 + 64  # common words average under 5 bytes with their space
    words = np.array(_WORDS, dtype=object)[rng.choice(len(_WORDS), size=n_words, p=weights)]
    words = words.tolist()
    lengths = rng.integers(6, 20, size=n_words // 6 + 1).tolist()
    paragraph_ends = (rng.random(len(lengths)) < 0.15).tolist()
    chunks: list[str] = []
    size = pos = 0
    for k, end_para in zip(lengths, paragraph_ends):
        if size >= n or pos + k > n_words:
            break
        sentence = " ".join(words[pos : pos + k])
        pos += k
        sentence = sentence[0].upper() + sentence[1:] + (".\n\n" if end_para else ". ")
        chunks.append(sentence)
        size += len(sentence)
    text = "".join(chunks).encode("ascii")
    assert len(text) >= n, "word budget too small for the requested text size"
    return text[:n]


@dataclass(frozen=True)
class Sig:
    """One benchmark signature: ClamAV body tokens plus how to write it for each engine."""

    name: str
    tokens: tuple[tuple, ...]  # ("bytes", b) | ("any",) | ("nib", hi, v) | ("alt", opts) | gap

    @property
    def literal(self) -> bytes | None:
        if len(self.tokens) == 1 and self.tokens[0][0] == "bytes":
            return self.tokens[0][1]
        return None

    def ndb(self) -> str:
        out = []
        for t in self.tokens:
            if t[0] == "bytes":
                out.append(t[1].hex())
            elif t[0] == "any":
                out.append("??")
            elif t[0] == "nib":
                out.append(f"{t[2]:x}?" if t[1] else f"?{t[2]:x}")
            elif t[0] == "alt":
                out.append("(" + "|".join(o.hex() for o in t[1]) + ")")
            elif t[0] == "gap":
                lo, hi = t[1], t[2]
                out.append("*" if hi is None else f"{{{lo}}}" if lo == hi else f"{{{lo}-{hi}}}")
        return "".join(out)

    def yara_hex(self) -> str:
        out = []
        for t in self.tokens:
            if t[0] == "bytes":
                out.append(" ".join(f"{b:02x}" for b in t[1]))
            elif t[0] == "any":
                out.append("??")
            elif t[0] == "nib":
                out.append(f"{t[2]:x}?" if t[1] else f"?{t[2]:x}")
            elif t[0] == "alt":
                out.append("( " + " | ".join(" ".join(f"{b:02x}" for b in o) for o in t[1]) + " )")
            elif t[0] == "gap":
                lo, hi = t[1], t[2]
                out.append("[-]" if hi is None else f"[{lo}]" if lo == hi else f"[{lo}-{hi}]")
        return " ".join(out)

    def regex(self) -> bytes:
        """The same pattern for Hyperscan (compile with HS_FLAG_DOTALL)."""

        def esc(bs: bytes) -> str:
            return "".join(f"\\x{b:02x}" for b in bs)

        out = []
        for t in self.tokens:
            if t[0] == "bytes":
                out.append(esc(t[1]))
            elif t[0] == "any":
                out.append(".")
            elif t[0] == "nib":
                vals = (
                    [(t[2] << 4) | x for x in range(16)]
                    if t[1]
                    else [(x << 4) | t[2] for x in range(16)]
                )
                out.append("[" + esc(bytes(vals)) + "]")
            elif t[0] == "alt":
                out.append("(?:" + "|".join(esc(o) for o in t[1]) + ")")
            elif t[0] == "gap":
                lo, hi = t[1], t[2]
                out.append(".*" if hi is None else f".{{{lo}}}" if lo == hi else f".{{{lo},{hi}}}")
        return "".join(out).encode("ascii")

    def instance(self, rng: random.Random) -> bytes:
        """Bytes that match this signature (wildcards and gaps filled at random)."""
        out = bytearray()
        for t in self.tokens:
            if t[0] == "bytes":
                out += t[1]
            elif t[0] == "any":
                out.append(rng.randrange(256))
            elif t[0] == "nib":
                out.append(
                    (t[2] << 4 | rng.randrange(16)) if t[1] else (rng.randrange(16) << 4 | t[2])
                )
            elif t[0] == "alt":
                out += rng.choice(t[1])
            elif t[0] == "gap":
                hi = t[2] if t[2] is not None else t[1] + 64
                out += rng.randbytes(rng.randint(t[1], hi))
        return bytes(out)


def literal_sigs(n: int, seed: int) -> list[Sig]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(8, 65, size=n)
    blob = rng.bytes(int(lengths.sum()))
    sigs, pos = [], 0
    for i, ln in enumerate(lengths.tolist()):
        sigs.append(Sig(f"Bench.Lit.{i}", (("bytes", blob[pos : pos + ln]),)))
        pos += ln
    return sigs


def wildcard_sig(name: str, rng: random.Random) -> Sig:
    """8–64 random static bytes cut into 1–3 parts of at least 4 bytes by gaps; a part of 6+
    bytes may get one ``??``, nibble or alternative (never in its first or last two bytes)."""
    total = rng.randint(8, 64)
    n_parts = min(rng.randint(1, 3), total // 4)
    cuts = sorted(rng.sample(range(4, total - 3), n_parts - 1)) if n_parts > 1 else []
    while any(b - a < 4 for a, b in zip([0, *cuts], [*cuts, total])):
        cuts = sorted(rng.sample(range(4, total - 3), n_parts - 1))
    tokens: list[tuple] = []
    bounds = list(zip([0, *cuts], [*cuts, total]))
    # with a single part, the inner wildcard is what makes it a wildcard signature
    inner_p = 0.5 if len(bounds) > 1 else 1.0
    for k, (a, b) in enumerate(bounds):
        part = bytearray(rng.randbytes(b - a))
        if len(part) >= 6 and rng.random() < inner_p:
            at = rng.randint(2, len(part) - 3)
            kind = rng.choice(("any", "nib", "alt1", "alt2"))
            head, tail = bytes(part[:at]), bytes(part[at + 1 :])
            if kind == "any":
                mid: tuple = ("any",)
            elif kind == "nib":
                mid = ("nib", rng.random() < 0.5, rng.randrange(16))
            elif kind == "alt1":
                mid = ("alt", tuple(bytes([x]) for x in rng.sample(range(256), rng.randint(2, 4))))
            else:
                mid = ("alt", tuple(rng.randbytes(2) for _ in range(rng.randint(2, 3))))
                tail = tail[1:] if len(tail) > 2 else tail
            tokens += [("bytes", head), mid, ("bytes", tail)]
        else:
            tokens.append(("bytes", bytes(part)))
        if k < len(bounds) - 1:
            lo = rng.randint(0, 8)
            tokens.append(
                rng.choice(
                    (
                        ("gap", lo + 1, lo + 1),
                        ("gap", lo, lo + rng.randint(1, 32)),
                        ("gap", lo, None),
                    )
                )
            )
    return Sig(name, tuple(tokens))


def _plant(buf: bytearray, at: int, data: bytes) -> None:
    buf[at : at + len(data)] = data


def build_inputs() -> tuple[bytes, dict[str, list[Sig]], dict[str, frozenset[str]]]:
    rng = np.random.default_rng(SEED)
    half = BUFFER_SIZE // 2
    buf = bytearray(rng.bytes(half) + english_like_text(BUFFER_SIZE - half, rng))
    lits = literal_sigs(max(SET_SIZES[k] for k in ("1k", "10k", "100k")), SEED + 1)
    wrng = random.Random(SEED + 2)
    n_wild = SET_SIZES["wild10k"]
    wild = [
        wildcard_sig(f"Bench.Wild.{i}", wrng) if i % WILDCARD_EVERY == 0 else lits[i]
        for i in range(n_wild)
    ]
    sets = {k: lits[: SET_SIZES[k]] for k in ("1k", "10k", "100k")}
    sets["wild10k"] = wild
    # planted positions: spread over both halves, the first across the engine's first 1 MiB
    # window edge (in the middle of the buffer in quick mode)
    planted_lits = [lits[i] for i in PLANTED_LITERALS]
    planted_wild = [wild[i] for i in PLANTED_WILDCARDS]
    prng = random.Random(SEED + 3)
    todo = [s.literal for s in planted_lits] + [s.instance(prng) for s in planted_wild]
    spots = [min(MiB, BUFFER_SIZE // 2) - 5] + [
        (k + 1) * BUFFER_SIZE // (len(todo) + 1) for k in range(len(todo) - 1)
    ]
    for at, data in zip(spots, todo):
        _plant(buf, at, data)  # type: ignore[arg-type]
    planted_names = {s.name for s in planted_lits}
    expected = {k: frozenset(planted_names & {s.name for s in v}) for k, v in sets.items()}
    expected["wild10k"] = frozenset(
        (planted_names | {s.name for s in planted_wild}) & {s.name for s in wild}
    )
    return bytes(buf), sets, expected


BUFFER, SIG_SETS, EXPECTED = build_inputs()

# -- engines: build(sigs) -> scanner; scanner() -> set of names found in BUFFER --------------


def _offscan(impl: str) -> Callable[[list[Sig]], Callable[[], set[str]]]:
    def build(sigs: list[Sig]) -> Callable[[], set[str]]:
        text = "\n".join(f"{s.name}:0:*:{s.ndb()}" for s in sigs)
        db = PatternDB.from_text([("bench.ndb", text)])
        matcher = offscan_engine.Matcher(db, impl=impl, max_scan_time=float("inf"))
        if impl == "c":
            assert matcher.native, "native matcher did not build"
        return lambda: set(matcher.scan_bytes(BUFFER, allmatch=True).matches)

    return build


def _pyahocorasick(sigs: list[Sig]) -> Callable[[], set[str]]:
    import ahocorasick

    auto = ahocorasick.Automaton()
    for s in sigs:
        assert s.literal is not None, "pyahocorasick only takes literal signatures"
        auto.add_word(s.literal.decode("latin-1"), s.name)
    auto.make_automaton()

    def scan() -> set[str]:
        return {name for _end, name in auto.iter(BUFFER.decode("latin-1"))}

    return scan


def _hyperscan(sigs: list[Sig]) -> Callable[[], set[str]]:
    import hyperscan

    # python-hyperscan's pure-literal mode (literal=True) measures patterns with strlen, so it
    # truncates literals at a NUL byte; escaped regexes reach the same literal matchers (FDR,
    # Teddy) inside Hyperscan and keep every byte.
    db = hyperscan.Database(mode=hyperscan.HS_MODE_BLOCK)
    flags = hyperscan.HS_FLAG_SINGLEMATCH | hyperscan.HS_FLAG_DOTALL
    db.compile(
        expressions=[s.regex() for s in sigs],
        ids=list(range(len(sigs))),
        elements=len(sigs),
        flags=[flags] * len(sigs),
    )
    scratch = hyperscan.Scratch(db)
    names = [s.name for s in sigs]

    def scan() -> set[str]:
        hits: set[int] = set()

        def on_match(i: int, start: int, end: int, flags: int, ctx: object) -> None:
            hits.add(i)

        db.scan(BUFFER, match_event_handler=on_match, scratch=scratch)
        return {names[i] for i in hits}

    return scan


def _yara(sigs: list[Sig]) -> Callable[[], set[str]]:
    import yara

    source = "\n".join(
        f"rule r{i} {{ strings: $a = {{ {s.yara_hex()} }} condition: $a }}"
        for i, s in enumerate(sigs)
    )
    rules = yara.compile(source=source)
    names = [s.name for s in sigs]

    def scan() -> set[str]:
        return {names[int(m.rule[1:])] for m in rules.match(data=BUFFER)}

    return scan


def _yara_x(sigs: list[Sig]) -> Callable[[], set[str]]:
    import yara_x

    source = "\n".join(
        f"rule r{i} {{ strings: $a = {{ {s.yara_hex()} }} condition: $a }}"
        for i, s in enumerate(sigs)
    )
    scanner = yara_x.Scanner(yara_x.compile(source))
    names = [s.name for s in sigs]

    def scan() -> set[str]:
        return {names[int(r.identifier[1:])] for r in scanner.scan(BUFFER).matching_rules}

    return scan


class _ClamScan:
    """clamscan as a user runs it: a whole process per scan, database and file on disk."""

    def __init__(self, sigs: list[Sig], workdir: Path) -> None:
        exe = shutil.which("clamscan")
        if exe is None:
            raise RuntimeError(
                "clamscan not found: install Debian's clamav (scripts/install-test-deps)"
            )
        self.exe = exe
        self.db = workdir / "bench.ndb"
        self.db.write_text("".join(f"{s.name}:0:*:{s.ndb()}\n" for s in sigs))
        self.target = workdir / "buffer.bin"
        if not self.target.exists():
            self.target.write_bytes(BUFFER)
        self.empty = workdir / "empty.bin"
        self.empty.write_bytes(b"\0")
        self.peak_rss = 0
        self.last_cpu = 0.0  # CPU seconds (user + system) of the last run

    def run(self, path: Path) -> set[str]:
        proc = subprocess.Popen(
            [self.exe, "--no-summary", "--allmatch", "--stdout", "-d", str(self.db), str(path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        out, err = proc.stdout.read(), proc.stderr.read()  # type: ignore[union-attr]
        _pid, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        proc.stdout.close()  # type: ignore[union-attr]
        proc.stderr.close()  # type: ignore[union-attr]
        self.peak_rss = max(self.peak_rss, usage.ru_maxrss * 1024)
        self.last_cpu = usage.ru_utime + usage.ru_stime
        if proc.returncode not in (0, 1):
            raise RuntimeError(f"clamscan exit {proc.returncode}: {err.decode(errors='replace')}")
        found = set()
        for line in out.decode(errors="replace").splitlines():
            if line.endswith(" FOUND"):
                name = line.rsplit(": ", 1)[1][: -len(" FOUND")]
                found.add(name.removesuffix(".UNOFFICIAL"))
        return found


ENGINES: dict[str, Callable[[list[Sig]], Callable[[], set[str]]]] = {
    "offscan-native": _offscan("c"),
    "offscan-twin": _offscan("py"),
    "pyahocorasick": _pyahocorasick,
    "hyperscan": _hyperscan,
    "yara-python": _yara,
    "yara-x": _yara_x,
}
LITERAL_ENGINES = [*ENGINES, "clamscan"]
WILDCARD_ENGINES = [e for e in LITERAL_ENGINES if e != "pyahocorasick"]  # literals only


def _run(benchmark, record, tmp_path: Path, group: str, engine: str) -> Record:  # type: ignore[no-untyped-def]
    sigs = SIG_SETS[group]
    times: list[float] = []
    cpu_times: list[float] = []
    release_free_memory()
    rss0 = rss_bytes()
    t0 = time.perf_counter()
    if engine == "clamscan":
        clam = _ClamScan(sigs, tmp_path)
        assert clam.run(clam.empty) == set()  # database load + a 1-byte file = "build"
        build_s = time.perf_counter() - t0
        scanner: Callable[[], set[str]] = functools.partial(clam.run, clam.target)
    else:
        scanner = ENGINES[engine](sigs)
        build_s = time.perf_counter() - t0
    release_free_memory()  # count what the matcher keeps, not the garbage of building it
    memory = rss_bytes() - rss0

    def timed() -> set[str]:
        t, c = time.perf_counter(), time.thread_time()
        found = scanner()
        times.append(time.perf_counter() - t)
        cpu_times.append(clam.last_cpu if engine == "clamscan" else time.thread_time() - c)
        return found

    found = benchmark.pedantic(timed, rounds=ROUNDS[engine], iterations=1, warmup_rounds=0)
    kind = "10% with wildcards" if group == "wild10k" else "literal"
    rec = record(
        group=f"{len(sigs)} signatures, {kind}, {len(BUFFER) / MiB:g} MiB",
        engine=engine,
        size_bytes=len(BUFFER),
        build_s=build_s,
        memory_bytes=clam.peak_rss if engine == "clamscan" else memory,
        memory_kind="peak rss" if engine == "clamscan" else "rss growth",
        times=times,
        cpu_times=cpu_times,
    )
    benchmark.extra_info.update(
        mb_per_s=round(rec.mb_per_s, 1),
        cpu_mb_per_s=round(rec.cpu_mb_per_s, 1),
        build_s=round(build_s, 3),
        memory_mib=round(rec.memory_bytes / 2**20, 1),
        memory_kind=rec.memory_kind,
    )
    expected = EXPECTED[group]
    assert expected <= found, f"{engine} missed planted signatures {sorted(expected - found)}"
    if group != "wild10k":  # random 8+ byte literals never occur by chance in the buffer
        assert found == expected, (
            f"{engine} reported unplanted signatures {sorted(found - expected)}"
        )
    return rec


@pytest.mark.benchmark(group="1k literal signatures")
@pytest.mark.parametrize("engine", LITERAL_ENGINES)
def test_scan_1k_literal_sigs(benchmark, record, tmp_path, engine):  # type: ignore[no-untyped-def]
    _run(benchmark, record, tmp_path, "1k", engine)


@pytest.mark.benchmark(group="10k literal signatures")
@pytest.mark.parametrize("engine", LITERAL_ENGINES)
def test_scan_10k_literal_sigs(benchmark, record, tmp_path, engine):  # type: ignore[no-untyped-def]
    _run(benchmark, record, tmp_path, "10k", engine)


@pytest.mark.benchmark(group="100k literal signatures")
@pytest.mark.parametrize("engine", LITERAL_ENGINES)
def test_scan_100k_literal_sigs(benchmark, record, tmp_path, engine):  # type: ignore[no-untyped-def]
    _run(benchmark, record, tmp_path, "100k", engine)


@pytest.mark.benchmark(group="10k signatures, 10% with wildcards")
@pytest.mark.parametrize("engine", WILDCARD_ENGINES)
def test_scan_10k_wildcard_sigs(benchmark, record, tmp_path, engine):  # type: ignore[no-untyped-def]
    _run(benchmark, record, tmp_path, "wild10k", engine)


def test_native_and_twin_agree_on_wildcard_set() -> None:
    """Beyond the planted hits: both offscan cores report exactly the same signatures (on
    3 MiB from both halves of the buffer, to keep the twin's run short)."""
    half = len(BUFFER) // 2
    sample = BUFFER[: 2 * MiB] + BUFFER[half : half + MiB]
    db = PatternDB.from_text(
        [("bench.ndb", "\n".join(f"{s.name}:0:*:{s.ndb()}" for s in SIG_SETS["wild10k"]))]
    )
    native = offscan_engine.Matcher(db, impl="c").scan_bytes(sample, allmatch=True)
    twin = offscan_engine.Matcher(db, impl="py").scan_bytes(sample, allmatch=True)
    assert native.matches == twin.matches
    assert native.infected
