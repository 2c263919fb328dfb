"""PEFT LoRA adapter directories: read, validated up front, and written back in the layout PEFT loads.

An adapter directory holds `adapter_config.json` and `adapter_model.safetensors`. Its tensors are named
`base_model.model.<module>.<suffix>`:

- linear (and PEFT's other 2-D) layers: `lora_A.weight` [r, in] and `lora_B.weight` [out, r];
  ΔW = s · B · A with s = α / r (α / √r under `use_rslora`), r and α per module from `rank_pattern` and
  `alpha_pattern` (regexes matched against the module name's end, as PEFT's `get_pattern_key` does);
- embeddings: `lora_embedding_A` [r, num_embeddings] and `lora_embedding_B` [embedding_dim, r]; the weight is
  [num_embeddings, embedding_dim], so ΔW = s · (B · A)ᵀ (peft/tuners/lora/layer.py, Embedding.get_delta_weight);
  `fan_in_fan_out` linear layers (GPT-2's Conv1D, weight [in, out]) take the same transpose;
- whole tensors PEFT saves beside the factors: `modules_to_save` copies (`lm_head.weight`) and a targeted
  embedding's `base_layer.weight`; each replaces the base tensor of the same name.

Everything is read with numpy (bf16 widened to fp32 exactly), so folding an adapter into a model never imports
torch (~220 MiB of resident memory on its own).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass

from pysoup.errors import FormatError, PlanError
from pysoup.io.reader import SafetensorsReader

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
_FLOAT_DTYPES = ("F32", "F16", "BF16")

# Config fields naming PEFT features whose tensors or forward pass are not ΔW = s·B·A on a weight: merging or
# folding them as plain LoRA would silently give a different model.
_UNSUPPORTED = {
    "use_dora": "DoRA (weight-decomposed LoRA: its magnitude vector rescales W + ΔW)",
    "lora_bias": "lora_bias (a trained bias on lora_B)",
    "layer_replication": "layer_replication",
    "target_parameters": "target_parameters (LoRA on nn.Parameter)",
    "trainable_token_indices": "trainable_token_indices",
    "alora_invocation_tokens": "aLoRA (activated LoRA)",
    "use_qalora": "QA-LoRA",
    "use_bdlora": "BD-LoRA",
    "arrow_config": "Arrow routing",
}
_SUFFIXES = {
    ".lora_A.weight": ("linear", "A"),
    ".lora_B.weight": ("linear", "B"),
    ".lora_embedding_A": ("embedding", "A"),
    ".lora_embedding_B": ("embedding", "B"),
}


@dataclass
class LoraModule:
    """One adapted layer of one adapter.

    Attributes:
        name: the module's path in the base model ("model.layers.0.self_attn.q_proj"); its weight is
            `name + ".weight"`.
        kind: "linear" or "embedding".
        a_key, b_key: the factors' keys in the adapter file.
        rank: r (rows of A).
        alpha: α from the config (`alpha_pattern` first).
        scaling: s = α / r, or α / √r under rslora.
        transposed: the base weight is stored as (B·A)ᵀ: embeddings and fan_in_fan_out layers.
        features: (rows of B, columns of A), i.e. B·A's shape.
    """

    name: str
    kind: str
    a_key: str
    b_key: str
    rank: int
    alpha: float
    scaling: float
    transposed: bool
    features: tuple

    @property
    def weight_name(self) -> str:
        return self.name + ".weight"

    @property
    def weight_shape(self) -> tuple:
        """The shape of the base weight this module adapts."""
        out_f, in_f = self.features
        return (in_f, out_f) if self.transposed else (out_f, in_f)


def pattern_value(patterns: dict, module: str, default):
    """PEFT's get_pattern_key: the first pattern key k with re.match(rf"(.*\\.)?({k})$", module)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


class LoraAdapter:
    """A PEFT LoRA adapter directory, validated on open: every module has both factors of matching rank, the
    config's ranks match the tensors', no feature that is not plain LoRA is in use.

    Attributes:
        path: the directory.
        config: adapter_config.json as a dict.
        modules: {module name: LoraModule}, in file order.
        whole: {base tensor name: adapter key} of modules_to_save copies (trained whole tensors).
        base_copies: {base tensor name: adapter key} of a targeted embedding's base weight, which PEFT saves beside
            its factors (save_embedding_layers) and loads over the base's.
        dtype: the safetensors dtype of the factors (the first A's).

    Example:
        >>> with open_adapter("adapter/") as ad:  # doctest: +SKIP
        ...     dw = ad.delta("model.layers.0.self_attn.q_proj")
    """

    def __init__(self, path):
        self.path = os.fspath(path)
        config_path = os.path.join(self.path, CONFIG_NAME)
        weights_path = os.path.join(self.path, WEIGHTS_NAME)
        if not os.path.isdir(self.path):
            raise PlanError(f"{self.path}: not a PEFT adapter directory (no such directory)")
        if not os.path.isfile(config_path):
            raise PlanError(f"{self.path}: not a PEFT adapter directory (no {CONFIG_NAME})")
        if not os.path.isfile(weights_path):
            hint = (
                " (it has adapter_model.bin: save with safe_serialization=True)"
                if os.path.isfile(os.path.join(self.path, "adapter_model.bin"))
                else ""
            )
            raise PlanError(f"{self.path}: adapter has no {WEIGHTS_NAME}{hint}")
        self.config = _read_config(config_path)
        self.reader = SafetensorsReader(weights_path)
        try:
            self._parse()
        except BaseException:
            self.reader.close()
            raise

    # -- validation -----------------------------------------------------------------------------------
    def _parse(self) -> None:
        cfg, where = self.config, self.path
        if cfg.get("peft_type", "LORA") != "LORA":
            raise PlanError(f"{where}: peft_type {cfg.get('peft_type')!r} is not a LoRA adapter")
        for key, what in _UNSUPPORTED.items():
            if cfg.get(key):
                raise PlanError(f"{where}: {what} is not supported ({key} in {CONFIG_NAME})")
        if cfg.get("bias", "none") != "none":
            raise PlanError(f"{where}: bias={cfg['bias']!r} adapters (trained biases) are not supported")
        r, alpha = cfg.get("r"), cfg.get("lora_alpha")
        if not _positive(r) or not _positive(alpha):
            raise PlanError(f"{where}: {CONFIG_NAME} needs a positive r and lora_alpha, got r={r!r}, "
                            f"lora_alpha={alpha!r}")  # fmt: skip
        self.fan_in_fan_out = bool(cfg.get("fan_in_fan_out", False))
        self.rslora = bool(cfg.get("use_rslora", False))
        rank_pattern = cfg.get("rank_pattern") or {}
        alpha_pattern = cfg.get("alpha_pattern") or {}
        saved = cfg.get("modules_to_save") or []

        parts: dict = {}  # module -> {"A": key, "B": key, "kind": kind}
        self.whole, self.base_copies = {}, {}
        for key in self.reader.infos:
            info = self.reader.infos[key]
            name = key[len(PREFIX) :] if key.startswith(PREFIX) else key
            if "lora_magnitude_vector" in name:
                raise PlanError(f"{where}: module {name.split('.lora_magnitude_vector')[0]!r} has a DoRA magnitude "
                                "vector (lora_magnitude_vector): DoRA adapters are not supported")  # fmt: skip
            suffix = next((s for s in _SUFFIXES if name.endswith(s)), None)
            if suffix is not None:
                kind, factor = _SUFFIXES[suffix]
                module = name[: -len(suffix)]
                entry = parts.setdefault(module, {"kind": kind})
                if entry["kind"] != kind:
                    raise PlanError(f"{where}: module {module!r} has both linear and embedding LoRA factors")
                entry[factor] = key
                if info.dtype not in _FLOAT_DTYPES:
                    raise PlanError(f"{where}: {key!r} is {info.dtype}; LoRA factors must be F32, F16 or BF16")
                continue
            if name.endswith(".base_layer.weight"):  # PEFT saves a targeted embedding's base weight beside it
                self.base_copies[name[: -len(".base_layer.weight")] + ".weight"] = key
                continue
            if ".lora_" in name:
                raise PlanError(f"{where}: tensor {key!r} is not a LoRA factor this reader knows (lora_A.weight, "
                                "lora_B.weight, lora_embedding_A/B)")  # fmt: skip
            module = name.rsplit(".", 1)[0]
            if any(module == m or module.endswith("." + m) for m in saved):
                self.whole[name] = key
                continue
            raise PlanError(f"{where}: tensor {key!r} is neither a LoRA factor nor in modules_to_save")

        self.modules = {}
        for module, entry in parts.items():
            for factor in ("A", "B"):
                if factor not in entry:
                    other = "B" if factor == "A" else "A"
                    raise PlanError(f"{where}: module {module!r}: lora_{factor} is missing (only lora_{other} is in "
                                    f"{WEIGHTS_NAME})")  # fmt: skip
            a, b = self.reader.infos[entry["A"]], self.reader.infos[entry["B"]]
            if len(a.shape) != 2 or len(b.shape) != 2:
                raise PlanError(f"{where}: module {module!r} has {len(a.shape)}-D / {len(b.shape)}-D factors; only "
                                "2-D (linear, embedding) LoRA is supported, not convolutions")  # fmt: skip
            if a.shape[0] != b.shape[1]:
                raise PlanError(f"{where}: module {module!r}: lora_A has rank {a.shape[0]} but lora_B has rank "
                                f"{b.shape[1]} ({list(a.shape)} and {list(b.shape)})")  # fmt: skip
            rank = a.shape[0]
            want = pattern_value(rank_pattern, module, r)
            if rank != want:
                raise PlanError(f"{where}: module {module!r} has rank {rank} in {WEIGHTS_NAME} but {want} in "
                                f"{CONFIG_NAME} (r / rank_pattern)")  # fmt: skip
            mod_alpha = float(pattern_value(alpha_pattern, module, alpha))
            scaling = mod_alpha / math.sqrt(rank) if self.rslora else mod_alpha / rank
            embedding = entry["kind"] == "embedding"
            self.modules[module] = LoraModule(
                module,
                entry["kind"],
                entry["A"],
                entry["B"],
                rank,
                mod_alpha,
                scaling,
                embedding or self.fan_in_fan_out,
                (b.shape[0], a.shape[1]),
            )
        if not self.modules:
            raise PlanError(f"{where}: {WEIGHTS_NAME} holds no LoRA factors (lora_A / lora_B)")
        first = self.reader.infos[next(iter(self.modules.values())).a_key]
        self.dtype = first.dtype

    # -- data -------------------------------------------------------------------------------------------
    def read(self, key: str):
        """Tensor `key` as a fresh fp32 numpy array, read with pread (no mapping stays resident)."""
        return read_f32(self.reader, key)

    def factors(self, module: str) -> tuple:
        """(A, B) of `module` in fp32: A [r, in], B [out, r] in PEFT's linear layout (embeddings as stored)."""
        m = self.modules[module]
        return self.read(m.a_key), self.read(m.b_key)

    def delta(self, module: str):
        """ΔW = s·B·A in fp32, [out, in] (the linear layout: transpose it for embeddings and fan_in_fan_out)."""
        a, b = self.factors(module)
        return (b @ a) * self.modules[module].scaling

    @property
    def base_model(self):
        return self.config.get("base_model_name_or_path")

    @property
    def files(self) -> tuple:
        return (os.path.realpath(self.reader.path),)

    def close(self) -> None:
        self.reader.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"<LoRA adapter {self.path!r}: {len(self.modules)} modules, r={self.config.get('r')}>"


def open_adapter(path) -> LoraAdapter:
    """Opens and validates a PEFT LoRA adapter directory (see LoraAdapter)."""
    return LoraAdapter(path)


def is_adapter_dir(path) -> bool:
    """A directory holding adapter_config.json: PEFT's mark of an adapter."""
    try:
        return os.path.isdir(path) and os.path.isfile(os.path.join(path, CONFIG_NAME))
    except TypeError:
        return False


def read_f32(reader: SafetensorsReader, key: str):
    """A tensor of a safetensors file as a fresh fp32 numpy array (bf16 widened exactly: its bits are fp32's top
    half), read with pread so that no mapping of the file stays resident."""
    import numpy as np

    info = reader.infos[key]
    data = os.pread(reader._fd, info.nbytes, info.begin)
    if len(data) != info.nbytes:
        raise FormatError(f"{reader.path}: tensor {key!r} is cut short (the file changed while being read)")
    return to_f32(np.frombuffer(data, dtype=np_dtype(info.dtype)), info.dtype).reshape(info.shape)


def np_dtype(st_dtype: str):
    """The numpy dtype holding a float safetensors dtype's bytes (bf16 as its uint16 bits)."""
    return {"F32": "<f4", "F16": "<f2", "BF16": "<u2"}[st_dtype]


def to_f32(a, st_dtype: str):
    """Raw values of a float safetensors dtype (np_dtype's view) widened to fp32, exactly."""
    import numpy as np

    if st_dtype == "BF16":
        return (a.astype(np.uint32) << 16).view(np.float32)
    return a.astype(np.float32)


def from_f32(x, st_dtype: str, out=None):
    """fp32 values rounded to nearest-even in a float safetensors dtype (np_dtype's view), into `out` if given.
    bf16 NaNs keep their sign and top payload bits with the quiet bit set (pysoup's numerical contract)."""
    import numpy as np

    if st_dtype == "F32":
        res = x
    elif st_dtype == "F16":
        res = x.astype(np.float16)
    else:
        bits = x.view(np.uint32)
        res = ((bits + (np.uint32(0x7FFF) + ((bits >> 16) & 1))) >> 16).astype(np.uint16)
        nan = np.isnan(x)
        if nan.any():
            res[nan] = ((bits[nan] >> 16) | 0x0040).astype(np.uint16)
    if out is None:
        return np.ascontiguousarray(res)
    out[...] = res
    return out


def _read_config(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, UnicodeDecodeError) as exc:
        raise FormatError(f"{path}: cannot read ({getattr(exc, 'strerror', None) or exc})") from None
    except json.JSONDecodeError as exc:
        raise FormatError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(cfg, dict):
        raise FormatError(f"{path}: not a JSON object")
    return cfg


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0
