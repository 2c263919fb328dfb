"""pysoup.distributed: the dry run (no Ray), merges as Ray tasks (byte-identical to the local merge for every
registered method, single-file and sharded outputs), faults (a worker killed mid-task, task errors, a killed or
interrupted driver, bad addresses) and merge sweeps, on a real local Ray cluster started once for the module."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
from helpers.checkpoints import save_st, small_model, tree_snapshot
from helpers.cli import ROOT, run_cli
from helpers.methods import METHODS, family

import pysoup
from pysoup.distributed import ClusterError, RayExecutor
from pysoup.distributed.worker import FAULT_ENV
from pysoup.errors import PlanError
from pysoup.strategies import strategy_names

ENV = {"RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": ROOT}
# One xdist worker runs the module (under --dist loadgroup): each worker that ran some of it would start its own
# Ray cluster, ~10 s or more apiece.
pytestmark = pytest.mark.xdist_group("ray")


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    d = tmp_path_factory.mktemp("family")
    bp, fps, _, _ = family(d)
    return d, bp, fps


def _kwargs_for(name, bp, fps, tmp_path):
    """Inputs and arguments for strategy `name`: the backend tests' row where there is one, else the first input
    arrangement (models, base, weights) its planner accepts, so a strategy registered later is covered too."""
    for m in METHODS:
        if m[0] == name:
            _, uses_base, params, model_params = m
            return dict(inputs=fps, strategy=name, base=bp if uses_base else None, params=params,
                        model_params=model_params)  # fmt: skip
    errors = []
    for inputs in (fps, fps[:2], fps[:1]):
        for base in (bp, None):
            for weights in (None, [1.0 / len(inputs)] * len(inputs)):
                kw = dict(inputs=inputs, strategy=name, base=base, weights=weights, params={})
                for _ in range(3):  # a parameter without a default ("needs the parameter t"): 0.5
                    try:
                        pysoup.plan(out=tmp_path / "probe.safetensors", **kw)
                        return kw
                    except PlanError as exc:
                        errors.append(str(exc))
                        missing = re.search(r"needs the parameter (\w+)", str(exc))
                        if missing is None:
                            break
                        kw["params"][missing.group(1)] = 0.5
    raise AssertionError(f"no input arrangement fits strategy {name!r}: {errors}")


def _temporaries(directory):
    return [f for f in os.listdir(directory) if ".pysoup-tmp-" in f]


# -- the dry run: pure local, headers only -----------------------------------------------------------------------
def test_plan_reads_no_tensor_data_and_counts_what_the_merge_does(fam, tmp_path, monkeypatch):
    d, bp, fps = fam
    out = tmp_path / "soup"
    from pysoup.io.checkpoint import FileCheckpoint
    from pysoup.io.reader import SafetensorsReader

    def refuse(*args, **kwargs):
        raise AssertionError("the dry run read tensor data")

    with monkeypatch.context() as m:
        m.setattr(FileCheckpoint, "address_at", refuse)
        m.setattr(SafetensorsReader, "window_address", refuse)
        est = pysoup.plan(fps, out, strategy="ties", base=bp, params={"density": 0.5}, shard_size="100KB")
    assert not out.exists()  # nothing written, not even the directory
    report = pysoup.merge(fps, out, strategy="ties", base=bp, params={"density": 0.5}, shard_size="100KB")
    assert est.bytes_read == report.bytes_read
    assert est.bytes_written == report.bytes_written
    assert [o.path for o in est.outputs] == report.outputs[:-1]  # the index comes last, is not a shard
    assert [o.bytes for o in est.outputs] == [os.path.getsize(p) for p in report.outputs[:-1]]
    assert sum(i.tensor_bytes for i in est.inputs) == est.bytes_read
    assert len({i.tensor_bytes for i in est.inputs}) == 1  # four inputs of one dtype and shape
    assert est.tasks == 1 and est.seconds > 0 and est.peak_memory_bytes > 0
    assert "benchmarks/results/methods.json" in est.format()


def test_plan_tasks_follow_shards_and_task_size(fam, tmp_path):
    d, bp, fps = fam
    one = pysoup.plan(fps, tmp_path / "o.safetensors", executor=RayExecutor())
    assert one.tasks == 1
    split = pysoup.plan(fps, tmp_path / "o.safetensors", executor=RayExecutor(task_size="20KB"), workers=2)
    with pysoup.open(fps[0]) as c:
        tensor_bytes = sum(t.nbytes for t in c.infos.values())  # the output's dtypes are the inputs'
    assert split.tasks > 2 and sum(split.task_bytes_written) == tensor_bytes < split.bytes_written
    assert sum(split.task_bytes_read) == split.bytes_read
    assert max(split.task_bytes_written) <= max(20_000, 300 * 300 * 2)  # a tensor larger than a task is one task
    sharded = pysoup.plan(fps, tmp_path / "dir", shard_size="100KB", executor="ray")
    assert sharded.tasks == len(sharded.outputs) == 3
    assert [o.tasks for o in sharded.outputs] == [1, 1, 1]


def test_plan_command_line(fam, tmp_path):
    d, bp, fps = fam
    out = tmp_path / "soup"
    proc = run_cli("merge", *fps, "--base", bp, "--strategy", "ties", "-o", out, "--plan", "--ray",
                   "--task-size", "50KB", "--workers", "2", "--json", env=ENV)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    est = json.loads(proc.stdout)
    assert est["executor"] == "ray" and est["tasks"] >= 2 and est["workers"] == 2
    assert not out.exists()
    proc = run_cli("merge", *fps, "-o", out, "--plan", "--read-gbps", "0.5", env=ENV)
    assert proc.returncode == 0 and "capped at --read-gbps 0.5" in proc.stdout and "peak memory" in proc.stdout
    proc = run_cli("merge", fps[0], d / "missing.safetensors", "-o", out, "--plan", env=ENV)
    assert proc.returncode == 1 and proc.stderr.startswith("pysoup: error:") and proc.stderr.count("\n") == 1
    proc = run_cli("merge", fps[0], "--lora", d / "adapter", "-o", out, "--plan", env=ENV)
    assert proc.returncode == 1 and "LoRA folds and adapter merges run locally" in proc.stderr
    assert not out.exists()


def test_plan_calibrates_on_this_machine_without_touching_the_inputs(fam, tmp_path, monkeypatch):
    d, bp, fps = fam
    import pysoup.distributed.estimate as estimate

    monkeypatch.setattr(estimate, "CALIBRATION_BYTES", 1 << 20)  # the size only: a real merge still runs
    before = tree_snapshot(d)
    est = pysoup.plan(fps, tmp_path / "c.safetensors", strategy="ties", base=bp, calibrate=True, threads=1)
    line = next(m for m in est.model if "calibrated now" in m)
    rate = float(line.split(":")[1].split("GB/s")[0])
    assert rate > 0 and est.seconds > 0 and "3 x 1 MiB synthetic bf16 + base" in line
    assert tree_snapshot(d) == before and not (tmp_path / "c.safetensors").exists()


def test_plan_memory_estimate_matches_a_merge_process(fam, tmp_path):
    d, bp, fps = fam
    out = str(tmp_path / "m.safetensors")
    est = pysoup.plan(fps, out, strategy="ties", base=bp)
    # VmHWM, not ru_maxrss: a child forked from this (torch-laden) process keeps its parent's ru_maxrss across exec.
    code = (
        "import pysoup\n"
        f"pysoup.merge({fps!r}, {out!r}, strategy='ties', base={bp!r})\n"
        "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **ENV})
    assert proc.returncode == 0, proc.stderr
    measured = int(proc.stdout) * 1024
    # The model's base is a Python 3.9 process with pysoup imported; a 50% band holds across interpreters.
    assert 0.5 * measured < est.peak_memory_bytes < 1.5 * measured, (est.memory_parts, measured)


def test_local_paths_never_import_ray(fam, tmp_path):
    d, bp, fps = fam
    code = (
        "import sys, pysoup\n"
        f"pysoup.merge({fps!r}, {str(tmp_path / 'l.safetensors')!r})\n"
        f"pysoup.plan({fps!r}, {str(tmp_path / 'p')!r}, executor='ray', shard_size='100KB')\n"
        "import pysoup.distributed\n"
        "assert 'ray' not in sys.modules, 'ray was imported'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **ENV})
    assert proc.returncode == 0, proc.stderr


def test_executor_arguments_are_checked_before_any_work(fam, tmp_path, models):
    d, bp, fps = fam
    paths, sds = models
    with pytest.raises(PlanError, match="output path"):
        pysoup.merge(fps, None, executor="ray")
    with pytest.raises(PlanError, match="not state dicts"):
        pysoup.merge(sds, tmp_path / "x.safetensors", executor="ray")
    with pytest.raises(PlanError, match="executor must be"):
        pysoup.merge(fps, tmp_path / "x.safetensors", executor="dask")
    with pytest.raises(ClusterError, match="expected HOST:PORT"):
        pysoup.merge(fps, tmp_path / "x.safetensors", executor=RayExecutor("no-port"))
    assert not (tmp_path / "x.safetensors").exists()


# -- merges on a Ray cluster ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """Two simulated nodes of one CPU each (Ray's own cluster_utils): what ray.init(num_cpus=2) gives, but with
    tasks crossing raylets as on a real cluster."""
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    fault = tmp_path_factory.mktemp("fault") / "fault.json"
    # Workers inherit the environment of the raylets this process starts: the fault hook's file, absent until a
    # test writes it.
    os.environ[FAULT_ENV] = str(fault)
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    quiet = dict(num_cpus=1, object_store_memory=80 << 20)
    cluster = Cluster(initialize_head=True, head_node_args=dict(include_dashboard=False, **quiet))
    cluster.add_node(**quiet)
    ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
    yield ray, fault
    ray.shutdown()
    cluster.shutdown()
    os.environ.pop(FAULT_ENV, None)


@pytest.mark.parametrize("name", strategy_names())
def test_every_method_is_byte_identical_to_the_local_merge(ray_cluster, fam, tmp_path, name):
    d, bp, fps = fam
    kw = _kwargs_for(name, bp, fps, tmp_path)
    inputs = kw.pop("inputs")
    for out, extra, task_size in (("one.safetensors", {}, "20KB"), ("dir", {"shard_size": "100KB"}, None)):
        local = pysoup.merge(inputs, tmp_path / "local" / out, **kw, **extra)
        ex = RayExecutor(task_size=task_size)
        dist = pysoup.merge(inputs, tmp_path / "ray" / out, executor=ex, **kw, **extra)
        assert len(ex.last_tasks) >= 3  # byte ranges of the one file / one task per shard
        assert tree_snapshot(tmp_path / "ray" / out) == tree_snapshot(tmp_path / "local" / out)
        assert dist.bytes_read == local.bytes_read and dist.stats == local.stats and dist.threads == 1
        assert dist.outputs == [p.replace(os.sep + "local" + os.sep, os.sep + "ray" + os.sep) for p in local.outputs]
    assert not _temporaries(tmp_path / "ray") and not _temporaries(tmp_path / "ray" / "dir")


def test_tasks_spread_over_the_nodes(ray_cluster, fam, tmp_path):
    d, bp, fps = fam
    ex = RayExecutor(task_size="1B")  # one task per tensor: 13
    nodes = set()
    for _ in range(3):  # SPREAD is Ray's best effort: a node busy elsewhere may miss one merge's tasks
        pysoup.merge(fps, tmp_path / "s.safetensors", executor=ex)
        nodes |= {t.node for t in ex.last_tasks}
        if len(nodes) == 2:
            break
    assert len(ex.last_tasks) == 13 and len(nodes) == 2


def test_a_worker_killed_mid_task_is_retried_with_the_same_bytes(ray_cluster, fam, tmp_path):
    ray, fault = ray_cluster
    d, bp, fps = fam
    kw = dict(strategy="ties", base=bp, params={"density": 0.4})
    pysoup.merge(fps, tmp_path / "local.safetensors", **kw)
    est = pysoup.plan(fps, tmp_path / "x.safetensors", executor=RayExecutor(task_size="4KB"), **kw)
    assert est.tasks >= 3
    ex = RayExecutor(task_size="4KB")
    probe = pysoup.merge(fps, tmp_path / "probe.safetensors", executor=ex, **kw)
    assert probe.outputs
    victim = next(t for t in ex.last_tasks if t.stop - t.start >= 2)  # halfway is inside its range
    fault.write_text(json.dumps({"start": victim.start, "action": "exit"}))
    pysoup.merge(fps, tmp_path / "ray.safetensors", executor=ex, **kw)
    taken = json.loads(open(str(fault) + ".taken").read())  # the hook fired: this worker process died
    os.unlink(str(fault) + ".taken")
    again = next(t for t in ex.last_tasks if t.start == victim.start)
    assert again.pid != taken["pid"]  # the retry ran in another worker process
    assert (tmp_path / "ray.safetensors").read_bytes() == (tmp_path / "local.safetensors").read_bytes()
    assert not _temporaries(tmp_path)


def test_a_task_error_is_the_local_one_line_error_and_nothing_is_committed(ray_cluster, tmp_path):
    sds = [small_model(seed=s) for s in range(2)]
    sds[1]["lm_head.weight"][0, 0] = 0  # zero patterns differ: the shared-mask check fails in the tensor's task
    paths = [save_st(tmp_path / f"s{i}.safetensors", sd) for i, sd in enumerate(sds)]
    out = tmp_path / "out"
    os.makedirs(out)
    (out / "model.safetensors").write_bytes(b"older output")
    with pytest.raises(PlanError) as local:
        pysoup.merge(paths, out, strategy="sparse", params={"mask": "shared"})
    with pytest.raises(PlanError) as dist:
        pysoup.merge(paths, out, strategy="sparse", params={"mask": "shared"}, shard_size="2KB", executor="ray")
    assert str(dist.value) == str(local.value) and "\n" not in str(dist.value)
    assert (
        sorted(os.listdir(out)) == ["model.safetensors"] and (out / "model.safetensors").read_bytes() == b"older output"
    )
    proc = run_cli("merge", *paths, "--strategy", "sparse", "--param", "mask=shared", "-o", out, "--ray",
                   ray_cluster[0].get_runtime_context().gcs_address, env=ENV)  # fmt: skip
    assert proc.returncode == 1 and proc.stderr == f"pysoup: error: {local.value}\n"


def _driver(address, fps, out, task_size):
    code = (
        "import pysoup, sys\n"
        "from pysoup.distributed import RayExecutor\n"
        f"pysoup.merge({fps!r}, {str(out)!r}, executor=RayExecutor({address!r}, task_size={task_size!r}))\n"
    )
    return subprocess.Popen([sys.executable, "-c", code], env={**os.environ, **ENV}, stderr=subprocess.PIPE, text=True)


def test_an_interrupted_driver_commits_nothing_and_leaves_no_temporaries(ray_cluster, fam, tmp_path):
    ray, fault = ray_cluster
    d, bp, fps = fam
    out = tmp_path / "soup.safetensors"
    out.write_bytes(b"older output")
    fault.write_text(json.dumps({"start": 0, "action": "sleep", "seconds": 60}))

    def interrupt_when_a_task_writes():
        deadline = time.time() + 60
        while not os.path.exists(str(fault) + ".taken") and time.time() < deadline:
            time.sleep(0.02)
        seen.extend(_temporaries(tmp_path))
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C

    seen = []
    threading.Thread(target=interrupt_when_a_task_writes, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        pysoup.merge(fps, out, executor=RayExecutor(task_size="8KB"))
    os.unlink(str(fault) + ".taken")
    assert seen, "the driver had made its temporaries"
    assert out.read_bytes() == b"older output" and not _temporaries(tmp_path)


def test_a_killed_driver_commits_nothing_and_the_next_run_leaves_no_temporaries(ray_cluster, fam, tmp_path):
    ray, fault = ray_cluster
    d, bp, fps = fam
    out = tmp_path / "soup.safetensors"
    fault.write_text(json.dumps({"start": 0, "action": "sleep", "seconds": 60}))
    code = (
        "import pysoup\n"
        "from pysoup.distributed import RayExecutor\n"
        f"pysoup.merge({fps!r}, {str(out)!r}, executor=RayExecutor({ray.get_runtime_context().gcs_address!r}, "
        "task_size='8KB'))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, **ENV}, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not os.path.exists(str(fault) + ".taken") and time.time() < deadline:  # a task is writing
        time.sleep(0.05)
    assert _temporaries(tmp_path), "the driver made its temporaries before the tasks ran"
    proc.kill()
    proc.wait(30)
    os.unlink(str(fault) + ".taken")
    assert not out.exists() and _temporaries(tmp_path)  # named with the dead driver's PID: stale from now on
    pysoup.merge(fps, out, executor=RayExecutor(task_size="8KB"))
    assert not _temporaries(tmp_path)
    pysoup.merge(fps, tmp_path / "local" / "l.safetensors")
    assert out.read_bytes() == (tmp_path / "local" / "l.safetensors").read_bytes()


def test_bad_or_unreachable_addresses_fail_fast(ray_cluster, fam, tmp_path):
    d, bp, fps = fam
    # A port that answers, but not as Ray (what a wrong port number reaches): refused, not retried for minutes.
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def answer_like_ssh():
        for _ in range(2):
            conn, _ = server.accept()
            conn.sendall(b"SSH-2.0-OpenSSH_9.6\r\n")
            conn.close()

    threading.Thread(target=answer_like_ssh, daemon=True).start()
    cases = [
        ("nohost", "expected HOST:PORT"),
        ("127.0.0.1:1", "cannot connect"),
        ("ray://no-such-host.invalid:10001", "unknown host"),
        (f"127.0.0.1:{port}", "not as a Ray cluster"),
    ]
    for address, message in cases:
        t0 = time.perf_counter()
        proc = run_cli("merge", *fps, "-o", tmp_path / "x.safetensors", "--ray", address, env=ENV)
        assert proc.returncode == 1 and message in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
        assert time.perf_counter() - t0 < 15
    with pytest.raises(ClusterError, match="not as a Ray cluster"):
        RayExecutor(f"127.0.0.1:{port}", connect_timeout=2).check_address()
    RayExecutor(ray_cluster[0].get_runtime_context().gcs_address).check_address()  # a real GCS passes
    server.close()
    assert not os.listdir(tmp_path)


# -- sweeps -----------------------------------------------------------------------------------------------------
def test_sweep_writes_each_variant_like_a_local_merge(ray_cluster, fam, tmp_path):
    d, bp, fps = fam
    grid = [dict(strategy="ties", params={"density": x}, name=f"ties-{x}") for x in (0.2, 0.5, 0.8)]
    grid.append(dict(strategy="linear", weights=[0.5, 0.3, 0.2], base=None))
    results = pysoup.distributed.sweep(fps, grid, tmp_path / "sweep", base=bp)
    assert [r.name for r in results] == ["ties-0.2", "ties-0.5", "ties-0.8", "003"]
    for r, v in zip(results, grid):
        kw = {k: val for k, val in v.items() if k != "name"}
        kw.setdefault("base", bp)
        pysoup.merge(fps, tmp_path / "local.safetensors", **kw)
        assert open(r.out, "rb").read() == (tmp_path / "local.safetensors").read_bytes()
        assert r.seconds > 0 and r.report.tensors == 13
    with pytest.raises(PlanError, match="variant 001: .*density"):
        pysoup.distributed.sweep(fps, [dict(strategy="ties"), dict(strategy="ties", params={"density": 7})],
                                 tmp_path / "bad", base=bp)  # fmt: skip
    assert not (tmp_path / "bad").exists()
