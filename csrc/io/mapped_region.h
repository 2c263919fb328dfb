// A read-only memory mapping of a byte range of a file, released as soon as the engine moves past it,
// so resident memory stays bounded by the window size rather than the model size.
#pragma once

#include <cstdint>

namespace pysoup {

class MappedRegion {
public:
    // Maps [offset, offset + length) of `fd`. `populate` pre-faults the pages in one system call
    // (MAP_POPULATE) instead of one page fault per 4 KiB touched.
    MappedRegion(int fd, int64_t offset, int64_t length, bool populate);
    ~MappedRegion();
    MappedRegion(const MappedRegion&) = delete;
    MappedRegion& operator=(const MappedRegion&) = delete;

    uintptr_t address() const;  // address of byte `offset` of the file
    int64_t offset() const { return offset_; }
    int64_t length() const { return length_; }
    bool closed() const { return base_ == nullptr; }
    void close();
    // Whether a page vanished under a read (the file shrank, or the disk failed): that page read as zeros.
    bool faulted() const;

private:
    void* base_ = nullptr;  // page-aligned start of the mapping
    int64_t map_length_ = 0;
    int64_t lead_ = 0;  // bytes between base_ and the requested offset
    int64_t offset_ = 0;
    int64_t length_ = 0;
    int slot_ = -1;  // fault_guard slot
    bool faulted_ = false;
};

}  // namespace pysoup
