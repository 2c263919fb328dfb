"""The merge methods the backend tests run (each family with its parameters), and a family of checkpoints to
merge with them."""

import torch

from helpers.checkpoints import save_st, small_model

# (strategy, uses a base, params, per-model params)
METHODS = [
    ("task_arithmetic", True, {"lambda": 0.7}, None),
    ("task_arithmetic", True, {"normalize": True}, None),
    ("ties", True, {}, [{"density": 0.5}, {"density": 0.3}, {"density": 0.9}]),
    ("ties", True, {"normalize": False, "lambda": 1.5}, [{"density": 0.2}] * 3),
    ("dare_linear", True, {"seed": 7}, [{"density": 0.6}] * 3),
    ("dare_linear", True, {"rescale": "l1"}, [{"density": 0.4}, {"density": 0.7}, {"density": 1.0}]),
    ("dare_ties", True, {"seed": 3}, [{"density": 0.5}] * 3),
    ("model_stock", True, {}, None),
    ("variance_corrected", False, {}, None),
    ("sparse", False, {"mask": "union"}, None),
    ("sparse", False, {"mask": "intersection"}, None),
]
METHOD_IDS = [f"{m}-{i}" for i, (m, *_rest) in enumerate(METHODS)]


def family(tmp_path, dtype=torch.bfloat16, big=True, sparse=False):
    """A base and three fine-tunes; `big` adds a 90k-element tensor so the C++ blocks (64 Ki) split it.
    Returns (base path, fine-tune paths, base state dict, fine-tune state dicts)."""
    base = small_model(seed=100, dtype=torch.float32)
    if big:
        base["model.layers.0.mlp.down_proj.weight"] = torch.randn(300, 300, generator=torch.Generator().manual_seed(5))
    fts = []
    for s in range(3):
        g = torch.Generator().manual_seed(s)
        ft = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        if sparse:  # pruned where the base is small; the third model also elsewhere (union and intersection differ)
            ft = {k: torch.where(base[k].abs() < 0.5, torch.zeros_like(v), v) for k, v in ft.items()}
            if s == 2:
                ft = {k: torch.where(v.abs() > 1.5, torch.zeros_like(v), v) for k, v in ft.items()}
        fts.append({k: v.to(dtype) for k, v in ft.items()})
    base = {k: v.to(dtype) for k, v in base.items()}
    bp = save_st(tmp_path / "base.safetensors", base)
    fps = [save_st(tmp_path / f"ft{i}.safetensors", ft) for i, ft in enumerate(fts)]
    return bp, fps, base, fts


def merge_kwargs(method, base_path):
    """pysoup.merge keyword arguments for a row of METHODS."""
    name, uses_base, params, model_params = method
    return dict(strategy=name, base=base_path if uses_base else None, params=params, model_params=model_params)
