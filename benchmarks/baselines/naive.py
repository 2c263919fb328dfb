"""The script a user writes: load every input with safetensors, sum in fp32, save. Uniform weights."""

import os
import sys

import torch
from safetensors.torch import load_file, save_file


def model_file(path):
    return os.path.join(path, "model.safetensors") if os.path.isdir(path) else path


def main():
    out, inputs = sys.argv[1], [model_file(p) for p in sys.argv[2:]]
    sds = [load_file(p) for p in inputs]
    w = 1.0 / len(sds)
    merged = {}
    for k, first in sds[0].items():
        acc = torch.zeros(first.shape, dtype=torch.float32)
        for sd in sds:
            acc += w * sd[k].float()
        merged[k] = acc.to(first.dtype)
    save_file(merged, out, metadata={"format": "pt"})


if __name__ == "__main__":
    main()
