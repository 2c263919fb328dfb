// The weighted sum in plain C++, no SIMD flags: the definition every other ISA's weighted sum must reproduce.
#include <algorithm>
#include <cmath>

#include "cpu/blocking.h"
#include "cpu/dtype.h"
#include "cpu/weighted_sum.h"

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

}  // namespace pysoup
