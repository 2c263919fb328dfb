// Task-vector merges (task arithmetic, TIES, DARE): their arguments and the threaded entry point
// (task_vector.cpp). The arithmetic is written once, over fp32 tiles, in task_vector_impl.h, and compiled by every
// ISA's kernel set (kernels_<isa>.cpp) with that ISA's flags.
#pragma once

#include <cstdint>

#include "cpu/isa.h"

namespace pysoup {

// theta = base + lambda * mix(tau_1..tau_k), tau_i = x_i - base in fp32, with optional DARE drop, TIES
// magnitude trim and TIES sign election. See pysoup/ops/reference.py: task_vector_combine for the definition.
struct TaskVectorArgs {
    const void* const* inputs;  // k fine-tunes
    const int* in_dtypes;
    int k;
    const void* base;
    int base_dtype;
    const float* weights;  // k
    float lambda;
    bool normalize;
    bool consensus;  // TIES sign election and disjoint mean
    float divisor;   // fp32 sum of the weights, in order (used when normalize && !consensus)
    // DARE: drop tau_i[e] unless philox(key_i, e) < keep_below; survivors times scale_i.
    bool dare;
    const uint64_t* dare_keys;
    const uint32_t* keep_below;  // per model: round(density * 2^32), 2^32 - 1 for density 1
    const float* dare_scale;
    // TIES trim: keep |tau_i| bits > trim_bits_i, and elements == trim_bits_i while the quota lasts (index order).
    bool trim;
    const uint32_t* trim_bits;
    const int64_t* tie_quota;  // per model for this range; < 0 keeps every tie
    void* out;
    int out_dtype;
    int64_t start;  // index of element 0 of these pointers within the whole tensor (DARE's counter)
};

// Per ISA (CpuKernels): task_vector combines [begin, end) and returns the count of non-finite outputs; count_ties
// counts, per model, the |tau_i| equal to the trim threshold in [begin, end).

// Threaded: TIES ties are handed out in index order through per-block quotas, so the result does not depend on the
// thread count. `quota` is read and updated (the ties left for the ranges after this one).
int64_t task_vector_combine(TaskVectorArgs a, int64_t n, Isa isa, int threads, int64_t* quota);

}  // namespace pysoup
