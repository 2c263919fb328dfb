// TIES' magnitude threshold by radix select over the fp32 bits of |tau_i| = |x_i - base|, in two passes over the
// data: magnitude_histogram counts the high 16 bits (pass 0), then the low 16 bits of the elements in the chosen
// high bin (pass 1); radix_select finds, in each pass's histogram, the bin that holds the keep-th largest. The
// counting is written once in radix_select_impl.h and compiled per ISA; the threads and the search are in
// radix_select.cpp. (csrc/cuda/select.cu counts the same histograms on the GPU.)
#pragma once

#include <cstdint>
#include <vector>

#include "cpu/isa.h"
#include "cpu/task_vector.h"

namespace pysoup {

// Per ISA (CpuKernels::magnitude_histogram): adds the counts of [begin, end) to hist, k x 65536 counters. Reads
// only the inputs and the base of TaskVectorArgs. prefix[i] (pass 1 only) is model i's chosen high 16 bits.

// Threaded; adds the counts of [0, n) to hist.
void magnitude_histogram(const TaskVectorArgs& a, int64_t n, Isa isa, int threads, int pass, const uint32_t* prefix,
                         uint64_t* hist);

// A magnitude histogram's pass-0 counter: the count in its low kMixedShift bits, and above them how many of those
// elements have a nonzero low half (modulo 2^(64 - kMixedShift): exact while the bin holds fewer elements). The
// variance histograms count without the top bits. Carries out of the top bits are lost, never into the count.
constexpr int kMixedShift = 40;
constexpr uint64_t kCountMask = (uint64_t(1) << kMixedShift) - 1;

// For each model i, searching its 65536 bins from the top for the keep[i]-th largest candidate.
struct RadixSelection {
    std::vector<uint32_t> bin;    // the bin that holds it (0 when fewer than keep[i] candidates)
    std::vector<int64_t> above;   // how many candidates lie in higher bins
    std::vector<int64_t> in_bin;  // how many lie in that bin
    std::vector<int64_t> mixed;   // the bin's mixed count (pass 0 of the magnitude histograms; else 0)
};

RadixSelection radix_select(const uint64_t* hist, const std::vector<int64_t>& keep);

}  // namespace pysoup
