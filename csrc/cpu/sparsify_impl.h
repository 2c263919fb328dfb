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
#include <cstring>
#include <memory>
#include <vector>

#include "cpu/blocking.h"
#include "cpu/dtype.h"
#include "cpu/moments.h"
#include "cpu/philox.h"
#include "cpu/sparsify.h"

namespace pysoup {
namespace {

constexpr int64_t kSparseTile = kStatBlock;  // the statistics sum per block of kStatBlock: one tile per block
constexpr int64_t kWordPitch = kSparseTile + 8;  // philox_words writes up to m + 6 words

// DELLA's keep thresholds of every row of one group of rows ("slab": row * stride elements from slab * row * stride,
// the rows interleaved when stride > 1), per model; a range ranks each slab it touches once, every model at once.
struct RankCache {
    int64_t slab = -1;
    std::vector<uint32_t> below;      // k x slab elements: Philox words below this keep the entry
    std::vector<uint64_t> key, key2;  // one row's nonzero |tau|: bits << 32 | position, sorted by a radix sort
    std::vector<uint32_t> zero_at;    // one row's positions of the zero |tau|, in index order
    std::vector<uint32_t> counts = std::vector<uint32_t>(4 * 2048);  // the radix sort's counters
    std::vector<uint32_t> by_rank;    // k x row: each model's keep threshold per rank (the same for every row)
    std::vector<float> made_for;      // the row length, then each model's (drops, lo, eps) by_rank was made for
    std::vector<float> tile;          // a contiguous row's loads
    std::vector<uint32_t> bits, bin;  // a contiguous row's |tau| bits and their counting bins
    std::vector<uint32_t> late;  // one row's positions of the |tau| with a nonzero low half
    std::vector<uint32_t> count, next;  // per bin, for each half of the row: its count (zero between rows); the next
                                        // rank to give
};

// round(p * 2^32), at most 2^32 - 1 (p in [0, 1]).
inline uint32_t keep_below_of(float p) {
    const double v = std::floor(double(p) * 4294967296.0 + 0.5);
    return v >= 4294967295.0 ? 0xFFFFFFFFu : uint32_t(v);
}

// Sorts c.key[0, n) ascending by its high 32 bits (|tau| bits, none zero; the low 32 bits are the position) by a
// stable LSD radix sort: ties stay in index order, as the reference's stable sort keeps them. Only the bits that
// differ between the keys are sorted on: every key is first mapped to (key - min) >> s, s the low bits all keys
// share (an order-preserving map: the low mantissa bits of a bf16 difference are mostly equal), and the remaining D
// bits take ceil(D / w) passes of equal digits of at most w bits (8, or 11 for long rows, where the counters' prefix
// sums cost less than a pass). No comparisons; one 8-byte move per element and pass.
inline void radix_sort_row(RankCache& c, int64_t n) {
    if (n < 2) return;
    uint64_t* src = c.key.data();
    uint32_t lo = 0xFFFFFFFFu, hi = 0, differ = 0;
    const uint32_t first = uint32_t(src[0] >> 32);
    for (int64_t j = 0; j < n; ++j) {
        const uint32_t k = uint32_t(src[j] >> 32);
        lo = std::min(lo, k);
        hi = std::max(hi, k);
        differ |= k ^ first;
    }
    if (differ == 0) return;  // one value: index order is the order
    const int shift = __builtin_ctz(differ);
    const uint32_t range = (hi - lo) >> shift;
    const int bits = 32 - __builtin_clz(range);
    const int wmax = n >= 2048 ? 11 : 8;
    const int passes = (bits + wmax - 1) / wmax, w = (bits + passes - 1) / passes;
    const uint32_t mask = (1u << w) - 1, nbins = mask + 1;
    uint32_t* counts = c.counts.data();  // passes x nbins
    std::fill(counts, counts + size_t(passes) * nbins, 0u);
    for (int64_t j = 0; j < n; ++j) {
        const uint32_t r = (uint32_t(src[j] >> 32) - lo) >> shift;
        src[j] = (uint64_t(r) << 32) | (src[j] & 0xFFFFFFFFu);
        for (int p = 0; p < passes; ++p) ++counts[size_t(p) * nbins + ((r >> (p * w)) & mask)];
    }
    uint64_t* dst = c.key2.data();
    for (int p = 0; p < passes; ++p) {
        uint32_t* cnt = counts + size_t(p) * nbins;
        const int sh = 32 + p * w;
        uint32_t sum = 0;
        for (uint32_t b = 0; b < nbins; ++b) {
            const uint32_t v = cnt[b];
            cnt[b] = sum;
            sum += v;
        }
        for (int64_t j = 0; j < n; ++j) {
            const uint64_t v = src[j];
            dst[cnt[(v >> sh) & mask]++] = v;
        }
        std::swap(src, dst);
    }
    if (src != c.key.data()) std::copy(src, src + n, c.key.data());
}

// A contiguous row's |tau| bits at a glance: the least nonzero and the greatest high half, and how many entries have
// a nonzero low half. Counted in 32 bits so the loop vectorises (a row holds at most 4 Mi entries).
struct RowSpan {
    uint32_t lo = 0xFFFF, hi = 0, mixed = 0;
    void add(const uint32_t* bits, int64_t n) {
        uint32_t l = lo, h = hi, x = mixed;
        for (int64_t j = 0; j < n; ++j) {
            const uint32_t v = bits[j], top = v >> 16;
            l = std::min(l, v != 0 ? top : 0xFFFFu);
            h = std::max(h, top);
            x += (v & 0xFFFFu) != 0;
        }
        lo = l, hi = h, mixed = x;
    }
};

// bin[j] = the counting bin of bits[j] (its high half - lo + 1, zeros 0), or nb for an entry with a nonzero low half
// ("late"), whose position is listed in late[] and counted in its bin's count1 (after every zero-low entry). AVX2:
// eight bins per step, the late entries found from the step's mask (most steps have none).
inline int64_t row_bins(const uint32_t* bits, int64_t n, uint32_t lo, uint32_t nb, uint32_t* bin, uint32_t* late,
                        uint32_t* count1) {
    int64_t nlate = 0, j = 0;
#ifdef __AVX2__
    const __m256i first = _mm256_set1_epi32(int(lo - 1)), late_bin = _mm256_set1_epi32(int(nb));
    const __m256i low = _mm256_set1_epi32(0xFFFF), zero = _mm256_setzero_si256();
    for (; j + 8 <= n; j += 8) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bits + j));
        const __m256i b =
            _mm256_andnot_si256(_mm256_cmpeq_epi32(v, zero), _mm256_sub_epi32(_mm256_srli_epi32(v, 16), first));
        const __m256i zero_low = _mm256_cmpeq_epi32(_mm256_and_si256(v, low), zero);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(bin + j), _mm256_blendv_epi8(late_bin, b, zero_low));
        for (uint32_t mask = ~uint32_t(_mm256_movemask_ps(_mm256_castsi256_ps(zero_low))) & 0xFFu; mask;
             mask &= mask - 1) {
            const int64_t q = j + __builtin_ctz(mask);
            late[nlate++] = uint32_t(q);
            ++count1[(bits[q] >> 16) - lo + 1];
        }
    }
#endif
    for (; j < n; ++j) {
        const uint32_t v = bits[j];
        if ((v & 0xFFFFu) != 0) {
            bin[j] = nb;
            late[nlate++] = uint32_t(j);
            ++count1[(v >> 16) - lo + 1];
        } else {
            bin[j] = ((v >> 16) - lo + 1) & (0u - uint32_t(v != 0));
        }
    }
    return nlate;
}

// The first rank of each bin in each half of the row, for bins [0, nb) padded to a multiple of 8: next0[b] =
// sum over bins below b of count0 + count1, next1[b] = next0[b] + count0[b]. The counts are zeroed as they are read
// (they stay zeroed between rows). AVX2: an in-register scan of eight bins at a time; the scalar loop is the same sum.
inline void bin_starts(uint32_t* count0, uint32_t* count1, uint32_t nb, uint32_t* next0, uint32_t* next1) {
#ifdef __AVX2__
    const __m256i zero = _mm256_setzero_si256(), top = _mm256_set1_epi32(7);
    __m256i carry = zero;
    for (uint32_t b = 0; b < nb; b += 8) {
        const __m256i c0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(count0 + b));
        const __m256i total = _mm256_add_epi32(c0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(count1 + b)));
        __m256i x = _mm256_add_epi32(total, _mm256_slli_si256(total, 4));  // prefix within each 128-bit half
        x = _mm256_add_epi32(x, _mm256_slli_si256(x, 8));
        x = _mm256_add_epi32(x, _mm256_permute2x128_si256(zero, _mm256_shuffle_epi32(x, 0xFF), 0x20));  // across
        const __m256i through = _mm256_add_epi32(x, carry), before = _mm256_sub_epi32(through, total);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(next0 + b), before);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(next1 + b), _mm256_add_epi32(before, c0));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(count0 + b), zero);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(count1 + b), zero);
        carry = _mm256_permutevar8x32_epi32(through, top);
    }
#else
    uint32_t sum = 0;
    for (uint32_t b = 0; b < ((nb + 7) & ~7u); ++b) {
        next0[b] = sum;
        next1[b] = sum + count0[b];
        sum += count0[b] + count1[b];
        count0[b] = count1[b] = 0;
    }
#endif
}

// One contiguous row's keep thresholds kb[j] = by_rank[rank of |tau_j|] by a counting rank, without a sort, where
// the row's nonzero |tau| bits take at most max(kCountBinsMin, 2n) distinct high halves and few have a nonzero low
// half (a difference of two bf16 values has a zero low half unless their exponents differ: 99.6% of entries in bf16
// fine-tunes). Each entry's bin is its high half (zeros: bin 0, ranked lowest). The entries of a bin with a zero low
// half are equal and the bin's smallest, so they take its first ranks in index order as they come; those with a
// nonzero low half ("late", a few per row) take the bin's next ranks, sorted by (bits, position). The same ranks as
// the radix sort, so the same draws. Returns false, having written nothing, where the row is not of that kind (fp32
// fine-tunes, a span of magnitudes too wide).
//
// The row's two halves are counted and placed in one loop with counters of their own (the second half's ranks of a
// bin follow the first's): two chains of increments interleaved, not one long one where a bin is full (a row of a
// bf16 fine-tune holds ~99 distinct |tau|, and a fifth of its entries are zeros). In a standalone loop over 1,200
// rows of the benchmark's models, this and the late entries kept out of the counting loops took 4.06-4.19 ns an
// entry against 5.71 ns (two runs alternating the two, best of 30 each); the bins and late entries found in one
// vector loop, the bins' first ranks by a vector scan that also zeroes the counters (no fill per row), and the span
// taken where the bits are made (RowSpan), 2.8-3.0 ns against 3.2.
constexpr uint32_t kCountBinsMin = 4096;  // the most bins a row of n entries may take: max(this, 2n)
inline bool counting_rank_row(RankCache& c, int64_t n, RowSpan span, const uint32_t* by_rank, uint32_t* kb) {
    const uint32_t* bits = c.bits.data();
    // More than 1/16 of the entries with a low half: sorting them would cost more than the radix sort.
    if (int64_t(span.mixed) * 16 > n) return false;
    const uint32_t lo = std::min(span.lo, span.hi);  // every |tau| 0: one bin
    const uint32_t nb = span.hi - lo + 2;  // bins 0 (zeros) .. nb - 1; bin nb takes the late entries and counts nothing
    const uint64_t most = std::max<uint64_t>(kCountBinsMin, 2 * uint64_t(n));
    if (nb > most) return false;
    if (c.count.size() < 2 * (most + 8)) {  // zeroed once; bin_starts zeroes what each row counted
        c.count.assign(2 * (most + 8), 0u);
        c.next.resize(2 * (most + 8));
    }
    const size_t pitch = c.count.size() / 2;
    c.bin.resize(size_t(n));
    c.late.resize(size_t(span.mixed));
    uint32_t* bin = c.bin.data();
    uint32_t* count0 = c.count.data();
    uint32_t* count1 = count0 + pitch;
    const int64_t nlate = row_bins(bits, n, lo, nb, bin, c.late.data(), count1);
    const int64_t half = n / 2;
    for (int64_t j = 0; j < half; ++j) {
        ++count0[bin[j]];
        ++count1[bin[j + half]];
    }
    for (int64_t j = 2 * half; j < n; ++j) ++count1[bin[j]];
    uint32_t* next0 = c.next.data();
    uint32_t* next1 = next0 + pitch;
    bin_starts(count0, count1, nb, next0, next1);
    count0[nb] = count1[nb] = 0;  // the late entries' bin: counted above, past the bins bin_starts reads
    next0[nb] = next1[nb] = 0;  // their placeholders: overwritten below
    for (int64_t j = 0; j < half; ++j) {
        kb[j] = by_rank[next0[bin[j]]++];
        kb[j + half] = by_rank[next1[bin[j + half]]++];
    }
    for (int64_t j = 2 * half; j < n; ++j) kb[j] = by_rank[next1[bin[j]]++];
    if (nlate == 0) return true;
    const uint32_t* late = c.late.data();
    uint64_t* key = c.key.data();
    for (int64_t r = 0; r < nlate; ++r) key[r] = (uint64_t(bits[late[r]]) << 32) | late[r];
    std::sort(key, key + nlate);  // by |tau| bits, then position
    for (int64_t r = 0; r < nlate; ++r) {
        const uint32_t j = uint32_t(key[r]);
        kb[j] = by_rank[next1[(bits[j] >> 16) - lo + 1]++];
    }
    return true;
}

// Each rank's keep threshold per model, once per range: p = fp32(fp32(rank / (row - 1)) * 2) * eps + lo, two fp32
// roundings, as mergekit (and the reference).
inline void rank_thresholds(const SparseArgs& a, RankCache& c) {
    // Kept from block to block while the tensor's parameters stay (a block is 64 Ki entries; computing them for each
    // was 1.2-1.6% of DELLA's samples).
    std::vector<float> key{float(a.row)};  // exact: a row holds at most 4 Mi entries
    for (int i = 0; i < a.k; ++i) key.insert(key.end(), {float(a.drops[i]), a.lo[i], a.eps[i]});
    if (key == c.made_for) return;
    c.made_for = std::move(key);
    c.by_rank.resize(size_t(a.k) * size_t(a.row));
    const float denom = float(a.row > 1 ? a.row - 1 : 1);
    for (int i = 0; i < a.k; ++i) {
        if (!a.drops[i]) continue;
        uint32_t* br = c.by_rank.data() + size_t(i) * size_t(a.row);
        for (int64_t r = 0; r < a.row; ++r) {
            const float rn = float(r) / denom;
            br[r] = keep_below_of((rn * 2.0f) * a.eps[i] + a.lo[i]);
        }
    }
}

// tile: the caller's k tiles of tau (kSparseTile apart) for elements [tile0, tile0 + tile_len): a row they hold
// whole is read from there, not loaded again.
template <class IO>
void rank_slab(const SparseArgs& a, int64_t slab, RankCache& c, const float* tile, int64_t tile0, int64_t tile_len) {
    const int64_t len = a.row * a.stride, s0 = slab * len;
    if (c.slab == -1) rank_thresholds(a, c);  // once per call
    c.below.resize(size_t(a.k) * size_t(len));
    c.key.resize(size_t(a.row));
    c.key2.resize(size_t(a.row));
    c.zero_at.resize(size_t(a.row));
    if (a.stride == 1) {
        c.tile.resize(size_t(2 * kOpTile));
        c.bits.resize(size_t(a.row));
    }
    for (int i = 0; i < a.k; ++i) {
        if (!a.drops[i]) continue;
        uint32_t* kb = c.below.data() + size_t(i) * size_t(len);
        const uint32_t* by_rank = c.by_rank.data() + size_t(i) * size_t(a.row);
        for (int64_t col = 0; col < a.stride; ++col) {
            // The zeros rank lowest, in index order (as the stable sort puts them): their positions are listed
            // without a branch (every entry is written to both lists; only one count moves), and only the nonzero
            // |tau| are sorted.
            int64_t zeros = 0, nz = 0;
            auto add = [&](int64_t j, uint32_t bits) {
                c.zero_at[size_t(zeros)] = uint32_t(j);
                c.key[size_t(nz)] = (uint64_t(bits) << 32) | uint64_t(j);
                zeros += bits == 0;
                nz += bits != 0;
            };
            if (a.stride == 1) {  // one contiguous row: from the caller's tile of tau where it holds the row
                uint32_t* bits = c.bits.data();
                RowSpan span;
                if (s0 >= tile0 && s0 + a.row <= tile0 + tile_len) {
                    const float* t = tile + size_t(i) * kSparseTile + (s0 - tile0);
                    for (int64_t j = 0; j < a.row; ++j) bits[j] = abs_bits(t[j]);
                    span.add(bits, a.row);
                } else {
                    float* x = c.tile.data();
                    float* b = x + kOpTile;
                    for (int64_t j0 = 0; j0 < a.row; j0 += kOpTile) {
                        const int64_t m = std::min(kOpTile, a.row - j0);
                        IO::load(a.base, a.base_dtype, s0 + j0, m, b);
                        IO::load_minus(a.inputs[i], a.in_dtypes[i], s0 + j0, m, b, x);
                        for (int64_t j = 0; j < m; ++j) bits[j0 + j] = abs_bits(x[j]);
                        span.add(bits + j0, m);
                    }
                }
                if (counting_rank_row(c, a.row, span, by_rank, kb)) continue;
                for (int64_t j = 0; j < a.row; ++j) add(j, bits[j]);
            } else {
                for (int64_t j = 0; j < a.row; ++j) {
                    const int64_t e = s0 + j * a.stride + col;
                    add(j, abs_bits(load_f32(a.inputs[i], a.in_dtypes[i], e) - load_f32(a.base, a.base_dtype, e)));
                }
            }
            for (int64_t r = 0; r < zeros; ++r) kb[int64_t(c.zero_at[size_t(r)]) * a.stride + col] = by_rank[r];
            radix_sort_row(c, nz);  // ascending |tau|, ties in index order
            const uint32_t* br = by_rank + zeros;
            for (int64_t r = 0; r < nz; ++r) kb[int64_t(c.key[size_t(r)] & 0xFFFFFFFFu) * a.stride + col] = br[r];
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

// x / n, as x * (1 / n) where n is a power of two: the same bits (dividing by 2^p is exact or rounds alike), and a
// multiply is several times cheaper than a division.
template <bool kPowerOfTwo>
inline double divided(double x, double n, double inv) {
    return kPowerOfTwo ? x * inv : x / n;
}

// Welford's update of the running mean and m2 with model t, the (n)th.
template <bool kPowerOfTwo>
inline void welford_step(const float* t, int64_t m, double n, double* mean, double* m2) {
    const double inv = 1.0 / n;
    for (int64_t j = 0; j < m; ++j) {
        const double d = t[j];
        const double delta = d - mean[j];
        mean[j] = mean[j] + divided<kPowerOfTwo>(delta, n, inv);
        m2[j] = m2[j] + delta * (d - mean[j]);
    }
}

template <bool kPowerOfTwo>
inline void variance_of(const double* m2, int64_t m, double k, uint32_t* bits) {
    const double inv = 1.0 / k;
    for (int64_t j = 0; j < m; ++j) bits[j] = abs_bits(float(divided<kPowerOfTwo>(m2[j], k, inv)));
}

inline bool is_power_of_two(int n) { return (n & (n - 1)) == 0; }

// The fp32 bits of each entry's variance across the models: Welford's update in fp64 in model order, rounded to fp32
// (torch.var(dim=0, unbiased=False) on the CPU). mean and m2: scratch of m doubles each.
inline void variance_bits(const float* tau, int k, int64_t m, double* mean, double* m2, uint32_t* bits) {
    // Model 0 from the running values' zeros, written as constants (the same operations and bits as updating
    // mean = m2 = 0: 0 + delta turns -0 into +0, inf gives m2 = NaN), so nothing is cleared or read back.
    for (int64_t j = 0; j < m; ++j) {
        const double d = tau[j];
        const double delta = d - 0.0;
        const double mu = 0.0 + delta;
        mean[j] = mu;
        m2[j] = 0.0 + delta * (d - mu);
    }
    for (int i = 1; i < k; ++i) {
        const float* t = tau + size_t(i) * kSparseTile;
        if (is_power_of_two(i + 1))
            welford_step<true>(t, m, double(i + 1), mean, m2);
        else
            welford_step<false>(t, m, double(i + 1), mean, m2);
    }
    if (is_power_of_two(k))
        variance_of<true>(m2, m, double(k), bits);
    else
        variance_of<false>(m2, m, double(k), bits);
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
    std::vector<uint32_t> words;  // RANK: k tiles of Philox words, then the generator's scratch (kWordPitch each)
    std::vector<uint8_t> keep;  // RANK: k tiles of draws
    std::vector<double> wmean, wm2;  // Welford's running mean and sum of squares
    RankCache rank;
    explicit SparseScratch(int k)
        : buf(size_t(kSparseTile) * (k + 4)),
          bits(kSparseTile),
          m1(kSparseTile),
          m2(kSparseTile),
          words(size_t(kWordPitch) * (k + 1)),
          keep(size_t(kSparseTile) * k),
          wmean(kSparseTile),
          wm2(kSparseTile) {
        base = buf.data();
        aux = base + kSparseTile;
        mix = aux + kSparseTile;
        div = mix + kSparseTile;
        tau = div + kSparseTile;
    }
};

// The calling thread's scratch for k models, kept from call to call: each call is one block of a range, and
// allocating and zeroing ~280 KiB per block of 64 Ki entries showed as 3% of a sparse merge's CPU time (memset).
// Every buffer is written before it is read within a call; the rank cache forgets the last call's slab (its
// thresholds stay while the parameters they were made for do: rank_thresholds).
inline SparseScratch& scratch_for(int k) {
    thread_local std::unique_ptr<SparseScratch> s;
    thread_local int models = -1;
    if (!s || models != k) {
        s = std::make_unique<SparseScratch>(k);
        models = k;
    }
    s->rank.slab = -1;
    return *s;
}

// tau_i = x_i - base for elements [t0, t0 + m).
template <class IO>
void load_taus(const SparseArgs& a, int64_t t0, int64_t m, SparseScratch& s) {
    IO::load(a.base, a.base_dtype, t0, m, s.base);
    for (int i = 0; i < a.k; ++i) {
        IO::load_minus(a.inputs[i], a.in_dtypes[i], t0, m, s.base, s.tau + size_t(i) * kSparseTile);
    }
}

// Stores keep[0, m) (0 or 1) as bits g0 .. g0 + m - 1. Whole bytes are this range's alone; a byte shared with a
// neighbouring range (a chunk may start mid-byte) is or-ed in atomically (the bits start zeroed, and each entry is
// stored once).
inline void store_bits(const uint8_t* keep, int64_t g0, int64_t m, uint8_t* bits) {
    const int64_t g1 = g0 + m;
    auto partial = [&](int64_t byte) {
        const int64_t lo = std::max(g0, byte * 8), hi = std::min(g1, byte * 8 + 8);
        uint8_t v = 0;
        for (int64_t g = lo; g < hi; ++g) v |= uint8_t(keep[g - g0] << (g & 7));
        if (hi - lo == 8)
            bits[byte] = v;
        else
            __atomic_fetch_or(bits + byte, v, __ATOMIC_RELAXED);
    };
    const int64_t b0 = g0 >> 3, b1 = (g1 - 1) >> 3;
    partial(b0);
    // Whole bytes: the eight 0/1 bytes of entries 8b .. 8b + 7 gathered into one by a multiply (byte l's bit lands
    // on bit 56 + l; no two partial products meet).
    for (int64_t byte = b0 + 1; byte < b1; ++byte) {
        uint64_t v;
        std::memcpy(&v, keep + (byte * 8 - g0), 8);
        bits[byte] = uint8_t((v * 0x0102040810204080ull) >> 56);
    }
    if (b1 > b0) partial(b1);
}

// t[j] = +0 where bit g0 + j is clear (the combine reading a selection kept as bits). AVX2: each whole byte
// broadcast to eight lanes, each lane tests its bit and masks its entry; the loop it replaces spread the bits to 0/1
// words first (4.8% of DELLA's samples).
inline void zero_unkept(const uint8_t* bits, int64_t g0, int64_t m, float* t) {
    auto one = [&](int64_t j) {
        const uint32_t bit = (bits[(g0 + j) >> 3] >> ((g0 + j) & 7)) & 1u;
        t[j] = bits_f32(f32_bits(t[j]) & (0u - bit));
    };
    int64_t j = 0;
    for (; j < m && ((g0 + j) & 7); ++j) one(j);
    const uint8_t* byte = bits + ((g0 + j) >> 3);
#ifdef __AVX2__
    const __m256i lane_bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    for (; j + 8 <= m; j += 8, ++byte) {
        const __m256i on = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(*byte), lane_bit), lane_bit);
        const __m256 x = _mm256_and_ps(_mm256_loadu_ps(t + j), _mm256_castsi256_ps(on));
        _mm256_storeu_ps(t + j, x);
    }
#else
    for (; j + 8 <= m; j += 8, ++byte)
        for (int l = 0; l < 8; ++l) t[j + l] = bits_f32(f32_bits(t[j + l]) & (0u - ((uint32_t(*byte) >> l) & 1u)));
#endif
    for (; j < m; ++j) one(j);
}

// DELLA's draws over [t0, t0 + m): kept where model i's Philox word is below its threshold at the entry's rank. The
// slabs are the outer loop (each ranked once, for every model); the draws may be stored as bits for the combine, or
// read back from them.
template <class IO>
void select_rank(const SparseArgs& a, int64_t t0, int64_t m, SparseScratch& s) {
    const int64_t g0 = a.start + t0;  // the first entry's index in the tensor (the bits' and the draws' index)
    if (a.keep_mask_mode == kMaskLoad) {
        for (int i = 0; i < a.k; ++i)
            if (a.drops[i])
                zero_unkept(a.keep_mask + size_t(i) * size_t(a.keep_mask_stride), g0, m,
                            s.tau + size_t(i) * kSparseTile);
        return;
    }
    const int64_t len = a.row * a.stride;
    uint32_t* scratch = s.words.data() + size_t(a.k) * kWordPitch;
    for (int i = 0; i < a.k; ++i)
        if (a.drops[i]) philox_words(a.keys[i], uint64_t(g0), m, s.words.data() + size_t(i) * kWordPitch, scratch);
    for (int64_t j = 0; j < m;) {  // slab by slab
        const int64_t slab = (t0 + j) / len;
        if (slab != s.rank.slab) rank_slab<IO>(a, slab, s.rank, s.tau, t0, m);
        const int64_t stop = std::min(m, (slab + 1) * len - t0);
        const int64_t off = t0 - slab * len;  // entry t0 + j is below[off + j]
        for (int i = 0; i < a.k; ++i) {
            if (!a.drops[i]) continue;
            const uint32_t* below = s.rank.below.data() + size_t(i) * size_t(len) + off;
            const uint32_t* words = s.words.data() + size_t(i) * kWordPitch;
            uint8_t* keep = s.keep.data() + size_t(i) * kSparseTile;
            for (int64_t jj = j; jj < stop; ++jj) keep[jj] = words[jj] < below[jj];
        }
        j = stop;
    }
    for (int i = 0; i < a.k; ++i) {
        if (!a.drops[i]) continue;
        float* t = s.tau + size_t(i) * kSparseTile;
        const uint8_t* keep = s.keep.data() + size_t(i) * kSparseTile;
        for (int64_t j = 0; j < m; ++j) t[j] = keep[j] ? t[j] : 0.0f;
        if (a.keep_mask_mode == kMaskStore)
            store_bits(keep, g0, m, a.keep_mask + size_t(i) * size_t(a.keep_mask_stride));
    }
}

// The selection: entries not kept become +0 (the rescale comes after, in apply_scale).
template <class IO>
void select_taus(const SparseArgs& a, int64_t t0, int64_t m, SparseScratch& s, int64_t* quota) {
    const int k = a.k;
    if (a.select == kSelectShared) {
        const int64_t g0 = a.start + t0;
        if (a.keep_mask_mode == kMaskLoad) {
            for (int i = 0; i < k; ++i) zero_unkept(a.keep_mask, g0, m, s.tau + size_t(i) * kSparseTile);
            return;
        }
        variance_bits(s.tau, k, m, s.wmean.data(), s.wm2.data(), s.bits.data());
        top_mask(s.bits.data(), m, a.keep_bits[0], quota[0], s.m1.data());
        if (a.keep_mask_mode == kMaskStore) store_bits(s.m1.data(), g0, m, a.keep_mask);
        for (int i = 0; i < k; ++i) {
            float* t = s.tau + size_t(i) * kSparseTile;
            for (int64_t j = 0; j < m; ++j) t[j] = bits_f32(f32_bits(t[j]) & (0u - uint32_t(s.m1[j])));
        }
        return;
    }
    for (int i = 0; i < k; ++i) {
        float* t = s.tau + size_t(i) * kSparseTile;
        if (a.select == kSelectBand) {
            for (int64_t j = 0; j < m; ++j) s.bits[j] = abs_bits(t[j]);
            top_mask(s.bits.data(), m, a.keep_bits[i], quota[i], s.m1.data());
            top_mask(s.bits.data(), m, a.skip_bits[i], quota[k + i], s.m2.data());
            // Bit masks, not `m1 && !m2 ? t : 0`: that compiled to a branch per entry, mispredicted half the time.
            for (int64_t j = 0; j < m; ++j) t[j] = bits_f32(f32_bits(t[j]) & (0u - uint32_t(s.m1[j] & (s.m2[j] ^ 1))));
        }
    }
    if (a.select == kSelectRank) select_rank<IO>(a, t0, m, s);
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
    SparseScratch& s = scratch_for(a.k);
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
                    // Every entry's sum is computed and blended in where tau is large (blend_f32): a division by a
                    // count of 0 is discarded.
                    const float term = count[j] == 1.0f ? t[j] * w : t[j] / count[j];
                    mix[j] = blend_f32(std::fabs(t[j]) > a.epsilon, mix[j] + term, mix[j]);
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
                    const float was = mix[j], count = div[j];
                    mix[j] = blend_f32(agree, std::fma(w, tj, was), was);  // not a select: see blend_f32
                    div[j] = blend_f32(agree, count + w, count);
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
// ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7)) (as moments_kernel; every value here is >= 0). Only the sums the
// mix reads are computed (the others stay 0, as in the reference): SCE's weights read the sums of squares, RAM's
// factors the counts, the L1 rescale of the others both sums of magnitudes. Computing all five took SCE's statistics
// pass 1.6-1.7 CPU s against ~1.2 s (base + 3 x 512 MiB bf16, in-process).
template <class IO>
void sparse_stats_kernel(const SparseArgs& a, int64_t block_begin, int64_t end, double* block_out) {
    SparseScratch& s = scratch_for(a.k);
    std::vector<int64_t> quota(a.quota, a.quota + sparse_quota_count(a));
    const int k = a.k;
    const int nstat = kSparseStats * k;
    const bool ram = a.mix == kMixRam, sce = a.mix == kMixSce, magnitudes = !ram && !sce;  // the L1 rescale's sums
    std::vector<double> lanes(size_t(nstat) * kStatLanes);
    std::vector<float> count(kSparseTile);
    for (int64_t b0 = block_begin; b0 < end; b0 += kStatBlock) {
        const int64_t m = std::min(kStatBlock, end - b0);
        load_taus<IO>(a, b0, m, s);
        std::fill(count.begin(), count.end(), 0.0f);
        for (int i = 0; ram && i < k; ++i) {
            const float* t = s.tau + size_t(i) * kSparseTile;
            for (int64_t j = 0; j < m; ++j) count[j] += std::fabs(t[j]) > a.epsilon ? 1.0f : 0.0f;
        }
        // Straight into the lanes (element j into lane j mod 8, in order), 8 elements per step in local lanes the
        // compiler keeps in registers: every value is >= 0, so the zeros that pad the block to whole steps change
        // nothing.
        const int64_t m8 = (m + kStatLanes - 1) / kStatLanes * kStatLanes;  // <= kSparseTile
        for (int i = 0; i < k; ++i)
            std::fill(s.tau + size_t(i) * kSparseTile + m, s.tau + size_t(i) * kSparseTile + m8, 0.0f);
        std::fill(count.begin() + m, count.begin() + m8, 0.0f);
        for (int i = 0; i < k; ++i) {
            const float* t = s.tau + size_t(i) * kSparseTile;
            double l0[kStatLanes] = {};
            for (int64_t j0 = 0; magnitudes && j0 < m8; j0 += kStatLanes)
                for (int l = 0; l < kStatLanes; ++l) l0[l] += std::fabs(double(t[j0 + l]));
            // RAM's counts (only its mix reads them), in integer lanes: the same values as summing 1.0s in fp64
            // (every partial sum is a small integer), without the compare-to-double selects that kept this scalar.
            uint32_t l3[kStatLanes] = {}, l4[kStatLanes] = {};
            for (int64_t j0 = 0; ram && j0 < m8; j0 += kStatLanes) {
                for (int l = 0; l < kStatLanes; ++l) {
                    const float x = t[j0 + l], c = count[j0 + l];
                    const uint32_t nz = std::fabs(x) > a.epsilon;
                    l3[l] += nz & uint32_t(c > 1.0f);
                    l4[l] += nz & uint32_t(c == 1.0f);
                }
            }
            double* L = lanes.data() + size_t(kSparseStats * i) * kStatLanes;
            std::copy(l0, l0 + kStatLanes, L);
            for (int l = 0; l < kStatLanes; ++l) {
                L[3 * kStatLanes + l] = double(l3[l]);
                L[4 * kStatLanes + l] = double(l4[l]);
            }
        }
        select_taus<IO>(a, b0, m, s, quota.data());
        for (int i = 0; i < k; ++i) {
            float* t = s.tau + size_t(i) * kSparseTile;
            std::fill(t + m, t + m8, 0.0f);  // the selection may have left other values there
            double kept1[kStatLanes] = {}, kept2[kStatLanes] = {};
            for (int64_t j0 = 0; magnitudes && j0 < m8; j0 += kStatLanes)
                for (int l = 0; l < kStatLanes; ++l) kept1[l] += std::fabs(double(t[j0 + l]));
            for (int64_t j0 = 0; sce && j0 < m8; j0 += kStatLanes) {
                for (int l = 0; l < kStatLanes; ++l) {
                    const double x = t[j0 + l];
                    kept2[l] += x * x;  // exact: a float's square fits in a double
                }
            }
            double* L = lanes.data() + size_t(kSparseStats * i) * kStatLanes;
            std::copy(kept1, kept1 + kStatLanes, L + kStatLanes);
            std::copy(kept2, kept2 + kStatLanes, L + 2 * kStatLanes);
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
    SparseScratch& s = scratch_for(a.k);
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
// bits of the entries whose high bits equal `prefix`. hist holds 65536 counters. With a.variances, pass 0 also
// writes each entry's bits there (entry e at a.variances[a.start + e]; each range writes its own).
//
// Pass 0 on long ranges counts into two interleaved histograms, added into `hist` at the end, as TIES' pass 0 does
// (radix_select_impl.h): variances of bf16 task vectors repeat (a handful of small differences make most of them),
// and one histogram makes each increment wait for the previous one's store to the same bin.
template <class IO>
int64_t variance_histogram_kernel(const SparseArgs& a, int64_t begin, int64_t end, int pass, uint32_t prefix,
                                  uint64_t* hist) {
    SparseScratch& s = scratch_for(a.k);
    const bool split = pass == 0 && end - begin >= kSplitHistogramMin;
    thread_local std::vector<uint64_t> halves;  // kept from call to call, cleared here
    if (split) halves.assign(2 * 65536, 0);
    uint64_t* even = split ? halves.data() : hist;
    uint64_t* odd = split ? even + 65536 : hist;
    int64_t zeros = 0;
    for (int64_t t0 = begin; t0 < end; t0 += kOpTile) {
        const int64_t m = std::min(kOpTile, end - t0);
        load_taus<IO>(a, t0, m, s);
        uint32_t* bits = a.variances ? a.variances + a.start + t0 : s.bits.data();
        variance_bits(s.tau, a.k, m, s.wmean.data(), s.wm2.data(), bits);
        if (pass == 0) {
            int64_t j = 0;
            for (; j + 2 <= m; j += 2) {
                ++even[bits[j] >> 16];
                ++odd[bits[j + 1] >> 16];
                zeros += (bits[j] == 0) + (bits[j + 1] == 0);
            }
            if (j < m) {
                ++even[bits[j] >> 16];
                zeros += bits[j] == 0;
            }
        } else {
            for (int64_t j = 0; j < m; ++j)
                if ((bits[j] >> 16) == prefix) ++hist[bits[j] & 0xFFFFu];
        }
    }
    if (split)
        for (int64_t b = 0; b < 65536; ++b) hist[b] += even[b] + odd[b];
    return zeros;
}

// SCE's pass 1 over one block [begin, end) of the stored variance bits (a.variances, entry e at e; at most kBlock
// entries): the low halves of the entries in the high bin `prefix` counted into hist, the keep bit of every other
// entry written (kept: above the bin; a.keep_mask zeroed), and the bin's entries packed at the front of the block's
// own bits as (position in the block << 16 | low half), in index order, for variance_keep_ties once the threshold is
// known. Returns how many. In place: entry j is read before anything is written at j (the packed count is <= j).
inline int64_t variance_select_stored_kernel(const SparseArgs& a, int64_t begin, int64_t end, uint32_t prefix,
                                             uint64_t* hist) {
    const uint32_t* bits = a.variances;
    uint32_t* packed = a.variances + begin;
    int64_t count = 0;
    uint8_t keep[kOpTile], hit[kOpTile + 8];
    for (int64_t t0 = begin; t0 < end; t0 += kOpTile) {
        const int64_t m = std::min(kOpTile, end - t0);
        const uint32_t* b = bits + t0;
        for (int64_t j = 0; j < m; ++j) {  // vectorised: the compares only
            const uint32_t high = b[j] >> 16;
            keep[j] = high > prefix;
            hit[j] = high == prefix;
        }
        std::memset(hit + m, 0, 8);
        // The bin's entries, found eight flags at a time: where few lie in it (0.3% of normal variances in a median
        // bin; 12% on the benchmark's bf16 fine-tunes) most tiles still hold one, and a per-entry scan of those tiles
        // took 2.4x the time of reading the bits, this 1.4x (16 Mi entries, one thread: 23.5 and 14.5 ms, against
        // 9.5-11 ms for numpy's sum of them).
        for (int64_t j0 = 0; j0 < m; j0 += 8) {
            uint64_t group;
            std::memcpy(&group, hit + j0, 8);
            for (; group; group &= group - 1) {
                const int64_t j = j0 + (__builtin_ctzll(group) >> 3);
                const uint32_t v = b[j];
                ++hist[v & 0xFFFFu];
                packed[count++] = (uint32_t(t0 + j - begin) << 16) | (v & 0xFFFFu);
            }
        }
        store_bits(keep, t0, m, a.keep_mask);
    }
    return count;
}

}  // namespace
}  // namespace pysoup
