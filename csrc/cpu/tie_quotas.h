// Per-block tie quotas: the entries equal to a selection's threshold are kept first in index order, so a threaded
// loop hands each block what the blocks before it left of each quota, and no result depends on the thread count.
// Used by TIES' combine, the sparsified merges' combine and statistics, and SCE's selection from stored variances.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu/blocking.h"

namespace pysoup {
namespace {

// The nb x nq block quotas of quota[0, nq) (< 0: every tie kept; 0: none; > 0: that many), and quota updated to what
// the last block leaves. count_ties(b, counts) writes block b's ties per quota into counts[0, nq); it runs, threaded,
// only when some quota is > 0: otherwise every block takes the quotas as they are.
template <class CountTies>
std::vector<int64_t> block_tie_quotas(int64_t* quota, int nq, int64_t nb, int threads, CountTies count_ties) {
    std::vector<int64_t> out(size_t(nb) * nq);
    bool partial = false;
    for (int q = 0; q < nq; ++q) partial |= quota[q] > 0;
    if (!partial) {
        for (int64_t b = 0; b < nb; ++b) std::copy(quota, quota + nq, out.begin() + b * nq);
        return out;
    }
    std::vector<int64_t> counts(size_t(nb) * nq, 0);
#pragma omp parallel for num_threads(threads_for(threads, nb)) schedule(static)
    for (int64_t b = 0; b < nb; ++b) count_ties(b, counts.data() + b * nq);
    for (int q = 0; q < nq; ++q) {
        int64_t left = quota[q];
        for (int64_t b = 0; b < nb; ++b) {
            out[size_t(b) * nq + q] = left;
            if (left >= 0) left = std::max<int64_t>(0, left - counts[size_t(b) * nq + q]);
        }
        quota[q] = left;
    }
    return out;
}

}  // namespace
}  // namespace pysoup
