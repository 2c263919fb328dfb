// The scalar kernel set: plain C++, no SIMD flags; the definition every other ISA's set must reproduce. The ops
// written once over fp32 tiles are instantiated here with ScalarIO.
#include "cpu/io_scalar.h"
#include "cpu/isa.h"
#include "cpu/masked_sum_impl.h"
#include "cpu/moments_impl.h"
#include "cpu/radix_select_impl.h"
#include "cpu/sparsify_impl.h"
#include "cpu/task_vector_impl.h"
#include "cpu/weighted_sum.h"

namespace pysoup {

const CpuKernels kScalarKernels{
    weighted_sum_scalar,                   // weighted_sum_scalar.cpp
    task_vector_kernel<ScalarIO>,          // task_vector_impl.h
    count_ties_kernel<ScalarIO>,           // task_vector_impl.h
    magnitude_histogram_kernel<ScalarIO>,  // radix_select_impl.h
    masked_sum_kernel<ScalarIO>,           // masked_sum_impl.h
    sparse_scan_kernel<ScalarIO>,          // masked_sum_impl.h
    moments_kernel<ScalarIO>,              // moments_impl.h
    sparse_task_vector_kernel<ScalarIO>,  // sparsify_impl.h
    sparse_stats_kernel<ScalarIO>,        // sparsify_impl.h
    sparse_ties_kernel<ScalarIO>,         // sparsify_impl.h
    variance_histogram_kernel<ScalarIO>,  // sparsify_impl.h
    variance_select_stored_kernel,        // sparsify_impl.h
};

}  // namespace pysoup
