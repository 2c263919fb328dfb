#include "io/fault_guard.h"

#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <mutex>

namespace pysoup::fault_guard {
namespace {

// One slot per live window: a merge keeps one window per input checkpoint, so 1024 is far above any use.
constexpr int kSlots = 1024;

struct Slot {
    std::atomic<uintptr_t> begin{0};
    std::atomic<uintptr_t> end{0};  // 0: free
    std::atomic<int> faulted{0};
};

Slot g_slots[kSlots];
std::atomic<int> g_high{0};  // slots at or above this were never used: the handler scans below it only
std::mutex g_mutex;          // guards slot allocation and installation (never taken by the handler)
struct sigaction g_previous;  // the handler we replaced, for SIGBUS that is not ours
volatile sig_atomic_t g_chaining = 0;

void die_by_default_action(int sig) {
    struct sigaction dfl = {};
    dfl.sa_handler = SIG_DFL;
    sigemptyset(&dfl.sa_mask);
    sigaction(sig, &dfl, nullptr);
    raise(sig);  // delivered at once (SA_NODEFER): the process ends as it would have without us
}

void on_sigbus(int sig, siginfo_t* info, void* context) {
    const uintptr_t addr = reinterpret_cast<uintptr_t>(info->si_addr);
    // si_code <= 0: sent by kill() or sigqueue(), not raised by a memory access; si_addr means nothing then.
    const int high = info->si_code > 0 ? g_high.load(std::memory_order_acquire) : 0;
    for (int i = 0; i < high; ++i) {
        Slot& s = g_slots[i];
        const uintptr_t end = s.end.load(std::memory_order_acquire);
        if (end == 0 || addr < s.begin.load(std::memory_order_acquire) || addr >= end) continue;
        static const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
        void* zero = mmap(reinterpret_cast<void*>(addr & ~(page - 1)), page, PROT_READ,
                          MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
        if (zero == MAP_FAILED) break;
        s.faulted.store(1, std::memory_order_release);
        return;
    }
    // Not ours. A chain that comes back here (a handler that calls the one it replaced, which is us) ends
    // in the default action rather than a loop.
    if (g_chaining) return die_by_default_action(sig);
    g_chaining = 1;
    if (g_previous.sa_flags & SA_SIGINFO) {
        g_previous.sa_sigaction(sig, info, context);
    } else if (g_previous.sa_handler != SIG_DFL && g_previous.sa_handler != SIG_IGN) {
        g_previous.sa_handler(sig);
    } else {
        die_by_default_action(sig);  // SIG_IGN too: ignoring a fault would spin forever
    }
    g_chaining = 0;
}

void install_locked() {
    struct sigaction current;
    if (sigaction(SIGBUS, nullptr, &current) != 0) return;
    if ((current.sa_flags & SA_SIGINFO) && current.sa_sigaction == on_sigbus) return;
    // Someone installed a handler after us (Python's faulthandler, a debugger): keep it as the one to chain to.
    struct sigaction ours = {};
    ours.sa_sigaction = on_sigbus;
    ours.sa_flags = SA_SIGINFO | SA_NODEFER | SA_ONSTACK;
    sigemptyset(&ours.sa_mask);
    g_previous = current;
    sigaction(SIGBUS, &ours, nullptr);
}

}  // namespace

int guard(uintptr_t begin, uintptr_t end) {
    std::lock_guard<std::mutex> lock(g_mutex);
    install_locked();
    for (int i = 0; i < kSlots; ++i) {
        Slot& s = g_slots[i];
        if (s.end.load(std::memory_order_relaxed) != 0) continue;
        s.faulted.store(0, std::memory_order_relaxed);
        s.begin.store(begin, std::memory_order_release);
        s.end.store(end, std::memory_order_release);
        if (i >= g_high.load(std::memory_order_relaxed)) g_high.store(i + 1, std::memory_order_release);
        return i;
    }
    return -1;
}

void release(int slot) {
    if (slot < 0) return;
    g_slots[slot].end.store(0, std::memory_order_release);
}

bool faulted(int slot) { return slot >= 0 && g_slots[slot].faulted.load(std::memory_order_acquire) != 0; }

}  // namespace pysoup::fault_guard
