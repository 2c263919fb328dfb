"""Synthetic checkpoints shaped like a decoder-only language model (Llama layout), for the demo, the tests
and the benchmarks: a random base and "fine-tunes" that differ from it by small perturbations, written as
real safetensors files (numpy only, no torch).
"""

from __future__ import annotations

import json
import math
import os

import numpy as np

from pysoup.io.writer import write_arrays


def decoder_lm_shapes(target_bytes: int, itemsize: int = 2, vocab: int = 32000) -> list:
    """(name, shape) of a Llama-style model whose tensors total about `target_bytes`."""
    params = target_bytes // itemsize
    hidden = 256
    while hidden < 4096 and (2 * vocab * hidden * 2 + 12 * hidden * hidden * 2) * 1.2 < params:
        hidden *= 2
    hidden = max(64, min(hidden, 4096))
    vocab = min(vocab, max(256, params // (8 * hidden)))
    inter = int(hidden * 8 / 3) // 64 * 64 or 64
    per_layer = 4 * hidden * hidden + 3 * hidden * inter + 2 * hidden
    fixed = 2 * vocab * hidden + hidden
    layers = max(1, round((params - fixed) / per_layer))
    shapes = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += [
            (p + "input_layernorm.weight", (hidden,)),
            (p + "self_attn.q_proj.weight", (hidden, hidden)),
            (p + "self_attn.k_proj.weight", (hidden, hidden)),
            (p + "self_attn.v_proj.weight", (hidden, hidden)),
            (p + "self_attn.o_proj.weight", (hidden, hidden)),
            (p + "post_attention_layernorm.weight", (hidden,)),
            (p + "mlp.gate_proj.weight", (inter, hidden)),
            (p + "mlp.up_proj.weight", (inter, hidden)),
            (p + "mlp.down_proj.weight", (hidden, inter)),
        ]
    shapes += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    return shapes


def llama_config(shapes: list, dtype: str) -> dict:
    """A complete Llama config.json for the shapes, so that transformers and mergekit accept the directory."""
    vocab, hidden = shapes[0][1]
    inter = next(s[0] for n, s in shapes if n.endswith("up_proj.weight"))
    heads = max(1, hidden // 64)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "num_hidden_layers": sum(1 for n, _ in shapes if n.endswith("q_proj.weight")),
        "vocab_size": vocab,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "torch_dtype": {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}[dtype],
    }


def _bf16_bits(x: np.ndarray) -> np.ndarray:
    u = x.astype(np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def _random(rng, shape, dtype: str, scale: float):
    x = rng.standard_normal(math.prod(shape), dtype=np.float32) * np.float32(scale)
    if dtype == "BF16":
        return _bf16_bits(x)
    return x.astype(np.float16 if dtype == "F16" else np.float32)


def make_family(
    directory: str,
    count: int,
    target_bytes: int,
    dtype: str = "BF16",
    seed: int = 0,
    noise: float = 0.01,
    layout: str = "file",
    shard_bytes: int | None = None,
) -> list:
    """Writes a base model and `count` fine-tunes of it (base + noise-scaled perturbations).

    Args:
        directory: where to write.
        count: number of fine-tunes.
        target_bytes: approximate size of each model.
        dtype: "BF16", "F16" or "F32".
        layout: "file" writes `ft{i}.safetensors`; "hf" writes Hugging Face directories `ft{i}/` with a
            config.json and, with `shard_bytes`, shards plus an index.

    Returns:
        Paths of the fine-tunes (the base is `base.safetensors` or `base/`).
    """
    os.makedirs(directory, exist_ok=True)
    itemsize = 2 if dtype in ("BF16", "F16") else 4
    shapes = decoder_lm_shapes(target_bytes, itemsize)
    rng = np.random.default_rng(seed)
    base = {}
    for name, shape in shapes:
        scale = 1.0 if "norm" in name else 1.0 / math.sqrt(shape[-1])
        base[name] = _random(rng, shape, "F32", scale).reshape(shape)
    dtypes = {name: dtype for name, _ in shapes}
    paths = []
    for k in range(count + 1):
        model = {}
        for name, shape in shapes:
            x = base[name]
            if k > 0:
                x = x + _random(rng, shape, "F32", noise * float(np.abs(x).mean() or 1)).reshape(shape)
            model[name] = _bf16_bits(x) if dtype == "BF16" else x.astype(np.float16 if dtype == "F16" else np.float32)
        label = "base" if k == 0 else f"ft{k}"
        paths.append(_write_model(directory, label, model, dtypes, layout, shard_bytes, shapes))
    return paths[1:]


def _write_model(directory, label, model, dtypes, layout, shard_bytes, shapes):
    meta = {"format": "pt"}
    if layout == "file":
        path = os.path.join(directory, f"{label}.safetensors")
        write_arrays(path, model, dtypes, metadata=meta)
        return path
    path = os.path.join(directory, label)
    write_arrays(path, model, dtypes, shard_size=shard_bytes or None, metadata=meta)
    config = llama_config(shapes, next(iter(dtypes.values())))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return path
