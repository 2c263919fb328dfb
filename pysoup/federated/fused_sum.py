"""One streaming pass of the merge engine for the aggregators whose new global model is a weighted sum (FedAvg,
FedAU): the engine's plan, chunks and fused kernel, into memory or into files committed atomically, but refusing
the result (nothing written) when any value comes out NaN or inf. The file path imports neither torch nor anything
that needs it."""

from __future__ import annotations

import warnings

from pysoup.engine.execute import OUTPUT_BUFFER_BYTES, NonFiniteWarning, execute
from pysoup.engine.plan import build_plan
from pysoup.federated.updates import nonfinite_error
from pysoup.io.signals import cleanup_on_termination
from pysoup.io.writer import MemorySink, OutputTarget
from pysoup.strategies import get_strategy


def fused_sum(
    global_ckpt,
    clients: list,
    *,
    strategy: str,
    models: list,
    weights: list,
    base=None,
    params: dict,
    out=None,
    threads=None,
    durable=False,
):
    """Runs one engine merge over already opened and checked checkpoints.

    Args:
        global_ckpt, clients: the round's checkpoints (named in errors; `models` and `base` are among them).
        strategy: "linear" or "task_arithmetic".
        models: the merge's input checkpoints, in input order (the fused sum's order).
        weights: one number per model (rounded to fp32 by the engine).
        base: the base checkpoint of task_arithmetic, else None.
        params: the strategy's parameters ({"normalize": ..., "lambda": ...}).
        out: None for a dict of torch tensors in the global model's order, else a .safetensors path or a directory.
        threads: CPU threads of the kernels (default: all this process may use).
        durable: fsync before the rename.

    Returns:
        The dict of torch tensors, or `out`'s paths (the index last).

    Raises:
        PlanError naming the first input that holds NaN or inf in the first non-finite output tensor (or saying
        the aggregate overflowed); nothing is written.
    """
    from pysoup.ops import get_backend
    from pysoup.ops.cpu import default_threads

    backend = get_backend("auto", None, int(threads) if threads else default_threads())
    plan = build_plan(get_strategy(strategy), models, base, weights=weights, params=params)
    with cleanup_on_termination():
        try:
            if out is None:
                sink = MemorySink(plan.entries)
                _execute(plan, sink, backend, global_ckpt, clients)
                return {name: sink.tensors[name] for name in global_ckpt.infos}
            inputs = [f for c in clients for f in c.files]  # the global model's own files may be replaced
            target = OutputTarget(
                out,
                plan.entries,
                metadata={"format": "pt"},
                input_files=inputs,
                aux_files=global_ckpt.aux_files(),
                durable=durable,
            )
            with target.streaming(OUTPUT_BUFFER_BYTES) as sink:
                _execute(plan, sink, backend, global_ckpt, clients)  # raising here aborts the target
            return target.paths
        finally:
            for c in plan.inputs:
                c.release()


def _execute(plan, sink, backend, global_ckpt, clients) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NonFiniteWarning)  # raised as an error below instead
        with backend.activate():
            nonfinite, _ = execute(plan, sink, backend, progress=False)
    if nonfinite:
        raise nonfinite_error(nonfinite[0], global_ckpt, clients, "the aggregate")
