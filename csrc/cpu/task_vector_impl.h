// The task-vector merge per element range, over fp32 tiles: task_vector_kernel (x_i - base, DARE drop, TIES trim,
// sign election, mix) and count_ties_kernel (TIES ties per model, for the per-block quotas).
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
#include "cpu/philox.h"
#include "cpu/task_vector.h"

namespace pysoup {
namespace {

// tau_i tiles for elements [t0, t0 + m): x_i - base, then the DARE drop or the TIES trim.
template <class IO>
void task_vectors(const TaskVectorArgs& a, int64_t t0, int64_t m, float* base_tile, float* tau, int64_t* quota,
                  uint32_t* words, uint32_t* scratch) {
    IO::load(a.base, a.base_dtype, t0, m, base_tile);
    for (int i = 0; i < a.k; ++i) {
        float* t = tau + i * kOpTile;
        IO::load_minus(a.inputs[i], a.in_dtypes[i], t0, m, base_tile, t);
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
int64_t task_vector_kernel(const TaskVectorArgs& a, int64_t begin, int64_t end) {
    std::vector<float> buf(size_t(kOpTile) * (a.k + 4));
    float* base_tile = buf.data();
    float* mix = base_tile + kOpTile;
    float* aux = mix + kOpTile;
    float* div = aux + kOpTile;
    float* tau = div + kOpTile;
    std::vector<int64_t> quota(a.trim ? a.tie_quota : nullptr, a.trim ? a.tie_quota + a.k : nullptr);
    std::vector<uint32_t> words(a.dare ? size_t(kOpTile) * 3 + 16 : 0);
    int64_t nonfinite = 0;
    for (int64_t t0 = begin; t0 < end; t0 += kOpTile) {
        const int64_t m = std::min(kOpTile, end - t0);
        task_vectors<IO>(a, t0, m, base_tile, tau, quota.data(), words.data(), words.data() + kOpTile + 8);
        std::fill(mix, mix + m, -0.0f);
        if (a.consensus) {
            // Elect the sign of sum w_i tau_i (+ where it is 0 or -0), then mix only the agreeing entries.
            std::fill(aux, aux + m, -0.0f);
            for (int i = 0; i < a.k; ++i) {
                const float w = a.weights[i];
                const float* t = tau + i * kOpTile;
                for (int64_t j = 0; j < m; ++j) aux[j] = std::fma(w, t[j], aux[j]);
            }
            std::fill(div, div + m, 0.0f);
            for (int i = 0; i < a.k; ++i) {
                const float w = a.weights[i];
                const float* t = tau + i * kOpTile;
                for (int64_t j = 0; j < m; ++j) {
                    const float tj = t[j];
                    const bool positive = aux[j] >= 0.0f;
                    const bool agree = (positive & (tj > 0.0f)) | (!positive & (tj < 0.0f));
                    const float was = mix[j], count = div[j];
                    // Computed unconditionally so the loop vectorises; blended, not selected (blend_f32).
                    mix[j] = blend_f32(agree, std::fma(w, tj, was), was);
                    div[j] = blend_f32(agree, count + w, count);
                }
            }
            if (a.normalize)
                for (int64_t j = 0; j < m; ++j) mix[j] = mix[j] / (div[j] == 0.0f ? 1.0f : div[j]);
        } else {
            for (int i = 0; i < a.k; ++i) {
                const float w = a.weights[i];
                const float* t = tau + i * kOpTile;
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
void count_ties_kernel(const TaskVectorArgs& a, int64_t begin, int64_t end, int64_t* counts) {
    std::vector<float> buf(size_t(kOpTile) * 2);
    float* base_tile = buf.data();
    float* t = base_tile + kOpTile;
    for (int i = 0; i < a.k; ++i) counts[i] = 0;
    for (int64_t t0 = begin; t0 < end; t0 += kOpTile) {
        const int64_t m = std::min(kOpTile, end - t0);
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

}  // namespace
}  // namespace pysoup
