// Sparsified task-vector merges (Breadcrumbs, DELLA, SCE, RAM): their arguments and the threaded entry points
// (sparsify.cpp). The arithmetic is written once, over fp32 tiles, in sparsify_impl.h, and compiled by every ISA's
// kernel set (kernels_<isa>.cpp). See pysoup/ops/reference.py (sparse_masks, sparse_task_vector_combine,
// sparse_stats, variance) for the definitions these reproduce bit for bit.
#pragma once

#include <cstdint>

#include "cpu/isa.h"

namespace pysoup {

// Which entries of tau_i = x_i - base are kept (pysoup.ops.table.SparseSelect).
enum SparseSelectCode : int { kSelectAll = 0, kSelectBand = 1, kSelectRank = 2, kSelectShared = 3 };
// How the kept entries are mixed (pysoup.ops.table.SparseMix).
enum SparseMixCode : int { kMixSum = 0, kMixTies = 1, kMixSce = 2, kMixRam = 3 };
// DELLA's draws and SCE's variance selection: made in every pass (kMaskDraw); made and stored as bits by the
// statistics pass (kMaskStore); read back from those bits by the combine (kMaskLoad), which then ranks no row,
// computes no variance and counts no ties.
enum KeepMaskMode : int { kMaskDraw = 0, kMaskStore = 1, kMaskLoad = 2 };
// Statistics per model (pysoup.ops.table.SPARSE_STATS): sum |tau|, sum |kept|, sum kept^2, #shared, #unique (the
// counts under the RAM mix only, 0 otherwise: no other mix reads them).
constexpr int kSparseStats = 5;

struct SparseArgs {
    const void* const* inputs;  // k fine-tunes, element 0 = element `start` of the tensor
    const int* in_dtypes;
    int k;
    const void* base;
    int base_dtype;
    int select;
    int mix;
    const float* weights;  // k
    float lambda;
    bool normalize;
    float divisor;         // fp32 sum of the weights in order (SUM under normalize)
    const float* scale;    // k per-model rescale of the kept entries, or nullptr
    const uint32_t* keep_bits;  // BAND: k thresholds (|tau| bits) of the top keep; SHARED: 1 (variance bits)
    const uint32_t* skip_bits;  // BAND: k thresholds of the top skip
    const int64_t* quota;       // this range's tie quotas: BAND keep then skip per model, SHARED one (< 0: all)
    const uint64_t* keys;       // RANK: k Philox keys
    const float* lo;            // RANK: k fp32 density - epsilon
    const float* eps;           // RANK: k fp32 epsilon
    const uint8_t* drops;       // RANK: k, whether the model is sparsified
    int64_t row;                // RANK: entries per row (dimension 1)
    int64_t stride;             // RANK: distance between a row's entries
    uint8_t* keep_mask;         // RANK, SHARED: the tensor's keep bits (bit e % 8 of byte e / 8; RANK: per model)
    int64_t keep_mask_stride;   // bytes per model in keep_mask (SHARED: one mask)
    int keep_mask_mode;         // kMaskDraw, kMaskStore or kMaskLoad
    uint32_t* variances;        // SHARED: the tensor's variance bits, entry e at e, or nullptr (variance_histogram)
    float epsilon;              // RAM: |tau| threshold
    void* out;
    int out_dtype;
    int64_t start;  // index of element 0 within the whole tensor (the Philox counter)
    int64_t n;      // elements behind the pointers (RANK: whole rows, which a block may read beyond its range)
};

// How many tie quotas the selection takes.
inline int sparse_quota_count(const SparseArgs& a) {
    return a.select == kSelectBand ? 2 * a.k : a.select == kSelectShared ? 1 : 0;
}

// Per ISA (CpuKernels): sparse_task_vector combines [begin, end) and returns the count of non-finite outputs;
// sparse_stats writes kSparseStats * k fp64 sums per block of kStatBlock elements from block_begin (a multiple of
// kStatBlock); sparse_ties counts, per quota, the entries equal to its threshold in [begin, end);
// variance_histogram adds the radix-select histogram of the variance bits of [begin, end) and counts the zeros;
// variance_keep_mask writes SCE's keep bits of [begin, end) from the stored variance bits.

// Threaded over [0, a.n): ties are handed out in index order through per-block quotas, so no result depends on the
// thread count. `quota` is read and updated.
int64_t sparse_task_vector(SparseArgs a, Isa isa, int threads, int64_t* quota);
void sparse_stats(SparseArgs a, Isa isa, int threads, int64_t* quota, double* totals);
// Adds the pass's histogram (65536 counters) of the fp32 bits of each entry's variance across the models; returns
// how many variances are 0 (pass 0). With a.variances, pass 0 also stores each entry's bits there, and pass 1 counts
// those (a.n of them from a.start) without reading an input: a tensor whose variances fit in memory computes them
// once, and its selection ends with pass 0.
int64_t variance_histogram(const SparseArgs& a, Isa isa, int threads, int pass, uint32_t prefix, uint64_t* hist);
// SCE's keep bits of [0, a.n) (from a.start) into a.keep_mask, from the stored variance bits (a.variances): those
// above a.keep_bits[0], and the ties first in index order while `quota` lasts (read and updated), exactly as the
// statistics pass stores them (kMaskStore). No input is read.
void variance_keep_mask(SparseArgs a, Isa isa, int threads, int64_t* quota);

}  // namespace pysoup
