// The CPU ISAs: their codes and names, which of them this CPU can run, and the one table of per-ISA kernel sets.
// Python resolves an ISA name to its code once (pysoup._C.isa_code); the bindings check the code and the threaded
// loops look their kernels up by it.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace pysoup {

struct WeightedSumArgs;
struct TaskVectorArgs;
struct MaskedSumArgs;
struct MomentsArgs;
struct SparseArgs;

// The codes Python passes. Each ISA needs the ones before it, so the usable ISAs are a prefix of this list.
enum class Isa : int { scalar = 0, avx2 = 1, avx512 = 2 };
constexpr int kIsaCount = 3;
constexpr const char* kIsaNames[kIsaCount] = {"scalar", "avx2", "avx512"};

// One ISA's kernels, each over the element range [begin, end) of its arguments' pointers; the header named beside
// each says what it computes. The threaded loops (the ops' .cpp files) cut a range into blocks and call these.
struct CpuKernels {
    int64_t (*weighted_sum)(const WeightedSumArgs&, int64_t begin, int64_t end);  // weighted_sum.h
    int64_t (*task_vector)(const TaskVectorArgs&, int64_t begin, int64_t end);   // task_vector.h
    void (*count_ties)(const TaskVectorArgs&, int64_t begin, int64_t end, int64_t* counts);
    void (*magnitude_histogram)(const TaskVectorArgs&, int64_t begin, int64_t end, int pass,  // radix_select.h
                                const uint32_t* prefix, uint64_t* hist);
    int64_t (*masked_sum)(const MaskedSumArgs&, int64_t begin, int64_t end);  // masked_sum.h
    int64_t (*sparse_scan)(const MaskedSumArgs&, int64_t begin, int64_t end, int64_t* zeros);
    void (*moments)(const MomentsArgs&, int64_t block_begin, int64_t end, double* block_out);  // moments.h
    int64_t (*sparse_task_vector)(const SparseArgs&, int64_t begin, int64_t end);  // sparsify.h
    void (*sparse_stats)(const SparseArgs&, int64_t block_begin, int64_t end, double* block_out);
    void (*sparse_ties)(const SparseArgs&, int64_t begin, int64_t end, int64_t* counts);
    int64_t (*variance_histogram)(const SparseArgs&, int64_t begin, int64_t end, int pass, uint32_t prefix,
                                  uint64_t* hist);
    int64_t (*variance_select_stored)(const SparseArgs&, int64_t begin, int64_t end, uint32_t prefix, uint64_t* hist);
};

// Each ISA's set, defined in kernels_<isa>.cpp (compiled with that ISA's flags).
extern const CpuKernels kScalarKernels;
#if PYSOUP_X86
extern const CpuKernels kAvx2Kernels;
extern const CpuKernels kAvx512Kernels;
#endif

// Whether this CPU and OS can run the ISA with this code; false for codes outside the table.
bool isa_usable(int code);

// The names of the ISAs this CPU can run, "scalar" first.
std::vector<std::string> usable_isas();

// The code of the usable ISA called `name`; std::invalid_argument naming the usable ISAs otherwise.
int isa_code(const std::string& name);

// The kernel set of a usable ISA.
const CpuKernels& cpu_kernels(Isa isa);

}  // namespace pysoup
