// Picks the kernel for an ISA and spreads the element range over OpenMP threads.
#include <omp.h>

#include <algorithm>
#include <stdexcept>
#include <vector>

#include "cpu/kernels.h"

#if PYSOUP_X86
#include <cpuid.h>
#endif

namespace pysoup {
namespace {

#if PYSOUP_X86
struct X86Features {
    bool avx2 = false;
    bool avx512 = false;
};

// CPUID says what the core has; XGETBV says whether the OS saves the wider registers.
X86Features detect_x86() {
    X86Features f;
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
    const bool fma = c & (1u << 12), osxsave = c & (1u << 27), f16c = c & (1u << 29);
    if (!osxsave) return f;
    unsigned xcr0_lo, xcr0_hi;
    __asm__("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
    const bool os_avx = (xcr0_lo & 0x6u) == 0x6u;
    const bool os_avx512 = (xcr0_lo & 0xE6u) == 0xE6u;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return f;
    const bool avx2 = b & (1u << 5);
    const bool avx512f = b & (1u << 16), avx512dq = b & (1u << 17), avx512bw = b & (1u << 30),
               avx512vl = b & (1u << 31);
    f.avx2 = os_avx && avx2 && fma && f16c;
    f.avx512 = f.avx2 && os_avx512 && avx512f && avx512dq && avx512bw && avx512vl;
    return f;
}
#endif

// 64 Ki elements per block: below ~2 blocks a second thread costs more to wake than it saves.
constexpr int64_t kGrain = int64_t(1) << 16;

WeightedSumFn kernel_for(const std::string& isa) {
    if (isa == "scalar") return weighted_sum_scalar;
#if PYSOUP_X86
    if (isa == "avx2") return weighted_sum_avx2;
    if (isa == "avx512") return weighted_sum_avx512;
#endif
    throw std::invalid_argument("unknown CPU ISA '" + isa + "'");
}

}  // namespace

std::vector<std::string> usable_isas() {
    std::vector<std::string> isas{"scalar"};
#if PYSOUP_X86
    static const X86Features f = detect_x86();
    if (f.avx2) isas.push_back("avx2");
    if (f.avx512) isas.push_back("avx512");
#endif
    return isas;
}

bool isa_usable(const std::string& isa) {
    const auto isas = usable_isas();
    return std::find(isas.begin(), isas.end(), isa) != isas.end();
}

float fp32_sum_in_order(const float* weights, int k) {
    float s = 0.0f;
    for (int i = 0; i < k; ++i) s += weights[i];
    return s;
}

int64_t weighted_sum(const WeightedSumArgs& args, int64_t n, const std::string& isa, int threads) {
    const WeightedSumFn fn = kernel_for(isa);
    if (threads <= 1 || n < 2 * kGrain) return fn(args, 0, n);
    const int64_t blocks = (n + kGrain - 1) / kGrain;
    const int nthreads = static_cast<int>(std::min<int64_t>(threads, blocks));
    int64_t nonfinite = 0;
    // schedule(static) hands each thread one contiguous run of blocks: each thread streams its own range.
#pragma omp parallel for num_threads(nthreads) schedule(static) reduction(+ : nonfinite)
    for (int64_t b = 0; b < blocks; ++b) nonfinite += fn(args, b * kGrain, std::min(n, (b + 1) * kGrain));
    return nonfinite;
}

int64_t weighted_sum_many(const WeightedSumArgs& shared, const void* const* inputs, void* const* outs,
                          const int64_t* sizes, int64_t m, const std::string& isa, int threads, int64_t* counts) {
    const WeightedSumFn fn = kernel_for(isa);
    std::vector<int64_t> first(m + 1, 0);  // first[t]: where tensor t starts in the concatenation of all
    for (int64_t t = 0; t < m; ++t) first[t + 1] = first[t] + sizes[t];
    const int64_t total = first[m];
    if (counts) std::fill(counts, counts + m, 0);
    // Tensor t's slice [begin, end) of the concatenation, through the kernel with its own pointers.
    auto run = [&](int64_t t, int64_t begin, int64_t end) {
        WeightedSumArgs a = shared;
        a.inputs = inputs + t * shared.k;
        a.out = outs[t];
        const int64_t c = fn(a, begin, end);
        if (c && counts) {
#pragma omp atomic
            counts[t] += c;
        }
        return c;
    };
    int64_t nonfinite = 0;
    if (threads <= 1 || total < 2 * kGrain) {
        for (int64_t t = 0; t < m; ++t) nonfinite += run(t, 0, sizes[t]);
        return nonfinite;
    }
    const int nthreads = static_cast<int>(std::min<int64_t>(threads, total / kGrain));
    // Each thread takes one contiguous, equal share of the concatenated elements: hundreds of small tensors
    // and a few large ones balance alike, and each thread streams its own range.
#pragma omp parallel num_threads(nthreads) reduction(+ : nonfinite)
    {
        const int64_t id = omp_get_thread_num(), count = omp_get_num_threads();
        const int64_t lo = total * id / count, hi = total * (id + 1) / count;
        int64_t t = std::upper_bound(first.begin(), first.end(), lo) - first.begin() - 1;
        for (; t < m && first[t] < hi; ++t) {
            const int64_t begin = std::max(lo, first[t]) - first[t], end = std::min(hi, first[t + 1]) - first[t];
            if (begin < end) nonfinite += run(t, begin, end);
        }
    }
    return nonfinite;
}

}  // namespace pysoup
