// The sparsified task-vector merges per element range, over fp32 tiles: the selections (Breadcrumbs' magnitude
// band, DELLA's rank-probability draws, SCE's variance selection), the mixes (sum, TIES, SCE, RAM), the statistics
// pass, tie counts and variance histograms.
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
#include "cpu/dtype.h"
#include "cpu/moments.h"
#include "cpu/philox.h"
#include "cpu/sparsify.h"

namespace pysoup {
namespace {

constexpr int64_t kSparseTile = kStatBlock;  // the statistics sum per block of kStatBlock: one tile per block

// DELLA's keep thresholds of every row of one group of rows ("slab": row * stride elements from slab * row * stride,
// the rows interleaved when stride > 1), per model; a range ranks each slab it touches once.
struct RankCache {
    int64_t slab = -1;
    std::vector<uint32_t> below;  // k x slab elements: Philox words below this keep the entry
    std::vector<uint64_t> key, key2;  // one row: |tau| bits << 32 | position, sorted by a radix sort
    std::vector<uint32_t> by_rank;               // one model's keep threshold per rank
    std::vector<float> tile;                     // a contiguous row's loads
};

// round(p * 2^32), at most 2^32 - 1 (p in [0, 1]).
inline uint32_t keep_below_of(float p) {
    const double v = std::floor(double(p) * 4294967296.0 + 0.5);
    return v >= 4294967295.0 ? 0xFFFFFFFFu : uint32_t(v);
}

// Sorts c.key ascending by its high 32 bits (|tau| bits; the low 32 bits are the position) by a stable LSD radix
// sort over those 4 bytes, bytes whose value every key shares skipped: ties stay in index order, as the reference's
// stable sort keeps them. 4 x 256 counters, no comparisons; one 8-byte move per element and pass.
inline void radix_sort_row(RankCache& c, int64_t n) {
    uint32_t counts[4][256] = {};
    for (int64_t j = 0; j < n; ++j) {
        const uint32_t k = uint32_t(c.key[size_t(j)] >> 32);
        ++counts[0][k & 0xFF];
        ++counts[1][(k >> 8) & 0xFF];
        ++counts[2][(k >> 16) & 0xFF];
        ++counts[3][k >> 24];
    }
    uint64_t* src = c.key.data();
    uint64_t* dst = c.key2.data();
    for (int byte = 0; byte < 4; ++byte) {
        uint32_t* cnt = counts[byte];
        const int shift = 32 + 8 * byte;
        if (cnt[(src[0] >> shift) & 0xFF] == uint32_t(n)) continue;  // one value: nothing moves
        uint32_t sum = 0;
        for (int b = 0; b < 256; ++b) {
            const uint32_t v = cnt[b];
            cnt[b] = sum;
            sum += v;
        }
        for (int64_t j = 0; j < n; ++j) dst[cnt[(src[j] >> shift) & 0xFF]++] = src[j];
        std::swap(src, dst);
    }
    if (src != c.key.data()) std::copy(src, src + n, c.key.data());
}

template <class IO>
void rank_slab(const SparseArgs& a, int64_t slab, RankCache& c) {
    const int64_t len = a.row * a.stride, s0 = slab * len;
    c.below.resize(size_t(a.k) * size_t(len));
    c.key.resize(size_t(a.row));
    c.key2.resize(size_t(a.row));
    c.by_rank.resize(size_t(a.row));
    if (a.stride == 1) c.tile.resize(size_t(2 * kOpTile));
    const float denom = float(a.row > 1 ? a.row - 1 : 1);
    for (int i = 0; i < a.k; ++i) {
        if (!a.drops[i]) continue;
        uint32_t* kb = c.below.data() + size_t(i) * size_t(len);
        // The keep threshold of each rank: the same for every row of the tensor.
        const float lo = a.lo[i], eps = a.eps[i];
        for (int64_t r = 0; r < a.row; ++r) {
            const float rn = float(r) / denom;
            const float p = (rn * 2.0f) * eps + lo;  // two fp32 roundings, as mergekit (and the reference)
            c.by_rank[size_t(r)] = keep_below_of(p);
        }
        for (int64_t col = 0; col < a.stride; ++col) {
            if (a.stride == 1) {  // one contiguous row: tile loads
                float* x = c.tile.data();
                float* b = x + kOpTile;
                for (int64_t j0 = 0; j0 < a.row; j0 += kOpTile) {
                    const int64_t m = std::min(kOpTile, a.row - j0);
                    IO::load(a.inputs[i], a.in_dtypes[i], s0 + j0, m, x);
                    IO::load(a.base, a.base_dtype, s0 + j0, m, b);
                    for (int64_t j = 0; j < m; ++j) {
                        c.key[size_t(j0 + j)] = (uint64_t(abs_bits(x[j] - b[j])) << 32) | uint64_t(j0 + j);
                    }
                }
            } else {
                for (int64_t j = 0; j < a.row; ++j) {
                    const int64_t e = s0 + j * a.stride + col;
                    const float t = load_f32(a.inputs[i], a.in_dtypes[i], e) - load_f32(a.base, a.base_dtype, e);
                    c.key[size_t(j)] = (uint64_t(abs_bits(t)) << 32) | uint64_t(j);
                }
            }
            radix_sort_row(c, a.row);  // ascending |tau|, ties in index order
            for (int64_t r = 0; r < a.row; ++r)
                kb[int64_t(c.key[size_t(r)] & 0xFFFFFFFFu) * a.stride + col] = c.by_rank[size_t(r)];
        }
    }
    c.slab = slab;
}

// The entries among the top of a selection: bits > thr, and ties first in index order while the quota lasts.
inline void top_mask(const uint32_t* bits, int64_t m, uint32_t thr, int64_t& quota, uint8_t* out) {
    int64_t ties = 0;
    if (quota >= 0)
        for (int64_t j = 0; j < m; ++j) ties += bits[j] == thr;
    if (quota < 0 || ties <= quota) {  // every tie in this tile is kept
        for (int64_t j = 0; j < m; ++j) out[j] = bits[j] >= thr;
        if (quota >= 0) quota -= ties;
        return;
    }
    if (quota == 0) {
        for (int64_t j = 0; j < m; ++j) out[j] = bits[j] > thr;
        return;
    }
    for (int64_t j = 0; j < m; ++j) {  // the one tile where the quota runs out: ties kept in index order
        const uint32_t b = bits[j];
        bool keep = b > thr;
        if (b == thr && quota > 0) {
            keep = true;
            --quota;
        }
        out[j] = keep;
    }
}

// The fp32 bits of each entry's variance across the models: Welford's update in fp64 in model order, rounded to fp32
// (torch.var(dim=0, unbiased=False) on the CPU). mean and m2: scratch of m doubles each.
inline void variance_bits(const float* tau, int k, int64_t m, double* mean, double* m2, uint32_t* bits) {
    std::fill(mean, mean + m, 0.0);
    std::fill(m2, m2 + m, 0.0);
    for (int i = 0; i < k; ++i) {
        const float* t = tau + size_t(i) * kSparseTile;
        const double n = double(i + 1);
        for (int64_t j = 0; j < m; ++j) {
            const double d = t[j];
            const double delta = d - mean[j];
            mean[j] = mean[j] + delta / n;
            m2[j] = m2[j] + delta * (d - mean[j]);
        }
    }
    for (int64_t j = 0; j < m; ++j) bits[j] = abs_bits(float(m2[j] / double(k)));
}

struct SparseScratch {
    std::vector<float> buf;
    float* base;
    float* tau;  // k tiles
    float* aux;
    float* mix;
    float* div;
    std::vector<uint32_t> bits;
    std::vector<uint8_t> m1, m2;
    std::vector<uint32_t> words;
    std::vector<double> wmean, wm2;  // Welford's running mean and sum of squares
    RankCache rank;
    explicit SparseScratch(int k)
        : buf(size_t(kSparseTile) * (k + 4)),
          bits(kSparseTile),
          m1(kSparseTile),
          m2(kSparseTile),
          words(size_t(kSparseTile) * 3 + 16),
          wmean(kSparseTile),
          wm2(kSparseTile) {
        base = buf.data();
        aux = base + kSparseTile;
        mix = aux + kSparseTile;
        div = mix + kSparseTile;
        tau = div + kSparseTile;
    }
};

// tau_i = x_i - base for elements [t0, t0 + m).
template <class IO>
void load_taus(const SparseArgs& a, int64_t t0, int64_t m, SparseScratch& s) {
    IO::load(a.base, a.base_dtype, t0, m, s.base);
    for (int i = 0; i < a.k; ++i) {
        float* t = s.tau + size_t(i) * kSparseTile;
        IO::load(a.inputs[i], a.in_dtypes[i], t0, m, t);
        for (int64_t j = 0; j < m; ++j) t[j] = t[j] - s.base[j];
    }
}

// The selection: entries not kept become +0 (the rescale comes after, in apply_scale).
template <class IO>
void select_taus(const SparseArgs& a, int64_t t0, int64_t m, SparseScratch& s, int64_t* quota) {
    const int k = a.k;
    if (a.select == kSelectShared) {
        variance_bits(s.tau, k, m, s.wmean.data(), s.wm2.data(), s.bits.data());
        top_mask(s.bits.data(), m, a.keep_bits[0], quota[0], s.m1.data());
        for (int i = 0; i < k; ++i) {
            float* t = s.tau + size_t(i) * kSparseTile;
            for (int64_t j = 0; j < m; ++j) t[j] = s.m1[j] ? t[j] : 0.0f;
        }
        return;
    }
    for (int i = 0; i < k; ++i) {
        float* t = s.tau + size_t(i) * kSparseTile;
        if (a.select == kSelectBand) {
            for (int64_t j = 0; j < m; ++j) s.bits[j] = abs_bits(t[j]);
            top_mask(s.bits.data(), m, a.keep_bits[i], quota[i], s.m1.data());
            top_mask(s.bits.data(), m, a.skip_bits[i], quota[k + i], s.m2.data());
            for (int64_t j = 0; j < m; ++j) t[j] = (s.m1[j] && !s.m2[j]) ? t[j] : 0.0f;
        } else if (a.select == kSelectRank && a.drops[i]) {
            const int64_t len = a.row * a.stride;
            uint32_t* words = s.words.data();
            philox_words(a.keys[i], uint64_t(a.start + t0), m, words, words + kSparseTile + 8);
            for (int64_t j = 0; j < m;) {  // slab by slab
                const int64_t slab = (t0 + j) / len;
                if (slab != s.rank.slab) rank_slab<IO>(a, slab, s.rank);
                const int64_t stop = std::min(m, (slab + 1) * len - t0);
                const uint32_t* below = s.rank.below.data() + size_t(i) * size_t(len);
                const int64_t off = t0 - slab * len;  // entry t0 + j is below[off + j]
                for (; j < stop; ++j) t[j] = words[j] < below[off + j] ? t[j] : 0.0f;
            }
        }
    }
}

inline void apply_scale(const SparseArgs& a, int64_t m, SparseScratch& s) {
    if (!a.scale) return;
    for (int i = 0; i < a.k; ++i) {
        const float c = a.scale[i];
        if (c == 1.0f) continue;
        float* t = s.tau + size_t(i) * kSparseTile;
        for (int64_t j = 0; j < m; ++j) t[j] = t[j] * c;
    }
}

template <class IO>
int64_t sparse_task_vector_kernel(const SparseArgs& a, int64_t begin, int64_t end) {
    SparseScratch s(a.k);
    std::vector<int64_t> quota(a.quota, a.quota + sparse_quota_count(a));
    const int k = a.k;
    float* mix = s.mix;
    int64_t nonfinite = 0;
    for (int64_t t0 = begin; t0 < end; t0 += kOpTile) {
        const int64_t m = std::min(kOpTile, end - t0);
        load_taus<IO>(a, t0, m, s);
        select_taus<IO>(a, t0, m, s, quota.data());
        apply_scale(a, m, s);
        std::fill(mix, mix + m, -0.0f);
        if (a.mix == kMixRam) {
            float* count = s.div;
            std::fill(count, count + m, 0.0f);
            for (int i = 0; i < k; ++i) {
                const float* t = s.tau + size_t(i) * kSparseTile;
                for (int64_t j = 0; j < m; ++j) count[j] += std::fabs(t[j]) > a.epsilon ? 1.0f : 0.0f;
            }
            for (int i = 0; i < k; ++i) {
                const float w = a.weights[i];
                const float* t = s.tau + size_t(i) * kSparseTile;
                for (int64_t j = 0; j < m; ++j) {
                    if (!(std::fabs(t[j]) > a.epsilon)) continue;
                    const float term = count[j] == 1.0f ? t[j] * w : t[j] / count[j];
                    mix[j] = mix[j] + term;
                }
            }
            for (int64_t j = 0; j < m; ++j) mix[j] = s.base[j] + mix[j];
        } else if (a.mix == kMixTies || a.mix == kMixSce) {
            float* sum = s.aux;
            float* div = s.div;
            std::fill(sum, sum + m, -0.0f);
            for (int i = 0; i < k; ++i) {
                const float w = a.weights[i];
                const float* t = s.tau + size_t(i) * kSparseTile;
                if (a.mix == kMixTies)
                    for (int64_t j = 0; j < m; ++j) sum[j] = std::fma(w, t[j], sum[j]);
                else
                    for (int64_t j = 0; j < m; ++j) sum[j] = sum[j] + t[j];  // SCE elects by the unweighted sum
            }
            std::fill(div, div + m, 0.0f);
            for (int i = 0; i < k; ++i) {
                const float w = a.weights[i];
                const float* t = s.tau + size_t(i) * kSparseTile;
                for (int64_t j = 0; j < m; ++j) {
                    const float tj = t[j];
                    const bool positive = sum[j] >= 0.0f;
                    const bool agree = (positive & (tj > 0.0f)) | (!positive & (tj < 0.0f));
                    const float fused = std::fma(w, tj, mix[j]);
                    const float added = div[j] + w;
                    mix[j] = agree ? fused : mix[j];
                    div[j] = agree ? added : div[j];
                }
            }
            if (a.mix == kMixSce) {
                for (int64_t j = 0; j < m; ++j) mix[j] = s.base[j] + mix[j] / std::max(div[j], 1e-6f);
            } else {
                if (a.normalize)
                    for (int64_t j = 0; j < m; ++j) mix[j] = mix[j] / (div[j] == 0.0f ? 1.0f : div[j]);
                for (int64_t j = 0; j < m; ++j) mix[j] = std::fma(a.lambda, mix[j], s.base[j]);
            }
        } else {
            for (int i = 0; i < k; ++i) {
                const float w = a.weights[i];
                const float* t = s.tau + size_t(i) * kSparseTile;
                for (int64_t j = 0; j < m; ++j) mix[j] = std::fma(w, t[j], mix[j]);
            }
            if (a.normalize)
                for (int64_t j = 0; j < m; ++j) mix[j] = mix[j] / a.divisor;
            for (int64_t j = 0; j < m; ++j) mix[j] = std::fma(a.lambda, mix[j], s.base[j]);
        }
        nonfinite += IO::store(mix, m, a.out, a.out_dtype, t0);
    }
    return nonfinite;
}

// Per block of kStatBlock elements: lane l sums elements j = l (mod kStatLanes) in order from +0, lanes combined as
// ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7)) (as moments_kernel; every value here is >= 0).
template <class IO>
void sparse_stats_kernel(const SparseArgs& a, int64_t block_begin, int64_t end, double* block_out) {
    SparseScratch s(a.k);
    std::vector<int64_t> quota(a.quota, a.quota + sparse_quota_count(a));
    const int k = a.k;
    const int nstat = kSparseStats * k;
    std::vector<double> lanes(size_t(nstat) * kStatLanes);
    std::vector<float> count(kSparseTile);
    for (int64_t b0 = block_begin; b0 < end; b0 += kStatBlock) {
        const int64_t m = std::min(kStatBlock, end - b0);
        load_taus<IO>(a, b0, m, s);
        std::fill(count.begin(), count.end(), 0.0f);
        for (int i = 0; i < k; ++i) {
            const float* t = s.tau + size_t(i) * kSparseTile;
            for (int64_t j = 0; j < m; ++j) count[j] += std::fabs(t[j]) > a.epsilon ? 1.0f : 0.0f;
        }
        // Straight into the lanes (element j into lane j mod 8, in order): every value is >= 0, so the zeros a
        // padded block would add change nothing.
        std::fill(lanes.begin(), lanes.end(), 0.0);
        for (int i = 0; i < k; ++i) {
            const float* t = s.tau + size_t(i) * kSparseTile;
            double* L = lanes.data() + size_t(kSparseStats * i) * kStatLanes;
            for (int64_t j = 0; j < m; ++j) {
                const int l = int(j & (kStatLanes - 1));
                const bool nz = std::fabs(t[j]) > a.epsilon;
                L[l] += std::fabs(double(t[j]));
                L[3 * kStatLanes + l] += (nz && count[j] > 1.0f) ? 1.0 : 0.0;
                L[4 * kStatLanes + l] += (nz && count[j] == 1.0f) ? 1.0 : 0.0;
            }
        }
        select_taus<IO>(a, b0, m, s, quota.data());
        for (int i = 0; i < k; ++i) {
            const float* t = s.tau + size_t(i) * kSparseTile;
            double* L = lanes.data() + size_t(kSparseStats * i) * kStatLanes;
            for (int64_t j = 0; j < m; ++j) {
                const int l = int(j & (kStatLanes - 1));
                const double x = t[j];
                L[kStatLanes + l] += std::fabs(x);
                L[2 * kStatLanes + l] += x * x;  // exact: a float's square fits in a double
            }
        }
        double* out = block_out + size_t((b0 - block_begin) / kStatBlock) * nstat;
        for (int q = 0; q < nstat; ++q) {
            const double* l = lanes.data() + size_t(q) * kStatLanes;
            out[q] = ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
        }
    }
}

// Per quota: how many entries in [begin, end) equal its threshold.
template <class IO>
void sparse_ties_kernel(const SparseArgs& a, int64_t begin, int64_t end, int64_t* counts) {
    SparseScratch s(a.k);
    const int nq = sparse_quota_count(a);
    for (int q = 0; q < nq; ++q) counts[q] = 0;
    for (int64_t t0 = begin; t0 < end; t0 += kOpTile) {
        const int64_t m = std::min(kOpTile, end - t0);
        load_taus<IO>(a, t0, m, s);
        if (a.select == kSelectShared) {
            variance_bits(s.tau, a.k, m, s.wmean.data(), s.wm2.data(), s.bits.data());
            int64_t c = 0;
            for (int64_t j = 0; j < m; ++j) c += s.bits[j] == a.keep_bits[0];
            counts[0] += c;
            continue;
        }
        for (int i = 0; i < a.k; ++i) {
            const float* t = s.tau + size_t(i) * kSparseTile;
            int64_t ck = 0, cs = 0;
            for (int64_t j = 0; j < m; ++j) {
                const uint32_t b = abs_bits(t[j]);
                ck += b == a.keep_bits[i];
                cs += b == a.skip_bits[i];
            }
            counts[i] += ck;
            counts[a.k + i] += cs;
        }
    }
}

// Radix-select histogram of the variance bits: pass 0 counts the high 16 bits (and the zeros), pass 1 the low 16
// bits of the entries whose high bits equal `prefix`. hist holds 65536 counters.
template <class IO>
int64_t variance_histogram_kernel(const SparseArgs& a, int64_t begin, int64_t end, int pass, uint32_t prefix,
                                  uint64_t* hist) {
    SparseScratch s(a.k);
    int64_t zeros = 0;
    for (int64_t t0 = begin; t0 < end; t0 += kOpTile) {
        const int64_t m = std::min(kOpTile, end - t0);
        load_taus<IO>(a, t0, m, s);
        variance_bits(s.tau, a.k, m, s.wmean.data(), s.wm2.data(), s.bits.data());
        for (int64_t j = 0; j < m; ++j) {
            const uint32_t b = s.bits[j];
            if (pass == 0) {
                ++hist[b >> 16];
                zeros += b == 0;
            } else if ((b >> 16) == prefix) {
                ++hist[b & 0xFFFFu];
            }
        }
    }
    return zeros;
}

}  // namespace
}  // namespace pysoup
