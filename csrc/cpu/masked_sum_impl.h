// The masked sum (sparse soup, variance-corrected mean) and the sparse scan per element range, over fp32 tiles.
//
// Included by every ISA's kernel set (kernels_<isa>.cpp) and instantiated there with that ISA's IO type (io_<isa>.h,
// tile loads and stores of the stored dtypes), so the compiler vectorises the fp32 arithmetic with that file's flags.
// Every fma is explicit (the build uses -ffp-contract=off), so all ISAs compute the same bits. Internal linkage, as
// in dtype.h.
#pragma once

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu/blocking.h"
#include "cpu/masked_sum.h"

namespace pysoup {
namespace {

template <class IO>
int64_t masked_sum_kernel(const MaskedSumArgs& a, int64_t begin, int64_t end) {
    std::vector<float> buf(size_t(kOpTile) * (a.k + 3));
    float* acc = buf.data();
    float* div = acc + kOpTile;
    float* nz = div + kOpTile;
    float* x = nz + kOpTile;
    int64_t nonfinite = 0;
    for (int64_t t0 = begin; t0 < end; t0 += kOpTile) {
        const int64_t m = std::min(kOpTile, end - t0);
        for (int i = 0; i < a.k; ++i) IO::load(a.inputs[i], a.in_dtypes[i], t0, m, x + i * kOpTile);
        std::fill(acc, acc + m, -0.0f);
        std::fill(div, div + m, 0.0f);
        std::fill(nz, nz + m, 1.0f);
        for (int i = 0; i < a.k; ++i) {
            const float w = a.weights[i];
            const float* xi = x + i * kOpTile;
            for (int64_t j = 0; j < m; ++j) {
                acc[j] = std::fma(w, xi[j], acc[j]);
                div[j] = xi[j] != 0.0f ? div[j] + w : div[j];
                nz[j] = xi[j] != 0.0f ? nz[j] : 0.0f;
            }
        }
        const float* x0 = x;
        if (a.mode == 0) {  // shared: the zero pattern was verified equal; zeros keep the first input's bits
            for (int64_t j = 0; j < m; ++j) acc[j] = x0[j] == 0.0f ? x0[j] : acc[j] / a.divisor;
        } else if (a.mode == 1) {  // intersection: an entry survives only where every input is non-zero
            for (int64_t j = 0; j < m; ++j) acc[j] = nz[j] != 0.0f ? acc[j] / a.divisor : 0.0f;
        } else if (a.mode == 2) {  // union: each entry averaged over the inputs where it is non-zero
            for (int64_t j = 0; j < m; ++j) acc[j] = div[j] != 0.0f ? acc[j] / div[j] : 0.0f;
        } else {  // the variance-corrected average: the mean, rescaled about `center`
            for (int64_t j = 0; j < m; ++j) acc[j] = std::fma(a.scale, acc[j] / a.divisor - a.center, a.center);
        }
        nonfinite += IO::store(acc, m, a.out, a.out_dtype, t0);
    }
    return nonfinite;
}

template <class IO>
int64_t sparse_scan_kernel(const MaskedSumArgs& a, int64_t begin, int64_t end, int64_t* zeros) {
    std::vector<float> buf(size_t(kOpTile) * 2);
    float* x0 = buf.data();
    float* xi = x0 + kOpTile;
    int64_t z = 0;
    for (int64_t t0 = begin; t0 < end; t0 += kOpTile) {
        const int64_t m = std::min(kOpTile, end - t0);
        IO::load(a.inputs[0], a.in_dtypes[0], t0, m, x0);
        for (int64_t j = 0; j < m; ++j) z += x0[j] == 0.0f;
        for (int i = 1; i < a.k; ++i) {
            IO::load(a.inputs[i], a.in_dtypes[i], t0, m, xi);
            for (int64_t j = 0; j < m; ++j)
                if ((x0[j] == 0.0f) != (xi[j] == 0.0f)) return t0 + j;
        }
    }
    *zeros = z;
    return -1;
}

}  // namespace
}  // namespace pysoup
