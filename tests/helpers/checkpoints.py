"""Small models and the files they are saved as: safetensors files written by the safetensors package, Hugging Face
model directories, files with a hand-written header; and a snapshot of a tree of files to compare before and after."""

import json
import os
import struct

import torch


def small_model(seed=0, dtype=torch.bfloat16, layers=3, hidden=24, vocab=40, extra_int=False):
    """A Llama-shaped state dict of a few kB (odd row counts: 2 * hidden + 3)."""
    g = torch.Generator().manual_seed(seed)
    sd = {"model.embed_tokens.weight": torch.randn(vocab, hidden, generator=g)}
    for i in range(layers):
        sd[f"model.layers.{i}.self_attn.q_proj.weight"] = torch.randn(hidden, hidden, generator=g)
        sd[f"model.layers.{i}.mlp.up_proj.weight"] = torch.randn(2 * hidden + 3, hidden, generator=g)
        sd[f"model.layers.{i}.input_layernorm.weight"] = torch.randn(hidden, generator=g)
    sd["model.norm.weight"] = torch.randn(hidden, generator=g)
    sd["lm_head.weight"] = torch.randn(vocab, hidden, generator=g)
    sd = {k: v.to(dtype) for k, v in sd.items()}
    if extra_int:
        sd["model.position_ids"] = torch.arange(7, dtype=torch.int64)
    return sd


def save_st(path, tensors, metadata=None):
    """Saves with the safetensors package (the files pysoup must read); returns the path as a string."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata or {"format": "pt"})
    return str(path)


def hf_dir(path, sd, shards):
    """A Hugging Face model directory: `shards` safetensors files (+ index when > 1), config and tokenizer."""
    os.makedirs(path, exist_ok=True)
    keys = list(sd)
    per = -(-len(keys) // shards)
    wm = {}
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors" if shards > 1 else "model.safetensors"
        part = keys[s * per : (s + 1) * per]
        save_st(os.path.join(path, name), {k: sd[k] for k in part})
        wm.update({k: name for k in part})
    if shards > 1:
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": 0}, "weight_map": wm}, f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"model_type": "llama"}, f)
    with open(os.path.join(path, "tokenizer.json"), "w") as f:
        f.write("{}")
    return str(path)


def write_raw(path, header_obj, data=b"", raw_header=None, pad=True):
    """A safetensors file with any header: `header_obj` as JSON, or the bytes `raw_header`; then `data`."""
    text = raw_header if raw_header is not None else json.dumps(header_obj).encode()
    if pad:
        text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return str(path)


def tree_snapshot(path):
    """{relative path: bytes} of every file under path (or the file itself)."""
    out = {}
    if os.path.isfile(path):
        return {"": open(path, "rb").read()}
    for root, _dirs, files in os.walk(path):
        for f in files:
            full = os.path.join(root, f)
            out[os.path.relpath(full, path)] = open(full, "rb").read()
    return out
