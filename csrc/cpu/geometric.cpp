// The geometric ops' threads. Row statistics: threads take ranges cut at row starts, so every row is summed by one
// thread in element order. Column statistics: threads take column ranges and walk every row of the range in order.
// The element-wise ops: one kernel call per block. Every op runs on threads of its own, items handed out one at a
// time (item_threads.h).
#include "cpu/geometric.h"

#include <algorithm>
#include <vector>

#include "cpu/blocking.h"
#include "cpu/item_threads.h"

namespace pysoup {
namespace {

const GeometricKernels& kernels(Isa isa) {
#if PYSOUP_X86
    static const GeometricKernels* const table[kIsaCount] = {&kGeometricScalar, &kGeometricAvx2, &kGeometricAvx512};
    return *table[static_cast<int>(isa)];
#else
    (void)isa;
    return kGeometricScalar;
#endif
}

}  // namespace

void segment_moments(const SegmentArgs& a, int64_t n, Isa isa, int threads, double* acc, int64_t vectors) {
    const GeometricKernels& kern = kernels(isa);
    if (n <= 0) return;
    if (a.columns) {
        // Each thread owns a range of columns (>= 1024, so threads do not share cache lines of acc).
        const int64_t cols = std::min<int64_t>(a.length, vectors);
        const int64_t per = std::max<int64_t>(1024, (cols + threads - 1) / threads);
        const int64_t parts = (cols + per - 1) / per;
        on_item_threads(threads_for(threads, parts), parts, [&](int64_t p, int) {
            kern.segment_moments(a, 0, n, p * per, std::min(cols, (p + 1) * per), acc);
        });
        return;
    }
    // Blocks of about kBlock elements whose inner boundaries are row starts.
    const int64_t nb = nblocks(n);
    auto cut = [&](int64_t b) -> int64_t {
        if (b <= 0) return 0;
        if (b >= nb) return n;
        const int64_t e = a.start + b * kBlock;                      // tensor index of the nominal boundary
        const int64_t row_start = (e + a.length - 1) / a.length * a.length;  // the next row start at or after it
        return std::min(n, row_start - a.start);
    };
    on_item_threads(threads_for(threads, nb), nb, [&](int64_t b, int) {
        const int64_t lo = cut(b), hi = cut(b + 1);
        if (lo < hi) kern.segment_moments(a, lo, hi, 0, 0, acc);
    });
}

int64_t segment_weighted_sum(const SegmentArgs& a, int64_t n, const float* coefficients, int64_t vectors, void* out,
                             int out_dtype, Isa isa, int threads) {
    const GeometricKernels& kern = kernels(isa);
    const int64_t nb = nblocks(n);
    const int nt = threads_for(threads, nb);
    std::vector<int64_t> nonfinite(nt, 0);
    on_item_threads(nt, nb, [&](int64_t b, int t) {
        nonfinite[t] +=
            kern.segment_weighted_sum(a, b * kBlock, block_end(b, n), coefficients, vectors, out, out_dtype);
    });
    int64_t total = 0;
    for (int64_t c : nonfinite) total += c;
    return total;
}

int64_t nearswap(const void* const* inputs, const int* in_dtypes, float t, int64_t n, void* out, int out_dtype, Isa isa,
                 int threads) {
    const GeometricKernels& kern = kernels(isa);
    const int64_t nb = nblocks(n);
    const int nt = threads_for(threads, nb);
    std::vector<int64_t> nonfinite(nt, 0);
    on_item_threads(nt, nb, [&](int64_t b, int th) {
        nonfinite[th] += kern.nearswap(inputs, in_dtypes, t, b * kBlock, block_end(b, n), out, out_dtype);
    });
    int64_t total = 0;
    for (int64_t c : nonfinite) total += c;
    return total;
}

void fusion_histogram(const FusionArgs& a, int pass, int64_t n, uint64_t* hist, Isa isa, int threads) {
    const GeometricKernels& kern = kernels(isa);
    const int64_t nb = nblocks(n);
    const int nt = threads_for(threads, nb);
    if (pass != 0) {  // pass 1 counts few elements, atomically, into `hist`
        on_item_threads(nt, nb,
                        [&](int64_t b, int) { kern.fusion_histogram(a, pass, b * kBlock, block_end(b, n), hist); });
        return;
    }
    // Pass 0 counts every element: each thread into a histogram of its own, added to `hist` at the end.
    std::vector<std::vector<uint64_t>> local(nt);
    on_item_threads(nt, nb, [&](int64_t b, int t) {
        uint64_t* h = hist;
        if (nt > 1) {
            if (local[t].empty()) local[t].assign(65536, 0);
            h = local[t].data();
        }
        kern.fusion_histogram(a, 0, b * kBlock, block_end(b, n), h);
    });
    for (const std::vector<uint64_t>& l : local)
        for (size_t h = 0; h < l.size(); ++h) hist[h] += l[h];
}

int64_t fusion_combine(const FusionArgs& a, float threshold, int64_t n, void* out, int out_dtype, Isa isa,
                       int threads) {
    const GeometricKernels& kern = kernels(isa);
    const int64_t nb = nblocks(n);
    const int nt = threads_for(threads, nb);
    std::vector<int64_t> nonfinite(nt, 0);
    on_item_threads(nt, nb, [&](int64_t b, int t) {
        nonfinite[t] += kern.fusion_combine(a, threshold, b * kBlock, block_end(b, n), out, out_dtype);
    });
    int64_t total = 0;
    for (int64_t c : nonfinite) total += c;
    return total;
}

void fusion_kl(const void* const* inputs, const int* in_dtypes, int64_t row, int64_t rows, float* kl, uint64_t* hist,
               Isa isa, int threads) {
    const GeometricKernels& kern = kernels(isa);
    if (rows <= 0 || row <= 0) return;
    // Parts of about kBlock elements (at least one row); a row's sums never leave its thread.
    const int64_t per = std::max<int64_t>(1, kBlock / row);
    const int64_t parts = (rows + per - 1) / per;
    const int nt = threads_for(threads, parts);
    // Counts: each thread into histograms of its own (two, see the kernel), added to `hist` at the end.
    std::vector<std::vector<uint64_t>> local(hist ? nt : 0);
    on_item_threads(nt, parts, [&](int64_t q, int t) {
        uint64_t* h = nullptr;
        if (hist) {
            if (local[t].empty()) local[t].assign(2 * 65536, 0);
            h = local[t].data();
        }
        kern.fusion_kl(inputs, in_dtypes, row, q * per, std::min(rows, (q + 1) * per), kl, h);
    });
    for (const std::vector<uint64_t>& l : local)
        for (size_t h = 0; h < l.size(); ++h) hist[h & 65535] += l[h];
}

}  // namespace pysoup
