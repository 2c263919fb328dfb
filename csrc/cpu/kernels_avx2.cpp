// The AVX2 kernel set (this file is compiled with -mavx2 -mfma -mf16c): the ops written once over fp32 tiles,
// instantiated with Avx2IO so the compiler vectorises them for AVX2, and the hand-written weighted_sum_avx2.
#include "cpu/io_avx2.h"
#include "cpu/isa.h"
#include "cpu/masked_sum_impl.h"
#include "cpu/moments_impl.h"
#include "cpu/radix_select_impl.h"
#include "cpu/sparsify_impl.h"
#include "cpu/task_vector_impl.h"
#include "cpu/weighted_sum.h"

namespace pysoup {

const CpuKernels kAvx2Kernels{
    weighted_sum_avx2,                   // weighted_sum_avx2.cpp
    task_vector_kernel<Avx2IO>,          // task_vector_impl.h
    count_ties_kernel<Avx2IO>,           // task_vector_impl.h
    magnitude_histogram_kernel<Avx2IO>,  // radix_select_impl.h
    masked_sum_kernel<Avx2IO>,           // masked_sum_impl.h
    sparse_scan_kernel<Avx2IO>,          // masked_sum_impl.h
    moments_kernel<Avx2IO>,              // moments_impl.h
    sparse_task_vector_kernel<Avx2IO>,  // sparsify_impl.h
    sparse_stats_kernel<Avx2IO>,        // sparsify_impl.h
    sparse_ties_kernel<Avx2IO>,         // sparsify_impl.h
    variance_histogram_kernel<Avx2IO>,  // sparsify_impl.h
    variance_select_stored_kernel,      // sparsify_impl.h
};

}  // namespace pysoup
