"""The engine: chunking and windowing never change the bytes; two-pass ops see every element once."""

from dataclasses import dataclass, field

import torch
from helpers.checkpoints import hf_dir, save_st, small_model
from helpers.tensors import assert_bit_equal
from safetensors.torch import load_file

import pysoup
import pysoup.engine.execute as engine
import pysoup.io.reader as reader
from pysoup.ops import reference
from pysoup.strategies import _REGISTRY, register
from pysoup.strategies.base import Strategy
from pysoup.strategies.tensor_op import TensorOp


def test_chunking_does_not_change_bytes(tmp_path, models, monkeypatch):
    paths, _ = models
    pysoup.merge(paths, tmp_path / "big.safetensors", weights=[1, 2, 3])
    monkeypatch.setattr(engine, "CHUNK_ELEMENTS", 1000)
    monkeypatch.setattr(engine, "OUTPUT_BUFFER_BYTES", 4096)
    monkeypatch.setattr(reader, "DEFAULT_WINDOW_BYTES", 8192)
    pysoup.merge(paths, tmp_path / "small.safetensors", weights=[1, 2, 3])
    assert (tmp_path / "big.safetensors").read_bytes() == (tmp_path / "small.safetensors").read_bytes()


@dataclass(frozen=True)
class ScaleByMax(TensorOp):
    """A two-pass op for the test: pass 0 finds max|x0|, pass 1 counts the elements equal to it;
    out = x0 / max|x0|."""

    seen: list = field(default_factory=list, compare=False)

    def reduce_passes(self, backend):
        return 2

    def begin(self, backend, name, numel):
        return {"max": 0.0, "at_max": 0}

    def reduce(self, backend, chunk, state, pass_):
        x = reference._view(chunk.addrs[0], chunk.n, chunk.dtypes[0]).float().abs()
        if pass_ == 0:
            state["max"] = max(state["max"], float(x.max()))
            self.seen.append((chunk.name, chunk.start, chunk.n))
        else:
            state["at_max"] += int((x == state["max"]).sum())

    def end_pass(self, state, pass_):
        if pass_ == 0:
            state["scale"] = 1.0 / state["max"]

    def combine(self, backend, chunk, state):
        assert state["at_max"] >= 1  # the second pass ran after the first
        return backend.weighted_sum_raw(chunk, [state["scale"]], False)


def test_two_pass_op_sees_every_element_once(tmp_path, models, monkeypatch):
    paths, sds = models
    monkeypatch.setattr(engine, "CHUNK_ELEMENTS", 100)
    seen = []

    @register
    class _ScaleByMax(Strategy):
        name = "_test_scale_by_max"

        def plan_tensor(self, ctx):
            return ScaleByMax(seen)

    try:
        pysoup.merge(paths[:1], tmp_path / "o.safetensors", strategy="_test_scale_by_max")
    finally:
        del _REGISTRY["_test_scale_by_max"]
    got = load_file(str(tmp_path / "o.safetensors"))
    for k, x in sds[0].items():
        covered = sorted((s, n) for name, s, n in seen if name == k)
        assert sum(n for _, n in covered) == x.numel()
        assert all(a[0] + a[1] == b[0] for a, b in zip(covered, covered[1:]))
        want = reference.weighted_sum([x], [1.0 / float(x.float().abs().max())], torch.bfloat16, False)
        assert_bit_equal(got[k], want)


def test_windows_release_memory(tmp_path):
    """After a merge the engine holds no mapping of any input: every window was unmapped."""
    sds = [small_model(seed=s, hidden=64) for s in range(2)]
    paths = [save_st(tmp_path / f"w{i}.safetensors", sd) for i, sd in enumerate(sds)]
    ckpts = [pysoup.open(p) for p in paths]
    from pysoup.engine.plan import build_plan
    from pysoup.strategies import get_strategy

    plan = build_plan(get_strategy("linear"), ckpts)
    from pysoup.io.writer import MemorySink

    engine.execute(plan, MemorySink(plan.entries), pysoup.ops.get_backend("cpu", threads=2), progress=False)
    assert all(r._window is None for c in ckpts for r in c._readers)
    maps = open("/proc/self/maps").read()
    assert not any(p in maps for p in paths)
    for c in ckpts:
        c.close()


def test_one_window_per_sharded_input(tmp_path, models):
    """Reading across shards keeps one mapped window per input, not one per shard (resident memory)."""

    _, sds = models
    d = hf_dir(tmp_path / "sharded", sds[0], shards=3)
    with pysoup.open(d) as ckpt:
        for name, info in ckpt.infos.items():
            ckpt.address(name, info.begin, info.end)
            assert sum(r._window is not None for r in ckpt._readers) <= 1
