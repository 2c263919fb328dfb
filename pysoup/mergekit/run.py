"""The merge a mergekit config describes: open its models, plan each group (the whole model, or one output slice)
with its pysoup strategy, run the plans as one through the engine, and write beside the weights a config.json that
states what the merge changed (dtype, layer count, vocabulary size) and, when the config asks, a tokenizer."""

from __future__ import annotations

import contextlib
import copy
import os
import tempfile
import time

from pysoup.engine.execute import OUTPUT_BUFFER_BYTES, execute
from pysoup.engine.plan import Kind, MergePlan, build_plan
from pysoup.engine.report import MergeReport
from pysoup.errors import PlanError
from pysoup.io.checkpoint import open_checkpoint
from pysoup.io.signals import cleanup_on_termination
from pysoup.io.units import parse_size
from pysoup.io.writer import MemorySink, OutputTarget
from pysoup.mergekit.config import MergeSpec, load_config


def merge_config(
    config,
    out=None,
    *,
    backend="auto",
    device=None,
    threads=None,
    shard_size=None,
    progress=None,
    durable=False,
    dtype=None,
    params=None,
    weights=None,
    base=None,
):
    """Runs a mergekit config: what `pysoup merge --config` does.

    Args:
        config: a YAML path or a MergeSpec from load_config.
        out: a directory (mergekit's output: weights, config.json, tokenizer), a .safetensors file, or None for a
            dict of torch tensors.
        backend, device, threads, shard_size, progress, durable: as for pysoup.merge.
        dtype: overrides the config's output dtype.
        params: strategy parameters that override the config's shared ones, in every group.
        weights: one weight per model of a `models:` config, overriding the config's.
        base: another base model for a `models:` config.

    Returns:
        A MergeReport, or the merged tensors (dict) when `out` is None.

    Example:
        >>> merge_config("soup.yaml", "soup/")  # doctest: +SKIP
    """
    from pysoup.api import _backend_for
    from pysoup.dtypes import parse_dtype
    from pysoup.ops.cpu import default_threads
    from pysoup.strategies import get_strategy

    start = time.perf_counter()
    spec = config if isinstance(config, MergeSpec) else load_config(os.fspath(config))
    strategy = get_strategy(spec.strategy)
    out_dtype = parse_dtype(dtype or spec.dtype)
    if shard_size is not None:
        shard_size = parse_size(shard_size)
    threads = int(threads) if threads else default_threads()
    if threads < 1:
        raise PlanError(f"threads must be positive, got {threads}")
    if (weights is not None or base is not None) and spec.layered:
        raise PlanError(f"{spec.path}: --weights and --base apply to `models:` configs, not to slices or modules")
    be = _backend_for(backend, device, threads)
    if out is not None and os.fspath(out) == "":
        raise PlanError("empty output path")

    opened: dict = {}  # model path -> its Checkpoint, opened once

    def checkpoint(path):
        if path not in opened:
            opened[path] = open_checkpoint(path, len(opened))
        return opened[path]

    with cleanup_on_termination(), contextlib.ExitStack() as folds:
        try:
            spec = _fold_adapters(spec, folds)
            from pysoup.mergekit.slices import GroupInputs

            plans = []
            layers = GroupInputs.numbering(spec, checkpoint)
            vocab, scratch = _vocabulary(spec), None
            for g in spec.groups:
                inputs = GroupInputs(spec, g, checkpoint, layers)
                if base is not None:
                    inputs.base, g = checkpoint(base), _with_base(g, base)
                _check_required(g, inputs)
                parts = [(inputs.models, inputs.base)]
                if vocab is not None:
                    if scratch is None:  # beside the first model: the same disk, not a RAM-backed /tmp
                        parent = os.path.dirname(os.path.abspath(spec.groups[0].models[0].model))
                        scratch = folds.enter_context(tempfile.TemporaryDirectory(prefix=".pysoup-vocab-", dir=parent))
                    parts, rebuilt = _split_vocabulary(vocab, g, inputs, checkpoint, spec.compute_dtype, scratch)
                    for c in rebuilt:
                        folds.callback(c.close)
                for models, group_base in parts:
                    plans.append(
                        build_plan(
                            strategy,
                            models,
                            group_base,
                            weights=weights,
                            params={**g.params, **(params or {})},
                            model_params=inputs.model_params,
                            out_dtype=out_dtype,
                            layer_positions=inputs.positions,
                        )
                    )
            plan = combine_plans(plans)
            if out is None:
                sink = MemorySink(plan.entries)
                with be.activate():
                    execute(plan, sink, be, progress)
                return {name: sink.tensors[name] for name in plan.layout.names()}

            from pysoup.mergekit.output import output_files

            aux = output_files(spec, plan, checkpoint, layers, vocab)
            target = OutputTarget(
                out,
                plan.entries,
                shard_size=shard_size,
                metadata={"format": "pt"},
                input_files=[f for c in opened.values() for f in c.files],
                aux_files=aux,
                durable=durable,
            )
            with target.streaming(OUTPUT_BUFFER_BYTES) as sink, be.activate():
                nonfinite, (stats, notes) = execute(plan, sink, be, progress)
            return MergeReport.of_files(start, plan, target, strategy.name, be, threads, nonfinite, stats, notes)
        finally:
            for c in opened.values():
                c.close()


def _fold_adapters(spec, folds):
    """mergekit's MODEL+LORA references: each adapter folded into its model (pysoup.lora.folded: streamed, in a
    temporary directory beside the model, removed when the merge ends; mergekit merges with PEFT into its cache), and
    the spec read with those directories in place of the references."""
    sources = [s for g in spec.groups for s in g.models + ([g.base] if g.base is not None else [])]
    refs = {s.model for s in sources if "+" in s.model} | (
        {spec.base_model} if "+" in (spec.base_model or "") else set()
    )
    if not refs:
        return spec
    from pysoup.lora import folded

    path = {ref: folds.enter_context(folded(ref)) for ref in sorted(refs)}
    spec = copy.deepcopy(spec)
    for g in spec.groups:
        for s in g.models + ([g.base] if g.base is not None else []):
            s.model = path.get(s.model, s.model)
        g.required = [(path.get(m, m), key, filters) for m, key, filters in g.required]
    spec.base_model = path.get(spec.base_model, spec.base_model)
    return spec


def _vocabulary(spec):
    """The output vocabulary when the config merges tokenizers (tokenizer_source / tokenizer), else None."""
    if spec.tokenizer_source is None and spec.tokenizer is None:
        return None
    from pysoup.mergekit.tokenizer import Vocabulary

    models = []
    for g in spec.groups:
        for s in g.models + ([g.base] if g.base is not None else []):
            if s.model not in models:
                models.append(s.model)
    if spec.base_model is not None and spec.base_model in models:
        models.remove(spec.base_model)
        models.insert(0, spec.base_model)
    return Vocabulary(spec, models, spec.base_model)


def _check_required(g, inputs) -> None:
    """A parameter mergekit requires (weight) given to a model only through filters: every tensor must match one."""
    for model, key, filters in g.required:
        i = next(j for j, s in enumerate(g.models) if s.model == model)
        names = inputs.input_names[i].values() if inputs.input_names else inputs.models[i].table.names()
        for name in names:  # mergekit matches a model's filters against its own tensor names
            if not any(f in name for f in filters):
                raise PlanError(
                    f"model {model!r}: parameter {key!r} has no value for tensor {name!r} (its filters: "
                    f"{', '.join(map(repr, filters))}; mergekit needs one)"
                )


def _with_base(g, base):
    from dataclasses import replace

    from pysoup.mergekit.config import Source

    return replace(g, base=Source(base))


def _split_vocabulary(vocab, g, inputs, checkpoint, compute_dtype, scratch) -> list:
    """A group's inputs as two merges: every tensor but the embeddings and LM heads, as views of the files; and those,
    each input's rows moved to the output vocabulary (in mergekit's compute dtype), written one tensor at a time to
    scratch files and merged from them."""
    import tempfile

    import torch
    from safetensors.torch import save_file

    from pysoup.dtypes import parse_dtype
    from pysoup.mergekit.slices import view

    sources = g.models + ([g.base] if g.base is not None else [])
    ckpts = inputs.models + ([inputs.base] if inputs.base is not None else [])
    first, first_path = ckpts[0], sources[0].model
    names = first.table.names()
    is_vocab = [vocab.is_vocab_tensor(n, first.table.shape(r), first_path) for r, n in enumerate(names)]
    if not any(is_vocab):
        return [(inputs.models, inputs.base)], []
    dtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}.get(parse_dtype(compute_dtype))
    rest = []
    for c in ckpts:
        keep = [(r, n) for r, n in enumerate(c.table.names()) if (k := first.table.find(n)) < 0 or not is_vocab[k]]
        rest.append(view(c, keep))  # a tensor the first input lacks stays: the planner warns about it as usual
    dirs = [tempfile.mkdtemp(prefix="input-", dir=scratch) for _ in ckpts]
    for r, name in enumerate(names):
        if not is_vocab[r]:
            continue
        # vocabulary tensors are outside the layers: the same name in each source's own file, read where it lies
        tensors = {s.model: checkpoint(s.model).torch(name) for s in sources}
        for i, (_, t) in enumerate(vocab.permuted(tensors, dtype)):
            save_file({name: t}, os.path.join(dirs[i], f"{r:08d}.safetensors"), metadata={"format": "pt"})
            del t
    rebuilt = [open_checkpoint(d, i) for i, d in enumerate(dirs)]
    nb = len(inputs.models)
    parts = [(rest[:nb], rest[nb] if inputs.base is not None else None)]
    parts.append((rebuilt[:nb], rebuilt[nb] if inputs.base is not None else None))
    return [(models, base) for models, base in parts if len(models[0].table)], rebuilt


def combine_plans(plans: list) -> MergePlan:
    """One plan that runs several: every group's inputs side by side, each group's kinds reading its own inputs, the
    output tensors of all in one layout (the safetensors package's order). A name two groups produce is an error.
    Input i's row of an output tensor it does not feed is 0, never read (the engine reads only a kind's sources)."""
    from array import array

    from pysoup.io.table import DTYPE_CODE, TensorTable, rows

    if len(plans) == 1:
        return plans[0]
    inputs, kinds, offsets, kind_offsets = [], [], [], []
    for p in plans:
        offsets.append(len(inputs))
        kind_offsets.append(len(kinds))
        inputs += p.inputs
        kinds += [Kind(k.op, tuple(i + offsets[-1] for i in k.sources), k.dtypes) for k in p.kinds]
    names, dtypes, shapes, owner = [], [], [], []  # owner: (plan, its output tensor)
    seen: dict = {}
    for j, p in enumerate(plans):
        t = p.layout
        for k in range(len(t)):
            name = t.name(k)
            if name in seen:
                raise PlanError(f"output tensor {name!r} comes from two slices ({seen[name] + 1} and {j + 1})")
            seen[name] = j
            names.append(name)
            dtypes.append(t.dtype(k))
            shapes.append(list(t.shape(k)))
            owner.append((j, k))
    n = len(names)
    table = TensorTable.from_entries(names, dtypes, shapes, [0] * n, [0] * n, [])
    codes = bytes(DTYPE_CODE[d] for d in dtypes)
    order_bytes = table.canonical_order(codes)
    layout, order = table.permuted(order_bytes, codes), rows(order_bytes)
    plan_rows = [array("i", bytes(4 * n)) for _ in inputs]
    kind_of = array("I", bytes(4 * n))
    views = [[rows(r) for r in p.rows] for p in plans]
    for pos, src in enumerate(order):
        j, k = owner[src]
        p = plans[j]
        kind_of[pos] = p.kind_of[k] + kind_offsets[j]
        for i in range(len(p.inputs)):
            plan_rows[offsets[j] + i][pos] = views[j][i][k]
    return MergePlan(
        inputs,
        layout,
        [r.tobytes() for r in plan_rows],
        kinds,
        kind_of,
        plans[0].strategy,
        None,
        sum(p.bytes_to_read for p in plans),
    )
