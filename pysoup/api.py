"""The public entry points: merge, open, info."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping

from pysoup._version import __version__
from pysoup.dtypes import parse_dtype
from pysoup.engine.execute import OUTPUT_BUFFER_BYTES, execute
from pysoup.engine.plan import build_plan
from pysoup.engine.report import MergeReport
from pysoup.errors import PlanError
from pysoup.io.checkpoint import open_checkpoint, open_inputs
from pysoup.io.signals import cleanup_on_termination
from pysoup.io.units import parse_size
from pysoup.io.writer import MemorySink, OutputTarget
from pysoup.strategies import get_strategy


def merge(
    inputs,
    out=None,
    *,
    strategy="linear",
    weights=None,
    base=None,
    params=None,
    model_params=None,
    dtype=None,
    backend="auto",
    device=None,
    threads=None,
    shard_size=None,
    progress=None,
    lora=None,
    lora_rank=None,
    durable=False,
    executor=None,
):
    """Merges checkpoints of one architecture into one.

    Args:
        inputs: safetensors files, Hugging Face model directories (single file or sharded with an index), or
            state dicts of torch tensors; mixing is allowed.
        out: a `.safetensors` path, a directory (sharded like Hugging Face), or None to get a dict of torch
            tensors back.
        strategy: a registered merge method ("linear", "uniform", ...).
        weights: one weight per input: a number, a list interpolated over layers, or [{filter, value}] entries.
        base: the base model, for methods that use one.
        params: strategy parameters, e.g. {"normalize": False} or {"density": 0.5} (then for every model).
        model_params: one dict of per-model parameters per input, e.g. [{"density": 0.5}, {"density": 0.7}].
        dtype: output dtype of merged tensors ("bfloat16", "float16", "float32"); default: the first input's.
        backend: "auto", "cpu" or "reference" for a merge on the CPU; "auto" or "triton" with `device`.
        device: None (the CPU), or a CUDA device ("cuda", "cuda:1"): the inputs stream through pinned buffers to
            that GPU, the Triton kernels merge there, and the result comes back to the same files, bit for bit.
        threads: CPU threads for the kernels (default: all cores this process may use).
        shard_size: max tensor bytes per shard for directory outputs ("5GB", "500MiB" or an int).
        progress: show a progress bar (default: when stderr is a terminal).
        lora: how to merge PEFT LoRA adapter directories given as inputs (required for them): "delta" (the exact
            combination of their updates ΔWᵢ = sᵢBᵢAᵢ, refactored by concatenation, or by truncated SVD when
            `lora_rank` is given) or "factors" (A and B combined separately). The result is an adapter directory;
            the report a pysoup.lora.AdapterMergeReport (docs/lora.md). Fold adapters into a model with
            pysoup.lora.fold.
        lora_rank: the merged adapter's rank in "delta" mode (truncated SVD); default: concatenation, exact.
        durable: fsync the output before renaming it into place.
        executor: None (this process), "ray" (one Ray task per output shard or byte range, on the cluster
            `ray.init` finds or starts) or a `pysoup.distributed.RayExecutor` (address, task size, CPUs per
            task); the output's bytes are the same. Inputs must be paths every node sees.

    Returns:
        A MergeReport when `out` is given, else a dict of torch tensors in the first input's key order.

    Example:
        >>> report = merge(["a.safetensors", "b.safetensors"], "soup.safetensors", weights=[0.7, 0.3])  # doctest: +SKIP
        >>> soup = merge([sd_a, sd_b], strategy="uniform")  # doctest: +SKIP
    """
    from pysoup.ops.cpu import default_threads

    start = time.perf_counter()
    if isinstance(inputs, (str, os.PathLike, Mapping)):
        raise PlanError("inputs must be a list of checkpoints (paths or state dicts)")
    inputs = list(inputs)
    strat = get_strategy(strategy)
    out_dtype = parse_dtype(dtype)
    if shard_size is not None:
        shard_size = parse_size(shard_size)
    threads = int(threads) if threads else default_threads()
    if threads < 1:
        raise PlanError(f"threads must be positive, got {threads}")
    be = _backend_for(backend, device, threads)
    if out is not None and os.fspath(out) == "":
        raise PlanError("empty output path")
    if lora is not None or any(_is_adapter(p) for p in inputs):
        return _merge_adapters(
            inputs, out, lora, lora_rank, strategy, weights, base, params, model_params, dtype, backend
        )
    if executor is not None:  # pysoup.distributed imports Ray only when a merge runs on it
        from pysoup.distributed import resolve_executor

        executor = resolve_executor(executor, inputs, base, out, device)

    opened = []
    with cleanup_on_termination():  # SIGTERM / SIGHUP clean up like Ctrl-C
        try:
            base_ckpt = open_inputs(inputs, base, opened)
            plan = build_plan(
                strat,
                opened[: len(inputs)],
                base_ckpt,
                weights=weights,
                params=params,
                model_params=model_params,
                out_dtype=out_dtype,
            )

            if out is None:
                sink = MemorySink(plan.entries)
                with be.activate():
                    execute(plan, sink, be, progress)
                return {name: sink.tensors[name] for name in plan.state_dict_order()}

            input_files = [f for c in opened for f in c.files]
            aux = opened[0].aux_files()
            metadata = {"format": "pt"}
            target = OutputTarget(
                out,
                plan.entries,
                shard_size=shard_size,
                metadata=metadata,
                input_files=input_files,
                aux_files=aux,
                durable=durable,
            )
            if executor is not None:
                spec = dict(strategy=strat.name, weights=weights, params=params, model_params=model_params)
                spec.update(out_dtype=out_dtype, shard_size=shard_size, backend=backend, durable=durable)
                nonfinite, stats, notes = executor.run(plan, target, inputs, base, spec, progress)
            else:
                with target.streaming(OUTPUT_BUFFER_BYTES) as sink, be.activate():
                    nonfinite, (stats, notes) = execute(plan, sink, be, progress)
            threads_used = executor.num_cpus if executor is not None else threads  # on Ray: per task
            return MergeReport.of_files(start, plan, target, strat.name, be, threads_used, nonfinite, stats, notes)
        finally:
            for c in opened:
                c.close()


def plan(
    inputs,
    out,
    *,
    strategy="linear",
    weights=None,
    base=None,
    params=None,
    model_params=None,
    dtype=None,
    threads=None,
    shard_size=None,
    executor=None,
    workers=None,
    read_gbps=None,
    calibrate=False,
):
    """A dry run of `merge`: what it would read and write, its tasks, peak memory and time, from the headers alone.

    Every check a merge makes before writing is made (the same errors); no tensor data is read, nothing written.

    Args:
        inputs, out, strategy, weights, base, params, model_params, dtype, threads, shard_size: as for `merge`.
        executor: None (this process) or "ray" / a `pysoup.distributed.RayExecutor` (its tasks: one per output
            shard, or per `task_size` bytes of one); Ray is not imported.
        workers: Ray tasks running at once, for the time estimate (default: 1).
        read_gbps: the inputs' storage read bandwidth in GB/s when slower than the page cache.
        calibrate: time the strategy on this machine now (a merge of small synthetic inputs, ~a second) instead of
            using the rates measured by the repository's benchmarks.

    Returns:
        A `pysoup.distributed.MergeEstimate`; `.format()` is what `pysoup merge --plan` prints.

    Example:
        >>> print(pysoup.plan(["a/", "b/"], "soup/", strategy="ties", base="base/").format())  # doctest: +SKIP
    """
    from pysoup.distributed import plan_merge

    return plan_merge(
        inputs,
        out,
        strategy=strategy,
        weights=weights,
        base=base,
        params=params,
        model_params=model_params,
        dtype=dtype,
        threads=threads,
        shard_size=shard_size,
        executor=executor,
        workers=workers,
        read_gbps=read_gbps,
        calibrate=calibrate,
    )


def _backend_for(backend, device, threads):
    """The backend a merge runs on: for `device`, the triton backend streaming to it."""
    from pysoup.ops import get_backend

    if device is not None and backend not in (None, "auto", "triton"):
        raise PlanError(f"device={device!r} merges run the triton kernels: backend must be 'auto' or 'triton'")
    if device is not None:
        return get_backend("triton", device, threads)
    return get_backend(backend, None, threads)


def _is_adapter(source) -> bool:
    from pysoup.lora.adapter import is_adapter_dir

    return isinstance(source, (str, os.PathLike)) and is_adapter_dir(source)


def _merge_adapters(inputs, out, lora, lora_rank, strategy, weights, base, params, model_params, dtype, backend):
    """merge() of PEFT adapter directories: pysoup.lora.merge_adapters, in the mode the caller chose."""
    from pysoup.lora import merge_adapters

    # directories go to open_adapter, which says what is wrong with them; anything else is not an adapter
    not_adapters = [p for p in inputs if not (isinstance(p, (str, os.PathLike)) and os.path.isdir(p))]
    if lora is None:
        first = next(p for p in inputs if _is_adapter(p))
        raise PlanError(
            f'{first}: is a PEFT LoRA adapter; choose how adapters merge: lora="delta" (exact; --lora-mode delta) '
            'or lora="factors" (A and B separately; --lora-mode factors), see docs/lora.md'
        )
    if not_adapters:
        raise PlanError(f"{not_adapters[0]}: not a PEFT adapter directory (lora={lora!r} merges adapters only)")
    if base is not None or model_params is not None:
        raise PlanError("adapter merges take no base model or per-model parameters (the base of a ΔW is zero)")
    refactor = "svd" if lora_rank is not None else "concat"
    return merge_adapters(
        inputs, out, mode=lora, weights=weights, strategy=strategy, params=params, refactor=refactor,
        rank=lora_rank, dtype=dtype, backend=backend,
    )  # fmt: skip


def open(path):  # noqa: A001 - the public name mirrors safetensors' safe_open
    """Opens a checkpoint lazily: keys, dtypes, shapes, metadata, zero-copy views.

    Args:
        path: a safetensors file or a Hugging Face model directory.

    Returns:
        A FileCheckpoint: `keys()`, `infos[name]` (dtype, shape, byte range), `metadata`, `numpy(name)`,
        `torch(name)` / `ckpt[name]` (zero-copy), `close()`; usable as a context manager.

    Example:
        >>> with pysoup.open("model.safetensors") as ckpt:   # doctest: +SKIP
        ...     w = ckpt["lm_head.weight"]
    """
    if isinstance(path, Mapping):
        raise PlanError("pysoup.open takes a path; a state dict is already open")
    return open_checkpoint(path)


def info() -> dict:
    """What this installation can do.

    Returns:
        {"version", "backends": usable backends, "cpu_isa": the active ISA, "cpu_isas": usable ISAs ("scalar"
        first), "threads": the default thread count}
    """
    from pysoup.ops import available_backends
    from pysoup.ops.cpu import active_isa, default_threads, usable_isas

    isas = usable_isas()
    return {
        "version": __version__,
        "backends": available_backends(),
        "cpu_isa": active_isa() if isas else None,
        "cpu_isas": isas,
        "threads": default_threads(),
    }
