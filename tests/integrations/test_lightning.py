"""tensortap.lightning with the real Lightning Trainer, compared with what Lightning computed."""

from __future__ import annotations

import importlib.metadata
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers.docs import ROOT, python_blocks, run_block

torch = pytest.importorskip("torch")
L = pytest.importorskip("lightning.pytorch")

import tensortap  # noqa: E402
import tensortap.lightning as ttl  # noqa: E402
from tensortap import Mode, SaveConfig  # noqa: E402
from tensortap.rules import ExplodingTensor, StopTraining  # noqa: E402

pytestmark = pytest.mark.torch
EVERY_STEP = SaveConfig(save_interval=1)
TRAINER = {
    "accelerator": "cpu",
    "logger": False,
    "enable_checkpointing": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
}


class Regressor(L.LightningModule):
    """A tiny MLP that records what Lightning handed the optimizer."""

    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        self.lr = lr
        self.losses: list[float] = []
        self.applied: list[dict[str, np.ndarray]] = []  # gradients optimizer.step() applied
        self.norms_before_clip: list[float] = []

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.losses.append(float(loss.detach()))
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        self.log("scaled", 2 * loss.detach(), on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.net(x), y))
        self.log("val_mae", (self.net(x) - y).abs().mean())

    def on_train_epoch_end(self) -> None:
        self.log("epoch_marker", float(self.current_epoch) + 0.5)

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        norms = L.utilities.grad_norm(self, norm_type=2)
        self.norms_before_clip.append(float(norms["grad_2.0_norm_total"]))

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        optimizer.step(closure=optimizer_closure)
        self.applied.append({n: p.grad.detach().numpy().copy() for n, p in self.named_parameters()})

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def loader(n: int, seed: int) -> Any:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]])
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)


def test_the_quickstart_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/quickstart-lightning.md's blocks, in order, with this file's module and data for the script's."""
    page = ROOT / "docs" / "quickstart-lightning.md"
    blocks = python_blocks(page)
    assert len(blocks) == 3
    monkeypatch.chdir(tmp_path)  # the Trainer's own logs
    namespace = {"__name__": "docs", "model": Regressor(), "train_loader": loader(32, 0), "val_loader": loader(16, 1)}
    for i, block in enumerate(blocks):
        run_block(page, i, block, namespace, tmp_path)


def test_fit_captures_what_lightning_computed(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Regressor()
    clip = 0.5
    trainer = L.Trainer(
        max_epochs=2, gradient_clip_val=clip, callbacks=[ttl.Callback(tmp_path, save_config=EVERY_STEP)], **TRAINER
    )
    trainer.fit(model, loader(32, 0), loader(16, 1))

    trial = tensortap.create_trial(tmp_path)
    assert trial.workers() == ["worker_0"]
    train = trial.steps(mode=Mode.TRAIN)
    assert len(train) == trainer.global_step == len(model.applied) == 8
    assert len(trial.steps(mode=Mode.EVAL)) == 2, "one EVAL step per validation run; the sanity check is not captured"
    assert len(trial.steps(mode=Mode.GLOBAL)) == 2, "one GLOBAL step per epoch"

    # gradients: what optimizer.step() applied, after clipping (the raw norm was larger)
    assert max(model.norms_before_clip) > clip
    for i, applied in enumerate(model.applied):
        total = np.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for g in applied.values()))
        assert total <= clip * (1 + 1e-5)
        for name, grad in applied.items():
            np.testing.assert_array_equal(trial.tensor(f"gradients/{name}").value(i, mode=Mode.TRAIN), grad)
    # weights after the last step are the trained parameters; biases in their own collection
    last = train[-1]
    for name, p in model.named_parameters():
        np.testing.assert_array_equal(trial.tensor(name).value(last, mode=Mode.TRAIN), p.detach().numpy())
    assert trial.tensor_names(collection="biases") == ["net.0.bias", "net.2.bias"]
    # the loss training_step returned, and the values logged with self.log under the loggers' names
    loss = trial.tensor("losses/loss")
    np.testing.assert_allclose([loss.value(s, mode=Mode.TRAIN) for s in train], model.losses, rtol=1e-6)
    step_loss = trial.tensor("losses/train_loss_step")
    np.testing.assert_allclose([step_loss.value(s, mode=Mode.TRAIN) for s in train], model.losses, rtol=1e-6)
    logged = trainer.logged_metrics
    for name, key, mode in [
        ("losses/val_loss", "val_loss", Mode.EVAL),
        ("metrics/val_mae", "val_mae", Mode.EVAL),
        ("losses/train_loss_epoch", "train_loss_epoch", Mode.GLOBAL),
        ("metrics/scaled", "scaled", Mode.GLOBAL),  # logged per epoch only: no suffix
        ("metrics/epoch_marker", "epoch_marker", Mode.GLOBAL),  # logged in the module's on_train_epoch_end
    ]:
        tensor = trial.tensor(name)
        assert tensor.steps(mode=mode) == [0, 1], name
        np.testing.assert_allclose(tensor.value(1, mode=mode), float(logged[key]), rtol=1e-6)
    assert len(trial.tensor("losses/val_loss").steps()) == 2, "never in TRAIN steps"
    assert "losses/train_loss" not in trial.tensor_names(), "Lightning's alias of train_loss_step/_epoch"
    assert trial.end_reasons() == {"worker_0": "closed"}


def test_a_parametrized_bias_is_in_biases(tmp_path: Path) -> None:
    """``net.0.parametrizations.bias.original`` is a bias, as the PyTorch hook files it."""
    model = Regressor()
    torch.nn.utils.parametrize.register_parametrization(model.net[0], "bias", torch.nn.Identity())
    trainer = L.Trainer(max_epochs=1, limit_val_batches=0, callbacks=[ttl.Callback(tmp_path)], **TRAINER)
    trainer.fit(model, loader(16, 0))
    trial = tensortap.create_trial(tmp_path)
    assert trial.tensor_names(collection="biases") == ["net.0.parametrizations.bias.original", "net.2.bias"]
    assert trial.tensor_names(collection="weights") == ["net.0.weight", "net.2.weight"]


def test_accumulated_batches_are_one_step(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Regressor()
    trainer = L.Trainer(
        max_epochs=1,
        accumulate_grad_batches=2,
        limit_val_batches=0,
        callbacks=[ttl.Callback(tmp_path, save_config=EVERY_STEP)],
        **TRAINER,
    )
    trainer.fit(model, loader(32, 0))
    trial = tensortap.create_trial(tmp_path)
    assert len(trial.steps(mode=Mode.TRAIN)) == trainer.global_step == 2
    for step in range(2):
        got = [float(trial.tensor(f"losses/loss:{i}").value(step, mode=Mode.TRAIN)) for i in range(2)]
        np.testing.assert_allclose(got, model.losses[2 * step : 2 * step + 2], rtol=1e-6)
        np.testing.assert_array_equal(
            trial.tensor("gradients/net.2.weight").value(step, mode=Mode.TRAIN), model.applied[step]["net.2.weight"]
        )


def test_a_validation_inside_an_accumulation_window_does_not_split_its_step(tmp_path: Path) -> None:
    """``val_check_interval=2`` within ``accumulate_grad_batches=4``: each validation ended the open window as a
    ``TRAIN`` step without gradients, and the rest of it made another (4 ``TRAIN`` steps for 2 optimizer steps)."""
    torch.manual_seed(0)
    model = Regressor()
    trainer = L.Trainer(
        max_epochs=1,
        accumulate_grad_batches=4,
        val_check_interval=2,
        callbacks=[ttl.Callback(tmp_path, save_config=EVERY_STEP)],
        **TRAINER,
    )
    trainer.fit(model, loader(64, 0), loader(16, 1))
    trial = tensortap.create_trial(tmp_path)
    assert trial.steps(mode=Mode.TRAIN) == list(range(trainer.global_step)) == [0, 1]
    assert len(trial.steps(mode=Mode.EVAL)) == 4
    for step in range(2):
        got = [float(trial.tensor(f"losses/loss:{i}").value(step, mode=Mode.TRAIN)) for i in range(4)]
        np.testing.assert_allclose(got, model.losses[4 * step : 4 * step + 4], rtol=1e-6)
        for name, grad in model.applied[step].items():
            np.testing.assert_array_equal(trial.tensor(f"gradients/{name}").value(step, mode=Mode.TRAIN), grad)


class ManualAccumulation(L.LightningModule):
    """Lightning's docs' manual optimization with gradient accumulation: a step every ``every`` batches."""

    def __init__(self, every: int) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.net = torch.nn.Linear(4, 1)
        self.every = every
        self.losses: list[float] = []
        self.applied: list[dict[str, np.ndarray]] = []

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.losses.append(float(loss.detach()))
        self.manual_backward(loss / self.every)
        if (batch_idx + 1) % self.every == 0:
            optimizer = self.optimizers()
            optimizer.step()
            self.applied.append({n: p.grad.detach().numpy().copy() for n, p in self.named_parameters()})
            optimizer.zero_grad()
        return loss

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def test_manual_optimization_stepping_every_few_batches_across_epochs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """5 batches an epoch, a step every 2: the epoch's last batch goes on in the next epoch's first step (its
    gradient was applied there); it was written at the epoch's end as a ``TRAIN`` step of its own, numbering
    every later step one past the optimizer's. The batch after the last step is not a step: a warning says so."""
    torch.manual_seed(0)
    model = ManualAccumulation(every=2)
    trainer = L.Trainer(max_epochs=2, callbacks=[ttl.Callback(tmp_path, save_config=EVERY_STEP)], **TRAINER)
    trainer.fit(model, loader(40, 0))
    trial = tensortap.create_trial(tmp_path)
    assert trial.steps(mode=Mode.TRAIN) == list(range(trainer.global_step)) == list(range(len(model.applied)))
    for step, applied in enumerate(model.applied):
        for name, grad in applied.items():
            np.testing.assert_array_equal(trial.tensor(f"gradients/{name}").value(step, mode=Mode.TRAIN), grad)
    batches = [[0, 1], [2, 3], [4, 5, 6], [7, 8]]  # the batches each optimizer step applied (5 an epoch)
    for step, indices in enumerate(batches):
        got = [float(trial.tensor(f"losses/loss:{i}").value(step, mode=Mode.TRAIN)) for i in range(len(indices))]
        np.testing.assert_allclose(got, [model.losses[i] for i in indices], rtol=1e-6)
    assert len(model.losses) == 10
    assert caplog.text.count("the last 1 training batch(es) had no optimizer step after them") == 1


class BatchEndModule(Regressor):
    """Overrides ``on_train_batch_end`` (doing nothing): Lightning runs it after the callbacks'."""

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        pass


class LaterCallback(L.Callback):
    """A callback of one's own with a batch end hook, listed after tensortap's."""

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        pass


@pytest.mark.parametrize("after", ["module", "callback"])
@pytest.mark.parametrize("every", [None, 2], ids=["no_validation", "validation_every_2nd_epoch"])
def test_the_epoch_aggregates_are_in_global_whatever_runs_after_the_callback(
    tmp_path: Path, after: str, every: int | None
) -> None:
    """With a batch end hook run after tensortap's and an epoch ending without a validation, ``train_loss_epoch``,
    ``scaled`` (logged per epoch only) and its plain alias were saved at the epoch's last ``TRAIN`` step and again
    at the next epoch's first, and not in ``GLOBAL`` (hunt 28 H2)."""
    torch.manual_seed(0)
    model = BatchEndModule() if after == "module" else Regressor()
    callbacks: list[Any] = [ttl.Callback(tmp_path, save_config=EVERY_STEP)]
    callbacks += [LaterCallback()] if after == "callback" else []
    validation = {"check_val_every_n_epoch": every, "num_sanity_val_steps": 0} if every else {"limit_val_batches": 0}
    trainer = L.Trainer(max_epochs=3, callbacks=callbacks, **validation, **TRAINER)
    trainer.fit(model, loader(32, 0), loader(16, 1) if every else None)  # 4 batches an epoch, of 8 rows each

    trial = tensortap.create_trial(tmp_path)
    assert trial.steps(mode=Mode.TRAIN) == list(range(trainer.global_step)) == list(range(12))
    assert trial.steps(mode=Mode.GLOBAL) == [0, 1, 2], "one GLOBAL step per epoch"
    epoch_means = [np.mean(model.losses[4 * e : 4 * e + 4]) for e in range(3)]
    epoch_loss = trial.tensor("losses/train_loss_epoch")
    np.testing.assert_allclose([epoch_loss.value(e, mode=Mode.GLOBAL) for e in range(3)], epoch_means, rtol=1e-5)
    scaled = [float(trial.tensor("metrics/scaled").value(e, mode=Mode.GLOBAL)) for e in range(3)]
    np.testing.assert_allclose(scaled, 2 * np.array(epoch_means), rtol=1e-5)
    assert [float(trial.tensor("metrics/epoch_marker").value(e, mode=Mode.GLOBAL)) for e in range(3)] == [
        0.5,
        1.5,
        2.5,
    ]
    last = trainer.callback_metrics
    np.testing.assert_allclose(epoch_loss.value(2, mode=Mode.GLOBAL), last["train_loss_epoch"], rtol=1e-6)
    epoch_names = {"losses/train_loss_epoch", "metrics/scaled", "losses/train_loss", "metrics/epoch_marker"}
    assert not epoch_names & set(trial.tensor_names(mode=Mode.TRAIN)), "no epoch value at a TRAIN step"
    step_loss = trial.tensor("losses/train_loss_step")
    np.testing.assert_allclose([step_loss.value(s, mode=Mode.TRAIN) for s in range(12)], model.losses, rtol=1e-6)


class ManualNoReturn(L.LightningModule):
    """Lightning's documented manual optimization: ``manual_backward(loss)``, ``step()``, and no return value;
    with ``gan``, two optimizers toggled in turn, as Lightning's GAN example (the discriminator's loss first)."""

    def __init__(self, gan: bool) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.gan = gan
        self.g = torch.nn.Linear(4, 1)
        self.d = torch.nn.Linear(1, 1)
        self.losses: list[list[float]] = []  # each batch's losses, in the order of their backward

    def _train(self, optimizer: Any, loss: Any, batch_losses: list[float]) -> None:
        self.toggle_optimizer(optimizer)
        batch_losses.append(float(loss.detach()))
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()
        self.untoggle_optimizer(optimizer)

    def training_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        batch_losses: list[float] = []
        if self.gan:
            g_opt, d_opt = self.optimizers()
            self._train(d_opt, torch.nn.functional.mse_loss(self.d(self.g(x).detach()), y), batch_losses)
            self._train(g_opt, self.d(self.g(x)).pow(2).mean(), batch_losses)
        else:
            optimizer = self.optimizers()
            self._train(optimizer, torch.nn.functional.mse_loss(self.d(self.g(x)), y), batch_losses)
        self.losses.append(batch_losses)

    def configure_optimizers(self) -> Any:
        if self.gan:
            return torch.optim.SGD(self.g.parameters(), lr=0.01), torch.optim.SGD(self.d.parameters(), lr=0.01)
        return torch.optim.SGD(self.parameters(), lr=0.01)


@pytest.mark.parametrize(("gan", "amp"), [(False, False), (True, False), (False, True)], ids=["one", "gan", "amp"])
def test_manual_optimization_returning_nothing_saves_the_losses_given_to_manual_backward(
    tmp_path: Path, gan: bool, amp: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """No ``losses/*`` at all and no warning, where ``training_step`` returned no loss (hunt 28 M4). One backward a
    batch is ``losses/loss``; a GAN's two are ``losses/loss:0`` and ``:1``, in the order of their backward. Under
    16-bit AMP with a ``GradScaler`` (scale 1024), the loss saved is the one computed, not the scaled one."""
    from lightning.pytorch.plugins import MixedPrecision

    torch.manual_seed(0)
    model = ManualNoReturn(gan)
    scaled = [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=1024.0))] if amp else []
    trainer = L.Trainer(
        max_epochs=1, callbacks=[ttl.Callback(tmp_path, save_config=EVERY_STEP)], plugins=scaled, **TRAINER
    )
    trainer.fit(model, loader(24, 0))
    trial = tensortap.create_trial(tmp_path)
    assert trial.steps(mode=Mode.TRAIN) == [0, 1, 2]
    names = [f"losses/loss:{i}" for i in range(2)] if gan else ["losses/loss"]
    assert trial.tensor_names(collection="losses") == names
    for i, name in enumerate(names):
        got = [float(trial.tensor(name).value(s, mode=Mode.TRAIN)) for s in range(3)]
        np.testing.assert_allclose(got, [batch[i] for batch in model.losses], rtol=1e-6)
    assert "no losses/loss is saved" not in caplog.text


class ManualOwnBackward(ManualNoReturn):
    """Calls ``backward()`` itself and returns nothing: no loss reaches Lightning."""

    def manual_backward(self, loss: Any, *args: Any, **kwargs: Any) -> None:
        loss.backward()


def test_manual_optimization_giving_lightning_no_loss_is_warned_about_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    torch.manual_seed(0)
    trainer = L.Trainer(max_epochs=1, callbacks=[ttl.Callback(tmp_path, save_config=EVERY_STEP)], **TRAINER)
    trainer.fit(ManualOwnBackward(gan=False), loader(24, 0))
    trial = tensortap.create_trial(tmp_path)
    assert trial.steps(mode=Mode.TRAIN) == [0, 1, 2]
    assert trial.tensor_names(collection="losses") == []
    assert caplog.text.count("no losses/loss is saved; call self.manual_backward(loss) or return the loss") == 1


def test_a_one_batch_window_with_accumulation_keeps_the_indexed_loss_names(tmp_path: Path) -> None:
    """``accumulate_grad_batches=3`` over 4 batches: the epoch's last window holds 1 batch. Its loss was saved as
    ``losses/loss`` beside the full windows' ``losses/loss:0``/``:1``/``:2``: one training, two names for a batch's
    loss (``losses/loss:0`` missed the window, ``losses/loss`` held only it)."""
    torch.manual_seed(0)
    model = Regressor()
    trainer = L.Trainer(
        max_epochs=2,
        accumulate_grad_batches=3,
        limit_val_batches=0,
        callbacks=[ttl.Callback(tmp_path, save_config=EVERY_STEP)],
        **TRAINER,
    )
    trainer.fit(model, loader(32, 0))
    trial = tensortap.create_trial(tmp_path)
    assert trial.steps(mode=Mode.TRAIN) == list(range(trainer.global_step)) == [0, 1, 2, 3]
    losses = sorted(n for n in trial.tensor_names(collection="losses") if n.startswith("losses/loss"))
    assert losses == ["losses/loss:0", "losses/loss:1", "losses/loss:2"]
    windows = [[0, 1, 2], [3], [4, 5, 6], [7]]  # the batches of each optimizer step, 4 an epoch
    first = trial.tensor("losses/loss:0").values(mode=Mode.TRAIN)
    np.testing.assert_allclose([first[s] for s in range(4)], [model.losses[w[0]] for w in windows], rtol=1e-6)
    for step, window in enumerate(windows):
        got = [float(trial.tensor(f"losses/loss:{i}").value(step, mode=Mode.TRAIN)) for i in range(len(window))]
        np.testing.assert_allclose(got, [model.losses[i] for i in window], rtol=1e-6)
    assert trial.tensor("losses/loss:1").steps(mode=Mode.TRAIN) == [0, 2]


class SharedName(Regressor):
    """Logs ``acc`` in ``training_step`` (every other batch) and in ``validation_step`` (+100, to tell them apart)."""

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        if batch_idx % 2 == 0:
            self.log("acc", (self.net(x) - y).abs().mean().detach())
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("acc", (self.net(x) - y).abs().mean() + 100)


def test_a_name_logged_in_training_and_validation_is_saved_at_both_modes_steps(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The validation values of ``acc`` were dropped (the name belonged to ``TRAIN``, where it was first logged)
    and the last one was named at the end in a warning that told to log it in ``training_step``."""
    from lightning.pytorch.loggers import CSVLogger

    torch.manual_seed(0)
    model = SharedName()
    options = {**TRAINER, "logger": CSVLogger(tmp_path / "csv", name="run"), "log_every_n_steps": 1}
    callback = ttl.Callback(tmp_path / "trial", save_config=EVERY_STEP)
    trainer = L.Trainer(max_epochs=2, val_check_interval=3, num_sanity_val_steps=0, callbacks=[callback], **options)
    trainer.fit(model, loader(48, 0), loader(16, 1))  # 6 batches an epoch, validation after the 3rd and the 6th

    table = np.genfromtxt(next((tmp_path / "csv").rglob("metrics.csv")), delimiter=",", names=True)
    rows = [r for r in table if not np.isnan(r["acc"])]  # not the rows of epoch_marker
    assert len(rows) == 16
    logged_train = {int(r["step"]): float(r["acc"]) for r in rows if r["acc"] < 100}
    logged_val = [float(r["acc"]) for r in rows if r["acc"] >= 100]
    trial = tensortap.create_trial(tmp_path / "trial")
    assert trial.steps(mode=Mode.EVAL) == [0, 1, 2, 3]
    acc = trial.tensor("metrics/acc")
    np.testing.assert_allclose([acc.value(s, mode=Mode.EVAL) for s in range(4)], logged_val, rtol=1e-6)
    got = {s: float(v) for s, v in acc.values(mode=Mode.TRAIN).items()}
    assert got.keys() == logged_train.keys() == set(range(trainer.global_step))
    np.testing.assert_allclose([got[s] for s in sorted(got)], [logged_train[s] for s in sorted(got)], rtol=1e-6)
    np.testing.assert_allclose(acc.value(3, mode=Mode.EVAL), float(trainer.callback_metrics["acc"]), rtol=1e-6)
    assert "logged after the last step" not in caplog.text


class SharedForkedName(Regressor):
    """Logs ``acc`` per step and per epoch in ``training_step`` (``acc_step``, ``acc_epoch``), plainly in
    ``validation_step`` (+100)."""

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        x, y = batch
        self.log("acc", (self.net(x) - y).abs().mean().detach(), on_step=True, on_epoch=True)
        return torch.nn.functional.mse_loss(self.net(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("acc", (self.net(x) - y).abs().mean() + 100)


def test_a_plain_name_validation_logs_beside_trainings_step_and_epoch_names_is_saved(tmp_path: Path) -> None:
    """Validation's ``acc`` was taken for Lightning's alias of training's ``acc_step``/``acc_epoch`` and dropped:
    no EVAL step, no word (session 49's hunt 22)."""
    from lightning.pytorch.loggers import CSVLogger

    torch.manual_seed(0)
    options = {**TRAINER, "logger": CSVLogger(tmp_path / "csv", name="run"), "log_every_n_steps": 1}
    callback = ttl.Callback(tmp_path / "trial", save_config=EVERY_STEP)
    trainer = L.Trainer(max_epochs=2, num_sanity_val_steps=0, callbacks=[callback], **options)
    trainer.fit(SharedForkedName(), loader(16, 0), loader(8, 1))
    table = np.genfromtxt(next((tmp_path / "csv").rglob("metrics.csv")), delimiter=",", names=True)
    logged_val = [float(r["acc"]) for r in table if not np.isnan(r["acc"])]
    logged_epoch = [float(r["acc_epoch"]) for r in table if not np.isnan(r["acc_epoch"])]
    trial = tensortap.create_trial(tmp_path / "trial")
    acc = trial.tensor("metrics/acc")
    assert len(logged_val) == 2 and acc.steps(mode=Mode.EVAL) == [0, 1] and acc.steps(mode=Mode.TRAIN) == []
    np.testing.assert_allclose([acc.value(s, mode=Mode.EVAL) for s in (0, 1)], logged_val, rtol=1e-6)
    epoch = trial.tensor("metrics/acc_epoch").values(mode=Mode.GLOBAL)
    np.testing.assert_allclose([epoch[s] for s in sorted(epoch)], logged_epoch, rtol=1e-6)
    assert len(trial.tensor("metrics/acc_step").steps(mode=Mode.TRAIN)) == trainer.global_step


class TrailingLog(ManualAccumulation):
    """Logs ``tail`` at every batch: the epoch's last, after which no optimizer steps, too."""

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        self.log("tail", float(batch_idx))
        return super().training_step(batch, batch_idx)


def test_a_value_logged_after_the_last_step_is_named_in_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A value no step holds (logged at a batch after the last optimizer step) is still named at the end."""
    model = TrailingLog(every=2)
    trainer = L.Trainer(max_epochs=1, callbacks=[ttl.Callback(tmp_path, save_config=EVERY_STEP)], **TRAINER)
    trainer.fit(model, loader(40, 0))
    assert float(trainer.callback_metrics["tail"]) == 4.0
    tail = tensortap.create_trial(tmp_path).tensor("metrics/tail")
    assert {s: float(v) for s, v in tail.values(mode=Mode.TRAIN).items()} == {0: 1.0, 1: 3.0}
    assert tail.steps(mode=Mode.GLOBAL) == []
    assert "'tail' logged after the last step that could hold it" in caplog.text


class TwoValidationLoaders(Regressor):
    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        x, y = batch
        self.log("vl", torch.nn.functional.mse_loss(self.net(x), y), on_step=True, on_epoch=True)


def test_several_validation_dataloaders_save_only_the_names_loggers_get(tmp_path: Path) -> None:
    """``vl/dataloader_idx_0``, Lightning's alias of ``vl_epoch/dataloader_idx_0``, was saved beside it."""
    torch.manual_seed(0)
    model = TwoValidationLoaders()
    trainer = L.Trainer(max_epochs=1, callbacks=[ttl.Callback(tmp_path, save_config=EVERY_STEP)], **TRAINER)
    trainer.fit(model, loader(16, 0), [loader(16, 1), loader(16, 2)])
    assert "vl/dataloader_idx_0" in trainer.callback_metrics  # the alias, which loggers do not get
    trial = tensortap.create_trial(tmp_path)
    names = [n for n in trial.tensor_names() if n.startswith("metrics/vl")]
    assert names == sorted(f"metrics/vl_{k}/dataloader_idx_{i}" for k in ("epoch", "step") for i in (0, 1))
    for i in (0, 1):
        key = f"vl_epoch/dataloader_idx_{i}"
        got = trial.tensor(f"metrics/{key}").value(0, mode=Mode.EVAL)
        np.testing.assert_allclose(got, float(trainer.logged_metrics[key]), rtol=1e-6)


def test_a_compiled_submodule_is_named_as_uncompiled(tmp_path: Path) -> None:
    """``model.net = torch.compile(model.net)`` gave ``net._orig_mod.0.weight``; the PyTorch hook names compiled
    modules as the module inside, and so does a whole model compiled."""
    torch.manual_seed(0)
    model = Regressor()
    plain = [n for n, _ in model.named_parameters()]
    model.net = torch.compile(model.net)
    trainer = L.Trainer(max_epochs=1, callbacks=[ttl.Callback(tmp_path, save_config=EVERY_STEP)], **TRAINER)
    trainer.fit(model, loader(16, 0), loader(8, 1))
    trial = tensortap.create_trial(tmp_path)
    assert sorted(trial.tensor_names(collection="weights") + trial.tensor_names(collection="biases")) == sorted(plain)
    assert sorted(trial.tensor_names(collection="gradients")) == sorted(f"gradients/{n}" for n in plain)
    for step, applied in enumerate(model.applied):
        for raw, grad in applied.items():
            name = raw.replace("_orig_mod.", "")
            np.testing.assert_array_equal(trial.tensor(f"gradients/{name}").value(step, mode=Mode.TRAIN), grad)
    for raw, p in model.named_parameters():
        name = raw.replace("_orig_mod.", "")
        np.testing.assert_array_equal(trial.tensor(name).value(1, mode=Mode.TRAIN), p.detach().numpy())


def test_in_process_rule_stops_fit(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Regressor(lr=50.0)  # diverges to NaN within a few steps
    rule = ExplodingTensor(only_nan=True).add_action(StopTraining())
    callback = ttl.Callback(tmp_path, save_config=EVERY_STEP, include_collections=["losses"], rules=[rule])
    trainer = L.Trainer(max_epochs=20, limit_val_batches=0, callbacks=[callback], **TRAINER)
    trainer.fit(model, loader(64, 0))
    assert rule.fired_steps, "the run must diverge"
    assert not np.isfinite(model.losses).all()
    trial = tensortap.create_trial(tmp_path)
    mode, fired = trial.mode_step(rule.fired_steps[0]) or (None, -1)
    assert mode == Mode.TRAIN
    assert trainer.global_step == fired + 1 < 20 * 8, "fit ended right after the firing step"
    assert trial.end_reasons() == {"worker_0": "stop_request"}
    assert trial.stop_request()["rule"] == "ExplodingTensor"


def test_an_exception_drops_the_interrupted_step(tmp_path: Path) -> None:
    class Failing(Regressor):
        def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
            super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
            if batch_idx == 2:
                raise RuntimeError("boom")

    torch.manual_seed(0)
    model = Failing()
    trainer = L.Trainer(max_epochs=1, callbacks=[ttl.Callback(tmp_path, save_config=EVERY_STEP)], **TRAINER)
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(model, loader(32, 0))
    trial = tensortap.create_trial(tmp_path)
    assert trial.steps(mode=Mode.TRAIN) == [0, 1], "the step the exception interrupted is not saved"
    assert trial.end_reasons() == {"worker_0": "exception"}
    assert json.loads((tmp_path / "end" / "worker_0.json").read_text())["error"] == "RuntimeError: boom"


def test_validate_and_test_after_fit_go_on_in_the_same_run(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Regressor()
    trainer = L.Trainer(max_epochs=1, callbacks=[ttl.Callback(tmp_path, save_config=EVERY_STEP)], **TRAINER)
    trainer.fit(model, loader(16, 0), loader(16, 1))
    fit_val = float(trainer.callback_metrics["val_loss"])
    validated = trainer.validate(model, loader(16, 2), verbose=False)[0]
    model.test_step = model.validation_step  # logs val_loss and val_mae on the test data
    tested = trainer.test(model, loader(16, 3), verbose=False)[0]

    trial = tensortap.create_trial(tmp_path)
    assert [trial.mode_step(s) for s in trial.steps()][-3:] == [(Mode.GLOBAL, 0), (Mode.EVAL, 1), (Mode.EVAL, 2)]
    got = trial.tensor("losses/val_loss").values(mode=Mode.EVAL)
    np.testing.assert_allclose([got[0], got[1], got[2]], [fit_val, validated["val_loss"], tested["val_loss"]])
    assert trial.end_reasons() == {"worker_0": "closed"}


def test_a_tuners_probe_fit_opens_no_run_and_warns_nothing(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """hunt 45 M1: ``Tuner.lr_find`` runs the callback's setup and teardown around probe steps it runs without it.

    Before, that teardown warned falsely that the probe's ``train_loss_*`` were "logged after the last step ...
    log it in training_step", and the run was opened and ended (``closed``) before the real ``fit`` began.
    """
    from lightning.pytorch.tuner import Tuner

    out = tmp_path / "trial"
    model = Regressor()
    trainer = L.Trainer(
        max_epochs=1,
        limit_val_batches=0,
        callbacks=[ttl.Callback(out, save_config=EVERY_STEP)],
        **{**TRAINER, "default_root_dir": tmp_path},
    )
    Tuner(trainer).lr_find(model, train_dataloaders=loader(64, 0), num_training=5)
    assert len(model.losses) == 5, "the probe ran its steps"
    assert not out.exists(), "no run opened, none ended"
    model.losses.clear()
    trainer.fit(model, loader(64, 0))
    trial = tensortap.create_trial(out)
    assert trial.steps(mode=Mode.TRAIN) == list(range(8))
    loss = trial.tensor("losses/loss").values(mode=Mode.TRAIN)
    np.testing.assert_allclose([loss[s] for s in range(8)], model.losses, rtol=1e-6)
    assert trial.end_reasons() == {"worker_0": "closed"}
    assert "tensortap" not in caplog.text


def test_stochastic_weight_averaging_is_named_in_one_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """hunt 45 L2: ``StochasticWeightAveraging`` copies its average into the module in its ``on_train_end``.

    The trial's last weights are those of the last optimizer step, not the ones the fit ends with; before, nothing
    said so.
    """
    from lightning.pytorch.callbacks import StochasticWeightAveraging

    torch.manual_seed(0)
    model = Regressor()
    swa = StochasticWeightAveraging(swa_lrs=0.01, swa_epoch_start=1)
    trainer = L.Trainer(max_epochs=3, callbacks=[ttl.Callback(tmp_path, save_config=EVERY_STEP), swa], **TRAINER)
    trainer.fit(model, loader(16, 0))

    assert caplog.text.count("StochasticWeightAveraging copies its averaged weights") == 1
    trial = tensortap.create_trial(tmp_path)
    last = trial.steps(mode=Mode.TRAIN)[-1]
    saved = trial.tensor("net.0.weight").value(last, mode=Mode.TRAIN)
    assert not np.allclose(saved, model.net[0].weight.detach().numpy()), "the fit ends with the averaged weights"


def test_resumed_fit_numbers_steps_on_from_the_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(0)
    first = L.Trainer(
        max_epochs=1, limit_val_batches=0, **{**TRAINER, "enable_checkpointing": True, "default_root_dir": tmp_path}
    )
    first.fit(Regressor(), loader(16, 0))
    model = Regressor()
    trainer = L.Trainer(
        max_epochs=2,
        limit_val_batches=0,
        callbacks=[ttl.Callback(tmp_path / "trial", save_config=EVERY_STEP)],
        **TRAINER,
    )
    trainer.fit(model, loader(16, 0), ckpt_path=first.checkpoint_callback.best_model_path)
    trial = tensortap.create_trial(tmp_path / "trial")
    assert trial.steps(mode=Mode.TRAIN) == [2, 3], "Lightning's global steps 2 and 3, after the checkpoint's 2"
    assert trial.steps(mode=Mode.GLOBAL) == [1], "the second epoch"
    loss = trial.tensor("losses/loss").values(mode=Mode.TRAIN)
    np.testing.assert_allclose([loss[2], loss[3]], model.losses, rtol=1e-6)


class StepRecorder(Regressor):
    """Records Lightning's global_step of each batch it trains on, with the batch's loss."""

    def __init__(self) -> None:
        super().__init__()
        self.at_step: dict[int, float] = {}

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        loss = super().training_step(batch, batch_idx)
        self.at_step[self.trainer.global_step] = self.losses[-1]
        return loss


@pytest.mark.parametrize("checkpoint", ["step=2", "step=4", "step=6"])  # mid-epoch 0, last batch of 0, mid-epoch 1
def test_resumed_fit_from_a_batch_end_checkpoint_numbers_steps_as_lightning(tmp_path: Path, checkpoint: str) -> None:
    """A checkpoint of ModelCheckpoint(every_n_train_steps=...), saved at a batch end: Lightning counts its
    step only as the resumed epoch loop starts; the captured steps are still Lightning's global steps."""
    torch.manual_seed(0)
    saver = L.callbacks.ModelCheckpoint(tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1, filename="{step}")
    first = L.Trainer(max_epochs=2, limit_val_batches=0, callbacks=[saver], **{**TRAINER, "enable_checkpointing": True})
    first.fit(StepRecorder(), loader(32, 0))  # 4 batches an epoch
    model = StepRecorder()
    trainer = L.Trainer(
        max_epochs=2,
        limit_val_batches=0,
        callbacks=[ttl.Callback(tmp_path / "trial", save_config=EVERY_STEP)],
        **TRAINER,
    )
    trainer.fit(model, loader(32, 0), ckpt_path=tmp_path / "ckpt" / f"{checkpoint}.ckpt")
    assert trainer.global_step == 8
    done = int(checkpoint.split("=")[1])
    trial = tensortap.create_trial(tmp_path / "trial")
    assert sorted(model.at_step) == list(range(done, 8)), "the batches Lightning trained on after the checkpoint"
    assert trial.steps(mode=Mode.TRAIN) == sorted(model.at_step)
    loss = trial.tensor("losses/loss").values(mode=Mode.TRAIN)
    np.testing.assert_allclose([loss[s] for s in sorted(model.at_step)], list(model.at_step.values()), rtol=1e-6)
    last = trial.steps(mode=Mode.TRAIN)[-1]
    for name, p in model.named_parameters():
        np.testing.assert_array_equal(trial.tensor(name).value(last, mode=Mode.TRAIN), p.detach().numpy())


class LateLogger(Regressor):
    """Logs at its own batch end, which Lightning calls after the callbacks'."""

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        log_late(self)


class LateCallback(L.Callback):
    """A callback of one's own that logs at the batch end."""

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        log_late(pl_module)


def log_late(module: Any) -> None:
    module.log("late", float(module.global_step))
    module.seen.append({n: p.detach().numpy().copy() for n, p in module.named_parameters()})


@pytest.mark.parametrize("where", ["module", "callback after tensortap's"])
def test_a_value_logged_at_a_later_batch_end_hook_is_saved_with_its_step(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, where: str
) -> None:
    torch.manual_seed(0)
    model = LateLogger() if where == "module" else Regressor()
    model.seen = []  # type: ignore[attr-defined]
    callbacks = [ttl.Callback(tmp_path, save_config=EVERY_STEP)] + ([LateCallback()] if where != "module" else [])
    trainer = L.Trainer(max_epochs=2, callbacks=callbacks, **TRAINER)
    trainer.fit(model, loader(16, 0), loader(8, 1))
    trial = tensortap.create_trial(tmp_path)
    late = trial.tensor("metrics/late").values(mode=Mode.TRAIN)
    # after the optimizer step of TRAIN step s, Lightning's global_step is s + 1
    assert {s: float(v) for s, v in late.items()} == {0: 1.0, 1: 2.0, 2: 3.0, 3: 4.0}
    assert trial.tensor("metrics/late").steps(mode=Mode.EVAL) == [], "not taken for a validation value"
    assert trial.steps(mode=Mode.EVAL) == [0, 1]
    for step in range(4):
        np.testing.assert_array_equal(
            trial.tensor("net.0.weight").value(step, mode=Mode.TRAIN),
            model.seen[step]["net.0.weight"],  # type: ignore[attr-defined]
        )
    assert "logged after the last step" not in caplog.text


def test_a_step_left_open_for_the_modules_batch_end_ends_before_a_validation_mid_epoch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = LateLogger()
    model.seen = []  # type: ignore[attr-defined]
    callback = ttl.Callback(tmp_path, save_config=EVERY_STEP)
    trainer = L.Trainer(max_epochs=2, val_check_interval=0.5, callbacks=[callback], **TRAINER)
    trainer.fit(model, loader(32, 0), loader(8, 1))
    trial = tensortap.create_trial(tmp_path)
    order = [(m.name, s) for m, s in (trial.mode_step(g) or (Mode.GLOBAL, -1) for g in trial.steps())]
    # 4 batches an epoch, validation after the 2nd and the 4th: each TRAIN step written before it
    epoch = [("TRAIN", 0), ("TRAIN", 1), ("EVAL", 0), ("TRAIN", 2), ("TRAIN", 3), ("EVAL", 1), ("GLOBAL", 0)]
    assert order[:7] == epoch and len(order) == 14
    late = trial.tensor("metrics/late").values(mode=Mode.TRAIN)
    assert {s: float(v) for s, v in late.items()} == {s: s + 1.0 for s in range(8)}
    assert trial.tensor("metrics/late").steps(mode=Mode.EVAL) == []


def test_a_step_left_open_for_the_modules_batch_end_is_kept_when_the_next_batch_fails(tmp_path: Path) -> None:
    """The data loader raised in reading the 4th batch. The 3rd step, done and logged at the module's
    batch end, was still open for it (ended when the next batch starts): the exception dropped it."""

    class Broken(torch.utils.data.Dataset):  # type: ignore[misc]
        def __init__(self) -> None:
            self.rows = loader(32, 0).dataset

        def __len__(self) -> int:
            return len(self.rows)

        def __getitem__(self, i: int) -> Any:
            if i == 24:
                raise RuntimeError("a bad record")
            return self.rows[i]

    torch.manual_seed(0)
    model = LateLogger()
    model.seen = []  # type: ignore[attr-defined]
    trainer = L.Trainer(max_epochs=1, callbacks=[ttl.Callback(tmp_path, save_config=EVERY_STEP)], **TRAINER)
    with pytest.raises(RuntimeError, match="a bad record"):
        trainer.fit(model, torch.utils.data.DataLoader(Broken(), batch_size=8))
    trial = tensortap.create_trial(tmp_path)
    assert trainer.global_step == 3 and trial.steps(mode=Mode.TRAIN) == [0, 1, 2]
    late = trial.tensor("metrics/late").values(mode=Mode.TRAIN)
    assert {s: float(v) for s, v in late.items()} == {0: 1.0, 1: 2.0, 2: 3.0}
    for step in range(3):
        np.testing.assert_array_equal(
            trial.tensor("net.0.weight").value(step, mode=Mode.TRAIN),
            model.seen[step]["net.0.weight"],  # type: ignore[attr-defined]
        )
    assert trial.end_reasons() == {"worker_0": "exception"}


def test_a_stop_request_ends_fit_when_the_module_has_its_own_on_train_batch_end(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = LateLogger(lr=50.0)
    model.seen = []  # type: ignore[attr-defined]
    rule = ExplodingTensor(only_nan=True).add_action(StopTraining())
    callback = ttl.Callback(tmp_path, save_config=EVERY_STEP, include_collections=["losses"], rules=[rule])
    trainer = L.Trainer(max_epochs=20, limit_val_batches=0, callbacks=[callback], **TRAINER)
    trainer.fit(model, loader(64, 0))
    assert rule.fired_steps, "the run must diverge"
    trial = tensortap.create_trial(tmp_path)
    fired = (trial.mode_step(rule.fired_steps[0]) or (None, -1))[1]
    # the step is judged once the module's on_train_batch_end has logged: fit ends one step later
    assert trainer.global_step == fired + 2 < 20 * 8
    assert trial.end_reasons() == {"worker_0": "stop_request"}
    assert trial.steps(mode=Mode.TRAIN)[-1] == fired + 1, "the step after the firing one is saved whole"


def test_configuration_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "trial"
    config = tmp_path / "tensortap.json"
    config.write_text(
        json.dumps({"out_dir": str(out), "save_config": {"save_interval": 2}, "include_collections": ["losses"]})
    )
    assert ttl.callbacks_from_env() == [] or "TENSORTAP_CONFIG" in os.environ
    monkeypatch.setenv("TENSORTAP_CONFIG", str(config))
    registered = any(
        ep.value == "tensortap.lightning:callbacks_from_env"
        for ep in importlib.metadata.entry_points(group="lightning.pytorch.callbacks_factory")
    )
    # installed (nox, CI): Lightning adds the callback by itself; from a source tree, the factory is called here
    extra = [] if registered else ttl.callbacks_from_env()
    trainer = L.Trainer(max_epochs=1, limit_val_batches=0, callbacks=extra, **TRAINER)
    assert sum(isinstance(cb, ttl.Callback) for cb in trainer.callbacks) == 1
    trainer.fit(Regressor(), loader(32, 0))
    trial = tensortap.create_trial(out)
    assert trial.steps(mode=Mode.TRAIN) == [0, 2], "the file's save_config"
    assert trial.tensor_names() == ["losses/loss", "losses/train_loss_epoch", "losses/train_loss_step"]
    config.write_text(json.dumps({"out_dir": str(out), "include_collections": ["nope"]}))
    with pytest.raises(ValueError, match="include_collections"):
        ttl.callbacks_from_env()
    config.write_text(json.dumps({"save_all": True}))
    with pytest.raises(ValueError, match="out_dir"):
        ttl.callbacks_from_env()


def test_bad_configuration_fails_at_construction(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="include_collections"):
        ttl.Callback(tmp_path, include_collections=["nope"])
    with pytest.raises(ValueError, match="stop_sync_steps"):
        ttl.Callback(tmp_path, stop_sync_steps=0)
    assert not list(tmp_path.iterdir()), "checking the configuration writes nothing"


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"include_collections": ["outputs", "inputs", "losses"]}, "'outputs', 'inputs' (include_collections)"),
        ({"save_all": True}, "'outputs', 'inputs' (save_all)"),
    ],
)
def test_collections_the_callback_never_fills_are_named_in_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, options: dict[str, Any], named: str
) -> None:
    """hunt 45 M3: ``include_collections=["outputs", "inputs"]`` (or ``save_all``) on the Lightning callback.

    Before, they were accepted and stayed empty without a word (a rule needing ``outputs`` then read as if the user
    had not asked for them). Now one warning at construction names them and the PyTorch hook that fills them.
    """
    config = tmp_path / "tensortap.json"
    config.write_text(json.dumps({"out_dir": str(tmp_path / "json"), **options}))
    for build in (lambda: ttl.Callback(tmp_path / "trial", **options), lambda: ttl.Callback.from_json(config)):
        caplog.clear()
        build()
        warned = [r.getMessage() for r in caplog.records if "stay empty" in r.getMessage()]
        assert len(warned) == 1, warned
        assert named in warned[0] and "register a tensortap.torch Hook on the model" in warned[0]
    caplog.clear()
    ttl.Callback(tmp_path / "trial", include_collections=["losses", "gradients"])
    assert "stay empty" not in caplog.text


@pytest.mark.slow
def test_ddp_ranks_are_workers(tmp_path: Path) -> None:
    torch.manual_seed(0)
    trainer = L.Trainer(
        max_epochs=1,
        strategy="ddp_fork",
        devices=2,
        limit_val_batches=0,
        callbacks=[ttl.Callback(tmp_path, save_config=EVERY_STEP)],
        **TRAINER,
    )
    model = Regressor()
    trainer.fit(model, loader(32, 0))
    trial = tensortap.create_trial(tmp_path)
    assert trial.workers() == ["worker_0", "worker_1"]
    assert len(trial.steps(mode=Mode.TRAIN)) == 2, "32 rows, 2 ranks, batches of 8"
    grad = trial.tensor("gradients/net.2.weight")
    # DDP averages the gradients: both ranks applied the same ones
    np.testing.assert_allclose(grad.value(1, worker="worker_0"), grad.value(1, worker="worker_1"), rtol=1e-6)
    assert trial.end_reasons() == {"worker_0": "closed", "worker_1": "closed"}


@pytest.mark.slow
def test_validate_after_a_ddp_fork_fit_goes_on_in_the_same_run(tmp_path: Path) -> None:
    """hunt 45 H1: under ``ddp_fork`` (``ddp_spawn`` alike) ``trainer.validate`` after ``fit`` starts new processes,
    whose callback never saw the hook of ``fit``. Before, each rank raised ``TrialExistsError`` (its worker was the
    fit's, under another run id); now the run id is the callback's, pickled with it, and the run goes on."""
    torch.manual_seed(0)
    callback = ttl.Callback(tmp_path, save_config=EVERY_STEP)
    trainer = L.Trainer(max_epochs=1, strategy="ddp_fork", devices=2, callbacks=[callback], **TRAINER)
    model = Regressor()
    trainer.fit(model, loader(32, 0), loader(16, 1))
    trainer.validate(model, loader(16, 2), verbose=False)
    trial = tensortap.create_trial(tmp_path)
    assert trial.steps(mode=Mode.EVAL) == [0, 1], "the fit's validation, then validate's"
    for worker in ("worker_0", "worker_1"):
        assert list(trial.tensor("losses/val_loss").values(mode=Mode.EVAL, worker=worker)) == [0, 1]
    assert trial.end_reasons() == {"worker_0": "closed", "worker_1": "closed"}


class StopAtStep2(Regressor):
    """Rank 0 asks for a stop at its third batch (as an in-process rule would)."""

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        if self.global_rank == 0 and batch_idx == 2:
            callback = next(c for c in self.trainer.callbacks if isinstance(c, ttl.Callback))
            assert callback.hook is not None
            callback.hook.request_stop("rank 0 saw it")
        return super().training_step(batch, batch_idx)


def test_every_ddp_rank_stopped_by_a_request_ends_with_stop_request(tmp_path: Path) -> None:
    """Rank 1 stops because the ranks agreed (one all-reduce), before its own look into the trial."""
    torch.manual_seed(0)
    callback = ttl.Callback(tmp_path, save_config=EVERY_STEP, stop_sync_steps=1, stop_poll_seconds=3600)
    trainer = L.Trainer(
        max_epochs=1, strategy="ddp_fork", devices=2, limit_val_batches=0, callbacks=[callback], **TRAINER
    )
    trainer.fit(StopAtStep2(), loader(160, 0))
    trial = tensortap.create_trial(tmp_path)
    assert trial.steps(mode=Mode.TRAIN) == [0, 1, 2], "both ranks stopped after the step of the request"
    assert trial.end_reasons() == {"worker_0": "stop_request", "worker_1": "stop_request"}
