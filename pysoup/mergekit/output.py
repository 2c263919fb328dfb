"""The files beside a config merge's weights: the donor model's (mergekit's: base_model, else the first model)
config, tokenizer and other non-weight files, with a config.json that states what the merge changed: the dtype of
the merged weights (`dtype`, and `torch_dtype` where the donor's file has that older key, as transformers 5 reads
both) and, for slices, the layer count."""

from __future__ import annotations

import json
import os
from collections import Counter

from pysoup.mergekit.slices import _LAYER_KEYS, read_model_config

_TORCH_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def donor_path(spec) -> str:
    return spec.base_model if spec.base_model is not None else spec.groups[0].models[0].model


def merged_dtype(plan):
    """The dtype of the merged float tensors (the most common one), as transformers names it; None if none."""
    counts = Counter(plan.layout.dtype(k) for k in range(len(plan.layout)))
    floats = [(n, d) for d, n in counts.items() if d in _TORCH_NAMES]
    return _TORCH_NAMES[max(floats)[1]] if floats else None


def config_json(spec, plan, donor_config: dict, layers: dict, vocab=None) -> bytes:
    """The output's config.json: the donor's, with the merge's dtype, layer count and vocabulary size."""
    cfg = dict(donor_config)
    if vocab is not None:
        if "vocab_size" not in cfg and isinstance(cfg.get("text_config"), dict):
            cfg["text_config"] = {**cfg["text_config"], "vocab_size": vocab.size}
        else:
            cfg["vocab_size"] = vocab.size
    dtype = merged_dtype(plan)
    if dtype is not None:
        cfg["dtype"] = dtype
        if "torch_dtype" in cfg:
            cfg["torch_dtype"] = dtype
    if spec.layered and "total" in layers:
        key = next((k for k in _LAYER_KEYS if isinstance(cfg.get(k), int)), "num_hidden_layers")
        count = cfg.get(key)
        cfg[key] = layers["total"]
        cfg.update(_per_layer_lists(spec, cfg, count, layers))
    for key, total in layers.get("totals", {}).items():  # modules of their own: each one's count, at dotted keys
        *path, last = key.split(".")
        node = cfg
        for part in path:  # copied on the way down: the donor's dict stays as read
            node[part] = dict(node.get(part) or {})
            node = node[part]
        node[last] = total
    # As transformers' PretrainedConfig.to_json_string writes it.
    return (json.dumps(cfg, indent=2, sort_keys=True) + "\n").encode()


def _per_layer_lists(spec, cfg: dict, count, layers: dict) -> dict:
    """Fields holding one entry per layer (transformers 5's `layer_types`: sliding or full attention, Qwen3, Gemma):
    stacked from each slice's first source's entries for its layer range, so that the output loads (transformers
    refuses a layer_types whose length is not num_hidden_layers). mergekit 0.1.5 leaves them as the donor's."""
    out = {}
    for key, value in cfg.items():
        if not isinstance(value, list) or not isinstance(count, int) or len(value) != count:
            continue
        stacked = []
        for g in spec.groups:
            src = g.models[0]
            entries = read_model_config(layers["layers"](src.model).ckpt).get(key)
            a, b = src.layer_range
            if not isinstance(entries, list) or len(entries) < b:
                break
            stacked += entries[a:b]
        else:
            out[key] = stacked
    return out


def output_files(spec, plan, checkpoint, layers, vocab=None) -> list:
    """aux_files for OutputTarget: the donor's non-weight files, config.json rewritten, and the merged tokenizer (or
    the donor's with the config's chat template) in place of the donor's tokenizer files."""
    from pysoup.mergekit.tokenizer import TOKENIZER_FILES

    path = donor_path(spec)
    donor = checkpoint(path)
    tokenizer = []
    if vocab is not None:
        tokenizer = vocab.files()
    elif spec.chat_template:
        from pysoup.mergekit.tokenizer import donor_tokenizer_files

        models = list(dict.fromkeys(s.model for g in spec.groups for s in g.models + ([g.base] if g.base else [])))
        tokenizer = donor_tokenizer_files(path, spec.chat_template, spec.path, models)
    replaced = {"config.json"} | ({n for n, _ in tokenizer} | set(TOKENIZER_FILES) if tokenizer else set())
    files = [f for f in donor.aux_files() if os.path.basename(f) not in replaced]
    files += [(n, b) for n, b in tokenizer if n != "config.json"]
    cfg = read_model_config(donor)
    if cfg:
        files.append(("config.json", config_json(spec, plan, cfg, layers, vocab)))
    return files
