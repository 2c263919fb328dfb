// Task-vector merges (task arithmetic, TIES, DARE), the sparse soup and statistics passes: their argument
// blocks and per-ISA entry points. The arithmetic itself is written once, over fp32 tiles, in
// task_vector_impl.h, and compiled by every ISA file with that ISA's flags.
#pragma once

#include <cstdint>
#include <string>

#include "cpu/dtype.h"

namespace pysoup {

// TIES' radix-select pass 1 over one tile: the low 16 bits of |t[j] - base[j]|'s fp32 bits, for the elements
// whose high 16 bits equal `prefix`, packed into low[0 .. count). Returns count. Branch-free: whether an element
// matches is data-dependent and would mispredict. (The AVX-512 and AVX2 IO types pack 16 / 8 lanes at a time.)
inline int64_t select_low_scalar(const float* t, const float* base, int64_t m, uint32_t prefix, uint32_t* low) {
    int64_t count = 0;
    for (int64_t j = 0; j < m; ++j) {
        const uint32_t b = f32_bits(t[j] - base[j]) & 0x7FFFFFFFu;
        low[count] = b & 0xFFFFu;
        count += (b >> 16) == prefix;
    }
    return count;
}

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

// Sparse soup: out = sum w_i x_i / divisor where every x_i != 0 (intersection), or sum over the inputs that are
// non-zero divided by their weights (union); `shared` keeps the first input's zeros bit for bit. Mode 3 is the
// variance-corrected average's rescaled mean.
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

// Statistics of one range, in fp64, over fixed blocks of kStatBlock elements with kStatLanes lanes each, so the
// result depends neither on the ISA nor on the thread count (see accumulate_blocks in dispatch).
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

// Per-ISA kernels over [begin, end) (element indices relative to the pointers).
using TaskVectorFn = int64_t (*)(const TaskVectorArgs&, int64_t begin, int64_t end);
using TieCountFn = void (*)(const TaskVectorArgs&, int64_t begin, int64_t end, int64_t* counts);
using MaskedSumFn = int64_t (*)(const MaskedSumArgs&, int64_t begin, int64_t end);
using MomentsFn = void (*)(const MomentsArgs&, int64_t block_begin, int64_t end, double* block_out);
using HistogramFn = void (*)(const TaskVectorArgs&, int64_t begin, int64_t end, int pass, const uint32_t* prefix,
                             uint64_t* hist);
// Sparse soup's check: the first index in [begin, end) where the inputs' zero patterns differ (-1 if none), and
// the count of zeros of the first input.
using SparseScanFn = int64_t (*)(const MaskedSumArgs&, int64_t begin, int64_t end, int64_t* zeros);

struct TaskVectorKernels {
    TaskVectorFn combine;
    TieCountFn count_ties;
    MaskedSumFn masked_sum;
    MomentsFn moments;
    HistogramFn histogram;
    SparseScanFn sparse_scan;
};

TaskVectorKernels task_vector_kernels_scalar();
#if PYSOUP_X86
TaskVectorKernels task_vector_kernels_avx2();
TaskVectorKernels task_vector_kernels_avx512();
#endif

// Internal linkage: every ISA file compiles its own copy with its own flags (see cpu/dtype.h).
namespace {

// Number of fp64 results MomentsArgs produces: 3 per vector + the Gram's upper triangle + the DARE abs sums.
inline int moments_size(int k, bool mean, bool dare) {
    const int v = k + (mean ? 1 : 0);
    return 3 * v + v * (v - 1) / 2 + (dare ? k : 0);
}

// Philox4x32-10 exactly as Triton's tl.randint4x(seed=key, offset=c0) with c1 = hi 32 bits of the counter:
// DARE's drop decision for element e of model i is word (e % 4) of philox(key_i, e / 4).
inline uint32_t philox_word(uint64_t key, uint64_t e) {
    uint32_t c0 = uint32_t(e >> 2), c1 = uint32_t(e >> 34), c2 = 0, c3 = 0;
    uint32_t k0 = uint32_t(key), k1 = uint32_t(key >> 32);
    for (int r = 0; r < 10; ++r) {
        const uint32_t a0 = c0, a2 = c2;
        const uint64_t p0 = uint64_t(0xD2511F53u) * a0, p2 = uint64_t(0xCD9E8D57u) * a2;
        c0 = uint32_t(p2 >> 32) ^ c1 ^ k0;
        c2 = uint32_t(p0 >> 32) ^ c3 ^ k1;
        c1 = uint32_t(p2);
        c3 = uint32_t(p0);
        k0 += 0x9E3779B9u;
        k1 += 0xBB67AE85u;
    }
    switch (e & 3) {
    case 0: return c0;
    case 1: return c1;
    case 2: return c2;
    default: return c3;
    }
}

}  // namespace
}  // namespace pysoup

namespace pysoup {

// Threaded entry points (task_vector_dispatch.cpp). `quota` is read and updated; `hist`, `zeros` and `totals`
// are accumulated into.
int64_t task_vector_combine(TaskVectorArgs a, int64_t n, const std::string& isa, int threads, int64_t* quota);
void task_vector_histogram(const TaskVectorArgs& a, int64_t n, const std::string& isa, int threads, int pass,
                           const uint32_t* prefix, uint64_t* hist);
int64_t masked_sum(const MaskedSumArgs& a, int64_t n, const std::string& isa, int threads);
int64_t sparse_scan(const MaskedSumArgs& a, int64_t n, const std::string& isa, int threads, int64_t* zeros);
void moments(const MomentsArgs& a, int64_t n, const std::string& isa, int threads, double* totals);

}  // namespace pysoup
