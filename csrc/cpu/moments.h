// The fp64 statistics passes (model stock's and SLERP's angles, DARE's l1 rescale, the variance-corrected average):
// their arguments, result layout and threaded entry point (moments.cpp). The arithmetic is written once in
// moments_impl.h and compiled per ISA.
#pragma once

#include <cstdint>

#include "cpu/isa.h"

namespace pysoup {

// Statistics of one range, in fp64, over fixed blocks of kStatBlock elements with kStatLanes lanes each, so the
// result depends neither on the ISA nor on the thread count (see moments_kernel in moments_impl.h).
struct MomentsArgs {
    const void* const* inputs;
    const int* in_dtypes;
    int k;
    const void* base;  // nullptr: statistics of x_i; else of tau_i = x_i - base
    int base_dtype;
    // For each vector v_i: sum v_i, sum v_i^2 and sum |v_i|; and the Gram entries sum v_i v_j (i < j).
    // With `mean`, one more vector: the fp32 mean (sum fma(w_i, x_i) / divisor) of the inputs.
    bool mean;
    const float* weights;
    float divisor;
    // DARE's l1 rescale: sum |dare(tau_i)| too.
    bool dare;
    const uint64_t* dare_keys;
    const uint32_t* keep_below;
    int64_t start;
    bool gram;  // false: leave the Gram entries 0 (DARE's l1 rescale and the variance correction need none)
};

constexpr int64_t kStatBlock = 4096;
constexpr int kStatLanes = 8;

namespace {  // internal linkage, as in dtype.h

// Number of fp64 results MomentsArgs produces: 3 per vector + the Gram's upper triangle + the DARE abs sums.
inline int moments_size(int k, bool mean, bool dare) {
    const int v = k + (mean ? 1 : 0);
    return 3 * v + v * (v - 1) / 2 + (dare ? k : 0);
}

}  // namespace

// Per ISA (CpuKernels::moments): from block_begin (a multiple of kStatBlock) to end, moments_size() values per
// block of kStatBlock elements into block_out.

// Threaded; adds the statistics of [0, n) to totals (moments_size() values), block by block in index order.
void moments(const MomentsArgs& a, int64_t n, Isa isa, int threads, double* totals);

}  // namespace pysoup
