// The geometric ops' avx512 kernel set (compiled with the AVX-512 flags, CMakeLists.txt): geometric_impl.h instantiated
// with Avx512IO.
#include "cpu/geometric_impl.h"
#include "cpu/io_avx512.h"

namespace pysoup {

const GeometricKernels kGeometricAvx512{
    segment_moments_kernel<Avx512IO>,  segment_weighted_sum_kernel<Avx512IO>, nearswap_kernel<Avx512IO>,
    fusion_histogram_kernel<Avx512IO>, fusion_combine_kernel<Avx512IO>,       fusion_kl_kernel<Avx512IO>,
};

}  // namespace pysoup
