// The geometric ops per element range, over fp32 tiles (see geometric.h for what each computes).
//
// Included by each ISA's geometric_<isa>.cpp and instantiated there with that ISA's IO type (io_<isa>.h), so the
// compiler vectorises the fp32 arithmetic with that file's flags. Every fma is explicit (the build uses
// -ffp-contract=off), so all ISAs compute the same bits. Internal linkage, as in dtype.h.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu/blocking.h"
#include "cpu/geometric.h"

namespace pysoup {
namespace {

// The sources of [t0, t0 + m) as fp32 tiles, and with a base, x_i - base (fp32) in the first k - 1 tiles.
template <class IO>
void load_vectors(const SegmentArgs& a, int64_t t0, int64_t m, float* x) {
    for (int i = 0; i < a.k; ++i) IO::load(a.inputs[i], a.in_dtypes[i], t0, m, x + size_t(i) * kOpTile);
    if (a.base) {
        const float* b = x + size_t(a.k - 1) * kOpTile;
        for (int i = 0; i + 1 < a.k; ++i) {
            float* v = x + size_t(i) * kOpTile;
            for (int64_t j = 0; j < m; ++j) v[j] = v[j] - b[j];
        }
    }
}

// The (i, j) of each statistic: squares first, then the pairs i < j in order.
inline void stat_pairs(int m, std::vector<int>& pi, std::vector<int>& pj) {
    for (int i = 0; i < m; ++i) pi.push_back(i), pj.push_back(i);
    for (int i = 0; i < m; ++i)
        for (int j = i + 1; j < m; ++j) pi.push_back(i), pj.push_back(j);
}

// One run [j0, j1) of a row's tile: the statistics' running sums in element order, each product exact in fp64 and
// each addition one rounding (-ffp-contract=off keeps them apart). M, the vectors, known at compile time: the sums
// live in registers as independent chains.
template <int M>
void row_run(const float* x, int64_t j0, int64_t j1, double* sums);

// Written out per M (a loop over the pairs left the sums in memory: 3x slower at M = 3).
template <>
inline void row_run<1>(const float* x, int64_t j0, int64_t j1, double* sums) {
    double s0 = sums[0];
    for (int64_t j = j0; j < j1; ++j) {
        const double v0 = x[j];
        s0 += v0 * v0;
    }
    sums[0] = s0;
}

template <>
inline void row_run<2>(const float* x, int64_t j0, int64_t j1, double* sums) {
    double s0 = sums[0], s1 = sums[1], s2 = sums[2];
    const float *x0 = x, *x1 = x + kOpTile;
    for (int64_t j = j0; j < j1; ++j) {
        const double v0 = x0[j], v1 = x1[j];
        s0 += v0 * v0;
        s1 += v1 * v1;
        s2 += v0 * v1;
    }
    sums[0] = s0, sums[1] = s1, sums[2] = s2;
}

template <>
inline void row_run<3>(const float* x, int64_t j0, int64_t j1, double* sums) {
    double s0 = sums[0], s1 = sums[1], s2 = sums[2], s3 = sums[3], s4 = sums[4], s5 = sums[5];
    const float *x0 = x, *x1 = x + kOpTile, *x2 = x + 2 * kOpTile;
    for (int64_t j = j0; j < j1; ++j) {
        const double v0 = x0[j], v1 = x1[j], v2 = x2[j];
        s0 += v0 * v0;
        s1 += v1 * v1;
        s2 += v2 * v2;
        s3 += v0 * v1;
        s4 += v0 * v2;
        s5 += v1 * v2;
    }
    sums[0] = s0, sums[1] = s1, sums[2] = s2, sums[3] = s3, sums[4] = s4, sums[5] = s5;
}

template <>
inline void row_run<4>(const float* x, int64_t j0, int64_t j1, double* sums) {
    double s[10];
    for (int q = 0; q < 10; ++q) s[q] = sums[q];
    double s0 = s[0], s1 = s[1], s2 = s[2], s3 = s[3], s4 = s[4], s5 = s[5], s6 = s[6], s7 = s[7], s8 = s[8], s9 = s[9];
    const float *x0 = x, *x1 = x + kOpTile, *x2 = x + 2 * kOpTile, *x3 = x + 3 * kOpTile;
    for (int64_t j = j0; j < j1; ++j) {
        const double v0 = x0[j], v1 = x1[j], v2 = x2[j], v3 = x3[j];
        s0 += v0 * v0;
        s1 += v1 * v1;
        s2 += v2 * v2;
        s3 += v3 * v3;
        s4 += v0 * v1;
        s5 += v0 * v2;
        s6 += v0 * v3;
        s7 += v1 * v2;
        s8 += v1 * v3;
        s9 += v2 * v3;
    }
    const double out[10] = {s0, s1, s2, s3, s4, s5, s6, s7, s8, s9};
    for (int q = 0; q < 10; ++q) sums[q] = out[q];
}

// The same for any number of vectors (the pairs from stat_pairs).
inline void row_run_any(const float* x, int64_t j0, int64_t j1, const std::vector<int>& pi, const std::vector<int>& pj,
                        double* sums) {
    const int S = static_cast<int>(pi.size());
    for (int64_t j = j0; j < j1; ++j)
        for (int s = 0; s < S; ++s)
            sums[s] += double(x[size_t(pi[s]) * kOpTile + j]) * double(x[size_t(pj[s]) * kOpTile + j]);
}

template <class IO>
void segment_moments_kernel(const SegmentArgs& a, int64_t begin, int64_t end, int64_t col_begin, int64_t col_end,
                            double* acc) {
    const int m = a.base ? a.k - 1 : a.k;
    const int S = segment_stats(m);
    std::vector<int> pi, pj;
    stat_pairs(m, pi, pj);
    std::vector<float> buf(size_t(kOpTile) * a.k);
    float* x = buf.data();
    const int64_t L = a.length;
    if (!a.columns) {
        // Rows: one running sum per statistic for the current row, written back when the row ends.
        std::vector<double> sums(S);
        int64_t row = (a.start + begin) / L;
        int64_t left = L - (a.start + begin) % L;
        double* r = acc + row * S;
        std::copy(r, r + S, sums.begin());
        for (int64_t t0 = begin; t0 < end; t0 += kOpTile) {
            const int64_t mm = std::min(kOpTile, end - t0);
            load_vectors<IO>(a, t0, mm, x);
            for (int64_t j = 0; j < mm;) {
                const int64_t run = std::min(left, mm - j);
                switch (m) {
                case 1: row_run<1>(x, j, j + run, sums.data()); break;
                case 2: row_run<2>(x, j, j + run, sums.data()); break;
                case 3: row_run<3>(x, j, j + run, sums.data()); break;
                case 4: row_run<4>(x, j, j + run, sums.data()); break;
                default: row_run_any(x, j, j + run, pi, pj, sums.data());
                }
                j += run;
                left -= run;
                if (left == 0) {
                    std::copy(sums.begin(), sums.end(), r);
                    r += S;
                    left = L;
                    if (t0 + j < end) std::copy(r, r + S, sums.begin());
                }
            }
        }
        if (left != L) std::copy(sums.begin(), sums.end(), r);
        return;
    }
    // Columns [col_begin, col_end): every row of the range in order, each row's run of those columns at once.
    int64_t e = a.start + begin;
    const int64_t e_end = a.start + end;
    while (e < e_end) {
        const int64_t row_start = e / L * L;
        const int64_t lo = std::max(row_start + col_begin, e);
        const int64_t hi = std::min(row_start + col_end, e_end);
        for (int64_t c0 = lo; c0 < hi; c0 += kOpTile) {
            const int64_t mm = std::min(kOpTile, hi - c0);
            load_vectors<IO>(a, c0 - a.start, mm, x);
            double* col = acc + (c0 - row_start) * S;
            for (int s = 0; s < S; ++s) {
                const float* u = x + size_t(pi[s]) * kOpTile;
                const float* v = x + size_t(pj[s]) * kOpTile;
                for (int64_t j = 0; j < mm; ++j) col[j * S + s] += double(u[j]) * double(v[j]);
            }
        }
        e = row_start + L;
    }
}

template <class IO>
int64_t segment_weighted_sum_kernel(const SegmentArgs& a, int64_t begin, int64_t end, const float* coefficients,
                                    int64_t vectors, void* out, int out_dtype) {
    const int m = a.base ? a.k - 1 : a.k;
    std::vector<float> buf(size_t(kOpTile) * (a.k + 1));
    float* x = buf.data();
    float* acc = x + size_t(a.k) * kOpTile;
    const int64_t L = a.length;
    int64_t nonfinite = 0;
    for (int64_t t0 = begin; t0 < end; t0 += kOpTile) {
        const int64_t mm = std::min(kOpTile, end - t0);
        load_vectors<IO>(a, t0, mm, x);
        const int64_t e = a.start + t0;
        std::fill(acc, acc + mm, -0.0f);
        // Runs of one row (one coefficient per source) or of consecutive columns (consecutive coefficients); each
        // element still gets its sources' fmas in source order.
        int64_t vec = a.columns ? e % L : e / L;
        int64_t left = a.columns ? L - vec : L - e % L;
        for (int64_t j = 0; j < mm;) {
            const int64_t run = std::min(left, mm - j);
            for (int i = 0; i < m; ++i) {
                const float* c = coefficients + size_t(i) * vectors + vec;
                const float* v = x + size_t(i) * kOpTile;
                if (a.columns) {
                    for (int64_t q = 0; q < run; ++q) acc[j + q] = std::fma(c[q], v[j + q], acc[j + q]);
                } else {
                    const float ci = c[0];
                    for (int64_t q = 0; q < run; ++q) acc[j + q] = std::fma(ci, v[j + q], acc[j + q]);
                }
            }
            j += run;
            vec = a.columns ? 0 : vec + 1;
            left = L;
        }
        if (a.base) {
            const float* b = x + size_t(a.k - 1) * kOpTile;
            for (int64_t j = 0; j < mm; ++j) acc[j] = std::fma(1.0f, acc[j], b[j]);
        }
        nonfinite += IO::store(acc, mm, out, out_dtype, t0);
    }
    return nonfinite;
}

template <class IO>
int64_t nearswap_kernel(const void* const* inputs, const int* in_dtypes, float t, int64_t begin, int64_t end, void* out,
                        int out_dtype) {
    std::vector<float> buf(size_t(kOpTile) * 2);
    float* x = buf.data();
    float* a = x + kOpTile;
    const float lo = 1e-6f;
    int64_t nonfinite = 0;
    for (int64_t t0 = begin; t0 < end; t0 += kOpTile) {
        const int64_t m = std::min(kOpTile, end - t0);
        IO::load(inputs[0], in_dtypes[0], t0, m, x);
        IO::load(inputs[1], in_dtypes[1], t0, m, a);
        for (int64_t j = 0; j < m; ++j) {
            const float d = std::fabs(a[j] - x[j]);
            const float dc = d < lo ? lo : d;  // NaN stays NaN, as torch.clamp
            const float w0 = (1.0f / dc) * t;
            const float w = w0 < 0.0f ? 0.0f : (w0 > 1.0f ? 1.0f : w0);
            const float r = w * x[j] + (1.0f - w) * a[j];
            x[j] = std::isnan(r) ? std::numeric_limits<float>::quiet_NaN() : r;  // the one NaN 0x7FC00000
        }
        nonfinite += IO::store(x, m, out, out_dtype, t0);
    }
    return nonfinite;
}

// The importance of [t0, t0 + m) into imp (p tile, b tile, imp: kOpTile floats each).
template <class IO>
void fusion_importance(const FusionArgs& a, int64_t t0, int64_t m, float* p, float* b, float* imp) {
    IO::load(a.inputs[0], a.in_dtypes[0], t0, m, p);
    IO::load(a.inputs[1], a.in_dtypes[1], t0, m, b);
    const int64_t e = a.start + t0;
    int64_t r = e / a.row, left = a.row - e % a.row;
    for (int64_t j = 0; j < m; ++j) {
        imp[j] = std::fabs(p[j] - b[j]) * a.kl[r];
        if (--left == 0) ++r, left = a.row;
    }
}

// Threads count into the one histogram with relaxed atomic increments: per-thread copies (1.5 MiB zeroed and added
// up per call) cost more than the rare collisions of two threads.
template <class IO>
void fusion_histogram_kernel(const FusionArgs& a, int pass, int64_t begin, int64_t end, uint64_t* hist) {
    std::vector<float> buf(size_t(kOpTile) * 3);
    float *p = buf.data(), *b = p + kOpTile, *imp = b + kOpTile;
    for (int64_t t0 = begin; t0 < end; t0 += kOpTile) {
        const int64_t m = std::min(kOpTile, end - t0);
        fusion_importance<IO>(a, t0, m, p, b, imp);
        for (int64_t j = 0; j < m; ++j) {
            const uint32_t key = fusion_key(imp[j]);
            if (pass == 0) {
                __atomic_fetch_add(&hist[key >> 16], 1, __ATOMIC_RELAXED);
            } else {
                for (int q = 0; q < a.quantiles; ++q)
                    if ((key >> 16) == a.prefix[q])
                        __atomic_fetch_add(&hist[size_t(q) * 65536 + (key & 0xFFFFu)], 1, __ATOMIC_RELAXED);
            }
        }
    }
}

template <class IO>
int64_t fusion_combine_kernel(const FusionArgs& a, float threshold, int64_t begin, int64_t end, void* out,
                              int out_dtype) {
    std::vector<float> buf(size_t(kOpTile) * 3);
    float *p = buf.data(), *b = p + kOpTile, *imp = b + kOpTile;
    int64_t nonfinite = 0;
    for (int64_t t0 = begin; t0 < end; t0 += kOpTile) {
        const int64_t m = std::min(kOpTile, end - t0);
        fusion_importance<IO>(a, t0, m, p, b, imp);
        for (int64_t j = 0; j < m; ++j) {
            const float mask = imp[j] >= threshold ? 1.0f : 0.0f;
            p[j] = b[j] + (p[j] - b[j]) * mask;  // mergekit's order: no fma (-ffp-contract=off)
        }
        nonfinite += IO::store(p, m, out, out_dtype, t0);
    }
    return nonfinite;
}

}  // namespace
}  // namespace pysoup
