// The task-vector merge's threads: per-block TIES tie quotas (so ties are kept in index order whatever the thread
// count), then one combine call per block.
#include "cpu/task_vector.h"

#include <algorithm>
#include <vector>

#include "cpu/blocking.h"
#include "cpu/tie_quotas.h"

namespace pysoup {

int64_t task_vector_combine(TaskVectorArgs a, int64_t n, Isa isa, int threads, int64_t* quota) {
    const CpuKernels& kern = cpu_kernels(isa);
    const int64_t nb = nblocks(n);
    const int k = a.k;
    // Per-block tie quotas (tie_quotas.h): block b may keep what the blocks before it left over.
    const std::vector<int64_t> block_quota =
        a.trim ? block_tie_quotas(
                     quota, k, nb, threads,
                     [&](int64_t b, int64_t* counts) { kern.count_ties(a, b * kBlock, block_end(b, n), counts); })
               : std::vector<int64_t>(size_t(nb) * k, -1);
    int64_t nonfinite = 0;
#pragma omp parallel for num_threads(threads_for(threads, nb)) schedule(static) reduction(+ : nonfinite)
    for (int64_t b = 0; b < nb; ++b) {
        TaskVectorArgs ab = a;
        ab.tie_quota = block_quota.data() + size_t(b) * k;
        nonfinite += kern.task_vector(ab, b * kBlock, block_end(b, n));
    }
    return nonfinite;
}

}  // namespace pysoup
