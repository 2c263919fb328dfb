"""OffloadedEMA against pysoup.training.EMA, bit for bit: the chunked copy-to-host pipeline (run on CPU tensors
here: the "device-to-host copy" is a memcpy into the staging slot) must give EMA's bytes after every update."""

import copy
import os
import subprocess
import sys
import threading

import pytest
import torch

from pysoup.errors import PlanError
from pysoup.training import EMA
from pysoup.training.offload import MIN_CHUNK_BYTES, OffloadedEMA, pack_chunks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
on_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class Net(torch.nn.Module):
    """A matrix larger than a 1 MiB chunk (768 x 768: 2.25 MiB in fp32, split across three chunks), BatchNorm
    buffers (averaged floats and an int64 counter), and 300 tiny tensors of odd sizes."""

    def __init__(self, dtype=torch.float32, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.big = torch.nn.Linear(768, 768)
        self.bn = torch.nn.BatchNorm1d(768)
        self.tiny = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(1 + i % 7)) for i in range(300)])
        self.head = torch.nn.Linear(768, 5)
        self.to(dtype)

    def forward(self, x):
        return self.head(self.bn(self.big(x)).relu()) + 0.01 * torch.cat(list(self.tiny)).sum()


def train(model, steps, averages=(), seed=1, start=0, opt=None):
    """SGD steps on random data, every average updated after each step (opt: an optimizer to keep using)."""
    g = torch.Generator().manual_seed(seed)
    opt = opt or torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.5)
    dtype = next(model.parameters()).dtype
    for _ in range(start):
        torch.randn(16, 768, generator=g)
    for _ in range(steps):
        loss = model(torch.randn(16, 768, generator=g).to(dtype)).float().square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        for a in averages:
            a.update()
    return opt


def assert_same_bytes(ours, theirs):
    ours.wait()
    assert ours.averaged.keys() == theirs.averaged.keys() and ours.copied.keys() == theirs.copied.keys()
    for store in ("averaged", "copied"):
        for n, t in getattr(theirs, store).items():
            got = getattr(ours, store)[n]
            assert got.dtype == t.dtype and got.shape == t.shape, n
            assert not t.is_floating_point() or t.isfinite().all(), n  # training stayed finite: bits mean something
            assert torch.equal(got.reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)), (store, n)


def test_pack_chunks_covers_every_element_once_aligned():
    numels, sizes, cap = [0, 5, 700_000, 3, 1, 262_144, 9], [4, 2, 4, 2, 4, 4, 2], MIN_CHUNK_BYTES
    chunks = pack_chunks(numels, sizes, cap)
    seen = {i: [] for i in range(len(numels))}
    for chunk in chunks:
        end_bytes = 0
        for i, start, end, off in chunk:
            assert off % 64 == 0 and off >= end_bytes and start < end
            end_bytes = off + (end - start) * sizes[i]
            seen[i].append((start, end))
        assert end_bytes <= cap
    for i, n in enumerate(numels):
        covered = 0
        for start, end in seen[i]:
            assert start == covered
            covered = end
        assert covered == n
    assert len(seen[2]) == 3 and len(chunks) == 4  # 2.8 MB split over three chunks; the next ones follow


@pytest.mark.parametrize("hooked", [True, False], ids=["optimizer-hook", "update-fences"])
@pytest.mark.parametrize(
    "schedule",
    [{"decay": 0.9}, {"decay": 0.99, "warmup": True, "update_every": 3, "start_step": 2}],
    ids=["plain", "warmup-every3-start2"],
)
@pytest.mark.parametrize(
    "model_dtype,avg_dtype",
    [(torch.float32, None), (torch.bfloat16, None), (torch.bfloat16, torch.float32)],
    ids=["fp32", "bf16", "bf16-avg-fp32"],
)
def test_matches_ema_bit_for_bit(model_dtype, avg_dtype, schedule, hooked):
    model = Net(model_dtype)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.5)
    theirs = EMA(model, dtype=avg_dtype, **schedule)
    ours = OffloadedEMA(
        model, dtype=avg_dtype, chunk_bytes=MIN_CHUNK_BYTES, optimizer=opt if hooked else None, **schedule
    )
    assert ours.chunks >= (3 if model_dtype == torch.float32 else 2)
    for _ in range(3):
        train(model, 3, [theirs, ours], opt=opt)
        assert_same_bytes(ours, theirs)
    assert ours.step == theirs.step == 9
    ours.close()


def test_update_returns_while_the_host_lerp_runs():
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    theirs = EMA(model, 0.9)
    ours = OffloadedEMA(model, 0.9, chunk_bytes=MIN_CHUNK_BYTES, optimizer=opt)
    gate = gate_chunk(ours, ours.chunks - 1)
    train(model, 1, [theirs], opt=opt)
    ours.update()
    assert not ours._pipeline.future.done()  # the host work goes on after update() returned
    gate.set()
    assert_same_bytes(ours, theirs)
    ours.close()


def gate_chunk(ours, k):
    """Makes the host lerp of chunk k wait for the returned event."""
    gate, chunk = threading.Event(), ours._pipeline.chunks[k]
    lerp = chunk.lerp
    chunk.lerp = lambda t: (gate.wait(), lerp(t))
    return gate


def test_the_next_optimizer_step_waits_for_the_copies():
    """With three chunks or more, chunk 2's copy waits for the host lerp of chunk 0 (two staging slots): the next
    optimizer step, which writes the weights, must wait for it (its step pre-hook)."""
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    theirs = EMA(model, 0.9)
    ours = OffloadedEMA(model, 0.9, chunk_bytes=MIN_CHUNK_BYTES, optimizer=opt)
    assert ours.chunks >= 3
    gate, order = gate_chunk(ours, 0), []
    train(model, 1, [theirs], opt=opt)
    ours.update()
    assert not ours._pipeline.all_copied.is_set()  # update() returned with copies still to issue
    release = threading.Timer(0.2, lambda: (order.append("lerp 0 released"), gate.set()))
    release.start()
    train(model, 1, [], opt=opt)
    order.append("next optimizer step done")
    release.join()
    assert order == ["lerp 0 released", "next optimizer step done"]
    assert_same_bytes(ours, theirs)
    ours.close()


def test_without_an_optimizer_update_waits_for_the_copies():
    model = Net()
    theirs = EMA(model, 0.9)
    ours = OffloadedEMA(model, 0.9, chunk_bytes=MIN_CHUNK_BYTES)
    first, last = gate_chunk(ours, 0), gate_chunk(ours, ours.chunks - 1)
    train(model, 1, [theirs])
    release = threading.Timer(0.2, first.set)
    release.start()
    ours.update()  # returns once chunk 2 is copied, so after chunk 0's lerp; the last lerp is still to come
    assert first.is_set() and ours._pipeline.all_copied.is_set() and not ours._pipeline.future.done()
    last.set()
    train(model, 1, [theirs, ours])
    assert_same_bytes(ours, theirs)
    ours.close()


def test_resuming_gives_the_same_bytes_and_the_state_is_emas():
    """Averages resumed from a state (an OffloadedEMA's into either class, an EMA's into an OffloadedEMA) go on as
    the uninterrupted ones. All follow one model: two training runs on this CPU need not be bit-identical."""
    kw = {"decay": 0.8, "warmup": True}
    model = Net()
    opt = train(model, 0)
    straight, e = OffloadedEMA(model, chunk_bytes=MIN_CHUNK_BYTES, **kw), EMA(model, **kw)
    train(model, 4, [straight, e], opt=opt)
    resumed = [OffloadedEMA(model, **kw), EMA(model, **kw), OffloadedEMA(model, **kw)]
    for c, state in zip(resumed, (straight.state_dict(), straight.state_dict(), e.state_dict())):
        c.load_state_dict(state)
    train(model, 5, [straight, e, *resumed], opt=opt)
    for c in (straight, resumed[0], resumed[2]):
        assert_same_bytes(c, e)
    assert all(torch.equal(resumed[1].averaged[n], t) for n, t in e.averaged.items())
    assert [c.step for c in (straight, e, *resumed)] == [9] * 5


def test_save_writes_the_same_file_as_ema(tmp_path):
    model = Net(torch.bfloat16)
    theirs, ours = EMA(model, 0.9, dtype=torch.float32), OffloadedEMA(model, 0.9, dtype=torch.float32)
    train(model, 3, [theirs, ours])
    ours.save(tmp_path / "ours.safetensors")
    theirs.save(tmp_path / "theirs.safetensors")
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "theirs.safetensors").read_bytes()
    ours.save_sharded(tmp_path / "sharded")  # the per-rank files, here one rank: either class reads them back
    for cls in (EMA, OffloadedEMA):
        back = cls(model, 0.9, dtype=torch.float32)
        back.load_sharded(tmp_path / "sharded")
        assert back.step == 3 and all(torch.equal(back.averaged[n], t) for n, t in theirs.averaged.items())


def test_swapped_holds_the_average_and_restores_the_model():
    model = Net()
    ours = OffloadedEMA(model, 0.5, chunk_bytes=MIN_CHUNK_BYTES)
    train(model, 3, [ours])
    before = copy.deepcopy(model.state_dict())
    with ours.swapped() as m:
        for n, t in m.state_dict().items():
            assert torch.equal(t, {**ours.averaged, **ours.copied}[n]), n
    for n, t in model.state_dict().items():
        assert torch.equal(t, before[n]), n


BAD = [  # the same arguments are refused the same way by EMA and OffloadedEMA
    (lambda m: (m,), {"decay": 1.5}, "decay must be a number in"),
    (lambda m: (m,), {"buffers": "keep"}, "buffers must be one of"),
    (lambda m: (m,), {"dtype": torch.int32}, "dtype must be"),
    (lambda m: ("model",), {}, "torch.nn.Module"),
    (lambda m: (m,), {"update_every": 0}, "update_every"),
    (lambda m: (m,), {"start_step": -1}, "start_step"),
    (lambda m: (m,), {"warmup_gamma": 0}, "warmup_gamma"),
    (lambda m: (torch.nn.ReLU(),), {}, "no float parameters"),
]


@pytest.mark.parametrize("args,kwargs,match", BAD, ids=lambda x: x if isinstance(x, str) else "")
def test_bad_arguments_as_ema(args, kwargs, match):
    for cls in (EMA, OffloadedEMA):
        with pytest.raises(PlanError, match=match):
            cls(*args(Net()), **kwargs)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"chunk_bytes": MIN_CHUNK_BYTES - 1}, "chunk_bytes must be an integer of at least 1 MiB"),
        ({"chunk_bytes": True}, "chunk_bytes"),
        ({"chunk_bytes": float(1 << 22)}, "chunk_bytes"),
        ({"chunk_bytes": "64M"}, "chunk_bytes"),
        ({"threads": 0}, "threads must be a positive integer"),
        ({"optimizer": "sgd"}, "optimizer must be a torch.optim.Optimizer"),
    ],
    ids=lambda x: x if isinstance(x, str) else "",
)
def test_bad_offload_arguments(kwargs, match):
    with pytest.raises(PlanError, match=match):
        OffloadedEMA(Net(), **kwargs)


def test_a_replaced_tensor_and_a_closed_average_are_refused():
    model = Net()
    ours = OffloadedEMA(model, 0.9)
    model.big.weight.data = model.big.weight.data.clone()
    with pytest.raises(PlanError, match=r"OffloadedEMA: 'big.weight' no longer holds the memory"):
        ours.update()
    assert ours.step == 0
    ours.close()
    with pytest.raises(PlanError, match="after close"):
        ours.update()
    assert set(ours.state_dict()["averaged"]) == set(ours.averaged)  # still readable


def test_a_failed_copy_is_not_counted_and_does_not_block_the_next_step():
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    theirs = EMA(model, 0.9)
    ours = OffloadedEMA(model, 0.9, chunk_bytes=MIN_CHUNK_BYTES, optimizer=opt)
    pipeline, copy_ = ours._pipeline, ours._pipeline._copy
    pipeline._copy = lambda chunk: (_ for _ in ()).throw(RuntimeError("copy failed"))
    train(model, 1, [], opt=opt)
    with pytest.raises(RuntimeError, match="copy failed"):
        ours.update()
    assert ours.step == 0
    pipeline._copy = copy_
    train(model, 1, [theirs, ours], opt=opt)  # the optimizer's pre-hook does not wait for copies never issued
    train(model, 1, [theirs, ours], opt=opt)
    assert_same_bytes(ours, theirs)
    assert ours.step == theirs.step == 2
    ours.close()


@pytest.mark.slow
def test_quick_benchmark_runs(tmp_path):
    """benchmarks/training.py --quick, as a user would run it (its own process): ~7 s on 2 idle cores."""
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "training.py"), "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = (tmp_path / "training-quick.md").read_text()
    assert "| pysoup EMA |" in text and "AveragedModel" in text


@pytest.mark.gpu
@on_gpu
def test_gpu_matches_the_on_device_ema_and_uses_no_gpu_memory():
    model = Net().cuda()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.5)
    data = [torch.randn(16, 768, generator=torch.Generator().manual_seed(s)) for s in range(13)]

    def step(x, *averages):
        model(x.cuda()).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        for a in averages:
            a.update()

    step(data[0])  # the optimizer's momentum exists from here on
    theirs = EMA(model, 0.9)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    ours = OffloadedEMA(model, 0.9, chunk_bytes=MIN_CHUNK_BYTES, optimizer=opt)
    for x in data[1:]:
        step(x, theirs, ours)
    ours.wait()
    torch.cuda.synchronize()
    # the offload holds nothing on the GPU (the slack: the on-device EMA's launch table, made on its first call)
    assert torch.cuda.memory_allocated() - before < 1 << 20
    for store in ("averaged", "copied"):
        for n, t in getattr(theirs, store).items():
            got = getattr(ours, store)[n]
            assert got.device.type == "cpu" and got.is_pinned(), n
            assert torch.equal(got.reshape(-1).view(torch.uint8), t.cpu().reshape(-1).view(torch.uint8)), n
    ours.close()
