"""Compile a PatternDB's body signatures into flat numpy tables shared by both matcher cores.

Both cores report exactly the same (part, start) hits: a hit is wherever a whole part verifies
against the value/mask/alternative tables below, so *how* a core finds candidate starts never
changes the answer, only the speed.

- The Python twin finds candidates with pyahocorasick over one static *atom* per part (the
  rarest run of 2 to 8 static bytes).
- The native core samples the buffer: a pass ``(q, S)`` reads a q-byte *gram* (q = 2..8)
  only at positions that are multiples of S. Each part of that pass indexes S of its grams,
  one at an offset of every residue mod S (a plain part: the S consecutive grams of its rarest
  window), so any occurrence puts exactly one of them on a sampled position. Parts of 15+
  bytes allow 8-byte grams every 8 bytes (one probe per 8 bytes; a cost model picks a smaller
  stride when the tables would not fit in cache); short parts go to a second pass with a
  smaller stride and maybe shorter grams. A gram is folded to 32 bits and looked up in a
  blocked Bloom filter (two bits in one 32-bit word), then in hashed buckets of (gram, part,
  offset) entries; a hit verifies the whole part. A gram may cover one byte that is not
  static (a nibble, an alternative, or for 3- and 4-byte grams a ``??``): it is indexed once
  per possible value.
- "Rarest" is measured, not guessed: ``_gramfreq`` estimates how often a byte string occurs in
  real files from a byte-pair table learned from real files (executables, libraries, text), so
  windows of zero padding, ``48 89`` moves or ASCII words are avoided, and the planner's cost
  model counts the true gram hits real input will produce.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from ._index import NativePass, _Index
from .signatures import Part, PatternDB


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
    atom_off: np.ndarray  # int32[P]: the twin's atom
    atom_len: np.ndarray  # int32[P]
    atoms: list[bytes]
    max_part_len: int
    passes: list[NativePass]  # the native index

    @property
    def n_parts(self) -> int:
        return len(self.part_len)


def build_tables(db: PatternDB) -> Tables:
    with _small_pages():
        return _build_tables(db)


@contextlib.contextmanager
def _small_pages() -> Iterator[None]:
    """Build without numpy's huge-page hint: the index's per-byte arrays (about 4M bytes at
    100k signatures) live for a few vector operations each, and under a hypervisor faulting
    in and zeroing 2 MiB pages for them cost 0.2-1.0 s of system time per build (measured on
    a 2-vCPU KVM guest; 0.15-0.5 s with 4 KiB pages)."""
    core = getattr(np, "_core", None) or getattr(np, "core", None)  # numpy 2 / numpy 1
    toggle = getattr(getattr(core, "multiarray", None), "_set_madvise_hugepage", None)
    if toggle is None:
        yield
        return
    before = toggle(False)
    try:
        yield
    finally:
        toggle(before)


def _build_tables(db: PatternDB) -> Tables:
    sigs = db.body
    n_sig_parts = np.array([len(sig.parts) for sig in sigs], dtype=np.int64)
    parts = [part for sig in sigs for part in sig.parts]
    value_chunks = [part.values for part in parts]
    part_len = list(map(len, value_chunks))
    values = np.frombuffer(b"".join(value_chunks), dtype=np.uint8)
    masks = np.frombuffer(b"".join(part.masks for part in parts), dtype=np.uint8)
    lens = np.array(part_len, dtype=np.int64)
    vstart = np.zeros(len(lens), dtype=np.int64)
    if len(lens):
        np.cumsum(lens[:-1], out=vstart[1:])
    first_part = np.cumsum(n_sig_parts) - n_sig_parts  # of each signature
    part_sig = np.repeat(np.arange(len(sigs), dtype=np.int32), n_sig_parts)
    part_index = (np.arange(len(parts)) - first_part[part_sig]).astype(np.int32)
    # Only the earliest hit matters for a first part that may start anywhere (all_hits: count
    # every hit) and is followed by nothing or by an unbounded gap (later hits are dominated).
    once = np.zeros(len(parts), dtype=np.uint8)
    once_sig = np.array(
        [
            sig.offset.kind == "any"
            and not sig.all_hits
            and (len(sig.parts) == 1 or sig.gaps[0].max is None)
            for sig in sigs
        ],
        dtype=bool,
    )
    once[first_part[once_sig & (n_sig_parts > 0)]] = 1
    alts = _Alternatives(parts, vstart)
    index = _Index(values, masks, vstart, lens, alts.sets)
    atom_off, atom_len = index.twin_atoms()
    atoms = [
        values[v + o : v + o + ln].tobytes()
        for v, o, ln in zip(vstart.tolist(), atom_off.tolist(), atom_len.tolist())
    ]

    return Tables(
        part_sig=part_sig,
        part_index=part_index,
        part_len=np.array(part_len, dtype=np.int32),
        part_vstart=vstart,
        values=values.copy() if len(values) else np.zeros(1, dtype=np.uint8),
        masks=masks.copy() if len(masks) else np.zeros(1, dtype=np.uint8),
        part_plain=index.plain.astype(np.uint8),
        part_once=once,
        part_alt_start=alts.start,
        alt_off=np.array(alts.off, dtype=np.int32),
        alt_len=np.array(alts.length, dtype=np.int32),
        alt_neg=np.array(alts.neg, dtype=np.uint8),
        alt_nopt=np.array(alts.nopt, dtype=np.int32),
        alt_pool_start=np.array(alts.pool_start, dtype=np.int64),
        alt_pool=np.frombuffer(bytes(alts.pool) or b"\0", dtype=np.uint8).copy(),
        atom_off=atom_off.astype(np.int32),
        atom_len=atom_len.astype(np.int32),
        atoms=atoms,
        max_part_len=max(part_len, default=1),
        passes=index.native_passes(),
    )


class _Alternatives:
    """The parts' alternatives as columns (a CSR by part), and per global byte position the
    set of values an alternative lets it take (what the index must expand a gram to)."""

    def __init__(self, parts: list[Part], vstart: np.ndarray) -> None:
        self.count = np.zeros(len(parts), dtype=np.int64)  # alternatives per part
        self.off: list[int] = []
        self.length: list[int] = []
        self.neg: list[int] = []
        self.nopt: list[int] = []
        self.pool_start: list[int] = []
        self.pool = bytearray()  # options, length bytes each
        self.sets: dict[int, set[int]] = {}
        for i in [i for i, part in enumerate(parts) if part.alts]:
            pos = int(vstart[i])
            self.count[i] = len(parts[i].alts)
            for a in parts[i].alts:
                self.off.append(a.offset)
                self.length.append(a.length)
                self.neg.append(1 if a.negated else 0)
                self.nopt.append(len(a.options))
                self.pool_start.append(len(self.pool))
                for o in a.options:
                    self.pool += o
                for j in range(a.length):
                    vals = self.sets.setdefault(pos + a.offset + j, set())
                    if a.negated:
                        vals.update(range(256))
                    else:
                        vals.update(o[j] for o in a.options)
        self.start = np.zeros(len(parts) + 1, dtype=np.int32)  # CSR into the columns
        np.cumsum(self.count, out=self.start[1:])
