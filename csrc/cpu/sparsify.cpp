// The sparsified task-vector merges' threads: per-block tie quotas (ties kept in index order whatever the thread
// count), one kernel call per block, statistics kept per block and summed in index order, per-thread variance
// histograms, SCE's selection from the stored variances.
#include "cpu/sparsify.h"

#include <algorithm>
#include <vector>

#include "cpu/blocking.h"
#include "cpu/moments.h"
#include "cpu/thread_histograms.h"
#include "cpu/tie_quotas.h"

namespace pysoup {

namespace {

// Elements per thread block: kBlock, or for DELLA at least one whole slab of rows (each block ranks the slabs it
// touches), always whole statistics blocks.
int64_t sparse_block(const SparseArgs& a) {
    int64_t bs = kBlock;
    if (a.select == kSelectRank) bs = std::max(bs, a.row * a.stride);
    return (bs + kStatBlock - 1) / kStatBlock * kStatBlock;
}

// Per-block tie quotas (tie_quotas.h), counted by sparse_ties. Updates `quota` to what is left.
std::vector<int64_t> block_quotas(const SparseArgs& a, const CpuKernels& kern, int threads, int64_t bs, int64_t nb,
                                  int64_t* quota) {
    const int nq = sparse_quota_count(a);
    if (a.keep_mask_mode == kMaskLoad) return std::vector<int64_t>(size_t(nb) * nq, -1);  // the bits settle ties
    return block_tie_quotas(quota, nq, nb, threads, [&](int64_t b, int64_t* counts) {
        kern.sparse_ties(a, b * bs, std::min(a.n, (b + 1) * bs), counts);
    });
}

}  // namespace

int64_t sparse_task_vector(SparseArgs a, Isa isa, int threads, int64_t* quota) {
    const CpuKernels& kern = cpu_kernels(isa);
    const int64_t bs = sparse_block(a), nb = (a.n + bs - 1) / bs;
    const int nq = sparse_quota_count(a);
    const std::vector<int64_t> bq = block_quotas(a, kern, threads, bs, nb, quota);
    int64_t nonfinite = 0;
#pragma omp parallel for num_threads(threads_for(threads, nb)) schedule(static) reduction(+ : nonfinite)
    for (int64_t b = 0; b < nb; ++b) {
        SparseArgs ab = a;
        ab.quota = bq.data() + size_t(b) * nq;
        nonfinite += kern.sparse_task_vector(ab, b * bs, std::min(a.n, (b + 1) * bs));
    }
    return nonfinite;
}

void sparse_stats(SparseArgs a, Isa isa, int threads, int64_t* quota, double* totals) {
    const CpuKernels& kern = cpu_kernels(isa);
    const int64_t bs = sparse_block(a), nb = (a.n + bs - 1) / bs;
    const int nq = sparse_quota_count(a);
    const int nstat = kSparseStats * a.k;
    const std::vector<int64_t> bq = block_quotas(a, kern, threads, bs, nb, quota);
    const int64_t nstat_blocks = (a.n + kStatBlock - 1) / kStatBlock;
    std::vector<double> blocks(size_t(nstat_blocks) * nstat);
#pragma omp parallel for num_threads(threads_for(threads, nb)) schedule(static)
    for (int64_t b = 0; b < nb; ++b) {
        SparseArgs ab = a;
        ab.quota = bq.data() + size_t(b) * nq;
        kern.sparse_stats(ab, b * bs, std::min(a.n, (b + 1) * bs), blocks.data() + size_t(b * bs / kStatBlock) * nstat);
    }
    for (int64_t b = 0; b < nstat_blocks; ++b)
        for (int q = 0; q < nstat; ++q) totals[q] += blocks[size_t(b) * nstat + q];
}

int64_t variance_histogram(const SparseArgs& a, Isa isa, int threads, int pass, uint32_t prefix, uint64_t* hist) {
    const CpuKernels& kern = cpu_kernels(isa);
    const int64_t nb = nblocks(a.n);
    if (nb < 4 || threads <= 1) return kern.variance_histogram(a, 0, a.n, pass, prefix, hist);
    const int nt = threads_for(threads, nb);
    std::vector<int64_t> zeros(nt, 0);
    threaded_histogram(nb, nt, 65536, hist, [&](int t, int64_t first, int64_t last, uint64_t* h) {
        zeros[t] = kern.variance_histogram(a, first * kBlock, std::min(a.n, last * kBlock), pass, prefix, h);
    });
    int64_t z = 0;
    for (int64_t v : zeros) z += v;
    return z;
}

std::vector<int64_t> variance_select_stored(const SparseArgs& a, Isa isa, int threads, uint32_t prefix,
                                            uint64_t* hist) {
    const CpuKernels& kern = cpu_kernels(isa);
    const int64_t nb = nblocks(a.n);
    std::vector<int64_t> in_bin(size_t(nb), 0);
    threaded_histogram(nb, threads_for(threads, nb), 65536, hist, [&](int, int64_t first, int64_t last, uint64_t* h) {
        for (int64_t b = first; b < last; ++b)  // one call per block: it packs the bin's entries at its block's front
            in_bin[size_t(b)] = kern.variance_select_stored(a, b * kBlock, block_end(b, a.n), prefix, h);
    });
    return in_bin;
}

int64_t variance_keep_ties(const SparseArgs& a, const std::vector<int64_t>& in_bin, uint32_t prefix, uint32_t threshold,
                           int64_t quota, int threads) {
    // The bin holds 12% of the entries on the benchmark's bf16 fine-tunes (24 Mi of 192 Mi): threaded by block, each
    // block's quota what the ties of the blocks before it left (blocks of kBlock entries own whole bytes of the bits).
    const int64_t nb = int64_t(in_bin.size());
    auto packed = [&](int64_t b) { return a.variances + b * kBlock; };
    auto value = [&](uint32_t p) { return (prefix << 16) | (p & 0xFFFFu); };
    const std::vector<int64_t> bq = block_tie_quotas(&quota, 1, nb, threads, [&](int64_t b, int64_t* ties) {
        for (int64_t r = 0; r < in_bin[size_t(b)]; ++r) *ties += value(packed(b)[r]) == threshold;
    });
#pragma omp parallel for num_threads(threads_for(threads, nb)) schedule(static)
    for (int64_t b = 0; b < nb; ++b) {
        int64_t left = bq[size_t(b)];
        for (int64_t r = 0; r < in_bin[size_t(b)]; ++r) {
            const uint32_t p = packed(b)[r], v = value(p);
            bool keep = v > threshold;
            if (v == threshold && left != 0) {
                keep = true;
                if (left > 0) --left;
            }
            const int64_t e = b * kBlock + (p >> 16);
            if (keep) a.keep_mask[e >> 3] |= uint8_t(1u << (e & 7));
        }
    }
    return quota;
}

}  // namespace pysoup
