"""The flat tables both matcher cores read (``offscan._tables``): their layout, the twin's atoms,
and the native index's sampling guarantee (every occurrence of a part puts one of its indexed
grams on a sampled position, and that gram passes the Bloom filter and sits in its bucket).

The checks recompute everything from the parsed ``PatternDB`` and from the hashing formulas the
module documents, not from the module's own helpers, so a table that breaks a core's assumption
fails here even when both cores happen to agree with each other.
"""

from __future__ import annotations

import hashlib
import random
import re
from pathlib import Path

import numpy as np
import pytest
import sigsgen
from conftest import make_db

from offscan import _index
from offscan._gramfreq import conditional_bits, pair_bits
from offscan._index import (
    ATOM_MAX,
    BLOOM_MAX_BITS,
    BLOOM_MIN_BITS,
    HASH_BITS,
    HASH_FOLD,
    HASH_WORD,
    MAX_PASSES,
    STRIDE_MAX,
    NativePass,
)
from offscan._tables import Tables, build_tables
from offscan.signatures import Part, PatternDB

LOW32 = 0xFFFFFFFF
HEADER = Path(__file__).resolve().parent.parent / "ext" / "offscan_filter.h"

HANDWRITTEN = "\n".join(
    [
        r"Eicar:0:0:" + rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR".hex(),
        "Short2:0:*:4142",  # the shortest part there is: one 2-byte gram
        "Short3:0:*:000102",
        "Nibble:0:*:41a?4243",
        "NibbleLow:0:*:?a41424344",
        "AnyByte:0:*:414243??44454647",
        "AnyOnly2:0:*:????4142????",
        "Alt:0:*:(41|42)434445",
        "AltMulti:0:*:(4142|4344)4546",
        "NegAlt:0:*:!(41|42)43444546",
        "AltWide:0:*:4142(00|01|02|03|04|05|06|07|08|09|0a|0b|0c|0d|0e|0f|10|11)4344",
        "Gaps:0:*:414243*444546{2-5}4748{-3}494a",
        "Offset:0:0:4d5a9000",
        "Eof:0:EOF-10,10:deadbeef",
        "Zeros:0:*:00000000000000000000",
        "Text:0:*:" + b"the quick brown fox jumps".hex(),
    ]
)


def _sigsgen_db(seed: int) -> PatternDB:
    sigs = sigsgen.make_body_sigs(random.Random(seed), seed, 60)
    return make_db("\n".join(s.line() for s in sigs))


def _many_plain_db() -> PatternDB:
    rng = random.Random(9)
    return make_db(
        "\n".join(
            f"S{i}:0:*:" + rng.randbytes(rng.choice([2, 3, 5, 9, 16, 40])).hex()
            for i in range(3000)
        )
    )


DBS = {
    "handwritten": lambda: make_db(HANDWRITTEN),
    "sigsgen1": lambda: _sigsgen_db(1),
    "sigsgen2": lambda: _sigsgen_db(2),
    "many-plain": _many_plain_db,
}


@pytest.fixture(scope="module", params=list(DBS), ids=list(DBS))
def built(request: pytest.FixtureRequest) -> tuple[PatternDB, Tables]:
    db = DBS[request.param]()
    return db, build_tables(db)


def parts_of(db: PatternDB) -> list[Part]:
    return [part for sig in db.body for part in sig.parts]


def alt_bytes(part: Part) -> set[int]:
    return {a.offset + j for a in part.alts for j in range(a.length)}


# -- layout ------------------------------------------------------------------------------------


def test_arrays_have_the_dtypes_and_shapes_the_native_core_reads(
    built: tuple[PatternDB, Tables],
) -> None:
    _, t = built
    p, a = t.n_parts, len(t.alt_off)
    want = {
        "part_sig": (np.int32, p),
        "part_index": (np.int32, p),
        "part_len": (np.int32, p),
        "part_vstart": (np.int64, p),
        "part_plain": (np.uint8, p),
        "part_once": (np.uint8, p),
        "part_alt_start": (np.int32, p + 1),
        "alt_off": (np.int32, a),
        "alt_len": (np.int32, a),
        "alt_neg": (np.uint8, a),
        "alt_nopt": (np.int32, a),
        "alt_pool_start": (np.int64, a),
        "atom_off": (np.int32, p),
        "atom_len": (np.int32, p),
    }
    for name, (dtype, n) in want.items():
        arr = getattr(t, name)
        assert arr.dtype == dtype and arr.shape == (n,), name
        assert arr.flags.c_contiguous, name
    for name in ("values", "masks", "alt_pool"):
        arr = getattr(t, name)
        assert arr.dtype == np.uint8 and arr.ndim == 1 and len(arr) >= 1, name
        assert arr.flags.c_contiguous and arr.flags.writeable, name  # a copy, not a view
    assert len(t.atoms) == p
    for ps in t.passes:
        assert ps.bloom.dtype == np.uint32 and ps.bloom.flags.c_contiguous
        assert ps.bucket_start.dtype == np.int32 and ps.bucket_start.flags.c_contiguous
        assert ps.entries.dtype == np.int32 and ps.entries.ndim == 2
        assert ps.entries.shape[1] == 4 and ps.entries.flags.c_contiguous


def test_parts_are_laid_out_in_signature_order(built: tuple[PatternDB, Tables]) -> None:
    db, t = built
    parts = parts_of(db)
    assert t.n_parts == len(parts)
    k = 0
    for s, sig in enumerate(db.body):
        for i, part in enumerate(sig.parts):
            assert (t.part_sig[k], t.part_index[k], t.part_len[k]) == (s, i, part.length)
            v = int(t.part_vstart[k])
            assert t.values[v : v + part.length].tobytes() == part.values
            assert t.masks[v : v + part.length].tobytes() == part.masks
            k += 1
    assert t.part_vstart.tolist() == np.concatenate(([0], np.cumsum(t.part_len)[:-1])).tolist()
    assert int(t.part_vstart[-1] + t.part_len[-1]) == len(t.values)
    assert t.max_part_len == max(p.length for p in parts)


def test_values_are_premasked_for_verification(built: tuple[PatternDB, Tables]) -> None:
    # a core verifies ``byte & mask == value``: a value bit outside its mask never matches
    _, t = built
    assert not np.any(t.values & ~t.masks)


def test_plain_and_once_flags(built: tuple[PatternDB, Tables]) -> None:
    db, t = built
    k = 0
    for sig in db.body:
        last = len(sig.parts) - 1
        for i, part in enumerate(sig.parts):
            plain = not part.alts and all(m == 0xFF for m in part.masks)
            assert t.part_plain[k] == plain
            once = i == 0 and sig.offset.kind == "any" and (i == last or sig.gaps[0].max is None)
            assert t.part_once[k] == once, sig.name
            k += 1


def test_alternatives_are_a_csr_of_the_parts_alts(built: tuple[PatternDB, Tables]) -> None:
    db, t = built
    starts = t.part_alt_start.tolist()
    assert starts[0] == 0 and starts[-1] == len(t.alt_off)
    assert all(a <= b for a, b in zip(starts, starts[1:]))
    for p, part in enumerate(parts_of(db)):
        rows = range(starts[p], starts[p + 1])
        assert len(rows) == len(part.alts)
        for a, alt in zip(rows, part.alts):
            assert (t.alt_off[a], t.alt_len[a], t.alt_neg[a], t.alt_nopt[a]) == (
                alt.offset,
                alt.length,
                alt.negated,
                len(alt.options),
            )
            assert 0 <= alt.offset and alt.offset + alt.length <= part.length
            s = int(t.alt_pool_start[a])
            pool = t.alt_pool[s : s + alt.length * len(alt.options)].tobytes()
            assert pool == b"".join(alt.options)
            assert not any(t.masks[int(t.part_vstart[p]) + j] for j in alt_bytes(part))


# -- the twin's atoms --------------------------------------------------------------------------


def _longest_static_run(part: Part) -> int:
    return max((ln for _, ln in part.static_runs()), default=0)


def _information(data: bytes) -> float:
    """Bits of information of a static byte string under the learned pair model."""
    byte_bits, cond_bits = conditional_bits()
    return float(byte_bits[data[0]]) + sum(
        float(cond_bits[a * 256 + b]) for a, b in zip(data, data[1:])
    )


def test_atoms_are_the_rarest_static_window_of_the_longest_usable_length(
    built: tuple[PatternDB, Tables],
) -> None:
    db, t = built
    for p, part in enumerate(parts_of(db)):
        off, ln = int(t.atom_off[p]), int(t.atom_len[p])
        assert 2 <= ln <= ATOM_MAX
        assert ln == min(_longest_static_run(part), ATOM_MAX)
        assert 0 <= off and off + ln <= part.length
        assert all(m == 0xFF for m in part.masks[off : off + ln])  # the automaton needs bytes
        assert t.atoms[p] == part.values[off : off + ln]
        best = max(
            _information(part.values[o : o + ln])
            for o in range(part.length - ln + 1)
            if all(m == 0xFF for m in part.masks[o : o + ln])
        )
        assert _information(t.atoms[p]) >= best - 1e-3, part


def test_the_learned_pair_table_ranks_real_file_bytes() -> None:
    """The shipped table is a probability distribution learned from real files: zero padding
    and x86-64 moves are common, so a window of them is never the atom next to rare bytes."""
    p = np.exp2(-pair_bits())
    assert 0.9 < p.sum() < 1.1
    assert _information(b"\0\0\0\0") < _information(b"\xd7\x3b\x9e\x51")
    assert _information(b"\x48\x89") < _information(b"\xc9\x97")
    db = make_db("Z:0:*:" + (b"\0" * 12 + b"\xd7\x3b\x9e\x51\x07\xc4\xe2\x6a").hex())
    t = build_tables(db)
    assert t.atoms[0] == b"\xd7\x3b\x9e\x51\x07\xc4\xe2\x6a"
    (ps,) = t.passes
    offs = {off for _, _, _, off in ps.entries.tolist()}
    assert min(offs) >= 12 - ps.q + 1  # the sampled window avoids the zeros as far as it can


# -- the native index --------------------------------------------------------------------------


def _byte_kind(part: Part, j: int) -> str:
    if j in alt_bytes(part):
        values = set()
        for a in part.alts:
            if a.offset <= j < a.offset + a.length:
                values = set(range(256)) if a.negated else {o[j - a.offset] for o in a.options}
        return "small" if len(values) <= _index.SMALL_SET else "big"
    m = part.masks[j]
    return "static" if m == 0xFF else "big" if m == 0 else "small"


def _pass_members(t: Tables) -> list[dict[int, set[int]]]:
    """Per pass: part -> the set of gram offsets indexed for it."""
    out = []
    for ps in t.passes:
        members: dict[int, set[int]] = {}
        for _, _, part, off in ps.entries.tolist():
            members.setdefault(part, set()).add(off)
        out.append(members)
    return out


def test_passes_cover_every_part_exactly_once(built: tuple[PatternDB, Tables]) -> None:
    _, t = built
    assert 1 <= len(t.passes) <= MAX_PASSES
    seen: list[int] = []
    for ps, members in zip(t.passes, _pass_members(t)):
        assert 2 <= ps.q <= 8 and 1 <= ps.stride <= STRIDE_MAX
        seen += members
    assert sorted(seen) == list(range(t.n_parts))


def test_each_part_indexes_one_gram_per_residue_of_the_stride(
    built: tuple[PatternDB, Tables],
) -> None:
    # whatever the alignment of an occurrence, exactly one indexed gram lands on a sample
    db, t = built
    parts = parts_of(db)
    for ps, members in zip(t.passes, _pass_members(t)):
        for p, offs in members.items():
            assert sorted(o % ps.stride for o in offs) == list(range(ps.stride)), (p, offs)
            for o in offs:
                assert 0 <= o and o + ps.q <= parts[p].length
                kinds = [_byte_kind(parts[p], o + j) for j in range(ps.q)]
                assert sum(k != "static" for k in kinds) <= 1, (p, o, kinds)
                if ps.q == 2 or ps.q > 4:  # 1/256 of all positions, or 256 long grams
                    assert "big" not in kinds, (p, o, kinds)


def _possible_grams(part: Part, off: int, q: int) -> set[int]:
    """Every little-endian q-byte value an occurrence of ``part`` can show at ``off``."""
    grams = {0}
    for j in range(q):
        pos = off + j
        if pos in alt_bytes(part):
            vals: set[int] = set()
            for a in part.alts:
                if a.offset <= pos < a.offset + a.length:
                    vals = set(range(256)) if a.negated else {o[pos - a.offset] for o in a.options}
        else:
            v, m = part.values[pos], part.masks[pos]
            vals = {(v & m) | (x & ~m & 0xFF) for x in range(256)}
        grams = {g | (b << (8 * j)) for g in grams for b in vals}
    return grams


def test_entries_hold_every_value_a_gram_can_take(built: tuple[PatternDB, Tables]) -> None:
    db, t = built
    parts = parts_of(db)
    for ps in t.passes:
        indexed: dict[tuple[int, int], set[int]] = {}
        for lo, hi, p, off in ps.entries.tolist():
            indexed.setdefault((p, off), set()).add(_gram(lo, hi))
        for (p, off), grams in indexed.items():
            assert grams == _possible_grams(parts[p], off, ps.q), (p, off)


def _gram(lo: int, hi: int) -> int:
    """The gram of an entry (its two int32 columns hold the low and high 32 bits)."""
    return (lo & LOW32) | (hi & LOW32) << 32


def _fold(gram: int) -> int:
    """The documented fold of a gram to 32 bits: lo32 ^ hi32 * HASH_FOLD."""
    return (gram & LOW32) ^ (((gram >> 32) * HASH_FOLD) & LOW32)


def _bloom_bits(x: int) -> int:
    h2 = (x * HASH_BITS) & LOW32
    return (1 << ((h2 >> 22) & 31)) | (1 << (h2 >> 27))


def test_the_bloom_filter_has_no_false_negatives(built: tuple[PatternDB, Tables]) -> None:
    _, t = built
    for ps in t.passes:
        assert len(ps.bloom) == 1 << ps.bloom_words
        assert BLOOM_MIN_BITS - 5 <= ps.bloom_words <= BLOOM_MAX_BITS - 5
        bloom = ps.bloom.tolist()
        for lo, hi, _, _ in ps.entries.tolist():
            x = _fold(_gram(lo, hi))
            word = ((x * HASH_WORD) & LOW32) >> (32 - ps.bloom_words)
            assert bloom[word] & _bloom_bits(x) == _bloom_bits(x), hex(x)


def test_entries_sit_in_their_hash_bucket(built: tuple[PatternDB, Tables]) -> None:
    _, t = built
    for ps in t.passes:
        starts = ps.bucket_start.tolist()
        assert len(starts) == (1 << ps.bucket_bits) + 1
        assert starts[0] == 0 and starts[-1] == len(ps.entries)
        assert all(a <= b for a, b in zip(starts, starts[1:]))
        grams = [_gram(lo, hi) for lo, hi in ps.entries[:, :2].tolist()]
        for b in range(1 << ps.bucket_bits):
            for k in range(starts[b], starts[b + 1]):
                assert (_fold(grams[k]) * HASH_WORD & LOW32) >> (32 - ps.bucket_bits) == b


def _instance(rng: random.Random, part: Part) -> bytes:
    """A random occurrence of ``part``, built from the parsed signature (not the tables)."""
    out = bytearray(
        (v & m) | (rng.randrange(256) & ~m & 0xFF) for v, m in zip(part.values, part.masks)
    )
    for a in part.alts:
        if a.negated:
            choice = bytes(rng.randrange(256) for _ in range(a.length))
            while choice in a.options:
                choice = bytes(rng.randrange(256) for _ in range(a.length))
        else:
            choice = rng.choice(a.options)
        out[a.offset : a.offset + a.length] = choice
    return bytes(out)


def _candidates(ps: NativePass, buf: bytes) -> set[tuple[int, int]]:
    """(part, start) candidates a core sampling ``buf`` with this pass produces."""
    bloom, starts, entries = ps.bloom.tolist(), ps.bucket_start.tolist(), ps.entries.tolist()
    out = set()
    for pos in range(0, len(buf) - ps.q + 1, ps.stride):
        g = int.from_bytes(buf[pos : pos + ps.q], "little")
        x = _fold(g)
        h1 = (x * HASH_WORD) & LOW32
        if bloom[h1 >> (32 - ps.bloom_words)] & _bloom_bits(x) != _bloom_bits(x):
            continue
        b = h1 >> (32 - ps.bucket_bits)
        for lo, hi, part, off in entries[starts[b] : starts[b + 1]]:
            if _gram(lo, hi) == g:
                out.add((part, pos - off))
    return out


def _verifies(t: Tables, p: int, window: bytes) -> bool:
    """Verification as the cores do it, from the tables alone."""
    v = int(t.part_vstart[p])
    n = int(t.part_len[p])
    if len(window) != n:
        return False
    for j in range(n):
        if window[j] & t.masks[v + j] != t.values[v + j]:
            return False
    for a in range(int(t.part_alt_start[p]), int(t.part_alt_start[p + 1])):
        off, ln, s = int(t.alt_off[a]), int(t.alt_len[a]), int(t.alt_pool_start[a])
        options = {
            t.alt_pool[s + i * ln : s + (i + 1) * ln].tobytes() for i in range(int(t.alt_nopt[a]))
        }
        if (window[off : off + ln] in options) == bool(t.alt_neg[a]):
            return False
    return True


def test_every_occurrence_at_every_alignment_becomes_a_verified_candidate(
    built: tuple[PatternDB, Tables],
) -> None:
    db, t = built
    rng = random.Random(3)
    parts = parts_of(db)
    sample = set(range(t.n_parts)) if t.n_parts <= 400 else set(rng.sample(range(t.n_parts), 400))
    for ps, members in zip(t.passes, _pass_members(t)):
        for p in members:
            if p not in sample:
                continue
            for align in range(ps.stride):
                inst = _instance(rng, parts[p])
                start = 2 * ps.stride + align
                buf = rng.randbytes(start) + inst + rng.randbytes(ps.stride + 3)
                assert (p, start) in _candidates(ps, buf), (db.body[t.part_sig[p]].name, align)
                assert _verifies(t, p, buf[start : start + len(inst)])


def test_a_changed_static_byte_fails_verification(built: tuple[PatternDB, Tables]) -> None:
    db, t = built
    rng = random.Random(4)
    for p, part in enumerate(parts_of(db)[:300]):
        inst = bytearray(_instance(rng, part))
        j = next(i for i, m in enumerate(part.masks) if m == 0xFF)
        inst[j] ^= 0x01
        assert not _verifies(t, p, bytes(inst)), p


# -- constants, sizes and the empty database ---------------------------------------------------


def test_hash_constants_equal_the_native_core() -> None:
    text = HEADER.read_text()
    names = (("HASH_WORD", HASH_WORD), ("HASH_BITS", HASH_BITS), ("HASH_FOLD", HASH_FOLD))
    for name, value in names:
        m = re.search(rf"#define OFFSCAN_{name} (0x[0-9A-Fa-f]+)u", text)
        assert m, f"OFFSCAN_{name} not found in {HEADER}"
        assert int(m.group(1), 16) == value, name
    assert HASH_WORD % 2 == 1 and HASH_BITS % 2 == 1  # odd: multiplication is a bijection


def test_bloom_size_grows_with_entries_within_bounds() -> None:
    sizes = [_index._bloom_words(n) for n in (0, 1, 10, 100, 1_000, 10_000, 100_000, 10**6, 10**8)]
    assert sizes == sorted(sizes)
    assert sizes[0] == BLOOM_MIN_BITS - 5 and sizes[-1] == BLOOM_MAX_BITS - 5
    for n in (300, 5_000, 20_000):  # between the bounds: at least 32 bits per entry
        assert (1 << (_index._bloom_words(n) + 5)) >= n * _index.BLOOM_BITS_PER_ENTRY


def test_a_database_without_body_signatures_has_no_index() -> None:
    db = make_db("44d88612fea8a8f36de82e1278abb02f:68:Eicar.MD5", name="e.hdb")
    t = build_tables(db)
    assert t.n_parts == 0 and t.passes == [] and t.atoms == []
    assert len(t.values) == len(t.masks) == len(t.alt_pool) == 1  # never a zero-length buffer
    assert t.part_alt_start.tolist() == [0]


def test_building_is_deterministic() -> None:
    db = _sigsgen_db(5)
    a, b = build_tables(db), build_tables(db)
    for name in ("part_sig", "part_len", "values", "masks", "atom_off", "atom_len", "alt_pool"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    assert a.atoms == b.atoms
    assert len(a.passes) == len(b.passes)
    for x, y in zip(a.passes, b.passes):
        assert (x.q, x.stride, x.bloom_words, x.bucket_bits) == (
            y.q,
            y.stride,
            y.bloom_words,
            y.bucket_bits,
        )
        for name in ("bloom", "bucket_start", "entries"):
            assert np.array_equal(getattr(x, name), getattr(y, name)), name


# -- bit-identical to the reference build ------------------------------------------------------


def _digest_db() -> PatternDB:
    """Like bench/test_bench_signatures.py, smaller: 16-64 random bytes, one in ten with a
    wildcard, gap or alternative, some anchored; over PLAN_SAMPLE parts, so the planner samples."""
    rng = random.Random(3)
    lines = []
    for i in range(3000):
        body = rng.randbytes(rng.randint(16, 64)).hex()
        if i % 10 == 0:
            k = 2 * rng.randrange(4, len(body) // 2 - 4)
            body = body[:k] + rng.choice(["??", "*", "{2-5}", "(aa|bb)", "a?", "?b"]) + body[k:]
        offset = rng.choice(["*"] * 8 + ["0", "EOF-100"])
        lines.append(f"D{i}:0:{offset}:{body}")
    return make_db("\n".join(lines))


def _table_digest(t: Tables) -> str:
    """SHA-256 over every array (dtype, shape, bytes) and scalar of the tables and passes."""
    h = hashlib.sha256()
    for name, value in sorted(vars(t).items()):
        h.update(name.encode())
        if isinstance(value, np.ndarray):
            h.update(f"{value.dtype}{value.shape}".encode() + value.tobytes())
        elif name == "passes":
            for ps in value:
                for field, v in vars(ps).items():
                    h.update(field.encode())
                    if isinstance(v, np.ndarray):
                        h.update(f"{v.dtype}{v.shape}".encode() + v.tobytes())
                    else:
                        h.update(repr(v).encode())
        else:
            h.update(repr(value).encode())
    return h.hexdigest()


# Digests of the tables main built (commit ff42d76, before the vectorised index) for the same
# inputs: a faster build must produce the same bytes, not just tables that pass the checks above.
REFERENCE_DIGESTS = {
    "handwritten": "f4e234494052839d9d59a9802f9b1dd0ddb774161da2fd95c26569a76484c295",
    "sigsgen1": "3f27cbe420fa7df1fd9721e149aa789ec7bfdd0fed57694145c4359672143f01",
    "sigsgen2": "576a4864644052a7fdba52b102d1bd3cabd3f01cd3c14a6c378d519b3bf03a71",
    "many-plain": "3d1fcc9fc0598ba3b51f670aae373545f188b15643e5bd0b6f7cf91f8a58b025",
    "bench-like": "85239238b5a7117c33d1143366ce0e018cee65663b2c38bf73704f620cda2eaa",
}


@pytest.mark.parametrize("name", list(REFERENCE_DIGESTS))
def test_tables_are_bit_identical_to_the_reference_build(name: str) -> None:
    db = _digest_db() if name == "bench-like" else DBS[name]()
    assert _table_digest(build_tables(db)) == REFERENCE_DIGESTS[name]


def test_the_build_leaves_numpys_huge_page_hint_as_it_found_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The build turns numpy's transparent-huge-page hint off for itself only; where numpy has
    no such hook (it is private), the build runs as usual."""
    core = getattr(np, "_core", None) or np.core  # numpy 2 / numpy 1
    hook = core.multiarray
    toggle = hook._set_madvise_hugepage
    before = toggle(True)
    try:
        for want in (True, False):
            toggle(want)
            tables = build_tables(DBS["handwritten"]())
            assert toggle(want) is want
        monkeypatch.delattr(hook, "_set_madvise_hugepage")
        assert _table_digest(build_tables(DBS["handwritten"]())) == _table_digest(tables)
    finally:
        toggle(before)
