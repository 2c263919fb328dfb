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

// The importance of [t0, t0 + m) into imp (p tile, b tile, imp: kOpTile floats each), in runs of one row (one KL
// factor), so the product vectorises.
template <class IO>
void fusion_importance(const FusionArgs& a, int64_t t0, int64_t m, float* p, float* b, float* imp) {
    IO::load(a.inputs[0], a.in_dtypes[0], t0, m, p);
    IO::load(a.inputs[1], a.in_dtypes[1], t0, m, b);
    const int64_t e = a.start + t0;
    int64_t r = e / a.row, left = a.row - e % a.row;
    for (int64_t j = 0; j < m;) {
        const int64_t run = std::min(left, m - j);
        const float k = a.kl[r];
        for (int64_t q = j; q < j + run; ++q) imp[q] = std::fabs(p[q] - b[q]) * k;
        j += run;
        ++r;
        left = a.row;
    }
}

// Pass 0 counts every element into `hist`, which the caller makes the thread's own (plain increments: one atomic per
// element cost more than the counting). Pass 1 counts only the few elements whose high half matches a quantile's:
// relaxed atomic increments into the shared histogram.
template <class IO>
void fusion_histogram_kernel(const FusionArgs& a, int pass, int64_t begin, int64_t end, uint64_t* hist) {
    std::vector<float> buf(size_t(kOpTile) * 3);
    float *p = buf.data(), *b = p + kOpTile, *imp = b + kOpTile;
    uint32_t keys[kOpTile];
    // Up to three quantiles' prefixes; a missing one never matches (high halves are < 65536).
    const uint32_t p0 = a.quantiles > 0 ? a.prefix[0] : 0xFFFFFFFFu, p1 = a.quantiles > 1 ? a.prefix[1] : 0xFFFFFFFFu,
                   p2 = a.quantiles > 2 ? a.prefix[2] : 0xFFFFFFFFu;
    for (int64_t t0 = begin; t0 < end; t0 += kOpTile) {
        const int64_t m = std::min(kOpTile, end - t0);
        fusion_importance<IO>(a, t0, m, p, b, imp);
        for (int64_t j = 0; j < m; ++j) keys[j] = fusion_key(imp[j]);
        if (pass == 0) {
            for (int64_t j = 0; j < m; ++j) ++hist[keys[j] >> 16];
            continue;
        }
        // Pass 1: a match flag per element (vectorised), then only the groups of 8 with a match looked at (a few
        // percent of the elements match, spread out: a branch per element mispredicted, and packing every element's
        // position branch-free cost more than computing the keys).
        uint8_t hit[kOpTile + 8] = {};
        for (int64_t j = 0; j < m; ++j) {
            const uint32_t hi = keys[j] >> 16;
            hit[j] = (hi == p0) | (hi == p1) | (hi == p2);
        }
        for (int64_t g = 0; g < m; g += 8) {
            uint64_t word;
            __builtin_memcpy(&word, hit + g, 8);
            if (!word) continue;
            for (int64_t j = g; j < std::min(m, g + 8); ++j) {
                if (!hit[j]) continue;
                const uint32_t key = keys[j];
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

// -- Arcee Fusion's row KL, fp64 (the definition: geometric.h, fusion_kl; pysoup.ops.reference.fusion_kl) --------
// exp and log are polynomials in + - * / and floor only, each operation one IEEE rounding (-ffp-contract=off), so
// the torch reference, which runs the same operations on fp64 tensors, gets the same bits: libm's and torch's exp
// and log differ from each other in the last bit, and the result is rounded to fp32 once anyway.
constexpr double kKlInvLn2 = 1.4426950408889634;
constexpr double kKlLn2Hi = 0.6931471803691238;  // 0x3FE62E42FEE00000: k * hi is exact for |k| < 2^11
constexpr double kKlLn2Lo = 1.9082149292705877e-10;
constexpr double kKlSqrt2 = 1.4142135623730951;
constexpr double kKlEps = 9.99999993922529e-09;  // fp32(1e-8), what mergekit adds to its fp32 softmax
constexpr double kKlExpFloor = -600.0;          // exp(r) below it counts as 0 (it vanishes next to kKlEps)

inline double kl_bits_to_double(uint64_t u) {
    double d;
    __builtin_memcpy(&d, &u, 8);
    return d;
}

inline uint64_t kl_double_bits(double d) {
    uint64_t u;
    __builtin_memcpy(&u, &d, 8);
    return u;
}

// exp(f) for |f| <= ln2 / 2 by its Taylor series to f^13 (error < 1e-17), by Estrin's scheme (pairs in f, then f^2,
// f^4, f^8): a quarter of Horner's dependent chain, which made this loop latency-bound. The coefficients 1/i!.
inline double kl_exp_series(double f) {
    const double f2 = f * f, f4 = f2 * f2, f8 = f4 * f4;
    const double a0 = 1.0 + 1.0 * f, a1 = 0.5 + 0.16666666666666666 * f;
    const double a2 = 0.041666666666666664 + 0.008333333333333333 * f;
    const double a3 = 0.001388888888888889 + 0.0001984126984126984 * f;
    const double a4 = 2.48015873015873e-05 + 2.7557319223985893e-06 * f;
    const double a5 = 2.755731922398589e-07 + 2.505210838544172e-08 * f;
    const double a6 = 2.08767569878681e-09 + 1.6059043836821613e-10 * f;
    const double b0 = a0 + a1 * f2, b1 = a2 + a3 * f2, b2 = a4 + a5 * f2;
    return (b0 + b1 * f4) + (b2 + a6 * f4) * f8;
}

// exp(r) for r <= 0: r = k ln2 + f (Cody-Waite), exp(f) by kl_exp_series, times 2^k built from its bits; 0 below
// kKlExpFloor.
inline double kl_exp(double r) {
    const double rc = r < kKlExpFloor ? kKlExpFloor : r;
    const double k = std::floor(rc * kKlInvLn2 + 0.5);
    const double f = (rc - k * kKlLn2Hi) - k * kKlLn2Lo;
    const double s = kl_exp_series(f);
    // 2^k (k in [-866, 0]): 2^52 + 1023 + k holds k + 1023 in its low mantissa bits; shifted into the exponent field.
    const double scale = kl_bits_to_double(kl_double_bits(k + 4503599627371519.0) << 52);
    return r < kKlExpFloor ? 0.0 : s * scale;
}

// Where every r of a row lies in [kKlExpNear, 0], kl_exp(r) is kl_exp_series(r), bit for bit: k = 0 there
// (r / ln2 + 0.5 in (0, 0.5]), so f = (r - 0) - 0 = r and the scale is 1. The row loop then skips the reduction.
constexpr double kKlExpNear = -0.34;  // ln2 / 2 = 0.3466, less a margin for the rounding of r / ln2 + 0.5

// 2 atanh(s) = 2 s (1 + z/3 + z^2/5 + ...), z = s^2, to z^11 (|s| < 0.172: error < 1e-19), by Estrin's scheme.
inline double kl_atanh2(double s) {
    const double z = s * s;
    const double z2 = z * z, z4 = z2 * z2, z8 = z4 * z4;
    const double a0 = 1.0 + 0.3333333333333333 * z, a1 = 0.2 + 0.14285714285714285 * z;
    const double a2 = 0.1111111111111111 + 0.09090909090909091 * z;
    const double a3 = 0.07692307692307693 + 0.06666666666666667 * z;
    const double a4 = 0.058823529411764705 + 0.05263157894736842 * z;
    const double a5 = 0.047619047619047616 + 0.043478260869565216 * z;
    const double q = ((a0 + a1 * z2) + (a2 + a3 * z2) * z4) + (a4 + a5 * z2) * z8;
    return (2.0 * s) * q;
}

// 2 atanh(s) to z^3, for rows where every |s| <= kKlLogShort (z <= 1e-4: error < 2e-17 relative).
inline double kl_atanh2_short(double s) {
    const double z = s * s;
    const double z2 = z * z;
    const double a0 = 1.0 + 0.3333333333333333 * z, a1 = 0.2 + 0.14285714285714285 * z;
    return (2.0 * s) * (a0 + a1 * z2);
}

// log(P / Q) for positive normal P and Q, with one division: P = 2^eP mP and Q = 2^eQ mQ (mP, mQ in [1, 2)), one
// mantissa doubled (and e = eP - eQ moved by one) where that brings mP / mQ into [sqrt(1/2), sqrt(2)]; then
// log(P / Q) = e ln2 + 2 atanh(s), s = (mP - mQ) / (mP + mQ) (|s| < 0.172; mP - mQ is exact, the two being within a
// factor of 2 of each other), atanh(s) / s by its series in z = s^2 to z^11 (error < 1e-19); e ln2 added in two
// parts. (log of the rounded quotient P / Q took a second division, the loop's most expensive operation.)
// The atanh series is kl_atanh2_short's where `short_series` (the row's choice, see fusion_kl_row).
inline double kl_log_ratio(double P, double Q, bool short_series) {
    const uint64_t up = kl_double_bits(P), uq = kl_double_bits(Q);
    // The exponents, exactly: 2^52 + the biased exponent field, less 2^52 (their biases cancel in e).
    const double ep = kl_bits_to_double((up >> 52) | 0x4330000000000000ull);
    const double eq = kl_bits_to_double((uq >> 52) | 0x4330000000000000ull);
    double mp = kl_bits_to_double((up & 0x000FFFFFFFFFFFFFull) | 0x3FF0000000000000ull);
    double mq = kl_bits_to_double((uq & 0x000FFFFFFFFFFFFFull) | 0x3FF0000000000000ull);
    const bool up2 = mp > mq * kKlSqrt2, down2 = mq > mp * kKlSqrt2;
    mq = up2 ? mq * 2.0 : mq;
    mp = down2 ? mp * 2.0 : mp;
    const double e = (ep - eq) + (up2 ? 1.0 : (down2 ? -1.0 : 0.0));
    const double s = (mp - mq) / (mp + mq);
    return e * kKlLn2Hi + (e * kKlLn2Lo + (short_series ? kl_atanh2_short(s) : kl_atanh2(s)));
}

// Where P / Q lies in [0.72, 1.39], kl_log_ratio(P, Q) is kl_atanh2((P - Q) / (P + Q)), bit for bit: its mantissas
// are then P and Q scaled by one power of 2 (e = +0: e ln2's terms add +0), and scaling by a power of 2 changes no
// rounding of the difference, sum or quotient. |(P - Q) / (P + Q)| <= kKlLogNear implies P / Q in [0.724, 1.381].
constexpr double kKlLogNear = 0.16;

// A row whose |s| are all <= kKlLogShort (p and b close: a fine-tune and its base) takes kl_atanh2_short for every
// element, the others kl_atanh2: part of the definition (the reference chooses the same way), ~1 ns an element less.
constexpr double kKlLogShort = 0.01;

// The row sums: kKlLanes running sums, element j into lane j % kKlLanes, each in element order from +0.0, then the
// lanes added pairwise ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7)). One sum in element order would cost an
// fp64 addition's latency per element (the kernel's bottleneck); these vectorise and keep a fixed order.
constexpr int kKlLanes = 8;

inline double kl_sum(const double* x, int64_t n) {
    double acc[kKlLanes] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
    int64_t j = 0;
    for (; j + kKlLanes <= n; j += kKlLanes)
        for (int l = 0; l < kKlLanes; ++l) acc[l] += x[j + l];
    for (int l = 0; j + l < n; ++l) acc[l] += x[j + l];
    return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

// One row's KL from its values (fp64, overwritten; xo: `row` more doubles).
// The extremes of a row's p and b values and whether one is not finite, gathered in fp32 while the row is loaded
// (exact in any order; 16 lanes let the loop vectorise).
struct KlRowScan {
    static constexpr int kLanes = 16;
    float mp[kLanes], mb[kLanes], np[kLanes], nb[kLanes], bad[kLanes];
    KlRowScan() {
        for (int l = 0; l < kLanes; ++l) mp[l] = mb[l] = -HUGE_VALF, np[l] = nb[l] = HUGE_VALF, bad[l] = 0.0f;
    }
    void add(const float* p, const float* b, int64_t m) {
        auto one = [&](int64_t j, int l) {
            mp[l] = p[j] > mp[l] ? p[j] : mp[l];
            mb[l] = b[j] > mb[l] ? b[j] : mb[l];
            np[l] = p[j] < np[l] ? p[j] : np[l];
            nb[l] = b[j] < nb[l] ? b[j] : nb[l];
            bad[l] += (p[j] - p[j]) + (b[j] - b[j]);  // NaN exactly where a value is NaN or infinite
        };
        int64_t j = 0;
        for (; j + kLanes <= m; j += kLanes)
            for (int l = 0; l < kLanes; ++l) one(j + l, l);
        for (int l = 0; j + l < m; ++l) one(j + l, l);
    }
};

// One row's KL from its values (fp64, overwritten; xo: `row` more doubles) and their scan.
inline float fusion_kl_row(double* xp, double* xb, double* xo, int64_t row, const KlRowScan& sc) {
    // A row with a non-finite value has no KL (NaN: the importance of its elements is NaN, never kept).
    double mxp = sc.mp[0], mxb = sc.mb[0], mnp = sc.np[0], mnb = sc.nb[0];
    float nan = 0.0f;
    for (int l = 0; l < KlRowScan::kLanes; ++l) {
        mxp = sc.mp[l] > mxp ? sc.mp[l] : mxp;
        mxb = sc.mb[l] > mxb ? sc.mb[l] : mxb;
        mnp = sc.np[l] < mnp ? sc.np[l] : mnp;
        mnb = sc.nb[l] < mnb ? sc.nb[l] : mnb;
        nan += sc.bad[l];
    }
    if (nan != 0.0f) return std::numeric_limits<float>::quiet_NaN();
    // exp(x - max): without the range reduction where the row's spread allows (kKlExpNear; the same bits).
    for (int i = 0; i < 2; ++i) {
        double* x = i ? xb : xp;
        const double mx = i ? mxb : mxp;
        if ((i ? mnb : mnp) - mx >= kKlExpNear) {
            for (int64_t j = 0; j < row; ++j) x[j] = kl_exp_series(x[j] - mx);
        } else {
            for (int64_t j = 0; j < row; ++j) x[j] = kl_exp(x[j] - mx);
        }
    }
    const double ip = 1.0 / kl_sum(xp, row), ib = 1.0 / kl_sum(xb, row);
    // P log(P / Q): s = (P - Q) / (P + Q) first (P kept in xp, s in xo), for the row's largest |s|, which picks the
    // atanh series (kKlLogShort) and tells whether any element needs the exponent split (kKlLogNear).
    double far[kKlLanes] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
    auto ratio = [&](int64_t j, int l) {
        const double P = xp[j] * ip + kKlEps, Q = xb[j] * ib + kKlEps;
        const double s = (P - Q) / (P + Q);
        const double a = std::fabs(s);
        far[l] = a > far[l] ? a : far[l];
        xp[j] = P;
        xo[j] = s;
    };
    int64_t j0 = 0;
    for (; j0 + kKlLanes <= row; j0 += kKlLanes)
        for (int l = 0; l < kKlLanes; ++l) ratio(j0 + l, l);
    for (int l = 0; j0 + l < row; ++l) ratio(j0 + l, l);
    double worst = 0.0;
    for (int l = 0; l < kKlLanes; ++l) worst = far[l] > worst ? far[l] : worst;
    if (worst <= kKlLogShort) {
        for (int64_t j = 0; j < row; ++j) xo[j] = xp[j] * kl_atanh2_short(xo[j]);
    } else if (worst <= kKlLogNear) {
        for (int64_t j = 0; j < row; ++j) xo[j] = xp[j] * kl_atanh2(xo[j]);
    } else {
        for (int64_t j = 0; j < row; ++j) xo[j] = xp[j] * kl_log_ratio(xp[j], xb[j] * ib + kKlEps, false);
    }
    return static_cast<float>(kl_sum(xo, row));
}

// Rows [r0, r1) (the inputs at row 0's first element) into kl[r0 .. r1); with `hist` (2 x 65536 counts), each of those
// rows' importances |p - b| * kl[r] (fp32, as fusion_importance) counted there by the high half of its order key, as
// fusion_histogram's pass 0 (the two halves added give the counts): the row is at hand, so this saves that pass's
// reading of both tensors.
template <class IO>
void fusion_kl_kernel(const void* const* inputs, const int* in_dtypes, int64_t row, int64_t r0, int64_t r1, float* kl,
                      uint64_t* hist) {
    std::vector<double> buf(size_t(row) * 3);
    double *xp = buf.data(), *xb = xp + row, *xo = xb + row;
    std::vector<float> dbuf(hist ? size_t(row) : 0);
    float* d = dbuf.data();  // |p - b|, fp32
    float tp[kOpTile], tb[kOpTile];
    for (int64_t r = r0; r < r1; ++r) {
        KlRowScan scan;
        for (int64_t t0 = 0; t0 < row; t0 += kOpTile) {
            const int64_t m = std::min(kOpTile, row - t0);
            IO::load(inputs[0], in_dtypes[0], r * row + t0, m, tp);
            IO::load(inputs[1], in_dtypes[1], r * row + t0, m, tb);
            for (int64_t j = 0; j < m; ++j) xp[t0 + j] = tp[j], xb[t0 + j] = tb[j];
            scan.add(tp, tb, m);
            if (hist)
                for (int64_t j = 0; j < m; ++j) d[t0 + j] = std::fabs(tp[j] - tb[j]);
        }
        kl[r] = fusion_kl_row(xp, xb, xo, row, scan);
        if (hist) {  // the keys a tile at a time (vectorised), then counted
            const float k = kl[r];
            uint32_t keys[kOpTile];
            // Alternate elements into two histograms: runs of equal keys (p == b: a fifth of a fine-tune's elements)
            // made each increment wait on the previous one's store (one histogram: ~1.5 ns an element more).
            uint64_t* h1 = hist + 65536;
            for (int64_t t0 = 0; t0 < row; t0 += kOpTile) {
                const int64_t m = std::min(kOpTile, row - t0);
                for (int64_t j = 0; j < m; ++j) keys[j] = fusion_key(d[t0 + j] * k);
                int64_t j = 0;
                for (; j + 2 <= m; j += 2) {
                    ++hist[keys[j] >> 16];
                    ++h1[keys[j + 1] >> 16];
                }
                if (j < m) ++hist[keys[j] >> 16];
            }
        }
    }
}

}  // namespace
}  // namespace pysoup
