"""Merge coefficients computed from metrics: Metrics-Weighted Averaging and EMA presets for checkpoints."""

from __future__ import annotations

import json
import math
import os

from pysoup.errors import FormatError, PlanError

TRAINER_STATE = "trainer_state.json"


def trainer_metrics(checkpoints) -> list:
    """Step and training loss of Hugging Face Trainer checkpoint folders (`checkpoint-*/trainer_state.json`): the
    step is `global_step`, the loss the last `log_history` entry with a "loss" at or before that step (what the
    Trainer logged last before saving).

    Args:
        checkpoints: checkpoint folders (or their trainer_state.json files).

    Returns:
        [{"path", "step", "loss"}] in the given order.

    Example:
        >>> trainer_metrics(["run/checkpoint-100", "run/checkpoint-200"])  # doctest: +SKIP
        [{'path': 'run/checkpoint-100', 'step': 100, 'loss': 0.93}, ...]
    """
    out = []
    for ckpt in checkpoints:
        path = os.fspath(ckpt)
        state_path = os.path.join(path, TRAINER_STATE) if os.path.isdir(path) else path
        try:
            with open(state_path, encoding="utf-8") as f:
                state = json.load(f)
        except FileNotFoundError:
            raise PlanError(f"{path}: no {TRAINER_STATE} (not a Hugging Face Trainer checkpoint folder)") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise FormatError(f"{state_path}: cannot read ({getattr(exc, 'strerror', None) or exc})") from None
        step = state.get("global_step") if isinstance(state, dict) else None
        if isinstance(step, bool) or not isinstance(step, int):
            raise FormatError(f"{state_path}: no integer global_step")
        logged = [
            e for e in state.get("log_history") or []
            if isinstance(e, dict) and isinstance(e.get("loss"), (int, float)) and e.get("step", 0) <= step
        ]  # fmt: skip
        if not logged:
            raise PlanError(f"{state_path}: log_history has no training loss at or before step {step}")
        out.append({"path": path, "step": step, "loss": float(logged[-1]["loss"])})
    return out


def mwa(metrics, mode: str = "loss", penalty: float = 1.0) -> list:
    """Metrics-Weighted Averaging (pysoup's reading): w_i = m_i^(s p) / sum_j m_j^(s p), with s = -1 for training
    losses (lower loss weighs more) and s = +1 for training steps (later checkpoints weigh more); p >= 0 is the
    penalty factor and p = 0 gives the uniform average.

    Args:
        metrics: one positive number per checkpoint (losses or steps), or Hugging Face Trainer checkpoint folders
            (`run/checkpoint-*`), whose step and training loss come from trainer_state.json (trainer_metrics).
        mode: "loss" or "step".
        penalty: p >= 0.

    Returns:
        Weights summing to 1.

    Example:
        >>> [round(w, 4) for w in mwa([1.0, 0.8, 0.5], mode="loss", penalty=1)]
        [0.2353, 0.2941, 0.4706]
    """
    if mode not in ("loss", "step"):
        raise PlanError(f"mwa mode must be 'loss' or 'step', got {mode!r}")
    metrics = list(metrics)
    if metrics and all(isinstance(m, (str, os.PathLike)) for m in metrics):
        metrics = [m[mode] for m in trainer_metrics(metrics)]
    metrics = [float(m) for m in metrics]
    if not metrics:
        raise PlanError("mwa needs at least one metric")
    if not all(math.isfinite(m) and m > 0 for m in metrics):
        raise PlanError(f"mwa metrics must be positive and finite, got {metrics}")
    if not (math.isfinite(penalty) and penalty >= 0):
        raise PlanError(f"mwa penalty must be >= 0, got {penalty}")
    exponent = (-1.0 if mode == "loss" else 1.0) * penalty
    # In log space, so large steps or penalties do not overflow.
    logs = [exponent * math.log(m) for m in metrics]
    top = max(logs)
    raw = [math.exp(v - top) for v in logs]
    total = sum(raw)
    return [r / total for r in raw]


def ema(k: int, beta: float) -> list:
    """EMA coefficients over k saved checkpoints (the LCSC preset): alpha_i proportional to (1 - beta) beta^(k - i)
    for i = 1..k, normalized to sum to 1, so the newest checkpoint weighs most.

    Example:
        >>> [round(a, 3) for a in ema(3, 0.5)]
        [0.143, 0.286, 0.571]
    """
    if not isinstance(k, int) or k < 1:
        raise PlanError(f"ema needs k >= 1 checkpoints, got {k!r}")
    if not 0 <= beta < 1:
        raise PlanError(f"ema beta must be in [0, 1), got {beta}")
    raw = [(1 - beta) * beta ** (k - i) for i in range(1, k + 1)]
    total = sum(raw)
    return [r / total for r in raw]
