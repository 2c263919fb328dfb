// Threaded counting into one histogram (the radix selections' magnitude and variance histograms): each thread
// counts a contiguous run of blocks into a histogram of its own, and the runs' histograms are added at the end.
#pragma once

#include <omp.h>

#include <cstddef>
#include <cstdint>
#include <vector>

namespace pysoup {

// n zeroed counters for the other threads' histograms, kept by the calling thread from call to call (one buffer for
// every caller: the counting calls do not nest): fresh ones paid their page faults on every call.
inline uint64_t* histogram_scratch(size_t n) {
    thread_local std::vector<uint64_t> scratch;
    scratch.assign(n, 0);
    return scratch.data();
}

namespace {

// nb blocks counted on nt threads into hist (`bins` counters): thread t of n counts the run [nb t / n,
// nb (t + 1) / n) (what schedule(static) would hand it, so a kernel's per-call set-up is paid once per thread) by
// count(t, first, last, h), thread 0 straight into hist, the others into histograms added into hist at the end.
template <class Count>
void threaded_histogram(int64_t nb, int nt, size_t bins, uint64_t* hist, Count count) {
    uint64_t* others = histogram_scratch(size_t(nt - 1) * bins);
#pragma omp parallel num_threads(nt)
    {
        const int t = omp_get_thread_num(), n = omp_get_num_threads();
        const int64_t first = nb * t / n, last = nb * (t + 1) / n;
        if (first < last) count(t, first, last, t == 0 ? hist : others + size_t(t - 1) * bins);
    }
    for (int t = 1; t < nt; ++t) {
        const uint64_t* h = others + size_t(t - 1) * bins;
        for (size_t i = 0; i < bins; ++i) hist[i] += h[i];
    }
}

}  // namespace
}  // namespace pysoup
