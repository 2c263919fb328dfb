// pysoup._cuda: built only with PYSOUP_CUDA=ON; imported only when torch sees a CUDA device.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <vector>

#include "cuda/select.h"

namespace py = pybind11;

namespace {

void histogram_py(const std::vector<uintptr_t>& inputs, const std::vector<int>& dtypes, uintptr_t base, int base_dtype,
                  int64_t n, int pass, const std::vector<uint32_t>& prefix, uintptr_t hist, uintptr_t stream) {
    if (dtypes.size() != inputs.size()) throw std::invalid_argument("magnitude_histogram: one dtype per input");
    if (pass == 1 && prefix.size() != inputs.size())
        throw std::invalid_argument("magnitude_histogram: one prefix per input in pass 1");
    if (n < 0) throw std::invalid_argument("magnitude_histogram: negative length");
    std::vector<const void*> ptrs;
    for (uintptr_t p : inputs) ptrs.push_back(reinterpret_cast<const void*>(p));
    pysoup::cuda::HistogramArgs a{};
    a.inputs = ptrs.data();
    a.in_dtypes = dtypes.data();
    a.k = static_cast<int>(inputs.size());
    a.base = reinterpret_cast<const void*>(base);
    a.base_dtype = base_dtype;
    a.n = n;
    a.pass = pass;
    a.prefix = prefix.data();
    a.hist = reinterpret_cast<unsigned long long*>(hist);
    a.stream = stream;
    py::gil_scoped_release release;
    pysoup::cuda::magnitude_histogram(a);
}

}  // namespace

PYBIND11_MODULE(_cuda, m) {
    m.doc() = "pysoup's CUDA C++ kernels (the TIES threshold's radix-select histograms)";
    m.def("magnitude_histogram", &histogram_py, py::arg("inputs"), py::arg("dtypes"), py::arg("base"),
          py::arg("base_dtype"), py::arg("n"), py::arg("pass_"), py::arg("prefix"), py::arg("hist"), py::arg("stream"),
          "adds radix-select counts of |x_i - base| bits over one range to a k x 65536 uint64 device histogram");
}
