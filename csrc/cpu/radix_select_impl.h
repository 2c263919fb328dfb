// The magnitude histograms of TIES' radix select per element range, over fp32 tiles.
//
// Included by every ISA's kernel set (kernels_<isa>.cpp) and instantiated there with that ISA's IO type (io_<isa>.h,
// tile loads and stores of the stored dtypes), so the compiler vectorises the fp32 arithmetic with that file's flags.
// Every fma is explicit (the build uses -ffp-contract=off), so all ISAs compute the same bits. Internal linkage, as
// in dtype.h.
#pragma once

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu/blocking.h"
#include "cpu/dtype.h"
#include "cpu/radix_select.h"

namespace pysoup {
namespace {

// What pass 0 adds to the counter of bits' high half: one, and one in the mixed count when the low half is not 0.
inline uint64_t high_count(uint32_t bits) { return 1 + (uint64_t((bits & 0xFFFFu) != 0) << kMixedShift); }

// Radix-select histograms of |tau_i|'s fp32 bits: pass 0 counts the high 16 bits; pass 1 counts the low 16 bits
// of the elements whose high bits equal prefix[i]. hist holds k x 65536 counters. Pass 0's counters also count, in
// their top bits, the elements whose low 16 bits are not zero (radix_select.h: kMixedShift), so a selection that
// lands on a low half of zero needs no pass 1.
// Pass 0 on long ranges (kSplitHistogramMin) counts into two interleaved histograms per model, added into `hist` at
// the end (1.2x the counting speed measured in isolation).
template <class IO>
void magnitude_histogram_kernel(const TaskVectorArgs& a, int64_t begin, int64_t end, int pass, const uint32_t* prefix,
                                uint64_t* hist) {
    std::vector<float> buf(size_t(kOpTile) * 2);
    std::vector<uint32_t> low(kOpTile + 16);  // + 16: a vector store of packed matches may run past the count
    float* base_tile = buf.data();
    float* t = base_tile + kOpTile;
    const bool split = pass == 0 && end - begin >= kSplitHistogramMin;
    // Kept per thread from call to call (cleared here): a fresh k x 512 KiB each call paid its page faults again.
    thread_local std::vector<uint64_t> halves;
    // A model listed again right after itself (Breadcrumbs' keep and skip selections of one model) is loaded once,
    // and in pass 0, where both count the same bins, counted once: its histogram is copied at the end.
    std::vector<uint8_t> again(size_t(a.k), 0);
    for (int i = 1; i < a.k; ++i)
        again[size_t(i)] = a.inputs[i] == a.inputs[i - 1] && a.in_dtypes[i] == a.in_dtypes[i - 1];
    if (split) {
        halves.resize(size_t(a.k) * 2 * 65536);
        for (int i = 0; i < a.k; ++i)
            if (!again[size_t(i)]) std::fill_n(halves.data() + size_t(i) * 2 * 65536, 2 * 65536, uint64_t(0));
    }
    for (int64_t t0 = begin; t0 < end; t0 += kOpTile) {
        const int64_t m = std::min(kOpTile, end - t0);
        IO::load(a.base, a.base_dtype, t0, m, base_tile);
        for (int i = 0; i < a.k; ++i) {
            if (again[size_t(i)] && pass == 0) continue;
            if (!again[size_t(i)]) IO::load(a.inputs[i], a.in_dtypes[i], t0, m, t);
            uint64_t* h = hist + size_t(i) * 65536;
            if (split) {
                uint64_t* even = halves.data() + size_t(i) * 2 * 65536;
                uint64_t* odd = even + 65536;
                int64_t j = 0;
                for (; j + 2 <= m; j += 2) {
                    const uint32_t u = abs_bits(t[j] - base_tile[j]), v = abs_bits(t[j + 1] - base_tile[j + 1]);
                    even[u >> 16] += high_count(u);
                    odd[v >> 16] += high_count(v);
                }
                if (j < m) {
                    const uint32_t u = abs_bits(t[j] - base_tile[j]);
                    even[u >> 16] += high_count(u);
                }
            } else if (pass == 0) {
                for (int64_t j = 0; j < m; ++j) {
                    const uint32_t u = abs_bits(t[j] - base_tile[j]);
                    h[u >> 16] += high_count(u);
                }
            } else {
                // Compact the matches without a branch, then count them: 2.5x faster than testing and counting
                // in one loop.
                const int64_t count = IO::select_low(t, base_tile, m, prefix[i], low.data());
                for (int64_t c = 0; c < count; ++c) ++h[low[size_t(c)]];
            }
        }
    }
    if (split) {
        for (int i = 0; i < a.k; ++i) {
            if (again[size_t(i)]) continue;
            const uint64_t* even = halves.data() + size_t(i) * 2 * 65536;
            uint64_t* h = hist + size_t(i) * 65536;
            for (int64_t b = 0; b < 65536; ++b) h[b] += even[b] + even[b + 65536];
        }
    }
    // Pass 0's histograms of a repeated model were equal before this range (the same counts every time, from
    // zero), so they are equal after it.
    if (pass == 0)
        for (int i = 1; i < a.k; ++i)
            if (again[size_t(i)])
                std::copy(hist + size_t(i - 1) * 65536, hist + size_t(i) * 65536, hist + size_t(i) * 65536);
}

}  // namespace
}  // namespace pysoup
