"""Averaged copies of a model that a training loop keeps: EMA, SWA and ZSCL's running weight ensemble.

Each keeps one averaged tensor per parameter (and per floating-point buffer, when buffers are averaged) and
updates all of them after an optimizer step with one fused multi-tensor call per dtype pair
(pysoup.ops.MultiTensorLerp): a <- weighted_sum([a, x], [1 - t, t]) rounded into a's dtype, by the numerical
contract, so the result is the same bytes on every backend and thread count. The schedule (decay, warm-up, the
running count) is plain Python arithmetic: an update never reads a device value, so it never waits for the GPU.
"""

from __future__ import annotations

import contextlib
import math

from pysoup.errors import PlanError

BUFFER_MODES = ("average", "copy")


def averaged_tensors(model, buffers: str, dtype, label: str) -> tuple:
    """What an average of `model` keeps, checked: ([(name, tensor)] averaged: the parameters, then the float
    buffers under buffers="average"; [(name, buffer)] copied; the number of parameters among the averaged)."""
    import torch

    if not isinstance(model, torch.nn.Module):
        raise PlanError(f"{label}: expected a torch.nn.Module, got {type(model).__name__}")
    if buffers not in BUFFER_MODES:
        raise PlanError(f"{label}: buffers must be one of {', '.join(BUFFER_MODES)}, got {buffers!r}")
    floats = (torch.float32, torch.float16, torch.bfloat16)
    if dtype is not None and dtype not in floats:
        raise PlanError(f"{label}: dtype must be torch.float32, float16 or bfloat16, got {dtype}")
    params = list(model.named_parameters())
    for name, p in params:
        if p.dtype not in floats:
            raise PlanError(f"{label}: parameter {name!r} has dtype {p.dtype}; averages need float tensors")
    averaged_buffers = [(n, b) for n, b in model.named_buffers() if b.dtype in floats and buffers == "average"]
    copied = [(n, b) for n, b in model.named_buffers() if (n, b) not in averaged_buffers]
    named = params + averaged_buffers
    if not named:
        raise PlanError(f"{label}: the model has no float parameters or buffers to average")
    return named, copied, len(params)


class _Average:
    """What EMA, SWA and WeightEnsemble share: the averaged tensors bound to a model, the fused update, saving and
    resuming, and swapping the average into the model for evaluation."""

    kind = ""

    def __init__(self, model, *, buffers: str = "average", dtype=None):
        import torch

        named, self._copied, self._param_count = averaged_tensors(model, buffers, dtype, type(self).__name__)
        self.buffers = buffers
        self._model = model
        from pysoup.training.sharded import Sharding, fsdp_modules

        for module in fsdp_modules(model):  # FSDP2 shows the shards, not all-gathered copies (after an eval forward)
            module.reshard()
        self.names = [n for n, _ in named]
        # DTensor parameters (FSDP2, tensor parallelism): the average holds and updates this rank's shard only
        self._sharding = Sharding.of(model, named, self.kind)
        current = [t for _, t in named] if self._sharding is None else self._sharding.local_tensors()
        with torch.no_grad():
            self.averaged = {n: t.detach().to(dtype or t.dtype, copy=True) for n, t in zip(self.names, current)}
            self.copied = {n: b.detach().clone() for n, b in self._copied}
        self._shapes = [(t.shape, t.dtype, t.device) for t in current]
        self._bind(current)
        self.step = 0  # update() calls so far: the optimizer steps seen

    def _bind(self, current: list) -> None:
        """Binds the fused update to the tensors it reads (the model's, or for DTensors their local shards)."""
        from pysoup.ops import MultiTensorLerp

        self._current = current
        self._addresses = [t.data_ptr() for t in current]
        self._lerp = MultiTensorLerp(list(self.averaged.values()), current)

    @property
    def sharded(self) -> bool:
        """True when the model's parameters include DTensors: the averaged tensors are this rank's shards."""
        return self._sharding is not None

    # -- the update --------------------------------------------------------------------------------------------
    def _weight(self) -> float | None:
        """The share of the current weights at this step (1 copies), or None to skip the step. Pure: the counters
        move in _averaged(), once the update succeeded."""
        raise NotImplementedError

    def _averaged(self) -> None:
        pass

    def update(self, step: int | None = None) -> None:
        """Call after each optimizer step. `step`: the step number, when the loop counts (default: one more than
        the last)."""
        import torch

        previous = self.step
        self.step = self.step + 1 if step is None else int(step)
        t = self._weight()
        if t is None:
            return
        try:
            if self._sharding is not None:
                self._sharding.rebind_if_moved(self)  # FSDP2 may give a parameter new local memory
            with torch.no_grad():
                if t == 1.0:  # a copy: exact even where the average holds inf or NaN (0 * inf is NaN)
                    self._check_model()
                    for a, x in zip(self.averaged.values(), self._current):
                        a.copy_(x)
                else:
                    self._lerp(t)  # refuses tensors whose memory moved since binding, before writing
                for (_, b), kept in zip(self._copied, self.copied.values()):
                    kept.copy_(b)
        except PlanError as exc:
            self.step = previous
            moved = self._moved()
            why = f"{moved!r} no longer holds the memory it had (was its .data replaced?)" if moved else str(exc)
            raise self._changed(why) from None
        self._averaged()

    def _moved(self) -> str | None:
        """The first bound tensor whose memory is not what it was at binding (its .data replaced), or None."""
        return next((n for n, t, a in zip(self.names, self._current, self._addresses) if t.data_ptr() != a), None)

    def _changed(self, why: str) -> PlanError:
        label = type(self).__name__
        return PlanError(f"{label}: {why}; make a new {label} for a changed model")

    def _check_model(self) -> None:
        """The bound tensors still have their shape, dtype and device (the lerp checks their memory)."""
        for name, t, (shape, dtype, device) in zip(self.names, self._current, self._shapes):
            if t.shape != shape or t.dtype != dtype or t.device != device:
                raise PlanError(
                    f"{name!r} changed since the average was made ({list(shape)} {dtype} on {device} -> "
                    f"{list(t.shape)} {t.dtype} on {t.device})"
                )

    # -- reading the average -----------------------------------------------------------------------------------
    def state_dict_of_average(self) -> dict:
        """The averaged model as a state dict with the model's keys (averaged tensors, copied buffers)."""
        keys = list(self._model.state_dict().keys())
        merged = {**self.averaged, **self.copied}
        return {k: merged[k] for k in keys if k in merged}

    def save(self, path, shard_size=None) -> list:
        """Writes the averaged model as safetensors (a file, or a Hugging Face directory): it feeds pysoup.merge.
        A sharded average (DTensor parameters) is gathered: every rank calls save(), rank 0 writes the full
        tensors (the others return [])."""
        from pysoup.io.writer import write_arrays

        if self._sharding is not None:
            from pysoup.training.sharded import save_full

            return save_full(self, path, shard_size=shard_size)
        arrays, dtypes = host_arrays(self.state_dict_of_average())
        return write_arrays(path, arrays, dtypes, shard_size=shard_size, metadata={"format": "pt"})

    def save_sharded(self, directory) -> list:
        """Writes this rank's part of the average and its counters to `directory`/rank-RRRRR-of-WWWWW.safetensors
        (every rank calls it); load_sharded() reads the set back onto any layout. See pysoup.training.sharded."""
        from pysoup.training.sharded import save_sharded

        return save_sharded(self, directory)

    def load_sharded(self, directory) -> None:
        """Restores the average and its counters from a save_sharded() directory, saved by any number of ranks,
        onto this model's layout (sharded or not)."""
        from pysoup.training.sharded import load_sharded

        load_sharded(self, directory)

    @contextlib.contextmanager
    def swapped(self):
        """The training model holds the averaged weights inside the block (for evaluation), its own after."""
        import torch

        if self._sharding is not None:
            self._sharding.reshard()  # an all-gathered copy of the weights would hide the swap from the forward
            self._sharding.rebind_if_moved(self)
        kept = []
        with torch.no_grad():
            for name, x in zip(self.names, self._current):
                kept.append(x.detach().clone())
                x.copy_(self.averaged[name])
            for (_, b), avg in zip(self._copied, self.copied.values()):
                kept.append(b.detach().clone())
                b.copy_(avg)
        try:
            yield self._model
        finally:
            with torch.no_grad():
                for x, old in zip([*self._current, *(b for _, b in self._copied)], kept):
                    x.copy_(old)
            if self._sharding is not None:
                self._sharding.reshard()  # drop all-gathered copies of the average

    # -- resuming ------------------------------------------------------------------------------------------------
    def _counters(self) -> dict:
        return {"step": self.step}

    def state_dict(self) -> dict:
        """Everything needed to resume: the averaged tensors, the copied buffers and the counters."""
        return {
            "kind": self.kind,
            "averaged": {n: t.clone() for n, t in self.averaged.items()},
            "copied": {n: t.clone() for n, t in self.copied.items()},
            **self._counters(),
        }

    def load_state_dict(self, state: dict) -> None:
        import torch

        if state.get("kind") != self.kind:
            raise PlanError(f"{self.kind}: the state is of a {state.get('kind')!r}, not a {self.kind}")
        for part in ("averaged", "copied"):
            mine, theirs = getattr(self, part), state[part]
            if set(mine) != set(theirs):
                missing = sorted(set(mine) ^ set(theirs))
                raise PlanError(f"{self.kind}: the state's tensors differ from the model's (first: {missing[0]!r})")
            for name, t in theirs.items():
                if t.shape != mine[name].shape or t.dtype != mine[name].dtype:
                    raise PlanError(
                        f"{self.kind}: {name!r} is {list(t.shape)} {t.dtype} in the state, "
                        f"{list(mine[name].shape)} {mine[name].dtype} here"
                    )
        with torch.no_grad():
            for part in ("averaged", "copied"):
                for name, t in state[part].items():
                    getattr(self, part)[name].copy_(t)
        for key in self._counters():
            setattr(self, key, state[key])


def _same_size_int(dtype):
    import torch

    return {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}.get(dtype, dtype)


def host_arrays(tensors: dict) -> tuple:
    """{name: torch tensor} -> ({name: numpy array}, {name: safetensors dtype}), as write_arrays takes them."""
    from pysoup.dtypes import from_torch

    arrays, dtypes = {}, {}
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        dtypes[name] = from_torch(t.dtype)
        arrays[name] = t.view(_same_size_int(t.dtype)).numpy() if t.dtype.is_floating_point else t.numpy()
    return arrays, dtypes


def _check_unit(kind: str, name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise PlanError(f"{kind}: {name} must be a number in [0, 1], got {value!r}")
    return float(value)


class EMA(_Average):
    """The exponential moving average theta_e <- decay * theta_e + (1 - decay) * theta (Polyak averaging).

    Args:
        model: the training model (its parameters, and floating-point buffers under buffers="average").
        decay: beta in [0, 1].
        warmup: decay warm-up as timm and diffusers define it: at update n (counted from start_step + 1)
            decay_n = 1 - (1 + n / warmup_gamma) ** -warmup_power, clamped to [min_decay, decay]; the first update
            copies the model.
        warmup_gamma, warmup_power, min_decay: the warm-up's parameters (timm's defaults).
        update_every: average every k-th optimizer step only (the skipped steps leave the average as it is).
        start_step: steps up to this one copy the model instead of averaging (timm's update_after_step).
        buffers: "average" (float buffers like parameters; others copied) or "copy" (every buffer copied).
        dtype: the average's dtype (e.g. torch.float32 for a bf16 model); default the model's.

    Example:
        >>> ema = pysoup.training.EMA(model, decay=0.999)          # doctest: +SKIP
        >>> for batch in loader:                                    # doctest: +SKIP
        ...     loss(model, batch).backward(); opt.step(); ema.update()
        >>> with ema.swapped():                                     # doctest: +SKIP
        ...     evaluate(model)
    """

    kind = "EMA"

    def __init__(
        self,
        model,
        decay: float = 0.9999,
        *,
        warmup: bool = False,
        warmup_gamma: float = 1.0,
        warmup_power: float = 2 / 3,
        min_decay: float = 0.0,
        update_every: int = 1,
        start_step: int = 0,
        buffers: str = "average",
        dtype=None,
    ):
        self.decay = _check_unit("EMA", "decay", decay)
        self.min_decay = _check_unit("EMA", "min_decay", min_decay)
        if not (isinstance(warmup_gamma, (int, float)) and warmup_gamma > 0 and math.isfinite(warmup_gamma)):
            raise PlanError(f"EMA: warmup_gamma must be a positive number, got {warmup_gamma!r}")
        if not (isinstance(warmup_power, (int, float)) and warmup_power > 0 and math.isfinite(warmup_power)):
            raise PlanError(f"EMA: warmup_power must be a positive number, got {warmup_power!r}")
        if isinstance(update_every, bool) or not isinstance(update_every, int) or update_every < 1:
            raise PlanError(f"EMA: update_every must be a positive integer, got {update_every!r}")
        if isinstance(start_step, bool) or not isinstance(start_step, int) or start_step < 0:
            raise PlanError(f"EMA: start_step must be a non-negative integer, got {start_step!r}")
        self.warmup, self.warmup_gamma, self.warmup_power = bool(warmup), float(warmup_gamma), float(warmup_power)
        self.update_every, self.start_step = update_every, start_step
        super().__init__(model, buffers=buffers, dtype=dtype)

    def decay_at(self, step: int) -> float:
        """The decay the update after optimizer step `step` uses (0: a copy)."""
        n = step - self.start_step - 1
        if n < 0 or (self.warmup and n == 0):
            return 0.0
        if not self.warmup:
            return self.decay
        value = 1.0 - (1.0 + n / self.warmup_gamma) ** -self.warmup_power
        return max(min(self.decay, value), self.min_decay)

    def _weight(self):
        if self.step % self.update_every:
            return None
        return 1.0 - self.decay_at(self.step)


class SWA(_Average):
    """Stochastic weight averaging: the running mean theta_s <- (n theta_s + theta) / (n + 1) of the weights at the
    updates made (the first copies). Afterwards, `update_bn(loader)` recomputes BatchNorm statistics for the
    averaged weights (as torch.optim.swa_utils.update_bn).

    Args:
        model: the training model.
        update_every: average every k-th optimizer step (e.g. once per epoch's worth of steps).
        start_step: steps before this one are not averaged (SWA starts late in training).
        buffers: "copy" (default, as torch's AveragedModel: buffers follow the model, update_bn refreshes them) or
            "average".
        dtype: the average's dtype; default the model's.
    """

    kind = "SWA"

    def __init__(self, model, *, update_every: int = 1, start_step: int = 0, buffers: str = "copy", dtype=None):
        if isinstance(update_every, bool) or not isinstance(update_every, int) or update_every < 1:
            raise PlanError(f"SWA: update_every must be a positive integer, got {update_every!r}")
        if isinstance(start_step, bool) or not isinstance(start_step, int) or start_step < 0:
            raise PlanError(f"SWA: start_step must be a non-negative integer, got {start_step!r}")
        self.update_every, self.start_step = update_every, start_step
        self.count = 0  # models in the average
        super().__init__(model, buffers=buffers, dtype=dtype)

    def _weight(self):
        if self.step < self.start_step or (self.step - self.start_step) % self.update_every:
            return None
        return 1.0 / (self.count + 1)

    def _averaged(self):
        self.count += 1

    def _counters(self):
        return {"step": self.step, "count": self.count}

    def update_bn(self, loader, device=None) -> None:
        """Recomputes the BatchNorm running statistics of the averaged weights with one pass over `loader`, and
        keeps them in the average."""
        import torch

        with self.swapped() as model:
            torch.optim.swa_utils.update_bn(loader, model, device=device)
            fresh = {n: b.detach().clone() for n, b in model.named_buffers()}
        with torch.no_grad():
            for store in (self.averaged, self.copied):
                for name, t in store.items():
                    if name in fresh:
                        t.copy_(fresh[name])


class WeightEnsemble(_Average):
    """ZSCL's running weight ensemble (as its official code): after the optimizer step of iteration t (counted
    from 0), when t % every == 0: n <- n + 1 and theta_we <- (n theta_we + theta_t) / (n + 1). theta_we starts as
    the weights the task starts from, with n = 0: they count as the first member.

    Args:
        model: the model at the start of the task.
        every: I, the interval in optimizer steps (ZSCL's default 100).
        buffers: "average" or "copy" (default "copy").

    Call `update()` after every optimizer step: the first call is iteration 0 (or pass `step=t`).
    """

    kind = "WeightEnsemble"

    def __init__(self, model, every: int = 100, *, buffers: str = "copy", dtype=None):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise PlanError(f"WeightEnsemble: every must be a positive integer, got {every!r}")
        self.every = every
        self.members = 1  # the initial weights
        super().__init__(model, buffers=buffers, dtype=dtype)
        self.step = -1  # the first update() is iteration 0

    def _weight(self):
        if self.step % self.every:
            return None
        return 1.0 / (self.members + 1)

    def _averaged(self):
        self.members += 1

    def _counters(self):
        return {"step": self.step, "members": self.members}
