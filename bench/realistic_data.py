"""The realistic matcher benchmark set, built at run time from this machine's own files.

Real ClamAV body signatures are byte strings cut from real executables, and real scans read
real files, whose byte statistics (zero padding, ``48 89`` moves, ASCII text) defeat prefilters
tuned on random bytes. So:

- the ELF files under /usr/lib and /usr/bin are split in two halves by a seeded shuffle;
- **signatures**: 16–64 bytes cut at random offsets from files of the first half (a cut that is
  mostly one byte value, i.e. padding, is drawn again: no vendor ships a run of zeros);
- **corpus**: files of the second half plus /usr/share files plus Python sources, concatenated
  up to ``CORPUS_BYTES`` (256 MiB; 8 MiB under ``OFFSCAN_BENCH_QUICK=1``);
- **realistic** sets: the first 1k / 10k / 100k signatures of the pool; many of them occur in
  the corpus (shared code, libc stubs), which every engine must then report;
- **distinctive** sets: the pool without the signatures that occur in the corpus (as a vendor
  drops signatures that false-positive), except ``KEPT_HITS`` of them kept at the front, so
  correctness is still checked.

Which signatures occur in the corpus is computed once with pyahocorasick (an implementation
independent of offscan) and cached in ``$OFFSCAN_BENCH_CACHE`` (default ~/.cache/offscan-bench)
keyed by the SHA-256 of the corpus and of the signature pool.
"""

from __future__ import annotations

import hashlib
import os
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

QUICK = os.environ.get("OFFSCAN_BENCH_QUICK") == "1"
SEED = 20_261_202
MiB = 1 << 20
CORPUS_BYTES = (8 if QUICK else 256) * MiB
SIZES = (500, 1_000, 2_000) if QUICK else (1_000, 10_000, 100_000)
POOL = int(SIZES[-1] * 1.6)  # signatures cut; the distinctive sets drop those in the corpus
SIG_LEN = (16, 64)  # bytes, inclusive
MAX_FILE = 4 * MiB  # corpus files larger than this are skipped (more, smaller files)
KEPT_HITS = 8  # signatures occurring in the corpus that the distinctive sets keep
ELF_ROOTS = ("/usr/lib", "/usr/bin")
SHARE_ROOT = "/usr/share"
# corpus shares: the other half of the ELF files, then /usr/share, then Python sources
SHARES = (("elf", 0.5), ("share", 0.25), ("python", 0.25))


@dataclass(frozen=True)
class RealisticSet:
    """Signatures (name, bytes) and the names that occur in the corpus."""

    name: str
    sigs: tuple[tuple[str, bytes], ...]
    hits: frozenset[str]


@dataclass(frozen=True)
class RealisticData:
    corpus: bytes
    files: tuple[str, ...]  # the corpus files, in corpus order
    sets: dict[str, RealisticSet]
    source_files: int  # ELF files signatures were cut from


def _walk(root: str) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for f in sorted(filenames):
            p = os.path.join(dirpath, f)
            if not os.path.islink(p):
                out.append(p)
    return out


def _regular(path: str) -> int:
    """Size of a readable regular file, else -1."""
    try:
        st = os.stat(path)
    except OSError:
        return -1
    if not (st.st_mode & 0o170000 == 0o100000) or not os.access(path, os.R_OK):
        return -1
    return st.st_size


def elf_files() -> list[str]:
    out = []
    for root in ELF_ROOTS:
        for p in _walk(root):
            if _regular(p) < 64:
                continue
            try:
                with open(p, "rb") as f:
                    if f.read(4) == b"\x7fELF":
                        out.append(p)
            except OSError:
                pass
    return sorted(set(out))


def _mostly_one_byte(data: bytes) -> bool:
    return Counter(data).most_common(1)[0][1] * 2 > len(data)


def cut_signatures(sources: list[str], count: int, rng: random.Random) -> list[bytes]:
    """``count`` distinct cuts of SIG_LEN bytes at random offsets of random source files."""
    sizes = {p: _regular(p) for p in sources}
    sources = [p for p in sources if sizes[p] >= SIG_LEN[1]]
    wanted: dict[str, list[tuple[int, int]]] = {}
    for _ in range(count * 2):  # some cuts are rejected below
        p = rng.choice(sources)
        ln = rng.randint(*SIG_LEN)
        wanted.setdefault(p, []).append((rng.randrange(sizes[p] - ln), ln))
    cuts: dict[bytes, None] = {}
    for p in sorted(wanted):
        with open(p, "rb") as f:
            fd = f.fileno()
            for off, ln in wanted[p]:
                data = os.pread(fd, ln, off)
                if len(data) == ln and not _mostly_one_byte(data):
                    cuts[data] = None
    pool = list(cuts)
    rng.shuffle(pool)
    if len(pool) < count:
        raise RuntimeError(f"only {len(pool)} usable signature cuts, {count} wanted")
    return pool[:count]


def _corpus_files(elf_half: list[str], rng: random.Random) -> list[str]:
    share = [p for p in _walk(SHARE_ROOT) if 0 < _regular(p) <= MAX_FILE]
    python = sorted(
        p
        for root in sorted({str(Path(os.__file__).parent), "/usr/lib/python3"})
        for p in _walk(root)
        if p.endswith(".py") and 0 < _regular(p) <= MAX_FILE
    )
    kinds = {"elf": [p for p in elf_half if _regular(p) <= MAX_FILE], "share": share}
    kinds["python"] = python
    chosen: list[str] = []
    for kind, share_of in SHARES:
        files = list(kinds[kind])
        rng.shuffle(files)
        budget = int(CORPUS_BYTES * share_of)
        for p in files:
            size = _regular(p)
            if size <= 0:
                continue
            if size > budget:
                continue
            chosen.append(p)
            budget -= size
            if budget < 4096:
                break
    rng.shuffle(chosen)
    return chosen


def occurring(sigs: list[bytes], corpus: bytes) -> set[int]:
    """Indexes of the signatures that occur in the corpus (pyahocorasick, cached on disk)."""
    key = hashlib.sha256(corpus)
    for s in sigs:
        key.update(len(s).to_bytes(2, "little") + s)
    cache = Path(os.environ.get("OFFSCAN_BENCH_CACHE", Path.home() / ".cache" / "offscan-bench"))
    path = cache / f"occurring-{key.hexdigest()[:24]}.txt"
    if path.exists():
        return {int(x) for x in path.read_text().split()}
    import ahocorasick

    auto = ahocorasick.Automaton()
    for i, s in enumerate(sigs):
        auto.add_word(s.decode("latin-1"), i)
    auto.make_automaton()
    found = {i for _end, i in auto.iter(corpus.decode("latin-1"))}
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(" ".join(map(str, sorted(found))))
    tmp.replace(path)
    return found


def build() -> RealisticData:
    rng = random.Random(SEED)
    elves = elf_files()
    rng.shuffle(elves)
    half = len(elves) // 2
    sources, others = sorted(elves[:half]), sorted(elves[half:])
    files = _corpus_files(others, rng)
    chunks = []
    for p in files:
        with open(p, "rb") as f:
            chunks.append(f.read())
    corpus = b"".join(chunks)
    pool = cut_signatures(sources, POOL, rng)
    occ = occurring(pool, corpus)
    names = [f"Real.{i}" for i in range(len(pool))]
    sets: dict[str, RealisticSet] = {}
    for n in SIZES:
        sigs = tuple(zip(names[:n], pool[:n]))
        sets[f"real{_k(n)}"] = RealisticSet(
            f"real{_k(n)}", sigs, frozenset(names[i] for i in range(n) if i in occ)
        )
    kept = sorted(occ)[:KEPT_HITS]
    distinct = kept + [i for i in range(len(pool)) if i not in occ]
    for n in SIZES:
        idx = distinct[:n]
        sets[f"distinct{_k(n)}"] = RealisticSet(
            f"distinct{_k(n)}",
            tuple((names[i], pool[i]) for i in idx),
            frozenset(names[i] for i in idx if i in occ),
        )
    return RealisticData(corpus, tuple(files), sets, len(sources))


def _k(n: int) -> str:
    return f"{n // 1000}k" if n % 1000 == 0 else str(n)


if __name__ == "__main__":  # a quick look: python bench/realistic_data.py
    import time

    t0 = time.perf_counter()
    data = build()
    print(f"built in {time.perf_counter() - t0:.1f} s: corpus {len(data.corpus) / MiB:.1f} MiB")
    print(f"  {len(data.files)} files; signatures cut from {data.source_files} ELF files")
    for s in data.sets.values():
        print(f"  {s.name}: {len(s.sigs)} signatures, {len(s.hits)} occur in the corpus")
