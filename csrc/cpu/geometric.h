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

}  // namespace pysoup
