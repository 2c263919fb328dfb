// The task-vector merge's threads: per-block TIES tie quotas (so ties are kept in index order whatever the thread
// count), then one combine call per block.
#include "cpu/task_vector.h"

#include <algorithm>
#include <vector>

#include "cpu/blocking.h"

namespace pysoup {

int64_t task_vector_combine(TaskVectorArgs a, int64_t n, Isa isa, int threads, int64_t* quota) {
    const CpuKernels& kern = cpu_kernels(isa);
    const int64_t nb = nblocks(n);
    const int k = a.k;
    // Per-block tie quotas: block b may keep what the blocks before it left over.
    std::vector<int64_t> block_quota(size_t(nb) * k, -1);
    if (a.trim) {
        // Only a quota that keeps some ties but not all (> 0) needs the blocks' tie counts: with every quota -1 (all
        // kept) or 0 (none: it ran out in an earlier chunk), every block takes the quotas as they are.
        bool partial = false;
        for (int i = 0; i < k; ++i) partial |= quota[i] > 0;
        if (!partial)
            for (int64_t b = 0; b < nb; ++b) std::copy(quota, quota + k, block_quota.begin() + b * k);
        if (partial) {
            std::vector<int64_t> counts(size_t(nb) * k, 0);
            TaskVectorArgs c = a;
#pragma omp parallel for num_threads(threads_for(threads, nb)) schedule(static)
            for (int64_t b = 0; b < nb; ++b) kern.count_ties(c, b * kBlock, block_end(b, n), counts.data() + b * k);
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
        nonfinite += kern.task_vector(ab, b * kBlock, block_end(b, n));
    }
    return nonfinite;
}

}  // namespace pysoup
