// The geometric methods' ops (pysoup.strategies.geometric / rowwise): per-vector statistics and per-vector weighted
// sums for the row- and column-wise methods, and mergekit's NearSwap. Their arguments and threaded entry points
// (geometric.cpp); the arithmetic is written once in geometric_impl.h and compiled per ISA (geometric_<isa>.cpp), in
// a kernel table of its own so these ops add nothing to CpuKernels.
#pragma once

#include <cstdint>

#include "cpu/isa.h"

namespace pysoup {

// A range [start, start + n) of a tensor cut into vectors: element e belongs to vector e / length (rows, `length`
// contiguous elements) or e % length (columns: one element every `length`).
struct SegmentArgs {
    const void* const* inputs;  // the sources, at the range's first element (models, then the base when `base`)
    const int* in_dtypes;
    int k;              // sources
    bool base;          // the last source is the base: vectors are x_i - base (moments), base + sum c_i (x_i - base)
    int64_t length;     // elements per row, or the column period
    bool columns;
    int64_t start;      // the tensor index of the range's first element
};

// Per-vector statistics of v_i = x_i (- base), i < m (m = k, or k - 1 with a base): |v_i|^2 for each i, then
// <v_i, v_j> for i < j, into acc[vector * stats + s]. Each vector's sums run in element order, one fp64 addition
// at a time from acc, so neither the chunking, the threads nor the ISA changes them.
inline int segment_stats(int m) { return m + m * (m - 1) / 2; }

// Arcee Fusion over a range: the model p and the base b at the range's first element, each row's KL (fp32, indexed by
// tensor row), the row length and the range's tensor index.
struct FusionArgs {
    const void* const* inputs;  // p, b
    const int* in_dtypes;
    const float* kl;
    int64_t row;
    int64_t start;
    const uint32_t* prefix;  // histogram pass 1: the high 16 bits of each quantile's key
    int quantiles;
};

// fp32 bits -> a key ordered as the values (NaN: the largest key), as pysoup.ops.reference.order_keys.
inline uint32_t fusion_key(float v) {
    uint32_t bits;
    __builtin_memcpy(&bits, &v, 4);
    if (v != v) return 0xFFFFFFFFu;
    return bits & 0x80000000u ? ~bits : bits | 0x80000000u;
}

struct GeometricKernels {
    // [begin, end) of the range (relative to args.start); a thread's share covers whole vectors' parts.
    void (*segment_moments)(const SegmentArgs&, int64_t begin, int64_t end, int64_t col_begin, int64_t col_end,
                            double* acc);
    // out = sum_i c_i x_i, fma in source order from -0.0 (or base + sum_i c_i (x_i - base)), c_i per vector:
    // coefficients[i * vectors + vector]. Returns the non-finite count.
    int64_t (*segment_weighted_sum)(const SegmentArgs&, int64_t begin, int64_t end, const float* coefficients,
                                    int64_t vectors, void* out, int out_dtype);
    // mergekit's NearSwap, in its fp32 operation order: d = max(|a - x|, 1e-6f) (NaN kept), w = clamp((1 / d) * t,
    // 0, 1) (NaN kept), out = w * x + (1 - w) * a, a NaN result as 0x7FC00000. inputs: x, then the base a. Returns
    // the non-finite count.
    int64_t (*nearswap)(const void* const* inputs, const int* in_dtypes, float t, int64_t begin, int64_t end, void* out,
                        int out_dtype);
    // Arcee Fusion's passes after the row KLs: importance I = |p - b| * kl[e / row] (fp32), mapped to order keys
    // (fusion_key). Histogram pass 0 counts key >> 16 into hist[0 .. 65535]; pass 1 counts key & 0xFFFF into
    // hist[q * 65536 ..] for the keys whose high half is prefix[q] (pass 0: plain increments, into a histogram the
    // caller gives one thread only; pass 1: atomic). The combine writes b + (p - b) * (I >= thr).
    void (*fusion_histogram)(const FusionArgs&, int pass, int64_t begin, int64_t end, uint64_t* hist);
    int64_t (*fusion_combine)(const FusionArgs&, float threshold, int64_t begin, int64_t end, void* out, int out_dtype);
    // Arcee Fusion's row KL over rows [r0, r1) (inputs: p, b at row 0's first element), into kl[r0 .. r1), and with
    // `hist` (2 x 65536 counts, the caller's thread's own, to be added up) those rows' importances counted as
    // fusion_histogram's pass 0: see fusion_kl below.
    void (*fusion_kl)(const void* const* inputs, const int* in_dtypes, int64_t row, int64_t r0, int64_t r1, float* kl,
                      uint64_t* hist);
};

extern const GeometricKernels kGeometricScalar;
#if PYSOUP_X86
extern const GeometricKernels kGeometricAvx2;
extern const GeometricKernels kGeometricAvx512;
#endif

// Threaded entry points.
void segment_moments(const SegmentArgs& a, int64_t n, Isa isa, int threads, double* acc, int64_t vectors);
int64_t segment_weighted_sum(const SegmentArgs& a, int64_t n, const float* coefficients, int64_t vectors, void* out,
                             int out_dtype, Isa isa, int threads);
int64_t nearswap(const void* const* inputs, const int* in_dtypes, float t, int64_t n, void* out, int out_dtype, Isa isa,
                 int threads);
// hist: quantiles x 65536 counts (pass 0 uses the first row only), added to.
void fusion_histogram(const FusionArgs& a, int pass, int64_t n, uint64_t* hist, Isa isa, int threads);
int64_t fusion_combine(const FusionArgs& a, float threshold, int64_t n, void* out, int out_dtype, Isa isa, int threads);
// Arcee Fusion's row statistic, in fp64 and rounded to fp32 once: with P = softmax(p_r) + eps, Q = softmax(b_r) + eps
// (eps = fp32(1e-8), as mergekit), kl[r] = sum_j P_j log(P_j / Q_j). softmax(x)_j = e_j * (1 / sum e), e_j =
// exp(x_j - max x); sums in kl_sum's fixed order; exp and log(P / Q) the polynomials of geometric_impl.h (kl_exp,
// kl_log_ratio), so the torch reference (pysoup.ops.reference.fusion_kl) gets the same bits. A row with a non-finite
// value: NaN. Each row is one thread's, so neither the threads nor the ISA change a bit. `rows` rows of `row`
// elements from the inputs. With `hist` (65536 counts, added to), every row's importances |p - b| * kl[r] are also
// counted by the high 16 bits of their order keys: fusion_histogram's pass 0, done while the row is at hand.
void fusion_kl(const void* const* inputs, const int* in_dtypes, int64_t row, int64_t rows, float* kl, uint64_t* hist,
               Isa isa, int threads);

}  // namespace pysoup
