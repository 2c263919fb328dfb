// The LoRA fold's threads: R packed once per call into nr-column panels (k x nr each, zero-padded past the last
// column), then the row strips (mc rows each) handed out one at a time to the threads. Every output element is
// computed by one strip, in the same order whatever the thread count, so neither the threads nor the call's row
// range change a bit.
#include "cpu/lora_fold.h"

#include <algorithm>
#include <atomic>
#include <vector>

#include "cpu/blocking.h"
#include "cpu/item_threads.h"

namespace pysoup {
namespace {

const LoraFoldKernels& kernels(Isa isa) {
#if PYSOUP_X86
    static const LoraFoldKernels* const table[kIsaCount] = {&kLoraFoldScalar, &kLoraFoldAvx2, &kLoraFoldAvx512};
    return *table[static_cast<int>(isa)];
#else
    (void)isa;
    return kLoraFoldScalar;
#endif
}

}  // namespace

int64_t lora_fold(const LoraFoldArgs& a, Isa isa, int threads) {
    const LoraFoldKernels& kern = kernels(isa);
    if (a.rows <= 0 || a.cols <= 0) return 0;
    const int64_t nr = kern.nr, k = a.k;
    const int64_t panels = (a.cols + nr - 1) / nr;
    std::vector<float> packed(size_t(panels * k * nr));
    for (int64_t j = 0; j < panels; ++j) {  // k x cols fp32 (<= a few MiB): one memory pass, not worth a thread
        float* dst = packed.data() + j * k * nr;
        const int64_t c0 = j * nr, n = std::min(nr, a.cols - c0);
        for (int64_t q = 0; q < k; ++q) {
            const float* src = a.right + q * a.cols + c0;
            std::copy(src, src + n, dst + q * nr);
            std::fill(dst + q * nr + n, dst + (q + 1) * nr, 0.0f);
        }
    }
    const int64_t strips = (a.rows + kern.mc - 1) / kern.mc;
    // Below ~2 blocks of work a second thread costs more to start than it saves (blocking.h).
    const int64_t work = a.rows * a.cols * std::max<int64_t>(k, 1) / 64;
    const int nt = threads_for(threads, std::min(strips, nblocks(work)));
    std::atomic<int64_t> nonfinite{0};
    on_item_threads(nt, strips, [&](int64_t s, int) {
        thread_local std::vector<float> scratch;
        scratch.resize(size_t(kern.scratch_floats(a.k)));
        const int64_t r0 = s * kern.mc, r1 = std::min(a.rows, r0 + kern.mc);
        const int64_t bad = kern.strip(a, packed.data(), r0, r1, scratch.data());
        if (bad) nonfinite.fetch_add(bad, std::memory_order_relaxed);
    });
    return nonfinite.load();
}

}  // namespace pysoup
