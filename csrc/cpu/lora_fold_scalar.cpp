// The LoRA fold's scalar kernel (no SIMD flags, CMakeLists.txt): lora_fold_impl.h over one float per "register",
// std::fma for every product (a correctly rounded fma, as the vector instructions compute).
#include <cmath>

#include "cpu/io_scalar.h"
#include "cpu/lora_fold_impl.h"

namespace pysoup {
namespace {

struct ScalarLane {
    using Reg = float;
    static constexpr int kWidth = 1;
    static Reg zero() { return 0.0f; }
    static Reg load(const float* p) { return *p; }
    static Reg broadcast(const float* p) { return *p; }
    static Reg fma(Reg a, Reg b, Reg c) { return std::fma(a, b, c); }
    static void store(float* p, Reg v) { *p = v; }
    static Reg add(Reg a, Reg b) { return a + b; }
    static Reg canonical(Reg s) { return s != s ? bits_f32(0x7FC00000u) : s; }
    static Reg load_stored(const void* base, int dtype, int64_t i) { return load_f32(base, dtype, i); }
    static int store_stored(void* base, int dtype, int64_t i, Reg v) { return store_f32(base, dtype, i, v); }
};

constexpr int kMr = 4, kNv = 4, kMc = 64;

}  // namespace

const LoraFoldKernels kLoraFoldScalar{kMr, kNv * ScalarLane::kWidth, kMc, lora_strip_kernel<ScalarLane, kMr, kNv, kMc>,
                                      lora_strip_scratch<kMc, kMr>};

}  // namespace pysoup
