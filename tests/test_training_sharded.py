"""Averages of FSDP2-sharded parameters (pysoup.training.sharded): a 2-process gloo group on the CPU, started once
for the file, trains a small MLP with EMA, SWA and WeightEnsemble; each rank's averaged shard must equal, bit for
bit, the same slice of a one-process run on the unsharded model with the same data. Then the files: a gathered
save for pysoup.merge, save_sharded/load_sharded round trips between 2 ranks and 1, and refusals."""

import json
import os
import time

import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)
fully_shard = pytest.importorskip("torch.distributed.fsdp").fully_shard

import pysoup  # noqa: E402
from pysoup.errors import PlanError  # noqa: E402
from pysoup.io.reader import SafetensorsReader  # noqa: E402
from pysoup.training import EMA, SWA, WeightEnsemble  # noqa: E402

WORLD = 2
STEPS = 5
SPAWN_TIMEOUT_S = 240  # two interpreters importing torch on a loaded 2-core machine took ~45 s


def _model():
    """Uneven shards on 2 ranks: 7 rows split 4 + 3, 1 row split 1 + 0 (rank 1 holds empty shards); BatchNorm
    adds float buffers (FSDP2 leaves buffers unsharded) and an integer one."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.BatchNorm1d(7), torch.nn.ReLU(), torch.nn.Linear(7, 1))


def _batches():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(8, 5, generator=g) for _ in range(STEPS)]


def _averages(model):
    return {
        "ema": EMA(model, decay=0.75),
        "swa": SWA(model),
        "weight_ensemble": WeightEnsemble(model, every=2, buffers="average"),
    }


def _train(model, averages):
    """The same steps on every rank and in the reference: each rank sees the whole batch, so FSDP2's averaged
    gradient (g/2 + g/2) is the one-process gradient exactly."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for x in _batches():
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        for a in averages.values():
            a.update()


def _fsdp_slice(t, rank):
    """The rows of a dim-0 shard on `rank`, as FSDP2 splits them (torch.chunk; trailing ranks may get none)."""
    chunks = torch.chunk(t, WORLD, dim=0)
    return chunks[rank] if rank < len(chunks) else t[t.shape[0] :]


def _state(average):
    return {n: t.clone() for n, t in {**average.averaged, **average.copied}.items()}


def _worker(rank, tmp):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=WORLD)
    try:
        model = _model()
        fully_shard(model[0])
        fully_shard(model[3])
        fully_shard(model)
        averages = _averages(model)
        bound = {n: p._local_tensor for n, p in model.named_parameters()}
        _train(model, averages)
        ema = averages["ema"]
        out = {
            "averages": {kind: _state(a) for kind, a in averages.items()},
            "counters": {kind: a._counters() for kind, a in averages.items()},
            "params": {n: p._local_tensor.clone() for n, p in model.named_parameters()},
            "same_local_tensor": {n: p._local_tensor is bound[n] for n, p in model.named_parameters()},
            "sharded": ema.sharded,
        }
        out["save_paths"] = ema.save(f"{tmp}/ema-full.safetensors")
        ema.save_sharded(f"{tmp}/ema-2")
        reloaded = EMA(model, decay=0.75)
        reloaded.load_sharded(f"{tmp}/ema-2")
        out["reloaded"], out["reloaded_step"] = _state(reloaded), reloaded.step
        from_one = EMA(model, decay=0.75)
        from_one.load_sharded(f"{tmp}/ema-1")  # written by the one-process reference
        out["from_one_rank"], out["from_one_rank_step"] = _state(from_one), from_one.step
        x = _batches()[0]
        with torch.no_grad():
            before = model(x).clone()  # FSDP2 leaves the root module all-gathered after a forward without backward
            with ema.swapped():
                out["swapped_output"] = model(x).clone()
            out["output_unchanged_after_swap"] = torch.equal(model(x), before)
        model.reshard()
        out["restored_params"] = {n: p._local_tensor.clone() for n, p in model.named_parameters()}

        # FSDP2 replaces the parameters (load_state_dict(assign=True) gives new DTensors, re-padded where uneven):
        # the average re-binds and reads the new local tensors.
        model.load_state_dict({k: v.detach().clone() for k, v in model.state_dict().items()}, assign=True)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(2)
        expected = {n: t.clone() for n, t in ema.averaged.items()}
        new_locals = {n: p._local_tensor for n, p in model.named_parameters()}
        pysoup.ops.lerp_([expected[n] for n in new_locals], list(new_locals.values()), 0.25)
        ema.update()
        out["rebound"] = all(torch.equal(ema.averaged[n], expected[n]) for n in new_locals)
        out["rebound_moved"] = any(not torch.equal(ema.averaged[n], out["averages"]["ema"][n]) for n in new_locals)
        torch.save(out, f"{tmp}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The one-process reference, then one 2-rank run of _worker; both results."""
    import torch.multiprocessing as mp

    tmp = tmp_path_factory.mktemp("sharded")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks: the same kernels, the same sums
    try:
        model = _model()
        averages = _averages(model)
        _train(model, averages)
        with torch.no_grad(), averages["ema"].swapped():
            swapped_output = model(_batches()[0]).clone()
    finally:
        torch.set_num_threads(threads)
    averages["ema"].save_sharded(tmp / "ema-1")
    reference = {
        "averages": {kind: _state(a) for kind, a in averages.items()},
        "counters": {kind: a._counters() for kind, a in averages.items()},
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "param_names": [n for n, _ in model.named_parameters()],
        "ema_state_dict": {n: t.clone() for n, t in averages["ema"].state_dict_of_average().items()},
        "swapped_output": swapped_output,
    }
    start = time.monotonic()
    context = mp.start_processes(_worker, args=(str(tmp),), nprocs=WORLD, join=False, start_method="spawn")
    try:
        while not context.join(timeout=1):
            if time.monotonic() - start > SPAWN_TIMEOUT_S:
                pytest.fail(f"the {WORLD}-rank run took over {SPAWN_TIMEOUT_S} s")
    finally:
        for p in context.processes:
            if p.is_alive():
                p.kill()
    ranks = [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    return tmp, reference, ranks


def _check_local(reference, got, want, rank):
    assert set(got) == set(want)
    for name, full in want.items():
        expected = _fsdp_slice(full, rank) if name in reference["param_names"] else full
        assert got[name].dtype == expected.dtype and got[name].shape == expected.shape, name
        assert torch.equal(got[name], expected), (name, (got[name] - expected).abs().max())


def test_training_matches_the_unsharded_run(run):
    """The premise of the comparisons below: FSDP2 trains bit for bit like one process here."""
    _, reference, ranks = run
    for rank, out in enumerate(ranks):
        _check_local(reference, out["params"], reference["params"], rank)
    assert ranks[1]["params"]["3.weight"].shape == (0, 7)  # an empty shard was exercised


@pytest.mark.parametrize("kind", ["ema", "swa", "weight_ensemble"])
def test_each_rank_averages_its_shard_bit_for_bit(run, kind):
    _, reference, ranks = run
    for rank, out in enumerate(ranks):
        assert out["sharded"]
        _check_local(reference, out["averages"][kind], reference["averages"][kind], rank)
        assert out["counters"][kind] == reference["counters"][kind]


def test_fsdp2_keeps_local_tensors_across_steps(run):
    """The finding the binding relies on: optimizer steps, all-gathers and reshards leave each parameter's
    local tensor (object and memory) where fully_shard put it, on every rank."""
    _, _, ranks = run
    for out in ranks:
        assert all(out["same_local_tensor"].values()), out["same_local_tensor"]


def test_save_gathers_the_full_average_on_rank_0_for_merge(run):
    tmp, reference, ranks = run
    path = tmp / "ema-full.safetensors"
    assert ranks[0]["save_paths"] == [str(path)] and ranks[1]["save_paths"] == []
    reader = SafetensorsReader(str(path))
    try:
        assert set(reader.infos) == set(reference["ema_state_dict"])
        for name, want in reference["ema_state_dict"].items():
            assert torch.equal(reader.torch(name), want), name
    finally:
        reader.close()
    soup = pysoup.merge([str(path), str(path)], strategy="uniform")
    for name, want in reference["ema_state_dict"].items():
        if want.dtype.is_floating_point:
            assert torch.equal(soup[name], want), name


def test_save_sharded_writes_one_file_per_rank_with_the_layout(run):
    tmp, _, _ = run
    files = sorted(os.listdir(tmp / "ema-2"))
    assert files == ["rank-00000-of-00002.safetensors", "rank-00001-of-00002.safetensors"]
    readers = [SafetensorsReader(str(tmp / "ema-2" / f)) for f in files]
    try:
        headers = [json.loads(r.metadata["pysoup.sharded"]) for r in readers]
        assert [h["rank"] for h in headers] == [0, 1] and {h["world_size"] for h in headers} == {2}
        assert headers[1]["counters"] == {"step": STEPS}
        weight = headers[1]["tensors"]["0.weight"]
        assert weight["shape"] == [7, 5] and weight["offset"] == [4, 0] and weight["mesh"] == [2]
        assert weight["placements"] == ["Shard(dim=0)"] and readers[1].infos["0.weight"].shape == (3, 5)
        assert "3.weight" not in headers[1]["tensors"]  # rank 1's shard is empty
        assert headers[1]["tensors"]["1.running_mean"]["offset"] == [0]  # buffers are whole on each rank
    finally:
        for r in readers:
            r.close()


def test_save_sharded_round_trip_on_two_ranks(run):
    _, reference, ranks = run
    for rank, out in enumerate(ranks):
        _check_local(reference, out["reloaded"], reference["averages"]["ema"], rank)
        assert out["reloaded_step"] == STEPS


def test_one_rank_save_loads_onto_two_ranks(run):
    _, reference, ranks = run
    for rank, out in enumerate(ranks):
        _check_local(reference, out["from_one_rank"], reference["averages"]["ema"], rank)
        assert out["from_one_rank_step"] == STEPS


def test_two_rank_save_loads_onto_one_unsharded_model(run):
    tmp, reference, _ = run
    ema = EMA(_model(), decay=0.75)
    ema.load_sharded(tmp / "ema-2")
    assert ema.step == STEPS
    for name, want in reference["averages"]["ema"].items():
        assert torch.equal({**ema.averaged, **ema.copied}[name], want), name


def test_swapped_evaluates_the_average_and_restores_the_shards(run):
    _, reference, ranks = run
    for rank, out in enumerate(ranks):
        assert torch.equal(out["swapped_output"], reference["swapped_output"])
        assert out["output_unchanged_after_swap"]
        _check_local(reference, out["restored_params"], reference["params"], rank)


def test_rebinds_when_fsdp2_replaces_the_parameters(run):
    _, _, ranks = run
    for out in ranks:
        assert out["rebound"] and out["rebound_moved"]


# -- files, without a process group ----------------------------------------------------------------------------
def _saved(tmp_path, kind=EMA):
    average = kind(_model())
    average.save_sharded(tmp_path / "avg")
    return average


def test_load_sharded_refuses_another_kind(tmp_path):
    _saved(tmp_path, SWA)
    with pytest.raises(PlanError, match="the save is of a 'SWA', not a EMA"):
        EMA(_model()).load_sharded(tmp_path / "avg")


def test_load_sharded_refuses_a_missing_rank(tmp_path):
    _saved(tmp_path)
    os.rename(
        tmp_path / "avg" / "rank-00000-of-00001.safetensors", tmp_path / "avg" / "rank-00000-of-00002.safetensors"
    )
    with pytest.raises(PlanError, match="rank-00001-of-00002.safetensors is missing"):
        EMA(_model()).load_sharded(tmp_path / "avg")


def test_load_sharded_refuses_files_of_two_saves(tmp_path):
    _saved(tmp_path)
    (tmp_path / "avg" / "rank-00000-of-00003.safetensors").write_bytes(b"")
    with pytest.raises(PlanError, match="saves by 1 and 3 ranks"):
        EMA(_model()).load_sharded(tmp_path / "avg")


def test_load_sharded_refuses_another_shape_and_writes_nothing(tmp_path):
    _saved(tmp_path)
    other = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.BatchNorm1d(7), torch.nn.ReLU(), torch.nn.Linear(7, 2))
    ema = EMA(other)
    before = _state(ema)
    with pytest.raises(PlanError, match=r"'3.weight' is \[1, 7\] in the save, \[2, 7\] here"):
        ema.load_sharded(tmp_path / "avg")
    assert all(torch.equal(before[n], t) for n, t in _state(ema).items())


def test_load_sharded_refuses_a_directory_without_saves(tmp_path):
    with pytest.raises(PlanError, match="no such directory"):
        EMA(_model()).load_sharded(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PlanError, match="no rank-RRRRR-of-WWWWW.safetensors files"):
        EMA(_model()).load_sharded(tmp_path / "empty")


def test_save_sharded_of_an_unsharded_average_replaces_other_world_sizes(tmp_path):
    (tmp_path / "avg").mkdir()
    (tmp_path / "avg" / "rank-00001-of-00002.safetensors").write_bytes(b"stale")
    (tmp_path / "avg" / "notes.txt").write_text("kept")
    ema = _saved(tmp_path, lambda m: EMA(m, dtype=torch.bfloat16))
    assert sorted(os.listdir(tmp_path / "avg")) == ["notes.txt", "rank-00000-of-00001.safetensors"]
    again = EMA(_model(), dtype=torch.bfloat16)
    with torch.no_grad():
        for t in again.averaged.values():
            t.zero_()
    again.load_sharded(tmp_path / "avg")
    assert all(torch.equal(again.averaged[n], t) for n, t in ema.averaged.items())
