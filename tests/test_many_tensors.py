"""Checkpoints of many tensors (issue 9, item 18): the C++ TensorTable against its Python reference, the plain-header
parser against format.parse_header, one plan per context against one per tensor, and the engine's batches of small
tensors against one tensor at a time, bit for bit on every ISA."""

import json
import math
import random
import struct
import warnings

import pytest
import torch
from helpers.checkpoints import hf_dir, save_st
from helpers.parametrize import ISAS, id_formatter
from helpers.tensors import assert_bit_equal
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import pysoup
import pysoup.engine.execute as engine
import pysoup.io.reader as reader
from pysoup import NonFiniteWarning, _native
from pysoup.engine.plan import build_plan
from pysoup.errors import FormatError, PlanError
from pysoup.io import table as tbl
from pysoup.io.format import TensorInfo, build_header, parse_header, parse_header_table
from pysoup.ops import reference
from pysoup.strategies import get_strategy

native = _native.native
NAMES = ["a", "b.weight", "layers.10.x", "layers.9.x", "é.ü", "日本", 'q"uote', "back\\slash", "tab\tnew\nline", ""]


def random_entries(seed, count=40):
    """(name, dtype, shape) rows: every dtype, 0-d, empty and unicode names, escapes json.dumps writes."""
    rng = random.Random(seed)
    names = rng.sample(NAMES, rng.randint(0, len(NAMES))) + [f"t.{rng.randint(0, 10**6)}.{i}" for i in range(count)]
    rng.shuffle(names)
    out = []
    for name in names:
        shape = [rng.choice([0, 1, 2, 3, 7]) for _ in range(rng.randint(0, 3))]
        out.append((name, rng.choice(tbl.DTYPES), shape))
    return out


def both_tables(entries, seed=0):
    rng = random.Random(seed)
    begins = [rng.randint(0, 1000) for _ in entries]
    ends = [b + rng.randint(0, 100) for b in begins]
    groups = [rng.randint(0, 2) for _ in entries]
    cols = ([e[0] for e in entries], [e[1] for e in entries], [list(e[2]) for e in entries], begins, ends, groups)
    return native.TensorTable.from_entries(*cols), tbl.PyTensorTable.from_entries(*cols)


def rows_bytes(values):
    return struct.pack(f"<{len(values)}i", *values)


@pytest.mark.parametrize("seed", range(6), ids=id_formatter("seed"))
def test_table_matches_its_python_reference(seed):
    entries = random_entries(seed)
    c, p = both_tables(entries, seed)
    n = len(entries)
    assert len(c) == len(p) == n
    assert c.names() == p.names() == [e[0] for e in entries] and c.names(2, 5) == p.names(2, 5)
    for i in range(n):
        assert c.info(i) == p.info(i) and c.group(i) == p.group(i)
        assert (c.numel(i), c.nbytes(i), c.shape(i), c.dtype(i)) == (p.numel(i), p.nbytes(i), p.shape(i), p.dtype(i))
        assert c.find(entries[i][0]) == p.find(entries[i][0]) == i
    for missing in ("nope", "\ud800", 3, None, b"a"):
        assert c.find(missing) == p.find(missing) == -1
    rng = random.Random(seed)
    order = list(range(n))
    rng.shuffle(order)
    ob = rows_bytes(order)
    assert c.dtype_codes(None, n) == p.dtype_codes(None, n) and c.dtype_codes(ob, n) == p.dtype_codes(ob, n)
    assert c.numels() == p.numels()
    codes = bytes(rng.randrange(len(tbl.DTYPES)) for _ in range(n))
    assert c.canonical_order(None) == p.canonical_order(None) and c.canonical_order(codes) == p.canonical_order(codes)
    cp, pp = c.permuted(ob, codes), p.permuted(ob, codes)
    assert [cp.info(i) for i in range(n)] == [pp.info(i) for i in range(n)]
    assert [cp.group(i) for i in range(n)] == [pp.group(i) for i in range(n)]
    # Rows of one table in another: same order, shuffled, with some absent, with extras.
    for other in (cp, c.permuted(rows_bytes(order[: n // 2]))):
        assert other.rows_of(c) == (pp if other is cp else p.permuted(rows_bytes(order[: n // 2]))).rows_of(p)
        assert c.rows_of(other)[1] == 0
    assert cp.first_shape_mismatch(c, cp.rows_of(c)[0]) == pp.first_shape_mismatch(p, pp.rows_of(p)[0]) == -1
    for max_bytes in (0, 1, 10, 100, 10**9):
        assert c.shard_bounds(max_bytes) == p.shard_bounds(max_bytes)
    picks = struct.pack(f"<{2 * n}I", *[x for i in order for x in (i % 2, i)])
    cg, pg = native.TensorTable.gather([c, cp], picks), tbl.PyTensorTable.gather([p, pp], picks)
    assert [cg.info(i) + (cg.group(i),) for i in range(n)] == [pg.info(i) + (pg.group(i),) for i in range(n)]
    values = struct.pack(f"<{n}i", *range(100, 100 + n))
    assert native.take(values, 4, ob) == tbl.py_take(values, 4, ob)
    assert native.take(codes, 1, ob) == tbl.py_take(codes, 1, ob)
    groups = struct.pack(f"<{n}I", *[i % 3 for i in range(n)])
    assert native.sum_by_group(c.numels(), groups, 3) == tbl.py_sum_by_group(c.numels(), groups, 3)


@pytest.mark.parametrize("seed", range(6), ids=id_formatter("seed"))
@pytest.mark.parametrize("metadata", [None, {}, {"format": "pt", "é": 'ü\n"x'}], ids=["none", "empty", "some"])
def test_header_writer_is_build_header(seed, metadata):
    """The C++ writer against build_header (the safetensors package's bytes, tested in test_format.py)."""
    entries = sorted(random_entries(seed), key=lambda e: (-tbl._RANK[tbl.DTYPE_CODE[e[1]]], e[0]))
    c, _ = both_tables(entries)
    want, offsets, _ = build_header(entries, metadata)
    assert c.write_header(0, len(c), tbl.metadata_member(metadata)) == want
    assert [(c.begin(i), c.end(i)) for i in range(len(c))] == [offsets[e[0]] for e in entries]
    shards = c.shard_bounds(40)
    for a, b in zip(shards, shards[1:]):
        want, offsets, _ = build_header(entries[a:b], metadata)
        assert c.write_header(a, b, tbl.metadata_member(metadata)) == want
        assert [(c.begin(i), c.end(i)) for i in range(a, b)] == [offsets[e[0]] for e in entries[a:b]]


def test_header_writer_leaves_odd_names_to_build_header():
    for name in ("\ud800", "__metadata__"):
        t = native.TensorTable.from_entries([name], ["F32"], [[2]], [0], [8])
        assert t.write_header(0, 1, "") is None
        assert t.name(0) == name  # surrogatepass both ways


# -- the plain-header parser -------------------------------------------------------------------------------------
def header_text(entries, metadata, rng, mutation):
    """A header as JSON text for (name, dtype, shape) entries laid out back to back (or all at offset 0 for
    "overlap", after a 2-byte gap for "gap"), with the structural mutations applied; returns it and the data's
    length."""
    offset = 2 if mutation == "gap" else 0
    items = []
    for name, dtype, shape in entries:
        nbytes = tbl.SAFETENSORS_SIZES[dtype] * math.prod(shape)
        begin = 0 if mutation == "overlap" else offset
        fields = [("dtype", dtype), ("shape", shape), ("data_offsets", [begin, begin + nbytes])]
        if mutation == "field order":
            rng.shuffle(fields)
        items.append((name, fields))
        offset = max(offset, begin + nbytes)
    if mutation == "unsorted offsets":
        rng.shuffle(items)
    if mutation == "duplicate name" and len(items) >= 2:
        items[1] = (items[0][0], items[1][1])
    if metadata is not None:
        items.insert(rng.randint(0, len(items)) if mutation == "metadata anywhere" else 0, ("__metadata__", metadata))
    ws = (lambda: rng.choice(["", " ", "\n", "\t ", "\r\n"])) if mutation == "whitespace" else (lambda: "")

    def dump(v):
        if isinstance(v, dict):
            v = list(v.items())
            if not v:
                return "{" + ws() + "}"
        if isinstance(v, list) and v and isinstance(v[0], tuple):
            return "{" + ",".join(f"{ws()}{dump(k)}{ws()}:{ws()}{dump(x)}" for k, x in v) + ws() + "}"
        if isinstance(v, list):
            return "[" + ws() + ",".join(f"{ws()}{dump(x)}{ws()}" for x in v) + "]"
        return json.dumps(v, ensure_ascii=False)

    return ws() + (dump(items) if items else "{}") + ws(), offset


MUTATIONS = {
    # Plain headers: the C++ parser must take them.
    "none": lambda t, r: t,
    "field order": lambda t, r: t,
    "unsorted offsets": lambda t, r: t,
    "metadata anywhere": lambda t, r: t,
    "whitespace": lambda t, r: t,
    "gap": lambda t, r: t,
    "18 digits": lambda t, r: t.replace('"shape":[', '"shape":[100000000000000000,0,', 1),
    # Refused by both, or left to parse_header.
    "overlap": lambda t, r: t,
    "duplicate name": lambda t, r: t,
    "duplicate field": lambda t, r: t.replace('"dtype":"', '"dtype":"F32","dtype":"', 1),
    "extra field": lambda t, r: t.replace('"dtype":', '"x":1,"dtype":', 1),
    "escape": lambda t, r: t.replace('"t.', '"\\u0074.', 1),
    "lone surrogate": lambda t, r: t.replace('"t.', '"\\ud800t.', 1),
    "negative zero": lambda t, r: t.replace('"shape":[', '"shape":[-0,', 1),
    "float": lambda t, r: t.replace('"shape":[', '"shape":[1.0,', 1),
    "exponent": lambda t, r: t.replace('"shape":[', '"shape":[1e0,', 1),
    "leading zero": lambda t, r: t.replace('"shape":[', '"shape":[01,', 1),
    "19 digits": lambda t, r: t.replace('"shape":[', '"shape":[1000000000000000000,0,', 1),
    "bool": lambda t, r: t.replace('"shape":[', '"shape":[true,', 1),
    "null metadata": lambda t, r: t.replace('"__metadata__":{', '"__metadata__":null,"_m":{', 1),
    "trailing garbage": lambda t, r: t + "x",
    "bom": lambda t, r: "\ufeff" + t,
    "control char": lambda t, r: t.replace('"t.', '"\x01t.', 1),
    "invalid utf-8": lambda t, r: t,  # applied to the bytes below
    "truncated": lambda t, r: t[: r.randint(0, len(t))],
}
PLAIN = ("none", "field order", "unsorted offsets", "metadata anywhere", "whitespace", "gap", "18 digits")


@settings(max_examples=400, deadline=None)
@given(st.integers(0, 2**32), st.sampled_from(list(MUTATIONS)), st.booleans())
def test_plain_parser_agrees_with_parse_header(seed, mutation, with_metadata):
    """Whatever the C++ parser accepts, parse_header accepts with the same result; what it declines still opens (or
    fails) exactly as parse_header decides; and a header as json.dumps writes it is never declined."""
    rng = random.Random(seed)
    entries = [e for e in random_entries(seed, count=rng.randint(0, 6)) if e[0] != "__metadata__"]
    metadata = {"format": "pt", "note": "héllo"} if with_metadata else None
    text, data_len = header_text(entries, metadata, rng, mutation)
    text = MUTATIONS[mutation](text, rng)
    raw = text.encode("utf-8", "surrogatepass")
    if mutation == "invalid utf-8":
        raw = raw.replace(b'"t.', b'"\xc0\xaft.', 1)
    raw += b" " * (-len(raw) % 8)
    file_size = 8 + len(raw) + data_len + rng.choice([0, 0, 3])
    prefix = struct.pack("<Q", len(raw))
    try:
        want = parse_header("f", prefix, file_size, lambda n: raw[:n])
    except FormatError as exc:
        want = str(exc)
    fast = native.parse_safetensors_header(raw, 8 + len(raw), file_size - 8 - len(raw))
    if fast is not None:
        meta, table = fast
        assert not isinstance(want, str), want
        assert (None if meta is None else dict(meta)) == want[0]
        assert [TensorInfo(*table.info(i)) for i in range(len(table))] == want[1]
    elif mutation in PLAIN:
        plain = all("\\" not in json.dumps(e[0], ensure_ascii=False) for e in entries)
        assert not plain or isinstance(want, str), f"declined a plain header: {text[:200]}"
    try:
        got = parse_header_table("f", prefix, file_size, lambda n: raw[:n])
    except FormatError as exc:
        got = str(exc)
    if isinstance(want, str):
        assert got == want
    else:
        assert got[0] == want[0] and got[2] == want[2]
        assert [TensorInfo(*got[1].info(i)) for i in range(len(got[1]))] == want[1]


def test_files_written_by_safetensors_take_the_plain_parser(tmp_path):
    sd = {f"layers.{i}.experts.{j}.w{w}": torch.randn(2, 3).to(torch.bfloat16) for i in range(3) for j in range(50)
          for w in (1, 2)}  # fmt: skip
    sd["norm"] = torch.ones(4)
    path = save_st(tmp_path / "e.safetensors", sd, metadata={"format": "pt", "note": "é"})
    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    meta, table = native.parse_safetensors_header(raw[8 : 8 + n], 8 + n, len(raw) - 8 - n)
    assert dict(meta) == {"format": "pt", "note": "é"} and len(table) == len(sd)
    with pysoup.open(path) as ckpt:
        from safetensors import safe_open

        with safe_open(path, "pt") as f:
            assert list(ckpt.keys()) == sorted(f.keys(), key=lambda k: ckpt.infos[k].begin)
        assert len(ckpt.infos) == len(sd) and "norm" in ckpt.infos and "nope" not in ckpt.infos
        assert dict(ckpt.infos.items()) == {k: ckpt.infos[k] for k in ckpt.infos}
        assert list(ckpt.infos.values()) == [ckpt.infos[k] for k in ckpt.keys()]
        for k, v in sd.items():
            assert ckpt.infos[k].shape == tuple(v.shape)
            assert_bit_equal(ckpt[k], v)
        with pytest.raises(KeyError):
            ckpt.infos["nope"]


# -- the plan ------------------------------------------------------------------------------------------------------
def moe_model(seed, layers=4, experts=6, dtype=torch.bfloat16, size=(2, 3)):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i in range(layers):
        sd[f"model.layers.{i}.norm.weight"] = torch.randn(5, generator=g).float()
        for j in range(experts):
            for w in ("w1", "w2", "w3"):
                sd[f"model.layers.{i}.mlp.experts.{j}.{w}.weight"] = torch.randn(*size, generator=g).to(dtype)
    sd["lm_head.weight"] = torch.randn(70_000, generator=g).to(dtype)  # above BATCH_MAX_ELEMENTS
    sd["position_ids"] = torch.arange(9)
    sd["empty"] = torch.empty(0, 3, dtype=dtype)
    return sd


CONFIGS = {
    "linear": ("linear", dict(weights=[1.0, 3.0])),
    "gradient": ("linear", dict(weights=[[0.0, 1.0, 2.0], 1.0])),
    "filters": ("linear", dict(weights=[[{"filter": "w2", "value": [1, 4]}, {"value": 2}], 1.0])),
    "interpolate": ("interpolate", dict(params={"alpha": [{"filter": "experts.3", "value": 0.9}, {"value": 0.2}]})),
    "ties": ("ties", dict(params={"density": [{"filter": "w1", "value": 0.3}, {"value": 0.7}]}, base=True)),
}  # fmt: skip


@pytest.mark.parametrize("config", list(CONFIGS))
def test_plan_once_per_context_is_plan_per_tensor(config):
    """A strategy planned once per distinct context gets, for every tensor, the op it gets planned tensor by tensor."""
    name, kw = CONFIGS[config]
    sds = [moe_model(s) for s in range(3)]
    ckpts = [pysoup.io.checkpoint.open_checkpoint(sd, i) for i, sd in enumerate(sds)]
    base = ckpts.pop() if kw.pop("base", False) else None
    fast, slow = get_strategy(name), get_strategy(name)
    slow.plans_by_name = True
    assert not fast.plans_by_name
    calls = {fast: 0, slow: 0}
    for s in (fast, slow):
        s.plan_tensor = lambda ctx, s=s, plan=s.plan_tensor: calls.__setitem__(s, calls[s] + 1) or plan(ctx)
    a = build_plan(fast, ckpts[:2], base, **kw)
    b = build_plan(slow, ckpts[:2], base, **kw)
    assert calls[fast] < calls[slow] / 4 and calls[slow] == sum(sd[k].is_floating_point() for sd in sds[:1] for k in sd)
    assert [t.name for t in a.tasks] == [t.name for t in b.tasks]
    assert [(t.op, t.sources, t.out_dtype, t.shape) for t in a.tasks] == [
        (t.op, t.sources, t.out_dtype, t.shape) for t in b.tasks
    ]
    assert a.bytes_to_read == b.bytes_to_read


def test_plan_errors_come_in_tensor_order():
    """Checked per tensor in the first input's order: a weight error at an earlier tensor wins over a shape error at
    a later one, and the other way round."""
    sds = [moe_model(s) for s in range(2)]
    sds[1]["model.layers.2.mlp.experts.0.w1.weight"] = torch.zeros(3, 2, dtype=torch.bfloat16)
    ckpts = [pysoup.io.checkpoint.open_checkpoint(sd, i) for i, sd in enumerate(sds)]
    strategy = get_strategy("linear")
    zero_early = [[{"filter": "layers.1.", "value": -1.0}, {"value": 1.0}], 1.0]
    with pytest.raises(PlanError, match="'model.layers.1.norm.weight': weights .* sum to 0"):
        build_plan(strategy, ckpts, weights=zero_early)
    zero_late = [[{"filter": "layers.3.", "value": -1.0}, {"value": 1.0}], 1.0]
    with pytest.raises(PlanError, match=r"'model.layers.2.mlp.experts.0.w1.weight': shape \[3, 2\]"):
        build_plan(strategy, ckpts, weights=zero_late)


# -- the engine's batches ------------------------------------------------------------------------------------------
def nonfinite_model(seed):
    sd = moe_model(seed)
    bad = sd["model.layers.1.mlp.experts.2.w3.weight"]
    bad[0, 1] = float("nan") if seed else float("inf")
    sd["model.layers.3.mlp.experts.5.w1.weight"][1, 2] = float("-inf")
    return sd


def merge_bytes(tmp_path, paths, tag, **kw):
    out = tmp_path / f"{tag}.safetensors"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pysoup.merge(paths, out, progress=False, **kw)
    names = [str(w.message) for w in caught if issubclass(w.category, NonFiniteWarning)]
    return out.read_bytes(), names


@pytest.mark.parametrize("isa", ISAS, ids=id_formatter("isa"))
@pytest.mark.parametrize("threads", [1, 2, 3], ids=id_formatter("threads"))
def test_batches_are_bit_identical_to_one_tensor_at_a_time(tmp_path, monkeypatch, isa, threads):
    """Batched and one tensor at a time give the same bytes and the same non-finite warnings, with batches cut by
    small windows, a small output buffer and dtype changes, so that tensors straddle windows and buffers."""
    monkeypatch.setenv("PYSOUP_CPU_ISA", isa)
    sds = [nonfinite_model(s) for s in range(3)]
    sds[2] = {k: (v.half() if v.dtype == torch.bfloat16 and "w2" in k else v) for k, v in sds[2].items()}
    paths = [save_st(tmp_path / f"m{i}.safetensors", sd) for i, sd in enumerate(sds)]
    kw = dict(weights=[0.5, -1.25, 3.0], threads=threads, dtype="bfloat16")
    batched, warned = merge_bytes(tmp_path, paths, "batched", **kw)
    got = load_file(str(tmp_path / "batched.safetensors"))
    for k, x in sds[0].items():
        if x.is_floating_point():
            assert_bit_equal(got[k], reference.weighted_sum([sd[k] for sd in sds], kw["weights"], torch.bfloat16, True))
        else:
            assert torch.equal(got[k], x)
    assert len(warned) == 2 and all("non-finite" in m for m in warned)
    monkeypatch.setattr(engine, "BATCH_SPAN_BYTES", 40)
    monkeypatch.setattr(pysoup.api, "OUTPUT_BUFFER_BYTES", 64)
    monkeypatch.setattr(reader, "DEFAULT_WINDOW_BYTES", 48)
    assert merge_bytes(tmp_path, paths, "small", **kw) == (batched, warned)
    monkeypatch.setattr(engine, "BATCH_MAX_ELEMENTS", 0)  # one tensor at a time
    assert merge_bytes(tmp_path, paths, "single", **kw) == (batched, warned)


def test_batches_stop_at_shards_of_inputs_and_outputs(tmp_path, monkeypatch):
    """Sharded inputs (a batch reads one shard's window) into a sharded output (a batch writes one file)."""
    sds = [moe_model(s) for s in range(2)]
    dirs = [hf_dir(tmp_path / f"in{i}", sd, shards=3 + i) for i, sd in enumerate(sds)]
    pysoup.merge(dirs, tmp_path / "batched", shard_size="400B", progress=False)
    monkeypatch.setattr(engine, "BATCH_MAX_ELEMENTS", 0)
    pysoup.merge(dirs, tmp_path / "single", shard_size="400B", progress=False)
    files = sorted(p.name for p in (tmp_path / "batched").iterdir())
    assert len([f for f in files if f.endswith(".safetensors")]) > 3
    for f in files:
        assert (tmp_path / "batched" / f).read_bytes() == (tmp_path / "single" / f).read_bytes()


def test_state_dict_inputs_into_a_file_batch_one_tensor_at_a_time(tmp_path, monkeypatch):
    """A state dict's tensors live apart (a group each): mixed with a file, batches hold one tensor, same bytes."""
    sds = [moe_model(s) for s in range(2)]
    path = save_st(tmp_path / "m0.safetensors", sds[0])
    want = merge_bytes(tmp_path, [path, sds[1]], "mixed", weights=[2, 1])
    monkeypatch.setattr(engine, "BATCH_MAX_ELEMENTS", 0)
    assert merge_bytes(tmp_path, [path, sds[1]], "single", weights=[2, 1]) == want


def test_the_python_reference_table_opens_and_merges_the_same(tmp_path, monkeypatch):
    """Without the C++ module's tables (PyTensorTable, format.parse_header alone, the reference helpers), opening
    gives the same infos and a merge the same bytes, through the engine's batches too (one call per tensor)."""
    sds = [moe_model(s) for s in range(2)]
    paths = [save_st(tmp_path / f"m{i}.safetensors", sd) for i, sd in enumerate(sds)]
    want = merge_bytes(tmp_path, paths, "native")
    with pysoup.open(paths[0]) as ckpt:
        infos = dict(ckpt.infos.items())
    import pysoup.engine.plan as plan
    import pysoup.io.checkpoint as checkpoint
    import pysoup.io.format as fmt
    import pysoup.io.writer as writer

    monkeypatch.setattr(fmt, "parse_plain_header", lambda *a: None)
    monkeypatch.setattr(tbl, "TensorTable", tbl.PyTensorTable)
    for module in (checkpoint, writer):
        monkeypatch.setattr(module, "TensorTable", tbl.PyTensorTable)
    monkeypatch.setattr(engine, "batch_end", tbl.py_batch_end)
    monkeypatch.setattr(plan, "take", tbl.py_take)
    monkeypatch.setattr(plan, "sum_by_group", tbl.py_sum_by_group)
    with pysoup.open(paths[0]) as ckpt:
        assert isinstance(ckpt.table, tbl.PyTensorTable) and dict(ckpt.infos.items()) == infos
    assert merge_bytes(tmp_path, paths, "python", backend="reference") == want
    merged = load_file(str(tmp_path / "native.safetensors"))
    for k, v in pysoup.merge(sds, backend="reference").items():
        assert torch.equal(v.view(torch.uint8), merged[k].view(torch.uint8))
