// Sparsified task-vector merges (Breadcrumbs, DELLA, SCE, RAM): their arguments and the threaded entry points
// (sparsify.cpp). The arithmetic is written once, over fp32 tiles, in sparsify_impl.h, and compiled by every ISA's
// kernel set (kernels_<isa>.cpp). See pysoup/ops/reference.py (sparse_masks, sparse_task_vector_combine,
// sparse_stats, variance) for the definitions these reproduce bit for bit.
#pragma once

#include <cstdint>
#include <vector>

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
// variance_select_stored does one block's share of the threaded variance_select_stored below.

// Threaded over [0, a.n): ties are handed out in index order through per-block quotas, so no result depends on the
// thread count. `quota` is read and updated.
int64_t sparse_task_vector(SparseArgs a, Isa isa, int threads, int64_t* quota);
void sparse_stats(SparseArgs a, Isa isa, int threads, int64_t* quota, double* totals);
// Adds the pass's histogram (65536 counters) of the fp32 bits of each entry's variance across the models; returns
// how many variances are 0 (pass 0). With a.variances, pass 0 also stores each entry's bits there (from a.start): a
// tensor whose variances fit in memory computes them once, and its selection ends with pass 0, as follows.
int64_t variance_histogram(const SparseArgs& a, Isa isa, int threads, int pass, uint32_t prefix, uint64_t* hist);
// SCE's pass 1 and keep bits from the stored variance bits of a whole tensor (a.variances, a.n of them; a.keep_mask
// zeroed), no input read, in two steps around the search of the histogram. variance_select_stored adds the low
// halves of the entries in the high bin `prefix` to hist, writes the keep bit of every other entry (above the bin:
// kept) and returns, per block of kBlock entries, how many of the bin's entries it packed at the block's front
// (the stored bits are spent). variance_keep_ties then keeps those above `threshold`, and those equal to it in index
// order while `quota` lasts (< 0: all): the bits top_mask and store_bits would write. Returns the quota left.
std::vector<int64_t> variance_select_stored(const SparseArgs& a, Isa isa, int threads, uint32_t prefix, uint64_t* hist);
int64_t variance_keep_ties(const SparseArgs& a, const std::vector<int64_t>& in_bin, uint32_t prefix, uint32_t threshold,
                           int64_t quota, int threads);

}  // namespace pysoup
