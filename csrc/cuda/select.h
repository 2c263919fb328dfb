// pysoup._cuda: GPU kernels that Triton does not express well. Pointers are device pointers; launches go on the
// caller's stream (torch's current stream) and return without synchronising.
#pragma once

#include <cstdint>

namespace pysoup::cuda {

struct HistogramArgs {
    const void* const* inputs;  // k fine-tunes, device pointers
    const int* in_dtypes;       // 0 F32, 1 F16, 2 BF16 (csrc/cpu/dtype.h)
    int k;
    const void* base;
    int base_dtype;
    int64_t n;
    int pass;                  // 0: high 16 bits; 1: low 16 bits where the high bits equal prefix[i]
    const uint32_t* prefix;    // k, pass 1 only
    unsigned long long* hist;  // device: k x 65536 counters, added to
    uintptr_t stream;          // cudaStream_t
};

// Adds one range's radix-select counts of |x_i - base|'s fp32 bits to hist (csrc/cpu/radix_select_impl.h,
// magnitude_histogram_kernel, counts the same thing on the CPU).
void magnitude_histogram(const HistogramArgs& a);

}  // namespace pysoup::cuda
