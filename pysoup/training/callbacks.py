"""Trainer callbacks that keep an average of the model during training: Hugging Face transformers' Trainer
(`AveragingCallback`) and PyTorch Lightning (`LightningAveragingCallback`).

Both make an EMA, SWA or WeightEnsemble of the model when training starts, update it after each optimizer step,
keep its state with the trainer's checkpoints so that a resumed run continues the same average, and write the
final average as safetensors (pysoup.merge reads it). transformers and lightning are imported only when a
callback class is first asked for (the module's __getattr__ builds it then), so importing pysoup.training.callbacks
needs neither.

What goes where (Hugging Face):
    <output_dir>/checkpoint-<step>/average.safetensors   the average at that checkpoint (full tensors)
    <output_dir>/checkpoint-<step>/average_state/        its state for resuming: save_sharded's files
    <output_dir>/average.safetensors                     the final average (on_train_end)
Lightning keeps the state in the checkpoint dict under "pysoup_average" and writes the final average to
<dirpath or trainer.default_root_dir>/average.safetensors.
"""

from __future__ import annotations

import functools
import os

from pysoup.errors import PlanError

KINDS = ("ema", "swa", "weight_ensemble")
AVERAGE_FILE = "average.safetensors"
CHECKPOINT_KEY = "pysoup_average"  # Lightning: the average's state in the checkpoint dict


def make_average(kind: str, model, options: dict):
    """An EMA ("ema"), SWA ("swa") or WeightEnsemble ("weight_ensemble") of `model`, made with `options`."""
    from pysoup.training.average import EMA, SWA, WeightEnsemble

    _check_kind(kind)
    if model is None:
        raise PlanError("averaging callback: the trainer passed no model")
    return dict(zip(KINDS, (EMA, SWA, WeightEnsemble)))[kind](model, **options)


def _check_kind(kind) -> None:
    if kind not in KINDS:
        raise PlanError(f"averaging callback: kind must be one of {', '.join(KINDS)}, got {kind!r}")


def state_directory_name(filename: str) -> str:
    """Where the state for resuming goes beside `filename`: average.safetensors -> average_state (so that several
    callbacks with their own file names can share a checkpoint)."""
    stem = filename[: -len(".safetensors")] if filename.endswith(".safetensors") else filename
    return f"{stem}_state"


class _TransformersAveraging:
    """A transformers.TrainerCallback that keeps an average of the model during Trainer.train().

    Args:
        kind: "ema", "swa" or "weight_ensemble".
        filename: the average's file name, in each checkpoint directory and in output_dir at the end; its
            state for resuming goes in <stem>_state/ beside it.
        resume_from: where a resumed run finds the average's state: None looks in
            <output_dir>/checkpoint-<resumed step>, then args.resume_from_checkpoint; a path names the checkpoint
            directory; False starts a new average when training resumes.
        **options: the average's own arguments (e.g. decay=0.999, update_every=10).

    The average is made at on_train_begin from the model the Trainer passes (sharded or not: with FSDP2 each
    rank averages its shards), updated at on_step_end (after the optimizer step, once per gradient-accumulation
    cycle), saved at on_save beside the checkpoint the Trainer just wrote, and written whole at on_train_end.
    The trained average is `callback.average` (pysoup.training.EMA, ...).

    Example:
        >>> from pysoup.training.callbacks import AveragingCallback                    # doctest: +SKIP
        >>> trainer = Trainer(model, args, train_dataset=ds,                           # doctest: +SKIP
        ...                   callbacks=[AveragingCallback("ema", decay=0.999)])
        >>> trainer.train()   # output_dir/average.safetensors                          # doctest: +SKIP
    """

    def __init__(self, kind: str = "ema", *, filename: str = AVERAGE_FILE, resume_from=None, **options):
        _check_kind(kind)
        self.kind, self.filename, self.resume_from, self.options = kind, filename, resume_from, options
        self.average = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.average = make_average(self.kind, model, self.options)
        if state.global_step > 0 and self.resume_from is not False:
            # Trainer.train(resume_from_checkpoint=...) restored state.global_step from the checkpoint but does not
            # tell callbacks where it was: it is output_dir/checkpoint-<step> unless the user says otherwise.
            directory = self._state_directory(args, state)
            self.average.load_sharded(directory)
            if self.average.step != state.global_step:
                raise PlanError(
                    f"averaging callback: the average in {directory} is at step {self.average.step}, "
                    f"training resumes at step {state.global_step}"
                )

    def _state_directory(self, args, state) -> str:
        if self.resume_from is not None:
            candidates = [self.resume_from]
        else:
            from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

            candidates = [os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")]
            if isinstance(args.resume_from_checkpoint, str):
                candidates.append(args.resume_from_checkpoint)
        for checkpoint in candidates:
            directory = os.path.join(os.fspath(checkpoint), state_directory_name(self.filename))
            if os.path.isdir(directory):
                return directory
        raise PlanError(
            f"averaging callback: training resumes at step {state.global_step} but no "
            f"{state_directory_name(self.filename)}/ was found in "
            f"{' or '.join(map(str, candidates))}; pass resume_from=<checkpoint directory>, or resume_from=False "
            "to start a new average"
        )

    def on_step_end(self, args, state, control, **kwargs):
        self.average.update()

    def on_save(self, args, state, control, **kwargs):
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        checkpoint = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        self._save(checkpoint, state, with_state=True)

    def on_train_end(self, args, state, control, **kwargs):
        if self.average is not None:
            self._save(args.output_dir, state, with_state=False)

    def _save(self, directory: str, state, with_state: bool) -> None:
        # A sharded average is gathered and saved by every rank together; an unsharded one is the same on every
        # rank, and the main process writes it.
        if self.average.sharded or state.is_world_process_zero:
            self.average.save(os.path.join(directory, self.filename))
            if with_state:
                self.average.save_sharded(os.path.join(directory, state_directory_name(self.filename)))


class _LightningAveraging:
    """A Lightning Callback that keeps an average of the LightningModule during Trainer.fit().

    Args:
        kind: "ema", "swa" or "weight_ensemble".
        dirpath: where the final average goes (default: trainer.default_root_dir).
        filename: its file name.
        **options: the average's own arguments.

    The average is made at on_fit_start (after the strategy moved the module to its device), updated at
    on_train_batch_end whenever trainer.global_step moved (an optimizer step: once per accumulation cycle, and
    in manual optimization), kept in each checkpoint dict under "pysoup_average" (on_save_checkpoint) and
    restored from it when fit() resumes (on_load_checkpoint, before or after on_fit_start as the strategy
    restores), and written on rank 0 at on_train_end. Sharded (DTensor) modules are refused: the checkpoint dict
    would hold one rank's shards; use the average's save_sharded() there.

    Example:
        >>> from pysoup.training.callbacks import LightningAveragingCallback            # doctest: +SKIP
        >>> Trainer(callbacks=[LightningAveragingCallback("ema", decay=0.999)]).fit(module)   # doctest: +SKIP
    """

    def __init__(self, kind: str = "ema", *, dirpath=None, filename: str = AVERAGE_FILE, **options):
        _check_kind(kind)
        self.kind, self.dirpath, self.filename, self.options = kind, dirpath, filename, options
        self.average = None
        self._pending = None  # a checkpoint's state restored before the average was made
        self._last_step = None

    def on_fit_start(self, trainer, pl_module):
        self.average = make_average(self.kind, pl_module, self.options)
        if self.average.sharded:
            raise PlanError(
                "LightningAveragingCallback: the module's parameters are sharded (DTensor); a checkpoint dict would "
                "hold one rank's shards. Keep a pysoup.training average by hand and use its save_sharded()"
            )
        if self._pending is not None:
            self.average.load_state_dict(self._pending)
            self._pending = None

    def on_train_start(self, trainer, pl_module):
        self._last_step = trainer.global_step  # restored by now when fit() resumes

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step != self._last_step:
            self._last_step = trainer.global_step
            self.average.update()

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        if self.average is not None:
            checkpoint[CHECKPOINT_KEY] = self.average.state_dict()

    def on_load_checkpoint(self, trainer, pl_module, checkpoint):
        state = checkpoint.get(CHECKPOINT_KEY)
        if state is None:
            return
        if self.average is None:
            self._pending = state
        else:
            self.average.load_state_dict(state)

    def on_train_end(self, trainer, pl_module):
        if self.average is not None and trainer.is_global_zero:
            directory = os.fspath(self.dirpath or trainer.default_root_dir)
            os.makedirs(directory, exist_ok=True)
            self.average.save(os.path.join(directory, self.filename))


@functools.cache
def _transformers_callback():
    from transformers import TrainerCallback

    return _combine("AveragingCallback", _TransformersAveraging, TrainerCallback)


@functools.cache
def _lightning_callback():
    try:
        from lightning.pytorch import Callback
    except ImportError:
        from pytorch_lightning import Callback
    return _combine("LightningAveragingCallback", _LightningAveraging, Callback)


def _combine(name: str, behaviour: type, base: type) -> type:
    """The public class: our methods first, the framework's base class for everything else."""
    cls = type(name, (behaviour, base), {"__module__": __name__, "__doc__": behaviour.__doc__})
    cls.__qualname__ = name
    return cls


def __getattr__(name: str):
    if name == "AveragingCallback":
        return _transformers_callback()
    if name == "LightningAveragingCallback":
        return _lightning_callback()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# The two callback classes come from __getattr__ (built on first use), which ruff cannot see.
__all__ = ["AveragingCallback", "LightningAveragingCallback", "make_average"]  # noqa: F822
