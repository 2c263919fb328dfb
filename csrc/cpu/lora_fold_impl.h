// The LoRA fold's strip kernel (see lora_fold.h for what it computes), written once over a SIMD policy V and an IO
// type, and instantiated by each ISA's lora_fold_<isa>.cpp with its own flags.
//
// A strip is at most mc rows. Its rows of L are packed into micro-panels (mr rows, k-major: lp[k * mr + i]), then for
// each block of nc columns (R's block, k x nc fp32, stays in L2 while every micro-panel of the strip passes over it)
// and each micro-panel, the micro-kernel accumulates an mr x nr tile in registers (V::Reg acc[MR][NV]) over k in
// order with explicit fma, and stores it into an mr x nc fp32 tile in L1. The epilogue then reads each of the
// micro-panel's rows of W for the block, adds, makes NaN canonical and rounds into the output, with the IO type's
// vectorised loads and stores. Padding rows and columns (zeros in the packed panels) are computed and dropped: an
// output element's sum only ever sees its own k products, so the edges give the same bits as the interior.
#pragma once

#include <algorithm>
#include <cstdint>

#include "cpu/dtype.h"
#include "cpu/lora_fold.h"

namespace pysoup {
namespace {

// Columns per block of R: k x nc fp32 about 128 KiB (half of a 256 KiB L2 or less), nc a multiple of nr, at most
// 512 (the mr x nc tile of fp32 results stays in L1).
inline int64_t lora_block_cols(int k, int nr) {
    const int64_t want = std::max<int64_t>(1, (int64_t(32) << 10) / std::max(k, 1));
    return std::clamp<int64_t>(want / nr * nr, nr, 512 / nr * nr);
}

// The micro-kernel's sums: acc[i][v] over k in order, from +0, one fma per product.
template <class V, int MR, int NV>
inline void lora_accumulate(int k, const float* lp, const float* rp, typename V::Reg (&acc)[MR][NV]) {
    constexpr int NR = NV * V::kWidth;
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[i][v] = V::zero();
    for (int q = 0; q < k; ++q) {
        typename V::Reg r[NV];
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) r[v] = V::load(rp + int64_t(q) * NR + v * V::kWidth);
#pragma GCC unroll 16
        for (int i = 0; i < MR; ++i) {
            const typename V::Reg a = V::broadcast(lp + int64_t(q) * MR + i);
#pragma GCC unroll 4
            for (int v = 0; v < NV; ++v) acc[i][v] = V::fma(a, r[v], acc[i][v]);
        }
    }
}

// A whole tile (MR rows, NR columns from element e of the first row): the sums, then W added from registers and the
// result rounded straight into the output. Prefetches the next micro-panel's W for these columns meanwhile (rows of
// W are read in runs of nc columns only, too short for the hardware prefetcher to run ahead).
template <class V, int MR, int NV>
inline int64_t lora_tile(const LoraFoldArgs& a, int k, const float* lp, const float* rp, int64_t e, bool ahead) {
    typename V::Reg acc[MR][NV];
    if (ahead) {
        const char* w = static_cast<const char*>(a.w);
        const int64_t size = dtype_size(a.w_dtype);
        for (int i = 0; i < MR; ++i) __builtin_prefetch(w + (e + (MR + i) * a.cols) * size);
    }
    lora_accumulate<V, MR, NV>(k, lp, rp, acc);
    int64_t nonfinite = 0;
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) {
            const int64_t at = e + i * a.cols + v * V::kWidth;
            const typename V::Reg s = V::canonical(V::add(V::load_stored(a.w, a.w_dtype, at), acc[i][v]));
            nonfinite += V::store_stored(a.out, a.out_dtype, at, s);
        }
    return nonfinite;
}

// A tile at the edge (rows past r1 or columns past cols): the sums into `tile` (MR x NR), then element by element.
template <class V, int MR, int NV>
inline int64_t lora_edge_tile(const LoraFoldArgs& a, int k, const float* lp, const float* rp, int64_t e, int rows,
                              int64_t n, float* tile) {
    constexpr int NR = NV * V::kWidth;
    typename V::Reg acc[MR][NV];
    lora_accumulate<V, MR, NV>(k, lp, rp, acc);
    for (int i = 0; i < MR; ++i)
        for (int v = 0; v < NV; ++v) V::store(tile + i * NR + v * V::kWidth, acc[i][v]);
    int64_t nonfinite = 0;
    for (int i = 0; i < rows; ++i)
        for (int64_t j = 0; j < n; ++j) {
            const int64_t at = e + i * a.cols + j;
            const float s = load_f32(a.w, a.w_dtype, at) + tile[i * NR + j];
            nonfinite += store_f32(a.out, a.out_dtype, at, s != s ? bits_f32(0x7FC00000u) : s);
        }
    return nonfinite;
}

// Scratch layout: the strip's packed L (mc x k), then one edge tile (at most 16 x 64 floats).
template <int MC, int MR>
int64_t lora_strip_scratch(int k) {
    return int64_t(MC) * k + 16 * 64;
}

template <class V, int MR, int NV, int MC>
int64_t lora_strip_kernel(const LoraFoldArgs& a, const float* packed_right, int64_t r0, int64_t r1, float* scratch) {
    constexpr int NR = NV * V::kWidth;
    static_assert(MR <= 16 && NR <= 64, "the edge tile's scratch");
    const int k = a.k;
    const int64_t cols = a.cols, nc = lora_block_cols(k, NR);
    const int64_t panels = (r1 - r0 + MR - 1) / MR;
    float* lp = scratch;
    float* tile = lp + int64_t(MC) * k;
    // L's rows of the strip, k-major per micro-panel, zero rows past r1.
    for (int64_t p = 0; p < panels; ++p) {
        float* dst = lp + p * MR * k;
        for (int i = 0; i < MR; ++i) {
            const int64_t r = r0 + p * MR + i;
            if (r < r1) {
                const float* src = a.left + r * k;
                for (int q = 0; q < k; ++q) dst[int64_t(q) * MR + i] = src[q];
            } else {
                for (int q = 0; q < k; ++q) dst[int64_t(q) * MR + i] = 0.0f;
            }
        }
    }
    int64_t nonfinite = 0;
    for (int64_t c0 = 0; c0 < cols; c0 += nc) {
        const int64_t j0 = c0 / NR, j1 = (std::min(cols, c0 + nc) + NR - 1) / NR;
        for (int64_t p = 0; p < panels; ++p) {
            const float* l = lp + p * MR * k;
            const int64_t row = r0 + p * MR;
            const int rows = static_cast<int>(std::min<int64_t>(MR, r1 - row));
            const bool ahead = row + 2 * MR <= a.rows;
            for (int64_t j = j0; j < j1; ++j) {
                const float* rp = packed_right + j * int64_t(k) * NR;
                const int64_t e = row * cols + j * NR, n = std::min<int64_t>(NR, cols - j * NR);
                if (rows == MR && n == NR)
                    nonfinite += lora_tile<V, MR, NV>(a, k, l, rp, e, ahead);
                else
                    nonfinite += lora_edge_tile<V, MR, NV>(a, k, l, rp, e, rows, n, tile);
            }
        }
    }
    return nonfinite;
}

}  // namespace
}  // namespace pysoup
