// pysoup._C.TensorTable and the header parser: conversions between Python objects and the columns, nothing else.
// Row lists cross as bytes of int32 (memoryview(b).cast("i") reads them in Python), names as str.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "io/table_bindings.h"
#include "io/tensor_table.h"

namespace py = pybind11;

namespace pysoup {
namespace {

py::str decode(std::string_view s) {
    // surrogatepass: a state dict's key may hold a lone surrogate; it comes back as it went in.
    PyObject* o = PyUnicode_DecodeUTF8(s.data(), static_cast<Py_ssize_t>(s.size()), "surrogatepass");
    if (!o) throw py::error_already_set();
    return py::reinterpret_steal<py::str>(o);
}

// The UTF-8 bytes of a str (surrogatepass for keys that are not valid Unicode); false for anything else.
bool encode(py::handle name, std::string* storage, std::string_view* out) {
    if (!PyUnicode_Check(name.ptr())) return false;
    Py_ssize_t n;
    if (const char* p = PyUnicode_AsUTF8AndSize(name.ptr(), &n)) {
        *out = {p, static_cast<size_t>(n)};
        return true;
    }
    PyErr_Clear();
    PyObject* b = PyUnicode_AsEncodedString(name.ptr(), "utf-8", "surrogatepass");
    if (!b) throw py::error_already_set();
    *storage = std::string(PyBytes_AS_STRING(b), PyBytes_GET_SIZE(b));
    Py_DECREF(b);
    *out = *storage;
    return true;
}

int64_t checked_row(const TensorTable& t, int64_t i) {
    if (i < 0 || i >= t.size()) throw py::index_error("TensorTable: row " + std::to_string(i) + " out of range");
    return i;
}

// Bytes of int32 rows, or nullptr for None; `count` rows are expected.
const int32_t* rows_arg(const py::object& rows, int64_t count, const char* what) {
    if (rows.is_none()) return nullptr;
    const py::buffer_info info = py::reinterpret_borrow<py::buffer>(rows).request();
    if (info.size * info.itemsize != count * 4)
        throw std::invalid_argument(std::string(what) + ": expected " + std::to_string(count) + " int32 rows");
    return static_cast<const int32_t*>(info.ptr);
}

const uint8_t* codes_arg(const py::object& codes, int64_t count, const char* what) {
    if (codes.is_none()) return nullptr;
    const py::buffer_info info = py::reinterpret_borrow<py::buffer>(codes).request();
    if (info.size * info.itemsize != count) throw std::invalid_argument(std::string(what) + ": one code per row");
    const auto* p = static_cast<const uint8_t*>(info.ptr);
    for (int64_t i = 0; i < count; ++i)
        if (p[i] >= kNumStDtypes) throw std::invalid_argument(std::string(what) + ": bad dtype code");
    return p;
}

template <class T>
py::bytes as_bytes(const std::vector<T>& v) {
    return py::bytes(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(T));
}

py::bytes int32_rows(const std::vector<int64_t>& rows) {
    std::vector<int32_t> r(rows.begin(), rows.end());
    return as_bytes(r);
}

py::tuple shape(const TensorTable& t, int64_t i) {
    const int nd = t.ndim(i);
    py::tuple s(nd);
    for (int j = 0; j < nd; ++j) s[j] = py::int_(t.dims(i)[j]);
    return s;
}

TensorTable from_entries(const py::list& names, const std::vector<std::string>& dtypes,
                         const std::vector<std::vector<int64_t>>& shapes, const std::vector<int64_t>& begins,
                         const std::vector<int64_t>& ends, const std::vector<uint32_t>& groups) {
    const size_t n = names.size();
    if (dtypes.size() != n || shapes.size() != n || begins.size() != n || ends.size() != n ||
        (!groups.empty() && groups.size() != n))
        throw std::invalid_argument("TensorTable.from_entries: columns differ in length");
    TensorTable t;
    std::string storage;
    for (size_t i = 0; i < n; ++i) {
        std::string_view name;
        if (!encode(names[i], &storage, &name)) throw std::invalid_argument("TensorTable: names must be str");
        const int code = st_dtype_code(dtypes[i]);
        if (code < 0) throw std::invalid_argument("TensorTable: unknown dtype " + dtypes[i]);
        t.add(name, code, shapes[i].data(), static_cast<int>(shapes[i].size()), begins[i], ends[i]);
        if (!groups.empty()) t.set_group(static_cast<int64_t>(i), groups[i]);
    }
    return t;
}

py::object parse_header_py(const py::buffer& json, int64_t data_start, int64_t data_len) {
    const py::buffer_info info = json.request();
    std::unique_ptr<ParsedHeader> h;
    {
        py::gil_scoped_release release;
        h = parse_header_fast(static_cast<const char*>(info.ptr), static_cast<size_t>(info.size * info.itemsize),
                              data_start, data_len);
    }
    if (!h) return py::none();
    py::object metadata = py::none();
    if (h->has_metadata) {
        py::list pairs;
        for (const auto& [k, v] : h->metadata) pairs.append(py::make_tuple(decode(k), decode(v)));
        metadata = pairs;
    }
    return py::make_tuple(metadata, std::move(h->table));
}

// Returns the header bytes (one allocation, filled in place: 91 MB for 10^6 tensors), or None.
py::object write_header_py(TensorTable& t, int64_t start, int64_t stop, const std::string& metadata) {
    if (start < 0 || stop < start || stop > t.size()) throw py::index_error("TensorTable.write_header: bad rows");
    int64_t size;
    if (!header_size(t, start, stop, metadata, &size)) return py::none();
    PyObject* b = PyBytes_FromStringAndSize(nullptr, static_cast<Py_ssize_t>(size));
    if (!b) throw py::error_already_set();
    write_header(t, start, stop, metadata, PyBytes_AS_STRING(b), size);
    return py::reinterpret_steal<py::bytes>(b);
}

py::tuple batch_end_py(const py::list& sources, const TensorTable& out, const py::object& kinds, int64_t k0, int64_t k1,
                       int64_t max_span, int64_t out_room, int64_t max_numel) {
    if (k0 < 0 || k1 < k0 || k1 > out.size()) throw py::index_error("batch_end: bad tensor range");
    const uint32_t* kind = nullptr;
    if (!kinds.is_none()) {
        const py::buffer_info info = py::reinterpret_borrow<py::buffer>(kinds).request();
        if (info.size * info.itemsize != out.size() * 4) throw std::invalid_argument("batch_end: one kind per tensor");
        kind = static_cast<const uint32_t*>(info.ptr);
    }
    std::vector<TableRows> rows;
    for (const py::handle s : sources) {
        const auto pair = s.cast<py::tuple>();
        const auto& table = pair[0].cast<const TensorTable&>();
        rows.push_back({&table, rows_arg(pair[1], out.size(), "batch_end")});
    }
    std::vector<std::pair<int64_t, int64_t>> spans;
    const int64_t k = batch_end(rows, out, kind, k0, k1, max_span, out_room, max_numel, &spans);
    return py::make_tuple(k, spans);
}

}  // namespace

void bind_tensor_table(py::module_& m) {
    py::class_<TensorTable>(m, "TensorTable",
                            "Tensors as columns: name, dtype, shape, byte range, group; see io/tensor_table.h")
        .def_static("from_entries", &from_entries, py::arg("names"), py::arg("dtypes"), py::arg("shapes"),
                    py::arg("begins"), py::arg("ends"), py::arg("groups") = std::vector<uint32_t>{})
        .def_static(
            "gather",
            [](const std::vector<const TensorTable*>& tables, const py::buffer& picks) {
                const py::buffer_info info = picks.request();
                const auto* p = static_cast<const uint32_t*>(info.ptr);
                const size_t n = static_cast<size_t>(info.size * info.itemsize) / 8;
                std::vector<std::pair<uint32_t, uint32_t>> v(n);
                for (size_t j = 0; j < n; ++j) v[j] = {p[2 * j], p[2 * j + 1]};
                return TensorTable::gather(tables, v);
            },
            "rows of several tables: picks are uint32 pairs (table, row); a row's group is its table's number")
        .def("__len__", &TensorTable::size)
        .def("find",
             [](const TensorTable& t, py::handle name) -> int64_t {
                 std::string storage;
                 std::string_view s;
                 return encode(name, &storage, &s) ? t.find(s) : -1;
             })
        .def("name", [](const TensorTable& t, int64_t i) { return decode(t.name(checked_row(t, i))); })
        .def(
            "names",
            [](const TensorTable& t, int64_t start, int64_t stop) {
                stop = stop < 0 ? t.size() : stop;
                if (start < 0 || stop < start || stop > t.size()) throw py::index_error("TensorTable.names: bad rows");
                py::list out(stop - start);
                for (int64_t i = start; i < stop; ++i) out[i - start] = decode(t.name(i));
                return out;
            },
            py::arg("start") = 0, py::arg("stop") = -1)
        .def("info",
             [](const TensorTable& t, int64_t i) {
                 checked_row(t, i);
                 return py::make_tuple(decode(t.name(i)), kStDtypeNames[t.dtype(i)], shape(t, i), t.begin(i), t.end(i));
             })
        .def("dtype", [](const TensorTable& t, int64_t i) { return kStDtypeNames[t.dtype(checked_row(t, i))]; })
        .def("shape", [](const TensorTable& t, int64_t i) { return shape(t, checked_row(t, i)); })
        .def("begin", [](const TensorTable& t, int64_t i) { return t.begin(checked_row(t, i)); })
        .def("end", [](const TensorTable& t, int64_t i) { return t.end(checked_row(t, i)); })
        .def("group", [](const TensorTable& t, int64_t i) { return t.group(checked_row(t, i)); })
        .def("numel", [](const TensorTable& t, int64_t i) { return t.numel(checked_row(t, i)); })
        .def("nbytes", [](const TensorTable& t, int64_t i) { return t.nbytes(checked_row(t, i)); })
        .def(
            "dtype_codes",
            [](const TensorTable& t, const py::object& rows, int64_t count) {
                const int32_t* r = rows_arg(rows, count, "dtype_codes");
                std::vector<uint8_t> out(count);
                for (int64_t k = 0; k < count; ++k)
                    out[k] = static_cast<uint8_t>(t.dtype(checked_row(t, r ? r[k] : k)));
                return as_bytes(out);
            },
            py::arg("rows"), py::arg("count"), "one dtype code (SAFETENSORS_SIZES' order) per row, as bytes")
        .def(
            "numels",
            [](const TensorTable& t) {
                std::vector<int64_t> out(t.size());
                for (int64_t i = 0; i < t.size(); ++i) out[i] = t.numel(i);
                return as_bytes(out);
            },
            "elements per row, as bytes of int64")
        .def(
            "rows_of",
            [](const TensorTable& t, const TensorTable& ref) {
                std::vector<int32_t> rows(ref.size());
                const int64_t absent = rows_of(t, ref, rows.data());
                int64_t first = -1;
                for (int64_t k = 0; k < ref.size() && absent && first < 0; ++k)
                    if (rows[k] < 0) first = k;
                return py::make_tuple(as_bytes(rows), absent, first);
            },
            "(each row of ref's row here or -1, as int32 bytes; how many are absent; the first absent, or -1)")
        .def(
            "first_shape_mismatch",
            [](const TensorTable& t, const TensorTable& ref, const py::object& rows) {
                const int32_t* r = rows_arg(rows, ref.size(), "first_shape_mismatch");
                for (int64_t k = 0; k < ref.size(); ++k) checked_row(t, r ? r[k] : k);
                return first_shape_mismatch(t, ref, r);
            },
            "the first row k of ref whose shape differs from that of row rows[k] here, or -1")
        .def(
            "canonical_order",
            [](const TensorTable& t, const py::object& dtypes) {
                return int32_rows(canonical_order(t, codes_arg(dtypes, t.size(), "canonical_order")));
            },
            "rows in the safetensors package's write order (dtype, then name), as int32 bytes")
        .def(
            "permuted",
            [](const TensorTable& t, const py::buffer& order, const py::object& dtypes) {
                const py::buffer_info info = order.request();
                const auto* o = static_cast<const int32_t*>(info.ptr);
                std::vector<int64_t> rows(o, o + (info.size * info.itemsize) / 4);
                for (int64_t r : rows) checked_row(t, r);
                return t.permuted(rows, codes_arg(dtypes, t.size(), "permuted"));
            },
            py::arg("order"), py::arg("dtypes") = py::none(),
            "row j is row order[j] here (its dtype dtypes[order[j]] when given)")
        .def("shard_bounds", &shard_bounds, "first row of each shard of at most max_bytes, then len")
        .def("write_header", &write_header_py, py::arg("start"), py::arg("stop"), py::arg("metadata"),
             "safetensors' header for rows [start, stop) (metadata: the JSON member '\"__metadata__\":{...}' or "
             "''); sets their offsets; None when a name needs format.build_header")
        .def("set_range",
             [](TensorTable& t, int64_t i, int64_t begin, int64_t end) { t.set_range(checked_row(t, i), begin, end); });

    m.def(
        "take",
        [](const py::buffer& values, int itemsize, const py::buffer& order) {
            const py::buffer_info v = values.request(), o = order.request();
            const int64_t n = (v.size * v.itemsize) / itemsize, m = (o.size * o.itemsize) / 4;
            if (itemsize != 1 && itemsize != 4) throw std::invalid_argument("take: items of 1 or 4 bytes");
            const auto* src = static_cast<const char*>(v.ptr);
            const auto* idx = static_cast<const int32_t*>(o.ptr);
            std::string out(static_cast<size_t>(m * itemsize), '\0');
            for (int64_t j = 0; j < m; ++j) {
                if (idx[j] < 0 || idx[j] >= n) throw py::index_error("take: index out of range");
                std::memcpy(&out[j * itemsize], src + static_cast<int64_t>(idx[j]) * itemsize, itemsize);
            }
            return py::bytes(out);
        },
        py::arg("values"), py::arg("itemsize"), py::arg("order"),
        "bytes of values[order[j]] for each int32 order[j]: the items of `values` (1 or 4 bytes each) reordered");
    m.def(
        "sum_by_group",
        [](const py::buffer& values, const py::buffer& groups, int64_t count) {
            const py::buffer_info v = values.request(), g = groups.request();
            const int64_t n = (v.size * v.itemsize) / 8;
            if ((g.size * g.itemsize) / 4 != n) throw std::invalid_argument("sum_by_group: one group per value");
            const auto* x = static_cast<const int64_t*>(v.ptr);
            const auto* grp = static_cast<const uint32_t*>(g.ptr);
            std::vector<int64_t> sums(count);
            for (int64_t j = 0; j < n; ++j) {
                if (grp[j] >= static_cast<uint64_t>(count)) throw py::index_error("sum_by_group: group out of range");
                sums[grp[j]] += x[j];
            }
            return sums;
        },
        py::arg("values"), py::arg("groups"), py::arg("count"),
        "per group g < count, the sum of the int64 values whose uint32 group is g");
    m.def("parse_safetensors_header", &parse_header_py, py::arg("json"), py::arg("data_start"), py::arg("data_len"),
          "(metadata pairs or None, TensorTable) for a plain header that passes every check, else None");
    m.def(
        "safetensors_dtypes",
        []() {
            py::list out;
            for (int d = 0; d < kNumStDtypes; ++d)
                out.append(py::make_tuple(kStDtypeNames[d], kStDtypeSizes[d], kStDtypeRank[d]));
            return out;
        },
        "(name, size, write-order rank) per dtype code");
    m.def("batch_end", &batch_end_py, py::arg("sources"), py::arg("out"), py::arg("kinds"), py::arg("k0"),
          py::arg("k1"), py::arg("max_span"), py::arg("out_room"), py::arg("max_numel"),
          "(end of the batch from k0, [(lo, hi) read per source]); sources: [(table, rows or None)], kinds: uint32 "
          "per tensor or None");
}

}  // namespace pysoup
