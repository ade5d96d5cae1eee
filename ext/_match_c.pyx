# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Native matcher core: the same hits as offscan._match_py.Core, found without the GIL.

Scan loop per position i (see offscan/_tables.py for how the tables are built):
  1. 2-byte prefilter: bit (buf[i] | buf[i+1] << 8) of an 8 KiB bitmap (stays in L1).
  2. 4-byte atoms: Fibonacci hash of the 32-bit word at i -> 4 Mi-bit Bloom bitmap, then the
     hashed bucket (CSR) holding the exact atoms; 2- and 3-byte atoms: CSR by the 2-byte key.
  3. Verify the candidate part at start = i - atom_off: memcmp for plain parts, value/mask
     bytes plus alternative sets otherwise.
Behaviour that must match the Python twin: which hits are reported (end > min_end, inside the
buffer), and the `once` flag (a part flagged once reports only its first, earliest hit).
"""

from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t, uint64_t
from libc.string cimport memcmp, memcpy
from libcpp.vector cimport vector

import numpy as np
cimport numpy as cnp

cnp.import_array()

NATIVE = True

# Must equal offscan._tables.HASH_MULTIPLIER / BLOOM4_BITS.
cdef uint32_t HASH_MULTIPLIER = 0x9E3779B1u
cdef int BLOOM4_BITS = 22


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
    cdef const int32_t* atom_off
    cdef const uint8_t* pre2
    cdef const uint8_t* bloom4
    cdef int b4_shift
    cdef const int32_t* b4_start
    cdef const uint32_t* e4_atom
    cdef const int32_t* e4_part
    cdef const int32_t* s_start
    cdef const int32_t* es_part
    cdef const uint8_t* es_len
    cdef const uint8_t* es_b2
    cdef bint has4
    cdef bint has_short
    cdef Py_ssize_t n_parts

    def __init__(self, tables):
        t = tables
        self.t = t
        arrays = [
            np.ascontiguousarray(a)
            for a in (
                t.part_len, t.part_vstart, t.values, t.masks, t.part_plain, t.part_once,
                t.part_alt_start, t.alt_off, t.alt_len, t.alt_neg, t.alt_nopt,
                t.alt_pool_start, t.alt_pool, t.atom_off, t.pre2, t.bloom4, t.b4_start,
                t.e4_atom, t.e4_part, t.s_start, t.es_part, t.es_len, t.es_b2,
            )
        ]
        self._keep = arrays
        (a_len, a_vstart, a_values, a_masks, a_plain, a_once, a_alt_start, a_alt_off,
         a_alt_len, a_alt_neg, a_alt_nopt, a_alt_pool_start, a_alt_pool, a_atom_off, a_pre2,
         a_bloom4, a_b4_start, a_e4_atom, a_e4_part, a_s_start, a_es_part, a_es_len,
         a_es_b2) = arrays
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
        self.atom_off = <const int32_t*>_ptr(a_atom_off)
        self.pre2 = <const uint8_t*>_ptr(a_pre2)
        self.bloom4 = <const uint8_t*>_ptr(a_bloom4)
        self.b4_shift = 32 - <int>t.b4_bits
        self.b4_start = <const int32_t*>_ptr(a_b4_start)
        self.e4_atom = <const uint32_t*>_ptr(a_e4_atom)
        self.e4_part = <const int32_t*>_ptr(a_e4_part)
        self.s_start = <const int32_t*>_ptr(a_s_start)
        self.es_part = <const int32_t*>_ptr(a_es_part)
        self.es_len = <const uint8_t*>_ptr(a_es_len)
        self.es_b2 = <const uint8_t*>_ptr(a_es_b2)
        self.has4 = len(t.e4_atom) > 0
        self.has_short = len(t.es_part) > 0
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

    cdef inline void _candidate(self, const uint8_t* buf, int64_t n, int64_t i, int32_t p,
                                int64_t min_end, uint8_t* done,
                                vector[int64_t]* out) noexcept nogil:
        cdef int64_t s, e
        if done[p]:
            return
        s = i - self.atom_off[p]
        e = s + self.part_len[p]
        if s < 0 or e > n or e <= min_end:
            return
        if self._verify(buf, p, s):
            out.push_back(p)
            out.push_back(s)
            if self.part_once[p]:
                done[p] = 1

    cdef void _scan(self, const uint8_t* buf, int64_t n, int64_t min_end, uint8_t* done,
                    vector[int64_t]* out) noexcept nogil:
        cdef int64_t i, e
        cdef uint32_t k, x, h
        cdef int32_t b
        cdef const uint8_t* pre2 = self.pre2
        cdef const uint8_t* bloom4 = self.bloom4
        cdef bint has4 = self.has4
        cdef bint has_short = self.has_short
        cdef int b4_shift = self.b4_shift
        cdef int bloom_shift = 32 - BLOOM4_BITS
        for i in range(n - 1):
            k = buf[i] | (<uint32_t>buf[i + 1] << 8)
            if not (pre2[k >> 3] >> (k & 7)) & 1:
                continue
            if has4 and i + 4 <= n:
                memcpy(&x, buf + i, 4)  # one unaligned little-endian load
                h = x * HASH_MULTIPLIER
                if (bloom4[h >> (bloom_shift + 3)] >> ((h >> bloom_shift) & 7)) & 1:
                    b = <int32_t>(h >> b4_shift)
                    for e in range(self.b4_start[b], self.b4_start[b + 1]):
                        if self.e4_atom[e] == x:
                            self._candidate(buf, n, i, self.e4_part[e], min_end, done, out)
            if has_short:
                for e in range(self.s_start[k], self.s_start[k + 1]):
                    if self.es_len[e] == 3 and (i + 2 >= n or buf[i + 2] != self.es_b2[e]):
                        continue
                    self._candidate(buf, n, i, self.es_part[e], min_end, done, out)

    def find(self, const uint8_t[::1] buf not None, int64_t min_end, uint8_t[::1] done not None):
        """Hits whose part ends after ``min_end`` (window overlap), as (parts, starts) arrays."""
        cdef vector[int64_t] out
        cdef int64_t n = buf.shape[0]
        cdef Py_ssize_t j, count
        if done.shape[0] < self.n_parts:
            raise ValueError("done array shorter than the number of parts")
        if n >= 2 and self.n_parts:
            with nogil:
                self._scan(&buf[0], n, min_end, &done[0], &out)
        count = out.size() // 2
        parts = np.empty(count, dtype=np.int32)
        starts = np.empty(count, dtype=np.int64)
        cdef int32_t[::1] pv = parts
        cdef int64_t[::1] sv = starts
        for j in range(count):
            pv[j] = <int32_t>out[2 * j]
            sv[j] = out[2 * j + 1]
        return parts, starts
