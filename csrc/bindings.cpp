// pysoup._C: argument checks and conversions, GIL release, nothing else; the ops live in csrc/cpu and csrc/io.
// Pointers arrive as integers (tensor.data_ptr(), ndarray.ctypes.data, MappedRegion.address), so this module never
// sees torch or numpy.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <stdexcept>
#include <string>
#include <variant>
#include <vector>

#include "cpu/blocking.h"
#include "cpu/dtype.h"
#include "cpu/geometric.h"
#include "cpu/isa.h"
#include "cpu/lora_fold.h"
#include "cpu/masked_sum.h"
#include "cpu/moments.h"
#include "cpu/philox.h"
#include "cpu/radix_select.h"
#include "cpu/sparsify.h"
#include "cpu/task_vector.h"
#include "cpu/weighted_sum.h"
#include "io/mapped_region.h"
#include "io/table_bindings.h"
#include "io/tensor_table.h"

namespace py = pybind11;
using namespace pysoup;

namespace {

// The ISA argument of every op: a code from isa_code() (what pysoup.ops.cpu passes, resolved once), or a name,
// resolved here once per call. Either way the kernels see only a checked Isa.
using IsaArg = std::variant<int, std::string>;

Isa checked_isa(const std::string& op, const IsaArg& isa) {
    if (const int* code = std::get_if<int>(&isa)) {
        if (isa_usable(*code)) return static_cast<Isa>(*code);
        std::string usable;
        for (int c = 0; isa_usable(c); ++c) usable += (c ? ", " : "") + std::to_string(c) + " " + kIsaNames[c];
        throw std::invalid_argument(op + ": CPU ISA code " + std::to_string(*code) +
                                    " cannot run here (usable: " + usable + ")");
    }
    try {
        return static_cast<Isa>(isa_code(std::get<std::string>(isa)));
    } catch (const std::invalid_argument& e) {
        throw std::invalid_argument(op + ": " + e.what());
    }
}

// The checks the weighted-sum entries share: dtype codes, and the divisor when normalizing. Returns the arguments
// with everything but the pointers filled in.
WeightedSumArgs checked_weighted_sum_args(const std::string& op, const std::vector<int>& in_dtypes,
                                          const std::vector<float>& weights, int out_dtype, bool normalize) {
    for (int d : in_dtypes)
        if (d < kF32 || d > kBF16) throw std::invalid_argument(op + ": bad input dtype code");
    if (out_dtype < kF32 || out_dtype > kBF16) throw std::invalid_argument(op + ": bad output dtype code");
    const int k = static_cast<int>(in_dtypes.size());
    WeightedSumArgs args{nullptr, in_dtypes.data(), weights.data(), k, nullptr, out_dtype, normalize, 1.0f};
    if (normalize) {
        args.divisor = fp32_sum_in_order(weights.data(), k);
        if (args.divisor == 0.0f || !std::isfinite(args.divisor))
            throw std::invalid_argument(op + ": the weights sum to zero or a non-finite value");
    }
    return args;
}

int64_t weighted_sum_py(const std::vector<uintptr_t>& inputs, const std::vector<int>& in_dtypes,
                        const std::vector<float>& weights, int64_t n, uintptr_t out, int out_dtype, bool normalize,
                        int threads, const IsaArg& isa) {
    const Isa code = checked_isa("weighted_sum", isa);
    const size_t k = inputs.size();
    if (k == 0) throw std::invalid_argument("weighted_sum needs at least one input");
    if (in_dtypes.size() != k || weights.size() != k)
        throw std::invalid_argument("weighted_sum: inputs, dtypes and weights differ in length");
    if (n < 0) throw std::invalid_argument("weighted_sum: negative element count");
    if (n > 0) {
        if (out == 0) throw std::invalid_argument("weighted_sum: null output pointer");
        for (uintptr_t p : inputs)
            if (p == 0) throw std::invalid_argument("weighted_sum: null input pointer");
    }
    WeightedSumArgs args = checked_weighted_sum_args("weighted_sum", in_dtypes, weights, out_dtype, normalize);
    std::vector<const void*> ptrs(k);
    for (size_t i = 0; i < k; ++i) ptrs[i] = reinterpret_cast<const void*>(inputs[i]);
    args.inputs = ptrs.data();
    args.out = reinterpret_cast<void*>(out);
    py::gil_scoped_release release;
    return weighted_sum(args, n, code, threads < 1 ? 1 : threads);
}

// Many tensors in one call: inputs holds k pointers per tensor (tensor-major), outs one per tensor.
int64_t weighted_sum_many_py(const std::vector<uintptr_t>& inputs, const std::vector<int>& in_dtypes,
                             const std::vector<float>& weights, const std::vector<int64_t>& sizes,
                             const std::vector<uintptr_t>& outs, int out_dtype, bool normalize, int threads,
                             const IsaArg& isa) {
    const Isa code = checked_isa("weighted_sum_many", isa);
    const size_t k = in_dtypes.size(), m = sizes.size();
    if (k == 0) throw std::invalid_argument("weighted_sum_many needs at least one input per tensor");
    if (weights.size() != k) throw std::invalid_argument("weighted_sum_many: dtypes and weights differ in length");
    if (inputs.size() != k * m || outs.size() != m)
        throw std::invalid_argument("weighted_sum_many: needs k input pointers and one output pointer per tensor");
    for (size_t t = 0; t < m; ++t) {
        if (sizes[t] < 0) throw std::invalid_argument("weighted_sum_many: negative element count");
        if (sizes[t] == 0) continue;
        if (outs[t] == 0) throw std::invalid_argument("weighted_sum_many: null output pointer");
        for (size_t i = 0; i < k; ++i)
            if (inputs[t * k + i] == 0) throw std::invalid_argument("weighted_sum_many: null input pointer");
    }
    const WeightedSumArgs shared =
        checked_weighted_sum_args("weighted_sum_many", in_dtypes, weights, out_dtype, normalize);
    std::vector<const void*> ptrs(inputs.size());
    for (size_t i = 0; i < inputs.size(); ++i) ptrs[i] = reinterpret_cast<const void*>(inputs[i]);
    std::vector<void*> out_ptrs(m);
    for (size_t t = 0; t < m; ++t) out_ptrs[t] = reinterpret_cast<void*>(outs[t]);
    py::gil_scoped_release release;
    return weighted_sum_many(shared, ptrs.data(), out_ptrs.data(), sizes.data(), static_cast<int64_t>(m), code,
                             threads < 1 ? 1 : threads);
}

// The engine's batch of small tensors: plan tensors [k0, k1), tensor k's input i at bases[i] + that source table's
// begin of row rows_i[k], its output at out_base + out.begin(k), out.numel(k) elements. One kernel call for the
// whole batch (10^5 tensors of a few elements cost 10 us each as one call per tensor). Returns [(k, count)] for
// the tensors with non-finite outputs.
py::list weighted_sum_rows_py(const py::list& sources, const TensorTable& out, uintptr_t out_base, int64_t k0,
                              int64_t k1, const std::vector<int>& in_dtypes, const std::vector<float>& weights,
                              int out_dtype, bool normalize, int threads, const IsaArg& isa) {
    const Isa code = checked_isa("weighted_sum_rows", isa);
    const size_t k = sources.size();
    if (k == 0 || in_dtypes.size() != k || weights.size() != k)
        throw std::invalid_argument("weighted_sum_rows: sources, dtypes and weights differ in length");
    if (k0 < 0 || k1 < k0 || k1 > out.size()) throw std::invalid_argument("weighted_sum_rows: bad tensor range");
    const WeightedSumArgs shared =
        checked_weighted_sum_args("weighted_sum_rows", in_dtypes, weights, out_dtype, normalize);
    const int64_t m = k1 - k0;
    std::vector<const void*> ptrs(m * k);
    std::vector<void*> outs(m);
    std::vector<int64_t> sizes(m), counts(m);
    for (size_t i = 0; i < k; ++i) {
        const auto src = sources[i].cast<py::tuple>();
        const auto& table = src[0].cast<const TensorTable&>();
        const int32_t* rows = nullptr;
        if (!src[1].is_none()) {
            const py::buffer_info info = src[1].cast<py::buffer>().request();
            if (info.size * info.itemsize != out.size() * 4)
                throw std::invalid_argument("weighted_sum_rows: one int32 row per output tensor");
            rows = static_cast<const int32_t*>(info.ptr);
        }
        const uintptr_t base = src[2].cast<uintptr_t>();
        const int code = in_dtypes[i] == kF32   ? st_dtype_code("F32")
                         : in_dtypes[i] == kF16 ? st_dtype_code("F16")
                                                : st_dtype_code("BF16");
        for (int64_t j = 0; j < m; ++j) {
            const int64_t r = rows ? rows[k0 + j] : k0 + j;
            if (r < 0 || r >= table.size() || table.dtype(r) != code || table.numel(r) != out.numel(k0 + j))
                throw std::invalid_argument("weighted_sum_rows: a source row is missing or differs in dtype or size");
            ptrs[j * k + i] = reinterpret_cast<const void*>(base + static_cast<uintptr_t>(table.begin(r)));
        }
    }
    for (int64_t j = 0; j < m; ++j) {
        outs[j] = reinterpret_cast<void*>(out_base + static_cast<uintptr_t>(out.begin(k0 + j)));
        sizes[j] = out.numel(k0 + j);
    }
    {
        py::gil_scoped_release release;
        weighted_sum_many(shared, ptrs.data(), outs.data(), sizes.data(), m, code, threads < 1 ? 1 : threads,
                          counts.data());
    }
    py::list nonfinite;
    for (int64_t j = 0; j < m; ++j)
        if (counts[j]) nonfinite.append(py::make_tuple(k0 + j, counts[j]));
    return nonfinite;
}

struct Inputs {
    std::vector<const void*> ptrs;
    std::vector<int> dtypes;
    Isa isa;
};

Inputs check_inputs(const char* op, const std::vector<uintptr_t>& inputs, const std::vector<int>& dtypes, int64_t n,
                    const IsaArg& isa) {
    if (inputs.empty()) throw std::invalid_argument(std::string(op) + ": needs at least one input");
    if (dtypes.size() != inputs.size()) throw std::invalid_argument(std::string(op) + ": inputs and dtypes differ");
    if (n < 0) throw std::invalid_argument(std::string(op) + ": negative element count");
    for (int d : dtypes)
        if (d < kF32 || d > kBF16) throw std::invalid_argument(std::string(op) + ": bad dtype code");
    if (n > 0)
        for (uintptr_t p : inputs)
            if (p == 0) throw std::invalid_argument(std::string(op) + ": null input pointer");
    Inputs in;
    in.isa = checked_isa(op, isa);
    for (uintptr_t p : inputs) in.ptrs.push_back(reinterpret_cast<const void*>(p));
    in.dtypes = dtypes;
    return in;
}

template <class T>
void check_len(const char* op, const char* what, const std::vector<T>& v, size_t k) {
    if (v.size() != k) throw std::invalid_argument(std::string(op) + ": " + what + " needs one entry per input");
}

// Returns (nonfinite count, the tie quotas left after this range).
py::tuple task_vector_py(const std::vector<uintptr_t>& inputs, const std::vector<int>& dtypes, uintptr_t base,
                         int base_dtype, int64_t n, uintptr_t out, int out_dtype, const std::vector<float>& weights,
                         float lambda, bool normalize, bool consensus, const std::vector<uint64_t>& dare_keys,
                         const std::vector<uint32_t>& keep_below, const std::vector<float>& dare_scale,
                         const std::vector<uint32_t>& trim_bits, std::vector<int64_t> tie_quota, int64_t start,
                         int threads, const IsaArg& isa) {
    Inputs in = check_inputs("task_vector", inputs, dtypes, n, isa);
    const size_t k = inputs.size();
    check_len("task_vector", "weights", weights, k);
    const bool dare = !dare_keys.empty(), trim = !trim_bits.empty();
    if (dare) {
        check_len("task_vector", "dare_keys", dare_keys, k);
        check_len("task_vector", "dare_scale", dare_scale, k);
        check_len("task_vector", "keep_below", keep_below, k);
    }
    if (trim) {
        check_len("task_vector", "trim_bits", trim_bits, k);
        check_len("task_vector", "tie_quota", tie_quota, k);
    }
    if (n > 0 && (base == 0 || out == 0)) throw std::invalid_argument("task_vector: null base or output pointer");
    TaskVectorArgs a{in.ptrs.data(),
                     in.dtypes.data(),
                     static_cast<int>(k),
                     reinterpret_cast<const void*>(base),
                     base_dtype,
                     weights.data(),
                     lambda,
                     normalize,
                     consensus,
                     fp32_sum_in_order(weights.data(), static_cast<int>(k)),
                     dare,
                     dare_keys.data(),
                     keep_below.data(),
                     dare_scale.data(),
                     trim,
                     trim_bits.data(),
                     tie_quota.data(),
                     reinterpret_cast<void*>(out),
                     out_dtype,
                     start};
    int64_t nonfinite;
    {
        py::gil_scoped_release release;
        nonfinite = task_vector_combine(a, n, in.isa, std::max(1, threads), tie_quota.data());
    }
    return py::make_tuple(nonfinite, tie_quota);
}

// Adds the radix-select histogram of one range into `hist` (k x 65536 uint64 at that address).
void histogram_py(const std::vector<uintptr_t>& inputs, const std::vector<int>& dtypes, uintptr_t base, int base_dtype,
                  int64_t n, int pass, const std::vector<uint32_t>& prefix, uintptr_t hist, int threads,
                  const IsaArg& isa) {
    Inputs in = check_inputs("magnitude_histogram", inputs, dtypes, n, isa);
    if (pass == 1) check_len("magnitude_histogram", "prefix", prefix, inputs.size());
    TaskVectorArgs a{};
    a.inputs = in.ptrs.data();
    a.in_dtypes = in.dtypes.data();
    a.k = static_cast<int>(inputs.size());
    a.base = reinterpret_cast<const void*>(base);
    a.base_dtype = base_dtype;
    py::gil_scoped_release release;
    magnitude_histogram(a, n, in.isa, std::max(1, threads), pass, prefix.data(), reinterpret_cast<uint64_t*>(hist));
}

// Radix select on one histogram pass (radix_select.h): per model, (bin, count above, count in bin, the bin's count
// of nonzero low halves).
py::tuple radix_select_py(uintptr_t hist, const std::vector<int64_t>& keep) {
    const RadixSelection s = radix_select(reinterpret_cast<const uint64_t*>(hist), keep);
    return py::make_tuple(s.bin, s.above, s.in_bin, s.mixed);
}

// The sparsified task-vector ops' parameters (pysoup.ops.table.SparseParams, as pysoup.ops.cpu packs them): the
// vectors stay alive here while the kernels read them.
struct SparsePy {
    std::vector<float> weights, scale, lo, eps;
    std::vector<uint32_t> keep_bits, skip_bits;
    std::vector<uint64_t> keys;
    std::vector<uint8_t> drops;
    SparseArgs a{};
};

void sparse_args(const char* op, SparsePy& s, const Inputs& in, uintptr_t base, int base_dtype, int64_t n,
                 int64_t start, const py::tuple& p, size_t quotas) {
    if (p.size() != 18) throw std::invalid_argument(std::string(op) + ": params needs 18 entries");
    const size_t k = in.ptrs.size();
    SparseArgs& a = s.a;
    a.select = p[0].cast<int>();
    a.mix = p[1].cast<int>();
    if (a.select < kSelectAll || a.select > kSelectShared || a.mix < kMixSum || a.mix > kMixRam)
        throw std::invalid_argument(std::string(op) + ": bad select or mix code");
    s.weights = p[2].cast<std::vector<float>>();
    check_len(op, "weights", s.weights, k);
    a.lambda = p[3].cast<float>();
    a.normalize = p[4].cast<bool>();
    s.scale = p[5].cast<std::vector<float>>();
    if (!s.scale.empty()) check_len(op, "scale", s.scale, k);
    s.keep_bits = p[6].cast<std::vector<uint32_t>>();
    s.skip_bits = p[7].cast<std::vector<uint32_t>>();
    s.keys = p[8].cast<std::vector<uint64_t>>();
    s.lo = p[9].cast<std::vector<float>>();
    s.eps = p[10].cast<std::vector<float>>();
    s.drops = p[11].cast<std::vector<uint8_t>>();
    a.row = p[12].cast<int64_t>();
    a.stride = p[13].cast<int64_t>();
    a.epsilon = p[14].cast<float>();
    a.keep_mask = reinterpret_cast<uint8_t*>(p[15].cast<uintptr_t>());
    a.keep_mask_stride = p[16].cast<int64_t>();
    a.keep_mask_mode = p[17].cast<int>();
    if (a.keep_mask_mode < kMaskDraw || a.keep_mask_mode > kMaskLoad)
        throw std::invalid_argument(std::string(op) + ": bad keep mask mode");
    if (a.keep_mask_mode != kMaskDraw && ((a.select != kSelectRank && a.select != kSelectShared) || !a.keep_mask ||
                                          start < 0 || a.keep_mask_stride < (start + n + 7) / 8))
        throw std::invalid_argument(std::string(op) +
                                    ": the keep mask needs a rank or shared selection and whole bits");
    if (a.select == kSelectBand) {
        check_len(op, "keep_bits", s.keep_bits, k);
        check_len(op, "skip_bits", s.skip_bits, k);
    }
    if (a.select == kSelectShared && s.keep_bits.size() != 1)
        throw std::invalid_argument(std::string(op) + ": a shared selection takes one threshold");
    if (a.select == kSelectRank) {
        check_len(op, "keys", s.keys, k);
        check_len(op, "lo", s.lo, k);
        check_len(op, "eps", s.eps, k);
        check_len(op, "drops", s.drops, k);
        if (a.row < 1 || a.stride < 1 || n % (a.row * a.stride) != 0)
            throw std::invalid_argument(std::string(op) + ": a rank selection needs whole rows");
    }
    if (n > 0 && base == 0) throw std::invalid_argument(std::string(op) + ": null base pointer");
    a.inputs = in.ptrs.data();
    a.in_dtypes = in.dtypes.data();
    a.k = static_cast<int>(k);
    a.base = reinterpret_cast<const void*>(base);
    a.base_dtype = base_dtype;
    a.weights = s.weights.data();
    a.divisor = fp32_sum_in_order(s.weights.data(), a.k);
    a.scale = s.scale.empty() ? nullptr : s.scale.data();
    a.keep_bits = s.keep_bits.data();
    a.skip_bits = s.skip_bits.data();
    a.keys = s.keys.data();
    a.lo = s.lo.data();
    a.eps = s.eps.data();
    a.drops = s.drops.data();
    a.start = start;
    a.n = n;
    if (quotas != static_cast<size_t>(sparse_quota_count(a)))
        throw std::invalid_argument(std::string(op) + ": wrong number of tie quotas");
}

// Returns (non-finite count, the tie quotas left).
py::tuple sparse_task_vector_py(const std::vector<uintptr_t>& inputs, const std::vector<int>& dtypes, uintptr_t base,
                                int base_dtype, int64_t n, uintptr_t out, int out_dtype, const py::tuple& params,
                                std::vector<int64_t> quota, int64_t start, int threads, const IsaArg& isa) {
    Inputs in = check_inputs("sparse_task_vector", inputs, dtypes, n, isa);
    SparsePy s;
    sparse_args("sparse_task_vector", s, in, base, base_dtype, n, start, params, quota.size());
    if (n > 0 && out == 0) throw std::invalid_argument("sparse_task_vector: null output pointer");
    if (out_dtype < kF32 || out_dtype > kBF16) throw std::invalid_argument("sparse_task_vector: bad output dtype");
    s.a.out = reinterpret_cast<void*>(out);
    s.a.out_dtype = out_dtype;
    int64_t nonfinite;
    {
        py::gil_scoped_release release;
        nonfinite = sparse_task_vector(s.a, in.isa, std::max(1, threads), quota.data());
    }
    return py::make_tuple(nonfinite, quota);
}

// Returns (totals plus this range's statistics, the tie quotas left).
py::tuple sparse_stats_py(const std::vector<uintptr_t>& inputs, const std::vector<int>& dtypes, uintptr_t base,
                          int base_dtype, int64_t n, const py::tuple& params, std::vector<int64_t> quota,
                          std::vector<double> totals, int64_t start, int threads, const IsaArg& isa) {
    Inputs in = check_inputs("sparse_stats", inputs, dtypes, n, isa);
    SparsePy s;
    sparse_args("sparse_stats", s, in, base, base_dtype, n, start, params, quota.size());
    if (totals.size() != size_t(kSparseStats) * inputs.size())
        throw std::invalid_argument("sparse_stats: totals needs 5 entries per input");
    {
        py::gil_scoped_release release;
        sparse_stats(s.a, in.isa, std::max(1, threads), quota.data(), totals.data());
    }
    return py::make_tuple(totals, quota);
}

// Adds the variance radix-select histogram of one range into `hist` (65536 uint64); returns the zero variances. With
// `variances` (uint32 per entry of the tensor), pass 0 also stores the range's variance bits there from `start`.
int64_t variance_histogram_py(const std::vector<uintptr_t>& inputs, const std::vector<int>& dtypes, uintptr_t base,
                              int base_dtype, int64_t n, int pass, uint32_t prefix, uintptr_t hist, int threads,
                              const IsaArg& isa, uintptr_t variances, int64_t start) {
    Inputs in = check_inputs("variance_histogram", inputs, dtypes, n, isa);
    if (n > 0 && (base == 0 || hist == 0)) throw std::invalid_argument("variance_histogram: null pointer");
    if (start < 0) throw std::invalid_argument("variance_histogram: negative start");
    SparseArgs a{};
    a.inputs = in.ptrs.data();
    a.in_dtypes = in.dtypes.data();
    a.k = static_cast<int>(inputs.size());
    a.base = reinterpret_cast<const void*>(base);
    a.base_dtype = base_dtype;
    a.variances = reinterpret_cast<uint32_t*>(variances);
    a.start = start;
    a.n = n;
    py::gil_scoped_release release;
    return variance_histogram(a, in.isa, std::max(1, threads), pass, prefix, reinterpret_cast<uint64_t*>(hist));
}

// The stored variance bits of a whole tensor (n uint32, as variance_histogram's pass 0 stored them), no input.
SparseArgs stored_variance_args(const char* op, uintptr_t variances, int64_t n) {
    if (n < 0) throw std::invalid_argument(std::string(op) + ": negative element count");
    if (n > 0 && variances == 0) throw std::invalid_argument(std::string(op) + ": null pointer");
    SparseArgs a{};
    a.select = kSelectShared;
    a.variances = reinterpret_cast<uint32_t*>(variances);
    a.n = n;
    return a;
}

// SCE's pass 1 over the stored variance bits (the low halves in the high bin `prefix`, into hist), the keep bits of
// the entries outside that bin written into keep_mask ((n + 7) / 8 zeroed bytes); returns the bin's entries per block
// (for stored_variance_keep_ties).
std::vector<int64_t> stored_variance_select_py(uintptr_t variances, int64_t n, uint32_t prefix, uintptr_t hist,
                                               uintptr_t keep_mask, int threads, const IsaArg& isa) {
    const Isa code = checked_isa("stored_variance_select", isa);
    SparseArgs a = stored_variance_args("stored_variance_select", variances, n);
    if (n > 0 && (hist == 0 || keep_mask == 0)) throw std::invalid_argument("stored_variance_select: null pointer");
    a.keep_mask = reinterpret_cast<uint8_t*>(keep_mask);
    py::gil_scoped_release release;
    return variance_select_stored(a, code, std::max(1, threads), prefix, reinterpret_cast<uint64_t*>(hist));
}

// The keep bits of the bin's entries once the threshold and the tie quota are known; returns the quota left.
int64_t stored_variance_keep_ties_py(uintptr_t variances, int64_t n, const std::vector<int64_t>& in_bin,
                                     uint32_t prefix, uint32_t threshold, int64_t quota, uintptr_t keep_mask,
                                     int threads) {
    SparseArgs a = stored_variance_args("stored_variance_keep_ties", variances, n);
    if (int64_t(in_bin.size()) != (n + kBlock - 1) / kBlock)
        throw std::invalid_argument("stored_variance_keep_ties: in_bin needs one count per block");
    for (size_t b = 0; b < in_bin.size(); ++b)
        if (in_bin[b] < 0 || in_bin[b] > std::min<int64_t>(kBlock, n - int64_t(b) * kBlock))
            throw std::invalid_argument("stored_variance_keep_ties: bad count");
    if (n > 0 && keep_mask == 0) throw std::invalid_argument("stored_variance_keep_ties: null pointer");
    a.keep_mask = reinterpret_cast<uint8_t*>(keep_mask);
    py::gil_scoped_release release;
    return variance_keep_ties(a, in_bin, prefix, threshold, quota, std::max(1, threads));
}

int64_t masked_sum_py(const std::vector<uintptr_t>& inputs, const std::vector<int>& dtypes,
                      const std::vector<float>& weights, int mode, int64_t n, uintptr_t out, int out_dtype, int threads,
                      const IsaArg& isa, float center, float scale) {
    Inputs in = check_inputs("masked_sum", inputs, dtypes, n, isa);
    check_len("masked_sum", "weights", weights, inputs.size());
    if (mode < 0 || mode > 3)
        throw std::invalid_argument("masked_sum: mode is 0 shared, 1 intersection, 2 union, 3 affine mean");
    if (n > 0 && out == 0) throw std::invalid_argument("masked_sum: null output pointer");
    MaskedSumArgs a{in.ptrs.data(),
                    in.dtypes.data(),
                    static_cast<int>(inputs.size()),
                    weights.data(),
                    fp32_sum_in_order(weights.data(), static_cast<int>(weights.size())),
                    mode,
                    center,
                    scale,
                    reinterpret_cast<void*>(out),
                    out_dtype};
    py::gil_scoped_release release;
    return masked_sum(a, n, in.isa, std::max(1, threads));
}

py::tuple sparse_scan_py(const std::vector<uintptr_t>& inputs, const std::vector<int>& dtypes, int64_t n, int threads,
                         const IsaArg& isa) {
    Inputs in = check_inputs("sparse_scan", inputs, dtypes, n, isa);
    MaskedSumArgs a{};
    a.inputs = in.ptrs.data();
    a.in_dtypes = in.dtypes.data();
    a.k = static_cast<int>(inputs.size());
    int64_t zeros = 0, first;
    {
        py::gil_scoped_release release;
        first = sparse_scan(a, n, in.isa, std::max(1, threads), &zeros);
    }
    return py::make_tuple(first, zeros);
}

// Adds one range's statistics to `totals` (see MomentsArgs for the layout) and returns them.
std::vector<double> moments_py(const std::vector<uintptr_t>& inputs, const std::vector<int>& dtypes, uintptr_t base,
                               int base_dtype, int64_t n, const std::vector<float>& mean_weights,
                               const std::vector<uint64_t>& dare_keys, const std::vector<uint32_t>& keep_below,
                               int64_t start, std::vector<double> totals, int threads, const IsaArg& isa, bool gram) {
    Inputs in = check_inputs("moments", inputs, dtypes, n, isa);
    const int k = static_cast<int>(inputs.size());
    const bool mean = !mean_weights.empty(), dare = !dare_keys.empty();
    if (mean) check_len("moments", "mean_weights", mean_weights, inputs.size());
    if (dare) {
        check_len("moments", "dare_keys", dare_keys, inputs.size());
        check_len("moments", "keep_below", keep_below, inputs.size());
    }
    if (totals.size() != size_t(moments_size(k, mean, dare)))
        throw std::invalid_argument("moments: totals has the wrong length");
    if (start % kStatBlock != 0) throw std::invalid_argument("moments: ranges must start on a 4096-element block");
    MomentsArgs a{in.ptrs.data(),
                  in.dtypes.data(),
                  k,
                  reinterpret_cast<const void*>(base),
                  base_dtype,
                  mean,
                  mean_weights.data(),
                  mean ? fp32_sum_in_order(mean_weights.data(), k) : 1.0f,
                  dare,
                  dare_keys.data(),
                  keep_below.data(),
                  start,
                  gram};
    {
        py::gil_scoped_release release;
        moments(a, n, in.isa, std::max(1, threads), totals.data());
    }
    return totals;
}

}  // namespace

// The geometric ops (pysoup.ops.cpu: segment_moments_raw, segment_weighted_sum_raw, nearswap_raw).
SegmentArgs segment_args(const char* op, const Inputs& in, bool base, int64_t length, bool columns, int64_t start) {
    if (length <= 0) throw std::invalid_argument(std::string(op) + ": vector length must be positive");
    if (start < 0) throw std::invalid_argument(std::string(op) + ": negative start");
    if (base && in.ptrs.size() < 2) throw std::invalid_argument(std::string(op) + ": a base needs another source");
    return SegmentArgs{in.ptrs.data(), in.dtypes.data(), static_cast<int>(in.ptrs.size()), base, length, columns,
                       start};
}

// Adds the range's per-vector statistics to acc (a C-contiguous fp64 buffer of vectors x stats, updated in place).
void segment_moments_py(const std::vector<uintptr_t>& inputs, const std::vector<int>& dtypes, bool base, int64_t n,
                        int64_t length, bool columns, int64_t start, uintptr_t acc, int64_t vectors, int threads,
                        const IsaArg& isa) {
    Inputs in = check_inputs("segment_moments", inputs, dtypes, n, isa);
    SegmentArgs a = segment_args("segment_moments", in, base, length, columns, start);
    const int64_t last = columns ? std::min(length, n) - 1 : (start + n - 1) / length;
    if (n > 0 && (acc == 0 || last >= vectors || (columns && length > vectors)))
        throw std::invalid_argument("segment_moments: the accumulator has too few vectors for the range");
    py::gil_scoped_release release;
    segment_moments(a, n, in.isa, std::max(1, threads), reinterpret_cast<double*>(acc), vectors);
}

// coefficients: a C-contiguous fp32 buffer of (sources, or models with a base) x vectors.
int64_t segment_weighted_sum_py(const std::vector<uintptr_t>& inputs, const std::vector<int>& dtypes, bool base,
                                int64_t n, int64_t length, bool columns, int64_t start, uintptr_t coefficients,
                                int64_t vectors, uintptr_t out, int out_dtype, int threads, const IsaArg& isa) {
    Inputs in = check_inputs("segment_weighted_sum", inputs, dtypes, n, isa);
    SegmentArgs a = segment_args("segment_weighted_sum", in, base, length, columns, start);
    const int64_t last = columns ? std::min(length, n) - 1 : (start + n - 1) / length;
    if (n > 0 && (coefficients == 0 || out == 0 || last >= vectors || (columns && length > vectors)))
        throw std::invalid_argument("segment_weighted_sum: null buffer, or too few vectors for the range");
    if (out_dtype < kF32 || out_dtype > kBF16)
        throw std::invalid_argument("segment_weighted_sum: bad output dtype code");
    py::gil_scoped_release release;
    return segment_weighted_sum(a, n, reinterpret_cast<const float*>(coefficients), vectors,
                                reinterpret_cast<void*>(out), out_dtype, in.isa, std::max(1, threads));
}

int64_t nearswap_py(const std::vector<uintptr_t>& inputs, const std::vector<int>& dtypes, float t, int64_t n,
                    uintptr_t out, int out_dtype, int threads, const IsaArg& isa) {
    Inputs in = check_inputs("nearswap", inputs, dtypes, n, isa);
    if (inputs.size() != 2) throw std::invalid_argument("nearswap: takes the model and the base");
    if (n > 0 && out == 0) throw std::invalid_argument("nearswap: null output pointer");
    if (out_dtype < kF32 || out_dtype > kBF16) throw std::invalid_argument("nearswap: bad output dtype code");
    py::gil_scoped_release release;
    return nearswap(in.ptrs.data(), in.dtypes.data(), t, n, reinterpret_cast<void*>(out), out_dtype, in.isa,
                    std::max(1, threads));
}

// Arcee Fusion's histogram and combine passes (kl: fp32 per tensor row, `rows` of them; hist: uint64 counts).
FusionArgs fusion_args(const char* op, const Inputs& in, uintptr_t kl, int64_t rows, int64_t row, int64_t start,
                       int64_t n, const std::vector<uint32_t>& prefix) {
    if (in.ptrs.size() != 2) throw std::invalid_argument(std::string(op) + ": takes the model and the base");
    if (row <= 0 || start < 0) throw std::invalid_argument(std::string(op) + ": bad row length or start");
    if (n > 0 && (kl == 0 || (start + n - 1) / row >= rows))
        throw std::invalid_argument(std::string(op) + ": the row statistics do not cover the range");
    return FusionArgs{in.ptrs.data(),
                      in.dtypes.data(),
                      reinterpret_cast<const float*>(kl),
                      row,
                      start,
                      prefix.empty() ? nullptr : prefix.data(),
                      static_cast<int>(prefix.size())};
}

void fusion_histogram_py(const std::vector<uintptr_t>& inputs, const std::vector<int>& dtypes, uintptr_t kl,
                         int64_t rows, int64_t row, int64_t start, int64_t n, int pass,
                         const std::vector<uint32_t>& prefix, uintptr_t hist, int threads, const IsaArg& isa) {
    Inputs in = check_inputs("fusion_histogram", inputs, dtypes, n, isa);
    FusionArgs a = fusion_args("fusion_histogram", in, kl, rows, row, start, n, prefix);
    if (pass < 0 || pass > 1 || hist == 0 || prefix.empty() || prefix.size() > 3)
        throw std::invalid_argument("fusion_histogram: pass is 0 or 1, with a histogram and 1 to 3 quantile prefixes");
    py::gil_scoped_release release;
    fusion_histogram(a, pass, n, reinterpret_cast<uint64_t*>(hist), in.isa, std::max(1, threads));
}

int64_t fusion_combine_py(const std::vector<uintptr_t>& inputs, const std::vector<int>& dtypes, uintptr_t kl,
                          int64_t rows, int64_t row, int64_t start, int64_t n, float threshold, uintptr_t out,
                          int out_dtype, int threads, const IsaArg& isa) {
    Inputs in = check_inputs("fusion_combine", inputs, dtypes, n, isa);
    FusionArgs a = fusion_args("fusion_combine", in, kl, rows, row, start, n, {});
    if (n > 0 && out == 0) throw std::invalid_argument("fusion_combine: null output pointer");
    if (out_dtype < kF32 || out_dtype > kBF16) throw std::invalid_argument("fusion_combine: bad output dtype code");
    py::gil_scoped_release release;
    return fusion_combine(a, threshold, n, reinterpret_cast<void*>(out), out_dtype, in.isa, std::max(1, threads));
}

// The LoRA fold (pysoup.ops.cpu: lora_fold_raw): out = round(W + L R) over rows x cols (see cpu/lora_fold.h).
int64_t lora_fold_py(uintptr_t w, int w_dtype, uintptr_t left, uintptr_t right, int64_t rows, int64_t cols, int k,
                     uintptr_t out, int out_dtype, int threads, const IsaArg& isa) {
    const Isa code = checked_isa("lora_fold", isa);
    if (rows < 0 || cols < 0 || k < 0) throw std::invalid_argument("lora_fold: negative rows, columns or rank");
    if (w_dtype < kF32 || w_dtype > kBF16 || out_dtype < kF32 || out_dtype > kBF16)
        throw std::invalid_argument("lora_fold: bad dtype code");
    if (rows > 0 && cols > 0 && (w == 0 || out == 0 || (k > 0 && (left == 0 || right == 0))))
        throw std::invalid_argument("lora_fold: null pointer");
    LoraFoldArgs a{};
    a.w = reinterpret_cast<const void*>(w);
    a.w_dtype = w_dtype;
    a.left = reinterpret_cast<const float*>(left);
    a.right = reinterpret_cast<const float*>(right);
    a.rows = rows, a.cols = cols, a.k = k;
    a.out = reinterpret_cast<void*>(out);
    a.out_dtype = out_dtype;
    py::gil_scoped_release release;
    return lora_fold(a, code, std::max(1, threads));
}

// Arcee Fusion's row KL: `rows` whole rows of `row` elements from the inputs (p, b) into kl (fp32, rows entries);
// hist (0 for none): 65536 uint64 counts of the rows' importance keys' high halves, added to.
void fusion_kl_py(const std::vector<uintptr_t>& inputs, const std::vector<int>& dtypes, int64_t row, int64_t rows,
                  uintptr_t kl, int threads, const IsaArg& isa, uintptr_t hist) {
    if (row <= 0 || rows < 0) throw std::invalid_argument("fusion_kl: bad row length or row count");
    Inputs in = check_inputs("fusion_kl", inputs, dtypes, row * rows, isa);
    if (in.ptrs.size() != 2) throw std::invalid_argument("fusion_kl: takes the model and the base");
    if (rows > 0 && kl == 0) throw std::invalid_argument("fusion_kl: null output pointer");
    py::gil_scoped_release release;
    fusion_kl(in.ptrs.data(), in.dtypes.data(), row, rows, reinterpret_cast<float*>(kl),
              reinterpret_cast<uint64_t*>(hist), in.isa, std::max(1, threads));
}

PYBIND11_MODULE(_C, m) {
    m.doc() = "pysoup's C++ kernels: fused streaming merges over raw buffers";
    m.attr("__version__") = PYSOUP_VERSION;
    m.def("weighted_sum", &weighted_sum_py, py::arg("inputs"), py::arg("in_dtypes"), py::arg("weights"), py::arg("n"),
          py::arg("out"), py::arg("out_dtype"), py::arg("normalize"), py::arg("threads"), py::arg("isa"),
          "out = round(sum_i fma(w_i, x_i) [/ sum w]) over n elements; returns the count of non-finite outputs");
    m.def("weighted_sum_many", &weighted_sum_many_py, py::arg("inputs"), py::arg("in_dtypes"), py::arg("weights"),
          py::arg("sizes"), py::arg("outs"), py::arg("out_dtype"), py::arg("normalize"), py::arg("threads"),
          py::arg("isa"),
          "weighted_sum over many tensors in one call (k input pointers per tensor, tensor-major; an output may "
          "be its tensor's first input); returns the count of non-finite outputs");
    m.def("weighted_sum_rows", &weighted_sum_rows_py, py::arg("sources"), py::arg("out"), py::arg("out_base"),
          py::arg("k0"), py::arg("k1"), py::arg("in_dtypes"), py::arg("weights"), py::arg("out_dtype"),
          py::arg("normalize"), py::arg("threads"), py::arg("isa"),
          "weighted_sum over plan tensors [k0, k1) in one call; sources: [(TensorTable, int32 rows or None, base)]; "
          "returns [(k, non-finite count)]");
    m.def("cpu_isas", &usable_isas, "ISAs this CPU can run, 'scalar' first");
    m.def("isa_code", &isa_code, py::arg("name"),
          "the code of a CPU ISA this CPU can run, for the ops' `isa` argument (ValueError naming the usable ones "
          "otherwise)");
    m.def("task_vector", &task_vector_py, "fused task-vector merge (task arithmetic, TIES, DARE) over one range");
    m.def("magnitude_histogram", &histogram_py, "radix-select histogram of |x_i - base| bits over one range");
    m.def("radix_select", &radix_select_py, "per model: (bin, count above, count in bin) for the keep-th largest");
    m.def("sparse_task_vector", &sparse_task_vector_py,
          "sparsified task-vector merge (Breadcrumbs, DELLA, SCE, RAM) over one range: (non-finite, quotas left)");
    m.def("sparse_stats", &sparse_stats_py, "the sparsified task-vector statistics of one range: (totals, quotas)");
    m.def("variance_histogram", &variance_histogram_py,
          "SCE's radix-select histogram of variance bits; zeros (pass 0 may store the bits)");
    m.def("stored_variance_select", &stored_variance_select_py,
          "SCE's pass 1 over stored variance bits and the keep bits outside its bin; the bin's entries per block");
    m.def("stored_variance_keep_ties", &stored_variance_keep_ties_py,
          "SCE's keep bits of the bin's entries from a threshold and a tie quota; the quota left");
    m.def("masked_sum", &masked_sum_py, "sparse soup over one range; mode 0 shared, 1 intersection, 2 union");
    m.def("sparse_scan", &sparse_scan_py, "(first index where zero patterns differ or -1, zeros of input 0)");
    m.def("moments", &moments_py, "fp64 sums, squares, abs sums and Gram entries over one range, block-ordered");
    m.def("segment_moments", &segment_moments_py, "per-vector (row or column) fp64 squares and dots, in order");
    m.def("segment_weighted_sum", &segment_weighted_sum_py, "weighted sum with per-vector coefficients");
    m.def("nearswap", &nearswap_py, "mergekit's NearSwap in its fp32 operation order");
    m.def("fusion_histogram", &fusion_histogram_py, "Arcee Fusion: radix-select histogram of the importance keys");
    m.def("fusion_combine", &fusion_combine_py, "Arcee Fusion: b + (p - b) * (importance >= threshold)");
    m.def("fusion_kl", &fusion_kl_py, py::arg("inputs"), py::arg("in_dtypes"), py::arg("row"), py::arg("rows"),
          py::arg("kl"), py::arg("threads"), py::arg("isa"), py::arg("hist") = 0,
          "Arcee Fusion: each row's KL of softmax(p) + eps against softmax(b) + eps, fp64; with hist, the rows' "
          "importance keys' high halves counted there");
    m.def("lora_fold", &lora_fold_py, py::arg("w"), py::arg("w_dtype"), py::arg("left"), py::arg("right"),
          py::arg("rows"), py::arg("cols"), py::arg("k"), py::arg("out"), py::arg("out_dtype"), py::arg("threads"),
          py::arg("isa"),
          "out = round(W + L R), W rows x cols, L fp32 rows x k, R fp32 k x cols, the k products fma'd in order "
          "from +0; returns the count of non-finite outputs");
    m.def("philox_word", [](uint64_t key, uint64_t e) { return philox_word(key, e); }, "DARE's generator");
    bind_tensor_table(m);
    py::class_<MappedRegion>(m, "MappedRegion")
        .def(py::init<int, int64_t, int64_t, bool>(), py::arg("fd"), py::arg("offset"), py::arg("length"),
             py::arg("populate") = true)
        .def_property_readonly("address", &MappedRegion::address)
        .def_property_readonly("offset", &MappedRegion::offset)
        .def_property_readonly("length", &MappedRegion::length)
        .def_property_readonly("closed", &MappedRegion::closed)
        .def("faulted", &MappedRegion::faulted, "whether a page vanished under a read (see io/fault_guard.h)")
        .def("close", &MappedRegion::close);
}
