/* The filter loop of offscan's native matcher core, in three versions chosen at run time:
 * scalar, AVX2 and AVX-512 (F + BW + VBMI). All three compute, for the samples
 * i, i + S, i + 2S, ... of one sampling pass, the Bloom test of the gram read there, and
 * append the positions that pass to cand[]; they must write exactly the same list (the tests
 * compare every path with the Python twin).
 *
 * A gram is the q-byte little-endian integer g at a sample (q = 2..8, read with one 64-bit
 * load and masked). It is folded to 32 bits, x = lo32(g) ^ hi32(g) * OFFSCAN_HASH_FOLD (so a
 * gram of 4 bytes or fewer is its own fold), then h1 = x * OFFSCAN_HASH_WORD picks the Bloom
 * word (top bits) and h2 = x * OFFSCAN_HASH_BITS the two bits tested in it (bits 22-26 and
 * 27-31). The constants must equal offscan._tables.HASH_*.
 */
#ifndef OFFSCAN_FILTER_H
#define OFFSCAN_FILTER_H

#include <stdint.h>
#include <string.h>

#define OFFSCAN_HASH_WORD 0x9E3779B1u
#define OFFSCAN_HASH_BITS 0x85EBCA6Bu
#define OFFSCAN_HASH_FOLD 0xC2B2AE35u

/* OFFSCAN_PAIR[k] = the two bits for k = h2 >> 22: one table load instead of two
   variable-count shifts. 4 KiB, stays in L1. */
static uint32_t OFFSCAN_PAIR[1024];
static void offscan_init_pairs(void) {
    for (int k = 0; k < 1024; k++) OFFSCAN_PAIR[k] = (1u << (k & 31)) | (1u << (k >> 5));
}

#if defined(__GNUC__) || defined(__clang__)
#define offscan_prefetch(p) __builtin_prefetch((p))
#else
#define offscan_prefetch(p) ((void)(p))
#endif

typedef int64_t (*offscan_filter_fn)(const uint8_t* buf, int64_t n, int64_t i, int64_t stop,
                                     int64_t S, uint64_t qmask, const uint32_t* bloom,
                                     int word_shift, int64_t* cand, int64_t* nc);

static inline uint64_t offscan_load64(const uint8_t* p) {
    uint64_t x;
    memcpy(&x, p, 8); /* one unaligned load */
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    x = __builtin_bswap64(x); /* grams are little-endian, as _tables builds them */
#endif
    return x;
}

/* The gram of q bytes at p when fewer than 8 bytes are left in the buffer. */
static inline uint64_t offscan_load_tail(const uint8_t* p, int q) {
    uint64_t x = 0;
    for (int k = 0; k < q; k++) x |= (uint64_t)p[k] << (8 * k);
    return x;
}

static inline uint32_t offscan_fold(uint64_t g) {
    return (uint32_t)g ^ ((uint32_t)(g >> 32) * OFFSCAN_HASH_FOLD);
}

static inline int offscan_maybe(const uint32_t* bloom, int word_shift, uint32_t x) {
    uint32_t w = bloom[(x * OFFSCAN_HASH_WORD) >> word_shift];
    uint32_t m = OFFSCAN_PAIR[(x * OFFSCAN_HASH_BITS) >> 22];
    return (w & m) == m;
}

/* Scalar version, and the samples the SIMD versions leave over. Branch-free: every test
   appends its position and only a pass keeps it, so a false positive costs no mispredict.
   Stops before the first sample whose 8-byte load would leave the buffer (i + 8 > n). */
static int64_t offscan_filter_scalar(const uint8_t* buf, int64_t n, int64_t i, int64_t stop,
                                     int64_t S, uint64_t qmask, const uint32_t* bloom,
                                     int word_shift, int64_t* cand, int64_t* nc) {
    int64_t c = *nc;
    int64_t full = n - 8 < stop ? n - 7 : stop; /* samples below `full` load 8 bytes */
    for (; i + 3 * S < full; i += 4 * S) {
        cand[c] = i;
        c += offscan_maybe(bloom, word_shift, offscan_fold(offscan_load64(buf + i) & qmask));
        cand[c] = i + S;
        c += offscan_maybe(bloom, word_shift,
                           offscan_fold(offscan_load64(buf + i + S) & qmask));
        cand[c] = i + 2 * S;
        c += offscan_maybe(bloom, word_shift,
                           offscan_fold(offscan_load64(buf + i + 2 * S) & qmask));
        cand[c] = i + 3 * S;
        c += offscan_maybe(bloom, word_shift,
                           offscan_fold(offscan_load64(buf + i + 3 * S) & qmask));
    }
    for (; i < full; i += S) {
        cand[c] = i;
        c += offscan_maybe(bloom, word_shift, offscan_fold(offscan_load64(buf + i) & qmask));
    }
    *nc = c;
    return i;
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define OFFSCAN_X86_SIMD 1
#include <immintrin.h>

static int offscan_cpu_avx512(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vbmi");
}

static int offscan_cpu_avx2(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2");
}

/* 16 samples per step. S <= 8, so a step's 16 grams lie in 15 * 8 + 8 <= 128 bytes, and two
   byte permutes (VBMI) cut their low and high halves out of two 64-byte loads; one gather
   reads their 16 Bloom words. */
__attribute__((target("avx512f,avx512bw,avx512vbmi"))) static int64_t offscan_filter_avx512(
    const uint8_t* buf, int64_t n, int64_t i, int64_t stop, int64_t S, uint64_t qmask,
    const uint32_t* bloom, int word_shift, int64_t* cand, int64_t* nc) {
    uint8_t idx[64], idx_hi[64]; /* byte j of lane k <- byte k * S + j of the 128 loaded */
    for (int k = 0; k < 16; k++)
        for (int j = 0; j < 4; j++) {
            idx[4 * k + j] = (uint8_t)(k * S + j);
            idx_hi[4 * k + j] = (uint8_t)(k * S + j + 4);
        }
    const __m512i lo_bytes = _mm512_loadu_si512(idx), hi_bytes = _mm512_loadu_si512(idx_hi);
    const __m512i vlo = _mm512_set1_epi32((int)(uint32_t)qmask);
    const __m512i vhi = _mm512_set1_epi32((int)(uint32_t)(qmask >> 32));
    const int long_grams = (qmask >> 32) != 0;
    const __m512i vfold = _mm512_set1_epi32((int)OFFSCAN_HASH_FOLD);
    const __m512i vword = _mm512_set1_epi32((int)OFFSCAN_HASH_WORD);
    const __m512i vbits = _mm512_set1_epi32((int)OFFSCAN_HASH_BITS);
    const __m512i v31 = _mm512_set1_epi32(31), one = _mm512_set1_epi32(1);
    const __m128i shift = _mm_cvtsi32_si128(word_shift);
    int64_t c = *nc;
    for (; i + 15 * S < stop && i + 128 <= n; i += 16 * S) {
        __m512i a = _mm512_loadu_si512(buf + i), b = _mm512_loadu_si512(buf + i + 64);
        __m512i x = _mm512_and_si512(_mm512_permutex2var_epi8(a, lo_bytes, b), vlo);
        if (long_grams) {
            __m512i hi = _mm512_and_si512(_mm512_permutex2var_epi8(a, hi_bytes, b), vhi);
            x = _mm512_xor_si512(x, _mm512_mullo_epi32(hi, vfold));
        }
        __m512i word = _mm512_srl_epi32(_mm512_mullo_epi32(x, vword), shift);
        __m512i w = _mm512_i32gather_epi32(word, (const void*)bloom, 4);
        __m512i h2 = _mm512_mullo_epi32(x, vbits);
        __m512i m = _mm512_or_si512(
            _mm512_sllv_epi32(one, _mm512_and_si512(_mm512_srli_epi32(h2, 22), v31)),
            _mm512_sllv_epi32(one, _mm512_srli_epi32(h2, 27)));
        unsigned k = (unsigned)_mm512_cmpeq_epi32_mask(_mm512_and_si512(w, m), m);
        while (k) { /* rare: about 1 sample in 100 */
            cand[c++] = i + __builtin_ctz(k) * S;
            k &= k - 1;
        }
    }
    *nc = c;
    return i;
}

/* 8 samples per step. How the 8 grams get into the 8 lanes depends on the stride:
   S = 8: 64 contiguous bytes, deinterleaved into low and high dwords;
   S = 4 with grams of 4 bytes or fewer: 32 contiguous bytes are the 8 grams;
   S <= 3 with grams of 4 bytes or fewer, S <= 2 with longer ones: four grams fit in 16 bytes,
   so X holds the 16 bytes at i (low half) and i + 4S (high half) and one byte shuffle per
   dword half cuts all 8 out of it;
   any other S <= 8: byte shuffles (pshufb works inside 128-bit halves): X holds the 16 bytes
   at i (low half) and i + 4S (high half), Y those at i + 2S and i + 6S; lanes 0, 1 (4, 5) are
   cut out of X and lanes 2, 3 (6, 7) out of Y, then blended, since two grams S apart fit in
   S + 8 <= 16 bytes. No gathers for grams (slow on AMD cores); one gather reads the 8 Bloom
   words. Then the same arithmetic as the AVX-512 version. */
__attribute__((target("avx2"))) static int64_t offscan_filter_avx2(
    const uint8_t* buf, int64_t n, int64_t i, int64_t stop, int64_t S, uint64_t qmask,
    const uint32_t* bloom, int word_shift, int64_t* cand, int64_t* nc) {
    const __m256i vlo = _mm256_set1_epi32((int)(uint32_t)qmask);
    const __m256i vhi = _mm256_set1_epi32((int)(uint32_t)(qmask >> 32));
    const int long_grams = (qmask >> 32) != 0;
    const __m256i vfold = _mm256_set1_epi32((int)OFFSCAN_HASH_FOLD);
    const __m256i vword = _mm256_set1_epi32((int)OFFSCAN_HASH_WORD);
    const __m256i vbits = _mm256_set1_epi32((int)OFFSCAN_HASH_BITS);
    const __m256i v31 = _mm256_set1_epi32(31), one = _mm256_set1_epi32(1);
    const __m256i even_odd = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
    const __m128i shift = _mm_cvtsi32_si128(word_shift);
    const int fits16 = long_grams ? S <= 2 : S <= 3; /* four grams in 16 bytes */
    const int mode = S == 8 ? 0 : (S == 4 && !long_grams) ? 1 : fits16 ? 3 : 2;
    /* pshufb controls: dword 0 <- bytes 0..3, dword 1 <- bytes S..S+3 (for X; dwords 2, 3 for
       Y), and the same 4 bytes further on for the high halves of long grams */
    uint8_t cx[16], cy[16], cxh[16], cyh[16], cz[16], czh[16];
    for (int j = 0; j < 16; j++) {
        int dw = j / 4, b = j % 4, src = (dw & 1) * (int)S + b;
        cx[j] = dw < 2 ? (uint8_t)src : 0x80;
        cy[j] = dw >= 2 ? (uint8_t)src : 0x80;
        cxh[j] = dw < 2 ? (uint8_t)(src + 4) : 0x80;
        cyh[j] = dw >= 2 ? (uint8_t)(src + 4) : 0x80;
        /* mode 3: dword dw <- bytes dw * S .. dw * S + 3 (+ 4 for the high halves) */
        cz[j] = (uint8_t)(dw * (int)S + b);
        czh[j] = (uint8_t)(dw * (int)S + b + 4);
    }
    const __m256i sx = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)cx));
    const __m256i sy = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)cy));
    const __m256i sxh = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)cxh));
    const __m256i syh = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)cyh));
    const __m256i sz = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)cz));
    const __m256i szh = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)czh));
    /* bytes a step may read past i: 64 (mode 0), 32 (mode 1), 6S + 16 (mode 2), 4S + 16
       (mode 3) */
    const int64_t reach = mode == 0 ? 64 : mode == 1 ? 32 : mode == 3 ? 4 * S + 16 : 6 * S + 16;
    int64_t c = *nc;
    for (; i + 7 * S < stop && i + reach <= n; i += 8 * S) {
        __m256i x, hi;
        if (mode == 0) {
            __m256i a = _mm256_permutevar8x32_epi32(
                _mm256_loadu_si256((const __m256i*)(buf + i)), even_odd);
            __m256i b = _mm256_permutevar8x32_epi32(
                _mm256_loadu_si256((const __m256i*)(buf + i + 32)), even_odd);
            x = _mm256_permute2x128_si256(a, b, 0x20);
            hi = _mm256_permute2x128_si256(a, b, 0x31);
        } else if (mode == 1) {
            x = _mm256_loadu_si256((const __m256i*)(buf + i));
            hi = _mm256_setzero_si256();
        } else if (mode == 3) {
            __m256i X = _mm256_loadu2_m128i((const __m128i*)(buf + i + 4 * S),
                                            (const __m128i*)(buf + i));
            x = _mm256_shuffle_epi8(X, sz);
            hi = long_grams ? _mm256_shuffle_epi8(X, szh) : _mm256_setzero_si256();
        } else {
            __m256i X = _mm256_loadu2_m128i((const __m128i*)(buf + i + 4 * S),
                                            (const __m128i*)(buf + i));
            __m256i Y = _mm256_loadu2_m128i((const __m128i*)(buf + i + 6 * S),
                                            (const __m128i*)(buf + i + 2 * S));
            x = _mm256_or_si256(_mm256_shuffle_epi8(X, sx), _mm256_shuffle_epi8(Y, sy));
            hi = long_grams ? _mm256_or_si256(_mm256_shuffle_epi8(X, sxh),
                                              _mm256_shuffle_epi8(Y, syh))
                            : _mm256_setzero_si256();
        }
        x = _mm256_and_si256(x, vlo);
        if (long_grams)
            x = _mm256_xor_si256(x, _mm256_mullo_epi32(_mm256_and_si256(hi, vhi), vfold));
        __m256i word = _mm256_srl_epi32(_mm256_mullo_epi32(x, vword), shift);
        __m256i w = _mm256_i32gather_epi32((const int*)bloom, word, 4);
        __m256i h2 = _mm256_mullo_epi32(x, vbits);
        __m256i m = _mm256_or_si256(
            _mm256_sllv_epi32(one, _mm256_and_si256(_mm256_srli_epi32(h2, 22), v31)),
            _mm256_sllv_epi32(one, _mm256_srli_epi32(h2, 27)));
        __m256i eq = _mm256_cmpeq_epi32(_mm256_and_si256(w, m), m);
        unsigned k = (unsigned)_mm256_movemask_ps(_mm256_castsi256_ps(eq));
        while (k) {
            cand[c++] = i + __builtin_ctz(k) * S;
            k &= k - 1;
        }
    }
    *nc = c;
    return i;
}
#else
static int offscan_cpu_avx512(void) { return 0; }
static int offscan_cpu_avx2(void) { return 0; }
static int64_t offscan_filter_avx512(const uint8_t* buf, int64_t n, int64_t i, int64_t stop,
                                     int64_t S, uint64_t qmask, const uint32_t* bloom,
                                     int word_shift, int64_t* cand, int64_t* nc) {
    return i;
}
static int64_t offscan_filter_avx2(const uint8_t* buf, int64_t n, int64_t i, int64_t stop,
                                   int64_t S, uint64_t qmask, const uint32_t* bloom,
                                   int word_shift, int64_t* cand, int64_t* nc) {
    return i;
}
#endif

#endif /* OFFSCAN_FILTER_H */
