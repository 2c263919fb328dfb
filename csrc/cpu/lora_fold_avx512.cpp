// The LoRA fold's AVX-512 kernel (compiled with the AVX-512 flags, CMakeLists.txt): lora_fold_impl.h with a 14 x 32
// micro-tile, 28 accumulators of the 32 zmm registers, 2 for the row of R and 1 broadcast of L.
#include <immintrin.h>

#include "cpu/io_avx512.h"
#include "cpu/lora_fold_impl.h"

namespace pysoup {
namespace {

struct Avx512Lane {
    using Reg = __m512;
    static constexpr int kWidth = 16;
    static Reg zero() { return _mm512_setzero_ps(); }
    static Reg load(const float* p) { return _mm512_loadu_ps(p); }
    static Reg broadcast(const float* p) { return _mm512_set1_ps(*p); }
    static Reg fma(Reg a, Reg b, Reg c) { return _mm512_fmadd_ps(a, b, c); }
    static void store(float* p, Reg v) { _mm512_storeu_ps(p, v); }
    static Reg add(Reg a, Reg b) { return _mm512_add_ps(a, b); }
    static Reg canonical(Reg s) {
        return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(s, s, _CMP_UNORD_Q), s,
                                    _mm512_castsi512_ps(_mm512_set1_epi32(0x7FC00000)));
    }
    static Reg load_stored(const void* base, int dtype, int64_t i) { return load16(base, dtype, i, 0xFFFF); }
    static int store_stored(void* base, int dtype, int64_t i, Reg v) { return store16(base, dtype, i, v, 0xFFFF); }
};

constexpr int kMr = 14, kNv = 2, kMc = 112;

}  // namespace

const LoraFoldKernels kLoraFoldAvx512{kMr, kNv * Avx512Lane::kWidth, kMc, lora_strip_kernel<Avx512Lane, kMr, kNv, kMc>,
                                      lora_strip_scratch<kMc, kMr>};

}  // namespace pysoup
