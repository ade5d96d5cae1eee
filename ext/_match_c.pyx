# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Native matcher core: the same hits as offscan._match_py.Core, found without the GIL.

How candidates are found (offscan/_tables.py builds the tables and explains the idea):
  1. Sampling passes. A pass (q, S) reads the q-byte gram at every position i that is a
     multiple of S; each of its parts indexed S grams, one per residue mod S, so every
     occurrence of the part puts exactly one indexed gram on a sampled position. Parts of 8+
     bytes need only one probe per 5 bytes (per 3 with tables too large for the cache).
  2. Filter: two multiplicative hashes of the gram pick a 32-bit Bloom word and two bits in
     it (0.5% to 1.5% false positives). This loop is nearly all the work, so it also has an
     AVX-512 (F + VBMI) version doing 16 samples per step, chosen at run time; both versions
     write the same list of candidate sample positions.
  3. Buckets: for each candidate, the hashed bucket lists (gram, part, offset) entries; an
     equal gram makes start = i - offset a candidate start.
  4. Verify the part there: memcmp for plain parts, value/mask bytes plus alternatives.
The passes run interleaved over blocks of BLOCK bytes so each block is read from L1/L2 once.

Behaviour that must match the Python twin: which hits are reported (end > min_end, inside the
buffer, part not already done) and the `once` flag: a part flagged once that is not done
reports only its earliest hit in this call and is then marked done. Samples do not find a
part's hits in start order (a later start can sit on an earlier sample), so once-parts keep
their earliest hit in a map until the scan ends. Hits are returned sorted by (start, part).

OFFSCAN_SIMD=none (read at import) forces the scalar filter, e.g. to test it on AVX-512 CPUs.
"""

import os

from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t
from libc.string cimport memcmp
from cython.operator cimport dereference as deref
from libcpp.algorithm cimport sort
from libcpp.pair cimport pair
from libcpp.unordered_map cimport unordered_map
from libcpp.vector cimport vector

import numpy as np
cimport numpy as cnp

cnp.import_array()

cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>

    /* Must equal offscan._tables.HASH_WORD / HASH_BITS. h1 = x * HASH_WORD (mod 2**32): its
       top bits pick the Bloom word (and the bucket); h2 = x * HASH_BITS: its bits 22-26 and
       27-31 are the two bit numbers tested in that word. */
    #define OFFSCAN_HASH_WORD 0x9E3779B1u
    #define OFFSCAN_HASH_BITS 0x85EBCA6Bu

    /* OFFSCAN_PAIR[k] = the two bits for k = h2 >> 22: one table load instead of two
       variable-count shifts (slow on x86-64 without BMI2). 4 KiB, stays in L1. */
    static uint32_t OFFSCAN_PAIR[1024];
    static void offscan_init_pairs(void) {
        for (int k = 0; k < 1024; k++)
            OFFSCAN_PAIR[k] = (1u << (k & 31)) | (1u << (k >> 5));
    }

    #if defined(__GNUC__) || defined(__clang__)
    #define offscan_prefetch(p) __builtin_prefetch((p))
    #else
    #define offscan_prefetch(p) ((void)(p))
    #endif

    static inline uint32_t offscan_load32(const uint8_t* p) {
        uint32_t x;
        memcpy(&x, p, 4);  /* one unaligned load */
    #if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
        x = __builtin_bswap32(x);  /* grams are little-endian, as _tables builds them */
    #endif
        return x;
    }

    /* The Bloom test of one gram; the SIMD versions below compute exactly this per lane. */
    static inline int offscan_maybe(const uint32_t* bloom, int word_shift, uint32_t x) {
        uint32_t w = bloom[(x * OFFSCAN_HASH_WORD) >> word_shift];
        uint32_t m = OFFSCAN_PAIR[(x * OFFSCAN_HASH_BITS) >> 22];
        return (w & m) == m;
    }

    #if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    #define OFFSCAN_X86_SIMD 1
    #include <immintrin.h>

    static int offscan_cpu_simd(void) {
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vbmi");
    }

    /* The Bloom test of the samples i, i+S, ..., 16 per step, while the last of a step is
       below `stop` and its two 64-byte loads stay inside the buffer of n bytes; appends the
       positions passing to cand[*nc...] and returns the next sample position. S <= 8, so a
       step's 16 grams lie in 15 * 8 + 4 <= 128 bytes and one byte permute (VBMI) cuts them
       out of two loads; one gather reads their 16 Bloom words. (An AVX2 version with
       gathers for the grams was slower than the scalar loop on the Xeon we measured.) */
    __attribute__((target("avx512f,avx512vbmi")))
    static int64_t offscan_filter_avx512(const uint8_t* buf, int64_t n, int64_t i,
                                         int64_t stop, int64_t S, uint32_t qmask,
                                         const uint32_t* bloom, int word_shift,
                                         int64_t* cand, int64_t* nc) {
        uint8_t idx[64];  /* byte j of lane k <- byte k * S + j of the 128 loaded */
        for (int k = 0; k < 16; k++)
            for (int j = 0; j < 4; j++) idx[4 * k + j] = (uint8_t)(k * S + j);
        const __m512i gather_bytes = _mm512_loadu_si512(idx);
        const __m512i vq = _mm512_set1_epi32((int)qmask);
        const __m512i vword = _mm512_set1_epi32((int)OFFSCAN_HASH_WORD);
        const __m512i vbits = _mm512_set1_epi32((int)OFFSCAN_HASH_BITS);
        const __m512i v31 = _mm512_set1_epi32(31), one = _mm512_set1_epi32(1);
        const __m128i shift = _mm_cvtsi32_si128(word_shift);
        int64_t c = *nc;
        for (; i + 15 * S < stop && i + 128 <= n; i += 16 * S) {
            __m512i g = _mm512_and_si512(_mm512_permutex2var_epi8(
                _mm512_loadu_si512(buf + i), gather_bytes, _mm512_loadu_si512(buf + i + 64)),
                vq);
            __m512i word = _mm512_srl_epi32(_mm512_mullo_epi32(g, vword), shift);
            __m512i w = _mm512_i32gather_epi32(word, (const void*)bloom, 4);
            __m512i h2 = _mm512_mullo_epi32(g, vbits);
            __m512i m = _mm512_or_si512(
                _mm512_sllv_epi32(one, _mm512_and_si512(_mm512_srli_epi32(h2, 22), v31)),
                _mm512_sllv_epi32(one, _mm512_srli_epi32(h2, 27)));
            unsigned k = (unsigned)_mm512_cmpeq_epi32_mask(_mm512_and_si512(w, m), m);
            while (k) {  /* rare: about 1 sample in 100 */
                cand[c++] = i + __builtin_ctz(k) * S;
                k &= k - 1;
            }
        }
        *nc = c;
        return i;
    }
    #else
    static int offscan_cpu_simd(void) { return 0; }
    static int64_t offscan_filter_avx512(const uint8_t* buf, int64_t n, int64_t i,
                                         int64_t stop, int64_t S, uint32_t qmask,
                                         const uint32_t* bloom, int word_shift,
                                         int64_t* cand, int64_t* nc) {
        return i;
    }
    #endif
    """
    void offscan_prefetch(const void* p) nogil
    void offscan_init_pairs() nogil
    uint32_t offscan_load32(const uint8_t* p) nogil
    bint offscan_maybe(const uint32_t* bloom, int word_shift, uint32_t x) nogil
    int offscan_cpu_simd() nogil
    int64_t offscan_filter_avx512(const uint8_t* buf, int64_t n, int64_t i, int64_t stop,
                                  int64_t S, uint32_t qmask, const uint32_t* bloom,
                                  int word_shift, int64_t* cand, int64_t* nc) nogil
    uint32_t OFFSCAN_HASH_WORD

NATIVE = True

offscan_init_pairs()
cdef bint _simd = offscan_cpu_simd()
_choice = os.environ.get("OFFSCAN_SIMD", "").strip().lower()
if _choice not in ("", "none", "avx512"):
    raise ImportError(f"OFFSCAN_SIMD={_choice!r}: expected none or avx512")
if _choice == "none":
    _simd = False
SIMD = "avx512" if _simd else "none"  # the instruction set of the filter loop on this machine

# Bytes scanned by every pass before moving on: 16 KiB stays in L1 (48 KiB) while the Bloom
# filters (<= 1 MiB each) live in L2.
cdef int64_t BLOCK = 16384
cdef enum:
    MAX_PASSES = 4  # sampling passes; _tables.MAX_PASSES uses at most 2
    MAX_STRIDE = 8  # the SIMD lanes address samples up to 15 * 8 bytes on


cdef struct Pass:
    int64_t stride
    int q
    uint32_t qmask  # keeps the low q bytes of a 32-bit little-endian load
    int word_shift  # 32 - bloom_words: the top bits of h1 pick the Bloom word
    int bucket_shift  # 32 - bucket_bits
    const uint32_t* bloom
    const int32_t* bucket_start
    const int32_t* entries  # 3 ints per entry: gram bits, part, offset in part


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

    def __init__(self, tables):
        t = tables
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
            if not 2 <= tp.q <= 4 or not 1 <= tp.stride <= MAX_STRIDE:
                raise ValueError(f"bad pass q={tp.q} stride={tp.stride}")
            if not 1 <= tp.bloom_words <= 31 or len(bloom) != 1 << tp.bloom_words:
                raise ValueError(f"bad Bloom filter of {len(bloom)} words")
            if not 1 <= tp.bucket_bits <= 31 or len(bstart) != (1 << tp.bucket_bits) + 1:
                raise ValueError(f"bad bucket table of {len(bstart)} entries")
            ps = &self.passes[k]
            ps.stride = tp.stride
            ps.q = tp.q
            ps.qmask = <uint32_t>((1 << (8 * tp.q)) - 1)
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
                     uint32_t x, uint32_t b, int64_t min_end, const uint8_t* done,
                     vector[Hit]* out, unordered_map[int32_t, size_t]* first) noexcept nogil:
        """Bucket b of the gram x read at sample i: every equal gram gives a candidate."""
        cdef int32_t e
        cdef const int32_t* ent
        for e in range(ps.bucket_start[b], ps.bucket_start[b + 1]):
            ent = ps.entries + 3 * <int64_t>e
            if <uint32_t>ent[0] == x:
                self._candidate(buf, n, i - ent[2], ent[1], min_end, done, out, first)

    cdef int64_t _scan_pass(self, const Pass* ps, const uint8_t* buf, int64_t n, int64_t i,
                            int64_t stop, int64_t min_end, const uint8_t* done,
                            int64_t* cand, uint32_t* bucket, vector[Hit]* out,
                            unordered_map[int32_t, size_t]* first) noexcept nogil:
        """Probe the samples i, i+S, ... below ``stop`` (at most BLOCK bytes on); returns the
        next sample position. ``cand`` and ``bucket`` have room for BLOCK + 16 samples."""
        cdef int64_t S = ps.stride
        cdef uint32_t qmask = ps.qmask
        cdef const uint32_t* bloom = ps.bloom
        cdef int word_shift = ps.word_shift
        cdef uint32_t x
        cdef int64_t nc = 0, k
        # samples whose whole 32-bit load fits in the buffer
        cdef int64_t full_stop = stop if stop <= n - 3 else n - 3
        # First loop: the Bloom test of every sample, collecting the few that pass.
        if _simd:
            i = offscan_filter_avx512(buf, n, i, full_stop, S, qmask, bloom, word_shift,
                                      cand, &nc)
        # Scalar version (and the samples left over by SIMD): without branches, every test
        # appends its position to `cand` and only a pass keeps it, so a false positive costs
        # no mispredict and the Bloom loads of several samples overlap.
        while i + 3 * S < full_stop:
            cand[nc] = i
            nc += offscan_maybe(bloom, word_shift, offscan_load32(buf + i) & qmask)
            cand[nc] = i + S
            nc += offscan_maybe(bloom, word_shift, offscan_load32(buf + i + S) & qmask)
            cand[nc] = i + 2 * S
            nc += offscan_maybe(bloom, word_shift, offscan_load32(buf + i + 2 * S) & qmask)
            cand[nc] = i + 3 * S
            nc += offscan_maybe(bloom, word_shift, offscan_load32(buf + i + 3 * S) & qmask)
            i += 4 * S
        while i < full_stop:
            cand[nc] = i
            nc += offscan_maybe(bloom, word_shift, offscan_load32(buf + i) & qmask)
            i += S
        # Second loop: the buckets of the samples that passed. With large tables the bucket
        # start and then the entries are two dependent cache misses per sample, so all the
        # starts are requested, then all the entries, before the first entry is compared.
        for k in range(nc):
            x = offscan_load32(buf + cand[k]) & qmask
            bucket[k] = (x * OFFSCAN_HASH_WORD) >> ps.bucket_shift
            offscan_prefetch(ps.bucket_start + bucket[k])
        for k in range(nc):
            offscan_prefetch(ps.entries + 3 * <int64_t>ps.bucket_start[bucket[k]])
        for k in range(nc):
            x = offscan_load32(buf + cand[k]) & qmask
            self._probe(ps, buf, n, cand[k], x, bucket[k], min_end, done, out, first)
        # the last 3 bytes: grams shorter than 4 bytes may still fit
        while i < stop and i + ps.q <= n:
            x = 0
            for k in range(ps.q):
                x |= <uint32_t>buf[i + k] << (8 * k)
            if offscan_maybe(bloom, word_shift, x):
                self._probe(ps, buf, n, i, x, (x * OFFSCAN_HASH_WORD) >> ps.bucket_shift,
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
