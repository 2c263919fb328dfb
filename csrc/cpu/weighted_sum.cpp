// The weighted sum's threads: one contiguous run of blocks per thread (weighted_sum), or one equal share of the
// concatenation of many tensors (weighted_sum_many).
#include "cpu/weighted_sum.h"

#include <omp.h>

#include <algorithm>
#include <vector>

#include "cpu/blocking.h"

namespace pysoup {

float fp32_sum_in_order(const float* weights, int k) {
    float s = 0.0f;
    for (int i = 0; i < k; ++i) s += weights[i];
    return s;
}

int64_t weighted_sum(const WeightedSumArgs& args, int64_t n, Isa isa, int threads) {
    const auto fn = cpu_kernels(isa).weighted_sum;
    if (threads <= 1 || n < 2 * kBlock) return fn(args, 0, n);
    const int64_t blocks = nblocks(n);
    const int nthreads = threads_for(threads, blocks);
    int64_t nonfinite = 0;
    // schedule(static) hands each thread one contiguous run of blocks: each thread streams its own range.
#pragma omp parallel for num_threads(nthreads) schedule(static) reduction(+ : nonfinite)
    for (int64_t b = 0; b < blocks; ++b) nonfinite += fn(args, b * kBlock, block_end(b, n));
    return nonfinite;
}

int64_t weighted_sum_many(const WeightedSumArgs& shared, const void* const* inputs, void* const* outs,
                          const int64_t* sizes, int64_t m, Isa isa, int threads, int64_t* counts) {
    const auto fn = cpu_kernels(isa).weighted_sum;
    std::vector<int64_t> first(m + 1, 0);  // first[t]: where tensor t starts in the concatenation of all
    for (int64_t t = 0; t < m; ++t) first[t + 1] = first[t] + sizes[t];
    const int64_t total = first[m];
    if (counts) std::fill(counts, counts + m, 0);
    // Tensor t's slice [begin, end) of the concatenation, through the kernel with its own pointers.
    auto run = [&](int64_t t, int64_t begin, int64_t end) {
        WeightedSumArgs a = shared;
        a.inputs = inputs + t * shared.k;
        a.out = outs[t];
        const int64_t c = fn(a, begin, end);
        if (c && counts) {
#pragma omp atomic
            counts[t] += c;
        }
        return c;
    };
    int64_t nonfinite = 0;
    if (threads <= 1 || total < 2 * kBlock) {
        for (int64_t t = 0; t < m; ++t) nonfinite += run(t, 0, sizes[t]);
        return nonfinite;
    }
    const int nthreads = static_cast<int>(std::min<int64_t>(threads, total / kBlock));
    // Each thread takes one contiguous, equal share of the concatenated elements: hundreds of small tensors
    // and a few large ones balance alike, and each thread streams its own range.
#pragma omp parallel num_threads(nthreads) reduction(+ : nonfinite)
    {
        const int64_t id = omp_get_thread_num(), count = omp_get_num_threads();
        const int64_t lo = total * id / count, hi = total * (id + 1) / count;
        int64_t t = std::upper_bound(first.begin(), first.end(), lo) - first.begin() - 1;
        for (; t < m && first[t] < hi; ++t) {
            const int64_t begin = std::max(lo, first[t]) - first[t], end = std::min(hi, first[t + 1]) - first[t];
            if (begin < end) nonfinite += run(t, begin, end);
        }
    }
    return nonfinite;
}

}  // namespace pysoup
