// pysoup._C: argument checks, GIL release, nothing else. Pointers arrive as integers (tensor.data_ptr(),
// ndarray.ctypes.data, MappedRegion.address), so this module never sees torch or numpy.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu/kernels.h"
#include "io/mapped_region.h"

namespace py = pybind11;
using namespace pysoup;

namespace {

int64_t weighted_sum_py(const std::vector<uintptr_t>& inputs, const std::vector<int>& in_dtypes,
                        const std::vector<float>& weights, int64_t n, uintptr_t out, int out_dtype, bool normalize,
                        int threads, const std::string& isa) {
    const size_t k = inputs.size();
    if (k == 0) throw std::invalid_argument("weighted_sum needs at least one input");
    if (in_dtypes.size() != k || weights.size() != k)
        throw std::invalid_argument("weighted_sum: inputs, dtypes and weights differ in length");
    if (n < 0) throw std::invalid_argument("weighted_sum: negative element count");
    for (int d : in_dtypes)
        if (d < kF32 || d > kBF16) throw std::invalid_argument("weighted_sum: bad input dtype code");
    if (out_dtype < kF32 || out_dtype > kBF16) throw std::invalid_argument("weighted_sum: bad output dtype code");
    if (n > 0) {
        if (out == 0) throw std::invalid_argument("weighted_sum: null output pointer");
        for (uintptr_t p : inputs)
            if (p == 0) throw std::invalid_argument("weighted_sum: null input pointer");
    }
    if (!isa_usable(isa)) throw std::invalid_argument("weighted_sum: CPU ISA '" + isa + "' is not usable here");
    std::vector<const void*> ptrs(k);
    for (size_t i = 0; i < k; ++i) ptrs[i] = reinterpret_cast<const void*>(inputs[i]);
    WeightedSumArgs args{ptrs.data(), in_dtypes.data(), weights.data(), static_cast<int>(k),
                         reinterpret_cast<void*>(out), out_dtype, normalize, 1.0f};
    if (normalize) {
        args.divisor = fp32_sum_in_order(weights.data(), static_cast<int>(k));
        if (args.divisor == 0.0f || !std::isfinite(args.divisor))
            throw std::invalid_argument("weighted_sum: the weights sum to zero or a non-finite value");
    }
    py::gil_scoped_release release;
    return weighted_sum(args, n, isa, threads < 1 ? 1 : threads);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
    m.doc() = "pysoup's C++ kernels: fused streaming merges over raw buffers";
    m.attr("__version__") = PYSOUP_VERSION;
    m.def("weighted_sum", &weighted_sum_py, py::arg("inputs"), py::arg("in_dtypes"), py::arg("weights"),
          py::arg("n"), py::arg("out"), py::arg("out_dtype"), py::arg("normalize"), py::arg("threads"),
          py::arg("isa"),
          "out = round(sum_i fma(w_i, x_i) [/ sum w]) over n elements; returns the count of non-finite outputs");
    m.def("cpu_isas", &usable_isas, "ISAs this CPU can run, 'scalar' first");
    py::class_<MappedRegion>(m, "MappedRegion")
        .def(py::init<int, int64_t, int64_t, bool>(), py::arg("fd"), py::arg("offset"), py::arg("length"),
             py::arg("populate") = true)
        .def_property_readonly("address", &MappedRegion::address)
        .def_property_readonly("offset", &MappedRegion::offset)
        .def_property_readonly("length", &MappedRegion::length)
        .def_property_readonly("closed", &MappedRegion::closed)
        .def("close", &MappedRegion::close);
}
