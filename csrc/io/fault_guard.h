// Turns a SIGBUS on one of our read-only file mappings into an error instead of a crash.
//
// A mapped page of a file that another process truncated (or that the disk cannot read) raises SIGBUS on
// access, in whichever thread touches it: an OpenMP worker in the middle of a kernel. There is no safe way
// to unwind from there, so the handler does what lets the kernel finish: it maps a page of zeros over the
// faulting page (MAP_FIXED), marks the mapping as faulted and returns; the load is retried and reads zeros.
// The reader checks the mark when it moves its window and before the merge commits, and fails the merge
// ("changed while being read"). A SIGBUS at any other address goes to the handler that was there before
// (the default action kills the process, as it would have without us). Normal reads cost nothing.
#pragma once

#include <cstdint>

namespace pysoup::fault_guard {

// Guards [begin, end), page-aligned begin; installs the handler if another one replaced it. Returns a slot
// to pass to the calls below, or -1 when every slot is taken (the range is then unguarded).
int guard(uintptr_t begin, uintptr_t end);
// Stops guarding the slot's range (before it is unmapped).
void release(int slot);
// Whether a page of the slot's range was replaced by zeros.
bool faulted(int slot);

}  // namespace pysoup::fault_guard
