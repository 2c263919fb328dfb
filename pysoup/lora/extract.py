"""Extracting a LoRA adapter from a fine-tuned model and its base (what `mergekit-extract-lora` does): a truncated
SVD of D = W_ft − W_base per 2-D weight, the factors written as a PEFT adapter directory.

Every 2-D float weight (optionally only the modules named in `modules`) becomes a LoRA module of rank
min(rank, rows, cols): a linear layer (A [r, in], B [out, r]), or PEFT's embedding layout for modules whose last name
component holds "embed" or is GPT-2's `wte`/`wpe` (lora_embedding_A [r, num_embeddings], lora_embedding_B [dim, r]).
Models whose linear layers are transformers' Conv1D (GPT-2 and its family: weights stored [in, out]) get a
`fan_in_fan_out` adapter, as PEFT makes for them (mergekit-extract-lora saves Conv1D modules at full rank instead):
found from config.json's `model_type`, or forced with fan_in_fan_out=True. Other float tensors
that differ between the two models (norms, biases) cannot be low-rank updates: their modules go to
`modules_to_save` with the fine-tuned values (a linear module whose bias changed goes there whole, weight included:
PEFT cannot carry one module's bias change), so that at full rank the adapter reproduces the fine-tuned model.
One module is in memory at a time (both weights in fp32, their difference, its SVD).
"""

from __future__ import annotations

import ctypes
import os
import time
from dataclasses import dataclass, field

from pysoup.engine.report import peak_rss_bytes
from pysoup.errors import PlanError
from pysoup.lora.adapter import np_dtype, to_f32
from pysoup.lora.merge import _svd_factors, one_blas_thread
from pysoup.lora.output import factor_keys, scale_one_config, write_adapter

_FLOAT = ("F32", "F16", "BF16")
# The transformers model types whose linear layers are Conv1D (transformers.pytorch_utils.Conv1D: weight [in, out]).
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer"})
# Embedding weights whose names do not say "embed" (GPT-2's token and position tables).
_EMBEDDING_NAMES = frozenset({"wte", "wpe"})


@dataclass
class ExtractReport:
    """What an extraction did.

    Attributes:
        seconds: wall time.
        outputs: the files written.
        ranks: {module: rank}.
        retained_energy: {module: Σ_{j≤k} σⱼ² / Σ σⱼ² of W_ft − W_base} (1.0 where they are equal).
        modules_to_save: modules copied whole (differing tensors that are not 2-D).
        peak_rss_bytes: the process's peak resident memory.
    """

    seconds: float
    outputs: list
    ranks: dict = field(default_factory=dict)
    retained_energy: dict = field(default_factory=dict)
    modules_to_save: list = field(default_factory=list)
    peak_rss_bytes: int = 0

    @property
    def notes(self) -> list:
        if not self.retained_energy:
            return []
        worst = min(self.retained_energy, key=self.retained_energy.get)
        mean = sum(self.retained_energy.values()) / len(self.retained_energy)
        return [f"retained spectral energy: mean {mean:.6f}, min {self.retained_energy[worst]:.6f} ({worst})"]


def extract_lora(finetuned, base, out, *, rank: int, modules=None, dtype=None, fan_in_fan_out=None) -> ExtractReport:
    """Extracts a LoRA adapter of `rank` from a fine-tuned model and its base.

    Args:
        finetuned: the fine-tuned model (safetensors file or Hugging Face directory).
        base: its base model, same tensors and shapes.
        out: the adapter directory to write.
        rank: the rank per module (at most min(rows, cols) of each weight).
        modules: module-name suffixes to extract (["q_proj", "v_proj"]); default every 2-D float weight.
        dtype: the factors' dtype (default: the fine-tuned weights' dtype).
        fan_in_fan_out: the linear weights are stored [in, out] (transformers' Conv1D); default: True for the
            model types in CONV1D_MODEL_TYPES (from the fine-tuned model's config.json), else False.

    Returns:
        An ExtractReport with the retained spectral energy per module.

    Example:
        >>> extract_lora("ft/", "base/", "adapter/", rank=32).notes  # doctest: +SKIP
    """
    import numpy as np

    from pysoup.dtypes import parse_dtype
    from pysoup.io.checkpoint import open_checkpoint
    from pysoup.lora.output import check_output

    start = time.perf_counter()
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise PlanError(f"rank must be a positive integer, got {rank!r}")
    out_dtype = parse_dtype(dtype)
    check_output(out, [])
    ft = open_checkpoint(finetuned, 0)
    try:
        bs = open_checkpoint(base, 1)
        try:
            fif = _conv1d_model(finetuned) if fan_in_fan_out is None else bool(fan_in_fan_out)
            targets, whole = _select(ft, bs, modules)
            if not targets and not whole:
                raise PlanError(f"{ft.name}: no 2-D float weight to extract (modules={modules!r})")
            dtype = out_dtype or (ft.infos[targets[0][1]].dtype if targets else "F32")
            entries, ranks, by_key = [], {}, {}
            for module, name, kind in targets:
                rows_n, cols = ft.infos[name].shape
                # Embeddings ([num_embeddings, dim]) and Conv1D weights ([in, out]) are the transpose of PEFT's B·A.
                transposed = kind == "embedding" or fif
                out_f, in_f = (cols, rows_n) if transposed else (rows_n, cols)
                k = min(rank, out_f, in_f)
                ranks[module] = k
                a_key, b_key = factor_keys(module, kind)
                entries += [(a_key, dtype, (k, in_f)), (b_key, dtype, (out_f, k))]
                by_key[a_key], by_key[b_key] = (module, name, kind, 0), (module, name, kind, 1)
            whole_keys = {}
            for name in whole:
                key = "base_model.model." + name
                whole_keys[key] = name
                entries.append((key, dtype, tuple(ft.infos[name].shape)))
            retained, pending = {}, {}

            def produce(key):
                if key in pending:
                    return pending.pop(key)
                if key in whole_keys:
                    return _read_f32(ft, whole_keys[key])
                module, name, kind, which = by_key[key]
                diff = _read_f32(ft, name) - _read_f32(bs, name)
                if kind == "embedding" or fif:
                    diff = np.ascontiguousarray(diff.T)  # PEFT's layout: ΔWᵀ = B·A
                with one_blas_thread():
                    a, b, lost = _svd_factors(diff, ranks[module])
                del diff
                retained[module] = 1.0 - lost
                a_key, b_key = factor_keys(module, kind)
                pending[b_key if which == 0 else a_key] = b if which == 0 else a
                return a if which == 0 else b

            saved = sorted({n.rsplit(".", 1)[0] for n in whole})
            template = {
                "peft_type": "LORA",
                "task_type": None,
                "base_model_name_or_path": os.fspath(base) if isinstance(base, (str, os.PathLike)) else None,
                "bias": "none",
                "lora_dropout": 0.0,
                "init_lora_weights": True,
                "modules_to_save": saved or None,
            }
            config = scale_one_config(template, ranks, sorted(ranks), fif)
            paths = write_adapter(out, entries, produce, config, list(ft.files) + list(bs.files))
        finally:
            bs.close()
    finally:
        ft.close()
    return ExtractReport(
        time.perf_counter() - start, paths, ranks, retained, sorted({n.rsplit(".", 1)[0] for n in whole}),
        peak_rss_bytes(),
    )  # fmt: skip


def _select(ft, bs, modules) -> tuple:
    """([(module, weight name, kind)], [names of other differing float tensors]); checks that the two
    checkpoints hold the same tensors."""
    targets, whole = [], []
    for name in ft.infos:
        info = ft.infos[name]
        if name not in bs.infos:
            raise PlanError(f"{bs.name}: no tensor {name!r}, which {ft.name} has (not its base model?)")
        other = bs.infos[name]
        if tuple(other.shape) != tuple(info.shape):
            raise PlanError(f"{name!r}: {list(info.shape)} in {ft.name} but {list(other.shape)} in {bs.name}")
        if info.dtype not in _FLOAT:
            continue
        module = name.rsplit(".", 1)[0] if "." in name else name
        wanted = modules is None or any(module == m or module.endswith("." + m) for m in modules)
        if len(info.shape) == 2 and name.endswith(".weight") and wanted:
            last = module.rsplit(".", 1)[-1]
            kind = "embedding" if "embed" in last or last in _EMBEDDING_NAMES else "linear"
            targets.append((module, name, kind))
        elif not _equal(ft, bs, name):
            whole.append(name)
    for name in bs.infos:
        if name not in ft.infos:
            raise PlanError(f"{ft.name}: no tensor {name!r}, which the base {bs.name} has")
    # A module whose weight would be a LoRA target but whose bias changed too: PEFT has no per-module way to carry a
    # bias change (its `lora_bias` is one switch for every target and refused for embeddings), so the module is
    # saved whole (weight and bias, exact) in modules_to_save rather than as a LoRA module that drops the bias.
    changed = {n.rsplit(".", 1)[0] for n in whole}
    targets = [t for t in targets if t[0] not in changed]
    # PEFT loads a module to save whole (every parameter: a LayerNorm's bias with its weight, changed or not).
    whole = [n for n in ft.infos if ft.infos[n].dtype in _FLOAT and "." in n and n.rsplit(".", 1)[0] in changed]
    return targets, whole


def _conv1d_model(path) -> bool:
    """Whether a Hugging Face model directory's config.json names a model type built of Conv1D layers."""
    import json

    config = os.path.join(os.fspath(path), "config.json") if isinstance(path, (str, os.PathLike)) else ""
    if not config or not os.path.isfile(config):
        return False
    try:
        with open(config, encoding="utf-8") as f:
            model_type = json.load(f).get("model_type")
    except (OSError, ValueError, AttributeError) as e:
        raise PlanError(f"{config}: not a readable config.json ({e})") from None
    return model_type in CONV1D_MODEL_TYPES


def _read_f32(ckpt, name: str):
    import numpy as np

    row = ckpt.table.find(name)
    info = ckpt.infos[name]
    lo = ckpt.table.begin(row)
    nbytes = info.nbytes
    if nbytes == 0:
        return np.zeros(info.shape, dtype=np.float32)
    mapped = (ctypes.c_char * nbytes).from_address(ckpt.address_at(row, lo, lo + nbytes))
    raw = np.frombuffer(mapped, np_dtype(info.dtype))
    return to_f32(raw, info.dtype).reshape(info.shape)


def _equal(ft, bs, name: str) -> bool:
    import numpy as np

    a, b = _read_f32(ft, name), _read_f32(bs, name)
    return bool(np.array_equal(a, b))
