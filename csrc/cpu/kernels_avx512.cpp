// The AVX-512 kernel set (this file is compiled with the AVX-512 flags): the ops written once over fp32 tiles,
// instantiated with Avx512IO so the compiler vectorises them for AVX-512, and the hand-written weighted_sum_avx512.
#include "cpu/io_avx512.h"
#include "cpu/isa.h"
#include "cpu/masked_sum_impl.h"
#include "cpu/moments_impl.h"
#include "cpu/radix_select_impl.h"
#include "cpu/sparsify_impl.h"
#include "cpu/task_vector_impl.h"
#include "cpu/weighted_sum.h"

namespace pysoup {

const CpuKernels kAvx512Kernels{
    weighted_sum_avx512,                   // weighted_sum_avx512.cpp
    task_vector_kernel<Avx512IO>,          // task_vector_impl.h
    count_ties_kernel<Avx512IO>,           // task_vector_impl.h
    magnitude_histogram_kernel<Avx512IO>,  // radix_select_impl.h
    masked_sum_kernel<Avx512IO>,           // masked_sum_impl.h
    sparse_scan_kernel<Avx512IO>,          // masked_sum_impl.h
    moments_kernel<Avx512IO>,              // moments_impl.h
    sparse_task_vector_kernel<Avx512IO>,  // sparsify_impl.h
    sparse_stats_kernel<Avx512IO>,        // sparsify_impl.h
    sparse_ties_kernel<Avx512IO>,         // sparsify_impl.h
    variance_histogram_kernel<Avx512IO>,  // sparsify_impl.h
    variance_select_stored_kernel,        // sparsify_impl.h
};

}  // namespace pysoup
