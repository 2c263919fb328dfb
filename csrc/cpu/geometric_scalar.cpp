// The geometric ops' scalar kernel set (no SIMD flags, CMakeLists.txt): geometric_impl.h instantiated with ScalarIO.
#include "cpu/geometric_impl.h"
#include "cpu/io_scalar.h"

namespace pysoup {

const GeometricKernels kGeometricScalar{
    segment_moments_kernel<ScalarIO>,  segment_weighted_sum_kernel<ScalarIO>, nearswap_kernel<ScalarIO>,
    fusion_histogram_kernel<ScalarIO>, fusion_combine_kernel<ScalarIO>,       fusion_kl_kernel<ScalarIO>,
};

}  // namespace pysoup
