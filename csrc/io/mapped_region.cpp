#include "io/mapped_region.h"

#include "io/fault_guard.h"

#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <stdexcept>
#include <string>

namespace pysoup {

MappedRegion::MappedRegion(int fd, int64_t offset, int64_t length, bool populate) : offset_(offset), length_(length) {
    if (offset < 0 || length < 0) throw std::invalid_argument("negative offset or length");
    if (length == 0) return;  // an empty range needs no mapping; address() is never dereferenced
    static const int64_t page = sysconf(_SC_PAGESIZE);
    const int64_t start = offset - offset % page;
    lead_ = offset - start;
    map_length_ = lead_ + length;
    int flags = MAP_SHARED;
#ifdef MAP_POPULATE
    if (populate) flags |= MAP_POPULATE;
#endif
    void* p = mmap(nullptr, static_cast<size_t>(map_length_), PROT_READ, flags, fd, start);
    if (p == MAP_FAILED) throw std::runtime_error(std::string("mmap failed: ") + std::strerror(errno));
    base_ = p;
    // A file truncated under us must not kill the process (SIGBUS); see fault_guard.h.
    slot_ = fault_guard::guard(reinterpret_cast<uintptr_t>(p), reinterpret_cast<uintptr_t>(p) + map_length_);
    if (!populate) madvise(base_, static_cast<size_t>(map_length_), MADV_SEQUENTIAL);
}

MappedRegion::~MappedRegion() { close(); }

uintptr_t MappedRegion::address() const {
    if (length_ == 0) return 0;
    if (base_ == nullptr) throw std::runtime_error("mapping is closed");
    return reinterpret_cast<uintptr_t>(base_) + static_cast<uintptr_t>(lead_);
}

void MappedRegion::close() {
    if (base_ != nullptr) {
        faulted_ = faulted();
        fault_guard::release(slot_);
        slot_ = -1;
        munmap(base_, static_cast<size_t>(map_length_));
        base_ = nullptr;
    }
}

bool MappedRegion::faulted() const { return faulted_ || fault_guard::faulted(slot_); }

}  // namespace pysoup
