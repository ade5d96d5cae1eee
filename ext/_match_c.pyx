# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Native matcher core: the same hits as offscan._match_py.Core, found without the GIL.

How candidates are found (offscan/_tables.py builds the tables and explains the idea):
  1. Sampling passes. A pass (q, S) reads the q-byte gram (q = 2..8) at every position i that
     is a multiple of S; each of its parts indexed S grams, one per residue mod S, so every
     occurrence of the part puts exactly one indexed gram on a sampled position. Parts of 15+
     bytes allow 8-byte grams every 8 bytes: one probe per 8 bytes, and grams that long are
     rare in real files even when they are code.
  2. Filter: the gram is folded to 32 bits and two multiplicative hashes pick a 32-bit Bloom
     word and two bits in it. This loop is nearly all the work; ext/offscan_filter.h has it
     in scalar, AVX2 and AVX-512 versions, chosen at import (SIMD, OFFSCAN_SIMD); all write
     the same list of candidate sample positions.
  3. Buckets: for each candidate, the hashed bucket lists (gram, part, offset) entries; an
     equal gram makes start = i - offset a candidate start.
  4. Verify the part there: memcmp for plain parts, value/mask bytes plus alternatives.
The passes run interleaved over blocks of BLOCK bytes so each block is read from L1/L2 once.

Behaviour that must match the Python twin: which hits are reported (end > min_end, inside the
buffer, part not already done) and the `once` flag: a part flagged once that is not done
reports only its earliest hit in this call and is then marked done. Samples do not find a
part's hits in start order (a later start can sit on an earlier sample), so once-parts keep
their earliest hit in a map until the scan ends. Hits are returned sorted by (start, part).

OFFSCAN_SIMD=none|avx2|avx512 (read at import) forces one filter loop, e.g. to test the scalar
and AVX2 loops on an AVX-512 CPU; asking for one the CPU lacks fails the import.
"""

import os

from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t, uint64_t
from libc.string cimport memcmp
from cython.operator cimport dereference as deref
from libcpp.algorithm cimport sort
from libcpp.pair cimport pair
from libcpp.unordered_map cimport unordered_map
from libcpp.vector cimport vector

import numpy as np
cimport numpy as cnp

cnp.import_array()

cdef extern from "offscan_filter.h":
    void offscan_prefetch(const void* p) nogil
    void offscan_init_pairs() nogil
    uint64_t offscan_load64(const uint8_t* p) nogil
    uint64_t offscan_load_tail(const uint8_t* p, int q) nogil
    uint32_t offscan_fold(uint64_t g) nogil
    bint offscan_maybe(const uint32_t* bloom, int word_shift, uint32_t x) nogil
    int offscan_cpu_avx512() nogil
    int offscan_cpu_avx2() nogil
    ctypedef int64_t (*offscan_filter_fn)(const uint8_t* buf, int64_t n, int64_t i,
                                          int64_t stop, int64_t S, uint64_t qmask,
                                          const uint32_t* bloom, int word_shift, int64_t* cand,
                                          int64_t* nc) noexcept nogil
    int64_t offscan_filter_scalar(const uint8_t* buf, int64_t n, int64_t i, int64_t stop,
                                  int64_t S, uint64_t qmask, const uint32_t* bloom,
                                  int word_shift, int64_t* cand, int64_t* nc) nogil
    int64_t offscan_filter_avx2(const uint8_t* buf, int64_t n, int64_t i, int64_t stop,
                                int64_t S, uint64_t qmask, const uint32_t* bloom,
                                int word_shift, int64_t* cand, int64_t* nc) nogil
    int64_t offscan_filter_avx512(const uint8_t* buf, int64_t n, int64_t i, int64_t stop,
                                  int64_t S, uint64_t qmask, const uint32_t* bloom,
                                  int word_shift, int64_t* cand, int64_t* nc) nogil
    uint32_t OFFSCAN_HASH_WORD

NATIVE = True

offscan_init_pairs()
# The filter loop (ext/offscan_filter.h): the widest this CPU has, or OFFSCAN_SIMD's choice.
_HAVE = ["none"] + (["avx2"] if offscan_cpu_avx2() else []) + (
    ["avx512"] if offscan_cpu_avx512() else [])
_choice = os.environ.get("OFFSCAN_SIMD", "").strip().lower() or _HAVE[len(_HAVE) - 1]
if _choice not in ("none", "avx2", "avx512"):
    raise ImportError(f"OFFSCAN_SIMD={_choice!r}: expected none, avx2 or avx512")
if _choice not in _HAVE:
    raise ImportError(f"OFFSCAN_SIMD={_choice}: this CPU only has {', '.join(_HAVE)}")
SIMD = _choice  # the instruction set of the filter loop in use
SIMD_AVAILABLE = tuple(_HAVE)  # every path this CPU can run


cdef offscan_filter_fn _filter_of(str simd):
    return (offscan_filter_avx512 if simd == "avx512" else
            offscan_filter_avx2 if simd == "avx2" else offscan_filter_scalar)

# Bytes scanned by every pass before moving on: 16 KiB stays in L1 (48 KiB) while the Bloom
# filters (<= 1 MiB each) live in L2.
cdef int64_t BLOCK = 16384
cdef enum:
    MAX_PASSES = 4  # sampling passes; _tables.MAX_PASSES uses at most 2
    MAX_STRIDE = 8  # the AVX-512 lanes address samples up to 15 * 8 + 8 bytes on
    ENTRY = 4  # int32 per bucket entry: gram low, gram high, part, offset in part


cdef struct Pass:
    int64_t stride
    int q
    uint64_t qmask  # keeps the low q bytes of a 64-bit little-endian load
    int word_shift  # 32 - bloom_words: the top bits of h1 pick the Bloom word
    int bucket_shift  # 32 - bucket_bits
    const uint32_t* bloom
    const int32_t* bucket_start
    const int32_t* entries  # ENTRY ints per entry


ctypedef pair[int64_t, int32_t] Hit  # (start, part)


cdef inline void* _ptr(object arr):
    return cnp.PyArray_DATA(<cnp.ndarray>arr)


cdef class Core:
    """Finds every verified (part, start) hit of the compiled parts in a buffer."""

    cdef object t
    cdef list _keep
    cdef const int32_t* part_len
    cdef const int64_t* part_vstart
    cdef const uint8_t* values
    cdef const uint8_t* masks
    cdef const uint8_t* part_plain
    cdef const uint8_t* part_once
    cdef const int32_t* part_alt_start
    cdef const int32_t* alt_off
    cdef const int32_t* alt_len
    cdef const uint8_t* alt_neg
    cdef const int32_t* alt_nopt
    cdef const int64_t* alt_pool_start
    cdef const uint8_t* alt_pool
    cdef Pass passes[MAX_PASSES]
    cdef int n_passes
    cdef Py_ssize_t n_parts
    cdef offscan_filter_fn filter
    cdef readonly str simd

    def __init__(self, tables, *, simd=None):
        """``simd`` picks this core's filter loop (one of SIMD_AVAILABLE; default SIMD), so
        tests can run every path in one process."""
        t = tables
        simd = SIMD if simd is None else simd
        if simd not in SIMD_AVAILABLE:
            raise ValueError(f"simd={simd!r}: this CPU has {', '.join(SIMD_AVAILABLE)}")
        self.simd = simd
        self.filter = _filter_of(simd)
        self.t = t
        arrays = [
            np.ascontiguousarray(a)
            for a in (
                t.part_len, t.part_vstart, t.values, t.masks, t.part_plain, t.part_once,
                t.part_alt_start, t.alt_off, t.alt_len, t.alt_neg, t.alt_nopt,
                t.alt_pool_start, t.alt_pool,
            )
        ]
        (a_len, a_vstart, a_values, a_masks, a_plain, a_once, a_alt_start, a_alt_off,
         a_alt_len, a_alt_neg, a_alt_nopt, a_alt_pool_start, a_alt_pool) = arrays
        self.part_len = <const int32_t*>_ptr(a_len)
        self.part_vstart = <const int64_t*>_ptr(a_vstart)
        self.values = <const uint8_t*>_ptr(a_values)
        self.masks = <const uint8_t*>_ptr(a_masks)
        self.part_plain = <const uint8_t*>_ptr(a_plain)
        self.part_once = <const uint8_t*>_ptr(a_once)
        self.part_alt_start = <const int32_t*>_ptr(a_alt_start)
        self.alt_off = <const int32_t*>_ptr(a_alt_off)
        self.alt_len = <const int32_t*>_ptr(a_alt_len)
        self.alt_neg = <const uint8_t*>_ptr(a_alt_neg)
        self.alt_nopt = <const int32_t*>_ptr(a_alt_nopt)
        self.alt_pool_start = <const int64_t*>_ptr(a_alt_pool_start)
        self.alt_pool = <const uint8_t*>_ptr(a_alt_pool)
        if len(t.passes) > MAX_PASSES:
            raise ValueError(f"at most {MAX_PASSES} sampling passes are supported")
        self.n_passes = len(t.passes)
        cdef Pass* ps
        for k, tp in enumerate(t.passes):
            bloom = np.ascontiguousarray(tp.bloom, dtype=np.uint32)
            bstart = np.ascontiguousarray(tp.bucket_start, dtype=np.int32)
            entries = np.ascontiguousarray(tp.entries, dtype=np.int32)
            arrays += [bloom, bstart, entries]
            if not 2 <= tp.q <= 8 or not 1 <= tp.stride <= MAX_STRIDE:
                raise ValueError(f"bad pass q={tp.q} stride={tp.stride}")
            if not 1 <= tp.bloom_words <= 31 or len(bloom) != 1 << tp.bloom_words:
                raise ValueError(f"bad Bloom filter of {len(bloom)} words")
            if not 1 <= tp.bucket_bits <= 31 or len(bstart) != (1 << tp.bucket_bits) + 1:
                raise ValueError(f"bad bucket table of {len(bstart)} entries")
            ps = &self.passes[k]
            ps.stride = tp.stride
            ps.q = tp.q
            if entries.ndim != 2 or entries.shape[1] != ENTRY:
                raise ValueError(f"bucket entries must have {ENTRY} columns")
            ps.qmask = <uint64_t>((1 << (8 * tp.q)) - 1)
            ps.word_shift = 32 - <int>tp.bloom_words
            ps.bucket_shift = 32 - <int>tp.bucket_bits
            ps.bloom = <const uint32_t*>_ptr(bloom)
            ps.bucket_start = <const int32_t*>_ptr(bstart)
            ps.entries = <const int32_t*>_ptr(entries)
        self._keep = arrays
        self.n_parts = len(t.part_len)

    cdef inline bint _verify(self, const uint8_t* buf, int32_t p, int64_t s) noexcept nogil:
        cdef int64_t ln = self.part_len[p]
        cdef const uint8_t* v = self.values + self.part_vstart[p]
        cdef const uint8_t* m
        cdef const uint8_t* w = buf + s
        cdef int64_t i
        cdef int32_t a, o, alen, nopt
        cdef const uint8_t* pool
        cdef bint found
        if self.part_plain[p]:
            return memcmp(w, v, ln) == 0
        m = self.masks + self.part_vstart[p]
        for i in range(ln):
            if (w[i] & m[i]) != v[i]:
                return False
        for a in range(self.part_alt_start[p], self.part_alt_start[p + 1]):
            alen = self.alt_len[a]
            nopt = self.alt_nopt[a]
            pool = self.alt_pool + self.alt_pool_start[a]
            found = False
            for o in range(nopt):
                if memcmp(w + self.alt_off[a], pool + <int64_t>o * alen, alen) == 0:
                    found = True
                    break
            if found == <bint>self.alt_neg[a]:
                return False
        return True

    cdef void _candidate(self, const uint8_t* buf, int64_t n, int64_t s, int32_t p,
                         int64_t min_end, const uint8_t* done, vector[Hit]* out,
                         unordered_map[int32_t, size_t]* first) noexcept nogil:
        cdef int64_t e = s + self.part_len[p]
        cdef unordered_map[int32_t, size_t].iterator it
        cdef size_t slot
        if done[p] or s < 0 or e > n or e <= min_end:
            return
        if not self._verify(buf, p, s):
            return
        if self.part_once[p]:
            it = first.find(p)
            if it != first.end():
                slot = deref(it).second
                if s < deref(out)[slot].first:
                    deref(out)[slot].first = s
                return
            deref(first)[p] = out.size()
        out.push_back(Hit(s, p))

    cdef void _probe(self, const Pass* ps, const uint8_t* buf, int64_t n, int64_t i,
                     uint64_t g, uint32_t b, int64_t min_end, const uint8_t* done,
                     vector[Hit]* out, unordered_map[int32_t, size_t]* first) noexcept nogil:
        """Bucket b of the gram g read at sample i: every equal gram gives a candidate."""
        cdef int32_t e
        cdef const int32_t* ent
        cdef uint32_t lo = <uint32_t>g, hi = <uint32_t>(g >> 32)
        for e in range(ps.bucket_start[b], ps.bucket_start[b + 1]):
            ent = ps.entries + ENTRY * <int64_t>e
            if <uint32_t>ent[0] == lo and <uint32_t>ent[1] == hi:
                self._candidate(buf, n, i - ent[3], ent[2], min_end, done, out, first)

    cdef int64_t _scan_pass(self, const Pass* ps, const uint8_t* buf, int64_t n, int64_t i,
                            int64_t stop, int64_t min_end, const uint8_t* done,
                            int64_t* cand, uint32_t* bucket, vector[Hit]* out,
                            unordered_map[int32_t, size_t]* first) noexcept nogil:
        """Probe the samples i, i+S, ... below ``stop`` (at most BLOCK bytes on); returns the
        next sample position. ``cand`` and ``bucket`` have room for BLOCK + 16 samples."""
        cdef int64_t S = ps.stride
        cdef uint64_t qmask = ps.qmask
        cdef uint64_t g
        cdef int64_t nc = 0, k
        # First loop: the Bloom test of every sample, collecting the few that pass; the SIMD
        # versions leave their last samples to the scalar one, which stops where an 8-byte
        # load would leave the buffer.
        i = self.filter(buf, n, i, stop, S, qmask, ps.bloom, ps.word_shift, cand, &nc)
        i = offscan_filter_scalar(buf, n, i, stop, S, qmask, ps.bloom, ps.word_shift, cand,
                                  &nc)
        # Second loop: the buckets of the samples that passed. With large tables the bucket
        # start and then the entries are two dependent cache misses per sample, so all the
        # starts are requested, then all the entries, before the first entry is compared.
        for k in range(nc):
            g = offscan_load64(buf + cand[k]) & qmask
            bucket[k] = (offscan_fold(g) * OFFSCAN_HASH_WORD) >> ps.bucket_shift
            offscan_prefetch(ps.bucket_start + bucket[k])
        for k in range(nc):
            offscan_prefetch(ps.entries + ENTRY * <int64_t>ps.bucket_start[bucket[k]])
        for k in range(nc):
            g = offscan_load64(buf + cand[k]) & qmask
            self._probe(ps, buf, n, cand[k], g, bucket[k], min_end, done, out, first)
        # the last 7 bytes: grams shorter than 8 bytes may still fit
        while i < stop and i + ps.q <= n:
            g = offscan_load_tail(buf + i, ps.q)
            if offscan_maybe(ps.bloom, ps.word_shift, offscan_fold(g)):
                self._probe(ps, buf, n, i, g,
                            (offscan_fold(g) * OFFSCAN_HASH_WORD) >> ps.bucket_shift,
                            min_end, done, out, first)
            i += S
        return i

    cdef void _scan(self, const uint8_t* buf, int64_t n, int64_t min_end, uint8_t* done,
                    vector[Hit]* out) noexcept nogil:
        cdef unordered_map[int32_t, size_t] first
        cdef vector[int64_t] cand
        cdef vector[uint32_t] bucket
        cdef int64_t nxt[MAX_PASSES]
        cdef int64_t block, stop
        cdef int k
        cdef size_t j
        cand.resize(BLOCK + 16)
        bucket.resize(BLOCK + 16)
        for k in range(self.n_passes):
            nxt[k] = 0
        block = 0
        while block < n:
            stop = block + BLOCK if block + BLOCK < n else n
            for k in range(self.n_passes):
                nxt[k] = self._scan_pass(&self.passes[k], buf, n, nxt[k], stop, min_end, done,
                                         cand.data(), bucket.data(), out, &first)
            block = stop
        for j in range(out.size()):
            if self.part_once[deref(out)[j].second]:
                done[deref(out)[j].second] = 1
        sort(out.begin(), out.end())

    def find(self, const uint8_t[::1] buf not None, int64_t min_end, uint8_t[::1] done not None):
        """Hits whose part ends after ``min_end`` (window overlap), as (parts, starts) arrays."""
        cdef vector[Hit] out
        cdef int64_t n = buf.shape[0]
        cdef Py_ssize_t j, count
        if done.shape[0] < self.n_parts:
            raise ValueError("done array shorter than the number of parts")
        if n >= 2 and self.n_parts:
            with nogil:
                self._scan(&buf[0], n, min_end, &done[0], &out)
        count = out.size()
        parts = np.empty(count, dtype=np.int32)
        starts = np.empty(count, dtype=np.int64)
        cdef int32_t[::1] pv = parts
        cdef int64_t[::1] sv = starts
        for j in range(count):
            pv[j] = out[j].second
            sv[j] = out[j].first
        return parts, starts
