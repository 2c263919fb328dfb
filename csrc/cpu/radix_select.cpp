// The magnitude histograms' threads (per-thread histograms only where each thread gets several blocks) and the
// search of a finished histogram.
#include "cpu/radix_select.h"

#include <algorithm>
#include <vector>

#include "cpu/blocking.h"
#include "cpu/thread_histograms.h"

namespace pysoup {

void magnitude_histogram(const TaskVectorArgs& a, int64_t n, Isa isa, int threads, int pass, const uint32_t* prefix,
                         uint64_t* hist) {
    const CpuKernels& kern = cpu_kernels(isa);
    const int64_t nb = nblocks(n);
    // Per-thread histograms cost k x 512 KiB to clear and merge: only worth it when each thread gets several
    // blocks. Below that, one thread counts straight into `hist` (300 small tensors: 0.8 s -> 0.1 s).
    if (nb < 4 || threads <= 1) {
        kern.magnitude_histogram(a, 0, n, pass, prefix, hist);
        return;
    }
    // Each thread counts its run of blocks in one call.
    threaded_histogram(nb, threads_for(threads, nb), size_t(a.k) * 65536, hist,
                       [&](int, int64_t first, int64_t last, uint64_t* h) {
                           kern.magnitude_histogram(a, first * kBlock, std::min(n, last * kBlock), pass, prefix, h);
                       });
}

RadixSelection radix_select(const uint64_t* hist, const std::vector<int64_t>& keep) {
    RadixSelection s{std::vector<uint32_t>(keep.size()), std::vector<int64_t>(keep.size()),
                     std::vector<int64_t>(keep.size()), std::vector<int64_t>(keep.size())};
    for (size_t i = 0; i < keep.size(); ++i) {
        const uint64_t* hi = hist + i * 65536;
        int64_t acc = 0;
        int bin = 65535;
        for (; bin > 0; --bin) {
            const int64_t count = int64_t(hi[bin] & kCountMask);
            if (acc + count >= keep[i]) break;
            acc += count;
        }
        s.bin[i] = uint32_t(bin);
        s.above[i] = acc;
        s.in_bin[i] = int64_t(hi[bin] & kCountMask);
        s.mixed[i] = int64_t(hi[bin] >> kMixedShift);
    }
    return s;
}

}  // namespace pysoup
