"""Trainer callbacks (pysoup.training.callbacks): a tiny Hugging Face Trainer and a tiny Lightning fit keep an
average; the optimizer records the weights after each of its steps, and a hand-made pysoup.training average fed
those weights must equal the callback's files bit for bit. Resuming from a checkpoint continues the average: the
resumed run ends on the same bytes as the uninterrupted one."""

import json
import warnings

import pytest

torch = pytest.importorskip("torch")

from pysoup.errors import PlanError  # noqa: E402
from pysoup.io.reader import SafetensorsReader  # noqa: E402
from pysoup.training import EMA, SWA, callbacks  # noqa: E402

STEPS = 6
SAVE_EVERY = 2


class RecordingSGD(torch.optim.SGD):
    """SGD that keeps a copy of the weights after each step it takes: what the average should have seen."""

    def __init__(self, model, lr=0.1):
        super().__init__(model.parameters(), lr=lr)
        self.model = model
        self.snapshots = [self._weights()]

    def _weights(self):
        return {n: t.detach().clone() for n, t in self.model.state_dict().items()}

    def step(self, closure=None):
        loss = super().step(closure)
        self.snapshots.append(self._weights())
        return loss


def _replay(make, model, snapshots):
    """The average a hand-written loop would keep over these weights: made on the first, updated on each next."""
    model.load_state_dict(snapshots[0])
    average = make(model)
    for weights in snapshots[1:]:
        model.load_state_dict(weights)
        average.update()
    return average


def _read(path):
    reader = SafetensorsReader(str(path))
    try:
        return {n: reader.torch(n).clone() for n in reader.infos}
    finally:
        reader.close()


def _assert_same(saved: dict, average):
    want = average.state_dict_of_average()
    assert set(saved) == set(want)
    for name, t in want.items():
        assert torch.equal(saved[name], t), name


def test_callback_module_imports_neither_framework():
    import subprocess
    import sys

    code = (
        "import sys, pysoup.training.callbacks as c; "
        "print(sorted(m for m in ('transformers', 'lightning', 'pytorch_lightning') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_unknown_kind_is_refused():
    with pytest.raises(PlanError, match="kind must be one of ema, swa, weight_ensemble, got 'polyak'"):
        callbacks._TransformersAveraging("polyak")


# -- Hugging Face transformers -----------------------------------------------------------------------------------
def _bert():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=32,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=16,
        hidden_dropout_prob=0.0,  # no randomness in training: a resumed run repeats the uninterrupted one
        attention_probs_dropout_prob=0.0,
        num_labels=2,
    )
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config)


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n=STEPS * 4):
        g = torch.Generator().manual_seed(1)
        self.ids = torch.randint(0, 32, (n, 6), generator=g)
        self.labels = torch.randint(0, 2, (n,), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def _hf_train(out, averaging, resume=None):
    import transformers

    model = _bert()
    args = transformers.TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=4,
        max_steps=STEPS,
        save_steps=SAVE_EVERY,
        logging_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    optimizer = RecordingSGD(model)
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=_Tokens(), callbacks=averaging, optimizers=(optimizer, None)
    )
    trainer.train(resume_from_checkpoint=resume)
    return model, optimizer


@pytest.fixture(scope="module")
def hf_run(tmp_path_factory):
    """One uninterrupted run with an EMA and an SWA callback (its files read), then a run in the same output_dir
    resumed from checkpoint-4."""
    pytest.importorskip("transformers")
    AveragingCallback = callbacks.AveragingCallback
    run = tmp_path_factory.mktemp("hf")
    ema = AveragingCallback("ema", decay=0.5)
    swa = AveragingCallback("swa", filename="swa.safetensors", update_every=2)
    model, optimizer = _hf_train(run, [ema, swa])
    files = {str(p.relative_to(run)): _read(p) for p in run.rglob("*.safetensors") if "model" not in p.name}
    listing = {str(p.relative_to(run)) for p in run.rglob("*_state/*")}
    resumed = AveragingCallback("ema", decay=0.5)
    _hf_train(run, [resumed], resume=str(run / f"checkpoint-{STEPS - SAVE_EVERY}"))
    return run, model, optimizer, ema, resumed, files, listing


def test_hf_average_beside_each_checkpoint_equals_a_hand_made_one(hf_run):
    _, _, optimizer, _, _, files, listing = hf_run
    assert len(optimizer.snapshots) == STEPS + 1
    for step in range(SAVE_EVERY, STEPS + 1, SAVE_EVERY):
        want = _replay(lambda m: EMA(m, decay=0.5), _bert(), optimizer.snapshots[: step + 1])
        _assert_same(files[f"checkpoint-{step}/average.safetensors"], want)
        want = _replay(lambda m: SWA(m, update_every=2), _bert(), optimizer.snapshots[: step + 1])
        _assert_same(files[f"checkpoint-{step}/swa.safetensors"], want)
        assert f"checkpoint-{step}/average_state/rank-00000-of-00001.safetensors" in listing
        assert f"checkpoint-{step}/swa_state/rank-00000-of-00001.safetensors" in listing


def test_hf_final_average_in_output_dir(hf_run):
    _, model, optimizer, ema, _, files, listing = hf_run
    saved = files["average.safetensors"]
    _assert_same(saved, ema.average)
    _assert_same(saved, _replay(lambda m: EMA(m, decay=0.5), _bert(), optimizer.snapshots))
    assert not torch.equal(saved["classifier.weight"], model.state_dict()["classifier.weight"])  # not the model
    assert ema.average.step == STEPS
    assert not any(name.startswith("average_state") for name in listing)  # the state goes in checkpoints only


def test_hf_state_records_the_counters(hf_run):
    run, *_ = hf_run
    reader = SafetensorsReader(str(run / "checkpoint-4" / "swa_state" / "rank-00000-of-00001.safetensors"))
    try:
        header = json.loads(reader.metadata["pysoup.sharded"])
    finally:
        reader.close()
    assert header["kind"] == "SWA" and header["counters"] == {"step": 4, "count": 2}


def test_hf_resume_continues_the_average(hf_run):
    run, _, _, ema, resumed, files, _ = hf_run
    assert resumed.average.step == STEPS
    for name, t in ema.average.averaged.items():
        assert torch.equal(resumed.average.averaged[name], t), name
    for name in ("average.safetensors", f"checkpoint-{STEPS}/average.safetensors"):  # rewritten by the resumed run
        _assert_same(_read(run / name), ema.average)


def test_hf_resume_without_a_saved_average_is_refused(hf_run):
    run, *_ = hf_run
    callback = callbacks.AveragingCallback("ema", filename="other.safetensors")
    with pytest.raises(PlanError, match="no other_state/ was found"):
        _hf_train(run, [callback], resume=str(run / "checkpoint-4"))


# -- PyTorch Lightning -------------------------------------------------------------------------------------------
def _lightning():
    try:
        import lightning.pytorch as pl
    except ImportError:
        pl = pytest.importorskip("pytorch_lightning", reason="neither lightning nor pytorch_lightning is installed")
    return pl


def _lightning_module(pl):
    class Regression(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 1))
            self.optimizer = None

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            self.optimizer = RecordingSGD(self)
            return self.optimizer

    return Regression()


def _lightning_fit(pl, root, callback, ckpt_path=None):
    """2 optimizer steps an epoch (4 batches, accumulated by 2), a checkpoint at each epoch's end."""
    g = torch.Generator().manual_seed(2)
    data = torch.utils.data.TensorDataset(torch.randn(16, 4, generator=g), torch.randn(16, 1, generator=g))
    loader = torch.utils.data.DataLoader(data, batch_size=4)  # in order: a resumed run sees the same batches
    module = _lightning_module(pl)
    checkpoints = pl.callbacks.ModelCheckpoint(dirpath=root / "ckpt", save_top_k=-1, save_on_train_epoch_end=True)
    trainer = pl.Trainer(
        max_steps=STEPS,
        accumulate_grad_batches=2,
        accelerator="cpu",
        devices=1,
        logger=False,
        callbacks=[callback, checkpoints],
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
    )
    trainer.fit(module, loader, ckpt_path=ckpt_path)
    return module


@pytest.fixture(scope="module")
def lightning_run(tmp_path_factory):
    pl = _lightning()
    root = tmp_path_factory.mktemp("lightning")
    callback = callbacks.LightningAveragingCallback("ema", decay=0.5)
    module = _lightning_fit(pl, root, callback)
    resumed = callbacks.LightningAveragingCallback("ema", decay=0.5, filename="resumed.safetensors")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Checkpoint directory .* exists and is not empty")
        resumed_module = _lightning_fit(pl, root, resumed, ckpt_path=str(root / "ckpt" / "epoch=1-step=4.ckpt"))
    return pl, root, module, callback, (resumed, resumed_module)


def test_lightning_updates_once_per_optimizer_step(lightning_run):
    _, root, module, callback, _ = lightning_run
    snapshots = module.optimizer.snapshots
    assert len(snapshots) == STEPS + 1 and callback.average.step == STEPS  # 12 batches, accumulated by 2
    want = _replay(lambda m: EMA(m, decay=0.5), _lightning_module(_lightning()), snapshots)
    _assert_same(_read(root / "average.safetensors"), want)


def test_lightning_checkpoint_holds_the_average_state(lightning_run):
    _, root, module, _, _ = lightning_run
    state = torch.load(root / "ckpt" / "epoch=1-step=4.ckpt", weights_only=True)["pysoup_average"]
    want = _replay(lambda m: EMA(m, decay=0.5), _lightning_module(_lightning()), module.optimizer.snapshots[:5])
    assert state["kind"] == "EMA" and state["step"] == 4
    assert all(torch.equal(state["averaged"][n], t) for n, t in want.averaged.items())


def test_lightning_resume_continues_the_average(lightning_run):
    """Lightning replays part of the epoch a checkpoint was taken in, so the resumed run need not retrace the
    first; the average must go on from the checkpoint's over the weights the resumed run steps through."""
    _, root, _, _, (resumed, module) = lightning_run
    state = torch.load(root / "ckpt" / "epoch=1-step=4.ckpt", weights_only=True)["pysoup_average"]
    snapshots = module.optimizer.snapshots
    assert resumed.average.step == STEPS and len(snapshots) == 1 + STEPS - 4
    replica = _lightning_module(_lightning())
    replica.load_state_dict(snapshots[0])
    want = EMA(replica, decay=0.5)
    want.load_state_dict(state)
    for weights in snapshots[1:]:
        replica.load_state_dict(weights)
        want.update()
    _assert_same(_read(root / "resumed.safetensors"), want)
