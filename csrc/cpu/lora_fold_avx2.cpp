// The LoRA fold's AVX2 kernel (compiled with -mavx2 -mfma -mf16c, CMakeLists.txt): lora_fold_impl.h with a 6 x 16
// micro-tile, 12 accumulators of the 16 ymm registers, 2 for the row of R and 1 broadcast of L.
#include <immintrin.h>

#include "cpu/io_avx2.h"
#include "cpu/lora_fold_impl.h"

namespace pysoup {
namespace {

struct Avx2Lane {
    using Reg = __m256;
    static constexpr int kWidth = 8;
    static Reg zero() { return _mm256_setzero_ps(); }
    static Reg load(const float* p) { return _mm256_loadu_ps(p); }
    static Reg broadcast(const float* p) { return _mm256_broadcast_ss(p); }
    static Reg fma(Reg a, Reg b, Reg c) { return _mm256_fmadd_ps(a, b, c); }
    static void store(float* p, Reg v) { _mm256_storeu_ps(p, v); }
    static Reg add(Reg a, Reg b) { return _mm256_add_ps(a, b); }
    static Reg canonical(Reg s) {
        return _mm256_blendv_ps(s, _mm256_castsi256_ps(_mm256_set1_epi32(0x7FC00000)),
                                _mm256_cmp_ps(s, s, _CMP_UNORD_Q));
    }
    static Reg load_stored(const void* base, int dtype, int64_t i) { return load8(base, dtype, i); }
    static int store_stored(void* base, int dtype, int64_t i, Reg v) { return store8(base, dtype, i, v); }
};

// 16 micro-panels a strip: R's block is read from L2 once per 96 rows.
constexpr int kMr = 6, kNv = 2, kMc = 96;

}  // namespace

const LoraFoldKernels kLoraFoldAvx2{kMr, kNv * Avx2Lane::kWidth, kMc, lora_strip_kernel<Avx2Lane, kMr, kNv, kMc>,
                                    lora_strip_scratch<kMc, kMr>};

}  // namespace pysoup
