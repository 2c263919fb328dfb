// Threads for the task-vector kernels. Results never depend on the thread count: TIES ties are handed out in
// index order through per-block quotas, and statistics are summed block by block in index order.
#include <omp.h>

#include <algorithm>
#include <stdexcept>
#include <vector>

#include "cpu/kernels.h"
#include "cpu/task_vector.h"

namespace pysoup {
namespace {

constexpr int64_t kBlock = int64_t(1) << 16;  // elements per parallel task, as in dispatch.cpp

TaskVectorKernels kernels_for(const std::string& isa) {
    if (isa == "scalar") return task_vector_kernels_scalar();
#if PYSOUP_X86
    if (isa == "avx2") return task_vector_kernels_avx2();
    if (isa == "avx512") return task_vector_kernels_avx512();
#endif
    throw std::invalid_argument("unknown CPU ISA '" + isa + "'");
}

int64_t nblocks(int64_t n) { return (n + kBlock - 1) / kBlock; }

int threads_for(int threads, int64_t blocks) {
    return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, blocks)));
}

}  // namespace

int64_t task_vector_combine(TaskVectorArgs a, int64_t n, const std::string& isa, int threads, int64_t* quota) {
    const TaskVectorKernels kern = kernels_for(isa);
    const int64_t nb = nblocks(n);
    const int k = a.k;
    // Per-block tie quotas: block b may keep what the blocks before it left over.
    std::vector<int64_t> block_quota(size_t(nb) * k, -1);
    if (a.trim) {
        bool partial = false;
        for (int i = 0; i < k; ++i) partial |= quota[i] >= 0;
        if (partial) {
            std::vector<int64_t> counts(size_t(nb) * k, 0);
            TaskVectorArgs c = a;
#pragma omp parallel for num_threads(threads_for(threads, nb)) schedule(static)
            for (int64_t b = 0; b < nb; ++b)
                kern.count_ties(c, b * kBlock, std::min(n, (b + 1) * kBlock), counts.data() + b * k);
            for (int i = 0; i < k; ++i) {
                int64_t left = quota[i];
                for (int64_t b = 0; b < nb; ++b) {
                    block_quota[size_t(b) * k + i] = left;
                    if (left >= 0) left = std::max<int64_t>(0, left - counts[size_t(b) * k + i]);
                }
                quota[i] = left;
            }
        }
    }
    int64_t nonfinite = 0;
#pragma omp parallel for num_threads(threads_for(threads, nb)) schedule(static) reduction(+ : nonfinite)
    for (int64_t b = 0; b < nb; ++b) {
        TaskVectorArgs ab = a;
        ab.tie_quota = block_quota.data() + size_t(b) * k;
        nonfinite += kern.combine(ab, b * kBlock, std::min(n, (b + 1) * kBlock));
    }
    return nonfinite;
}

void task_vector_histogram(const TaskVectorArgs& a, int64_t n, const std::string& isa, int threads, int pass,
                           const uint32_t* prefix, uint64_t* hist) {
    const TaskVectorKernels kern = kernels_for(isa);
    const int64_t nb = nblocks(n);
    // Per-thread histograms cost k x 512 KiB to clear and merge: only worth it when each thread gets several
    // blocks. Below that, one thread counts straight into `hist` (300 small tensors: 0.8 s -> 0.1 s).
    if (nb < 4 || threads <= 1) {
        kern.histogram(a, 0, n, pass, prefix, hist);
        return;
    }
    const int nt = threads_for(threads, nb);
    const size_t bins = size_t(a.k) * 65536;
    std::vector<std::vector<uint64_t>> local(nt - 1, std::vector<uint64_t>(bins, 0));
    // Each thread counts one contiguous run of blocks in one call (what schedule(static) would hand it), so the
    // kernel's per-call set-up is paid once per thread.
#pragma omp parallel num_threads(nt)
    {
        const int t = omp_get_thread_num(), count = omp_get_num_threads();
        const int64_t first = nb * t / count, last = nb * (t + 1) / count;
        if (first < last)
            kern.histogram(a, first * kBlock, std::min(n, last * kBlock), pass, prefix, t == 0 ? hist : local[t - 1].data());
    }
    for (const auto& h : local)
        for (size_t i = 0; i < bins; ++i) hist[i] += h[i];
}

int64_t masked_sum(const MaskedSumArgs& a, int64_t n, const std::string& isa, int threads) {
    const TaskVectorKernels kern = kernels_for(isa);
    const int64_t nb = nblocks(n);
    int64_t nonfinite = 0;
#pragma omp parallel for num_threads(threads_for(threads, nb)) schedule(static) reduction(+ : nonfinite)
    for (int64_t b = 0; b < nb; ++b) nonfinite += kern.masked_sum(a, b * kBlock, std::min(n, (b + 1) * kBlock));
    return nonfinite;
}

int64_t sparse_scan(const MaskedSumArgs& a, int64_t n, const std::string& isa, int threads, int64_t* zeros) {
    const TaskVectorKernels kern = kernels_for(isa);
    const int64_t nb = nblocks(n);
    std::vector<int64_t> first(nb, -1), z(nb, 0);
#pragma omp parallel for num_threads(threads_for(threads, nb)) schedule(static)
    for (int64_t b = 0; b < nb; ++b) first[b] = kern.sparse_scan(a, b * kBlock, std::min(n, (b + 1) * kBlock), &z[b]);
    for (int64_t b = 0; b < nb; ++b) {
        if (first[b] >= 0) return first[b];
        *zeros += z[b];
    }
    return -1;
}

void moments(const MomentsArgs& a, int64_t n, const std::string& isa, int threads, double* totals) {
    const TaskVectorKernels kern = kernels_for(isa);
    const int nstat = moments_size(a.k, a.mean, a.dare);
    const int64_t nstat_blocks = (n + kStatBlock - 1) / kStatBlock;
    std::vector<double> blocks(size_t(nstat_blocks) * nstat);
    const int64_t nb = nblocks(n);  // kBlock is a multiple of kStatBlock
#pragma omp parallel for num_threads(threads_for(threads, nb)) schedule(static)
    for (int64_t b = 0; b < nb; ++b)
        kern.moments(a, b * kBlock, std::min(n, (b + 1) * kBlock), blocks.data() + size_t(b * kBlock / kStatBlock) * nstat);
    for (int64_t b = 0; b < nstat_blocks; ++b)
        for (int q = 0; q < nstat; ++q) totals[q] += blocks[size_t(b) * nstat + q];
}

}  // namespace pysoup
