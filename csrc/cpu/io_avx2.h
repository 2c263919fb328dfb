// AVX2 loads and stores of 8 values of the stored dtypes (load8, store8; the weighted sum's streams use them
// directly) and the AVX2 tile IO (Avx2IO, see io_scalar.h). Only for files compiled with -mavx2 -mfma -mf16c
// (CMakeLists.txt). Internal linkage, as in dtype.h.
#pragma once

#ifndef __AVX2__
#error "cpu/io_avx2.h is for files compiled with the AVX2 flags (CMakeLists.txt)"
#endif

#include <immintrin.h>

#include <cstdint>

#include "cpu/blocking.h"
#include "cpu/dtype.h"
#include "cpu/io_scalar.h"

namespace pysoup {
namespace {

inline __m256 load8(const void* base, int dtype, int64_t i) {
    switch (dtype) {
    case kF32: return _mm256_loadu_ps(static_cast<const float*>(base) + i);
    case kF16:
        return _mm256_cvtph_ps(
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(base) + i)));
    default: {
        const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(base) + i));
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
    }
}

// Round-to-nearest-even on the bits, NaN kept with its sign and top payload (same rule as f32_to_bf16).
inline __m128i f32x8_to_bf16(__m256 v) {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    const __m256i quiet = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
    r = _mm256_blendv_epi8(r, quiet, nan);
    // packus works per 128-bit lane; gather the two useful quarters into the low half.
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
    return _mm256_castsi256_si128(packed);
}

inline int count_nonfinite16(__m128i h, int exp_mask) {
    const __m128i m = _mm_set1_epi16(static_cast<short>(exp_mask));
    const __m128i eq = _mm_cmpeq_epi16(_mm_and_si128(h, m), m);
    return __builtin_popcount(_mm_movemask_epi8(eq)) / 2;
}

inline int store8(void* base, int dtype, int64_t i, __m256 v) {
    switch (dtype) {
    case kF32: {
        _mm256_storeu_ps(static_cast<float*>(base) + i, v);
        const __m256i m = _mm256_set1_epi32(0x7F800000);
        const __m256i eq = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_castps_si256(v), m), m);
        return __builtin_popcount(_mm256_movemask_ps(_mm256_castsi256_ps(eq)));
    }
    case kF16: {
        const __m128i h = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(base) + i), h);
        return count_nonfinite16(h, 0x7C00);
    }
    default: {
        const __m128i h = f32x8_to_bf16(v);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(base) + i), h);
        return count_nonfinite16(h, 0x7F80);
    }
    }
}

// For each 8-bit mask, the indices of its set bits in order, one byte each (Avx2IO::select_low).
struct PackTable {
    uint64_t lanes[256];
    constexpr PackTable() : lanes() {
        for (int mask = 0; mask < 256; ++mask) {
            int k = 0;
            for (int lane = 0; lane < 8; ++lane)
                if (mask >> lane & 1) lanes[mask] |= uint64_t(lane) << (8 * k++);
        }
    }
};
constexpr PackTable kPack{};

struct Avx2IO {
    // Each input prefetched kPrefetch elements ahead (as Avx512IO), a line per line loaded, where the hardware
    // prefetcher alone stops at every 4 KiB page of the mapped inputs. Base + 3 x 512 MiB bf16, in-process, alternating
    // pairs: breadcrumbs 5.0-5.2 CPU s against 5.7-5.9, SCE 6.5-6.6 against 6.6-6.9; TIES within noise (4.8-5.0
    // against 4.6-5.7), DELLA's first pass maybe slower (6.4-6.6 against 6.2-6.4: its ranking then reloaded every row,
    // already in cache; it now reads the rows its tile holds from the tile).
    static void load(const void* base, int dtype, int64_t start, int64_t n, float* dst) {
        switch (dtype) {
        case kF32: return load_as<kF32, false>(base, start, n, nullptr, dst);
        case kF16: return load_as<kF16, false>(base, start, n, nullptr, dst);
        default: return load_as<kBF16, false>(base, start, n, nullptr, dst);
        }
    }
    // dst[j] = x[j] - sub[j] (a task vector: x an input, sub the base already loaded) in one pass over dst.
    static void load_minus(const void* base, int dtype, int64_t start, int64_t n, const float* sub, float* dst) {
        switch (dtype) {
        case kF32: return load_as<kF32, true>(base, start, n, sub, dst);
        case kF16: return load_as<kF16, true>(base, start, n, sub, dst);
        default: return load_as<kBF16, true>(base, start, n, sub, dst);
        }
    }
    // The dtype's branch taken once per call, not per step.
    template <int kDtype, bool kMinus>
    static void load_as(const void* base, int64_t start, int64_t n, const float* sub, float* dst) {
        const int64_t size = dtype_size(kDtype), line = 64 / size;
        const char* ahead = static_cast<const char*>(base) + (start + kPrefetch) * size;
        int64_t j = 0;
        for (; j + 8 <= n; j += 8) {
            if ((j & (line - 1)) == 0) _mm_prefetch(ahead + j * size, _MM_HINT_T0);
            const __m256 x = load8(base, kDtype, start + j);
            _mm256_storeu_ps(dst + j, kMinus ? _mm256_sub_ps(x, _mm256_loadu_ps(sub + j)) : x);
        }
        for (; j < n; ++j)
            dst[j] = kMinus ? load_f32(base, kDtype, start + j) - sub[j] : load_f32(base, kDtype, start + j);
    }
    static int64_t store(const float* src, int64_t n, void* base, int dtype, int64_t start) {
        int64_t nonfinite = 0, j = 0;
        for (; j + 8 <= n; j += 8) nonfinite += store8(base, dtype, start + j, _mm256_loadu_ps(src + j));
        for (; j < n; ++j) nonfinite += store_f32(base, dtype, start + j, src[j]);
        return nonfinite;
    }
    // 8 elements a step: the lanes that match are moved to the front by a permutation looked up by their mask
    // (AVX2 has no compress instruction), then all 8 lanes are stored at low + count (low has spare entries).
    static int64_t select_low(const float* t, const float* base, int64_t m, uint32_t prefix, uint32_t* low) {
        const __m256i magnitude = _mm256_set1_epi32(0x7FFFFFFF), p = _mm256_set1_epi32(int(prefix));
        const __m256i low_bits = _mm256_set1_epi32(0xFFFF);
        int64_t count = 0, j = 0;
        for (; j + 8 <= m; j += 8) {
            const __m256 d = _mm256_sub_ps(_mm256_loadu_ps(t + j), _mm256_loadu_ps(base + j));
            const __m256i b = _mm256_and_si256(_mm256_castps_si256(d), magnitude);
            const int hit = _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_srli_epi32(b, 16), p)));
            const __m256i order =
                _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(kPack.lanes + hit)));
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(low + count),
                                _mm256_permutevar8x32_epi32(_mm256_and_si256(b, low_bits), order));
            count += __builtin_popcount(hit);
        }
        return count + select_low_scalar(t + j, base + j, m - j, prefix, low + count);
    }
};

}  // namespace
}  // namespace pysoup
