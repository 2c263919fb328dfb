// Folding LoRA adapters into a base weight (pysoup.lora.fold): out = round(W + L·R) over a block of W's rows, with
// L = [w_1 s_1 B_1 | w_2 s_2 B_2 | ...] (rows x K, fp32) and R = [A_1; A_2; ...] (K x cols, fp32), K = sum r_i small.
// One pass: each output tile's L·R is accumulated in registers, W is added and the result rounded straight into the
// output; no fp32 product buffer, no second pass over the block.
//
// The numerics, the same bits on every ISA and in the torch reference (pysoup.ops.reference.lora_fold):
//   acc = +0; for k = 0 .. K-1 in order: acc = fma(L[r, k], R[k, c], acc)   (fp32, one rounding per fma)
//   s = fp32(W[r, c]) + acc                                                (one fp32 addition)
//   s = 0x7FC00000 if s is NaN                                             (which NaN an addition or fma propagates
//                                                                           differs between code paths)
//   out[r, c] = round_to_nearest_even(s, out dtype)
// The caller folds the scaled factor w_i s_i into L (rounded to fp32 once, before the call). The arithmetic lives in
// lora_fold_impl.h, compiled per ISA (lora_fold_<isa>.cpp); lora_fold.cpp packs R and runs the threads.
#pragma once

#include <cstdint>

#include "cpu/isa.h"

namespace pysoup {

struct LoraFoldArgs {
    const void* w;  // W: rows x cols, row-major, the stored dtype w_dtype
    int w_dtype;
    const float* left;   // L: rows x k, row-major
    const float* right;  // R: k x cols, row-major
    int64_t rows, cols;
    int k;
    void* out;  // rows x cols, row-major, the stored dtype out_dtype
    int out_dtype;
};

// One ISA's kernel: the micro-tile (mr rows x nr columns of accumulators in registers) and the rows a thread takes
// at a time (mc, a multiple of mr), and the strip kernel: rows [r0, r1) (at most mc) of the output from R packed
// into nr-column panels (pack_right). `scratch` holds scratch_floats(k) floats. Returns the non-finite count.
struct LoraFoldKernels {
    int mr, nr, mc;
    int64_t (*strip)(const LoraFoldArgs&, const float* packed_right, int64_t r0, int64_t r1, float* scratch);
    int64_t (*scratch_floats)(int k);
};

extern const LoraFoldKernels kLoraFoldScalar;
#if PYSOUP_X86
extern const LoraFoldKernels kLoraFoldAvx2;
extern const LoraFoldKernels kLoraFoldAvx512;
#endif

// The threaded entry point: all rows of `a`. Returns the non-finite count of the output.
int64_t lora_fold(const LoraFoldArgs& a, Isa isa, int threads);

}  // namespace pysoup
