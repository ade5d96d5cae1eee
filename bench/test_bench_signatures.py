"""Database load time (issue 10: parser + table build at 100k signatures).

Signatures are built at module level, seeded: 100k ``.ndb`` body signatures of 16-64 random
bytes (one in ten with a wildcard, gap or alternative; some with offsets), 100k ``.hdb`` MD5
signatures and 10k ``.ldb`` logical signatures of two or three subsignatures. Each benchmark
parses the text into a PatternDB; ``test_bench_tables_100k`` builds the matcher tables from the
parsed .ndb database, so the two sides of a load sit next to each other in one run;
``test_bench_hyperscan_compile_100k`` compiles the same 100k bodies with Hyperscan (as
bench/test_bench_matcher.py does: escaped regexes, DOTALL, SINGLEMATCH; offsets dropped, Hyperscan
has no end-of-file anchor in block mode), the peer the build is compared with.

Run: ``python -m pytest bench/test_bench_signatures.py --benchmark-only``.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from offscan import PatternDB
from offscan._tables import build_tables

N = 100_000
N_LDB = 10_000


def _ndb(n: int) -> str:
    rng = random.Random(1)
    lines = []
    for i in range(n):
        body = rng.randbytes(rng.randint(16, 64)).hex()
        if i % 10 == 0:
            k = 2 * rng.randrange(4, len(body) // 2 - 4)
            body = body[:k] + rng.choice(["??", "*", "{2-5}", "(aa|bb)"]) + body[k:]
        offset = rng.choice(["*"] * 8 + ["0", "EOF-100"])
        lines.append(f"Bench.Sig-{i}:0:{offset}:{body}")
    return "\n".join(lines) + "\n"


def _hdb(n: int) -> str:
    return "".join(
        f"{hashlib.md5(str(i).encode()).hexdigest()}:{i + 1}:Bench.Hash-{i}\n" for i in range(n)
    )


def _ldb(n: int) -> str:
    rng = random.Random(2)
    lines = []
    for i in range(n):
        subs = [rng.randbytes(rng.randint(8, 24)).hex() for _ in range(rng.choice((2, 3)))]
        expr = "&".join(str(k) for k in range(len(subs)))
        lines.append(f"Bench.Ldb-{i};Target:0;{expr};" + ";".join(subs))
    return "\n".join(lines) + "\n"


NDB, HDB, LDB = _ndb(N), _hdb(N), _ldb(N_LDB)
NDB_DB = PatternDB.from_text([("bench.ndb", NDB)])


def test_bench_parse_ndb_100k(benchmark) -> None:  # type: ignore[no-untyped-def]
    db = benchmark.pedantic(PatternDB.from_text, ([("bench.ndb", NDB)],), rounds=3)
    assert len(db.body) == N


def test_bench_parse_hdb_100k(benchmark) -> None:  # type: ignore[no-untyped-def]
    db = benchmark.pedantic(PatternDB.from_text, ([("bench.hdb", HDB)],), rounds=3)
    assert len(db.hashes) == N


def test_bench_parse_ldb_10k(benchmark) -> None:  # type: ignore[no-untyped-def]
    db = benchmark.pedantic(PatternDB.from_text, ([("bench.ldb", LDB)],), rounds=3)
    assert len(db.logical) == N_LDB


def test_bench_tables_100k(benchmark) -> None:  # type: ignore[no-untyped-def]
    tables = benchmark.pedantic(build_tables, (NDB_DB,), rounds=2)
    assert tables.n_parts >= N


_FRESH = """
import json, os, sys, time
from offscan import PatternDB
from offscan._tables import build_tables
text = open(sys.argv[1]).read()
t0, c0 = os.times(), time.process_time()
db = PatternDB.from_text([("bench.ndb", text)])
c1 = time.process_time()
tables = build_tables(db)
c2, t2 = time.process_time(), os.times()
print(json.dumps({"parse": c1 - c0, "build": c2 - c1, "user": t2.user - t0.user,
                  "sys": t2.system - t0.system, "parts": tables.n_parts}))
"""


def test_bench_load_100k_fresh_process(benchmark, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Parse + table build in a new process, as ``offscan scan`` or ``offscan serve`` loads a
    database: the first build in a process also pays for faulting in its arrays (system
    time), which the in-process rounds above do not show. CPU seconds in extra_info."""
    ndb = tmp_path / "bench.ndb"
    ndb.write_text(NDB)
    runs: list[dict[str, float]] = []

    def load() -> None:
        out = subprocess.run(
            [sys.executable, "-c", _FRESH, str(ndb)], check=True, capture_output=True, text=True
        )
        runs.append(json.loads(out.stdout))

    benchmark.pedantic(load, rounds=3)
    assert all(r["parts"] >= N for r in runs)
    best = min(runs, key=lambda r: r["parse"] + r["build"])
    benchmark.extra_info.update({k: round(v, 3) for k, v in best.items()})
    benchmark.extra_info["parse_plus_build_cpu_s"] = round(best["parse"] + best["build"], 3)


_TOKEN = re.compile(r"\?\?|\*|\{(\d+)-(\d+)\}|\(([0-9a-f|]+)\)|([0-9a-f]{2})")


def _regex(body: str) -> bytes:
    """The Hyperscan regex of one .ndb body of the tokens ``_ndb`` writes."""
    out = []
    for m in _TOKEN.finditer(body):
        tok = m.group(0)
        if tok == "??":
            out.append(".")
        elif tok == "*":
            out.append(".*")
        elif m.group(1) is not None:
            out.append(f".{{{m.group(1)},{m.group(2)}}}")
        elif m.group(3) is not None:
            opts = (
                "".join(f"\\x{o[i : i + 2]}" for i in range(0, len(o), 2))
                for o in m.group(3).split("|")
            )
            out.append("(?:" + "|".join(opts) + ")")
        else:
            out.append(f"\\x{tok}")
    return "".join(out).encode("ascii")


def hyperscan_compile(text: str) -> object:
    hyperscan = pytest.importorskip("hyperscan")
    exprs = [_regex(line.split(":", 3)[3]) for line in text.splitlines()]
    db = hyperscan.Database(mode=hyperscan.HS_MODE_BLOCK)
    flags = hyperscan.HS_FLAG_SINGLEMATCH | hyperscan.HS_FLAG_DOTALL
    db.compile(
        expressions=exprs,
        ids=list(range(len(exprs))),
        elements=len(exprs),
        flags=[flags] * len(exprs),
    )
    return db


def test_bench_hyperscan_compile_100k(benchmark) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("hyperscan")
    db = benchmark.pedantic(hyperscan_compile, (NDB,), rounds=1)
    assert db is not None
