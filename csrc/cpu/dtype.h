// The stored dtypes: their codes, and exact scalar conversions between them and fp32 (every ISA file uses these
// for its tails).
//
// The functions have internal linkage (anonymous namespace): each ISA file compiles its own copy with its own
// flags, so the linker can never pick an AVX-512 build of a helper for the scalar path.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace pysoup {

// Codes shared with Python (pysoup/dtypes.py) and the CUDA kernels (csrc/cuda/select.h).
enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

namespace {

inline int dtype_size(int code) { return code == kF32 ? 4 : 2; }

inline uint32_t f32_bits(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return u;
}

inline float bits_f32(uint32_t u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

// The fp32 bits of |f|: ordered as the magnitudes are (TIES' threshold compares these).
inline uint32_t abs_bits(float f) { return f32_bits(f) & 0x7FFFFFFFu; }

// c ? a : b, by bit masks. For updates in place (x[j] = c ? y : x[j]): written as a select, the compiler turns them
// into masked stores (vmaskmovps), which AMD's cores run microcoded, tens of cycles each (39% of the TIES mix's time
// measured); this is an ordinary store of a blended value.
inline float blend_f32(bool c, float a, float b) {
    const uint32_t mask = 0u - uint32_t(c);
    return bits_f32((f32_bits(a) & mask) | (f32_bits(b) & ~mask));
}

inline float bf16_to_f32(uint16_t h) { return bits_f32(uint32_t(h) << 16); }

// Round to nearest even on the bits. A NaN stays a NaN with its sign and top payload, quiet bit set
// (what the hardware converters do for fp16; torch's own bf16 NaN varies by code path, so the contract fixes it).
inline uint16_t f32_to_bf16(float f) {
    const uint32_t u = f32_bits(f);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return uint16_t((u >> 16) | 0x0040u);
    return uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

// Exact. Subnormal halves are normalised through an exact float multiply.
inline float f16_to_f32(uint16_t h) {
    const uint32_t sign = uint32_t(h & 0x8000u) << 16;
    const uint32_t exp = (h >> 10) & 0x1Fu;
    const uint32_t mant = h & 0x3FFu;
    if (exp == 0) {
        const float mag = float(mant) * 0x1p-24f;
        return bits_f32(f32_bits(mag) | sign);
    }
    if (exp == 31) return bits_f32(sign | 0x7F800000u | (mant << 13) | (mant ? 0x00400000u : 0u));
    return bits_f32(sign | ((exp + 112u) << 23) | (mant << 13));
}

// Round to nearest even, bit-identical to vcvtps2ph with _MM_FROUND_TO_NEAREST_INT (payload kept on NaN).
inline uint16_t f32_to_f16(float f) {
    uint32_t u = f32_bits(f);
    const uint32_t sign = (u >> 16) & 0x8000u;
    u &= 0x7FFFFFFFu;
    if (u >= 0x47800000u) {  // |f| >= 65536: inf, NaN, or certain overflow
        if (u > 0x7F800000u) return uint16_t(sign | 0x7E00u | ((u >> 13) & 0x3FFu));
        return uint16_t(sign | 0x7C00u);
    }
    if (u < 0x38800000u) {  // below 2^-14: the result is subnormal or zero.
        // Adding 0.5 aligns the value's bits to the half's subnormal grid; the float add rounds to nearest even.
        const float shifted = bits_f32(u) + 0.5f;
        return uint16_t(sign | (f32_bits(shifted) - 0x3F000000u));
    }
    const uint32_t mant_odd = (u >> 13) & 1u;
    u += 0xC8000FFFu;  // rebias the exponent (-112 << 23) and add the rounding bias 0xFFF
    u += mant_odd;
    return uint16_t(sign | (u >> 13));
}

inline float load_f32(const void* base, int dtype, int64_t i) {
    switch (dtype) {
    case kF32: return static_cast<const float*>(base)[i];
    case kF16: return f16_to_f32(static_cast<const uint16_t*>(base)[i]);
    default: return bf16_to_f32(static_cast<const uint16_t*>(base)[i]);
    }
}

// Stores v rounded to `dtype`; returns 1 when the stored value is not finite (NaN or inf after rounding).
inline int store_f32(void* base, int dtype, int64_t i, float v) {
    switch (dtype) {
    case kF32: {
        static_cast<float*>(base)[i] = v;
        return (f32_bits(v) & 0x7F800000u) == 0x7F800000u;
    }
    case kF16: {
        const uint16_t h = f32_to_f16(v);
        static_cast<uint16_t*>(base)[i] = h;
        return (h & 0x7C00u) == 0x7C00u;
    }
    default: {
        const uint16_t h = f32_to_bf16(v);
        static_cast<uint16_t*>(base)[i] = h;
        return (h & 0x7F80u) == 0x7F80u;
    }
    }
}

}  // namespace
}  // namespace pysoup
