// The weighted sum (linear merges, soups, EMA/lerp steps): its arguments, each ISA's kernel
// (weighted_sum_<isa>.cpp) and the threaded entry points (weighted_sum.cpp).
#pragma once

#include <cstdint>
#include <type_traits>

#include "cpu/isa.h"

namespace pysoup {

// out[j] = round_out( (fma(w_{k-1}, x_{k-1}[j], ... fma(w_0, x_0[j], -0.0f))) [/ divisor] ) for j in [0, n).
// Accumulation is fp32 in input order; -0.0 is the additive identity, so a soup of copies of -0.0 stays -0.0.
struct WeightedSumArgs {
    const void* const* inputs;  // k pointers
    const int* in_dtypes;       // k dtype codes
    const float* weights;       // k fp32 weights
    int k;
    void* out;
    int out_dtype;
    bool normalize;  // divide by `divisor` (the fp32 sum of the weights in input order)
    float divisor;
};

// Each ISA's kernel over the element range [begin, end); returns how many stored values are not finite.
int64_t weighted_sum_scalar(const WeightedSumArgs&, int64_t begin, int64_t end);
#if PYSOUP_X86
int64_t weighted_sum_avx2(const WeightedSumArgs&, int64_t begin, int64_t end);
int64_t weighted_sum_avx512(const WeightedSumArgs&, int64_t begin, int64_t end);
#endif

// Runs the kernel with `threads` OpenMP threads on `isa`; the result does not depend on either.
int64_t weighted_sum(const WeightedSumArgs& args, int64_t n, Isa isa, int threads);

float fp32_sum_in_order(const float* weights, int k);

// The same weighted sum over m tensors in one call (multi-tensor updates during training): tensor t reads
// inputs[t * k .. t * k + k) and writes outs[t] (which may be one of its inputs: each element is read before
// it is written), sizes[t] elements. `shared` gives k, the dtypes, weights and divisor. The threads split the
// concatenation of all tensors evenly; the result does not depend on `threads` or `isa`. When `counts` is not null,
// counts[t] receives tensor t's count of non-finite outputs.
int64_t weighted_sum_many(const WeightedSumArgs& shared, const void* const* inputs, void* const* outs,
                          const int64_t* sizes, int64_t m, Isa isa, int threads, int64_t* counts = nullptr);

// Calls f(std::integral_constant<int, K>) with K = k for the input counts the streaming loops unroll (1, 2, 3, 4
// and 8), else K = 0 (a loop over the run-time count). With a run-time count the loop measured 0.7x of the
// unrolled one's bandwidth (2 x fp32, AMD EPYC, one thread): the extra instructions per cache line leave fewer
// loads in flight.
template <class F>
auto with_input_count(int k, F&& f) {
    switch (k) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 3: return f(std::integral_constant<int, 3>{});
    case 4: return f(std::integral_constant<int, 4>{});
    case 8: return f(std::integral_constant<int, 8>{});
    default: return f(std::integral_constant<int, 0>{});
    }
}

}  // namespace pysoup
