// AVX-512 masked loads and stores of 16 values of the stored dtypes (load16, store16; the weighted sum's streams
// use them directly) and the AVX-512 tile IO (Avx512IO, see io_scalar.h). Only for files compiled with the AVX-512
// flags (CMakeLists.txt). Internal linkage, as in dtype.h.
#pragma once

#if !defined(__AVX512F__) || !defined(__AVX512BW__) || !defined(__AVX512VL__)
#error "cpu/io_avx512.h is for files compiled with the AVX-512 flags (CMakeLists.txt)"
#endif

#include <immintrin.h>

#include <cstdint>

#include "cpu/blocking.h"
#include "cpu/dtype.h"

namespace pysoup {
namespace {

inline __m512 load16(const void* base, int dtype, int64_t i, __mmask16 mask) {
    switch (dtype) {
    case kF32: return _mm512_maskz_loadu_ps(mask, static_cast<const float*>(base) + i);
    case kF16: return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, static_cast<const uint16_t*>(base) + i));
    default: {
        const __m256i h = _mm256_maskz_loadu_epi16(mask, static_cast<const uint16_t*>(base) + i);
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    }
}

// Round-to-nearest-even on the bits (vcvtneps2bf16 is not used: it flushes subnormals to zero).
inline __m256i f32x16_to_bf16(__m512 v) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    const __m512i quiet = _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
    return _mm512_cvtepi32_epi16(_mm512_mask_blend_epi32(nan, r, quiet));
}

inline int store16(void* base, int dtype, int64_t i, __m512 v, __mmask16 mask) {
    switch (dtype) {
    case kF32: {
        _mm512_mask_storeu_ps(static_cast<float*>(base) + i, mask, v);
        const __m512i m = _mm512_set1_epi32(0x7F800000);
        return __builtin_popcount(_mm512_mask_cmpeq_epi32_mask(mask, _mm512_and_si512(_mm512_castps_si512(v), m), m));
    }
    case kF16: {
        const __m256i h = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        _mm256_mask_storeu_epi16(static_cast<uint16_t*>(base) + i, mask, h);
        const __m256i m = _mm256_set1_epi16(0x7C00);
        return __builtin_popcount(_mm256_mask_cmpeq_epi16_mask(mask, _mm256_and_si256(h, m), m));
    }
    default: {
        const __m256i h = f32x16_to_bf16(v);
        _mm256_mask_storeu_epi16(static_cast<uint16_t*>(base) + i, mask, h);
        const __m256i m = _mm256_set1_epi16(0x7F80);
        return __builtin_popcount(_mm256_mask_cmpeq_epi16_mask(mask, _mm256_and_si256(h, m), m));
    }
    }
}

struct Avx512IO {
    static void load(const void* base, int dtype, int64_t start, int64_t n, float* dst) {
        const char* ahead = static_cast<const char*>(base) + (start + kPrefetch) * dtype_size(dtype);
        for (int64_t p = 0; p < n * dtype_size(dtype); p += 64) _mm_prefetch(ahead + p, _MM_HINT_T0);
        for (int64_t j = 0; j < n; j += 16) {
            const __mmask16 mask = n - j >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - j)) - 1u);
            _mm512_mask_storeu_ps(dst + j, mask, load16(base, dtype, start + j, mask));
        }
    }
    // dst[j] = x[j] - sub[j] (a task vector: x an input, sub the base already loaded).
    static void load_minus(const void* base, int dtype, int64_t start, int64_t n, const float* sub, float* dst) {
        load(base, dtype, start, n, dst);
        for (int64_t j = 0; j < n; ++j) dst[j] = dst[j] - sub[j];
    }
    static int64_t store(const float* src, int64_t n, void* base, int dtype, int64_t start) {
        int64_t nonfinite = 0;
        for (int64_t j = 0; j < n; j += 16) {
            const __mmask16 mask = n - j >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - j)) - 1u);
            nonfinite += store16(base, dtype, start + j, _mm512_maskz_loadu_ps(mask, src + j), mask);
        }
        return nonfinite;
    }
    // 16 elements a step: the matches' low bits packed with vpcompressd into a register, then one unaligned
    // store of all 16 lanes at low + count (low has 16 spare entries); the memory form of vpcompressd is slow on
    // some cores (AMD Zen 4).
    static int64_t select_low(const float* t, const float* base, int64_t m, uint32_t prefix, uint32_t* low) {
        const __m512i magnitude = _mm512_set1_epi32(0x7FFFFFFF), p = _mm512_set1_epi32(int(prefix));
        const __m512i low_bits = _mm512_set1_epi32(0xFFFF);
        int64_t count = 0;
        for (int64_t j = 0; j < m; j += 16) {
            const __mmask16 in = m - j >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (m - j)) - 1u);
            const __m512 d = _mm512_sub_ps(_mm512_maskz_loadu_ps(in, t + j), _mm512_maskz_loadu_ps(in, base + j));
            const __m512i b = _mm512_and_si512(_mm512_castps_si512(d), magnitude);
            const __mmask16 hit = _mm512_mask_cmpeq_epi32_mask(in, _mm512_srli_epi32(b, 16), p);
            _mm512_storeu_si512(low + count, _mm512_maskz_compress_epi32(hit, _mm512_and_si512(b, low_bits)));
            count += __builtin_popcount(hit);
        }
        return count;
    }
};

}  // namespace
}  // namespace pysoup
