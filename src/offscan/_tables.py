"""Compile a PatternDB's body signatures into flat numpy tables shared by both matcher cores.

Every signature part gets one *atom*: the best window of 2 to 4 static bytes. The native core
finds atoms with a 2-byte prefilter bitmap, a 4-byte Bloom bitmap and a hashed bucket table;
the Python twin finds the same atoms with pyahocorasick. Both then verify the whole part with the
value/mask/alternative tables below, so they report exactly the same (part, start) hits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .signatures import PatternDB

HASH_MULTIPLIER = 0x9E3779B1  # Fibonacci hashing; must equal the constant in ext/_match_c.pyx
BLOOM4_BITS = 22  # 4 Mi bits = 512 KiB: < 3% false positives at 100k atoms, fits in L2/L3
ATOM_MAX = 4  # bytes; one unaligned 32-bit load in the native loop

# How often a byte shows up in ordinary files (text, zero padding); atoms avoid common bytes.
_COMMON = np.zeros(256, dtype=np.int32)
_COMMON[0x00] = 8
_COMMON[0xFF] = 6
_COMMON[0x20] = 6
for _b in range(0x21, 0x7F):
    _COMMON[_b] = 2
for _rng, _w in ((range(0x61, 0x7B), 4), (range(0x41, 0x5B), 3), (range(0x30, 0x3A), 3)):
    for _b in _rng:
        _COMMON[_b] = _w
for _b in (0x09, 0x0A, 0x0D):
    _COMMON[_b] = 3


@dataclass(frozen=True)
class PartRef:
    """Which signature a part belongs to and its position in it."""

    sig: int
    index: int


@dataclass
class Tables:
    part_sig: np.ndarray  # int32[P]
    part_index: np.ndarray  # int32[P]: position of the part in its signature
    part_len: np.ndarray  # int32[P]
    part_vstart: np.ndarray  # int64[P]: start in values/masks
    values: np.ndarray  # uint8
    masks: np.ndarray  # uint8
    part_plain: np.ndarray  # uint8[P]: all bytes static, no alternatives
    part_once: np.ndarray  # uint8[P]: only the first hit can matter
    part_alt_start: np.ndarray  # int32[P+1]: CSR into alt_*
    alt_off: np.ndarray  # int32[A]
    alt_len: np.ndarray  # int32[A]
    alt_neg: np.ndarray  # uint8[A]
    alt_nopt: np.ndarray  # int32[A]
    alt_pool_start: np.ndarray  # int64[A]
    alt_pool: np.ndarray  # uint8: options, alt_len bytes each
    atom_off: np.ndarray  # int32[P]
    atom_len: np.ndarray  # int32[P]
    atoms: list[bytes]
    max_part_len: int
    # native index
    pre2: np.ndarray  # uint8[8192]: bit k set if some atom starts with bytes k&255, k>>8
    bloom4: np.ndarray  # uint8[2**BLOOM4_BITS / 8]
    b4_bits: int
    b4_start: np.ndarray  # int32[2**b4_bits + 1]
    e4_atom: np.ndarray  # uint32
    e4_part: np.ndarray  # int32
    s_start: np.ndarray  # int32[65537]: CSR by first two bytes, atoms of 2-3 bytes
    es_part: np.ndarray  # int32
    es_len: np.ndarray  # uint8
    es_b2: np.ndarray  # uint8: third byte for 3-byte atoms

    @property
    def n_parts(self) -> int:
        return len(self.part_len)


def _choose_atom(values: bytes, runs: list[tuple[int, int]]) -> tuple[int, int]:
    best: tuple[int, int, int, int] | None = None  # (-length, commonness, offset, length)
    for start, length in runs:
        ln = min(ATOM_MAX, length)
        if ln < 2:
            continue
        for off in range(start, start + length - ln + 1):
            window = values[off : off + ln]
            # the first two bytes drive the prefilter, so weigh them double
            score = int(_COMMON[window[0]] * 2 + _COMMON[window[1]] * 2 + sum(_COMMON[b] for b in window[2:]))
            key = (-ln, score, off, ln)
            if best is None or key < best:
                best = key
    assert best is not None, "parser guarantees a static run of 2 bytes"
    return best[2], best[3]


def build_tables(db: PatternDB) -> Tables:
    part_sig, part_index, part_len, part_vstart, plain, once = [], [], [], [], [], []
    values = bytearray()
    masks = bytearray()
    alt_start = [0]
    alt_off, alt_len, alt_neg, alt_nopt, alt_pool_start = [], [], [], [], []
    alt_pool = bytearray()
    atom_off, atom_len, atoms = [], [], []
    for s, sig in enumerate(db.body):
        for k, part in enumerate(sig.parts):
            part_sig.append(s)
            part_index.append(k)
            part_len.append(part.length)
            part_vstart.append(len(values))
            values += part.values
            masks += part.masks
            plain.append(1 if not part.alts and all(m == 0xFF for m in part.masks) else 0)
            # Only the earliest hit matters for a first part that may start anywhere and is
            # followed by nothing or by an unbounded gap (later hits are dominated).
            first_free = k == 0 and sig.offset.kind == "any"
            followed_unbounded = k == len(sig.parts) - 1 or sig.gaps[k].max is None
            once.append(1 if first_free and followed_unbounded else 0)
            for a in part.alts:
                alt_off.append(a.offset)
                alt_len.append(a.length)
                alt_neg.append(1 if a.negated else 0)
                alt_nopt.append(len(a.options))
                alt_pool_start.append(len(alt_pool))
                for o in a.options:
                    alt_pool += o
            alt_start.append(len(alt_off))
            off, ln = _choose_atom(part.values, part.static_runs())
            atom_off.append(off)
            atom_len.append(ln)
            atoms.append(part.values[off : off + ln])

    n = len(part_len)
    pre2 = np.zeros(8192, dtype=np.uint8)
    bloom4 = np.zeros((1 << BLOOM4_BITS) // 8, dtype=np.uint8)
    long_parts = [p for p in range(n) if atom_len[p] == 4]
    short_parts = [p for p in range(n) if atom_len[p] < 4]
    for a in atoms:
        k = a[0] | (a[1] << 8)
        pre2[k >> 3] |= 1 << (k & 7)

    b4_bits = max(4, int(len(long_parts) * 2 - 1).bit_length())
    e4_atom = np.array(
        [int.from_bytes(atoms[p], "little") for p in long_parts], dtype=np.uint64
    ).astype(np.uint32)
    hashes = (e4_atom.astype(np.uint64) * HASH_MULTIPLIER) & 0xFFFFFFFF
    bloom_bit = (hashes >> (32 - BLOOM4_BITS)).astype(np.int64)
    np.bitwise_or.at(bloom4, bloom_bit >> 3, (1 << (bloom_bit & 7)).astype(np.uint8))
    bucket = (hashes >> (32 - b4_bits)).astype(np.int64)
    order = np.argsort(bucket, kind="stable")
    e4_part = np.array(long_parts, dtype=np.int32)[order]
    e4_atom = e4_atom[order]
    b4_start = np.zeros((1 << b4_bits) + 1, dtype=np.int32)
    np.cumsum(np.bincount(bucket, minlength=1 << b4_bits), out=b4_start[1:])

    s_keys = np.array([atoms[p][0] | (atoms[p][1] << 8) for p in short_parts], dtype=np.int64)
    s_order = np.argsort(s_keys, kind="stable")
    es_part = np.array(short_parts, dtype=np.int32)[s_order]
    es_len = np.array([atom_len[p] for p in short_parts], dtype=np.uint8)[s_order]
    es_b2 = np.array(
        [atoms[p][2] if atom_len[p] == 3 else 0 for p in short_parts], dtype=np.uint8
    )[s_order]
    s_start = np.zeros(65537, dtype=np.int32)
    np.cumsum(np.bincount(s_keys, minlength=65536), out=s_start[1:])

    return Tables(
        part_sig=np.array(part_sig, dtype=np.int32),
        part_index=np.array(part_index, dtype=np.int32),
        part_len=np.array(part_len, dtype=np.int32),
        part_vstart=np.array(part_vstart, dtype=np.int64),
        values=np.frombuffer(bytes(values) or b"\0", dtype=np.uint8).copy(),
        masks=np.frombuffer(bytes(masks) or b"\0", dtype=np.uint8).copy(),
        part_plain=np.array(plain, dtype=np.uint8),
        part_once=np.array(once, dtype=np.uint8),
        part_alt_start=np.array(alt_start, dtype=np.int32),
        alt_off=np.array(alt_off, dtype=np.int32),
        alt_len=np.array(alt_len, dtype=np.int32),
        alt_neg=np.array(alt_neg, dtype=np.uint8),
        alt_nopt=np.array(alt_nopt, dtype=np.int32),
        alt_pool_start=np.array(alt_pool_start, dtype=np.int64),
        alt_pool=np.frombuffer(bytes(alt_pool) or b"\0", dtype=np.uint8).copy(),
        atom_off=np.array(atom_off, dtype=np.int32),
        atom_len=np.array(atom_len, dtype=np.int32),
        atoms=atoms,
        max_part_len=max(part_len, default=1),
        pre2=pre2,
        bloom4=bloom4,
        b4_bits=b4_bits,
        b4_start=b4_start,
        e4_atom=np.ascontiguousarray(e4_atom, dtype=np.uint32),
        e4_part=np.ascontiguousarray(e4_part, dtype=np.int32),
        s_start=s_start,
        es_part=np.ascontiguousarray(es_part, dtype=np.int32),
        es_len=np.ascontiguousarray(es_len, dtype=np.uint8),
        es_b2=np.ascontiguousarray(es_b2, dtype=np.uint8),
    )
