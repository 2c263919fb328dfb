// The geometric ops' avx2 kernel set (compiled with -mavx2 -mfma -mf16c, CMakeLists.txt): geometric_impl.h instantiated
// with Avx2IO.
#include "cpu/geometric_impl.h"
#include "cpu/io_avx2.h"

namespace pysoup {

const GeometricKernels kGeometricAvx2{
    segment_moments_kernel<Avx2IO>,  segment_weighted_sum_kernel<Avx2IO>, nearswap_kernel<Avx2IO>,
    fusion_histogram_kernel<Avx2IO>, fusion_combine_kernel<Avx2IO>,       fusion_kl_kernel<Avx2IO>,
};

}  // namespace pysoup
