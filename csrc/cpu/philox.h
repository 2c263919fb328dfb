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
// Groups [g0, g0 + 16) of philox_words, 16 generators at once, interleaved into out[0, 64). Four sets of four, each
// generator's counter words in the low 32 bits of a 64-bit lane: one widening multiply gives a product's high half
// (shifted down) and its low half (in place; the garbage above it is never read: the next multiply reads only the
// low 32 bits, and the words are masked out at the end), so a round is 2 multiplies, 2 shifts and 4 xors per set.
// The 8-lane layout it replaces needed 2 more shifts and 2 blends per multiply; in a standalone loop, 0.95-1.05 ns
// a word against 1.10-1.13 (two runs); within noise in a merge.
inline void philox_16_groups(uint32_t key0, uint32_t key1, uint64_t g0, uint32_t* out) {
    __m256i c0[4], c1[4], c2[4], c3[4];
    for (int s = 0; s < 4; ++s) {
        const uint64_t g = g0 + 4 * uint64_t(s);
        c0[s] = _mm256_setr_epi64x(int64_t(uint32_t(g)), int64_t(uint32_t(g + 1)), int64_t(uint32_t(g + 2)),
                                   int64_t(uint32_t(g + 3)));
        c1[s] = _mm256_setr_epi64x(int64_t(g >> 32), int64_t((g + 1) >> 32), int64_t((g + 2) >> 32),
                                   int64_t((g + 3) >> 32));
        c2[s] = c3[s] = _mm256_setzero_si256();
    }
    const __m256i m0 = _mm256_set1_epi64x(0xD2511F53u), m2 = _mm256_set1_epi64x(0xCD9E8D57u);
    uint32_t k0 = key0, k1 = key1;
    for (int r = 0; r < 10; ++r) {
        const __m256i kk0 = _mm256_set1_epi64x(k0), kk1 = _mm256_set1_epi64x(k1);
        for (int s = 0; s < 4; ++s) {
            const __m256i p0 = _mm256_mul_epu32(c0[s], m0), p2 = _mm256_mul_epu32(c2[s], m2);
            c0[s] = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(p2, 32), c1[s]), kk0);
            c2[s] = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(p0, 32), c3[s]), kk1);
            c1[s] = p2;
            c3[s] = p0;
        }
        k0 += 0x9E3779B9u;
        k1 += 0xBB67AE85u;
    }
    // Each generator's four words to out[4g, 4g + 4): words 0 and 1 (2 and 3) paired in one 64-bit lane, then the
    // lanes of generators 0 | 2 and 1 | 3 unpacked and put in order.
    for (int s = 0; s < 4; ++s) {
        const __m256i w01 = _mm256_blend_epi32(c0[s], _mm256_slli_epi64(c1[s], 32), 0xAA);
        const __m256i w23 = _mm256_blend_epi32(c2[s], _mm256_slli_epi64(c3[s], 32), 0xAA);
        const __m256i even = _mm256_unpacklo_epi64(w01, w23), odd = _mm256_unpackhi_epi64(w01, w23);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 16 * s), _mm256_permute2x128_si256(even, odd, 0x20));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 16 * s + 8), _mm256_permute2x128_si256(even, odd, 0x31));
    }
}
#endif

// Philox words of elements [e0, e0 + m) of one stream (word e % 4 of philox(key, e / 4), as philox_word), one
// generator call per 4 elements: 16 at once in AVX2 lanes where the ISA has them, the rest in a loop the compiler
// vectorises across groups. words needs m + 8 entries.
inline void philox_words(uint64_t key, uint64_t e0, int64_t m, uint32_t* words, uint32_t* scratch) {
    const uint64_t g0 = e0 >> 2;
    const int64_t groups = int64_t(((e0 + uint64_t(m) + 3) >> 2) - g0);
    const uint32_t key0 = uint32_t(key), key1 = uint32_t(key >> 32);
    int64_t done = 0;
#ifdef __AVX2__
    for (; done + 16 <= groups; done += 16) philox_16_groups(key0, key1, g0 + uint64_t(done), words + 4 * done);
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
