// The weighted sum with AVX-512 (F, BW, VL) + FMA + F16C (flags on this file only). Masked loads and stores
// handle the tail, so there is no scalar remainder loop.
#include <immintrin.h>

#include <algorithm>
#include <cmath>

#include "cpu/blocking.h"
#include "cpu/dtype.h"
#include "cpu/io_avx512.h"
#include "cpu/weighted_sum.h"

namespace pysoup {
namespace {

template <int DT>
inline void accumulate(float* acc, const void* x, __m512 w, int64_t t0, int64_t m) {
    for (int64_t j = 0; j < m; j += 16) {
        const __mmask16 mask = m - j >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (m - j)) - 1u);
        const __m512 prev = _mm512_load_ps(acc + j);
        _mm512_store_ps(acc + j, _mm512_fmadd_ps(w, load16(x, DT, t0 + j, mask), prev));
    }
}

// 16-bit results of two vectors, packed into one 64-byte register for a streaming store.
inline __m512i pack16x2(__m256i lo, __m256i hi) { return _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1); }

inline int count_nonfinite16x2(__m512i h, int exp_mask) {
    const __m512i m = _mm512_set1_epi16(static_cast<short>(exp_mask));
    return __builtin_popcountll(_mm512_cmpeq_epi16_mask(_mm512_and_si512(h, m), m));
}

inline int count_nonfinite32(__m512 v) {
    const __m512i m = _mm512_set1_epi32(0x7F800000);
    return __builtin_popcount(_mm512_cmpeq_epi32_mask(_mm512_and_si512(_mm512_castps_si512(v), m), m));
}

// Non-temporal stores of 32 results at out[j]: the output skips the cache and its read-for-ownership, which
// is 1/6 of the memory traffic of a 4-input merge. Needs out + j 64-byte aligned.
inline int stream32(void* out, int out_dtype, int64_t j, __m512 v0, __m512 v1) {
    switch (out_dtype) {
    case kF32:
        _mm512_stream_ps(static_cast<float*>(out) + j, v0);
        _mm512_stream_ps(static_cast<float*>(out) + j + 16, v1);
        return count_nonfinite32(v0) + count_nonfinite32(v1);
    case kF16: {
        const __m512i h = pack16x2(_mm512_cvtps_ph(v0, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC),
                                   _mm512_cvtps_ph(v1, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        _mm512_stream_si512(reinterpret_cast<__m512i*>(static_cast<uint16_t*>(out) + j), h);
        return count_nonfinite16x2(h, 0x7C00);
    }
    default: {
        const __m512i h = pack16x2(f32x16_to_bf16(v0), f32x16_to_bf16(v1));
        _mm512_stream_si512(reinterpret_cast<__m512i*>(static_cast<uint16_t*>(out) + j), h);
        return count_nonfinite16x2(h, 0x7F80);
    }
    }
}

// All inputs of one dtype (the common case): each output vector is finished in registers, so the k input
// streams and the output stream advance together and no accumulator goes through memory (1.2x the tiled
// loop at 4 x bf16, 2 threads). Two vectors per step give the FMA chains some independence.
// K > 0: the input count at compile time, so the loop over the inputs unrolls (see with_input_count).
template <int DT, bool NT, int K>
int64_t streamed(const WeightedSumArgs& a, int64_t begin, int64_t end) {
    int64_t nonfinite = 0;
    const int k = K > 0 ? K : a.k;
    const __m512 divisor = _mm512_set1_ps(a.divisor);
    const void* const* x = a.inputs;
    int64_t j = begin;
    for (; j + 32 <= end; j += 32) {
        __m512 acc0 = _mm512_set1_ps(-0.0f), acc1 = _mm512_set1_ps(-0.0f);
        for (int i = 0; i < k; ++i) {
            const __m512 w = _mm512_set1_ps(a.weights[i]);
            _mm_prefetch(static_cast<const char*>(x[i]) + (j + kPrefetch) * (DT == kF32 ? 4 : 2), _MM_HINT_T0);
            acc0 = _mm512_fmadd_ps(w, load16(x[i], DT, j, 0xFFFF), acc0);
            acc1 = _mm512_fmadd_ps(w, load16(x[i], DT, j + 16, 0xFFFF), acc1);
        }
        if (a.normalize) {
            acc0 = _mm512_div_ps(acc0, divisor);
            acc1 = _mm512_div_ps(acc1, divisor);
        }
        if (NT) {
            nonfinite += stream32(a.out, a.out_dtype, j, acc0, acc1);
        } else {
            nonfinite += store16(a.out, a.out_dtype, j, acc0, 0xFFFF);
            nonfinite += store16(a.out, a.out_dtype, j + 16, acc1, 0xFFFF);
        }
    }
    if (NT) _mm_sfence();
    for (; j < end; j += 16) {
        const __mmask16 mask = end - j >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (end - j)) - 1u);
        __m512 acc = _mm512_set1_ps(-0.0f);
        for (int i = 0; i < k; ++i) acc = _mm512_fmadd_ps(_mm512_set1_ps(a.weights[i]), load16(x[i], DT, j, mask), acc);
        if (a.normalize) acc = _mm512_div_ps(acc, divisor);
        nonfinite += store16(a.out, a.out_dtype, j, acc, mask);
    }
    return nonfinite;
}

template <int DT>
int64_t streamed_dispatch(const WeightedSumArgs& a, int64_t begin, int64_t end) {
    const uintptr_t first = reinterpret_cast<uintptr_t>(a.out) + uintptr_t(begin) * dtype_size(a.out_dtype);
    // Streaming stores pay off only for outputs far larger than the caches, and only when the output is not also
    // an input: updated in place (an EMA step), its lines are in the cache already, and a streaming store must
    // evict each one (an EMA step measured 42 GB/s against 62 GB/s with plain stores, fp32 in place, 2 threads).
    const bool in_place = std::find(a.inputs, a.inputs + a.k, a.out) != a.inputs + a.k;
    const bool nt = !in_place && first % 64 == 0 && (end - begin) * dtype_size(a.out_dtype) >= (int64_t(1) << 17);
    return with_input_count(a.k, [&](auto K) {
        constexpr int k = decltype(K)::value;
        return nt ? streamed<DT, true, k>(a, begin, end) : streamed<DT, false, k>(a, begin, end);
    });
}

}  // namespace

int64_t weighted_sum_avx512(const WeightedSumArgs& a, int64_t begin, int64_t end) {
    if (std::all_of(a.in_dtypes, a.in_dtypes + a.k, [&](int d) { return d == a.in_dtypes[0]; })) {
        switch (a.in_dtypes[0]) {
        case kF32: return streamed_dispatch<kF32>(a, begin, end);
        case kF16: return streamed_dispatch<kF16>(a, begin, end);
        default: return streamed_dispatch<kBF16>(a, begin, end);
        }
    }
    // Mixed dtypes: accumulate tile by tile, one input at a time, so each inner loop has one dtype.
    // Rounded up to whole vectors so the masked tail can load and store acc[] unmasked.
    alignas(64) float acc[kTile];
    int64_t nonfinite = 0;
    const __m512 divisor = _mm512_set1_ps(a.divisor);
    for (int64_t t0 = begin; t0 < end; t0 += kTile) {
        const int64_t m = std::min(kTile, end - t0);
        const int64_t m16 = (m + 15) & ~int64_t(15);
        std::fill(acc, acc + m16, -0.0f);
        for (int i = 0; i < a.k; ++i) {
            const __m512 w = _mm512_set1_ps(a.weights[i]);
            switch (a.in_dtypes[i]) {
            case kF32: accumulate<kF32>(acc, a.inputs[i], w, t0, m); break;
            case kF16: accumulate<kF16>(acc, a.inputs[i], w, t0, m); break;
            default: accumulate<kBF16>(acc, a.inputs[i], w, t0, m); break;
            }
        }
        for (int64_t j = 0; j < m; j += 16) {
            const __mmask16 mask = m - j >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (m - j)) - 1u);
            __m512 v = _mm512_load_ps(acc + j);
            if (a.normalize) v = _mm512_div_ps(v, divisor);
            nonfinite += store16(a.out, a.out_dtype, t0 + j, v, mask);
        }
    }
    return nonfinite;
}

}  // namespace pysoup
