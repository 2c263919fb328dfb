// The scalar tile IO. Every ISA's IO type (ScalarIO, Avx2IO, Avx512IO) gives the ops written once over fp32 tiles
// (the *_impl.h headers) these three functions, with ScalarIO's meaning:
//   load        n stored values from element `start` to fp32 in dst
//   store       n fp32 values rounded to the stored dtype at element `start`; returns how many are not finite
//   select_low  TIES' radix-select pass 1 over one tile (select_low_scalar)
// Internal linkage, as in dtype.h.
#pragma once

#include <cstdint>

#include "cpu/dtype.h"

namespace pysoup {
namespace {

// TIES' radix-select pass 1 over one tile: the low 16 bits of |t[j] - base[j]|'s fp32 bits, for the elements
// whose high 16 bits equal `prefix`, packed into low[0 .. count). Returns count. Branch-free: whether an element
// matches is data-dependent and would mispredict. (The AVX-512 and AVX2 IO types pack 16 / 8 lanes at a time.)
inline int64_t select_low_scalar(const float* t, const float* base, int64_t m, uint32_t prefix, uint32_t* low) {
    int64_t count = 0;
    for (int64_t j = 0; j < m; ++j) {
        const uint32_t b = f32_bits(t[j] - base[j]) & 0x7FFFFFFFu;
        low[count] = b & 0xFFFFu;
        count += (b >> 16) == prefix;
    }
    return count;
}

struct ScalarIO {
    static void load(const void* base, int dtype, int64_t start, int64_t n, float* dst) {
        for (int64_t j = 0; j < n; ++j) dst[j] = load_f32(base, dtype, start + j);
    }
    // dst[j] = x[j] - sub[j] (a task vector: x an input, sub the base already loaded).
    static void load_minus(const void* base, int dtype, int64_t start, int64_t n, const float* sub, float* dst) {
        load(base, dtype, start, n, dst);
        for (int64_t j = 0; j < n; ++j) dst[j] = dst[j] - sub[j];
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

}  // namespace
}  // namespace pysoup
