// The portable path: plain C++, no SIMD flags. It is also the definition every other ISA must reproduce.
#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu/dtype.h"
#include "cpu/kernels.h"
#include "cpu/task_vector.h"

namespace pysoup {

int64_t weighted_sum_scalar(const WeightedSumArgs& a, int64_t begin, int64_t end) {
    float acc[kTile];
    int64_t nonfinite = 0;
    for (int64_t t0 = begin; t0 < end; t0 += kTile) {
        const int64_t m = std::min(kTile, end - t0);
        std::fill(acc, acc + m, -0.0f);
        for (int i = 0; i < a.k; ++i) {
            const float w = a.weights[i];
            const void* x = a.inputs[i];
            for (int64_t j = 0; j < m; ++j) acc[j] = std::fma(w, load_f32(x, a.in_dtypes[i], t0 + j), acc[j]);
        }
        for (int64_t j = 0; j < m; ++j) {
            const float v = a.normalize ? acc[j] / a.divisor : acc[j];
            nonfinite += store_f32(a.out, a.out_dtype, t0 + j, v);
        }
    }
    return nonfinite;
}

namespace {

struct ScalarIO {
    static void load(const void* base, int dtype, int64_t start, int64_t n, float* dst) {
        for (int64_t j = 0; j < n; ++j) dst[j] = load_f32(base, dtype, start + j);
    }
    static int64_t store(const float* src, int64_t n, void* base, int dtype, int64_t start) {
        int64_t nonfinite = 0;
        for (int64_t j = 0; j < n; ++j) nonfinite += store_f32(base, dtype, start + j, src[j]);
        return nonfinite;
    }
    static int64_t select_low(const float* t, const float* base, int64_t m, uint32_t prefix, uint32_t* low) {
        return select_low_scalar(t, base, m, prefix, low);
    }
};

#include "cpu/task_vector_impl.h"

}  // namespace

TaskVectorKernels task_vector_kernels_scalar() { return make_task_vector_kernels<ScalarIO>(); }

}  // namespace pysoup
