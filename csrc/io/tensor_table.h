// TensorTable: the tensors of a safetensors header, or of an output layout, as columns. A checkpoint of 10^6 tiny
// tensors (MoE models) costs ~80 bytes a tensor here, where a Python object per tensor cost ~370 (TensorInfo)
// plus ~580 while the JSON was parsed; and the per-tensor work of opening, planning and laying out runs in C++.
// Nothing here knows Python: the bindings (io/table_bindings.cpp) convert.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace pysoup {

// The safetensors dtypes pysoup reads, in the order of SAFETENSORS_SIZES in pysoup/dtypes.py: a dtype's code is its
// index (tests check that both lists agree).
constexpr int kNumStDtypes = 15;
extern const char* const kStDtypeNames[kNumStDtypes];
extern const int kStDtypeSizes[kNumStDtypes];
// Position in SAFETENSORS_ORDER: the safetensors package writes the highest first.
extern const int kStDtypeRank[kNumStDtypes];
int st_dtype_code(std::string_view name);  // -1 when unknown

// Length of the UTF-8 sequence starting at p (1-4), or 0 if it is not one that Python's strict decoder accepts
// (overlong forms, surrogates and code points past U+10FFFF are refused).
int utf8_sequence_length(const unsigned char* p, const unsigned char* end);

class TensorTable {
public:
    int64_t size() const { return static_cast<int64_t>(dtype_.size()); }
    std::string_view name(int64_t i) const {
        const uint32_t b = i ? name_end_[i - 1] : 0;
        return {names_.data() + b, static_cast<size_t>(name_end_[i] - b)};
    }
    int dtype(int64_t i) const { return dtype_[i]; }
    int ndim(int64_t i) const { return static_cast<int>(dims_end_[i] - (i ? dims_end_[i - 1] : 0)); }
    const int64_t* dims(int64_t i) const { return dims_.data() + (i ? dims_end_[i - 1] : 0); }
    int64_t numel(int64_t i) const;
    int64_t nbytes(int64_t i) const { return numel(i) * kStDtypeSizes[dtype_[i]]; }
    int64_t begin(int64_t i) const { return begin_[i]; }
    int64_t end(int64_t i) const { return end_[i]; }
    // Which mapping a tensor's bytes are in (a shard of a directory, one in-memory tensor): a run of tensors may
    // share one address base only within a group.
    uint32_t group(int64_t i) const { return group_.empty() ? 0 : group_[i]; }
    bool has_groups() const { return !group_.empty(); }

    void reserve(int64_t tensors, int64_t name_bytes, int64_t dims);
    void add(std::string_view name, int dtype, const int64_t* dims, int ndim, int64_t begin, int64_t end);
    void set_group(int64_t i, uint32_t g);
    void set_range(int64_t i, int64_t begin, int64_t end) { begin_[i] = begin, end_[i] = end; }
    void shrink_to_fit();

    // Index of the tensor called `name`, or -1. The hash index is built on the first call.
    int64_t find(std::string_view name) const;
    // Builds the hash index; false if two tensors share a name.
    bool build_index() const;

    // Rows reordered: row j of the result is row order[j] of this table, its dtype dtypes[order[j]] when `dtypes` is
    // not null (an output layout), its group kept.
    TensorTable permuted(const std::vector<int64_t>& order, const uint8_t* dtypes = nullptr) const;
    // Rows of several tables: pick j is row picks[j].second of tables[picks[j].first], its group that table's number.
    static TensorTable gather(const std::vector<const TensorTable*>& tables,
                              const std::vector<std::pair<uint32_t, uint32_t>>& picks);

private:
    std::string names_;               // every name's UTF-8 bytes, one after the other
    std::vector<uint32_t> name_end_;  // name i ends at name_end_[i] (names total < 4 GiB)
    std::vector<uint8_t> dtype_;
    std::vector<uint32_t> dims_end_;
    std::vector<int64_t> dims_;
    std::vector<int64_t> begin_, end_;  // byte ranges (absolute file offsets for a file's table)
    std::vector<uint32_t> group_;       // empty: every tensor in group 0
    mutable std::vector<uint32_t> slots_;  // open addressing, linear probing: row + 1, 0 for an empty slot
};

struct ParsedHeader {
    bool has_metadata = false;
    std::vector<std::pair<std::string, std::string>> metadata;  // in the file's order
    TensorTable table;                                          // in file order: by (begin, end), stable
};

// The safetensors header `json` (n bytes, padding included) of a file whose data starts at `data_start` and holds
// `data_len` bytes: nullptr unless it is in the plain form every writer produces (no string escapes, integers of at
// most 18 digits, entries of exactly dtype / shape / data_offsets, an optional __metadata__ of strings) and passes
// every check of pysoup/io/format.py's parse_header. For nullptr the caller runs that Python validator, which
// accepts such a header with the same result or raises the error that names the problem; so this parser decides
// nothing that one does not.
std::unique_ptr<ParsedHeader> parse_header_fast(const char* json, size_t n, int64_t data_start, int64_t data_len);

// The rows in the safetensors package's write order: dtype rank (highest first), then name (UTF-8 bytes order, which
// is Python's str order). `dtypes` (one code per row) replaces the table's own when not null.
std::vector<int64_t> canonical_order(const TensorTable& t, const uint8_t* dtypes);

// Where _shard_entries in pysoup/io/writer.py cuts rows [0, size) into shards of at most `max_bytes` of data (a
// tensor larger than that gets a shard of its own): the first row of every shard, then size().
std::vector<int64_t> shard_bounds(const TensorTable& t, int64_t max_bytes);

// The header `safetensors` writes for rows [start, stop) of a table in write order, with `prefix` as the JSON up to
// the first tensor ("{", or '{"__metadata__":{...}' from json.dumps): total size, or false when a name needs the
// general writer (not valid UTF-8, or "__metadata__"). write_header fills `out` (that size) and sets the rows'
// begin / end to their absolute offsets in the file.
bool header_size(const TensorTable& t, int64_t start, int64_t stop, std::string_view prefix, int64_t* size);
void write_header(TensorTable& t, int64_t start, int64_t stop, std::string_view prefix, char* out, int64_t size);

// For each row of `ref`, its row in `t` (-1 when absent) into rows[0, ref.size()); returns how many are absent.
int64_t rows_of(const TensorTable& t, const TensorTable& ref, int32_t* rows);
// The first row k of `ref` whose shape differs from that of row rows[k] of `t` (rows from rows_of, none absent), or -1.
int64_t first_shape_mismatch(const TensorTable& t, const TensorTable& ref, const int32_t* rows);

// Rows of a table as the engine reads them: the k-th tensor of a plan is row rows[k] (rows[k] = k when null).
struct TableRows {
    const TensorTable* table;
    const int32_t* rows;
    int64_t row(int64_t k) const { return rows ? rows[k] : k; }
};

// How far a run of tensors [k0, k) with k <= k1 can go as one batch: the tensors share kinds[k0] (when `kinds` is
// not null), for every source they share a group and their bytes lie within `max_span` bytes (one mapped window),
// the outputs' bytes total at most `out_room`, and no tensor has more than `max_numel` elements. Returns k (k0 when
// tensor k0 alone does not fit) and, per source, the byte range [lo, hi) the batch reads.
int64_t batch_end(const std::vector<TableRows>& sources, const TensorTable& out, const uint32_t* kinds, int64_t k0,
                  int64_t k1, int64_t max_span, int64_t out_room, int64_t max_numel,
                  std::vector<std::pair<int64_t, int64_t>>* spans);

}  // namespace pysoup
