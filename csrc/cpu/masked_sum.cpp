// The masked sum's and the sparse scan's threads: one kernel call per block; the scan reports the first
// difference in index order.
#include "cpu/masked_sum.h"

#include <vector>

#include "cpu/blocking.h"

namespace pysoup {

int64_t masked_sum(const MaskedSumArgs& a, int64_t n, Isa isa, int threads) {
    const CpuKernels& kern = cpu_kernels(isa);
    const int64_t nb = nblocks(n);
    int64_t nonfinite = 0;
#pragma omp parallel for num_threads(threads_for(threads, nb)) schedule(static) reduction(+ : nonfinite)
    for (int64_t b = 0; b < nb; ++b) nonfinite += kern.masked_sum(a, b * kBlock, block_end(b, n));
    return nonfinite;
}

int64_t sparse_scan(const MaskedSumArgs& a, int64_t n, Isa isa, int threads, int64_t* zeros) {
    const CpuKernels& kern = cpu_kernels(isa);
    const int64_t nb = nblocks(n);
    std::vector<int64_t> first(nb, -1), z(nb, 0);
#pragma omp parallel for num_threads(threads_for(threads, nb)) schedule(static)
    for (int64_t b = 0; b < nb; ++b) first[b] = kern.sparse_scan(a, b * kBlock, block_end(b, n), &z[b]);
    for (int64_t b = 0; b < nb; ++b) {
        if (first[b] >= 0) return first[b];
        *zeros += z[b];
    }
    return -1;
}

}  // namespace pysoup
