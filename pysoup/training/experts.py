"""Experts Weights Averaging (EWA; "Experts Weights Averaging: A New General Training Scheme for Vision
Transformers", 2023): train some feed-forward blocks as mixtures of identical experts with a random uniform
router, pull the experts toward each other after every optimizer step, and average them back into one block for
inference, so the deployed model has the original architecture and cost.

    convert_to_experts(model, ["blocks.1.mlp"], num_experts=4)   # before the optimizer is made
    ewa = ExpertsWeightsAveraging(model, share_rate=0.3)
    for batch in data:
        ...; optimizer.step(); ewa.step()
    collapse_experts(model)                                        # the original architecture, same state_dict keys

The share step, per tensor of the experts (ALGORITHMS.md): W_i <- (1 - beta) W_i + beta * mean_{j != i} W_j.
It runs as W_i <- lerp(W_i, M, beta * N / (N - 1)) with M = mean_j W_j, the same update in exact arithmetic:
one pysoup.ops.weighted_sum per tensor group for M (fp32, experts in order, divided by N) and one fused
pysoup.ops.lerp_ call for every expert tensor of the model per (expert count, dtype pair).
"""

from __future__ import annotations

import copy
import difflib
import numbers

import torch  # an nn.Module subclass needs it when the module loads: import this module lazily

from pysoup import ops
from pysoup.errors import PlanError

_FLOATS = ("float32", "float16", "bfloat16")  # the dtypes weighted_sum and lerp_ take
_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def router_seed(seed: int, block: int, call: int) -> int:
    """The seed of the router's generator for forward call `call` (from 0) of the block numbered `block`:
    splitmix64(splitmix64(splitmix64(seed) ^ block) ^ call), a 64-bit integer."""
    return _splitmix64(_splitmix64(_splitmix64(seed & _MASK64) ^ block) ^ call)


class ExpertsBlock(torch.nn.Module):
    """N copies of one feed-forward block and a random uniform router (EWA's mixture of experts).

    Routing, in training and in eval mode alike: the input's leading dims are flattened into T tokens (the last
    dim holds the features); forward call c takes a random permutation of the T tokens from a torch.Generator on
    the input's device seeded with `router_seed(seed, index, c)`, cuts it into N parts with torch.tensor_split
    (sizes differ by at most one, the first T mod N parts are the larger), sends part k through expert k, and puts
    every output row back at its token's place. Eval mode routes the same random way, as the paper's MoE does: an
    unconverged mixture is not one function of its input, and the deterministic model is what
    `collapse_experts` makes for deployment. `calls` counts forward calls (train and eval) and is not saved in
    the state_dict.

    Args:
        block: the module to copy (not modified; its weights initialise every expert).
        num_experts: N >= 2.
        seed: the router's seed.
        index: this block's number in its model (convert_to_experts numbers them so no two route alike).

    Example:
        >>> moe = ExpertsBlock(torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 8)),
        ...                    num_experts=4)                                                    # doctest: +SKIP
        >>> moe(torch.randn(2, 16, 8)).shape                                                      # doctest: +SKIP
        torch.Size([2, 16, 8])
    """

    def __init__(self, block, num_experts: int, seed: int = 0, index: int = 0):
        super().__init__()
        _check_num_experts(num_experts)
        self.experts = torch.nn.ModuleList(copy.deepcopy(block) for _ in range(num_experts))
        self.seed, self.index, self.calls = int(seed), int(index), 0
        self.train(block.training)

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    def extra_repr(self) -> str:
        return f"num_experts={len(self.experts)}, seed={self.seed}, index={self.index}"

    def partition(self, num_tokens: int, call: int, device="cpu") -> list:
        """The router's token indices for forward call `call`: N int64 tensors that together hold every index in
        [0, num_tokens) exactly once; part k goes to expert k."""
        g = torch.Generator(device=device).manual_seed(router_seed(self.seed, self.index, call))
        perm = torch.randperm(num_tokens, generator=g, device=device)
        return list(torch.tensor_split(perm, len(self.experts)))

    def forward(self, x):
        tokens = x.reshape(-1, x.shape[-1])
        parts = self.partition(tokens.shape[0], self.calls, x.device)
        self.calls += 1
        used = [(k, idx) for k, idx in enumerate(parts) if idx.numel()]
        if not used:  # no tokens: any expert gives the empty output its shape
            return self.experts[0](x)
        y = torch.cat([self.experts[k](tokens.index_select(0, idx)) for k, idx in used])
        order = torch.cat([idx for _, idx in used])
        # Row r of y belongs to token order[r]: scatter back (index_copy is differentiable in its source).
        out = y.new_zeros(y.shape).index_copy(0, order, y)
        return out.reshape(*x.shape[:-1], *y.shape[1:])

    def collapse(self):
        """A new module of the experts' class whose every float32, float16 and bfloat16 tensor (parameters and
        buffers, biases included) is the mean of the experts': pysoup.ops.weighted_sum with weight 1 per expert,
        normalize=True (an fp32 sum in expert order divided by N, rounded to the tensor's dtype). Other buffers
        (integer counters, float64) come from expert 0, as do the module's attributes and its train/eval mode."""
        _check_experts(self, "")
        n = len(self.experts)
        states = [e.state_dict() for e in self.experts]
        merged = {}
        for key, first in states[0].items():
            if _dtype_name(first.dtype) in _FLOATS:
                merged[key] = ops.weighted_sum([s[key] for s in states], [1.0] * n, first.dtype, normalize=True)
            else:
                merged[key] = first
        block = copy.deepcopy(self.experts[0])
        with torch.no_grad():
            block.load_state_dict(merged)
        return block


def _check_num_experts(num_experts) -> None:
    if isinstance(num_experts, bool) or not isinstance(num_experts, numbers.Integral) or num_experts < 2:
        raise PlanError(f"num_experts must be an integer >= 2, got {num_experts!r}")


def _check_share_rate(share_rate) -> float:
    if isinstance(share_rate, bool) or not isinstance(share_rate, numbers.Real) or not 0.0 <= share_rate <= 1.0:
        raise PlanError(f"share_rate must be a number in [0, 1], got {share_rate!r}")
    return float(share_rate)


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _check_experts(block: ExpertsBlock, name: str, buffers: bool = True) -> list:
    """Every expert has expert 0's tensors: the same names, shapes, dtypes and devices. Returns each expert's
    parameters (one walk of the modules per expert: the share step calls this every step)."""
    where = f"ExpertsBlock {name!r}" if name else "ExpertsBlock"
    params = [list(e.named_parameters()) for e in block.experts]
    named = [p + list(e.named_buffers()) for p, e in zip(params, block.experts)] if buffers else params
    signatures = [[(k, t.shape, t.dtype, t.device) for k, t in tensors] for tensors in named]
    first = signatures[0]
    for i, other in enumerate(signatures):
        if other == first:
            continue
        names0, names = [s[0] for s in first], [s[0] for s in other]
        if names0 != names:
            extra = sorted(set(names) ^ set(names0)) or names
            raise PlanError(f"{where}: expert {i}'s tensors differ from expert 0's (e.g. {extra[0]!r})")
        k, s0, d0, v0 = next(a for a, b in zip(first, other) if a != b)
        _, s, d, v = next(b for a, b in zip(first, other) if a != b)
        raise PlanError(
            f"{where}: expert {i}'s {k!r} is {_dtype_name(d)} {list(s)} on {v}, "
            f"expert 0's {_dtype_name(d0)} {list(s0)} on {v0}; experts must stay alike"
        )
    return [[t for _, t in tensors] for tensors in params]


def _parent_and_key(model, name: str):
    parent_name, _, key = name.rpartition(".")
    return model.get_submodule(parent_name), key


def experts_blocks(model) -> dict:
    """{qualified name: ExpertsBlock} for every ExpertsBlock in `model`, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, ExpertsBlock)}


def _resolve_targets(model, modules) -> list:
    """The qualified names of the modules to convert, checked (the outermost match of a predicate)."""
    named = dict(model.named_modules())
    if isinstance(modules, str):
        modules = [modules]
    if callable(modules):
        names, skip = [], list(experts_blocks(model))  # skip: inside a match, or inside an ExpertsBlock
        for name, m in named.items():
            if any(name == s or name.startswith(s + ".") for s in skip):
                continue
            if name and modules(name, m):
                names.append(name)
                skip.append(name)
        if not names:
            raise PlanError("the predicate matched no module of the model")
    else:
        try:
            names = list(modules)
        except TypeError:
            raise PlanError(
                f"modules must be a list of module names or a predicate (name, module) -> bool, "
                f"got {type(modules).__name__}"
            ) from None
        if not names:
            raise PlanError("no modules given to convert")
        for name in names:
            if not isinstance(name, str):
                raise PlanError(f"module names must be strings, got {name!r}")
            if name not in named:
                close = difflib.get_close_matches(name, [n for n in named if n], n=3)
                hint = f" (close: {', '.join(close)})" if close else ""
                raise PlanError(f"no module named {name!r} in the model{hint}")
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise PlanError(f"module {dup!r} is named twice")
        for name in names:
            outer = next((o for o in names if o != name and name.startswith(o + ".")), None)
            if outer is not None:
                raise PlanError(f"module {name!r} is inside {outer!r}, also named")
    return names


def _check_target(model, name: str, owners: dict) -> None:
    """`name` is a convertible block: not the model itself, not in or an ExpertsBlock, with floating-point
    parameters of its own (not tied to a tensor outside it)."""
    if name == "":
        raise PlanError("the model itself cannot become an ExpertsBlock; name one of its feed-forward blocks")
    module = model.get_submodule(name)
    for outer in experts_blocks(model):
        if name == outer or name.startswith(outer + "."):
            raise PlanError(f"module {name!r} is already part of ExpertsBlock {outer!r}")
    params = list(module.named_parameters())
    if not params:
        raise PlanError(f"module {name!r} ({type(module).__name__}) has no parameters: not a feed-forward block")
    for pname, p in params:
        if _dtype_name(p.dtype) not in _FLOATS:
            raise PlanError(f"module {name!r}: parameter {pname!r} is {_dtype_name(p.dtype)}; experts take "
                            "float32, float16 or bfloat16")  # fmt: skip
        outside = [o for o in owners[id(p)] if not o.startswith(name + ".")]
        if outside:
            raise PlanError(f"module {name!r}: parameter {pname!r} is tied to {outside[0]!r} outside it; "
                            "copies would untie it")  # fmt: skip


def convert_to_experts(model, modules, num_experts: int, seed: int = 0):
    """Replaces each chosen feed-forward block of `model` with an ExpertsBlock of `num_experts` copies of it
    (identical weights), in place. Call it before making the optimizer: the blocks' old parameters leave the
    model. Everything is checked before anything changes.

    Args:
        model: a torch.nn.Module.
        modules: qualified module names (as in model.named_modules()), one name, or a predicate
            (name, module) -> bool; a predicate converts the outermost modules it matches.
        num_experts: N >= 2 experts per block.
        seed: the routers' seed; blocks are numbered in module order after those already in the model, and block
            b's forward call c routes with router_seed(seed, b, c) (see ExpertsBlock).

    Returns:
        The model.

    Example:
        >>> convert_to_experts(vit, lambda name, m: name.endswith(".mlp"), num_experts=4, seed=0)  # doctest: +SKIP
    """
    _check_num_experts(num_experts)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise PlanError(f"seed must be an integer, got {seed!r}")
    names = _resolve_targets(model, modules)
    owners: dict = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(pname)
    for name in names:
        _check_target(model, name, owners)
    first = len(experts_blocks(model))
    for i, name in enumerate(names):
        parent, key = _parent_and_key(model, name)
        setattr(parent, key, ExpertsBlock(getattr(parent, key), num_experts, seed, index=first + i))
    return model


def collapse_experts(model):
    """Turns every ExpertsBlock of `model` back into one block of the original class (ExpertsBlock.collapse: each
    floating-point tensor the mean of the experts', fp32 sum in expert order / N rounded to its dtype), in place.
    The model then has the architecture, state_dict keys and inference cost it had before convert_to_experts.
    Every block is checked before anything changes.

    With no training in between, the result is the original weights bit for bit for float16 and bfloat16 tensors
    (any N: N copies of a value sum exactly in fp32) and for float32 with N = 2 or 4; other float32 N round the
    partial sums (3x, 5x, ...), within a few ulps (at most 1 for N = 3, 2 for N = 8 measured on 1e6 values).

    Returns:
        The model.

    Example:
        >>> deployed = collapse_experts(model)            # doctest: +SKIP
    """
    blocks = experts_blocks(model)
    if not blocks:
        raise PlanError("the model has no ExpertsBlock to collapse")
    for name, block in blocks.items():
        _check_experts(block, name)
    replaced = {name: block.collapse() for name, block in blocks.items()}
    for name, module in replaced.items():
        parent, key = _parent_and_key(model, name)
        setattr(parent, key, module)
    return model


class ExpertsWeightsAveraging:
    """EWA's share step over every ExpertsBlock of a model, to call after each optimizer step.

    For every tensor of every expert (weights and biases, the parameters; buffers are left alone):
        W_i <- (1 - beta) W_i + beta * mean_{j != i} W_j,   beta = share_rate, the paper's spelling.
    The other spelling, mixing toward the mean over all N experts at rate beta', W_i <- (1 - beta') W_i +
    beta' mean_j W_j, is the same update with beta = beta' (N - 1) / N. The step keeps the experts' mean
    (to fp32 rounding) and shrinks their spread by the factor 1 - beta N / (N - 1).

    How it is computed (the numerical contract, so every backend gives the same bytes): per tensor group
    M = pysoup.ops.weighted_sum(experts' tensors, [1] * N, float32, normalize=True), then one pysoup.ops.lerp_ for
    all the model's expert tensors: W_i <- round(fma(t, M, round_fp32((1 - t) W_i))) with t = beta * N / (N - 1)
    computed in float64 (t and 1 - t then rounded to fp32 by the kernel). A share rate of 0 changes nothing.

    Args:
        model: a module holding ExpertsBlocks (convert_to_experts); they are found once, here.
        share_rate: beta in [0, 1].
        backend, threads: as pysoup.ops.lerp_.

    Example:
        >>> ewa = ExpertsWeightsAveraging(model, share_rate=0.3)      # doctest: +SKIP
        >>> loss.backward(); optimizer.step(); ewa.step()            # doctest: +SKIP
    """

    def __init__(self, model, share_rate: float, backend="auto", threads=None):
        self.share_rate = _check_share_rate(share_rate)
        blocks = experts_blocks(model)
        if not blocks:
            raise PlanError("the model has no ExpertsBlock: convert_to_experts first")
        for name, block in blocks.items():
            _check_experts(block, name)
        self._blocks = [(name, *_parent_and_key(model, name), block) for name, block in blocks.items()]
        self.backend, self.threads = backend, threads

    def _groups(self) -> dict:
        """{N: [[expert 0's tensor, ..., expert N-1's] per parameter]}, the blocks checked again."""
        groups: dict = {}
        for name, parent, key, block in self._blocks:
            if parent._modules.get(key) is not block:
                raise PlanError(f"ExpertsBlock {name!r} is no longer in the model (collapsed?)")
            params = _check_experts(block, name, buffers=False)
            groups.setdefault(len(params), []).extend(zip(*params))
        return groups

    def step(self, share_rate: float | None = None) -> None:
        """One share step (after optimizer.step()). `share_rate` overrides the rate for this step (schedules)."""
        beta = self.share_rate if share_rate is None else _check_share_rate(share_rate)
        groups = self._groups()
        if beta == 0.0:
            return
        with torch.no_grad():
            for n, tensors in groups.items():
                be, th = self.backend, self.threads
                means = [ops.weighted_sum(ws, [1.0] * n, torch.float32, True, be, th) for ws in tensors]
                averaged = [w for ws in tensors for w in ws]
                current = [m for m in means for _ in range(n)]
                ops.lerp_(averaged, current, beta * n / (n - 1), be, th)

    __call__ = step


__all__ = [
    "ExpertsBlock",
    "ExpertsWeightsAveraging",
    "collapse_experts",
    "convert_to_experts",
    "experts_blocks",
    "router_seed",
]
