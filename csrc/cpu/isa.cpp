// What this CPU can run (detected once), the table of per-ISA kernel sets, and the ISA names.
#include "cpu/isa.h"

#include <stdexcept>

#if PYSOUP_X86
#include <cpuid.h>
#endif

namespace pysoup {
namespace {

// How many of the table's ISAs this CPU and OS can run (they form a prefix: see Isa).
int detect_usable_count() {
#if PYSOUP_X86
    // CPUID says what the core has; XGETBV says whether the OS saves the wider registers.
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return 1;
    const bool fma = c & (1u << 12), osxsave = c & (1u << 27), f16c = c & (1u << 29);
    if (!osxsave) return 1;
    unsigned xcr0_lo, xcr0_hi;
    __asm__("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
    const bool os_avx = (xcr0_lo & 0x6u) == 0x6u;
    const bool os_avx512 = (xcr0_lo & 0xE6u) == 0xE6u;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return 1;
    const bool avx2 = b & (1u << 5);
    const bool avx512f = b & (1u << 16), avx512dq = b & (1u << 17), avx512bw = b & (1u << 30),
               avx512vl = b & (1u << 31);
    if (!(os_avx && avx2 && fma && f16c)) return 1;
    if (!(os_avx512 && avx512f && avx512dq && avx512bw && avx512vl)) return 2;
    return 3;
#else
    return 1;
#endif
}

int usable_count() {
    static const int count = detect_usable_count();
    return count;
}

// Indexed by Isa. Only usable entries are ever read, so the x86 ones may be absent elsewhere.
#if PYSOUP_X86
const CpuKernels* const kKernelTable[kIsaCount] = {&kScalarKernels, &kAvx2Kernels, &kAvx512Kernels};
#else
const CpuKernels* const kKernelTable[kIsaCount] = {&kScalarKernels, nullptr, nullptr};
#endif

}  // namespace

bool isa_usable(int code) { return code >= 0 && code < usable_count(); }

std::vector<std::string> usable_isas() { return std::vector<std::string>(kIsaNames, kIsaNames + usable_count()); }

int isa_code(const std::string& name) {
    for (int code = 0; code < usable_count(); ++code)
        if (name == kIsaNames[code]) return code;
    std::string usable;
    for (const std::string& isa : usable_isas()) usable += (usable.empty() ? "" : ", ") + isa;
    throw std::invalid_argument("CPU ISA '" + name + "' cannot run here (usable: " + usable + ")");
}

const CpuKernels& cpu_kernels(Isa isa) { return *kKernelTable[static_cast<int>(isa)]; }

}  // namespace pysoup
