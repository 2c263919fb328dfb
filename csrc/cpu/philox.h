// DARE's random drops: the counter-based generator keyed by (model key, element index), so a drop depends on
// neither the backend, the chunking nor the thread count.
//
// Internal linkage (anonymous namespace): every ISA file compiles its own copy with its own flags (see dtype.h).
#pragma once

#include <cstdint>

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

// Philox words of elements [e0, e0 + m) of one stream (word e % 4 of philox(key, e / 4), as philox_word), one
// generator call per 4 elements, in a loop the compiler vectorises across groups. words needs m + 8 entries.
inline void philox_words(uint64_t key, uint64_t e0, int64_t m, uint32_t* words, uint32_t* scratch) {
    const uint64_t g0 = e0 >> 2;
    const int64_t groups = int64_t(((e0 + uint64_t(m) + 3) >> 2) - g0);
    uint32_t* w0 = scratch;
    uint32_t* w1 = w0 + groups;
    uint32_t* w2 = w1 + groups;
    uint32_t* w3 = w2 + groups;
    const uint32_t key0 = uint32_t(key), key1 = uint32_t(key >> 32);
    for (int64_t g = 0; g < groups; ++g) {
        uint32_t c0 = uint32_t(g0 + uint64_t(g)), c1 = uint32_t((g0 + uint64_t(g)) >> 32), c2 = 0, c3 = 0;
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
    const int64_t off = int64_t(e0 & 3);
    uint32_t* all = words;  // interleave, then drop the words before e0
    for (int64_t g = 0; g < groups; ++g) {
        all[4 * g] = w0[g];
        all[4 * g + 1] = w1[g];
        all[4 * g + 2] = w2[g];
        all[4 * g + 3] = w3[g];
    }
    if (off)
        for (int64_t j = 0; j < m; ++j) words[j] = words[j + off];
}

}  // namespace
}  // namespace pysoup
