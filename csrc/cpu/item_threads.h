// Threads of our own for the ops that run between Python, the reader and the writer thread (Arcee Fusion's and the
// segment ops' passes, NearSwap, the LoRA fold's blocks): std::thread, the caller one of them, not OpenMP's, whose
// idle threads spin-wait through the gaps between calls on the core the writer needs (Arcee Fusion, 1 + base x 128
// MiB on 2 shared cores: 5.5 s, 4.9 CPU s against 2.7 s, 2.0 CPU s with OMP_WAIT_POLICY=passive; model_stock
// filter_wise: libgomp's spin loop 20% of the samples; a 1 GiB LoRA fold: 1.4 CPU s). Starting a thread costs ~50 us.
//
// Items are handed out one at a time, so a thread the OS deschedules (2 cores shared with the writer) holds back only
// its current item, not a static share; callers make no result depend on which thread takes which (outputs
// disjoint, per-thread sums added in a fixed order or counts added). The helpers are detached and the caller waits
// for the items, not for the threads: a helper the OS has not started yet when the caller has done every item (a
// loaded machine) is not waited for; it finds nothing left and ends, touching only the shared counters.
//
// Internal linkage, as dtype.h.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <system_error>
#include <thread>

namespace pysoup {
namespace {

// fn(i, t) for every item i in [0, items), t in [0, threads) the index of the thread running it (the caller's: 0).
template <class F>
void on_item_threads(int threads, int64_t items, F&& fn) {
    if (threads <= 1 || items <= 1) {
        for (int64_t i = 0; i < items; ++i) fn(i, 0);
        return;
    }
    struct Shared {
        std::atomic<int64_t> next{0}, done{0};
        std::mutex mutex;
        std::condition_variable all_done;
    };
    auto shared = std::make_shared<Shared>();
    auto* work_fn = &fn;  // dereferenced only for an item taken, while the caller still waits for it
    const auto work = [items, work_fn](Shared& sh, int t) {
        for (int64_t i = sh.next.fetch_add(1); i < items; i = sh.next.fetch_add(1)) {
            (*work_fn)(i, t);
            if (sh.done.fetch_add(1) + 1 == items) {
                std::lock_guard<std::mutex> lock(sh.mutex);
                sh.all_done.notify_all();
            }
        }
    };
    for (int t = 1; t < threads && t < items; ++t) {
        try {
            std::thread([shared, work, t] { work(*shared, t); }).detach();
        } catch (const std::system_error&) {
            break;  // no thread to be had: the caller does the rest
        }
    }
    work(*shared, 0);
    std::unique_lock<std::mutex> lock(shared->mutex);
    shared->all_done.wait(lock, [&] { return shared->done.load() == items; });
}

}  // namespace
}  // namespace pysoup
