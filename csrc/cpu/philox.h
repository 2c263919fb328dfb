// DARE's random drops: the counter-based generator keyed by (model key, element index), so a drop depends on
// neither the backend, the chunking nor the thread count.
//
// Internal linkage (anonymous namespace): every ISA file compiles its own copy with its own flags (see dtype.h).
#pragma once

#include <cstdint>
#ifdef __AVX2__
#include <immintrin.h>
#endif

namespace pysoup {
namespace {

// Philox4x32-10 exactly as Triton's tl.randint4x(seed=key, offset=c0) with c1 = hi 32 bits of the counter:
// DARE's drop decision for element e of model i is word (e % 4) of philox(key_i, e / 4).
inline uint32_t philox_word(uint64_t key, uint64_t e) {
    uint32_t c0 = uint32_t(e >> 2), c1 = uint32_t(e >> 34), c2 = 0, c3 = 0;
    uint32_t k0 = uint32_t(key), k1 = uint32_t(key >> 32);
    for (int r = 0; r < 10; ++r) {
        const uint32_t a0 = c0, a2 = c2;
        const uint64_t p0 = uint64_t(0xD2511F53u) * a0, p2 = uint64_t(0xCD9E8D57u) * a2;
        c0 = uint32_t(p2 >> 32) ^ c1 ^ k0;
        c2 = uint32_t(p0 >> 32) ^ c3 ^ k1;
        c1 = uint32_t(p2);
        c3 = uint32_t(p0);
        k0 += 0x9E3779B9u;
        k1 += 0xBB67AE85u;
    }
    switch (e & 3) {
    case 0: return c0;
    case 1: return c1;
    case 2: return c2;
    default: return c3;
    }
}

#ifdef __AVX2__
// The high and low 32 bits of m * x in each of the 8 lanes (m a broadcast constant): even lanes from one widening
// multiply, odd lanes from another, blended.
inline void mul_hi_lo(__m256i m, __m256i x, __m256i& hi, __m256i& lo) {
    const __m256i even = _mm256_mul_epu32(x, m), odd = _mm256_mul_epu32(_mm256_srli_epi64(x, 32), m);
    hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
    lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
}

// Groups [g0, g0 + 8) of philox_words, 8 generators at once (one per lane), interleaved into out[0, 32).
inline void philox_8_groups(uint32_t key0, uint32_t key1, uint64_t g0, uint32_t* out) {
    const uint64_t g = g0;
    __m256i c0 =
        _mm256_setr_epi32(int(uint32_t(g)), int(uint32_t(g + 1)), int(uint32_t(g + 2)), int(uint32_t(g + 3)),
                          int(uint32_t(g + 4)), int(uint32_t(g + 5)), int(uint32_t(g + 6)), int(uint32_t(g + 7)));
    __m256i c1 =
        _mm256_setr_epi32(int(uint32_t(g >> 32)), int(uint32_t((g + 1) >> 32)), int(uint32_t((g + 2) >> 32)),
                          int(uint32_t((g + 3) >> 32)), int(uint32_t((g + 4) >> 32)), int(uint32_t((g + 5) >> 32)),
                          int(uint32_t((g + 6) >> 32)), int(uint32_t((g + 7) >> 32)));
    __m256i c2 = _mm256_setzero_si256(), c3 = _mm256_setzero_si256();
    const __m256i m0 = _mm256_set1_epi32(int(0xD2511F53u)), m2 = _mm256_set1_epi32(int(0xCD9E8D57u));
    uint32_t k0 = key0, k1 = key1;
    for (int r = 0; r < 10; ++r) {
        __m256i hi0, lo0, hi2, lo2;
        mul_hi_lo(m0, c0, hi0, lo0);
        mul_hi_lo(m2, c2, hi2, lo2);
        c0 = _mm256_xor_si256(_mm256_xor_si256(hi2, c1), _mm256_set1_epi32(int(k0)));
        c2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), _mm256_set1_epi32(int(k1)));
        c1 = lo2;
        c3 = lo0;
        k0 += 0x9E3779B9u;
        k1 += 0xBB67AE85u;
    }
    // Lane l's four words to out[4l, 4l + 4): a 4 x 8 transpose.
    const __m256i t0 = _mm256_unpacklo_epi32(c0, c1), t1 = _mm256_unpackhi_epi32(c0, c1);
    const __m256i t2 = _mm256_unpacklo_epi32(c2, c3), t3 = _mm256_unpackhi_epi32(c2, c3);
    const __m256i u0 = _mm256_unpacklo_epi64(t0, t2), u1 = _mm256_unpackhi_epi64(t0, t2);
    const __m256i u2 = _mm256_unpacklo_epi64(t1, t3), u3 = _mm256_unpackhi_epi64(t1, t3);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm256_permute2x128_si256(u0, u1, 0x20));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 8), _mm256_permute2x128_si256(u2, u3, 0x20));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 16), _mm256_permute2x128_si256(u0, u1, 0x31));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 24), _mm256_permute2x128_si256(u2, u3, 0x31));
}
#endif

// Philox words of elements [e0, e0 + m) of one stream (word e % 4 of philox(key, e / 4), as philox_word), one
// generator call per 4 elements: 8 at once in AVX2 lanes where the ISA has them, the rest in a loop the compiler
// vectorises across groups. words needs m + 8 entries.
inline void philox_words(uint64_t key, uint64_t e0, int64_t m, uint32_t* words, uint32_t* scratch) {
    const uint64_t g0 = e0 >> 2;
    const int64_t groups = int64_t(((e0 + uint64_t(m) + 3) >> 2) - g0);
    const uint32_t key0 = uint32_t(key), key1 = uint32_t(key >> 32);
    int64_t done = 0;
#ifdef __AVX2__
    for (; done + 8 <= groups; done += 8) philox_8_groups(key0, key1, g0 + uint64_t(done), words + 4 * done);
#endif
    const int64_t rest = groups - done;
    uint32_t* w0 = scratch;
    uint32_t* w1 = w0 + rest;
    uint32_t* w2 = w1 + rest;
    uint32_t* w3 = w2 + rest;
    for (int64_t g = 0; g < rest; ++g) {
        const uint64_t gg = g0 + uint64_t(done + g);
        uint32_t c0 = uint32_t(gg), c1 = uint32_t(gg >> 32), c2 = 0, c3 = 0;
        uint32_t k0 = key0, k1 = key1;
        for (int r = 0; r < 10; ++r) {
            const uint64_t p0 = uint64_t(0xD2511F53u) * c0, p2 = uint64_t(0xCD9E8D57u) * c2;
            const uint32_t n0 = uint32_t(p2 >> 32) ^ c1 ^ k0, n2 = uint32_t(p0 >> 32) ^ c3 ^ k1;
            c1 = uint32_t(p2);
            c3 = uint32_t(p0);
            c0 = n0;
            c2 = n2;
            k0 += 0x9E3779B9u;
            k1 += 0xBB67AE85u;
        }
        w0[g] = c0;
        w1[g] = c1;
        w2[g] = c2;
        w3[g] = c3;
    }
    uint32_t* all = words + 4 * done;  // interleave, then drop the words before e0
    for (int64_t g = 0; g < rest; ++g) {
        all[4 * g] = w0[g];
        all[4 * g + 1] = w1[g];
        all[4 * g + 2] = w2[g];
        all[4 * g + 3] = w3[g];
    }
    const int64_t off = int64_t(e0 & 3);
    if (off)
        for (int64_t j = 0; j < m; ++j) words[j] = words[j + off];
}

}  // namespace
}  // namespace pysoup
