// The statistics' threads: each block's fp64 results are kept apart and summed in index order at the end, so the
// totals do not depend on the thread count.
#include "cpu/moments.h"

#include <vector>

#include "cpu/blocking.h"

namespace pysoup {

static_assert(kBlock % kStatBlock == 0, "a thread's block holds whole statistics blocks");

void moments(const MomentsArgs& a, int64_t n, Isa isa, int threads, double* totals) {
    const CpuKernels& kern = cpu_kernels(isa);
    const int nstat = moments_size(a.k, a.mean, a.dare);
    const int64_t nstat_blocks = (n + kStatBlock - 1) / kStatBlock;
    std::vector<double> blocks(size_t(nstat_blocks) * nstat);
    const int64_t nb = nblocks(n);
#pragma omp parallel for num_threads(threads_for(threads, nb)) schedule(static)
    for (int64_t b = 0; b < nb; ++b)
        kern.moments(a, b * kBlock, block_end(b, n), blocks.data() + size_t(b * kBlock / kStatBlock) * nstat);
    for (int64_t b = 0; b < nstat_blocks; ++b)
        for (int q = 0; q < nstat; ++q) totals[q] += blocks[size_t(b) * nstat + q];
}

}  // namespace pysoup
