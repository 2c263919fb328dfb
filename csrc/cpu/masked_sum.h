// The masked sum (the sparse soup; mode 3 is the variance-corrected average's rescaled mean) and the sparse soup's
// zero-pattern check, sparse_scan: their arguments and threaded entry points (masked_sum.cpp). The arithmetic is
// written once in masked_sum_impl.h and compiled per ISA.
#pragma once

#include <cstdint>

#include "cpu/isa.h"

namespace pysoup {

// Sparse soup: out = sum w_i x_i / divisor where every x_i != 0 (intersection), or sum over the inputs that are
// non-zero divided by their weights (union); `shared` keeps the first input's zeros bit for bit. Mode 3 is the
// variance-corrected average's rescaled mean. sparse_scan reads only the inputs.
struct MaskedSumArgs {
    const void* const* inputs;
    const int* in_dtypes;
    int k;
    const float* weights;
    float divisor;
    int mode;      // 0 shared, 1 intersection, 2 union, 3 affine mean: fma(scale, mean - center, center)
    float center;  // mode 3 (variance-corrected average)
    float scale;
    void* out;
    int out_dtype;
};

// Per ISA (CpuKernels): masked_sum over [begin, end), returning the count of non-finite outputs; sparse_scan, the
// first index in [begin, end) where the inputs' zero patterns differ (-1 if none) and the count of zeros of the
// first input.

// Threaded; returns the count of non-finite outputs.
int64_t masked_sum(const MaskedSumArgs& a, int64_t n, Isa isa, int threads);

// Threaded; returns the first index in [0, n) where the zero patterns differ (-1 if none); when there is none,
// adds the zeros of the first input to `zeros`.
int64_t sparse_scan(const MaskedSumArgs& a, int64_t n, Isa isa, int threads, int64_t* zeros);

}  // namespace pysoup
