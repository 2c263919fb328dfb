// The TIES threshold on the GPU: radix-select histograms of |x_i - base|'s fp32 bits, fused (no temporaries: each
// input is read once in its own dtype, tau is formed in registers and binned), with the CPU's layout and meaning
// (csrc/cpu/radix_select_impl.h, magnitude_histogram_kernel) so the CPU's radix_select finishes the search and both
// devices pick the same threshold and tie quota. (The CPU's pass 0 also counts the values with a nonzero low half,
// which lets it skip pass 1; the GPU does not, and always counts pass 1.)
//
// Pass 0 bins the high 16 bits. A magnitude's sign bit is clear, so only 32768 of the 65536 bins can be hit:
// they fit one block's shared memory (128 KiB), and each block adds its non-zero bins to the global 64-bit
// counters once. Pass 1 bins the low 16 bits of the elements whose high bits equal the chosen prefix (a small
// fraction), straight into global memory. Both passes aggregate a warp's equal bins first (__match_any_sync):
// fine-tuned deltas of bf16 weights repeat a few bit patterns, and same-address atomics serialise.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "cuda/select.h"

namespace pysoup::cuda {
namespace {

constexpr int kThreads = 512;
constexpr int kHighBins = 32768;  // high 16 bits of a magnitude: the sign bit is zero

template <int DT>
__device__ __forceinline__ float load_f32(const void* p, int64_t i) {
    if constexpr (DT == 0) {
        return static_cast<const float*>(p)[i];
    } else if constexpr (DT == 1) {
        return __half2float(static_cast<const __half*>(p)[i]);
    } else {
        return __uint_as_float(uint32_t(static_cast<const uint16_t*>(p)[i]) << 16);
    }
}

// Adds 1 for every active lane to counter[bin], one atomic per distinct bin in the warp. Every lane of the warp
// must call it (the loops below keep whole warps iterating together).
template <class Counter>
__device__ __forceinline__ void add_aggregated(Counter* counter, uint32_t bin, bool active) {
    const unsigned voters = __ballot_sync(0xFFFFFFFFu, active);
    if (!active) return;
    const unsigned peers = __match_any_sync(voters, bin);
    if (int(threadIdx.x & 31) == __ffs(peers) - 1) atomicAdd(counter + bin, Counter(__popc(peers)));
}

template <int XT, int BT>
__global__ void __launch_bounds__(kThreads)
    high_histogram(const void* x, const void* base, int64_t n, unsigned long long* hist) {
    extern __shared__ unsigned int bins[];
    for (int b = threadIdx.x; b < kHighBins; b += blockDim.x) bins[b] = 0;
    __syncthreads();
    const int64_t stride = int64_t(gridDim.x) * blockDim.x;
    for (int64_t first = int64_t(blockIdx.x) * blockDim.x; first < n; first += stride) {  // uniform per block
        const int64_t i = first + threadIdx.x;
        uint32_t bin = 0;
        if (i < n) bin = (__float_as_uint(load_f32<XT>(x, i) - load_f32<BT>(base, i)) & 0x7FFFFFFFu) >> 16;
        add_aggregated(bins, bin, i < n);
    }
    __syncthreads();
    for (int b = threadIdx.x; b < kHighBins; b += blockDim.x) {
        if (bins[b]) atomicAdd(hist + b, (unsigned long long)bins[b]);
    }
}

template <int XT, int BT>
__global__ void __launch_bounds__(kThreads)
    low_histogram(const void* x, const void* base, int64_t n, uint32_t prefix, unsigned long long* hist) {
    const int64_t stride = int64_t(gridDim.x) * blockDim.x;
    for (int64_t first = int64_t(blockIdx.x) * blockDim.x; first < n; first += stride) {
        const int64_t i = first + threadIdx.x;
        uint32_t bits = 0;
        if (i < n) bits = __float_as_uint(load_f32<XT>(x, i) - load_f32<BT>(base, i)) & 0x7FFFFFFFu;
        add_aggregated(hist, bits & 0xFFFFu, i < n && (bits >> 16) == prefix);
    }
}

void check(cudaError_t err, const char* what) {
    if (err != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
}

// Blocks per launch: enough to fill the GPU, few enough that each block's flush of its shared-memory counters
// (pass 0) is small next to the elements it counted. A pass-0 block takes 128 KiB of shared memory: one per SM.
int grid_for(int64_t n, int pass) {
    static int sms = 0;  // asked once: pysoup drives one device per process
    if (sms == 0) {
        int device = 0;
        check(cudaGetDevice(&device), "cudaGetDevice");
        check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "device query");
    }
    const int64_t most = int64_t(sms) * (pass == 0 ? 1 : 4);
    const int64_t blocks = (n + kThreads - 1) / kThreads;
    return int(blocks < most ? blocks : most);
}

template <int XT, int BT>
void launch(const void* x, const void* base, int64_t n, int pass, uint32_t prefix, unsigned long long* hist,
            cudaStream_t stream, int grid) {
    if (pass == 0) {
        static bool configured = false;
        if (!configured) {
            check(cudaFuncSetAttribute(high_histogram<XT, BT>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       kHighBins * int(sizeof(unsigned int))),
                  "shared memory opt-in");
            configured = true;
        }
        high_histogram<XT, BT><<<grid, kThreads, kHighBins * sizeof(unsigned int), stream>>>(x, base, n, hist);
    } else {
        low_histogram<XT, BT><<<grid, kThreads, 0, stream>>>(x, base, n, prefix, hist);
    }
}

using Launcher = void (*)(const void*, const void*, int64_t, int, uint32_t, unsigned long long*, cudaStream_t, int);

Launcher pick(int xt, int bt) {
    static const Launcher table[3][3] = {
        {launch<0, 0>, launch<0, 1>, launch<0, 2>},
        {launch<1, 0>, launch<1, 1>, launch<1, 2>},
        {launch<2, 0>, launch<2, 1>, launch<2, 2>},
    };
    if (xt < 0 || xt > 2 || bt < 0 || bt > 2)
        throw std::invalid_argument("dtype code must be 0 (F32), 1 (F16), 2 (BF16)");
    return table[xt][bt];
}

}  // namespace

void magnitude_histogram(const HistogramArgs& a) {
    if (a.pass != 0 && a.pass != 1) throw std::invalid_argument("pass must be 0 or 1");
    if (a.n == 0) return;
    const int grid = grid_for(a.n, a.pass);
    auto stream = reinterpret_cast<cudaStream_t>(a.stream);
    for (int i = 0; i < a.k; ++i) {
        pick(a.in_dtypes[i], a.base_dtype)(a.inputs[i], a.base, a.n, a.pass, a.pass ? a.prefix[i] : 0,
                                           a.hist + size_t(i) * 65536, stream, grid);
    }
    check(cudaGetLastError(), "histogram launch");
}

}  // namespace pysoup::cuda
