"""mergekit 0.1.5's merge methods as its configs see them: how each treats `base_model`, and every parameter it
takes with its scope, type and default (read from `mergekit.merge_methods.registry`, 0.1.5).

This table says how a config is READ (which level a parameter is looked up at, what type a value is, what the
default is); the merging itself is the pysoup strategy registered under the same name (pysoup/strategies). A method
here without a registered strategy is refused by name; a strategy registered under one of these names is available
in configs without any change to the reader.
"""

from __future__ import annotations

REQUIRED = object()  # a parameter mergekit has no default for: a config must set it

# Scopes, as mergekit's ParameterScope: "shared" is read from the slice / module / top-level `parameters` only;
# "input" per model, the base included; "non_base" per model, the base excluded.
_TA = {
    "int8_mask": ("shared", "bool", False),
    "normalize": ("shared", "bool", False),
    "rescale": ("shared", "bool", False),
    "lambda": ("shared", "float", 1.0),
    "weight": ("non_base", "float", REQUIRED),
    "density": ("non_base", "float", 1.0),
}


def _ta(normalize: bool, rescale: bool, **extra) -> dict:
    return {
        **_TA,
        "normalize": ("shared", "bool", normalize),
        "rescale": ("shared", "bool", rescale),
        **{k: ("non_base", "float", v) for k, v in extra.items()},
    }


# name -> (base policy, {parameter: (scope, type, default)}). Base policies as mergekit's BasePolicy: "required",
# "optional", "forbidden", or "ignored" (the base is merged as one more ordinary input).
METHODS = {
    "linear": ("ignored", {"weight": ("input", "float", REQUIRED), "normalize": ("shared", "bool", True)}),
    "passthrough": ("ignored", {"scale": ("input", "optfloat", None)}),
    "karcher": ("ignored", {"max_iter": ("shared", "int", 10), "tol": ("shared", "float", 1e-5)}),
    "slerp": ("required", {"t": ("shared", "float", REQUIRED)}),
    "nearswap": ("required", {"t": ("shared", "float", REQUIRED)}),
    "arcee_fusion": ("required", {}),
    "model_stock": ("required", {"filter_wise": ("shared", "bool", False)}),
    "nuslerp": (
        "optional",
        {
            "weight": ("non_base", "float", REQUIRED),
            "nuslerp_row_wise": ("shared", "bool", False),
            "nuslerp_flatten": ("shared", "bool", True),
        },
    ),
    "multislerp": (
        "optional",
        {
            "weight": ("non_base", "float", REQUIRED),
            "normalize_weights": ("shared", "bool", True),
            "eps": ("shared", "float", 1e-8),
        },
    ),
    "ram": ("required", {"epsilon": ("shared", "float", 1e-5)}),
    "ramplus_tl": (
        "required",
        {"r": ("shared", "float", 0.1), "alpha": ("shared", "float", 0.2), "epsilon": ("shared", "float", 1e-5)},
    ),
    "sce": ("required", {"int8_mask": ("shared", "bool", False), "select_topk": ("shared", "float", 1.0)}),
    "task_arithmetic": ("required", _ta(False, False)),
    "ties": ("required", _ta(True, False)),
    "dare_ties": ("required", _ta(False, True)),
    "dare_linear": ("required", _ta(False, True)),
    "breadcrumbs": ("required", _ta(False, False, gamma=0.01)),
    "breadcrumbs_ties": ("required", _ta(False, False, gamma=0.01)),
    "della": ("required", _ta(True, True, epsilon=0.15)),
    "della_linear": ("required", _ta(False, True, epsilon=0.15)),
}

# Parameters that steer only how mergekit computes, never a merged value (int8_mask: the dtype of TIES' sign mask).
NO_EFFECT = {"int8_mask"}

# The pysoup strategy of each mergekit method, where the names differ (none today: strategies register under
# mergekit's names).
STRATEGY_NAMES: dict = {}

# Where a pysoup strategy's parameter means the same as mergekit's but takes other values: (method, parameter) ->
# {mergekit value: pysoup value}. mergekit's DARE `rescale: true` scales the survivors back to the L1 norm of the
# task vector; pysoup's dare_* call that rescale "l1" (their own default, "density", is DARE's 1/density).
VALUE_NAMES = {
    ("dare_linear", "rescale"): {True: "l1", False: False},
    ("dare_ties", "rescale"): {True: "l1", False: False},
}
