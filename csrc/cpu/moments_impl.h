// The fp64 statistics per block of kStatBlock elements, over fp32 tiles.
//
// Included by every ISA's kernel set (kernels_<isa>.cpp) and instantiated there with that ISA's IO type (io_<isa>.h,
// tile loads and stores of the stored dtypes), so the compiler vectorises the fp32 arithmetic with that file's flags.
// Every fma is explicit (the build uses -ffp-contract=off), so all ISAs compute the same bits. Internal linkage, as
// in dtype.h.
#pragma once

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu/moments.h"
#include "cpu/philox.h"

namespace pysoup {
namespace {

// Statistics per block of kStatBlock elements starting at block_begin (a multiple of kStatBlock within the
// range): lane l accumulates elements j = l (mod kStatLanes) in order, in fp64 from +0; lanes then combine as
// ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7)). block_out gets moments_size() values per block.
template <class IO>
void moments_kernel(const MomentsArgs& a, int64_t block_begin, int64_t end, double* block_out) {
    const int v = a.k + (a.mean ? 1 : 0);
    const int nstat = moments_size(a.k, a.mean, a.dare);
    std::vector<float> buf(size_t(kStatBlock) * (v + 1 + (a.dare ? a.k : 0)));
    float* vec = buf.data();                          // v vectors
    float* base_tile = vec + size_t(v) * kStatBlock;  // base (or scratch)
    float* dropped = base_tile + kStatBlock;          // k DARE-dropped task vectors
    std::vector<double> lanes(size_t(nstat) * kStatLanes);
    std::vector<uint32_t> words(a.dare ? size_t(kStatBlock) * 3 + 16 : 0);
    for (int64_t b0 = block_begin; b0 < end; b0 += kStatBlock) {
        const int64_t m = std::min(kStatBlock, end - b0);
        const int64_t padded = (m + kStatLanes - 1) / kStatLanes * kStatLanes;
        if (a.base) IO::load(a.base, a.base_dtype, b0, m, base_tile);
        for (int i = 0; i < a.k; ++i) {
            float* t = vec + size_t(i) * kStatBlock;
            if (a.base)
                IO::load_minus(a.inputs[i], a.in_dtypes[i], b0, m, base_tile, t);
            else
                IO::load(a.inputs[i], a.in_dtypes[i], b0, m, t);
            std::fill(t + m, t + padded, 0.0f);
        }
        if (a.mean) {
            float* mv = vec + size_t(a.k) * kStatBlock;
            std::fill(mv, mv + padded, -0.0f);
            for (int i = 0; i < a.k; ++i) {
                const float* t = vec + size_t(i) * kStatBlock;
                for (int64_t j = 0; j < m; ++j) mv[j] = std::fma(a.weights[i], t[j], mv[j]);
            }
            for (int64_t j = 0; j < m; ++j) mv[j] = mv[j] / a.divisor;
            std::fill(mv + m, mv + padded, 0.0f);
        }
        if (a.dare) {
            for (int i = 0; i < a.k; ++i) {
                const float* t = vec + size_t(i) * kStatBlock;
                float* d = dropped + size_t(i) * kStatBlock;
                philox_words(a.dare_keys[i], uint64_t(a.start + b0), m, words.data(), words.data() + kStatBlock + 8);
                for (int64_t j = 0; j < m; ++j) d[j] = words[j] < a.keep_below[i] ? t[j] : 0.0f;
                std::fill(d + m, d + padded, 0.0f);
            }
        }
        std::fill(lanes.begin(), lanes.end(), 0.0);
        double* L = lanes.data();
        int s = 0;
        for (int i = 0; i < v; ++i, s += 3) {
            const float* t = vec + size_t(i) * kStatBlock;
            double* sum = L + size_t(s) * kStatLanes;
            double* sq = sum + kStatLanes;
            double* ab = sq + kStatLanes;
            for (int64_t j = 0; j < padded; j += kStatLanes)
                for (int l = 0; l < kStatLanes; ++l) {
                    const double x = t[j + l];
                    sum[l] += x;
                    sq[l] += x * x;  // exact: a float's square fits in a double
                    ab[l] += std::fabs(x);
                }
        }
        for (int i = 0; i < v; ++i)
            for (int q = i + 1; q < v; ++q, ++s) {
                if (!a.gram) continue;
                const float* ti = vec + size_t(i) * kStatBlock;
                const float* tq = vec + size_t(q) * kStatBlock;
                double* g = L + size_t(s) * kStatLanes;
                for (int64_t j = 0; j < padded; j += kStatLanes)
                    for (int l = 0; l < kStatLanes; ++l) g[l] += double(ti[j + l]) * double(tq[j + l]);
            }
        if (a.dare)
            for (int i = 0; i < a.k; ++i, ++s) {
                const float* d = dropped + size_t(i) * kStatBlock;
                double* ab = L + size_t(s) * kStatLanes;
                for (int64_t j = 0; j < padded; j += kStatLanes)
                    for (int l = 0; l < kStatLanes; ++l) ab[l] += std::fabs(double(d[j + l]));
            }
        double* out = block_out + size_t((b0 - block_begin) / kStatBlock) * nstat;
        for (int q = 0; q < nstat; ++q) {
            const double* l = L + size_t(q) * kStatLanes;
            out[q] = ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
        }
    }
}

}  // namespace
}  // namespace pysoup
