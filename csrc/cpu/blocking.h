// How the CPU loops cut a range: into blocks for the threads, tiles for the cache, and how far ahead they prefetch.
// Threads get whole blocks in index order, so no result depends on the thread count.
#pragma once

#include <algorithm>
#include <cstdint>

namespace pysoup {

// Elements per block, the unit every threaded loop hands out: 64 Ki elements, since below ~2 blocks a second
// thread costs more to wake than it saves.
constexpr int64_t kBlock = int64_t(1) << 16;

// Elements per accumulator tile of the weighted sum: 1024 floats (4 KiB) stay in L1 while k inputs stream
// through them.
constexpr int64_t kTile = 1024;

// Elements per fp32 tile of the ops written once for every ISA (task vectors, histograms, masked sums, sparse
// scans): each input's tile is converted to fp32 in one pass, then the arithmetic runs over the tiles.
constexpr int64_t kOpTile = 512;

// How far ahead (elements) the streaming loops prefetch each input: with 4 bf16 inputs on 2 cores the hardware
// prefetcher alone reached 23-25 GB/s, software prefetch 29-34 GB/s (256 to 2048 all within noise; 1024 chosen).
constexpr int64_t kPrefetch = 1024;

// The shortest range whose histogram pass counts into two interleaved histograms (TIES' magnitudes, SCE's
// variances), added at the end: neighbouring elements often fall in one bin, and one histogram makes each increment
// wait for the previous one's store. Shorter ranges count straight into theirs: the extra histograms cost 2 x 512
// KiB to clear and add.
constexpr int64_t kSplitHistogramMin = int64_t(1) << 18;

namespace {

inline int64_t nblocks(int64_t n) { return (n + kBlock - 1) / kBlock; }

// The end of block b of a range of n elements.
inline int64_t block_end(int64_t b, int64_t n) { return std::min(n, (b + 1) * kBlock); }

// No more threads than blocks, and at least one.
inline int threads_for(int threads, int64_t blocks) {
    return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, blocks)));
}

}  // namespace
}  // namespace pysoup
