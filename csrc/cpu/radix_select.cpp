// The magnitude histograms' threads (per-thread histograms only where each thread gets several blocks) and the
// search of a finished histogram.
#include "cpu/radix_select.h"

#include <omp.h>

#include <algorithm>
#include <vector>

#include "cpu/blocking.h"

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
    const int nt = threads_for(threads, nb);
    const size_t bins = size_t(a.k) * 65536;
    // The other threads' histograms, kept by the calling thread from call to call (cleared here): fresh ones paid
    // their page faults on every call.
    thread_local std::vector<uint64_t> scratch;
    scratch.resize(size_t(nt - 1) * bins);
    std::fill(scratch.begin(), scratch.end(), uint64_t(0));
    uint64_t* others = scratch.data();  // not `scratch` inside the region: each thread would name its own
    // Each thread counts one contiguous run of blocks in one call (what schedule(static) would hand it), so the
    // kernel's per-call set-up is paid once per thread.
#pragma omp parallel num_threads(nt)
    {
        const int t = omp_get_thread_num(), count = omp_get_num_threads();
        const int64_t first = nb * t / count, last = nb * (t + 1) / count;
        if (first < last)
            kern.magnitude_histogram(a, first * kBlock, std::min(n, last * kBlock), pass, prefix,
                                     t == 0 ? hist : others + size_t(t - 1) * bins);
    }
    for (int t = 1; t < nt; ++t) {
        const uint64_t* h = others + size_t(t - 1) * bins;
        for (size_t i = 0; i < bins; ++i) hist[i] += h[i];
    }
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
