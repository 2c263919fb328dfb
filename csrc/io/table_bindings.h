// Registers pysoup._C.TensorTable, parse_safetensors_header and batch_end (io/table_bindings.cpp).
#pragma once

#include <pybind11/pybind11.h>

namespace pysoup {

void bind_tensor_table(pybind11::module_& m);

}  // namespace pysoup
