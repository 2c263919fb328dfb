// The task-vector kernels, written once over fp32 tiles. Each ISA file includes this inside its own anonymous
// namespace with an `IO` type that converts tiles to and from the stored dtypes using that ISA's intrinsics; the
// compiler vectorises the fp32 arithmetic below with that file's flags. Every fma is explicit (the build uses
// -ffp-contract=off), so all ISAs compute the same bits.
//
// Requires, before inclusion: cpu/dtype.h, cpu/task_vector.h, <vector>, <cmath>, <algorithm>, and
//   struct IO { static void load(const void* base, int dtype, int64_t start, int64_t n, float* dst);
//               static int64_t store(const float* src, int64_t n, void* base, int dtype, int64_t start); };

constexpr int64_t kTvTile = 512;

inline uint32_t abs_bits(float v) { return f32_bits(v) & 0x7FFFFFFFu; }

// Philox words of elements [e0, e0 + m) of one stream (word e % 4 of philox(key, e / 4), as philox_word), one
// generator call per 4 elements, in a loop the compiler vectorises across groups. words needs m + 8 entries.
inline void philox_words(uint64_t key, uint64_t e0, int64_t m, uint32_t* words, uint32_t* scratch) {
    const uint64_t g0 = e0 >> 2;
    const int64_t groups = int64_t(((e0 + uint64_t(m) + 3) >> 2) - g0);
    uint32_t* w0 = scratch;
    uint32_t* w1 = w0 + groups;
    uint32_t* w2 = w1 + groups;
    uint32_t* w3 = w2 + groups;
    const uint32_t key0 = uint32_t(key), key1 = uint32_t(key >> 32);
    for (int64_t g = 0; g < groups; ++g) {
        uint32_t c0 = uint32_t(g0 + uint64_t(g)), c1 = uint32_t((g0 + uint64_t(g)) >> 32), c2 = 0, c3 = 0;
        uint32_t k0 = key0, k1 = key1;
        for (int r = 0; r < 10; ++r) {
            const uint64_t p0 = uint64_t(0xD2511F53u) * c0, p2 = uint64_t(0xCD9E8D57u) * c2;
            const uint32_t n0 = uint32_t(p2 >> 32) ^ c1 ^ k0, n2 = uint32_t(p0 >> 32) ^ c3 ^ k1;
            c1 = uint32_t(p2);
            c3 = uint32_t(p0);
            c0 = n0;
            c2 = n2;
            k0 += 0x9E3779B9u;
            k1 += 0xBB67AE85u;
        }
        w0[g] = c0;
        w1[g] = c1;
        w2[g] = c2;
        w3[g] = c3;
    }
    const int64_t off = int64_t(e0 & 3);
    uint32_t* all = words;  // interleave, then drop the words before e0
    for (int64_t g = 0; g < groups; ++g) {
        all[4 * g] = w0[g];
        all[4 * g + 1] = w1[g];
        all[4 * g + 2] = w2[g];
        all[4 * g + 3] = w3[g];
    }
    if (off)
        for (int64_t j = 0; j < m; ++j) words[j] = words[j + off];
}

// tau_i tiles for elements [t0, t0 + m): x_i - base, then the DARE drop or the TIES trim.
template <class IO>
void task_vectors(const TaskVectorArgs& a, int64_t t0, int64_t m, float* base_tile, float* tau, int64_t* quota,
                  uint32_t* words, uint32_t* scratch) {
    IO::load(a.base, a.base_dtype, t0, m, base_tile);
    for (int i = 0; i < a.k; ++i) {
        float* t = tau + i * kTvTile;
        IO::load(a.inputs[i], a.in_dtypes[i], t0, m, t);
        for (int64_t j = 0; j < m; ++j) t[j] = t[j] - base_tile[j];
        if (a.dare) {
            const float scale = a.dare_scale[i];
            const uint32_t below = a.keep_below[i];
            philox_words(a.dare_keys[i], uint64_t(a.start + t0), m, words, scratch);
            for (int64_t j = 0; j < m; ++j) {
                const float kept = t[j] * scale;
                t[j] = words[j] < below ? kept : 0.0f;
            }
        }
        if (a.trim) {
            const uint32_t thr = a.trim_bits[i];
            int64_t ties = 0;
            if (quota[i] >= 0)
                for (int64_t j = 0; j < m; ++j) ties += abs_bits(t[j]) == thr;
            if (quota[i] < 0 || ties <= quota[i]) {  // every tie in this tile is kept
                for (int64_t j = 0; j < m; ++j) t[j] = abs_bits(t[j]) >= thr ? t[j] : 0.0f;
                if (quota[i] >= 0) quota[i] -= ties;
            } else if (quota[i] == 0) {  // no tie is kept any more
                for (int64_t j = 0; j < m; ++j) t[j] = abs_bits(t[j]) > thr ? t[j] : 0.0f;
            } else {  // the one tile where the quota runs out: ties kept in index order
                for (int64_t j = 0; j < m; ++j) {
                    const uint32_t b = abs_bits(t[j]);
                    bool keep = b > thr;
                    if (b == thr && quota[i] > 0) {
                        keep = true;
                        --quota[i];
                    }
                    t[j] = keep ? t[j] : 0.0f;
                }
            }
        }
    }
}

template <class IO>
int64_t tv_combine(const TaskVectorArgs& a, int64_t begin, int64_t end) {
    std::vector<float> buf(size_t(kTvTile) * (a.k + 4));
    float* base_tile = buf.data();
    float* mix = base_tile + kTvTile;
    float* aux = mix + kTvTile;
    float* div = aux + kTvTile;
    float* tau = div + kTvTile;
    std::vector<int64_t> quota(a.trim ? a.tie_quota : nullptr, a.trim ? a.tie_quota + a.k : nullptr);
    std::vector<uint32_t> words(a.dare ? size_t(kTvTile) * 3 + 16 : 0);
    int64_t nonfinite = 0;
    for (int64_t t0 = begin; t0 < end; t0 += kTvTile) {
        const int64_t m = std::min(kTvTile, end - t0);
        task_vectors<IO>(a, t0, m, base_tile, tau, quota.data(), words.data(), words.data() + kTvTile + 8);
        std::fill(mix, mix + m, -0.0f);
        if (a.consensus) {
            // Elect the sign of sum w_i tau_i (+ where it is 0 or -0), then mix only the agreeing entries.
            std::fill(aux, aux + m, -0.0f);
            for (int i = 0; i < a.k; ++i) {
                const float w = a.weights[i];
                const float* t = tau + i * kTvTile;
                for (int64_t j = 0; j < m; ++j) aux[j] = std::fma(w, t[j], aux[j]);
            }
            std::fill(div, div + m, 0.0f);
            for (int i = 0; i < a.k; ++i) {
                const float w = a.weights[i];
                const float* t = tau + i * kTvTile;
                for (int64_t j = 0; j < m; ++j) {
                    const float tj = t[j];
                    const bool positive = aux[j] >= 0.0f;
                    const bool agree = (positive & (tj > 0.0f)) | (!positive & (tj < 0.0f));
                    const float fused = std::fma(w, tj, mix[j]);  // computed unconditionally so the loop vectorises
                    const float added = div[j] + w;
                    mix[j] = agree ? fused : mix[j];
                    div[j] = agree ? added : div[j];
                }
            }
            if (a.normalize)
                for (int64_t j = 0; j < m; ++j) mix[j] = mix[j] / (div[j] == 0.0f ? 1.0f : div[j]);
        } else {
            for (int i = 0; i < a.k; ++i) {
                const float w = a.weights[i];
                const float* t = tau + i * kTvTile;
                for (int64_t j = 0; j < m; ++j) mix[j] = std::fma(w, t[j], mix[j]);
            }
            if (a.normalize)
                for (int64_t j = 0; j < m; ++j) mix[j] = mix[j] / a.divisor;
        }
        for (int64_t j = 0; j < m; ++j) mix[j] = std::fma(a.lambda, mix[j], base_tile[j]);
        nonfinite += IO::store(mix, m, a.out, a.out_dtype, t0);
    }
    return nonfinite;
}

// How many |tau_i| equal the trim threshold in [begin, end), per model.
template <class IO>
void tv_count_ties(const TaskVectorArgs& a, int64_t begin, int64_t end, int64_t* counts) {
    std::vector<float> buf(size_t(kTvTile) * 2);
    float* base_tile = buf.data();
    float* t = base_tile + kTvTile;
    for (int i = 0; i < a.k; ++i) counts[i] = 0;
    for (int64_t t0 = begin; t0 < end; t0 += kTvTile) {
        const int64_t m = std::min(kTvTile, end - t0);
        IO::load(a.base, a.base_dtype, t0, m, base_tile);
        for (int i = 0; i < a.k; ++i) {
            IO::load(a.inputs[i], a.in_dtypes[i], t0, m, t);
            const uint32_t thr = a.trim_bits[i];
            int64_t c = 0;
            for (int64_t j = 0; j < m; ++j) c += abs_bits(t[j] - base_tile[j]) == thr;
            counts[i] += c;
        }
    }
}

// Radix-select histograms of |tau_i|'s fp32 bits: pass 0 counts the high 16 bits; pass 1 counts the low 16 bits
// of the elements whose high bits equal prefix[i]. hist holds k x 65536 counters.
// Pass 0 on long ranges counts into two interleaved 32-bit histograms per model, added into `hist` at the end:
// neighbouring elements often fall in one bin, and one histogram makes each increment wait for the previous
// one's store (1.2x the counting speed measured in isolation). Short ranges count straight into `hist`: the
// extra histograms cost 2 x 256 KiB per model to clear and add.
constexpr int64_t kSplitHistogramMin = int64_t(1) << 18;

template <class IO>
void tv_histogram(const TaskVectorArgs& a, int64_t begin, int64_t end, int pass, const uint32_t* prefix,
                  uint64_t* hist) {
    std::vector<float> buf(size_t(kTvTile) * 2);
    std::vector<uint32_t> low(kTvTile + 16);  // + 16: a vector store of packed matches may run past the count
    float* base_tile = buf.data();
    float* t = base_tile + kTvTile;
    const bool split = pass == 0 && end - begin >= kSplitHistogramMin && end - begin < (int64_t(1) << 32);
    std::vector<uint32_t> halves(split ? size_t(a.k) * 2 * 65536 : 0);
    for (int64_t t0 = begin; t0 < end; t0 += kTvTile) {
        const int64_t m = std::min(kTvTile, end - t0);
        IO::load(a.base, a.base_dtype, t0, m, base_tile);
        for (int i = 0; i < a.k; ++i) {
            IO::load(a.inputs[i], a.in_dtypes[i], t0, m, t);
            uint64_t* h = hist + size_t(i) * 65536;
            if (split) {
                uint32_t* even = halves.data() + size_t(i) * 2 * 65536;
                uint32_t* odd = even + 65536;
                int64_t j = 0;
                for (; j + 2 <= m; j += 2) {
                    ++even[abs_bits(t[j] - base_tile[j]) >> 16];
                    ++odd[abs_bits(t[j + 1] - base_tile[j + 1]) >> 16];
                }
                if (j < m) ++even[abs_bits(t[j] - base_tile[j]) >> 16];
            } else if (pass == 0) {
                for (int64_t j = 0; j < m; ++j) ++h[abs_bits(t[j] - base_tile[j]) >> 16];
            } else {
                // Compact the matches without a branch, then count them: 2.5x faster than testing and counting
                // in one loop.
                const int64_t count = IO::select_low(t, base_tile, m, prefix[i], low.data());
                for (int64_t c = 0; c < count; ++c) ++h[low[size_t(c)]];
            }
        }
    }
    if (split) {
        for (int i = 0; i < a.k; ++i) {
            const uint32_t* even = halves.data() + size_t(i) * 2 * 65536;
            uint64_t* h = hist + size_t(i) * 65536;
            for (int64_t b = 0; b < 65536; ++b) h[b] += uint64_t(even[b]) + even[b + 65536];
        }
    }
}

template <class IO>
int64_t masked_sum(const MaskedSumArgs& a, int64_t begin, int64_t end) {
    std::vector<float> buf(size_t(kTvTile) * (a.k + 3));
    float* acc = buf.data();
    float* div = acc + kTvTile;
    float* nz = div + kTvTile;
    float* x = nz + kTvTile;
    int64_t nonfinite = 0;
    for (int64_t t0 = begin; t0 < end; t0 += kTvTile) {
        const int64_t m = std::min(kTvTile, end - t0);
        for (int i = 0; i < a.k; ++i) IO::load(a.inputs[i], a.in_dtypes[i], t0, m, x + i * kTvTile);
        std::fill(acc, acc + m, -0.0f);
        std::fill(div, div + m, 0.0f);
        std::fill(nz, nz + m, 1.0f);
        for (int i = 0; i < a.k; ++i) {
            const float w = a.weights[i];
            const float* xi = x + i * kTvTile;
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

// Statistics per block of kStatBlock elements starting at block_begin (a multiple of kStatBlock within the
// range): lane l accumulates elements j = l (mod kStatLanes) in order, in fp64 from +0; lanes then combine as
// ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7)). block_out gets moments_size() values per block.
template <class IO>
void moments(const MomentsArgs& a, int64_t block_begin, int64_t end, double* block_out) {
    const int v = a.k + (a.mean ? 1 : 0);
    const int nstat = moments_size(a.k, a.mean, a.dare);
    std::vector<float> buf(size_t(kStatBlock) * (v + 1 + (a.dare ? a.k : 0)));
    float* vec = buf.data();                       // v vectors
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
            IO::load(a.inputs[i], a.in_dtypes[i], b0, m, t);
            if (a.base)
                for (int64_t j = 0; j < m; ++j) t[j] = t[j] - base_tile[j];
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

template <class IO>
int64_t sparse_scan(const MaskedSumArgs& a, int64_t begin, int64_t end, int64_t* zeros) {
    std::vector<float> buf(size_t(kTvTile) * 2);
    float* x0 = buf.data();
    float* xi = x0 + kTvTile;
    int64_t z = 0;
    for (int64_t t0 = begin; t0 < end; t0 += kTvTile) {
        const int64_t m = std::min(kTvTile, end - t0);
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

template <class IO>
TaskVectorKernels make_task_vector_kernels() {
    return TaskVectorKernels{tv_combine<IO>,  tv_count_ties<IO>,    masked_sum<IO>,
                             moments<IO>, tv_histogram<IO>, sparse_scan<IO>};
}
