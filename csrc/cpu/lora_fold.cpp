// The LoRA fold's threads: R packed once per call into nr-column panels (k x nr each, zero-padded past the last
// column), then the row strips (mc rows each) handed out one at a time to the threads. Every output element is
// computed by one strip, in the same order whatever the thread count, so neither the threads nor the call's row
// range change a bit.
#include "cpu/lora_fold.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <system_error>
#include <thread>
#include <vector>

#include "cpu/blocking.h"

namespace pysoup {
namespace {

const LoraFoldKernels& kernels(Isa isa) {
#if PYSOUP_X86
    static const LoraFoldKernels* const table[kIsaCount] = {&kLoraFoldScalar, &kLoraFoldAvx2, &kLoraFoldAvx512};
    return *table[static_cast<int>(isa)];
#else
    (void)isa;
    return kLoraFoldScalar;
#endif
}

// Threads of our own (std::thread, the caller one of them), not OpenMP's: the fold calls this once per block of
// rows, with Python, the writer thread's pwrite and the next window's mapping between and beside the calls, and
// libgomp's idle thread spin-waits through those gaps on the core the writer needs (as in geometric.cpp, whose
// pool_threads this follows; starting a thread costs ~50 us against the ~15 ms of a 16 MiB block). Items are handed
// out one at a time, so a thread the OS deschedules (2 cores shared with the writer) holds back only its current
// strip, not a static half of the block. The helpers are detached and the caller waits for the items, not for the
// threads: a helper the OS has not started yet when the caller has done every item (a loaded machine) is not waited
// for; it finds nothing left and ends, touching only the shared counters.
template <class F>
void on_threads(int threads, int64_t items, F&& fn) {
    struct Shared {
        std::atomic<int64_t> next{0}, done{0};
        std::mutex mutex;
        std::condition_variable all_done;
    };
    auto shared = std::make_shared<Shared>();
    auto* work_fn = &fn;  // dereferenced only for an item taken, while the caller still waits for it
    const auto work = [items, work_fn](Shared& sh) {
        for (int64_t i = sh.next.fetch_add(1); i < items; i = sh.next.fetch_add(1)) {
            (*work_fn)(i);
            if (sh.done.fetch_add(1) + 1 == items) {
                std::lock_guard<std::mutex> lock(sh.mutex);
                sh.all_done.notify_all();
            }
        }
    };
    for (int t = 1; t < threads && t < items; ++t) {
        try {
            std::thread([shared, work] { work(*shared); }).detach();
        } catch (const std::system_error&) {
            break;  // no thread to be had: the caller does the rest
        }
    }
    work(*shared);
    std::unique_lock<std::mutex> lock(shared->mutex);
    shared->all_done.wait(lock, [&] { return shared->done.load() == items; });
}

}  // namespace

int64_t lora_fold(const LoraFoldArgs& a, Isa isa, int threads) {
    const LoraFoldKernels& kern = kernels(isa);
    if (a.rows <= 0 || a.cols <= 0) return 0;
    const int64_t nr = kern.nr, k = a.k;
    const int64_t panels = (a.cols + nr - 1) / nr;
    std::vector<float> packed(size_t(panels * k * nr));
    for (int64_t j = 0; j < panels; ++j) {  // k x cols fp32 (<= a few MiB): one memory pass, not worth a thread
        float* dst = packed.data() + j * k * nr;
        const int64_t c0 = j * nr, n = std::min(nr, a.cols - c0);
        for (int64_t q = 0; q < k; ++q) {
            const float* src = a.right + q * a.cols + c0;
            std::copy(src, src + n, dst + q * nr);
            std::fill(dst + q * nr + n, dst + (q + 1) * nr, 0.0f);
        }
    }
    const int64_t strips = (a.rows + kern.mc - 1) / kern.mc;
    // Below ~2 blocks of work a second thread costs more to start than it saves (blocking.h).
    const int64_t work = a.rows * a.cols * std::max<int64_t>(k, 1) / 64;
    const int nt = threads_for(threads, std::min(strips, nblocks(work)));
    std::atomic<int64_t> nonfinite{0};
    on_threads(nt, strips, [&](int64_t s) {
        thread_local std::vector<float> scratch;
        scratch.resize(size_t(kern.scratch_floats(a.k)));
        const int64_t r0 = s * kern.mc, r1 = std::min(a.rows, r0 + kern.mc);
        const int64_t bad = kern.strip(a, packed.data(), r0, r1, scratch.data());
        if (bad) nonfinite.fetch_add(bad, std::memory_order_relaxed);
    });
    return nonfinite.load();
}

}  // namespace pysoup
