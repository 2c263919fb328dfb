// AVX2 + FMA + F16C path (compiled with -mavx2 -mfma -mf16c on this file only).
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu/dtype.h"
#include "cpu/kernels.h"
#include "cpu/task_vector.h"

namespace pysoup {
namespace {

inline __m256 load8(const void* base, int dtype, int64_t i) {
    switch (dtype) {
    case kF32: return _mm256_loadu_ps(static_cast<const float*>(base) + i);
    case kF16:
        return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(base) + i)));
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

// All inputs of one dtype: each output vector is finished in registers while every stream advances together
// (see merge_avx512.cpp); the last < 16 elements go through the scalar helpers. Streaming stores, a gain
// on AVX-512, measured 0.65x here (4 x bf16, 2 threads), so AVX2 stores through the cache.
// K > 0: the input count at compile time, so the loop over the inputs unrolls (see with_input_count).
template <int DT, int K>
int64_t streamed(const WeightedSumArgs& a, int64_t begin, int64_t end) {
    int64_t nonfinite = 0;
    const int k = K > 0 ? K : a.k;
    const __m256 divisor = _mm256_set1_ps(a.divisor);
    const void* const* x = a.inputs;
    int64_t j = begin;
    for (; j + 16 <= end; j += 16) {
        __m256 acc0 = _mm256_set1_ps(-0.0f), acc1 = _mm256_set1_ps(-0.0f);
        for (int i = 0; i < k; ++i) {
            const __m256 w = _mm256_set1_ps(a.weights[i]);
            _mm_prefetch(static_cast<const char*>(x[i]) + (j + kPrefetch) * (DT == kF32 ? 4 : 2), _MM_HINT_T0);
            acc0 = _mm256_fmadd_ps(w, load8(x[i], DT, j), acc0);
            acc1 = _mm256_fmadd_ps(w, load8(x[i], DT, j + 8), acc1);
        }
        if (a.normalize) {
            acc0 = _mm256_div_ps(acc0, divisor);
            acc1 = _mm256_div_ps(acc1, divisor);
        }
        nonfinite += store8(a.out, a.out_dtype, j, acc0);
        nonfinite += store8(a.out, a.out_dtype, j + 8, acc1);
    }
    for (; j < end; ++j) {
        float acc = -0.0f;
        for (int i = 0; i < k; ++i) acc = std::fma(a.weights[i], load_f32(x[i], DT, j), acc);
        nonfinite += store_f32(a.out, a.out_dtype, j, a.normalize ? acc / a.divisor : acc);
    }
    return nonfinite;
}

template <int DT>
int64_t streamed_any_k(const WeightedSumArgs& a, int64_t begin, int64_t end) {
    return with_input_count(a.k, [&](auto K) { return streamed<DT, decltype(K)::value>(a, begin, end); });
}

}  // namespace

int64_t weighted_sum_avx2(const WeightedSumArgs& a, int64_t begin, int64_t end) {
    if (std::all_of(a.in_dtypes, a.in_dtypes + a.k, [&](int d) { return d == a.in_dtypes[0]; })) {
        switch (a.in_dtypes[0]) {
        case kF32: return streamed_any_k<kF32>(a, begin, end);
        case kF16: return streamed_any_k<kF16>(a, begin, end);
        default: return streamed_any_k<kBF16>(a, begin, end);
        }
    }
    // Mixed dtypes: accumulate tile by tile, one input at a time, so each inner loop has one dtype.
    alignas(32) float acc[kTile];
    int64_t nonfinite = 0;
    const __m256 divisor = _mm256_set1_ps(a.divisor);
    for (int64_t t0 = begin; t0 < end; t0 += kTile) {
        const int64_t m = std::min(kTile, end - t0);
        const int64_t m8 = m & ~int64_t(7);
        std::fill(acc, acc + m, -0.0f);
        for (int i = 0; i < a.k; ++i) {
            const __m256 w = _mm256_set1_ps(a.weights[i]);
            const void* x = a.inputs[i];
            const int dt = a.in_dtypes[i];
            // The dtype switch sits outside the inner loop so each loop is one straight stream.
            if (dt == kF32) {
                for (int64_t j = 0; j < m8; j += 8)
                    _mm256_store_ps(acc + j, _mm256_fmadd_ps(w, load8(x, kF32, t0 + j), _mm256_load_ps(acc + j)));
            } else if (dt == kF16) {
                for (int64_t j = 0; j < m8; j += 8)
                    _mm256_store_ps(acc + j, _mm256_fmadd_ps(w, load8(x, kF16, t0 + j), _mm256_load_ps(acc + j)));
            } else {
                for (int64_t j = 0; j < m8; j += 8)
                    _mm256_store_ps(acc + j, _mm256_fmadd_ps(w, load8(x, kBF16, t0 + j), _mm256_load_ps(acc + j)));
            }
            for (int64_t j = m8; j < m; ++j) acc[j] = std::fma(a.weights[i], load_f32(x, dt, t0 + j), acc[j]);
        }
        for (int64_t j = 0; j < m8; j += 8) {
            __m256 v = _mm256_load_ps(acc + j);
            if (a.normalize) v = _mm256_div_ps(v, divisor);
            nonfinite += store8(a.out, a.out_dtype, t0 + j, v);
        }
        for (int64_t j = m8; j < m; ++j) {
            const float v = a.normalize ? acc[j] / a.divisor : acc[j];
            nonfinite += store_f32(a.out, a.out_dtype, t0 + j, v);
        }
    }
    return nonfinite;
}

namespace {

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
    static void load(const void* base, int dtype, int64_t start, int64_t n, float* dst) {
        int64_t j = 0;
        for (; j + 8 <= n; j += 8) _mm256_storeu_ps(dst + j, load8(base, dtype, start + j));
        for (; j < n; ++j) dst[j] = load_f32(base, dtype, start + j);
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
            const __m256i order = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(kPack.lanes + hit)));
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(low + count),
                                _mm256_permutevar8x32_epi32(_mm256_and_si256(b, low_bits), order));
            count += __builtin_popcount(hit);
        }
        return count + select_low_scalar(t + j, base + j, m - j, prefix, low + count);
    }
};

#include "cpu/task_vector_impl.h"

}  // namespace

TaskVectorKernels task_vector_kernels_avx2() { return make_task_vector_kernels<Avx2IO>(); }

}  // namespace pysoup
