"""The native core's index: which grams of each part the sampling passes read, planned from
measured byte statistics (``_tables`` explains the scheme; this module is its planner and
builder). Vectorized over all parts at once: positions are global, into the concatenated
part bytes, and per-byte arrays are int32/int8 where they can be (about 4M bytes at 100k
signatures).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ._gramfreq import conditional_bits

# Multiplicative hashing of a gram g (q bytes, little-endian; 32-bit arithmetic, as in SIMD
# lanes): x = lo32(g) ^ (hi32(g) * HASH_FOLD mod 2**32) folds it to 32 bits (a gram of 4 bytes
# or fewer is its own fold), then
#   h1 = x * HASH_WORD mod 2**32: its top bloom_words bits pick a 32-bit Bloom word and its top
#        bucket_bits the bucket;
#   h2 = x * HASH_BITS mod 2**32: its top 10 bits pick the two bits tested in the word
#        (bits 22-26 and 27-31 of h2, each a bit number 0-31).
# Must equal the constants in ext/offscan_filter.h.
HASH_WORD = 0x9E3779B1  # 2**32 / golden ratio (Fibonacci hashing)
HASH_BITS = 0x85EBCA6B  # an odd constant from MurmurHash3's finalizer, unrelated to HASH_WORD
HASH_FOLD = 0xC2B2AE35  # MurmurHash3's other finalizer constant
ENTRY_COLUMNS = 4  # a bucket entry: gram low 32 bits, gram high 32 bits, part, offset
ATOM_MAX = 8  # bytes of the twin's pyahocorasick atoms; longer atoms, fewer false candidates
STRIDE_MAX = 8  # samples at most every 8 bytes (needs an S + q - 1 byte window per part)
GRAM_LENGTHS = (8, 6, 4, 3, 2)  # gram lengths the planner considers
FIRST_PASS_GRAMS = (8, 4)  # the first pass, which most parts share, uses long grams
SMALL_SET = 16  # values of a nibble or alternative byte that a 2-byte gram may hold
MAX_PASSES = 3  # the native core interleaves at most this many sampling passes
PASS_COST = 0.01  # per byte, for running one more pass (its block loop, its tables in cache)
BLOOM_BITS_PER_ENTRY = 32  # two bits per entry: ~0.5% false positives (1.5% at 16 bits)
BLOOM_MIN_BITS = 13  # 1 KiB
BLOOM_MAX_BITS = 23  # 1 MiB: stays in a core's L2 next to the 1 MiB scan window
# A probe that gets past the Bloom filter reads its bucket: about 12 Bloom probes' worth when
# the bucket tables fit in a core's L2 cache, about 200 when each read misses to L3 or memory.
# (Measured on a 2-core Xeon VM: at 100k signatures stride 3 beats stride 5 by ~15%, at 10k
# stride 5 beats stride 3 by ~30%.)
PROBE_COST_CACHED = 12.0
PROBE_COST_MISS = 200.0
LONG_GRAM_COST = 1.0  # a probe of a 5-8 byte gram: one more multiply, hidden by the loads
L2_BYTES = 2 << 20
PLAN_SAMPLE = 2000  # parts the planner estimates true gram hits on
SMALL_INFO = 4.0  # bits of information of a nibble or alternative byte (16 of 256 values)
_LOG2P_BIAS = 400.0  # keys of log2 probabilities: (log2 p + bias) * 1024 stays in 0..2**31
_STATIC, _SMALL, _BIG = 0, 1, 2  # byte kinds: one value, <= SMALL_SET values, anything


@dataclass
class NativePass:
    """One sampling pass of the native core: q-byte grams read every ``stride`` bytes."""

    q: int  # gram length in bytes (2..8)
    stride: int
    bloom: np.ndarray  # uint32[2**bloom_words]
    bloom_words: int  # log2 of the number of 32-bit Bloom words
    bucket_bits: int
    bucket_start: np.ndarray  # int32[2**bucket_bits + 1]: CSR into entries
    entries: np.ndarray  # int32[E, 4]: gram low and high 32 bits, part, offset of the gram in it


class _Index:
    """Vectorized window choice over all parts at once (positions are global, into values)."""

    def __init__(
        self,
        values: np.ndarray,
        masks: np.ndarray,
        vstart: np.ndarray,
        lens: np.ndarray,
        alt_sets: dict[int, set[int]],
    ) -> None:
        self.values, self.masks, self.vstart, self.lens = values, masks, vstart, lens
        self.alt_sets = alt_sets
        total = len(values)
        # Per-byte arrays are int32/int8 where they can be (positions < 2**31): at 100k
        # signatures there are about 4M bytes, and every int64 array costs 32 MiB to fill.
        kind = np.full(total, _SMALL, dtype=np.int8)
        kind[masks == 0xFF] = _STATIC
        kind[masks == 0] = _BIG
        for g, vals in alt_sets.items():
            kind[g] = _SMALL if len(vals) <= SMALL_SET else _BIG
        self.kind = kind
        self.part_of = np.repeat(np.arange(len(lens), dtype=np.int32), lens)
        self.pos = np.arange(total, dtype=np.int32)
        # bytes from each position to its part's (exclusive) end
        self.room = np.repeat((vstart + lens).astype(np.int32), lens)
        self.room -= self.pos
        self.is_start = np.zeros(total, dtype=bool)
        self.is_start[vstart] = True
        # Information (bits) of each byte given the one before it in the same part, from the
        # learned pair table; a gram's information is its first byte's plus the rest's.
        byte_bits, cond_bits = conditional_bits()
        static = kind == _STATIC
        v = values.astype(np.int32)
        self.first_info = np.where(kind == _SMALL, SMALL_INFO, 0.0)
        self.first_info[static] = byte_bits[v[static]]
        # step: the conditional information where a static byte follows a static byte of
        # the same part, else the byte's own
        chained = np.flatnonzero(static[1:] & static[:-1] & ~self.is_start[1:]) + 1
        step = self.first_info.copy()
        step[chained] = cond_bits[v[chained - 1] * 256 + v[chained]]
        self._cstep = np.empty(total + 1)
        self._cstep[0] = 0.0
        np.cumsum(step, out=self._cstep[1:])
        del step, v, static, chained
        self._gp: dict[int, np.ndarray] = {}
        self._cs = _prefix_count(kind == _SMALL)
        self._cb = _prefix_count(kind == _BIG)
        self._cn = self._cs + self._cb  # bytes that are not static
        # per part: every byte static (no wildcard, nibble or alternative)
        self.plain = self._cn[vstart + lens] == self._cn[vstart]

    # -- helpers ---------------------------------------------------------------------------

    def _span_counts(self, c: np.ndarray, width: int) -> np.ndarray:
        """For every position j: how many flagged bytes in [j, j+width) (clipped at the end)."""
        return _ahead(c, width) - c[:-1]

    def _static_windows(self, width: int) -> np.ndarray:
        """Windows [j, j+width) of static bytes inside one part."""
        inside = self.room >= width
        return inside & (self._span_counts(self._cn, width) == 0)

    def _good_grams(self, q: int) -> np.ndarray:
        """Grams [j, j+q) inside one part with at most one byte that is not static; a 2-byte
        gram may not hold a ?? (it would match 1/256 of all positions), nor a gram of 5+ bytes
        (indexed 256 times, while a shorter gram would do)."""
        inside = self.room >= q
        small, big = self._span_counts(self._cs, q), self._span_counts(self._cb, q)
        good = inside & (small + big <= 1)
        return good & (big == 0) if q == 2 or q > 4 else good

    def _longest_runs(self, good: np.ndarray) -> np.ndarray:
        """Per part: the longest run of consecutive good positions."""
        best = np.zeros(len(self.lens), dtype=np.int64)
        if not len(good):
            return best
        start = good & (self.is_start | ~np.concatenate(([False], good[:-1])))
        starts = np.flatnonzero(start)
        if not len(starts):
            return best
        # a run ends at the next bad position or the next part start, whichever comes first
        breaks = np.flatnonzero(~good | self.is_start)
        nxt = np.searchsorted(breaks, starts, side="right")
        ends = np.where(nxt < len(breaks), breaks[np.minimum(nxt, len(breaks) - 1)], len(good))
        ends = np.minimum(ends, starts + self.room[starts])
        np.maximum.at(best, self.part_of[starts], ends - starts)
        return best

    def _info(self, width: int) -> np.ndarray:
        """For every position j: estimated bits of information of the bytes [j, j+width)."""
        out = _ahead(self._cstep, width)
        np.add(self.first_info, out, out=out)
        out -= self._cstep[1:]  # == _ahead(self._cstep, 1)
        return out

    def gram_p(self, q: int) -> np.ndarray:
        """For every position: the estimated probability of the q-byte gram there in real files."""
        if q not in self._gp:
            p = self._info(q)
            np.negative(p, out=p)
            self._gp[q] = np.exp2(p, out=p)
        return self._gp[q]

    def _window_p(self, q: int, stride: int) -> np.ndarray:
        """For every position j: the summed probability of the grams at j .. j+stride-1."""
        gp = self.gram_p(q)
        c = np.empty(len(gp) + 1)
        c[0] = 0.0
        np.cumsum(gp, out=c[1:])
        out = _ahead(c, stride)
        out -= c[:-1]
        return out

    @staticmethod
    def _key(log2p: np.ndarray) -> np.ndarray:
        """An int64 sort key increasing with log2 p (1/1024 bit resolution); overwrites
        log2p, which callers pass as a temporary."""
        log2p += _LOG2P_BIAS
        log2p *= 1024.0
        np.clip(log2p, 0, 2**31 - 1, out=log2p)
        return log2p.astype(np.int64)

    def _best_windows(self, eligible: np.ndarray, key: np.ndarray) -> np.ndarray:
        """Per part: the eligible window start of lowest key (the rarest), or -1. Overwrites
        key, which callers pass as a temporary."""
        if not len(self.lens):
            return np.zeros(0, dtype=np.int64)
        key <<= 32
        key |= self.pos
        key[~eligible] = np.iinfo(np.int64).max
        best = np.minimum.reduceat(key, self.vstart)
        return np.where(best == np.iinfo(np.int64).max, -1, best & 0xFFFFFFFF)

    # -- the twin's atoms ------------------------------------------------------------------

    def twin_atoms(self) -> tuple[np.ndarray, np.ndarray]:
        """Per part: (offset, length) of the rarest static run of up to ATOM_MAX bytes."""
        static = self.kind == _STATIC
        atom_len = np.minimum(self._longest_runs(static), ATOM_MAX)
        atom_off = np.zeros(len(self.lens), dtype=np.int64)
        for ln in np.unique(atom_len).tolist():
            if ln < 2:
                raise AssertionError("parser guarantees a static run of 2 bytes")
            eligible = self._static_windows(ln)
            parts = np.flatnonzero(atom_len == ln)
            key = self._key(np.negative(info := self._info(ln), out=info))
            atom_off[parts] = self._best_windows(eligible, key)[parts] - self.vstart[parts]
        return atom_off, atom_len

    # -- the native passes -----------------------------------------------------------------

    def native_passes(self) -> list[NativePass]:
        n_parts = len(self.lens)
        if not n_parts:
            return []
        plain = self.plain
        odd = np.flatnonzero(~plain)  # parts with wildcards: their good grams, flattened
        # Bit S of strides[q][p] is set if part p can be sampled every S bytes with q-byte
        # grams: its good grams must cover every residue mod S. A plain part of length L has
        # grams at 0..L-q, so every S <= L-q+1 works; for other parts the set of strides can
        # have holes (good grams at 0, 1, 6, 7 cover the residues mod 2 and 4, not mod 3).
        strides = {
            q: (1 << (np.clip(self.lens - q + 1, 0, STRIDE_MAX) + 1)) - 2 for q in GRAM_LENGTHS
        }
        good_offs: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        if len(odd):
            in_odd = ~plain[self.part_of]
            for q in GRAM_LENGTHS:
                gi = np.flatnonzero(self._good_grams(q) & in_odd)
                gi_part = self.part_of[gi]
                gi_off = gi - self.vstart[gi_part]
                good_offs[q] = (gi_part, gi_off)
                strides[q][odd] = _residue_strides(np.searchsorted(odd, gi_part), gi_off, len(odd))
        self._sample_pick, self._sample = self._plan_sample()
        plan = self._plan(strides)
        passes = []
        assigned = np.zeros(n_parts, dtype=bool)
        for q, stride in plan:
            members = ~assigned & ((strides[q] >> stride) & 1).astype(bool)
            assigned |= members
            # plain parts: the window of `stride` consecutive grams least likely in real files
            parts = np.flatnonzero(members & plain)
            eligible = self.room >= stride + q - 1
            wp = self._window_p(q, stride)
            wp += 1e-300
            key = self._key(np.log2(wp, out=wp))
            starts = self._best_windows(eligible, key)[parts]
            del wp, key, eligible
            gpart = [np.repeat(parts, stride)]
            goff = [((starts - self.vstart[parts])[:, None] + np.arange(stride)[None, :]).ravel()]
            # other parts: the rarest good gram of each residue class mod stride
            odd_members = members & ~plain
            if good_offs and odd_members.any():
                gpart_all, goff_all = good_offs[q]
                sel = odd_members[gpart_all]
                p_odd, o_odd = _residue_picks(
                    gpart_all[sel],
                    goff_all[sel],
                    self.gram_p(q)[self.vstart[gpart_all[sel]] + goff_all[sel]],
                    stride,
                )
                gpart.append(p_odd)
                goff.append(o_odd)
            passes.append(self._build_pass(q, stride, np.concatenate(gpart), np.concatenate(goff)))
            self._gp.clear()  # 32 MiB per gram length at 100k signatures; rarely needed again
        assert assigned.all(), "every part has a good 2-byte gram (static run of 2)"
        return passes

    def _plan(self, strides: dict[int, np.ndarray]) -> list[tuple[int, int]]:
        """Choose up to MAX_PASSES (q, stride) passes minimising the estimated work per byte:
        parts that allow stride S with long grams share the first pass; of the rest, those
        allowing a second (q, S) share a second pass, and the last pass takes whatever is
        left at the largest stride all of them allow.

        Parts with the same strides for every q are interchangeable here, so the search runs
        over those classes (members are boolean arrays over classes), weighted by their sizes."""
        code = np.zeros(len(self.lens), dtype=np.int64)
        for i, q in enumerate(GRAM_LENGTHS):
            code |= strides[q].astype(np.int64) << (9 * i)  # a stride mask has 9 bits
        _, first, group, count = np.unique(
            code, return_index=True, return_inverse=True, return_counts=True
        )
        self._class_size = count
        self._sample_class = group.ravel()[self._sample_pick]
        strides = {q: strides[q][first] for q in GRAM_LENGTHS}
        allow = {
            (q, st): ((strides[q] >> st) & 1).astype(bool)
            for q in GRAM_LENGTHS
            for st in range(1, STRIDE_MAX + 1)
        }
        best: tuple[float, list[tuple[int, int]]] | None = None
        for q1 in FIRST_PASS_GRAMS:
            for s1 in range(STRIDE_MAX, 0, -1):
                first = allow[q1, s1]
                plan = [(q1, s1)] if first.any() else []
                cost = self._cost(q1, s1, first) + PASS_COST if plan else 0.0
                rest = ~first
                if rest.any():
                    tail = self._tail_passes(rest, allow, strides, MAX_PASSES - len(plan))
                    if tail is None:
                        continue
                    cost += tail[0]
                    plan += tail[1]
                if best is None or cost < best[0]:
                    best = (cost, plan)
        assert best is not None
        return best[1]

    def _tail_passes(
        self,
        rest: np.ndarray,
        allow: dict[tuple[int, int], np.ndarray],
        strides: dict[int, np.ndarray],
        budget: int,
    ) -> tuple[float, list[tuple[int, int]]] | None:
        """The cheapest passes (at most ``budget``) covering the parts in ``rest``."""
        options: list[tuple[float, list[tuple[int, int]]]] = []
        for q in GRAM_LENGTHS:  # one pass for all of them: their largest common stride
            common = int(np.bitwise_and.reduce(strides[q][rest]))
            st = common.bit_length() - 1
            if st >= 1:
                options.append((self._cost(q, st, rest) + PASS_COST, [(q, st)]))
        if budget >= 2:  # or a pass for those allowing (q, S), then one for the others
            for (q, st), ok in allow.items():
                members = rest & ok
                left = rest & ~ok
                if not members.any() or not left.any():
                    continue
                more = self._tail_passes(left, allow, strides, 1)
                if more is not None:
                    cost = self._cost(q, st, members) + PASS_COST + more[0]
                    options.append((cost, [(q, st), *more[1]]))
        return min(options, key=lambda o: o[0]) if options else None

    def _cost(self, q: int, stride: int, members: np.ndarray) -> float:
        """Estimated work per byte: probes, plus probes that reach the buckets (Bloom false
        positives, and true gram hits: how often the grams this pass would index occur in
        real files, estimated from the learned pair table on a sample of the parts)."""
        n_parts = int(self._class_size[members].sum())
        entries = n_parts * stride
        bits = 1 << (_bloom_words(entries) + 5)
        fp = (1.0 - math.exp(-2.0 * entries / bits)) ** 2
        true_hits = self._expected_hits(q, stride, members)
        table_bytes = 4 * ENTRY_COLUMNS * entries + 4 * (1 << max(4, (entries - 1).bit_length()))
        probe = PROBE_COST_CACHED if table_bytes <= L2_BYTES else PROBE_COST_MISS
        load = LONG_GRAM_COST if q > 4 else 1.0
        return (load + probe * (fp + true_hits)) / stride

    def _plan_sample(self) -> tuple[np.ndarray, _Index]:
        """At most PLAN_SAMPLE parts (seeded pick) and an index over them alone."""
        n = len(self.lens)
        if n <= PLAN_SAMPLE:
            return np.arange(n), self
        pick = np.sort(np.random.default_rng(0).choice(n, PLAN_SAMPLE, replace=False))
        lens = self.lens[pick]
        vstart = np.zeros(len(pick), dtype=np.int64)
        np.cumsum(lens[:-1], out=vstart[1:])
        src = np.repeat(self.vstart[pick] - vstart, lens) + np.arange(int(lens.sum()))
        where = np.full(len(self.values), -1, dtype=np.int64)
        where[src] = np.arange(len(src))
        alts = {int(where[g]): v for g, v in self.alt_sets.items() if where[g] >= 0}
        return pick, _Index(self.values[src], self.masks[src], vstart, lens, alts)

    def _expected_hits(self, q: int, stride: int, members: np.ndarray) -> float:
        """Expected true gram hits per sample: the summed probability of the rarest window of
        every member part, extrapolated from the sampled parts."""
        key = (q, stride)
        cache = self._sample.__dict__.setdefault("_part_p", {})
        if key not in cache:
            sub = self._sample
            wp = sub._window_p(q, stride)
            eligible = sub.room >= stride + q - 1
            k = np.where(eligible, wp, np.inf)
            cache[key] = np.minimum.reduceat(k, sub.vstart) if len(sub.lens) else np.zeros(0)
        per_part = cache[key][members[self._sample_class]]
        per_part = per_part[np.isfinite(per_part)]
        n_parts = int(self._class_size[members].sum())
        return float(per_part.mean()) * n_parts if len(per_part) else 0.0

    def _build_pass(self, q: int, stride: int, gpart: np.ndarray, goff: np.ndarray) -> NativePass:
        """Index the grams at offset goff[k] of part gpart[k] (all values they may take)."""
        gpos = self.vstart[gpart] + goff
        shift = np.arange(q, dtype=np.uint64) * np.uint64(8)
        window = self.values[gpos[:, None] + np.arange(q)[None, :]].astype(np.uint64)
        grams = np.bitwise_or.reduce(window << shift, axis=1)
        end = gpos + q  # grams lie inside their part: no clipping needed
        varying = (self._cs[end] - self._cs[gpos] + self._cb[end] - self._cb[gpos]) > 0
        rows = [
            np.stack(
                [
                    grams[~varying],
                    gpart[~varying].astype(np.uint64),
                    goff[~varying].astype(np.uint64),
                ],
                axis=1,
            )
        ]
        extra = []
        for g, p, o in zip(gpos[varying].tolist(), gpart[varying].tolist(), goff[varying].tolist()):
            base = bytearray(self.values[g : g + q].tobytes())
            j = next(k for k in range(q) if self.kind[g + k] != _STATIC)
            for v in self._byte_values(g + j):
                base[j] = v
                extra.append((int.from_bytes(base, "little"), p, o))
        if extra:
            rows.append(np.array(extra, dtype=np.uint64))
        table = np.concatenate(rows)
        gram = table[:, 0]
        low32 = np.uint64(0xFFFFFFFF)
        x = (gram & low32) ^ (((gram >> np.uint64(32)) * np.uint64(HASH_FOLD)) & low32)
        h1 = (x * np.uint64(HASH_WORD)) & low32  # < 2**64: no wrap-around in numpy
        h2 = (x * np.uint64(HASH_BITS)) & low32
        bloom_words = _bloom_words(len(table))
        word = (h1 >> np.uint64(32 - bloom_words)).astype(np.int64)
        one = np.uint32(1)
        bits = np.left_shift(one, ((h2 >> np.uint64(22)) & np.uint64(31)).astype(np.uint32))
        bits |= np.left_shift(one, (h2 >> np.uint64(27)).astype(np.uint32))
        bloom = np.zeros(1 << bloom_words, dtype=np.uint32)
        np.bitwise_or.at(bloom, word, bits)
        bucket_bits = max(4, int(len(table) - 1).bit_length())
        bucket = (h1 >> np.uint64(32 - bucket_bits)).astype(np.int64)
        order = np.argsort(bucket, kind="stable")
        entries = np.empty((len(table), ENTRY_COLUMNS), dtype=np.int32)
        entries[:, 0] = (gram[order] & low32).astype(np.uint32).view(np.int32)
        entries[:, 1] = (gram[order] >> np.uint64(32)).astype(np.uint32).view(np.int32)
        entries[:, 2] = table[order, 1].astype(np.int32)
        entries[:, 3] = table[order, 2].astype(np.int32)
        bucket_start = np.zeros((1 << bucket_bits) + 1, dtype=np.int32)
        np.cumsum(np.bincount(bucket, minlength=1 << bucket_bits), out=bucket_start[1:])
        return NativePass(q, stride, bloom, bloom_words, bucket_bits, bucket_start, entries)

    def _byte_values(self, g: int) -> list[int]:
        """Every value the (non-static) byte at global position g may take."""
        if g in self.alt_sets:
            return sorted(self.alt_sets[g])
        v, m = int(self.values[g]), int(self.masks[g])
        return sorted({(v & m) | (x & ~m & 0xFF) for x in range(256)})


def _bloom_words(entries: int) -> int:
    """log2 of the 64-bit words of a Bloom filter for that many entries."""
    want = max(1, entries * BLOOM_BITS_PER_ENTRY - 1).bit_length()
    return min(BLOOM_MAX_BITS, max(BLOOM_MIN_BITS, want)) - 5


def _residue_strides(idx: np.ndarray, off: np.ndarray, n: int) -> np.ndarray:
    """Bit S set for each of n parts whose offsets (off[k] belongs to part idx[k]) cover every
    residue mod S, S = 1..STRIDE_MAX."""
    bits = np.zeros(n, dtype=np.int64)
    for st in range(1, STRIDE_MAX + 1):
        seen = np.zeros((n, st), dtype=bool)
        seen[idx, off % st] = True
        bits |= seen.all(axis=1).astype(np.int64) << st
    return bits


def _residue_picks(
    part: np.ndarray, off: np.ndarray, p: np.ndarray, stride: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per part and residue of off mod stride: the offset of lowest (p, off). Parts ascending;
    within a part, residues in the order their first (smallest) offset appears."""
    if not len(part):
        return part, off
    res = off % stride
    order = np.lexsort((off, p, res, part))
    part, off, res = part[order], off[order], res[order]
    head = np.ones(len(part), dtype=bool)
    head[1:] = (part[1:] != part[:-1]) | (res[1:] != res[:-1])
    starts = np.flatnonzero(head)
    first = np.minimum.reduceat(off, starts)
    gpart, goff = part[starts], off[starts]
    keep = np.lexsort((first, gpart))
    return gpart[keep], goff[keep]


def _prefix_count(flags: np.ndarray) -> np.ndarray:
    """int32 ``c`` of length n + 1 with ``c[j]`` = flagged positions before j."""
    c = np.zeros(len(flags) + 1, dtype=np.int32)
    np.cumsum(flags, out=c[1:])
    return c


def _ahead(c: np.ndarray, width: int) -> np.ndarray:
    """``c[min(j + width, n)]`` for every j in 0..n-1, where ``len(c) == n + 1`` (by slices)."""
    n = len(c) - 1
    out = np.empty(n, dtype=c.dtype)
    k = max(0, n - width + 1)
    out[:k] = c[width : width + k]
    out[k:] = c[n]
    return out
