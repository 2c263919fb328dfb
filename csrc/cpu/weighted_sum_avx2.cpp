// The weighted sum with AVX2 + FMA + F16C (compiled with -mavx2 -mfma -mf16c on this file only).
#include <immintrin.h>

#include <algorithm>
#include <cmath>

#include "cpu/blocking.h"
#include "cpu/dtype.h"
#include "cpu/io_avx2.h"
#include "cpu/weighted_sum.h"

namespace pysoup {
namespace {

// All inputs of one dtype: each output vector is finished in registers while every stream advances together
// (see weighted_sum_avx512.cpp); the last < 16 elements go through the scalar helpers. Streaming stores, a gain
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

}  // namespace pysoup
