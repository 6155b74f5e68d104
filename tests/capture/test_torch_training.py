"""The PyTorch adapter on the training code people write (issue #10): real tiny trainings, compared with torch."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import json
import logging
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import naming_parity  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn.utils import parametrizations, parametrize, prune  # noqa: E402

import tensortap  # noqa: E402
import tensortap.torch as ttt  # noqa: E402
from tensortap import Mode, SaveConfig  # noqa: E402
from tensortap.capture.torch import patches  # noqa: E402
from tensortap.rules import ExplodingTensor, invoke_rule  # noqa: E402

pytestmark = [pytest.mark.torch, pytest.mark.usefixtures("torch_one_thread")]

EVERY_STEP = SaveConfig(save_interval=1)


_trial = tensortap.create_trial


def _value(trial: tensortap.Trial, name: str, step: int, mode: Mode | None = None) -> np.ndarray:
    return np.asarray(trial.tensor(name).value(step, mode=mode) if mode else trial.tensor(name).value(step))


def _batch(gen: torch.Generator, n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(n, 6, generator=gen), torch.randint(0, 3, (n,), generator=gen)


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int) -> torch.Generator:
    """``steps`` plain training steps of ``model`` on :func:`_batch` batches (cross-entropy, ``opt``); the
    batches' generator, to draw more after them."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = _batch(gen)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return gen


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))


def test_values_land_on_the_step_in_which_they_were_given(tmp_path: Path) -> None:
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hook = ttt.Hook(tmp_path, save_config=EVERY_STEP)
    hook.register_module(model)
    hook.attach_optimizer(opt)
    gen = torch.Generator().manual_seed(1)
    weights = []
    for s in range(5):
        hook.save_scalar("iter", float(s))  # start of the iteration
        x, y = _batch(gen)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        hook.save_tensor("after_step", torch.tensor([float(s)]))  # after optimizer.step(): the next step
        weights.append(model[0].weight.detach().clone())
    hook.save_scalar("final", 1.0)  # a last step without a forward is kept
    hook.close()
    trial = _trial(tmp_path)
    assert trial.steps() == list(range(6))
    it = trial.tensor("metrics/iter")
    assert {s: float(it.value(s)) for s in it.steps()} == {s: float(s) for s in range(5)}
    after = trial.tensor("after_step")
    assert {s: float(after.value(s)[0]) for s in after.steps()} == {s + 1: float(s) for s in range(5)}
    assert trial.tensor("metrics/final").steps() == [5]
    for s in range(5):
        np.testing.assert_array_equal(_value(trial, "0.weight", s), weights[s].numpy())
    assert trial.steps(mode=Mode.TRAIN) == list(range(6))


def test_a_model_switched_to_float64_mid_run_keeps_every_value_in_its_dtype(tmp_path: Path) -> None:
    """``model.double()`` between two steps changes the dtype of every parameter and gradient at once, in
    the middle of a shard (which holds one dtype per tensor): the step moves to a new shard, and every step
    reads back as the model had it. Its gradients keep their step's dtype; the weights of the step before
    the switch are read when that step is recorded, at the next forward, after ``model.double()``."""
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hook = ttt.Hook(tmp_path, save_config=EVERY_STEP)
    hook.register_module(model)
    hook.attach_optimizer(opt)
    gen = torch.Generator().manual_seed(3)
    seen: list[dict[str, torch.Tensor]] = []
    for s in range(6):
        if s == 3:
            model.double()
        x, y = _batch(gen)
        x = x.double() if s >= 3 else x
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        grads = {f"gradients/{n}": p.grad.detach().clone() for n, p in model.named_parameters()}
        opt.step()
        seen.append({**grads, **{n: p.detach().clone() for n, p in model.named_parameters()}})
    hook.close()
    trial = _trial(tmp_path)
    assert trial.steps() == list(range(6))
    for s, values in enumerate(seen):
        for name, want in values.items():
            got = _value(trial, name, s)
            float64 = s >= 3 or (s == 2 and not name.startswith("gradients/"))
            assert got.dtype == (np.float64 if float64 else np.float32), (name, s)
            np.testing.assert_array_equal(got, want.numpy())


@pytest.mark.parametrize("conversion", ["to", "to_empty"])
def test_a_model_captured_without_an_optimizer_converts_under_swap_on_conversion(
    conversion: str, tmp_path: Path
) -> None:
    """hunt 42 H42-3: under ``torch.__future__.set_swap_module_params_on_conversion(True)``, ``model.to(float64)``
    between steps and ``to_empty()`` of a model made on the meta device run as they do uncaptured, and every
    step saves the model's parameters and gradients as they are then (those of the tensors swapped in).
    Before, with no optimizer given, the weak reference held to each parameter made them raise
    ``Couldn't swap Linear.weight`` ("it has weakref associated with it")."""
    swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        with torch.device("meta" if conversion == "to_empty" else "cpu"):
            model = _mlp()
        hook = ttt.capture(model, tmp_path, save_config=EVERY_STEP)
        if conversion == "to_empty":
            model.to_empty(device="cpu")
            for p in model.parameters():
                nn.init.normal_(p, std=0.3)
        gen = torch.Generator().manual_seed(4)
        seen: list[dict[str, torch.Tensor]] = []
        for s in range(4):
            if conversion == "to" and s == 2:
                model.to(torch.float64)
            dtype = model[0].weight.dtype
            x, y = _batch(gen)
            model.zero_grad()
            F.cross_entropy(model(x.to(dtype)), y).backward()
            grads = {f"gradients/{n}": p.grad.clone() for n, p in model.named_parameters()}
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.1 * p.grad
            seen.append({**grads, **{n: p.detach().clone() for n, p in model.named_parameters()}})
        hook.close()
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)
    assert model[0].weight.dtype == (torch.float64 if conversion == "to" else torch.float32)
    trial = _trial(tmp_path)
    assert trial.steps() == list(range(4))
    for s, values in enumerate(seen):
        for name, want in values.items():
            got = _value(trial, name, s)
            assert got.dtype == want.numpy().dtype or s == 1, (name, s)  # step 1's weights: read after the switch
            np.testing.assert_array_equal(got, want.numpy())


class UncertaintyLoss(nn.Module):
    """Two task losses weighted by learned log variances (Kendall et al.'s multi-task weighting)."""

    def __init__(self) -> None:
        super().__init__()
        self.log_var = nn.Parameter(torch.zeros(2))

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (torch.exp(-self.log_var) * torch.stack([a, b]) + self.log_var).sum()


def test_parameters_the_optimizer_trains_outside_the_model_are_saved_or_named_in_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """hunt 42 H42-1: the optimizer also trains the loss module's log variances and a loose temperature
    (``nn.Parameter``): the loss module's are saved as a registered module's (``UncertaintyLoss.log_var`` and
    its gradient, as torch has them), the temperature, which no module holds, is named in one warning for the
    run. Before, both were dropped without a word."""
    model, crit = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 2)), UncertaintyLoss()
    temp = nn.Parameter(torch.ones(1))
    opt = torch.optim.SGD([*model.parameters(), *crit.parameters(), temp], lr=0.1)
    hook = ttt.capture(model, tmp_path, optimizer=opt, loss=crit, save_config=EVERY_STEP)
    gen = torch.Generator().manual_seed(6)
    seen: list[dict[str, torch.Tensor]] = []
    with caplog.at_level(logging.WARNING, logger="tensortap"):
        for _ in range(3):
            x, y = torch.randn(5, 6, generator=gen), torch.randn(5, 2, generator=gen)
            opt.zero_grad()
            err = (model(x) / temp - y) ** 2
            crit(err[:, 0].mean(), err[:, 1].mean()).backward()
            grad = crit.log_var.grad.clone()
            opt.step()
            seen.append({"gradients/UncertaintyLoss.log_var": grad, "UncertaintyLoss.log_var": crit.log_var.clone()})
    hook.close()
    trial = _trial(tmp_path)
    for s, values in enumerate(seen):
        for name, want in values.items():
            np.testing.assert_array_equal(_value(trial, name, s), want.detach().numpy())
    assert not [n for n in trial.tensor_names() if "temp" in n]
    warned = [r.getMessage() for r in caplog.records if "no registered module holds" in r.getMessage()]
    assert len(warned) == 1 and "1 parameter(s)" in warned[0] and "[1]" in warned[0], warned
    assert "hook.register_module(module, name=...)" in warned[0]


def test_the_optimizers_parameters_are_looked_at_for_unheld_ones_only_when_they_change(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """review 56 F10: with every parameter held, ``_warn_unheld`` scanned every optimizer parameter at every
    step for the whole run (~1.1 ms a step at 2000 parameters). Now once, and again when the optimizer's
    parameters change: a loose parameter added by ``add_param_group`` is still named in the warning."""
    model = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hook = ttt.capture(model, tmp_path, optimizer=opt, save_config=EVERY_STEP)
    looks: list[int] = []  # the optimizer's parameter count at each look
    warn_unheld = type(hook)._warn_unheld

    def counted(self: Any, att: Any, *args: Any) -> None:
        looks.append(sum(len(group["params"]) for group in att.optimizer.param_groups))
        warn_unheld(self, att, *args)

    monkeypatch.setattr(type(hook), "_warn_unheld", counted)
    gen = torch.Generator().manual_seed(4)

    def steps(n: int) -> None:
        for _ in range(n):
            opt.zero_grad()
            (model(torch.randn(3, 6, generator=gen)) * temp).sum().backward()
            opt.step()

    temp = nn.Parameter(torch.ones(1))
    with caplog.at_level(logging.WARNING, logger="tensortap"):
        steps(4)
        assert looks == [4]
        opt.add_param_group({"params": [temp]})
        steps(3)
    hook.close()
    assert looks == [4, 5]
    warned = [r.getMessage() for r in caplog.records if "no registered module holds" in r.getMessage()]
    assert len(warned) == 1 and "1 parameter(s)" in warned[0], warned


class Perceptual(nn.Module):
    """A perceptual loss made by hand: a feature network whose parameters were never frozen (``requires_grad``)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8))
        self.log_var = nn.Parameter(torch.zeros(1))

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.exp(-self.log_var) * F.mse_loss(self.features(a), self.features(b)) + self.log_var


@pytest.mark.parametrize("with_optimizer", [True, False])
def test_a_loss_modules_feature_network_no_optimizer_trains_is_not_saved(tmp_path: Path, with_optimizer: bool) -> None:
    """review 56 F8: the weights of a loss module's feature network that no optimizer trains but that keep
    ``requires_grad`` (a perceptual loss never frozen explicitly) were saved at every saved step (~59 MB a step
    for VGG16's). Now only the loss module's parameters an attached optimizer trains are saved (its
    ``log_var`` here), and none without an optimizer."""
    model, crit = nn.Linear(6, 6), Perceptual()
    opt = torch.optim.SGD([*model.parameters(), crit.log_var], lr=0.1)
    hook = ttt.capture(model, tmp_path, optimizer=opt if with_optimizer else None, loss=crit, save_config=EVERY_STEP)
    gen = torch.Generator().manual_seed(3)
    for _ in range(2):
        x = torch.randn(4, 6, generator=gen)
        opt.zero_grad()
        crit(model(x), x).backward()
        opt.step()
    hook.close()
    names = _trial(tmp_path).tensor_names()
    assert not [n for n in names if "features" in n], names
    assert ("Perceptual.log_var" in names) == with_optimizer, names
    assert "weight" in names, names


class WithLoss(nn.Module):
    """Returns ``(logits, loss)``, or a dict with ``"loss"`` (as Hugging Face models do)."""

    def __init__(self, as_dict: bool) -> None:
        super().__init__()
        self.body = _mlp()
        self.as_dict = as_dict

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> Any:
        logits = self.body(x)
        loss = F.cross_entropy(logits, y)
        return {"logits": logits, "loss": loss} if self.as_dict else (logits, loss)


@pytest.mark.parametrize("kind", ["functional", "tuple", "dict"])
def test_the_loss_backward_is_called_on_is_captured_without_registration(tmp_path: Path, kind: str) -> None:
    model: nn.Module = _mlp() if kind == "functional" else WithLoss(as_dict=kind == "dict")
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    hook = ttt.capture(model, tmp_path, optimizer=opt, save_config=EVERY_STEP)
    gen = torch.Generator().manual_seed(2)
    losses = []
    for _ in range(3):
        x, y = _batch(gen)
        opt.zero_grad()
        if kind == "functional":
            loss = F.cross_entropy(model(x), y)
        elif kind == "tuple":
            loss = model(x, y)[1]
        else:
            loss = model(x, y)["loss"]
        loss.backward()
        opt.step()
        losses.append(loss.item())
    hook.close()
    trial = _trial(tmp_path)
    assert trial.tensor_names(collection="losses") == ["losses/loss"]
    assert [float(_value(trial, "losses/loss", s)) for s in range(3)] == losses


def test_a_registered_loss_module_names_the_loss_once(tmp_path: Path) -> None:
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_fn = nn.CrossEntropyLoss()
    hook = ttt.capture(model, tmp_path, optimizer=opt, loss=loss_fn, save_config=EVERY_STEP)
    gen = torch.Generator().manual_seed(3)
    expected = []
    for _ in range(2):
        x, y = _batch(gen)
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        aux = (model[0].weight ** 2).sum()
        hook.record_loss(aux, name="l2")  # named by the user
        opt.step()
        expected.append((loss.item(), aux.item()))
    hook.close()
    trial = _trial(tmp_path)
    assert trial.tensor_names(collection="losses") == ["losses/CrossEntropyLoss", "losses/l2"]
    for s, (loss_value, aux_value) in enumerate(expected):
        assert float(_value(trial, "losses/CrossEntropyLoss", s)) == loss_value
        assert float(_value(trial, "losses/l2", s)) == aux_value


def test_a_loss_function_given_to_capture_names_the_loss(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(6, 3), nn.LogSoftmax(dim=1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hook = ttt.capture(model, tmp_path, optimizer=opt, loss=F.nll_loss, save_config=EVERY_STEP)
    x, y = _batch(torch.Generator().manual_seed(4))
    opt.zero_grad()
    loss = F.nll_loss(model(x), y)
    loss.backward()
    opt.step()
    hook.close()
    trial = _trial(tmp_path)
    assert trial.tensor_names(collection="losses") == ["losses/nll_loss"]
    assert float(_value(trial, "losses/nll_loss", 0)) == loss.item()


def _hooks_on(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._forward_hooks_always_called) for m in model.modules()
    ) + sum(len(getattr(p, "_post_accumulate_grad_hooks", None) or {}) for p in model.parameters())


def test_a_failed_construction_leaves_the_model_untouched(tmp_path: Path) -> None:
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    backward = torch.autograd.backward
    with pytest.raises(TypeError, match="optimizer"):
        ttt.capture(model, tmp_path / "a", optimizer="sgd")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="loss"):
        ttt.capture(model, tmp_path / "b", loss=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="already attached"):
        ttt.capture(model, tmp_path / "c", optimizer=[opt, opt])  # fails after the module is registered
    assert _hooks_on(model) == 0
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    assert torch.autograd.backward is backward


def test_a_cell_run_again_into_its_folder_is_refused_or_replaces_the_open_capture(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A notebook cell that captures into one folder, run twice: the first capture is never closed (until the
    exit handlers close it), and it held a shard of steps the second run's shards are numbered over."""
    from tensortap.trial.check import find_problems

    def cell(if_exists: str) -> tuple[Any, nn.Module]:
        model = _mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        hook = ttt.capture(model, tmp_path, optimizer=opt, save_config=EVERY_STEP, if_exists=if_exists)  # type: ignore[arg-type]
        _train(model, opt, 3, seed=0)
        return hook, model

    first, _ = cell("error")
    with pytest.raises(tensortap.TrialExistsError, match=r"a capture that this process started at .* still writes"):
        cell("error")
    with caplog.at_level(logging.WARNING, logger="tensortap"):
        second, model = cell("overwrite")
    assert "it is turned off (it saves nothing more)" in caplog.text
    second.close()
    first.close()  # what the exit handlers do: it wrote its shard over the second run's, with the first's run id
    assert find_problems(str(tmp_path)) == []
    trial = _trial(tmp_path)
    assert trial.steps() == [0, 1, 2] and trial.end_reasons() == {"worker_0": "closed"}
    for name, p in model.named_parameters():
        np.testing.assert_array_equal(_value(trial, name, 2), p.detach().numpy())


def test_a_model_captured_by_an_open_hook_says_so_when_captured_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A cell run again into a new folder: the first hook, never closed, records the model's steps too."""
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    first = ttt.capture(model, tmp_path / "a", optimizer=opt, save_config=EVERY_STEP)
    _train(model, opt, 2, seed=0)
    with caplog.at_level(logging.WARNING, logger="tensortap"):
        second = ttt.capture(model, tmp_path / "b", optimizer=opt, save_config=EVERY_STEP)
    assert f"Sequential is captured already by an open hook, which writes {tmp_path / 'a'}" in caplog.text
    _train(model, opt, 2, seed=1)
    second.close()
    first.close()
    assert _trial(tmp_path / "a").steps() == [0, 1, 2, 3]  # as said: both recorded the later steps
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tensortap"):
        ttt.capture(model, tmp_path / "c", optimizer=opt).close()  # the others are closed: nothing to say
    assert "captured already" not in caplog.text


def test_an_accelerate_prepared_optimizer_is_unwrapped(tmp_path: Path) -> None:
    """``accelerator.prepare`` (and the Hugging Face Trainer's callbacks) hand out an ``AcceleratedOptimizer``:
    an ``Optimizer`` subclass whose own step hooks never run; attaching it raised ``AttributeError``."""
    accelerate = pytest.importorskip("accelerate")
    model = _mlp()
    model, opt = accelerate.Accelerator(cpu=True).prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert type(opt).__name__ == "AcceleratedOptimizer"
    hook = ttt.capture(model, tmp_path, optimizer=opt, save_config=EVERY_STEP, include_collections=["gradients"])
    with pytest.raises(ValueError, match="already attached"):
        hook.attach_optimizer(opt.optimizer)  # the same optimizer
    gen = torch.Generator().manual_seed(4)
    seen = []
    for _ in range(3):
        x, y = _batch(gen)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        seen.append(model[0].weight.grad.detach().clone())
        opt.step()
    hook.close()
    trial = _trial(tmp_path)
    assert trial.steps(mode=Mode.TRAIN) == [0, 1, 2]
    for s, g in enumerate(seen):
        np.testing.assert_array_equal(_value(trial, "gradients/0.weight", s), g.numpy())


@pytest.mark.parametrize("registered", [False, True])
def test_accelerate_gradient_accumulation_saves_the_losses_the_loop_computed(registered: bool, tmp_path: Path) -> None:
    """accelerate's ``examples/by_feature/gradient_accumulation.py``: ``accelerator.backward(loss)`` differentiates
    ``loss / gradient_accumulation_steps``. That tensor was saved as ``losses/loss`` (half the loop's loss with
    two micro-batches), and beside ``losses/CrossEntropyLoss`` when the loss module was registered."""
    accelerate = pytest.importorskip("accelerate")
    from torch.utils.data import DataLoader, TensorDataset

    gen = torch.Generator().manual_seed(6)
    data = TensorDataset(*_batch(gen, 16))
    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2)
    plain = _mlp()
    plain_opt = torch.optim.AdamW(plain.parameters(), lr=0.01)
    schedule = torch.optim.lr_scheduler.StepLR(plain_opt, 1, 0.9)
    model, opt, loader, schedule = accelerator.prepare(plain, plain_opt, DataLoader(data, batch_size=4), schedule)
    loss_fn = nn.CrossEntropyLoss()
    hook = ttt.capture(
        model, tmp_path, optimizer=opt, loss=loss_fn if registered else None, save_config=EVERY_STEP,
        include_collections=["gradients", "losses"],
    )  # fmt: skip
    applied: list[torch.Tensor] = []
    plain_opt.register_step_pre_hook(lambda *_: applied.append(plain[0].weight.grad.detach().clone()))
    losses = []
    for x, y in loader:
        with accelerator.accumulate(model):
            loss = loss_fn(model(x), y)
            losses.append(loss.item())
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), 0.5)
            opt.step()  # skipped by accelerate on the first micro-batch of two
            schedule.step()
            opt.zero_grad()
    hook.close()
    trial = _trial(tmp_path)
    assert trial.steps(mode=Mode.TRAIN) == [0, 1] and len(applied) == 2
    name = "losses/CrossEntropyLoss" if registered else "losses/loss"
    assert set(trial.tensor_names(collection="losses")) == {f"{name}:0", f"{name}:1"}
    for s, grad in enumerate(applied):
        np.testing.assert_array_equal(_value(trial, "gradients/0.weight", s), grad.numpy())  # accumulated, clipped
        assert [float(_value(trial, f"{name}:{i}", s)) for i in (0, 1)] == losses[2 * s : 2 * s + 2]


ACCELERATE_AFTER_THE_HOOK = """
import json, sys, torch, torch.nn.functional as F, tensortap, tensortap.torch as ttt
torch.set_num_threads(1)
model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
hook = ttt.capture(model, sys.argv[1], optimizer=opt, save_config=tensortap.SaveConfig(save_interval=1))
assert "accelerate" not in sys.modules
from accelerate import Accelerator
accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
model, opt = accelerator.prepare(model, opt)
gen = torch.Generator().manual_seed(1)
losses = []
for _ in range(4):
    x, y = torch.randn(4, 6, generator=gen), torch.randint(0, 3, (4,), generator=gen)
    with accelerator.accumulate(model):
        loss = F.cross_entropy(model(x), y)
        losses.append(loss.item())
        accelerator.backward(loss)
        opt.step()
        opt.zero_grad()
hook.close()
print(json.dumps({"losses": losses, "restored": not hasattr(Accelerator.backward, "__wrapped__")}))
"""


def test_accelerate_imported_after_the_hook_opened_saves_the_losses_the_loop_computed(tmp_path: Path) -> None:
    """``Accelerator.backward`` was wrapped only when accelerate was imported before the first hook opened: a
    script making its hook first (or the Hugging Face Trainer importing accelerate later) saved
    ``loss / gradient_accumulation_steps``, half the loop's losses here. Run in a fresh interpreter, where
    accelerate is not imported yet."""
    pytest.importorskip("accelerate")
    out = subprocess.run(
        [sys.executable, "-c", ACCELERATE_AFTER_THE_HOOK, str(tmp_path)], capture_output=True, text=True, timeout=180
    )
    assert out.returncode == 0, out.stderr
    ran = json.loads(out.stdout.splitlines()[-1])
    assert ran["restored"]  # the last hook to close gave accelerate its own backward back
    trial = _trial(tmp_path)
    assert trial.steps(mode=Mode.TRAIN) == [0, 1]
    saved = [float(_value(trial, f"losses/loss:{i}", s)) for s in (0, 1) for i in (0, 1)]
    assert saved == ran["losses"]


def test_a_lightning_fabric_module_is_named_as_the_module_inside(tmp_path: Path) -> None:
    """``fabric.setup`` hands out a ``_FabricModule`` holding the model as ``_forward_module``: every name
    was prefixed ``_forward_module.`` and the model's own output was ``outputs/_FabricModule``."""
    fabric_module = pytest.importorskip("lightning.fabric")
    fabric = fabric_module.Fabric(accelerator="cpu", devices=1)
    plain_model = _mlp()
    model, opt = fabric.setup(plain_model, torch.optim.SGD(plain_model.parameters(), lr=0.1))
    assert type(model).__name__ == "_FabricModule"
    hook = ttt.capture(
        model, tmp_path, optimizer=opt, save_config=EVERY_STEP,
        include_collections=["weights", "gradients", "losses", "outputs"],
    )  # fmt: skip
    gen = torch.Generator().manual_seed(5)
    seen = []
    for _ in range(3):
        x, y = _batch(gen)
        opt.zero_grad()
        out = model(x)
        loss = F.cross_entropy(out, y)
        fabric.backward(loss)
        fabric.clip_gradients(model, opt, max_norm=0.1)
        seen.append((out.detach().clone(), loss.item(), model.module[0].weight.grad.detach().clone()))
        opt.step()
    hook.close()
    trial = _trial(tmp_path)
    plain = {name for name, _ in plain_model.named_parameters()}
    assert set(trial.tensor_names(collection="weights")) == {n for n in plain if n.endswith("weight")}
    assert set(trial.tensor_names(collection="gradients")) == {f"gradients/{n}" for n in plain}
    assert "outputs/Sequential" in trial.tensor_names(collection="outputs")
    for s, (out, loss, grad) in enumerate(seen):
        np.testing.assert_array_equal(_value(trial, "outputs/Sequential", s), out.numpy())
        assert float(_value(trial, "losses/loss", s)) == loss
        np.testing.assert_array_equal(_value(trial, "gradients/0.weight", s), grad.numpy())  # clipped


def _fabric_trial(path: Path, precision: str, before: bool) -> dict[str, Any]:
    """Two epochs of a LightningModule under Lightning Fabric, its steps run as Fabric's build_your_own_trainer
    runs them (``model.training_step`` / ``model.validation_step`` on what ``fabric.setup`` returned; one
    validation batch through ``model(x)``), the hook registered ``before`` or after ``fabric.setup``; what torch
    had: the losses, and the outputs of each validation forward."""
    lightning = pytest.importorskip("lightning")

    class Lit(lightning.LightningModule):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.net = _mlp()
            self.seen: list[torch.Tensor] = []

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = self.net(x)
            self.seen.append(out.detach().clone())
            return out

        def training_step(self, batch: Any, i: int) -> torch.Tensor:
            return F.cross_entropy(self(batch[0]), batch[1])

        def validation_step(self, batch: Any, i: int) -> torch.Tensor:
            return F.cross_entropy(self(batch[0]), batch[1])

    torch.manual_seed(0)
    fabric = lightning.fabric.Fabric(accelerator="cpu", devices=1, precision=precision)
    plain = Lit()
    opt = torch.optim.SGD(plain.parameters(), lr=0.1)
    hook = ttt.Hook(path, save_config=EVERY_STEP, include_collections=["losses", "outputs", "metrics"])
    if before:
        hook.register_module(plain)
    model, opt = fabric.setup(plain, opt)
    if not before:
        hook.register_module(model)
    hook.attach_optimizer(opt)
    gen = torch.Generator().manual_seed(4)
    ran: dict[str, Any] = {"losses": [], "outputs": []}
    for _ in range(2):
        model.train()
        for i in range(2):
            opt.zero_grad()
            loss = model.training_step(_batch(gen), i)
            fabric.backward(loss)
            opt.step()
            ran["losses"].append(loss.item())
        model.eval()
        plain.seen.clear()
        with torch.no_grad():
            val = model.validation_step(_batch(gen), 0)
            x, y = _batch(gen)
            val = (val + F.cross_entropy(model(x), y)) / 2
        hook.save_scalar("val_loss", val.item())  # after the loop: its last EVAL step
        ran["outputs"] += plain.seen
    hook.close()
    return ran


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_fabric_forwards_redirected_through_the_module_setup_returned_are_captured(
    tmp_path: Path, precision: str
) -> None:
    """Fabric runs ``model.training_step(...)`` of the ``_FabricModule`` through its ``forward()`` without calling
    it: a hook registered on what ``fabric.setup`` returned (as the docs say) saw no forward, so no EVAL step, no
    outputs, and no warning (hunt 28). Registered before ``fabric.setup`` or after, the trial is the same."""
    for before in (False, True):
        path = tmp_path / ("before" if before else "after")
        ran = _fabric_trial(path, precision, before)
        trial = _trial(path)
        assert trial.steps(mode=Mode.TRAIN) == [0, 1, 2, 3]
        assert trial.steps(mode=Mode.EVAL) == [0, 1, 2, 3]  # one a validation forward, through either way
        assert [float(_value(trial, "losses/loss", s, Mode.TRAIN)) for s in range(4)] == ran["losses"]
        for s, out in enumerate(ran["outputs"]):
            names = trial.tensor_names(mode=Mode.EVAL, step=s, collection="outputs")
            assert {"outputs/Lit", "outputs/net", "outputs/net.0"} <= set(names)
            assert not any(":" in n for n in names)  # model(x) through the wrapper: one call, not two
            np.testing.assert_array_equal(_value(trial, "outputs/Lit", s, Mode.EVAL), out.float().numpy())
        assert trial.tensor_names(mode=Mode.TRAIN, step=1, collection="metrics") == []
        assert "metrics/val_loss" in trial.tensor_names(mode=Mode.EVAL, step=1)


class Lookahead(torch.optim.Optimizer):
    """An optimizer wrapper as timm's ``Lookahead`` was written: an ``Optimizer`` that skips
    ``Optimizer.__init__`` (so it has no step hooks) and keeps the wrapped optimizer under its own name."""

    def __init__(self, base_optimizer: torch.optim.Optimizer) -> None:  # no super().__init__()
        self._base_optimizer = base_optimizer
        self.param_groups = base_optimizer.param_groups
        self.defaults = base_optimizer.defaults
        self.state = base_optimizer.state

    def step(self, closure: Any = None) -> Any:
        return self._base_optimizer.step(closure)


def test_a_failed_attach_optimizer_changes_nothing(tmp_path: Path) -> None:
    """Attaching an optimizer the hook cannot attach is a ``TypeError`` that leaves the hook as it was; it used to
    leave a phantom optimizer that never steps behind, so that every later step merged into one."""
    model = _mlp()
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    hook = ttt.Hook(tmp_path, save_config=EVERY_STEP, include_collections=["gradients", "losses"])
    hook.register_module(model)
    with pytest.raises(TypeError, match=r"Lookahead.*pass the optimizer it wraps"):
        hook.attach_optimizer(Lookahead(base))
    hook.attach_optimizer(base)
    gen = torch.Generator().manual_seed(4)
    seen = []
    for _ in range(3):
        x, y = _batch(gen)
        base.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        seen.append((loss.item(), model[2].weight.grad.detach().clone()))
        base.step()
    hook.close()
    trial = _trial(tmp_path)
    assert trial.steps(mode=Mode.TRAIN) == [0, 1, 2]
    for s, (loss, g) in enumerate(seen):
        assert float(_value(trial, "losses/loss", s)) == loss
        np.testing.assert_array_equal(_value(trial, "gradients/2.weight", s), g.numpy())


def test_two_optimizers_of_the_same_parameters_are_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A second optimizer of the same parameters that never steps (one made and attached by mistake, or the
    optimizer a framework made next to the user's) keeps every step open: they all merged into one, silently."""
    model = _mlp()
    stepped, idle = (torch.optim.SGD(model.parameters(), lr=0.1) for _ in range(2))
    hook = ttt.Hook(tmp_path, save_config=EVERY_STEP, include_collections=["losses"])
    hook.register_module(model)
    with caplog.at_level(logging.WARNING, logger="tensortap"):
        hook.attach_optimizer(idle, name="idle")
        hook.attach_optimizer(stepped, name="stepped")
    _train(model, stepped, steps=3, seed=4)
    hook.close()
    assert _trial(tmp_path).steps(mode=Mode.TRAIN) == [0]  # as documented: idle never stepped
    warned = [r.getMessage() for r in caplog.records if "updates too" in r.getMessage()]
    assert len(warned) == 1
    assert "optimizer stepped updates parameters that the attached optimizer idle" in warned[0]
    assert "(0.weight, 0.bias, 2.weight, ...)" in warned[0]


class Generator(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.main = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 4))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.main(z)


class Discriminator(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.main = nn.Sequential(nn.Linear(4, 8), nn.LeakyReLU(0.2), nn.Linear(8, 1), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x).view(-1)


def _grads(model: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{n}": p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_a_gan_with_two_optimizers_is_one_step_per_iteration(tmp_path: Path) -> None:
    """The training loop of pytorch/examples dcgan/main.py, on a tiny fully-connected GAN."""
    net_g, net_d = Generator(), Discriminator()
    opt_d = torch.optim.Adam(net_d.parameters(), lr=2e-4, betas=(0.5, 0.999))
    opt_g = torch.optim.Adam(net_g.parameters(), lr=2e-4, betas=(0.5, 0.999))
    criterion = nn.BCELoss()
    hook = ttt.Hook(tmp_path, save_config=EVERY_STEP, include_collections=["weights", "biases", "gradients", "losses"])
    hook.register_module(net_g, name="G")
    hook.register_module(net_d, name="D")
    hook.attach_optimizer(opt_g)  # attached in the other order than they step
    hook.attach_optimizer(opt_d)
    gen = torch.Generator().manual_seed(5)
    seen = []
    for _ in range(3):
        real = torch.randn(6, 4, generator=gen)
        net_d.zero_grad()
        err_d_real = criterion(net_d(real), torch.ones(6))
        err_d_real.backward()
        fake = net_g(torch.randn(6, 3, generator=gen))
        err_d_fake = criterion(net_d(fake.detach()), torch.zeros(6))
        err_d_fake.backward()
        grads = _grads(net_d, "D")
        opt_d.step()
        net_g.zero_grad()
        err_g = criterion(net_d(fake), torch.ones(6))
        err_g.backward()
        grads |= _grads(net_g, "G")
        opt_g.step()
        weights = {f"G.{n}": p.detach().clone() for n, p in net_g.named_parameters()}
        weights |= {f"D.{n}": p.detach().clone() for n, p in net_d.named_parameters()}
        seen.append((grads, weights, err_d_real.item(), err_d_fake.item(), err_g.item()))
    hook.close()
    trial = _trial(tmp_path)
    assert trial.steps(mode=Mode.TRAIN) == [0, 1, 2]
    assert trial.tensor_names(collection="losses") == ["losses/D:0", "losses/D:1", "losses/G"]
    for s, (grads, weights, d_real, d_fake, g) in enumerate(seen):
        assert set(trial.tensor_names(collection="gradients")) == {f"gradients/{n}" for n in grads}
        for name, value in grads.items():  # D's gradients as opt_d.step() saw them, not after errG.backward()
            np.testing.assert_array_equal(_value(trial, f"gradients/{name}", s), value.numpy(), err_msg=name)
        for name, value in weights.items():
            np.testing.assert_array_equal(_value(trial, name, s), value.numpy(), err_msg=name)
        assert [float(_value(trial, n, s)) for n in ("losses/D:0", "losses/D:1", "losses/G")] == [d_real, d_fake, g]


def test_finish_step_defines_the_step_in_a_custom_loop(tmp_path: Path) -> None:
    model = _mlp()
    hook = ttt.capture(
        model, tmp_path, save_config=EVERY_STEP, include_collections=["gradients", "losses"], explicit_steps=True
    )
    gen = torch.Generator().manual_seed(6)
    seen = []
    for _ in range(3):
        model.zero_grad()
        for _ in range(2):  # two forwards per step, no optimizer
            x, y = _batch(gen)
            F.cross_entropy(model(x), y).backward()
        seen.append(model[2].weight.grad.detach().clone())
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.1 * p.grad
        hook.finish_step()
    hook.close()
    trial = _trial(tmp_path)
    assert trial.steps() == [0, 1, 2]
    assert trial.tensor_names(collection="losses") == ["losses/loss:0", "losses/loss:1"]
    for s, g in enumerate(seen):
        np.testing.assert_array_equal(_value(trial, "gradients/2.weight", s), g.numpy())


def test_lbfgs_gradients_are_those_each_step_starts_from(tmp_path: Path) -> None:
    model = nn.Linear(4, 1)
    opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=4)
    hook = ttt.capture(model, tmp_path, optimizer=opt, save_config=EVERY_STEP, include_collections=["gradients"])
    gen = torch.Generator().manual_seed(7)
    x, y = torch.randn(16, 4, generator=gen), torch.randn(16, 1, generator=gen)
    first: list[torch.Tensor] = []
    calls = [0]

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        if calls[0] == 0:
            first.append(model.weight.grad.detach().clone())
        calls[0] += 1
        return loss

    for _ in range(3):
        calls[0] = 0
        opt.step(closure)
    hook.close()
    trial = _trial(tmp_path)
    assert trial.steps() == [0, 1, 2]
    for s in range(3):
        np.testing.assert_array_equal(_value(trial, "gradients/weight", s), first[s].numpy())


def test_lbfgs_state_is_saved_as_the_optimizers_and_what_is_not_saved_is_named(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """hunt 50 F2: torch's LBFGS keeps its whole state on its first parameter (``self.state[self._params[0]]``):
    directions and gradients flat over all the parameters (46 values here), a scalar ``H_diag``, counters, and
    its history as lists of tensors. The trial named the tensors the state of ``0.weight`` (``optimizer/0.weight/d``
    of shape (46,) for a (4, 8) weight) and left the counters and the history out without a word. Now they are
    the optimizer's (``optimizer/<its name>/<key>``), numbers saved, the history named in one warning; Adafactor's
    row and column factors, of other shapes than their parameter's, stay the parameter's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4), nn.Tanh(), nn.Linear(4, 2))
    opt = torch.optim.LBFGS(model.parameters(), lr=0.1, max_iter=3)
    hook = ttt.capture(
        model, tmp_path, optimizer=opt, save_config=EVERY_STEP, include_collections=["optimizer_variables"]
    )
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(4, 8, generator=gen), torch.randn(4, 2, generator=gen)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        return loss

    with caplog.at_level(logging.WARNING, logger="tensortap"):
        for _ in range(2):
            opt.step(closure)
    hook.close()
    state = opt.state[model[0].weight]
    assert state["d"].shape == (46,)
    trial = _trial(tmp_path)
    saved = {k for k, v in state.items() if isinstance(v, (torch.Tensor, int, float))}
    assert trial.tensor_names(collection="optimizer_variables") == sorted(f"optimizer/Sequential/{k}" for k in saved)
    for key in saved:
        np.testing.assert_array_equal(_value(trial, f"optimizer/Sequential/{key}", 1), np.asarray(state[key]))
    warned = [r.getMessage() for r in caplog.records if "not saved" in r.getMessage()]
    assert len(warned) == 1, warned
    assert all(f"optimizer/Sequential/{k} (list)" in warned[0] for k in ("old_dirs", "old_stps", "ro", "al"))

    model = nn.Sequential(nn.Linear(8, 4), nn.Tanh(), nn.Linear(4, 2))
    opt = torch.optim.Adafactor(model.parameters(), lr=0.01)
    out = tmp_path / "adafactor"
    with ttt.capture(model, out, optimizer=opt, save_config=EVERY_STEP, include_collections=["optimizer_variables"]):
        F.mse_loss(model(x), y).backward()
        opt.step()
    trial = _trial(out)
    for p, name in ((model[0].weight, "0.weight"), (model[2].bias, "2.bias")):
        for key, v in opt.state[p].items():
            np.testing.assert_array_equal(_value(trial, f"optimizer/{name}/{key}", 0), v.numpy())
    assert _value(trial, "optimizer/0.weight/row_var", 0).shape != tuple(model[0].weight.shape)


class _CountingSGD(torch.optim.SGD):
    """An SGD whose state holds NumPy and Python numbers, one an int beyond int64 (a user's counter of bits)."""

    def step(self, closure: Any = None) -> Any:
        loss = super().step(closure)
        for p in (p for group in self.param_groups for p in group["params"]):
            state = self.state[p]
            state["calls"] = np.int64(state.get("calls", 0) + 1)
            state["seen_bits"] = 2**70
        return loss


def test_numbers_in_optimizer_state_are_saved_and_an_int_beyond_int64_is_named(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """review 58 R58-1: since numbers in optimizer state were saved (hunt 50 F2), a Python int beyond int64 in it
    (``2**70``) failed the step's capture with an OverflowError: capture was disabled from step 0, an empty trial;
    a NumPy scalar (``np.int64``) was named as not saved. Now the NumPy scalar is saved as a number, the big int is
    named in the one warning, and the rest of the step is saved."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4), nn.Tanh(), nn.Linear(4, 2))
    opt = _CountingSGD(model.parameters(), lr=0.1)
    collections = ["weights", "optimizer_variables"]
    with caplog.at_level(logging.WARNING, logger="tensortap"):
        with ttt.capture(model, tmp_path, optimizer=opt, save_config=EVERY_STEP, include_collections=collections):
            for _ in range(2):
                opt.zero_grad()
                model(torch.randn(4, 8)).pow(2).mean().backward()
                opt.step()
    trial = _trial(tmp_path)
    assert trial.steps() == [0, 1]
    assert _value(trial, "optimizer/0.weight/calls", 1) == 2
    np.testing.assert_array_equal(_value(trial, "0.weight", 1), model[0].weight.detach().numpy())
    warned = [r.getMessage() for r in caplog.records if "not saved" in r.getMessage()]
    assert len(warned) == 1 and "optimizer/0.weight/seen_bits (int)" in warned[0], warned
    assert not [r for r in caplog.records if "capture failed" in r.getMessage()]


def _step_with_closure(
    opt: torch.optim.Optimizer,
    net: nn.Module,
    prefix: str,
    loss: Callable[[], torch.Tensor],
    grads: dict[str, torch.Tensor],
    by_keyword: bool = False,
) -> None:
    """``opt.step(closure)`` (or ``closure=closure``); the gradients of ``net`` the step starts from go into
    ``grads``."""

    def closure() -> torch.Tensor:
        net.zero_grad()
        value = loss()
        value.backward()
        if not any(n.startswith(f"{prefix}.") for n in grads):
            grads.update(_grads(net, prefix))
        return value

    if by_keyword:
        opt.step(closure=closure)
    else:
        opt.step(closure)


def test_two_optimizers_stepping_with_closures_each_save_their_gradients(tmp_path: Path) -> None:
    """Lightning's manual optimization passes a closure to every ``opt.step()``: in a GAN step, the second
    optimizer's gradients were dropped without a word (one closure flag per step, not per optimizer)."""
    net_g, net_d = Generator(), Discriminator()
    opt_d = torch.optim.SGD(net_d.parameters(), lr=0.1)
    opt_g = torch.optim.SGD(net_g.parameters(), lr=0.1)
    hook = ttt.Hook(tmp_path, save_config=EVERY_STEP, include_collections=["gradients"])
    hook.register_module(net_g, name="G")
    hook.register_module(net_d, name="D")
    hook.attach_optimizer(opt_d)
    hook.attach_optimizer(opt_g)
    gen = torch.Generator().manual_seed(9)
    seen: list[dict[str, torch.Tensor]] = []
    for _ in range(3):
        real, z = torch.randn(6, 4, generator=gen), torch.randn(6, 3, generator=gen)
        grads: dict[str, torch.Tensor] = {}
        # each loss runs inside the call, in this iteration
        _step_with_closure(opt_d, net_d, "D", lambda: (net_d(real) - net_d(net_g(z).detach())).mean(), grads)  # noqa: B023
        _step_with_closure(opt_g, net_g, "G", lambda: net_d(net_g(z)).mean(), grads, by_keyword=True)  # noqa: B023
        seen.append(grads)
    hook.close()
    trial = _trial(tmp_path)
    assert trial.steps(mode=Mode.TRAIN) == [0, 1, 2]
    for s, grads in enumerate(seen):
        assert set(trial.tensor_names(step=s, collection="gradients")) == {f"gradients/{n}" for n in grads}
        for name, value in grads.items():
            np.testing.assert_array_equal(_value(trial, f"gradients/{name}", s), value.numpy(), err_msg=name)


def test_a_step_gradscaler_skips_is_still_a_step_without_gradients(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The skipped step applied no gradient: it was saved with the non-finite ones, so ExplodingTensor fired at
    (and with StopTraining stopped) every healthy fp16 training at its first overflow, and the gradients saved
    were none that an update applied. A Keras LossScaleOptimizer's skipped step has no gradients either."""
    model = nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    # the first scale overflows (the step is skipped); the backoff brings it down to 2**7
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127, backoff_factor=2.0**-120)
    hook = ttt.capture(model, tmp_path, optimizer=opt, save_config=EVERY_STEP)
    gen = torch.Generator().manual_seed(8)
    seen = []
    with caplog.at_level(logging.WARNING, logger="tensortap"):
        for _ in range(4):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.float16):
                out = model(torch.randn(8, 4, generator=gen))
            loss = out.float().pow(2).mean()
            scaler.scale(loss).backward()
            before = model.weight.detach().clone()
            scaler.step(opt)  # unscales p.grad in place, then steps unless it is not finite
            seen.append((model.weight.grad.detach().clone(), torch.equal(before, model.weight), loss.item()))
            scaler.update()
    hook.close()
    assert [skipped for _, skipped, _ in seen] == [True, False, False, False]
    assert not np.isfinite(seen[0][0].numpy()).all()
    trial = _trial(tmp_path)
    assert trial.steps(mode=Mode.TRAIN) == [0, 1, 2, 3]
    assert trial.tensor("gradients/weight").steps() == [1, 2, 3]
    for s, (grad, _, loss) in enumerate(seen):
        if s:
            np.testing.assert_array_equal(_value(trial, "gradients/weight", s), grad.numpy())
        assert float(_value(trial, "losses/loss", s)) == loss  # the loss, not the scaled loss
    assert [r.getMessage() for r in caplog.records if "GradScaler" in r.getMessage()] == [
        "tensortap: step 0 has no gradients: the GradScaler skipped its optimizer step (the gradients were not "
        "finite; it lowers its scale and goes on); later such steps are not named"
    ]
    assert invoke_rule(ExplodingTensor(trial)) == []


def _no_op_hook(module: nn.Module, args: tuple[Any, ...]) -> None:
    """A user's own forward pre-hook (module level: pickled by reference)."""


def test_torch_save_and_deepcopy_of_a_captured_model(tmp_path: Path) -> None:
    model = _mlp()
    model.register_forward_pre_hook(_no_op_hook)  # the user's own: saved and copied with the model
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hook = ttt.capture(
        model, tmp_path, optimizer=opt, save_config=EVERY_STEP, include_collections=["weights", "outputs"]
    )
    gen = torch.Generator().manual_seed(9)

    def train(m: nn.Module, o: torch.optim.Optimizer) -> None:
        x, y = _batch(gen)
        o.zero_grad()
        F.cross_entropy(m(x), y).backward()
        o.step()

    train(model, opt)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    assert b"tensortap" not in buffer.getvalue()  # loading needs nothing of tensortap
    # torch.load's default (weights_only=True) with the model's classes allowed, as pytorch/examples do
    with torch.serialization.safe_globals([nn.Sequential, nn.Linear, nn.ReLU, _no_op_hook]):
        loaded = torch.load(buffer)
    twin = copy.deepcopy(model)
    for m in (loaded, twin):
        assert list(m._forward_pre_hooks.values()) == [_no_op_hook]
        assert not m._forward_hooks and not m._forward_hooks_with_kwargs and not m._forward_hooks_always_called
        assert not any(sub._forward_hooks for sub in m.modules())
    assert len(model._forward_pre_hooks) == 2 and model._forward_hooks  # the original keeps its taps
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.5)
    for m in (loaded, twin):
        for p, q in zip(m.parameters(), model.parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=0, atol=0)
    for _ in range(2):
        train(twin, twin_opt)  # the copy does not record into the original's trial
        loaded(torch.randn(2, 6))
    train(model, opt)
    hook.close()
    trial = _trial(tmp_path)
    assert trial.steps() == [0, 1]
    np.testing.assert_array_equal(_value(trial, "0.weight", 1), model[0].weight.detach().numpy())


class _Tagger(nn.Module):
    """A recurrent model (module level: pickled by reference) whose LSTM pickles by its own ``__getstate__``."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(6, 4, batch_first=True)
        self.out = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.rnn(x)[0][:, -1])


def test_a_captured_lstm_saved_whole_loads_as_if_never_captured(tmp_path: Path) -> None:
    """pytorch/examples word_language_model saves its model whole every epoch and loads the best with
    ``torch.load``'s default (``weights_only=True``) and its classes allowed."""
    model = _Tagger()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hook = ttt.capture(model, tmp_path, optimizer=opt, save_config=EVERY_STEP, include_collections=["outputs"])
    x, y = torch.randn(2, 5, 6), torch.tensor([0, 2])
    F.cross_entropy(model(x), y).backward()
    opt.step()
    buffer = io.BytesIO()
    torch.save(model, buffer)
    assert b"tensortap" not in buffer.getvalue()
    buffer.seek(0)
    with torch.serialization.safe_globals([_Tagger, nn.LSTM, nn.Linear]):
        loaded = torch.load(buffer)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in loaded.modules())
    assert model.rnn._forward_hooks  # the model trains on, captured
    hook.close()
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert "outputs/rnn/0" in _trial(tmp_path).tensor_names()  # its outputs were captured while it was saved


def _saved_losses(trial: tensortap.Trial, name: str) -> dict[tuple[Mode, int], list[float]]:
    """Per (mode, mode step): the values of loss ``name`` saved at the step, in call order (``name``, or
    ``name:0``, ``name:1``, ...)."""
    out = {}
    for mode in (Mode.TRAIN, Mode.EVAL):
        for s in trial.steps(mode=mode):
            names = [n for n in trial.tensor_names(step=s, mode=mode) if n.split(":")[0] == name]
            names.sort(key=lambda n: int(n.split(":")[1]) if ":" in n else 0)
            out[mode, s] = [float(_value(trial, n, s, mode)) for n in names]
    return out


def test_the_loss_of_a_model_not_captured_is_not_saved_in_the_last_evaluation_step(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """hunt 34 F1: pytorch/examples word_language_model trains, validates, loads its best model back with
    ``torch.load`` (a copy without tensortap's hooks) and tests it with the registered criterion. The copy's
    losses went into the last validation step, as ``losses/NLLLoss:1``, ``:2``, ..., and renamed the step's own
    validation loss ``losses/NLLLoss:0``, without a word."""
    model, criterion = _WordModel(), nn.NLLLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    hook = ttt.capture(model, tmp_path, optimizer=opt, loss=criterion, save_config=EVERY_STEP)
    gen = torch.Generator().manual_seed(34)

    def batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [
            (torch.randint(0, 12, (4, 2), generator=gen), torch.randint(0, 12, (8,), generator=gen)) for _ in range(n)
        ]

    def evaluate(m: nn.Module, data: list[tuple[torch.Tensor, torch.Tensor]]) -> list[float]:
        m.eval()
        with torch.no_grad():
            return [criterion(m(x, None)[0], y).item() for x, y in data]

    train_data, val_data, test_data = batches(2), batches(2), batches(3)
    expected: dict[tuple[Mode, int], list[float]] = {}
    with caplog.at_level(logging.WARNING, logger="tensortap"):
        for epoch in range(2):
            model.train()
            for s, (x, y) in enumerate(train_data, start=2 * epoch):
                opt.zero_grad()
                loss = criterion(model(x, None)[0], y)
                loss.backward()
                opt.step()
                expected[Mode.TRAIN, s] = [loss.item()]
            for s, v in enumerate(evaluate(model, val_data), start=2 * epoch):
                expected[Mode.EVAL, s] = [v]
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        with torch.serialization.safe_globals([_WordModel, nn.Embedding, nn.LSTM, nn.Linear]):
            best = torch.load(buffer)
        test = evaluate(best, test_data)
    hook.close()
    trial = _trial(tmp_path)
    assert trial.tensor_names(collection="losses") == ["losses/NLLLoss"]
    assert _saved_losses(trial, "losses/NLLLoss") == expected
    assert not set(test) & {v for vs in expected.values() for v in vs}
    warned = [r.getMessage() for r in caplog.records if "not saved" in r.getMessage()]
    assert len(warned) == 1 and "losses/NLLLoss" in warned[0] and "torch.load" in warned[0]
    assert "step 7:" in warned[0]  # the last validation's


class _Heads(nn.Module):
    """The patterns of losses that a step saves several calls of one registered loss module for: per time
    step of one output (``"per_time_step"``), per head of a model with two (``"two_heads"``), computed in
    ``forward`` (``"in_forward"``, as a model returning its loss), on a transformed output
    (``"transformed"``, ``criterion(log_softmax(out), y)``)."""

    def __init__(self, pattern: str, criterion: nn.Module) -> None:
        super().__init__()
        self.body = nn.Linear(6, 12)
        self.head = nn.Linear(6, 3)
        self.pattern, self.criterion = pattern, criterion

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> Any:
        if self.pattern == "per_time_step":
            return self.body(x).view(-1, 4, 3)
        if self.pattern == "two_heads":
            return self.body(x)[:, :3].tanh(), self.head(x)
        if self.pattern == "in_forward":
            logits = self.head(x)
            return logits, self.criterion(logits, y) + self.criterion(self.body(x)[:, 3:6], y)
        return self.head(x)

    def losses(self, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        out = self(x, y)
        if self.pattern == "per_time_step":
            return [self.criterion(out[:, t], y) for t in range(4)]
        if self.pattern == "two_heads":
            return [self.criterion(out[0], y), self.criterion(out[1], y)]
        if self.pattern == "in_forward":
            return [out[1]]
        return [self.criterion(F.log_softmax(out, 1), y)]


@pytest.mark.parametrize("pattern", ["per_time_step", "two_heads", "in_forward", "transformed"])
def test_every_call_of_a_registered_loss_on_the_outputs_of_a_forward_is_saved(
    pattern: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """hunt 34 F1: the calls of a registered loss module that are the step's, several for one forward, are all
    saved, in training and under ``no_grad`` in evaluation, while those of a model not captured are not."""
    criterion = nn.NLLLoss() if pattern == "transformed" else nn.CrossEntropyLoss()
    model = _Heads(pattern, criterion)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hook = ttt.capture(model, tmp_path, optimizer=opt, loss=criterion, save_config=EVERY_STEP)
    gen = torch.Generator().manual_seed(35)
    expected: dict[tuple[Mode, int], list[float]] = {}
    calls = {"per_time_step": 4, "two_heads": 2, "in_forward": 2, "transformed": 1}[pattern]
    with caplog.at_level(logging.WARNING, logger="tensortap"):
        for s in range(2):
            model.train()
            x, y = _batch(gen)
            opt.zero_grad()
            losses = model.losses(x, y)
            sum(losses).backward()
            opt.step()
            expected[Mode.TRAIN, s] = [v.item() for v in losses]
            model.eval()
            with torch.no_grad():
                expected[Mode.EVAL, s] = [v.item() for v in model.losses(*_batch(gen))]
    hook.close()
    trial = _trial(tmp_path)
    saved = _saved_losses(trial, f"losses/{type(criterion).__name__}")
    if pattern == "in_forward":  # the calls themselves, summed in forward
        assert {k: len(v) for k, v in saved.items()} == {k: calls for k in expected}
        saved = {k: [sum(v)] for k, v in saved.items()}
    assert {k: len(v) for k, v in saved.items()} == {k: len(v) for k, v in expected.items()}
    for key, values in expected.items():
        np.testing.assert_allclose(saved[key], values, rtol=1e-6, err_msg=str(key))
    assert not [r for r in caplog.records if "not saved" in r.getMessage()]


@pytest.mark.parametrize("registered", ["G and D", "G"])
def test_a_gan_s_losses_of_one_registered_criterion_are_all_saved(
    registered: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """hunt 34 F1: dcgan's criterion registered: D on real, D on ``fake.detach()``, G through D, each saved in
    the iteration's step, whether D is registered (a forward before each call) or not (G's loss is told by its
    graph, which leads to G's parameters)."""
    net_g, net_d = Generator(), Discriminator()
    opt_d = torch.optim.Adam(net_d.parameters(), lr=2e-4)
    opt_g = torch.optim.Adam(net_g.parameters(), lr=2e-4)
    criterion = nn.BCELoss()
    hook = ttt.Hook(tmp_path, save_config=EVERY_STEP, include_collections=["losses"])
    hook.register_module(net_g, name="G")
    hook.attach_optimizer(opt_g)
    if registered == "G and D":
        hook.register_module(net_d, name="D")
        hook.attach_optimizer(opt_d)
    hook.register_loss(criterion)
    gen = torch.Generator().manual_seed(36)
    expected = {}
    with caplog.at_level(logging.WARNING, logger="tensortap"):
        for s in range(3):
            net_d.zero_grad()
            err_d_real = criterion(net_d(torch.randn(6, 4, generator=gen)), torch.ones(6))
            err_d_real.backward()
            fake = net_g(torch.randn(6, 3, generator=gen))
            err_d_fake = criterion(net_d(fake.detach()), torch.zeros(6))
            err_d_fake.backward()
            opt_d.step()
            net_g.zero_grad()
            err_g = criterion(net_d(fake), torch.ones(6))
            err_g.backward()
            opt_g.step()
            expected[Mode.TRAIN, s] = [err_d_real.item(), err_d_fake.item(), err_g.item()]
    hook.close()
    assert _saved_losses(_trial(tmp_path), "losses/BCELoss") == expected
    assert not [r for r in caplog.records if "not saved" in r.getMessage()]


def test_a_distillation_s_losses_of_one_registered_criterion_are_all_saved(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """hunt 34 F1: knowledge distillation with the registered criterion called twice on the student's outputs,
    against the labels and, tempered, against a frozen registered teacher's soft targets: both are the step's."""
    teacher, student = _mlp().eval(), _mlp()
    criterion = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    hook = ttt.Hook(tmp_path, save_config=EVERY_STEP, include_collections=["losses"])
    hook.register_module(student, name="student")
    hook.register_module(teacher, name="teacher")
    hook.attach_optimizer(opt)
    hook.register_loss(criterion)
    gen = torch.Generator().manual_seed(37)
    expected = {}
    with caplog.at_level(logging.WARNING, logger="tensortap"):
        for s in range(3):
            x, y = _batch(gen)
            with torch.no_grad():
                soft = F.softmax(teacher(x) / 2.0, 1)
            opt.zero_grad()
            out = student(x)
            hard_loss, soft_loss = criterion(out, y), criterion(out / 2.0, soft)
            (hard_loss + soft_loss).backward()
            opt.step()
            expected[Mode.TRAIN, s] = [hard_loss.item(), soft_loss.item()]
    hook.close()
    assert _saved_losses(_trial(tmp_path), "losses/CrossEntropyLoss") == expected
    assert not [r for r in caplog.records if "not saved" in r.getMessage()]


def test_forwards_outside_training_make_no_train_steps(tmp_path: Path) -> None:
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hook = ttt.capture(model, tmp_path, optimizer=opt, save_config=EVERY_STEP, include_collections=["outputs"])
    gen = _train(model, opt, steps=3, seed=10)
    with torch.no_grad():  # evaluation without model.eval()
        evaluated = [model(_batch(gen)[0]) for _ in range(2)]
    predicted = model(torch.randn(3, 6, generator=gen))  # a prediction after the last step, grad enabled
    hook.close()
    trial = _trial(tmp_path)
    assert trial.steps(mode=Mode.TRAIN) == [0, 1, 2]
    assert trial.steps(mode=Mode.EVAL) == [0, 1]
    assert trial.steps(mode=Mode.PREDICT) == [0]
    for s, out in enumerate(evaluated):
        np.testing.assert_array_equal(_value(trial, "outputs/Sequential", s, Mode.EVAL), out.numpy())
    np.testing.assert_array_equal(_value(trial, "outputs/Sequential", 0, Mode.PREDICT), predicted.detach().numpy())


class VAE(nn.Module):
    """pytorch/examples vae's shape: ``decode`` is called by ``forward`` and, to sample, by the script."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(6, 2)
        self.fc3 = nn.Linear(2, 6)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.fc3(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.enc(x))


def test_a_submodule_called_after_the_step_ended_is_skipped_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """vae/main.py samples with ``model.decode(z)`` after ``test()``: that call of fc3 used to go into the step
    that had ended, renaming its ``outputs/fc3`` to ``outputs/fc3:0`` and adding ``fc3:1``."""
    model = VAE()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hook = ttt.capture(model, tmp_path, optimizer=opt, save_config=EVERY_STEP, include_collections=["outputs"])
    gen = torch.Generator().manual_seed(13)
    seen: dict[Mode, list[torch.Tensor]] = {Mode.TRAIN: [], Mode.EVAL: []}
    with caplog.at_level(logging.WARNING, logger="tensortap"):
        for _ in range(2):
            model.train()
            for _ in range(2):
                opt.zero_grad()
                out = model(_batch(gen)[0])
                out.pow(2).mean().backward()
                opt.step()
                seen[Mode.TRAIN].append(out.detach())
                with torch.no_grad():
                    model.decode(torch.randn(3, 2, generator=gen))  # after the TRAIN step ended
            model.eval()
            with torch.no_grad():
                seen[Mode.EVAL].append(model(_batch(gen)[0]))
                model.decode(torch.randn(3, 2, generator=gen))  # after the EVAL step ended
    hook.close()
    trial = _trial(tmp_path)
    assert trial.steps() == list(range(6))
    for mode, outs in seen.items():
        assert trial.steps(mode=mode) == list(range(len(outs)))
        for s, out in enumerate(outs):
            assert trial.tensor_names(step=s, mode=mode) == ["outputs/VAE", "outputs/enc", "outputs/fc3"]
            np.testing.assert_array_equal(_value(trial, "outputs/fc3", s, mode), out.numpy())
    warned = [r.getMessage() for r in caplog.records if "outside a forward" in r.getMessage()]
    assert len(warned) == 1 and "submodule fc3" in warned[0] and "after step 0 ended" in warned[0]


class _Head(nn.Module):
    """A network made of a shared encoder (``enc``) and a head of its own."""

    def __init__(self, enc: nn.Module) -> None:
        super().__init__()
        self.enc = enc
        self.head = nn.Linear(3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.enc(x)))


def test_a_submodule_two_registered_models_share_saves_each_call_once_under_the_caller_s_name(
    tmp_path: Path,
) -> None:
    """hunt 42 H42-2: an encoder shared by two registered models (``A.enc is B.enc``): each call is saved once,
    under its name in the model whose forward made it, and a call of it by the loop itself (after the forwards,
    in the step) under its first name. Before, each model's hook recorded every call: ``inputs/B.enc:0`` held
    A's call and ``inputs/A.enc:1`` B's, as if each model had called ``enc`` twice."""
    shared = nn.Linear(3, 3)
    a, b = _Head(shared), _Head(shared)
    opt = torch.optim.SGD([*a.parameters(), *b.head.parameters()], lr=0.1)
    hook = ttt.Hook(tmp_path, save_config=EVERY_STEP, include_collections=["weights", "outputs", "inputs"])
    hook.register_module(a, name="A")
    hook.register_module(b, name="B")
    hook.attach_optimizer(opt)
    xs = {"A.enc:0": torch.ones(2, 3), "B.enc": torch.full((2, 3), 2.0), "A.enc:1": torch.full((2, 3), 3.0)}
    opt.zero_grad()
    loss = a(xs["A.enc:0"]).mean() + b(xs["B.enc"]).mean()
    with torch.no_grad():
        shared(xs["A.enc:1"])  # the loop's own call
        outs = {name: F.linear(x, shared.weight, shared.bias) for name, x in xs.items()}
    loss.backward()
    opt.step()
    hook.close()
    trial = _trial(tmp_path)
    inputs = {"inputs/A", "inputs/A.head", "inputs/B", "inputs/B.head", *(f"inputs/{name}" for name in xs)}
    assert set(trial.tensor_names(collection="inputs")) == inputs
    for name, x in xs.items():
        np.testing.assert_array_equal(_value(trial, f"inputs/{name}", 0), x.numpy())
        np.testing.assert_array_equal(_value(trial, f"outputs/{name}", 0), outs[name].numpy())
    assert "B.enc.weight" not in trial.tensor_names()  # a shared parameter: once, under its first name


def test_a_registered_submodule_of_a_registered_model_saves_each_call_once(tmp_path: Path) -> None:
    """hunt 42 H42-2 (c16): a model and its own encoder both registered (``enc``): a call inside the model's
    forward is the model's (``outputs/0.0``), a call of the encoder by the loop is the encoder's (``outputs/enc``,
    ``outputs/enc.0``). Before, each call of the encoder's parts was saved twice, as ``outputs/0.0`` and
    ``outputs/enc.0``, and the encoder called by the loop also as ``outputs/0``."""
    model = nn.Sequential(nn.Sequential(nn.Linear(3, 3), nn.Tanh()), nn.Linear(3, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hook = ttt.Hook(tmp_path, save_config=EVERY_STEP, include_collections=["outputs"])
    hook.register_module(model)
    hook.register_module(model[0], name="enc")
    hook.attach_optimizer(opt)
    x, z = torch.ones(2, 3), torch.full((2, 3), 2.0)
    opt.zero_grad()
    out = model(x)
    with torch.no_grad():
        encoded = model[0](z)  # the loop's own call
        linear = {name: F.linear(t, model[0][0].weight, model[0][0].bias) for name, t in [("0.0", x), ("enc.0", z)]}
    out.mean().backward()
    opt.step()
    hook.close()
    trial = _trial(tmp_path)
    names = ["outputs/0", "outputs/0.0", "outputs/0.1", "outputs/1", "outputs/Sequential"]
    assert trial.tensor_names() == [*names, "outputs/enc", "outputs/enc.0", "outputs/enc.1"]
    for name, want in linear.items():
        np.testing.assert_array_equal(_value(trial, f"outputs/{name}", 0), want.numpy())
    np.testing.assert_array_equal(_value(trial, "outputs/enc", 0), encoded.numpy())
    np.testing.assert_array_equal(_value(trial, "outputs/Sequential", 0), out.detach().numpy())


def test_a_container_whose_networks_are_called_directly_warns_once_how_to_capture_them(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A GAN kept in one ``nn.Module`` without a forward of its own, registered whole, its networks called
    directly (``gan.G(z)``): no call is in a forward of the registered module, so no output is captured.
    That gave one warning per layer (eight here) suggesting ``model.decode(z)`` sampling; now one, saying
    to register each network."""
    gan = nn.Module()
    gan.G, gan.D = nn.Sequential(nn.Linear(4, 6), nn.ReLU()), nn.Sequential(nn.Linear(6, 1), nn.Sigmoid())
    opt_d, opt_g = torch.optim.SGD(gan.D.parameters(), lr=0.1), torch.optim.SGD(gan.G.parameters(), lr=0.1)
    hook = ttt.Hook(tmp_path, save_config=EVERY_STEP, include_collections=["weights", "outputs"])
    hook.register_module(gan)
    hook.attach_optimizer(opt_d)
    hook.attach_optimizer(opt_g)
    gen = torch.Generator().manual_seed(3)
    with caplog.at_level(logging.WARNING, logger="tensortap"):
        for _ in range(2):
            fake = gan.G(torch.randn(5, 4, generator=gen))
            opt_d.zero_grad()
            gan.D(fake.detach()).mean().backward()
            opt_d.step()
            opt_g.zero_grad()
            (-gan.D(fake)).mean().backward()
            opt_g.step()
    hook.close()
    trial = _trial(tmp_path)
    assert trial.steps() == [0, 1] and not [n for n in trial.tensor_names() if n.startswith("outputs/")]
    np.testing.assert_array_equal(trial.tensor("G.0.weight").value(1), gan.G[0].weight.detach().numpy())
    warned = [r.getMessage() for r in caplog.records if "submodule" in r.getMessage()]
    assert len(warned) == 1 and 'hook.register_module(model.G, name="G")' in warned[0], warned


def test_a_registered_module_whose_forward_is_called_directly_is_named_in_the_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """pytorch/examples' mnist_forward_forward registers each layer and calls ``layer.forward(x)``: PyTorch runs
    no module hook, so no output is captured. The warning blamed "a container of networks" and said to register
    the networks, which were registered (session 50's hunt 24, F1); it names the module whose forward was called."""

    class Layer(nn.Linear):
        def __init__(self) -> None:
            super().__init__(4, 4)
            self.relu = nn.ReLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.relu(super().forward(x))

    layers = [Layer(), Layer()]
    hook = ttt.Hook(tmp_path, save_config=EVERY_STEP, include_collections=["weights", "outputs"])
    for i, layer in enumerate(layers):
        hook.register_module(layer, name=f"L{i}")
    opt = torch.optim.SGD([p for layer in layers for p in layer.parameters()], lr=0.1)
    with caplog.at_level(logging.WARNING, logger="tensortap"):
        for _ in range(2):
            x = torch.randn(3, 4)
            opt.zero_grad()
            layers[1].forward(layers[0].forward(x)).pow(2).mean().backward()
            opt.step()
    hook.close()
    trial = _trial(tmp_path)
    assert trial.steps() and not [n for n in trial.tensor_names() if n.startswith("outputs/")]
    warned = [r.getMessage() for r in caplog.records if "submodule" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith("tensortap: submodule L0.relu was called in L0.forward(...)"), (
        warned
    )
    assert "called as L0(...)" in warned[0] and "container" not in warned[0]


class Checkpointed(nn.Module):
    """A block under activation checkpointing (``torch.utils.checkpoint``, as HF's
    ``gradient_checkpointing_enable()`` wraps each layer): its forward runs again during backward."""

    def __init__(self, reentrant: bool) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(6, 5), nn.Sequential(nn.Linear(5, 5), nn.Tanh()), nn.Linear(5, 3)
        self.reentrant = reentrant
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torch.utils.checkpoint import checkpoint

        h = checkpoint(self.b, self.a(x), use_reentrant=self.reentrant)
        self.seen.append(h.detach().clone())
        return self.c(h)


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_recomputation_is_not_captured_again(reentrant: bool, tmp_path: Path) -> None:
    """The recomputation in backward was captured as a second call: ``outputs/b`` became ``outputs/b:0`` and
    ``outputs/b:1`` (and with the reentrant variant a second forward of the whole block)."""
    model = Checkpointed(reentrant)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hook = ttt.capture(model, tmp_path, optimizer=opt, save_config=EVERY_STEP, include_collections=["outputs"])
    _train(model, opt, steps=2, seed=5)
    hook.close()
    trial = _trial(tmp_path)
    assert trial.steps() == [0, 1]
    names = ["outputs/Checkpointed", "outputs/a", "outputs/b", "outputs/b.0", "outputs/b.1", "outputs/c"]
    for s in (0, 1):
        assert trial.tensor_names(step=s) == names
        np.testing.assert_array_equal(_value(trial, "outputs/b", s), model.seen[s].numpy())


def test_training_in_eval_mode_warns_once_how_to_get_train_steps(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Fine-tuning with ``model.eval()`` (frozen BatchNorm) and no ``set_mode``: the steps are EVAL steps, as
    documented, but that used to happen without a word although ``optimizer.step()`` ran in each of them."""
    model = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Linear(5, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hook = ttt.capture(model, tmp_path, optimizer=opt, save_config=EVERY_STEP, include_collections=["losses"])
    gen = torch.Generator().manual_seed(11)
    model.eval()
    losses = []
    with caplog.at_level(logging.WARNING, logger="tensortap"):
        for i in range(4):
            if i == 2:
                hook.set_mode("train")  # what the warning says to do
            x, y = _batch(gen)
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    hook.close()
    trial = _trial(tmp_path)
    assert trial.steps() == [0, 1, 2, 3]
    assert trial.steps(mode=Mode.EVAL) == trial.steps(mode=Mode.TRAIN) == [0, 1]
    got = [float(_value(trial, "losses/loss", s, m)) for m in (Mode.EVAL, Mode.TRAIN) for s in trial.steps(mode=m)]
    assert got == losses
    warned = [r.getMessage() for r in caplog.records if "recorded as EVAL" in r.getMessage()]
    assert len(warned) == 1 and 'hook.set_mode("train")' in warned[0] and "step 0" in warned[0]


@pytest.mark.parametrize("frozen", [False, True])
def test_optimizer_steps_no_forward_was_seen_in_end_their_steps_whatever_the_mode(
    tmp_path: Path, frozen: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """Forwards the hook does not see (``model.forward(x)`` called directly; Fabric's redirection did the same),
    an optimizer attached: a value given after the validation, in ``eval()``, opened an EVAL step, and every
    later optimizer step merged into it (a step ends at ``optimizer.step()`` in TRAIN only), holding three
    iterations' losses and the last one's gradients (hunt 28). Now that step takes the mode of the training
    that comes first in it, as of a first forward; with the model in ``eval()`` throughout (frozen BatchNorm),
    each optimizer step still ends an EVAL step of its own, with the warning."""
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hook = ttt.capture(model, tmp_path, optimizer=opt, save_config=EVERY_STEP)
    gen = torch.Generator().manual_seed(6)
    expected, val_losses = [], []
    with caplog.at_level(logging.WARNING, logger="tensortap"):
        for _ in range(2):
            model.train(not frozen)
            for _ in range(3):
                x, y = _batch(gen)
                opt.zero_grad()
                loss = F.cross_entropy(model.forward(x), y)
                loss.backward()
                expected.append({"losses/loss": loss, "gradients/0.weight": model[0].weight.grad.clone()})
                opt.step()
            model.eval()
            with torch.no_grad():
                x, y = _batch(gen)
                val_losses.append(F.cross_entropy(model.forward(x), y).item())
            hook.save_scalar("val_loss", val_losses[-1])
    hook.close()
    trial = _trial(tmp_path)
    mode = Mode.EVAL if frozen else Mode.TRAIN
    _compare_steps(trial, expected, mode, first=frozen)
    if frozen:  # the last value given makes the last step, in that mode too
        assert "recorded as EVAL" in caplog.text
        assert trial.steps(mode=Mode.EVAL) == list(range(7)) and trial.steps(mode=Mode.TRAIN) == []
        given = {3: val_losses[0], 6: val_losses[1]}  # after optimizer.step(): the next step's
    else:
        assert "recorded as EVAL" not in caplog.text
        assert trial.steps(mode=Mode.EVAL) == [0]
        given = {3: val_losses[0]}  # the step it opened became the next training step
        assert float(_value(trial, "metrics/val_loss", 0, Mode.EVAL)) == val_losses[1]
    for s, value in given.items():
        assert float(_value(trial, "metrics/val_loss", s, mode)) == value


class CellLoop(nn.Module):
    """An LSTMCell called once per time step in a Python loop (word_language_model style)."""

    def __init__(self) -> None:
        super().__init__()
        self.cell = nn.LSTMCell(3, 4)
        self.head = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = c = torch.zeros(x.shape[1], 4)
        for t in range(x.shape[0]):
            h, c = self.cell(x[t], (h, c))
        return self.head(h)


def test_a_cell_called_per_time_step_gives_a_bounded_number_of_names(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = CellLoop()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(50, 2, 3)
    expected = []
    with caplog.at_level(logging.WARNING, logger="tensortap"):
        hook = ttt.capture(model, tmp_path, optimizer=opt, save_config=EVERY_STEP, include_collections=["outputs"])
        for _ in range(2):
            cell = copy.deepcopy(model.cell)  # a copy records nothing
            with torch.no_grad():  # what the cell returns at each time step, before this step's update
                h = c = torch.zeros(2, 4)
                states = []
                for t in range(50):
                    h, c = cell(x[t], (h, c))
                    states.append((h.clone(), c.clone()))
            expected.append(states)
            opt.zero_grad()
            model(x).sum().backward()
            opt.step()
        hook.close()
    trial = _trial(tmp_path)
    max_calls = hook.session.max_calls
    calls = {n.split("/")[1] for n in trial.tensor_names(regex="^outputs/cell")}
    assert calls == {f"cell:{i}" for i in range(max_calls)} | {"cell:49"}  # the first calls and the last
    for s in range(2):
        for t in [*range(max_calls), 49]:
            np.testing.assert_allclose(_value(trial, f"outputs/cell:{t}/0", s), expected[s][t][0].numpy(), rtol=1e-6)
            np.testing.assert_allclose(_value(trial, f"outputs/cell:{t}/1", s), expected[s][t][1].numpy(), rtol=1e-6)
    assert len([r for r in caplog.records if "outputs/cell" in r.getMessage()]) == 1


def test_clipping_schedulers_set_to_none_and_accumulation(tmp_path: Path) -> None:
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    hook = ttt.capture(
        model, tmp_path, optimizer=opt, save_config=EVERY_STEP, include_collections=["gradients", "metrics"]
    )
    gen = torch.Generator().manual_seed(11)
    seen = []
    for _ in range(3):
        hook.save_scalar("lr", sched.get_last_lr()[0])
        opt.zero_grad(set_to_none=True)
        for _ in range(2):
            x, y = _batch(gen)
            (F.cross_entropy(model(x), y) / 2).backward()
        nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.05)
        seen.append((sched.get_last_lr()[0], model[0].weight.grad.detach().clone()))
        opt.step()
        sched.step()
    hook.close()
    trial = _trial(tmp_path)
    assert trial.steps() == [0, 1, 2]
    for s, (lr, grad) in enumerate(seen):
        assert float(_value(trial, "metrics/lr", s)) == lr
        np.testing.assert_array_equal(_value(trial, "gradients/0.weight", s), grad.numpy())  # clipped
    assert [float(_value(trial, "metrics/lr", s)) for s in range(3)] == [0.5, 0.25, 0.125]


class _WordModel(nn.Module):
    """pytorch/examples word_language_model's RNNModel, tiny: ``(log-probabilities, hidden)``."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Embedding(12, 4)
        self.rnn = nn.LSTM(4, 5, 2)
        self.decoder = nn.Linear(5, 12)

    def forward(self, tokens: torch.Tensor, hidden: Any) -> tuple[torch.Tensor, Any]:
        output, hidden = self.rnn(self.encoder(tokens), hidden)
        return F.log_softmax(self.decoder(output).view(-1, 12), dim=1), hidden


@pytest.mark.parametrize("zeroing", ["set_to_none", "in_place"])
def test_a_manual_update_without_an_optimizer_saves_the_gradients_it_applied(tmp_path: Path, zeroing: str) -> None:
    """word_language_model's loop: ``model.zero_grad()``, a forward on the detached hidden state, NLLLoss,
    ``clip_grad_norm_``, then ``p.data.add_(p.grad, alpha=-lr)``, no optimizer. The gradients saved at each
    step are those the update applied, clipped (they were the backward's, before clipping). A loop that
    zeroes them in place after its update (``p.grad.zero_()``, here without clipping) has them too."""
    torch.manual_seed(0)
    model = _WordModel()
    gen = torch.Generator().manual_seed(5)
    data = torch.randint(0, 12, (13, 3), generator=gen)
    seen = []
    with ttt.capture(model, tmp_path, save_config=EVERY_STEP, include_collections=["gradients", "losses"]):
        hidden = (torch.zeros(2, 3, 5), torch.zeros(2, 3, 5))
        for i in range(0, 12, 4):
            hidden = tuple(h.detach() for h in hidden)
            if zeroing == "set_to_none":
                model.zero_grad()
            output, hidden = model(data[i : i + 4], hidden)
            loss = F.nll_loss(output, data[i + 1 : i + 5].reshape(-1))
            loss.backward()
            if zeroing == "set_to_none":
                norm = nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.1)
                assert norm > 0.1  # the clipping changes the gradients
            seen.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}))
            for p in model.parameters():
                p.data.add_(p.grad, alpha=-1.0)
                if zeroing == "in_place":
                    p.grad.zero_()
    trial = _trial(tmp_path)
    assert trial.steps() == [0, 1, 2]
    for step, (loss, grads) in enumerate(seen):
        assert float(_value(trial, "losses/loss", step)) == pytest.approx(loss)
        for name, grad in grads.items():
            np.testing.assert_array_equal(_value(trial, f"gradients/{name}", step), grad.numpy(), err_msg=name)


class _CharRNN(nn.Module):
    """The char_rnn tutorials' network: called once per character, on the hidden state it returned."""

    def __init__(self) -> None:
        super().__init__()
        self.cell = nn.RNNCell(5, 6)
        self.out = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.cell(x, hidden)
        return F.log_softmax(self.out(hidden), dim=1), hidden


_SPLIT = "the model was called several times before one backward"


@pytest.mark.parametrize("loop", ["per_character", "explicit_steps", "optimizer", "one_forward"])
def test_a_model_called_once_per_character_before_one_backward_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, loop: str
) -> None:
    """hunt 38 H38-2: pytorch/tutorials char_rnn_generation: the RNN called once per character, the losses
    summed, one backward per word, ``p.data.add_(p.grad.data, alpha=-lr)``, no optimizer. A step is one forward
    there: each word is a PREDICT step per character but the last and one TRAIN step, its per-character losses
    in the PREDICT steps. Before, without a word; now one warning names the step and both remedies, which give
    one TRAIN step per word with each character's loss. A loop of one forward per backward is not warned about."""
    torch.manual_seed(0)
    model = _CharRNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.05) if loop == "optimizer" else None
    criterion = nn.NLLLoss()
    gen = torch.Generator().manual_seed(3)
    words = [torch.randn(n, 1, 5, generator=gen) for n in (3, 2, 4)]
    seen = []
    with caplog.at_level(logging.WARNING, logger="tensortap"):
        hook = ttt.capture(
            model,
            tmp_path,
            optimizer=opt,
            loss=criterion,
            save_config=EVERY_STEP,
            include_collections=["losses"],
            explicit_steps=loop == "explicit_steps",
        )
        for word in words:
            model.zero_grad()
            hidden = torch.zeros(1, 6)
            chars = word[-1:] if loop == "one_forward" else word
            losses = []
            for char in chars:
                output, hidden = model(char, hidden)
                losses.append(criterion(output, torch.tensor([1])))
            sum(losses).backward()
            seen.append([loss.item() for loss in losses])
            if opt is not None:
                opt.step()
            else:
                for p in model.parameters():
                    p.data.add_(p.grad.data, alpha=-0.05)
            if loop == "explicit_steps":
                hook.finish_step()
        hook.close()
    warned = [r.getMessage() for r in caplog.records if _SPLIT in r.getMessage()]
    trial = _trial(tmp_path)
    if loop == "per_character":
        assert len(warned) == 1
        assert "a backward at step 2 went through the outputs of a forward of _CharRNN recorded as step 1" in warned[0]
        assert "hook.attach_optimizer" in warned[0] and "explicit_steps=True" in warned[0]
        assert trial.steps(mode=Mode.PREDICT) == [0, 1, 2, 3, 4, 5]  # unchanged: a step is one forward
        return
    assert warned == []
    assert trial.modes() == [Mode.TRAIN]
    assert trial.steps() == [0, 1, 2]
    for step, losses in enumerate(seen):
        names = [f"losses/NLLLoss:{i}" for i in range(len(losses))] if len(losses) > 1 else ["losses/NLLLoss"]
        assert [float(_value(trial, name, step)) for name in names] == pytest.approx(losses)


class _ForwardForwardLayer(nn.Linear):
    """A layer of pytorch/examples' mnist_forward_forward: trained by itself, with its own optimizer and loss."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__(n_in, n_out)
        self.opt = torch.optim.Adam(self.parameters(), lr=0.03)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(F.linear(x / (x.norm(2, 1, keepdim=True) + 1e-4), self.weight, self.bias))

    def fit(
        self, x_pos: torch.Tensor, x_neg: torch.Tensor, seen: list[Any], finish: Callable[[], None] | None = None
    ) -> Any:
        """Three updates on the goodness loss (``finish()`` after each, if given); the gradients each applied,
        appended to ``seen``."""
        for _ in range(3):
            g_pos, g_neg = self.forward(x_pos).pow(2).mean(1), self.forward(x_neg).pow(2).mean(1)
            loss = torch.log1p(torch.exp(torch.cat([2.0 - g_pos, g_neg - 2.0]))).mean()
            self.opt.zero_grad()
            loss.backward()
            seen.append({name: p.grad.clone() for name, p in self.named_parameters()})
            self.opt.step()
            if finish is not None:
                finish()
        return self.forward(x_pos).detach(), self.forward(x_neg).detach()


@pytest.mark.parametrize("explicit", [False, True])
def test_optimizers_taking_turns_merge_steps_with_a_warning_or_step_explicitly(
    tmp_path: Path, explicit: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """mnist_forward_forward trains one layer, each with its own optimizer, after the other. A step ends when
    every attached optimizer has stepped: the first layer's updates and the second's first are one step,
    the second's others the last, which never ends: a warning at close says so, naming the optimizers.
    With explicit_steps and finish_step() after each update, each update is a step with the gradients
    it applied, and nothing is warned about."""
    torch.manual_seed(0)
    layers = [_ForwardForwardLayer(8, 6), _ForwardForwardLayer(6, 5)]
    hook = ttt.Hook(tmp_path, save_config=EVERY_STEP, include_collections=["gradients"], explicit_steps=explicit)
    for i, layer in enumerate(layers):
        hook.register_module(layer, name=f"layer{i}")
        hook.attach_optimizer(layer.opt)
    seen: list[Any] = []
    h_pos, h_neg = torch.randn(10, 8), torch.randn(10, 8)
    for layer in layers:
        h_pos, h_neg = layer.fit(h_pos, h_neg, seen, hook.finish_step if explicit else None)
    hook.close()
    trial = _trial(tmp_path)
    warned = "TRAIN step 1 did not end, and is recorded at close(): optimizer layer1 (2x) stepped in it and layer0"
    if not explicit:
        assert trial.steps() == [0, 1]
        assert caplog.text.count(warned) == 1, caplog.text
        return
    assert "did not end" not in caplog.text
    assert trial.steps() == list(range(6))
    for step, grads in enumerate(seen):
        prefix = "layer0" if step < 3 else "layer1"
        for name, grad in grads.items():
            np.testing.assert_array_equal(_value(trial, f"gradients/{prefix}.{name}", step), grad.numpy())


def test_a_module_holding_its_networks_in_a_list_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """mnist_forward_forward's Net keeps its layers in a Python list: they are not its submodules, and
    ``capture(net, ...)`` would capture nothing of the training, silently. One warning says why."""
    torch.manual_seed(0)
    net = nn.Module()
    net.layers = [_ForwardForwardLayer(8, 6), _ForwardForwardLayer(6, 5)]
    with ttt.capture(net, tmp_path, save_config=EVERY_STEP):
        h_pos, h_neg = torch.randn(10, 8), torch.randn(10, 8)
        for layer in net.layers:
            h_pos, h_neg = layer.fit(h_pos, h_neg, [])
    assert _trial(tmp_path).steps() == []
    assert caplog.text.count("register_module: Module has no parameters and no submodules") == 1, caplog.text


class Nest(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def forward(self, x: torch.Tensor) -> Any:
        return naming_parity.structures(x[:, :2], x[:, 2:4], x[:, 4:])[self.kind]


class Nests(nn.Module):
    """One submodule per naming-parity case, named after it; returns nothing itself."""

    def __init__(self) -> None:
        super().__init__()
        for kind in naming_parity.EXPECTED:
            self.add_module(kind, Nest(kind))

    def forward(self, x: torch.Tensor) -> None:
        for nest in self.children():
            nest(x)


def test_naming_parity_of_nested_outputs(tmp_path: Path) -> None:
    """The torch side of the naming-parity test (tests/capture/naming_parity.py; Keras: test_keras.py)."""
    model = Nests()
    x = torch.randn(4, 6)
    hook = ttt.Hook(tmp_path, save_config=EVERY_STEP, include_collections=["outputs"])
    hook.register_module(model)
    with torch.no_grad():
        model(x)
    hook.close()
    trial = _trial(tmp_path)
    expected = {name for names in naming_parity.EXPECTED.values() for name in names}
    assert set(trial.tensor_names()) == expected
    np.testing.assert_array_equal(_value(trial, "outputs/deep/x/z/1", 0, Mode.EVAL), x[:, 4:].numpy())
    np.testing.assert_array_equal(_value(trial, "outputs/dict/c", 0, Mode.EVAL), x[:, 2:4].numpy())


class Shapes(nn.Module):
    """Submodules whose outputs are a 1-tuple, a dict, a list and a nested structure."""

    class One(nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
            return (x + 1,)

    class Dict(nn.Module):
        def forward(self, x: torch.Tensor) -> dict[str, Any]:
            return {"h": x * 2, "c": (x * 3,)}

    class Pair(nn.Module):
        def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
            return [x - 1, x - 2]

    class Nested(nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[Any, ...]:
            return (x, (x * 5, x * 6), None)

    def __init__(self) -> None:
        super().__init__()
        self.one, self.dict, self.pair, self.nested = self.One(), self.Dict(), self.Pair(), self.Nested()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.one(x)[0]
        d = self.dict(a)
        p = self.pair(d["h"])
        n = self.nested(p[1])
        return n[1][1] + self.one(x)[0]


def test_naming_of_repeated_calls_and_inputs(tmp_path: Path) -> None:
    """docs/format.md, "Tensor names": repeated calls, positional inputs, nesting inside a real forward."""
    model = Shapes()
    x = torch.arange(3.0)
    hook = ttt.capture(model, tmp_path, save_config=EVERY_STEP, include_collections=["outputs", "inputs"])
    model(x)
    hook.close()
    trial = _trial(tmp_path)
    assert trial.tensor_names(collection="outputs") == [
        "outputs/Shapes",
        "outputs/dict/c",
        "outputs/dict/h",
        "outputs/nested/0",
        "outputs/nested/1/0",
        "outputs/nested/1/1",
        "outputs/one:0",
        "outputs/one:1",
        "outputs/pair/0",
        "outputs/pair/1",
    ]
    assert "inputs/dict" in trial.tensor_names(collection="inputs")  # the positional (x,) is one tensor
    np.testing.assert_array_equal(_value(trial, "outputs/dict/c", 0), (x + 1).numpy() * 3)
    np.testing.assert_array_equal(_value(trial, "outputs/nested/1/1", 0), ((x + 1) * 2 - 2).numpy() * 6)


class Attend(nn.Module):
    """Keyword arguments as real code passes them: ``model(**batch)`` (Hugging Face) and
    ``attn(q, k, v, key_padding_mask=mask)``."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 1, batch_first=True)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.attn(x, x, x, key_padding_mask=mask, need_weights=False)[0]


def test_keyword_inputs_are_captured_next_to_positional_ones(tmp_path: Path) -> None:
    """Forward hooks without ``with_kwargs`` never saw keyword arguments: ``model(**inputs)`` gave no
    ``inputs/<Model>`` at all, ``attn(q, k, v, key_padding_mask=mask)`` lost the mask, without a warning."""
    model = Attend()
    hook = ttt.capture(model, tmp_path, save_config=EVERY_STEP, include_collections=["inputs"])
    gen = torch.Generator().manual_seed(14)
    x = torch.randn(2, 3, 4, generator=gen)
    mask = torch.tensor([[False, False, True], [False, False, False]])
    with torch.no_grad():
        model(**{"x": x, "mask": mask})  # EVAL step 0: keyword arguments only
        model(x, mask=mask)  # EVAL step 1: positional names as before
    hook.close()
    trial = _trial(tmp_path)
    assert trial.tensor_names(step=0, mode=Mode.EVAL) == [
        "inputs/Attend/mask",
        "inputs/Attend/x",
        "inputs/attn/0",
        "inputs/attn/1",
        "inputs/attn/2",
        "inputs/attn/key_padding_mask",
    ]
    assert trial.tensor_names(step=1, mode=Mode.EVAL) == [
        "inputs/Attend",
        "inputs/Attend/mask",
        "inputs/attn/0",
        "inputs/attn/1",
        "inputs/attn/2",
        "inputs/attn/key_padding_mask",
    ]
    for name, value, s in [("inputs/Attend/x", x, 0), ("inputs/Attend", x, 1), ("inputs/attn/2", x, 1)]:
        np.testing.assert_array_equal(_value(trial, name, s, Mode.EVAL), value.numpy(), err_msg=name)
    for s in range(2):
        for name in ("inputs/Attend/mask", "inputs/attn/key_padding_mask"):
            np.testing.assert_array_equal(_value(trial, name, s, Mode.EVAL), mask.numpy(), err_msg=name)


@dataclasses.dataclass
class Heads:
    logits: torch.Tensor
    value: torch.Tensor


class Policy(nn.Module):
    """An actor-critic head returning a dataclass and a ``torch.distributions`` object (reinforce-style)."""

    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pi, self.v = nn.Linear(6, 3), nn.Linear(6, 1)

        def forward(self, x: torch.Tensor) -> tuple[Heads, torch.distributions.Categorical]:
            logits = self.pi(x)
            return Heads(logits, self.v(x)), torch.distributions.Categorical(logits=logits)

    def __init__(self) -> None:
        super().__init__()
        self.head = self.Head()

    def forward(self, x: torch.Tensor) -> tuple[Heads, torch.distributions.Categorical]:
        return self.head(x)


def test_dataclass_outputs_are_named_by_fields_and_other_objects_warned_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Outputs that are no tensor, list, tuple or dict (a dataclass, a ``Categorical``) gave nothing and no
    warning; a dataclass is now named by its fields, anything else is named in one warning per module."""
    model = Policy()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hook = ttt.capture(model, tmp_path, optimizer=opt, save_config=EVERY_STEP, include_collections=["outputs"])
    gen = torch.Generator().manual_seed(15)
    seen = []
    with caplog.at_level(logging.WARNING, logger="tensortap"):
        for _ in range(2):
            heads, dist = model(_batch(gen)[0])
            opt.zero_grad()
            (-dist.log_prob(dist.sample()).mean() + heads.value.pow(2).mean()).backward()
            opt.step()
            seen.append(heads)
    hook.close()
    trial = _trial(tmp_path)
    assert trial.steps() == [0, 1]
    for s, heads in enumerate(seen):
        for base in ("outputs/Policy", "outputs/head"):
            for field in ("logits", "value"):
                value = getattr(heads, field).detach().numpy()
                np.testing.assert_array_equal(_value(trial, f"{base}/0/{field}", s), value)
    warned = sorted(r.getMessage() for r in caplog.records if "not captured" in r.getMessage())
    assert len(warned) == 2  # once per module, not per step
    assert warned[0].startswith("tensortap: outputs/Policy holds Categorical")
    assert warned[1].startswith("tensortap: outputs/head holds Categorical")


def test_two_hooks_each_get_their_own_model_loss_and_torch_is_restored(tmp_path: Path) -> None:
    backward = torch.autograd.backward
    scale = torch.amp.GradScaler.scale
    getstate = nn.Module.__getstate__
    a, b = _mlp(), _mlp()
    opt_a, opt_b = torch.optim.SGD(a.parameters(), lr=0.1), torch.optim.SGD(b.parameters(), lr=0.1)
    hook_a = ttt.capture(a, tmp_path / "a", optimizer=opt_a, save_config=EVERY_STEP)
    hook_b = ttt.capture(b, tmp_path / "b", optimizer=opt_b, save_config=EVERY_STEP)
    gen = torch.Generator().manual_seed(12)
    losses: dict[str, list[float]] = {"a": [], "b": []}
    for _ in range(2):
        for key, model, opt in (("a", a, opt_a), ("b", b, opt_b), ("b", b, opt_b)):  # b trains twice as often
            x, y = _batch(gen)
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            losses[key].append(loss.item())
    hook_a.close()
    assert torch.autograd.backward is not backward  # hook_b is still open
    hook_b.close()
    assert torch.autograd.backward is backward and torch.amp.GradScaler.scale is scale
    assert nn.Module.__getstate__ is getstate
    for key, n in (("a", 2), ("b", 4)):
        trial = _trial(tmp_path / key)
        assert trial.steps() == list(range(n))
        assert [float(_value(trial, "losses/loss", s)) for s in range(n)] == losses[key]


def _train_and_compare(
    tmp_path: Path,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    hook: ttt.Hook,
    forward: Callable[[torch.Tensor], torch.Tensor],
    params: Callable[[], dict[str, torch.Tensor]],
    steps: int = 3,
) -> tensortap.Trial:
    """Train ``steps`` steps of ``forward``, then check every step's weights, gradients and loss in the
    trial against torch's: ``params()`` names what was trained (the model's ``named_parameters()``)."""
    gen = torch.Generator().manual_seed(21)
    expected = []
    for _ in range(steps):
        hook.save_scalar("lr", 0.1)  # a value before the forward opens the step
        x, y = _batch(gen)
        opt.zero_grad()
        loss = F.cross_entropy(forward(x), y)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in params().items() if p.grad is not None}
        opt.step()
        expected.append((loss.item(), grads, {n: p.detach().clone() for n, p in params().items()}))
    hook.close()
    trial = _trial(tmp_path)
    assert trial.steps() == list(range(steps))
    for s, (loss_value, grads, weights) in enumerate(expected):
        assert float(_value(trial, "losses/loss", s)) == pytest.approx(loss_value, rel=1e-6)
        for n, w in weights.items():
            np.testing.assert_array_equal(_value(trial, n, s), w.numpy())
        for n, g in grads.items():
            np.testing.assert_array_equal(_value(trial, f"gradients/{n}", s), g.numpy())
    assert not any(n.startswith("gradients/") and n[10:] not in expected[0][1] for n in trial.tensor_names())
    return trial


def test_a_head_replaced_after_registration_is_captured(tmp_path: Path) -> None:
    """Fine-tuning: the backbone frozen and the head replaced after register_module. The new head's
    weights, gradients and outputs were missing, the replaced head's initial weights saved under its name
    every step, and the loss missing (it reached none of the parameters known at registration)."""
    model = _mlp()
    hook = ttt.Hook(
        tmp_path, save_config=EVERY_STEP, include_collections=["weights", "biases", "gradients", "losses", "outputs"]
    )
    hook.register_module(model)
    model.requires_grad_(False)
    model[2] = nn.Linear(5, 3)
    opt = torch.optim.SGD(model[2].parameters(), lr=0.1)
    hook.attach_optimizer(opt)
    trial = _train_and_compare(tmp_path, model, opt, hook, model, lambda: dict(model.named_parameters()))
    assert trial.tensor_names(collection="gradients") == ["gradients/2.bias", "gradients/2.weight"]
    assert "outputs/2" in trial.tensor_names()


@pytest.mark.parametrize("change", ["weight_norm", "prune"])
def test_a_parametrization_added_after_registration_is_captured(change: str, tmp_path: Path) -> None:
    """weight_norm after register_module replaced 0.weight by 0.parametrizations.weight.original0 and
    original1: those were missing and 0.weight kept its initial value; prune renamed 0.weight to
    0.weight_orig, which was saved as 0.weight."""
    model = _mlp()
    hook = ttt.Hook(tmp_path, save_config=EVERY_STEP)
    hook.register_module(model)
    if change == "weight_norm":
        parametrizations.weight_norm(model[0])
    else:
        prune.l1_unstructured(model[0], "weight", amount=0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hook.attach_optimizer(opt)
    trial = _train_and_compare(tmp_path, model, opt, hook, model, lambda: dict(model.named_parameters()))
    assert "0.weight" not in trial.tensor_names()


def test_a_parametrized_bias_is_a_bias(tmp_path: Path) -> None:
    """A parametrized bias (0.parametrizations.bias.original) was in the weights collection."""
    model = _mlp()
    parametrize.register_parametrization(model[0], "bias", nn.Identity())
    parametrizations.weight_norm(model[2])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hook = ttt.capture(model, tmp_path, optimizer=opt, save_config=EVERY_STEP)
    trial = _train_and_compare(tmp_path, model, opt, hook, model, lambda: dict(model.named_parameters()))
    assert trial.tensor_names(collection="biases") == ["0.parametrizations.bias.original", "2.bias"]


def test_functional_call_training_captures_the_parameters_it_ran_with(tmp_path: Path) -> None:
    """torch.func.functional_call(model, params, x) with an optimizer of ``params``: the module's own,
    never updated parameters were saved as the weights every step, with no gradients and no loss."""
    model = _mlp()
    params = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
    opt = torch.optim.SGD(params.values(), lr=0.1)
    hook = ttt.capture(model, tmp_path, optimizer=opt, save_config=EVERY_STEP)
    _train_and_compare(
        tmp_path, model, opt, hook, lambda x: torch.func.functional_call(model, params, (x,)), lambda: params
    )


def test_nested_tensors_of_the_transformer_fast_path_are_named_in_one_warning_each(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """nn.TransformerEncoder in eval() under no_grad with a padding mask runs its layers on nested
    tensors: those outputs and inputs are skipped, each named once, by a message that says so (it was
    torch's "Internal error: NestedTensorImpl doesn't support sizes. Please file an issue."); the
    model's own output, a plain tensor, is saved at each EVAL step."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True, dropout=0.0)
    model = nn.TransformerEncoder(layer, 1, enable_nested_tensor=True).eval()
    hook = ttt.capture(model, tmp_path, save_config=EVERY_STEP, include_collections=["outputs", "inputs"])
    mask = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    expected = []
    with caplog.at_level(logging.WARNING, logger="tensortap"), torch.no_grad():
        for _ in range(2):
            expected.append(model(torch.randn(2, 5, 8), src_key_padding_mask=mask))
    hook.close()
    trial = _trial(tmp_path)
    assert trial.steps(mode=Mode.EVAL) == [0, 1]
    for s, out in enumerate(expected):
        np.testing.assert_array_equal(_value(trial, "outputs/TransformerEncoder", s, Mode.EVAL), out.numpy())
    skipped = [r.getMessage() for r in caplog.records if "cannot be captured" in r.getMessage()]
    names = [m.split()[1] for m in skipped]
    assert "outputs/layers.0.linear1" in names and len(names) == len(set(names))
    assert all("a nested tensor (torch.nested" in m for m in skipped)


def test_progressive_unfreezing_saves_the_gradients_of_an_added_param_group(tmp_path: Path) -> None:
    """Fine-tuning that unfreezes a layer and adds it to the optimizer (``opt.add_param_group``) after
    attach_optimizer: the added parameters' gradients were dropped without a word."""
    model = _mlp()
    model[0].requires_grad_(False)
    opt = torch.optim.SGD(model[2].parameters(), lr=0.1)
    hook = ttt.capture(model, tmp_path, optimizer=opt, save_config=EVERY_STEP)
    model[0].requires_grad_(True)
    opt.add_param_group({"params": model[0].parameters(), "lr": 0.01})
    trial = _train_and_compare(tmp_path, model, opt, hook, model, lambda: dict(model.named_parameters()))
    assert len(trial.tensor_names(collection="gradients")) == 4


def test_a_replaced_head_still_called_is_not_merged_with_its_replacement(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The head replaced after registration, still called as a teacher in each step: its calls were
    saved as outputs/2:1 next to the new head's outputs/2:0, one name for two modules. Now the new head
    is outputs/2, and the old one is named in one warning."""
    model = _mlp()
    hook = ttt.Hook(tmp_path, save_config=EVERY_STEP, include_collections=["outputs"])
    hook.register_module(model)
    teacher, model[2] = model[2], nn.Linear(5, 3)
    opt = torch.optim.SGD(model[2].parameters(), lr=0.1)
    hook.attach_optimizer(opt)
    gen = torch.Generator().manual_seed(3)
    heads = []
    with caplog.at_level(logging.WARNING, logger="tensortap"):
        for _ in range(2):
            x, _ = _batch(gen)
            opt.zero_grad()
            out = model(x)
            with torch.no_grad():
                target = teacher(model[1](model[0](x)))
            F.mse_loss(out, target).backward()
            opt.step()
            heads.append(out.detach())
    hook.close()
    trial = _trial(tmp_path)
    assert trial.tensor_names(regex="^outputs/2") == ["outputs/2"]
    for s, out in enumerate(heads):
        np.testing.assert_array_equal(_value(trial, "outputs/2", s), out.numpy())
    warned = [r.getMessage() for r in caplog.records if "replaced or removed" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith("tensortap: submodule 2 was called at step 0")


def test_functional_call_with_generated_weights_and_no_optimizer(tmp_path: Path) -> None:
    """A hypernetwork: the registered model runs through functional_call with weights another network
    computes (tensors that are not leaves), updated by hand. The weights it ran with are saved, with the
    loss; a gradient hook on them raised inside the forward and stopped the training."""
    target, hyper = nn.Linear(4, 3), nn.Linear(2, 15)
    hook = ttt.capture(target, tmp_path, save_config=EVERY_STEP)
    gen = torch.Generator().manual_seed(5)
    expected = []
    for _ in range(2):
        w = hyper(torch.randn(2, generator=gen))
        params = {"weight": w[:12].view(3, 4), "bias": w[12:]}
        hook.save_scalar("lr", 0.1)
        loss = torch.func.functional_call(target, params, (torch.randn(5, 4, generator=gen),)).pow(2).mean()
        loss.backward()
        with torch.no_grad():
            for p in hyper.parameters():
                p -= 0.1 * p.grad
                p.grad = None
        expected.append((loss.item(), {n: t.detach().clone() for n, t in params.items()}))
    hook.close()
    trial = _trial(tmp_path)
    assert trial.steps() == [0, 1]
    for s, (loss_value, weights) in enumerate(expected):
        assert float(_value(trial, "losses/loss", s)) == pytest.approx(loss_value, rel=1e-6)
        for n, w in weights.items():
            np.testing.assert_array_equal(_value(trial, n, s), w.numpy())


@pytest.mark.parametrize("teacher", ["grad", "no_grad", "functional_student"])
def test_an_ema_teacher_run_first_by_functional_call_leaves_the_trained_weights_saved(
    tmp_path: Path, teacher: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Mean teacher: each step's first forward is ``functional_call(model, ema, x)`` (the targets), then the
    student's. The EMA tensors were saved as the model's weights every step, with no gradients and no loss
    (with gradients on); under ``no_grad`` each teacher forward was an EVAL step of its own. The student run
    by functional_call too (its trained ``params``): the same."""
    model = _mlp()
    params = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
    student = params if teacher == "functional_student" else dict(model.named_parameters())
    ema = {n: p.detach().clone() for n, p in student.items()}
    opt = torch.optim.SGD(student.values(), lr=0.1)
    hook = ttt.capture(model, tmp_path, optimizer=opt, save_config=EVERY_STEP)
    gen = torch.Generator().manual_seed(8)
    expected = []
    with caplog.at_level(logging.WARNING, logger="tensortap"):
        for _ in range(3):
            x, _ = _batch(gen)
            with torch.set_grad_enabled(teacher != "no_grad"):
                target = torch.func.functional_call(model, ema, (x,)).detach()
            opt.zero_grad()
            noisy = x + 0.1 * torch.randn(x.shape, generator=gen)
            out = torch.func.functional_call(model, params, (noisy,)) if student is params else model(noisy)
            loss = F.mse_loss(out, target)
            loss.backward()
            grads = {n: p.grad.clone() for n, p in student.items()}
            opt.step()
            with torch.no_grad():
                for n, p in student.items():
                    ema[n].mul_(0.9).add_(p, alpha=0.1)
            expected.append((loss.item(), grads, {n: p.detach().clone() for n, p in student.items()}))
    hook.close()
    trial = _trial(tmp_path)
    assert trial.modes() == [Mode.TRAIN] and trial.steps() == [0, 1, 2]
    for s, (loss_value, grads, weights) in enumerate(expected):
        assert float(_value(trial, "losses/loss", s)) == pytest.approx(loss_value, rel=1e-6)
        for n, w in weights.items():
            np.testing.assert_array_equal(_value(trial, n, s), w.numpy(), err_msg=n)
            np.testing.assert_array_equal(_value(trial, f"gradients/{n}", s), grads[n].numpy(), err_msg=n)
    assert not [r for r in caplog.records if "functional_call" in r.getMessage()]


def test_a_model_run_with_tensors_no_attached_optimizer_updates_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """functional_call(model, frozen, x) with copies no attached optimizer updates, in place of the model's
    trainable parameters (the attached optimizer trains a head on top): the copies are saved as its
    weights, without gradients. That was silent; one warning names them now."""
    model, head = _mlp(), nn.Linear(3, 3)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(head.parameters(), lr=0.1)
    hook = ttt.capture(model, tmp_path, optimizer=opt, save_config=EVERY_STEP)
    gen = torch.Generator().manual_seed(9)
    with caplog.at_level(logging.WARNING, logger="tensortap"):
        for _ in range(2):
            x, y = _batch(gen)
            opt.zero_grad()
            F.cross_entropy(head(torch.func.functional_call(model, frozen, (x,))), y).backward()
            opt.step()
    hook.close()
    trial = _trial(tmp_path)
    np.testing.assert_array_equal(_value(trial, "0.weight", 1), frozen["0.weight"].numpy())
    warned = [r.getMessage() for r in caplog.records if "no attached optimizer updates" in r.getMessage()]
    assert len(warned) == 1 and "(0.weight, 0.bias, 2.weight, ...)" in warned[0]


def test_maml_with_cloned_fast_weights_saves_the_model_and_its_meta_gradients(tmp_path: Path) -> None:
    """MAML whose fast weights start as clones (``{n: p.clone()}``): every forward runs through
    functional_call with them. The clones of the step's first forward were saved as the weights (those
    before the update: step s held step s-1's), with no gradients."""
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    hook = ttt.capture(model, tmp_path, optimizer=opt, save_config=EVERY_STEP)

    def adapted(x: torch.Tensor) -> torch.Tensor:
        fast = {n: p.clone() for n, p in model.named_parameters()}
        inner = torch.func.functional_call(model, fast, (x,)).pow(2).mean()
        grads = torch.autograd.grad(inner, list(fast.values()), create_graph=True)
        fast = {n: p - 0.1 * g for (n, p), g in zip(fast.items(), grads, strict=True)}
        return torch.func.functional_call(model, fast, (x,))

    trial = _train_and_compare(tmp_path, model, opt, hook, adapted, lambda: dict(model.named_parameters()))
    assert len(trial.tensor_names(collection="gradients")) == 4


def test_a_frozen_teacher_in_knowledge_distillation_is_in_the_training_steps(tmp_path: Path) -> None:
    """The PyTorch knowledge distillation tutorial's loop, teacher and student registered, the student's
    optimizer attached: the teacher (``eval()``, ``no_grad``) run first in each iteration opened an EVAL
    step of its own, so its outputs were in no training step and the student's validations were EVAL steps
    3 and 7 of 8. Now the teacher's forward is in the step the student's forward decides; evaluated alone
    (before and after the training) it still makes EVAL steps."""
    teacher, student = _mlp().eval(), _mlp()
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    hook = ttt.Hook(tmp_path, save_config=EVERY_STEP, include_collections=["weights", "gradients", "losses", "outputs"])
    hook.register_module(student, name="student")
    hook.register_module(teacher, name="teacher")
    hook.attach_optimizer(opt)
    gen = torch.Generator().manual_seed(13)
    evaluated, trained, validated = [], [], []

    def evaluate_teacher() -> None:
        with torch.no_grad():
            evaluated.extend(teacher(_batch(gen)[0]) for _ in range(2))

    evaluate_teacher()
    for _ in range(2):
        student.train()
        for _ in range(3):
            x, y = _batch(gen)
            opt.zero_grad()
            with torch.no_grad():
                soft = teacher(x)
            out = student(x)
            loss = 0.5 * F.kl_div(F.log_softmax(out, -1), F.softmax(soft, -1), reduction="batchmean")
            loss = loss + 0.5 * F.cross_entropy(out, y)
            loss.backward()
            grads = _grads(student, "student")
            opt.step()
            trained.append((soft, out.detach(), loss.item(), grads))
        student.eval()
        with torch.no_grad():
            validated.append(student(_batch(gen)[0]))
    evaluate_teacher()
    hook.close()
    trial = _trial(tmp_path)
    assert trial.steps(mode=Mode.TRAIN) == list(range(6))
    assert trial.steps(mode=Mode.EVAL) == list(range(6))
    for s, (soft, out, loss_value, grads) in enumerate(trained):
        np.testing.assert_array_equal(_value(trial, "outputs/teacher", s, Mode.TRAIN), soft.numpy())
        np.testing.assert_array_equal(_value(trial, "outputs/student", s, Mode.TRAIN), out.numpy())
        assert float(_value(trial, "losses/loss", s, Mode.TRAIN)) == pytest.approx(loss_value, rel=1e-6)
        for n, g in grads.items():
            np.testing.assert_array_equal(_value(trial, f"gradients/{n}", s, Mode.TRAIN), g.numpy(), err_msg=n)
    assert trial.tensor("outputs/teacher").steps(mode=Mode.EVAL) == [0, 1, 4, 5]
    assert trial.tensor("outputs/student").steps(mode=Mode.EVAL) == [2, 3]
    for s, out in zip([0, 1, 4, 5], evaluated, strict=True):
        np.testing.assert_array_equal(_value(trial, "outputs/teacher", s, Mode.EVAL), out.numpy())
    for s, out in zip([2, 3], validated, strict=True):
        np.testing.assert_array_equal(_value(trial, "outputs/student", s, Mode.EVAL), out.numpy())


class Flaky(nn.Sequential):
    """A model whose ``named_parameters()`` fails once ``broken`` is set (a capture failure at a forward)."""

    broken = False

    def named_parameters(self, *args: Any, **kwargs: Any) -> Any:
        if self.broken:
            raise RuntimeError("named_parameters failed")
        return super().named_parameters(*args, **kwargs)


def test_a_failure_to_read_the_model_at_a_forward_never_stops_the_training(tmp_path: Path) -> None:
    """The model is re-read when a saved step opens, inside its forward: a failure there disables capture
    (hook.failed) and the training goes on."""
    model = Flaky(nn.Linear(6, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hook = ttt.capture(model, tmp_path, optimizer=opt, save_config=EVERY_STEP)
    model.broken = True
    _train(model, opt, steps=2, seed=2)
    hook.close()
    assert hook.failed


def test_an_optimizer_attached_before_register_module_saves_the_gradients(tmp_path: Path) -> None:
    """attach_optimizer before register_module: no gradient was ever saved, without a word (the
    optimizer's parameters were matched to the registered ones once, when there were none)."""
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hook = ttt.Hook(tmp_path, save_config=EVERY_STEP)
    hook.attach_optimizer(opt)
    hook.register_module(model)
    trial = _train_and_compare(tmp_path, model, opt, hook, model, lambda: dict(model.named_parameters()))
    assert len(trial.tensor_names(collection="gradients")) == 4


class ActorCritic(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.actor = nn.Linear(4, 2)
        self.critic = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.actor(x), self.critic(x)


def test_optimizers_of_parts_of_one_module_name_their_losses_by_the_part(tmp_path: Path) -> None:
    """An actor-critic module with one optimizer for each head: both optimizers were named after the
    module, so the two losses were losses/ActorCritic:0 and :1, told apart by their order alone."""
    model = ActorCritic()
    actor_opt = torch.optim.SGD(model.actor.parameters(), lr=0.1)
    critic_opt = torch.optim.SGD(model.critic.parameters(), lr=0.1)
    hook = ttt.capture(model, tmp_path, optimizer=[actor_opt, critic_opt], save_config=EVERY_STEP)
    gen = torch.Generator().manual_seed(4)
    expected = []
    for _ in range(2):
        action, value = model(torch.randn(3, 4, generator=gen))
        actor_loss, critic_loss = action.pow(2).mean(), value.pow(2).mean()
        actor_opt.zero_grad()
        actor_loss.backward()
        actor_opt.step()
        critic_opt.zero_grad()
        critic_loss.backward()
        critic_opt.step()
        expected.append({"losses/actor": actor_loss.item(), "losses/critic": critic_loss.item()})
    hook.close()
    trial = _trial(tmp_path)
    assert trial.tensor_names(collection="losses") == ["losses/actor", "losses/critic"]
    for s, losses in enumerate(expected):
        assert {n: float(_value(trial, n, s)) for n in losses} == losses


def test_capturing_a_model_fsdp_never_touched_does_not_import_fsdp(tmp_path: Path) -> None:
    """Whether FSDP shards a registered model was asked by importing ``torch.distributed.fsdp``: seconds
    (17 s on a busy 2-core machine) at the first ``register_module`` of every script. No module can be
    sharded by FSDP before it is imported; a fresh interpreter shows it stays unimported."""
    script = (
        "import sys, torch, tensortap.torch as ttt\n"
        "model = torch.nn.Linear(2, 2)\n"
        "hook = ttt.capture(model, sys.argv[1])\n"
        "model(torch.ones(1, 2)).sum().backward()\n"
        "hook.close()\n"
        "print('torch.distributed.fsdp' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False"]


@contextlib.contextmanager
def _one_rank_group() -> Iterator[None]:
    """A gloo process group of this process alone (rank 0 of 1), destroyed at the end."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield
    finally:
        torch.distributed.destroy_process_group()


def test_fsdp_fully_shard_training_is_never_stopped_by_capture(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """FSDP2 (fully_shard) puts unsharded parameters in the model for each forward and frees their memory
    after it. Re-reading the model in the forward (as for functional_call) took those: the training then
    stopped in FSDP's reshard ("Trying to resize storage that is not resizable"). A sharded model is not
    re-read in its forwards; registering it warns that FSDP is not supported."""
    dist = torch.distributed
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    from torch.distributed.fsdp import fully_shard

    with _one_rank_group():
        model = _mlp()
        fully_shard(model[0])
        fully_shard(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with caplog.at_level(logging.WARNING, logger="tensortap"):
            hook = ttt.capture(model, tmp_path, optimizer=opt, save_config=EVERY_STEP)
        assert any("is sharded by FSDP" in r.getMessage() for r in caplog.records)
        _train(model, opt, steps=3, seed=6)
        hook.close()
        assert not hook.failed


def test_zero_redundancy_optimizer_state_is_saved(tmp_path: Path) -> None:
    """hunt 50 F3: a ``ZeroRedundancyOptimizer`` keeps the state of its rank's partition in the optimizer it wraps
    (``.optim``); its own ``state`` stays empty, so ``optimizer_variables`` held nothing, without a word."""
    dist = torch.distributed
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    from torch.distributed.optim import ZeroRedundancyOptimizer

    with _one_rank_group():
        model = _mlp()
        opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.Adam, lr=0.01)
        hook = ttt.capture(
            model, tmp_path, optimizer=opt, save_config=EVERY_STEP, include_collections=["optimizer_variables"]
        )
        _train(model, opt, steps=2, seed=6)
        hook.close()
    trial = _trial(tmp_path)
    names = trial.tensor_names(collection="optimizer_variables")
    assert "optimizer/0.weight/exp_avg" in names
    np.testing.assert_array_equal(
        _value(trial, "optimizer/0.weight/exp_avg", 1), opt.optim.state[model[0].weight]["exp_avg"].numpy()
    )


def test_a_lazy_module_registered_before_its_first_forward(tmp_path: Path) -> None:
    """nn.LazyLinear registered before its first forward, trained without an optimizer: register_module
    raised (a gradient hook on an uninitialized parameter). Its gradients are saved from the first step."""
    model = nn.Sequential(nn.LazyLinear(5), nn.ReLU(), nn.LazyLinear(3))
    hook = ttt.capture(model, tmp_path, save_config=EVERY_STEP)
    gen = torch.Generator().manual_seed(8)
    expected = []
    for _ in range(2):
        x, y = _batch(gen)
        F.cross_entropy(model(x), y).backward()
        expected.append({n: p.grad.clone() for n, p in model.named_parameters()})
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.1 * p.grad
                p.grad = None
    hook.close()
    trial = _trial(tmp_path)
    for s, grads in enumerate(expected):
        for n, g in grads.items():
            np.testing.assert_array_equal(_value(trial, f"gradients/{n}", s), g.numpy())


class _OutOfMemoryInBackward(torch.autograd.Function):
    """Identity whose backward raises as a CUDA allocation that fails there would."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        raise torch.OutOfMemoryError("CUDA out of memory (in backward)")


class _Flaky(nn.Module):
    """An MLP whose batch ``fail_at`` runs out of memory in its forward or in its backward."""

    def __init__(self, where: str) -> None:
        super().__init__()
        self.body, self.head = nn.Sequential(nn.Linear(6, 5), nn.ReLU()), nn.Linear(5, 3)
        self.where, self.failing = where, False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x)
        if self.failing and self.where == "forward":
            raise torch.OutOfMemoryError("CUDA out of memory (in forward)")
        if self.failing:
            h = _OutOfMemoryInBackward.apply(h)
        return self.head(h)


@pytest.mark.parametrize(("where", "through"), [("forward", ""), ("backward", ""), ("backward", "autograd.grad")])
def test_a_batch_skipped_after_an_out_of_memory_error_is_not_saved_with_the_next(
    tmp_path: Path, where: str, through: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The loop of many scripts: ``except torch.OutOfMemoryError: zero_grad(); continue``. The skipped batch's
    values went into the next step, as a second call (``outputs/head:0``, the failed batch's, beside ``:1``).
    ``autograd.grad``: a loop taking its gradients so (``p.grad = g``), whose failed step was kept likewise."""
    torch.manual_seed(0)
    model = _Flaky(where)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(1)
    done: dict[int, tuple[np.ndarray, float, np.ndarray]] = {}
    with ttt.capture(
        model,
        tmp_path,
        optimizer=opt,
        save_config=EVERY_STEP,
        include_collections=["weights", "gradients", "losses", "outputs"],
    ):
        for i in range(4):
            x, y = _batch(gen)
            model.failing = i == 1
            try:
                opt.zero_grad()
                out = model(x)
                loss = F.cross_entropy(out, y)
                if through:
                    for p, g in zip(model.parameters(), torch.autograd.grad(loss, model.parameters()), strict=True):
                        p.grad = g
                else:
                    loss.backward()
                opt.step()
            except torch.OutOfMemoryError:
                opt.zero_grad()
                continue
            done[i] = (out.detach().numpy().copy(), float(loss.detach()), model.head.weight.detach().numpy().copy())
    trial = _trial(tmp_path)
    assert trial.steps() == [0, 2, 3], "the step of the skipped batch is dropped; the others keep the loop's numbers"
    assert not [n for n in trial.tensor_names() if ":" in n], "no tensor saved as a second call"
    for step, (out, loss, weight) in done.items():
        np.testing.assert_array_equal(_value(trial, "outputs/head", step), out)
        assert float(_value(trial, "losses/loss", step)) == pytest.approx(loss)
        np.testing.assert_array_equal(_value(trial, "head.weight", step), weight)
    assert f"step 1 was interrupted by OutOfMemoryError: CUDA out of memory (in {where})" in caplog.text


def _skipping_loop(
    model: nn.Module, opt: torch.optim.Optimizer, criterion: nn.Module, how: str, accumulate: int, skip: int
) -> list[dict[str, Any]]:
    """Train on 7 batches, ``accumulate`` per optimizer step; batch ``skip`` is skipped after its forward, as real
    loops do: ``if not torch.isfinite(loss): continue`` (a NaN in it), or a loss that raises, caught. With
    ``how="amp"``, a NaN batch skipped in a loop with autocast (bfloat16) and a ``GradScaler``.

    Returns each step's trained micro-batches: their head outputs and losses."""
    scaler = torch.amp.GradScaler("cpu", enabled=how == "amp")
    gen = torch.Generator().manual_seed(2)
    steps: list[dict[str, Any]] = [{"out": [], "loss": []}]
    for i in range(7):
        x, y = _batch(gen)
        if i == skip and how in ("nan", "amp"):
            x[0, 0] = float("nan")
        if i == skip and how == "raises":
            y[0] = 99  # out of range: cross_entropy raises
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=how == "amp"):
            out = model(x)
            try:
                loss = criterion(out, y)
            except IndexError:
                continue
        if not torch.isfinite(loss):
            continue
        scaler.scale(loss / accumulate).backward()
        steps[-1]["out"].append(out.detach().float().numpy().copy())
        steps[-1]["loss"].append(loss.item())
        if len(steps[-1]["out"]) == accumulate:
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
            steps.append({"out": [], "loss": []})
    return steps[:-1]


@pytest.mark.parametrize(
    ("how", "accumulate", "skip"), [("nan", 1, 2), ("raises", 1, 2), ("nan", 2, 3), ("amp", 1, 2), ("amp", 2, 3)]
)
def test_a_batch_skipped_after_its_forward_is_not_saved_with_the_next(
    tmp_path: Path, how: str, accumulate: int, skip: int, caplog: pytest.LogCaptureFixture
) -> None:
    """The skipped batch's forward ran in the step the next batch trains: its outputs and its registered loss
    were saved there as a first call (``outputs/head:0``, ``losses/CrossEntropyLoss:0``) beside the trained
    batch's (``:1``). No backward used them: they are not saved, with a warning naming the step. With gradient
    accumulation, the step keeps its other micro-batches' (the skipped one is the second of three forwards)."""
    torch.manual_seed(0)
    model = _Flaky("nowhere")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    criterion = nn.CrossEntropyLoss()
    with ttt.capture(
        model,
        tmp_path,
        optimizer=opt,
        loss=criterion,
        save_config=EVERY_STEP,
        include_collections=["losses", "outputs"],
    ):
        done = _skipping_loop(model, opt, criterion, how, accumulate, skip)
    trial = _trial(tmp_path)
    assert trial.steps() == list(range(len(done)))
    for step, trained in enumerate(done):
        names = ["outputs/head"] if accumulate == 1 else [f"outputs/head:{k}" for k in range(accumulate)]
        for name, out in zip(names, trained["out"], strict=True):
            saved = _value(trial, name, step).astype(np.float32)
            np.testing.assert_array_equal(saved, out, err_msg=f"{name} at step {step}")
        losses = ["losses/CrossEntropyLoss"]
        losses = losses if accumulate == 1 else [f"{losses[0]}:{k}" for k in range(accumulate)]
        assert [float(_value(trial, name, step)) for name in losses] == pytest.approx(trained["loss"])
    assert len(trial.tensor_names(regex="^outputs/head")) == accumulate, trial.tensor_names(regex="^outputs/head")
    assert f"step {skip // accumulate}: a forward of _Flaky was followed by another" in caplog.text


def test_values_given_in_a_batch_skipped_after_its_forward_are_not_saved_with_the_next(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A loop that logs each batch's loss with save_scalar and the bad input of a skipped batch with save_tensor:
    the skipped batch's values went into the step of the batch trained next (its ``bad_x`` saved there, and a
    scalar given by it alone kept), silently. They are forgotten with its forward, as its outputs and its
    record_loss; the trained batch's values, given before and after its backward, are saved."""
    torch.manual_seed(0)
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(4)
    trained: list[dict[str, float]] = []
    with (
        caplog.at_level(logging.WARNING, logger="tensortap"),
        ttt.capture(model, tmp_path, optimizer=opt, save_config=EVERY_STEP, include_collections=["metrics"]) as hook,
    ):
        for i in range(4):
            x, y = _batch(gen)
            if i == 1:
                x[0, 0] = float("nan")
            loss = F.cross_entropy(model(x), y)
            hook.save_scalar("batch_loss", loss)
            if not torch.isfinite(loss):
                hook.save_tensor("bad_x", x)
                hook.save_scalar("skipped", 1.0)
                continue
            opt.zero_grad()
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 100.0)
            hook.save_scalar("grad_norm", norm)
            opt.step()
            trained.append({"batch_loss": loss.item(), "grad_norm": norm.item()})
    trial = _trial(tmp_path)
    assert trial.tensor_names() == ["metrics/batch_loss", "metrics/grad_norm"]
    assert trial.steps() == [0, 1, 2]
    for step, values in enumerate(trained):
        for name, value in values.items():
            assert float(_value(trial, f"metrics/{name}", step)) == pytest.approx(value, rel=1e-6)
    assert "values given with save_scalar/save_tensor/record_loss after it" in caplog.text


def test_a_cell_called_beyond_max_calls_in_a_skipped_batch_leaves_the_trained_batch_calls_saved(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An LSTMCell called 12 times (max_calls 8) in a batch skipped after its forward, then in the batch trained:
    the skipped forward's calls took the 8 held places, so the trained batch's calls 0-7 were not saved (only its
    last, with a warning). Its calls 0-7 and 11 are saved, equal to the cell's outputs computed from it."""
    torch.manual_seed(0)
    model = CellLoop()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(5)
    expected = []
    with (
        caplog.at_level(logging.WARNING, logger="tensortap"),
        ttt.capture(model, tmp_path, optimizer=opt, save_config=EVERY_STEP, include_collections=["outputs"]),
    ):
        for i in range(3):
            x = torch.randn(12, 2, 3, generator=gen)
            if i == 1:
                x[0, 0, 0] = float("nan")
            loss = model(x).sum()
            if not torch.isfinite(loss):
                continue
            with torch.no_grad():  # the cell's output at each time step, as the trained forward computed it
                cell, h, c = copy.deepcopy(model.cell), torch.zeros(2, 4), torch.zeros(2, 4)
                states = []
                for t in range(12):
                    h, c = cell(x[t], (h, c))
                    states.append((h, c))
            expected.append(states)
            opt.zero_grad()
            loss.backward()
            opt.step()
    trial = _trial(tmp_path)
    calls = {n.split("/")[1] for n in trial.tensor_names(regex="^outputs/cell")}
    assert calls == {f"cell:{t}" for t in range(8)} | {"cell:11"}
    for step, states in enumerate(expected):
        for t in [*range(8), 11]:
            for k in (0, 1):
                saved = _value(trial, f"outputs/cell:{t}/{k}", step)
                np.testing.assert_allclose(saved, states[t][k].numpy(), rtol=1e-6, err_msg=f"cell:{t}/{k} {step}")
    assert "were not held" not in caplog.text


def test_forwards_a_step_trains_on_together_or_not_at_all_are_kept(tmp_path: Path) -> None:
    """Two forwards one loss trains on (a siamese network), then one whose output is detached (a target
    computed with gradients on): no forward of them was a skipped batch, each call is saved. In the GAN of
    pytorch/examples' dcgan, G's forward is used only by the step's second backward: kept too."""
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(3)
    seen = []
    with ttt.capture(model, tmp_path, optimizer=opt, save_config=EVERY_STEP, include_collections=["outputs"]):
        for _ in range(2):
            (x1, _), (x2, _), (x3, _) = _batch(gen), _batch(gen), _batch(gen)
            a, b = model(x1), model(x2)
            target = model(x3).detach()
            ((a - b) ** 2 + (a - target) ** 2).mean().backward()
            opt.step()
            opt.zero_grad()
            seen.append([v.detach().numpy().copy() for v in (a, b, target)])
    trial = _trial(tmp_path)
    assert trial.tensor_names(regex="^outputs/Sequential") == [f"outputs/Sequential:{k}" for k in range(3)]
    for step, values in enumerate(seen):
        for k, value in enumerate(values):
            np.testing.assert_array_equal(_value(trial, f"outputs/Sequential:{k}", step), value)

    net_g, net_d = Generator(), Discriminator()
    opt_d, opt_g = torch.optim.SGD(net_d.parameters(), lr=0.1), torch.optim.SGD(net_g.parameters(), lr=0.1)
    hook = ttt.Hook(tmp_path / "gan", save_config=EVERY_STEP, include_collections=["outputs"])
    hook.register_module(net_g, name="G")
    hook.register_module(net_d, name="D")
    hook.attach_optimizer(opt_d)
    hook.attach_optimizer(opt_g)
    criterion = nn.BCELoss()
    real = torch.randn(6, 4, generator=gen)
    criterion(net_d(real), torch.ones(6)).backward()
    fake = net_g(torch.randn(6, 3, generator=gen))
    criterion(net_d(fake.detach()), torch.zeros(6)).backward()  # does not reach G's forward
    opt_d.step()
    criterion(net_d(fake), torch.ones(6)).backward()  # does
    opt_g.step()
    hook.close()
    trial = _trial(tmp_path / "gan")
    assert trial.steps() == [0]
    np.testing.assert_array_equal(_value(trial, "outputs/G", 0), fake.detach().numpy())
    assert trial.tensor_names(regex="^outputs/D(:|$)") == [f"outputs/D:{k}" for k in range(3)]


@pytest.mark.parametrize("explicit", [False, True])
def test_a_batch_skipped_after_its_backward_is_in_the_next_step_unless_steps_are_explicit(
    explicit: bool, tmp_path: Path
) -> None:
    """``clip_grad_norm_(..., error_if_nonfinite=True)`` raises after the backward of a batch with an infinite
    value; the loop catches it, zeroes the gradients and goes on. As documented (quickstart-pytorch.md), the
    skipped batch is the first call of the step the next batch trains (it cannot be told from gradient
    accumulation); with ``explicit_steps`` and ``finish_step()`` before ``continue`` it is a step of its own,
    without gradients."""
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hook = ttt.capture(
        model, tmp_path, optimizer=opt, save_config=EVERY_STEP, explicit_steps=explicit,
        include_collections=["gradients", "losses"],
    )  # fmt: skip
    gen = torch.Generator().manual_seed(7)
    losses, applied, skipped = [], [], []
    for i in range(4):
        x, y = _batch(gen)
        if i == 1:
            x[0, 0] = float("inf")
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        losses.append(loss.item())
        try:
            nn.utils.clip_grad_norm_(model.parameters(), 1.0, error_if_nonfinite=True)
        except RuntimeError:
            skipped.append(i)
            if explicit:
                hook.finish_step()
            continue
        applied.append(model[0].weight.grad.detach().clone())
        opt.step()
        if explicit:
            hook.finish_step()
    hook.close()
    trial = _trial(tmp_path)
    assert skipped == [1]
    if explicit:
        assert trial.steps(mode=Mode.TRAIN) == [0, 1, 2, 3]
        assert trial.tensor("gradients/0.weight").steps(mode=Mode.TRAIN) == [0, 2, 3]
        saved = [float(_value(trial, "losses/loss", s)) for s in range(4)]
        np.testing.assert_array_equal(saved, losses)
        grads = [_value(trial, "gradients/0.weight", s) for s in (0, 2, 3)]
    else:
        assert trial.steps(mode=Mode.TRAIN) == [0, 1, 2]
        assert float(_value(trial, "losses/loss", 0)) == losses[0]
        np.testing.assert_array_equal([float(_value(trial, f"losses/loss:{i}", 1)) for i in (0, 1)], losses[1:3])
        assert float(_value(trial, "losses/loss", 2)) == losses[3]
        grads = [_value(trial, "gradients/0.weight", s) for s in range(3)]
    for saved_grad, grad in zip(grads, applied, strict=True):
        np.testing.assert_array_equal(saved_grad, grad.numpy())  # those the optimizer applied


# ------------------------------------------------------------------ hunt 5: training patterns of real loops
def _compare_steps(
    trial: tensortap.Trial, expected: list[dict[str, torch.Tensor]], mode: Mode = Mode.TRAIN, first: bool = False
) -> None:
    """Each step's saved values equal torch's, exactly: ``expected[s]`` maps names to the tensors torch had at
    step ``s``; the trial has these steps (``first``: these steps first)."""
    steps = trial.steps(mode=mode)
    assert (steps[: len(expected)] if first else steps) == list(range(len(expected)))
    for s, values in enumerate(expected):
        for name, value in values.items():
            np.testing.assert_array_equal(_value(trial, name, s, mode), value.detach().numpy(), err_msg=f"{name} {s}")


@pytest.mark.parametrize("optimizer", [True, False])
def test_a_backward_over_several_losses_saves_each_and_trains(tmp_path: Path, optimizer: bool) -> None:
    """Multi-task training with ``torch.autograd.backward([loss_a, loss_b])``: no loss was saved, and without an
    optimizer every step was recorded as PREDICT."""
    torch.manual_seed(0)
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hook = ttt.capture(model, tmp_path, optimizer=opt if optimizer else None, save_config=EVERY_STEP)
    gen = torch.Generator().manual_seed(3)
    expected = []
    for _ in range(3):
        x, y = _batch(gen)
        opt.zero_grad()
        out = model(x)
        losses = [F.cross_entropy(out, y), out.pow(2).mean()]
        torch.autograd.backward(losses)
        grads = {f"gradients/{n}": p.grad.clone() for n, p in model.named_parameters()}
        if optimizer:
            opt.step()
        else:
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.1 * p.grad
        expected.append(
            {"losses/loss:0": losses[0], "losses/loss:1": losses[1], "0.weight": model[0].weight.detach().clone()}
            | grads
        )
    hook.close()
    _compare_steps(_trial(tmp_path), expected)


class _ReentrantBlocks(nn.Module):
    """Every parameterized layer under ``checkpoint(..., use_reentrant=True)`` (HF's
    ``gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})``)."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(6, 5), nn.Linear(5, 3)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torch.utils.checkpoint import checkpoint

        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=True)
        return x


@pytest.mark.parametrize("where", ["blocks", "model"])
@pytest.mark.parametrize("optimizer", [True, False])
def test_reentrant_checkpointing_saves_the_loss_of_train_steps(
    tmp_path: Path, where: str, optimizer: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """A reentrant checkpoint hides the parameters from the loss's graph: the loss was never saved; checkpointing
    the whole registered model (its first forward runs under no_grad) made every step EVAL, with a warning about
    frozen BatchNorm."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    model = _ReentrantBlocks()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hook = ttt.capture(
        model, tmp_path, optimizer=opt if optimizer else None, save_config=EVERY_STEP, include_collections=["losses"]
    )
    gen = torch.Generator().manual_seed(5)
    expected = []
    with caplog.at_level(logging.WARNING, logger="tensortap"):
        for _ in range(3):
            x, y = _batch(gen)
            x.requires_grad_(True)  # a reentrant checkpoint of the whole model needs an input that requires grad
            opt.zero_grad()
            out = checkpoint(model, x, use_reentrant=True) if where == "model" else model(x)
            loss = F.cross_entropy(out, y)
            loss.backward()
            if optimizer:
                opt.step()
            else:
                with torch.no_grad():
                    for p in model.parameters():
                        p -= 0.1 * p.grad
            expected.append({"losses/loss": loss})
    hook.close()
    _compare_steps(_trial(tmp_path), expected)
    assert "recorded as EVAL" not in caplog.text


def test_checkpoint_sequential_of_the_registered_model_warns_how_to_capture_outputs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``checkpoint_sequential(model, 2, x)`` calls the model's parts, never its forward: no outputs, and the one
    warning told to register each network of a container. It names checkpoint_sequential now, and what it says
    to do (register a module whose forward calls it) captures the parts' outputs."""
    from torch.utils.checkpoint import checkpoint_sequential

    class Segmented(nn.Module):
        def __init__(self, seq: nn.Sequential) -> None:
            super().__init__()
            self.seq = seq

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return checkpoint_sequential(self.seq, 2, x, use_reentrant=True)

    for wrapped in (False, True):
        torch.manual_seed(0)
        seq = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
        model = Segmented(seq) if wrapped else seq
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        out_dir = tmp_path / str(wrapped)
        hook = ttt.capture(
            model, out_dir, optimizer=opt, save_config=EVERY_STEP, include_collections=["losses", "outputs"]
        )
        gen = torch.Generator().manual_seed(6)
        expected = []
        with caplog.at_level(logging.WARNING, logger="tensortap"):
            for _ in range(2):
                x, y = _batch(gen)
                x.requires_grad_(True)
                opt.zero_grad()
                out = model(x) if wrapped else checkpoint_sequential(seq, 2, x, use_reentrant=True)
                loss = F.cross_entropy(out, y)
                loss.backward()
                opt.step()
                expected.append({"losses/loss": loss} | ({"outputs/seq.2": out} if wrapped else {}))
        hook.close()
        trial = _trial(out_dir)
        _compare_steps(trial, expected)
        if wrapped:
            assert "checkpoint_sequential" not in caplog.text
        else:
            assert not trial.tensor_names(collection="outputs")
            warned = [r.getMessage() for r in caplog.records if "checkpoint_sequential" in r.getMessage()]
            assert len(warned) == 1 and "register_module(G" not in warned[0], caplog.text
            caplog.clear()


@pytest.mark.parametrize("how", ["replaced", "detached"])
def test_an_optimizer_replaced_mid_training_is_warned_about_or_detached(
    tmp_path: Path, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Two-phase training (Adam, then SGD): the attached Adam never stepped again and every later iteration
    merged into one step, silently. Now one warning says so and what to do; doing it (detach_optimizer, then
    attach_optimizer) gives a step per iteration with the gradients each optimizer applied."""
    torch.manual_seed(0)
    model = _mlp()
    opt: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    hook = ttt.capture(model, tmp_path, optimizer=opt, save_config=EVERY_STEP)
    gen = torch.Generator().manual_seed(7)
    expected = []
    with caplog.at_level(logging.WARNING, logger="tensortap"):
        for i in range(6):
            if i == 3:
                if how == "detached":
                    hook.detach_optimizer(opt)
                opt = torch.optim.SGD(model.parameters(), lr=0.01)
                if how == "detached":
                    hook.attach_optimizer(opt)
            x, y = _batch(gen)
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            expected.append({"losses/loss": loss, "gradients/2.weight": model[2].weight.grad.clone()})
            opt.step()
            expected[-1]["2.weight"] = model[2].weight.detach().clone()
    hook.close()
    trial = _trial(tmp_path)
    warned = [r.getMessage() for r in caplog.records if "no attached optimizer stepped" in r.getMessage()]
    if how == "detached":
        assert not warned, caplog.text
        _compare_steps(trial, expected)
        return
    assert trial.steps() == [0, 1, 2, 3]
    _compare_steps(trial, expected[:3], first=True)
    assert len(warned) == 1 and "step 3" in warned[0] and "hook.detach_optimizer(" in warned[0], caplog.text


def test_two_attached_optimizers_of_one_model_have_distinct_names(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A new optimizer attached next to the one it replaced: both were named after the model, and the close-time
    warning read "optimizer Linear (3x) stepped in it and Linear never did"."""
    model = nn.Linear(6, 3)
    adam = torch.optim.Adam(model.parameters(), lr=0.01)
    hook = ttt.capture(model, tmp_path, optimizer=adam, save_config=EVERY_STEP, include_collections=["losses"])
    with caplog.at_level(logging.WARNING, logger="tensortap"):
        _train(model, adam, steps=2, seed=8)
        sgd = torch.optim.SGD(model.parameters(), lr=0.01)
        hook.attach_optimizer(sgd)
        _train(model, sgd, steps=2, seed=9)
        hook.close()
    assert "optimizer Linear_SGD (2x) stepped in it and Linear never did" in caplog.text, caplog.text
    assert _trial(tmp_path).tensor_names(step=2, collection="losses") == ["losses/Linear_SGD:0", "losses/Linear_SGD:1"]


class SAM(torch.optim.Optimizer):
    """Sharpness-aware minimization as github.com/davda54/sam writes it: ``first_step`` climbs to the worst point
    near the weights, ``second_step`` goes back and steps the base optimizer with the gradients there;
    ``step()`` itself is never called in its training loop."""

    def __init__(self, params: Any, base_optimizer: type[torch.optim.Optimizer], rho: float = 0.05, **kwargs: Any):
        super().__init__(params, dict(rho=rho, **kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups

    @torch.no_grad()
    def first_step(self) -> None:
        norm = torch.norm(torch.stack([p.grad.norm(2) for g in self.param_groups for p in g["params"]]), 2)
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p]["old_p"] = p.data.clone()
                p.add_(p.grad * group["rho"] / (norm + 1e-12))
        self.zero_grad()

    @torch.no_grad()
    def second_step(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                p.data = self.state[p]["old_p"]
        self.base_optimizer.step()
        self.zero_grad()


def test_a_sam_optimizer_makes_a_step_per_iteration_with_the_gradients_applied(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """SAM attached (``capture(model, optimizer=sam)``): its ``step()`` never runs, so the whole training was one
    step with no gradients. Its base optimizer, which steps, is attached in its place, and SAM moving the weights
    between the two backwards of a step is not taken for an optimizer that is not attached."""
    caplog.set_level(logging.WARNING, logger="tensortap")
    torch.manual_seed(0)
    model = _mlp()
    sam = SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    hook = ttt.capture(model, tmp_path, optimizer=sam, save_config=EVERY_STEP)
    gen = torch.Generator().manual_seed(10)
    expected = []
    for _ in range(3):
        x, y = _batch(gen)
        first = F.cross_entropy(model(x), y)
        first.backward()
        sam.first_step()
        second = F.cross_entropy(model(x), y)
        second.backward()
        grads = {f"gradients/{n}": p.grad.clone() for n, p in model.named_parameters()}
        sam.second_step()
        weights = {n: p.detach().clone() for n, p in model.named_parameters()}
        expected.append({"losses/loss:0": first, "losses/loss:1": second} | grads | weights)
    hook.close()
    _compare_steps(_trial(tmp_path), expected)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


def test_per_sample_gradients_with_torch_func_are_saved_every_step(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``vmap(grad(functional_call(model, params, x)))`` then ``optimizer.step()`` (the torch.func tutorial's
    per-sample gradients): the hook kept functorch's wrapper tensors as the parameters, lost steps 0 and 1,
    saved no gradients and warned "Cannot access data pointer of Tensor that doesn't have storage"."""
    from torch.func import functional_call, grad, vmap

    torch.manual_seed(0)
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hook = ttt.capture(
        model,
        tmp_path,
        optimizer=opt,
        save_config=EVERY_STEP,
        include_collections=["weights", "biases", "gradients", "outputs"],
    )

    def loss_one(params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(model, params, (x.unsqueeze(0),)), y.unsqueeze(0))

    gen = torch.Generator().manual_seed(12)
    expected = []
    with caplog.at_level(logging.WARNING, logger="tensortap"):
        for _ in range(3):
            x, y = _batch(gen)
            params = {n: p.detach() for n, p in model.named_parameters()}
            per_sample = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x, y)
            for n, p in model.named_parameters():
                p.grad = per_sample[n].mean(0)
            grads = {f"gradients/{n}": p.grad.clone() for n, p in model.named_parameters()}
            opt.step()
            expected.append(grads | {n: p.detach().clone() for n, p in model.named_parameters()})
    hook.close()
    trial = _trial(tmp_path)
    _compare_steps(trial, expected)
    assert not trial.tensor_names(collection="outputs")
    assert "data pointer" not in caplog.text
    warned = [r.getMessage() for r in caplog.records if "torch.func" in r.getMessage()]
    assert len(warned) == 1, caplog.text


def test_forwards_of_torch_jit_trace_and_torch_export_are_not_captured(tmp_path: Path) -> None:
    """The tracer's forwards (the trace and its check_trace runs, on the example input) were saved as three calls
    of every module in training step 0, and the traced module's training forwards went unseen, without a word;
    ``torch.export`` warned about torch.compile, which was never called."""
    torch.manual_seed(0)
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hook = ttt.capture(
        model, tmp_path, optimizer=opt, save_config=EVERY_STEP, include_collections=["losses", "gradients", "outputs"]
    )
    with pytest.warns(UserWarning, match=r"torch\.jit\.trace") as traced:
        traced_model = torch.jit.trace(model, torch.randn(2, 6))
    assert len([w for w in traced if "tensortap" in str(w.message)]) == 1
    gen = torch.Generator().manual_seed(13)
    expected = []
    for _ in range(2):
        x, y = _batch(gen)
        opt.zero_grad()
        loss = F.cross_entropy(traced_model(x), y)
        loss.backward()
        expected.append({"losses/loss": loss, "gradients/0.weight": model[0].weight.grad.clone()})
        opt.step()
    with pytest.warns(UserWarning, match=r"torch\.export") as exported:
        torch.export.export(model, (torch.randn(2, 6),))
    assert not [w for w in exported if "torch.compile" in str(w.message)]
    hook.close()
    trial = _trial(tmp_path)
    _compare_steps(trial, expected)
    assert not trial.tensor_names(collection="outputs")


def test_a_rollout_of_many_forwards_in_one_step_holds_a_bounded_number_of_calls(tmp_path: Path) -> None:
    """REINFORCE: the policy is called once per environment step with gradients on, then one backward and one
    optimizer step per episode. Every call was held (a copy of each output) until the step ended, although only
    calls 0 .. max_calls - 1 and the last are saved."""
    torch.manual_seed(0)
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    hook = ttt.capture(model, tmp_path, optimizer=opt, save_config=EVERY_STEP, include_collections=["outputs"])
    max_calls = hook.session.max_calls
    gen = torch.Generator().manual_seed(14)
    outs, held = [], 0
    for _ in range(40):
        out = model(torch.randn(1, 6, generator=gen))
        outs.append(out)
        held = max(held, sum(len(c.held) + (c.last is not None) for c in hook.session._calls.values()))
    opt.zero_grad()
    torch.stack(outs).logsumexp(-1).sum().backward()
    opt.step()
    hook.close()
    assert held <= 4 * (2 * max_calls + 1)  # 4 modules: the step's first calls, the last forward's, the last
    trial = _trial(tmp_path)
    for i in [*range(max_calls), 39]:
        np.testing.assert_array_equal(_value(trial, f"outputs/Sequential:{i}", 0), outs[i].detach().numpy())
    assert len(trial.tensor_names(regex="^outputs/Sequential")) == max_calls + 1


def test_torch_jit_script_of_a_captured_model_says_how(tmp_path: Path) -> None:
    """TorchScript compiles a module's forward hooks: it failed with "'Tap' object has no attribute '__name__'".
    The error says what to do; a copy (which leaves tensortap's hooks out) scripts while the model is captured."""
    model = _mlp()
    hook = ttt.capture(model, tmp_path)
    with pytest.raises(AttributeError, match=r"torch\.jit\.script.*copy\.deepcopy"):
        torch.jit.script(model)
    scripted = torch.jit.script(copy.deepcopy(model))
    x = torch.randn(2, 6)
    np.testing.assert_array_equal(scripted(x).detach().numpy(), model(x).detach().numpy())
    hook.close()


@pytest.mark.parametrize("update", ["manual", "manual_record_loss", "optimizer", "dict", "record_loss_only"])
def test_a_loop_training_through_autograd_grad_makes_train_steps(update: str, tmp_path: Path) -> None:
    """``grads = torch.autograd.grad(loss, params)``, then ``p -= lr * g`` (or ``p.grad = g; opt.step()``), and
    no ``backward()``: every step was recorded as PREDICT, with no gradients and no warning, also when the loop
    gave its loss to ``record_loss`` as the quickstart said to (hunt 25, H3). They are TRAIN steps now, saved
    or not (every other step here: the TRAIN steps keep the global numbers), with the loss the loop computed,
    the weights after the update and the gradients it applied. ``record_loss_only``: a loop updating without
    gradients (a random search) that records its loss."""
    torch.manual_seed(0)
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1) if update == "optimizer" else None
    hook = ttt.capture(model, tmp_path, optimizer=opt, save_config=SaveConfig(save_interval=2))
    gen = torch.Generator().manual_seed(3)
    expected = []
    for _ in range(5):
        x, y = _batch(gen)
        loss = F.cross_entropy(model(x), y)
        if update in ("manual_record_loss", "record_loss_only"):
            hook.record_loss(loss)
        if update == "record_loss_only":
            grads = [0.01 * torch.randn(p.shape, generator=gen) for p in model.parameters()]
        elif update == "dict":
            grads = list(torch.autograd.grad(loss, dict(model.named_parameters())).values())
        else:
            grads = list(torch.autograd.grad(loss, model.parameters()))  # a generator: read once for both
        if opt is not None:
            for p, g in zip(model.parameters(), grads, strict=True):
                p.grad = g
            opt.step()
        else:
            with torch.no_grad():
                for p, g in zip(model.parameters(), grads, strict=True):
                    p -= 0.1 * g
        values = {"losses/loss": loss.detach()} | {n: p.detach().clone() for n, p in model.named_parameters()}
        if update != "record_loss_only":
            values |= {f"gradients/{n}": g for (n, _), g in zip(model.named_parameters(), grads, strict=True)}
        expected.append(values)
    hook.close()
    trial = _trial(tmp_path)
    assert trial.modes() == [Mode.TRAIN]
    assert trial.steps() == [0, 2, 4]
    assert [trial.global_step(s, Mode.TRAIN) for s in (0, 2, 4)] == [0, 2, 4]
    assert set(trial.tensor_names(collection="losses")) == {"losses/loss"}
    assert bool(trial.tensor_names(collection="gradients")) is (update != "record_loss_only")
    for s in (0, 2, 4):
        for name, value in expected[s].items():
            np.testing.assert_array_equal(_value(trial, name, s, Mode.TRAIN), value.numpy(), err_msg=f"{name} {s}")


@pytest.mark.parametrize("optimizer", [True, False])
def test_a_gradient_penalty_through_autograd_grad_keeps_the_backwards_losses_and_gradients(
    optimizer: bool, tmp_path: Path
) -> None:
    """WGAN-GP: the critic's gradient penalty is ``torch.autograd.grad(critic(interp), interp, create_graph=True)``
    (of the input) in a step that ``backward()`` and ``step()`` train, two critic steps a generator step; and a
    penalty on the norm of the parameters' gradient (``create_graph=True`` too) in a loop without optimizers.
    The losses and the gradients saved are those of the backwards, as torch had them, never the penalty's."""
    torch.manual_seed(0)
    net_g, net_d = Generator(), nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    hook = ttt.Hook(tmp_path, save_config=EVERY_STEP, include_collections=["weights", "biases", "gradients", "losses"])
    hook.register_module(net_g, name="G")
    hook.register_module(net_d, name="D")
    opt_d = torch.optim.Adam(net_d.parameters(), lr=1e-3, betas=(0.5, 0.9))
    opt_g = torch.optim.Adam(net_g.parameters(), lr=1e-3, betas=(0.5, 0.9))
    gen = torch.Generator().manual_seed(7)
    seen = []
    if optimizer:
        hook.attach_optimizer(opt_d)
        hook.attach_optimizer(opt_g)
        for _ in range(3):
            values: dict[str, torch.Tensor] = {}
            for k in range(2):
                real = torch.randn(6, 4, generator=gen)
                fake = net_g(torch.randn(6, 3, generator=gen)).detach()
                opt_d.zero_grad()
                alpha = torch.rand(6, 1, generator=gen)
                interp = (alpha * real + (1 - alpha) * fake).requires_grad_(True)
                critic = net_d(interp)
                (g,) = torch.autograd.grad(critic, interp, torch.ones_like(critic), create_graph=True)
                loss_d = net_d(fake).mean() - net_d(real).mean() + 10 * ((g.norm(2, dim=1) - 1) ** 2).mean()
                loss_d.backward()
                values |= {f"losses/D:{k}": loss_d.detach()} | _grads(net_d, "gradients/D")
                opt_d.step()
            opt_g.zero_grad()
            loss_g = -net_d(net_g(torch.randn(6, 3, generator=gen))).mean()
            loss_g.backward()
            values |= {"losses/G": loss_g.detach()} | _grads(net_g, "gradients/G")
            opt_g.step()
            seen.append(values | {f"D.{n}": p.detach().clone() for n, p in net_d.named_parameters()})
    else:
        for _ in range(3):
            x = torch.randn(6, 4, generator=gen)
            net_d.zero_grad()
            loss = net_d(x).pow(2).mean()
            grads = torch.autograd.grad(loss, list(net_d.parameters()), create_graph=True)
            total = loss + 0.1 * sum(g.pow(2).sum() for g in grads)
            total.backward()
            values = {"losses/loss": total.detach()} | _grads(net_d, "gradients/D")
            with torch.no_grad():
                for p in net_d.parameters():
                    p -= 0.1 * p.grad
            seen.append(values | {f"D.{n}": p.detach().clone() for n, p in net_d.named_parameters()})
    hook.close()
    trial = _trial(tmp_path)
    assert trial.modes() == [Mode.TRAIN]
    assert set(trial.tensor_names(collection="losses")) == {n for n in seen[0] if n.startswith("losses/")}
    _compare_steps(trial, seen)


def test_gradients_of_the_inputs_or_in_eval_make_no_train_steps(tmp_path: Path) -> None:
    """Gradients taken with ``torch.autograd.grad`` outside training: a saliency map of the input under ``eval()``,
    the parameters' gradients under ``eval()`` (a Fisher estimate), and, after training, an input gradient with
    the model in ``train()`` (an adversarial example, no update). They make EVAL and PREDICT steps, with no
    losses and no gradients; the training before keeps its steps."""
    torch.manual_seed(0)
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hook = ttt.capture(model, tmp_path, optimizer=opt, save_config=EVERY_STEP)
    gen = _train(model, opt, steps=2, seed=4)
    model.eval()
    for wrt in ("input", "parameters"):
        x, y = _batch(gen)
        x.requires_grad_(True)
        loss = F.cross_entropy(model(x), y)
        torch.autograd.grad(loss, x if wrt == "input" else list(model.parameters()))
    model.train()
    x, y = _batch(gen)
    x.requires_grad_(True)
    torch.autograd.grad(F.cross_entropy(model(x), y), x)
    hook.close()
    trial = _trial(tmp_path)
    assert trial.steps(mode=Mode.TRAIN) == [0, 1]
    assert trial.steps(mode=Mode.EVAL) == [0, 1]
    assert trial.steps(mode=Mode.PREDICT) == [0]
    for mode in (Mode.EVAL, Mode.PREDICT):
        assert not [n for n in trial.tensor_names(mode=mode) if n.startswith(("losses/", "gradients/"))]


def test_a_loss_differentiated_by_autograd_grad_then_by_backward_is_saved_once(tmp_path: Path) -> None:
    """The gradient norm taken with ``torch.autograd.grad(loss, params, retain_graph=True)`` before
    ``loss.backward()`` and ``optimizer.step()``: one loss a step, the gradients the optimizer applied."""
    torch.manual_seed(0)
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hook = ttt.capture(model, tmp_path, optimizer=opt, save_config=EVERY_STEP)
    gen = torch.Generator().manual_seed(3)
    expected = []
    for _ in range(3):
        x, y = _batch(gen)
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        grads = torch.autograd.grad(loss, list(model.parameters()), retain_graph=True)
        hook.save_scalar("grad_norm", torch.stack([g.norm() for g in grads]).norm())
        loss.backward()
        expected.append(
            {"losses/loss": loss.detach()} | {f"gradients/{n}": p.grad.clone() for n, p in model.named_parameters()}
        )
        opt.step()
    hook.close()
    trial = _trial(tmp_path)
    assert set(trial.tensor_names(collection="losses")) == {"losses/loss"}
    _compare_steps(trial, expected)


class _ConvNet(nn.Module):
    """A small network of the shape ``torch.ao.quantization`` fuses (conv, batch norm, ReLU) and prepares for
    quantization-aware training (its stubs)."""

    def __init__(self) -> None:
        super().__init__()
        self.quant, self.dequant = torch.ao.quantization.QuantStub(), torch.ao.quantization.DeQuantStub()
        self.conv, self.bn, self.relu = nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU()
        self.fc = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn(self.conv(self.quant(x))))
        return self.dequant(self.fc(x.flatten(1)))


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore:Please use quant_min:UserWarning")
@pytest.mark.parametrize("change", ["fuse", "prepare_qat"])
def test_a_model_fused_or_prepared_for_qat_mid_training_goes_on_being_captured(
    change: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``fuse_modules_qat`` and ``prepare_qat(inplace=True)`` copy the forward hooks of the modules they
    replace onto their replacements, without ``with_kwargs``: the next forward raised ``TypeError:
    Hook._on_io() missing 1 required positional argument: 'output'`` and the training died. The copies are
    now ignored, with one warning; each module of the model is captured under its name in it, a fused
    module's outputs (conv, batch norm and ReLU in one) under ``conv``'s, as torch's own hooks see them."""
    torch.manual_seed(0)
    model = _ConvNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    hook = ttt.capture(model, tmp_path, optimizer=opt, save_config=EVERY_STEP, include_collections=["outputs"])
    gen = torch.Generator().manual_seed(30)
    seen: list[dict[str, torch.Tensor]] = []
    with caplog.at_level(logging.WARNING, logger="tensortap"):
        for s in range(4):
            if s == 2:
                model.eval()
                torch.ao.quantization.fuse_modules_qat(model, [["conv", "bn", "relu"]], inplace=True)
                model.train()
                if change == "prepare_qat":
                    model.qconfig = torch.ao.quantization.get_default_qat_qconfig("x86")
                    torch.ao.quantization.prepare_qat(model, inplace=True)
            seen.append({})  # what the modules in the model return now, as torch's own hooks see it
            handles = [
                getattr(model, name).register_forward_hook(lambda m, a, o, n=name: seen[-1].__setitem__(n, o.detach()))
                for name in ("conv", "bn", "relu", "fc")
            ]
            opt.zero_grad()
            F.cross_entropy(
                model(torch.randn(4, 1, 8, 8, generator=gen)), torch.randint(0, 3, (4,), generator=gen)
            ).backward()
            opt.step()
            for handle in handles:
                handle.remove()
    hook.close()
    trial = _trial(tmp_path)
    assert trial.steps() == [0, 1, 2, 3]
    for s, outputs in enumerate(seen):
        for name, value in outputs.items():
            np.testing.assert_array_equal(_value(trial, f"outputs/{name}", s), value.numpy())
    fused = seen[3]
    assert torch.equal(fused["conv"], fused["relu"])  # bn and relu are nn.Identity now
    assert not any(":1" in n for n in trial.tensor_names())  # each call once, not again by a copy
    if change == "fuse":  # the ReLU inside the fused module, whose hooks fuse_modules moved: hooked again
        assert "outputs/conv.2" in trial.tensor_names()
    copied = [r.getMessage() for r in caplog.records if "carries a copy" in r.getMessage()]
    assert len(copied) == 1 and copied[0].startswith("tensortap: conv (a ")
    assert not hook.failed


def test_an_error_in_tensortaps_hooks_never_stops_the_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A failure in the hook bodies torch runs (here the mode read at a forward; a bug stands for any)
    reached the training: ``model(x)`` raised it. It now disables capture, with one error logged, and
    the training goes on; ``strict=True`` still raises it."""

    def broken(self: ttt.Hook, module: nn.Module | None = None) -> Mode:
        raise RuntimeError("mode unreadable")

    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hook = ttt.capture(model, tmp_path / "lenient", optimizer=opt, save_config=EVERY_STEP)
    monkeypatch.setattr(ttt.Hook, "_detect_mode", broken)
    with caplog.at_level(logging.ERROR, logger="tensortap"):
        _train(model, opt, steps=2, seed=31)
    hook.close()
    assert hook.failed
    assert any("mode unreadable" in r.getMessage() for r in caplog.records)
    strict = ttt.capture(model, tmp_path / "strict", optimizer=opt, strict=True)
    with pytest.raises(RuntimeError, match="mode unreadable"):
        _train(model, opt, steps=1, seed=31)
    monkeypatch.undo()
    strict.close()


def _optimizer_in_backward(
    out: Path, attach: bool, every: int, hooks: Callable[[nn.Module], None] | None = None
) -> tuple[tensortap.Trial, list[dict[str, np.ndarray]]]:
    """PyTorch's tutorial "optimizer step in backward": one optimizer per parameter, stepped (every
    ``every`` backwards: micro-batch accumulation) and zeroed in a post-accumulate-grad hook registered
    before capture (its optimizers attached, or not). The trial, and for each backward the weights after
    it and ``p.grad`` as each optimizer found it (``gradients/<name>``)."""
    torch.manual_seed(0)
    model = _mlp()
    optimizers = {p: torch.optim.Adam([p], lr=0.01) for p in model.parameters()}
    names = {p: n for n, p in model.named_parameters()}
    backwards = [0]
    seen: list[dict[str, np.ndarray]] = []

    def step_in_backward(p: torch.Tensor) -> None:
        seen[-1][f"gradients/{names[p]}"] = p.grad.detach().clone().numpy()
        if backwards[0] % every == every - 1:
            optimizers[p].step()
            optimizers[p].zero_grad()

    for p in model.parameters():
        p.register_post_accumulate_grad_hook(step_in_backward)
    hook = ttt.Hook(out, save_config=EVERY_STEP)
    hook.register_module(model)
    for opt in optimizers.values() if attach else ():
        hook.attach_optimizer(opt)
    if hooks is not None:
        hooks(model)
    gen = torch.Generator().manual_seed(32)
    for backwards[0] in range(4):
        seen.append({})
        x, y = _batch(gen)
        F.cross_entropy(model(x), y).backward()
        seen[-1].update({n: p.detach().clone().numpy() for n, p in model.named_parameters()})
    hook.close()
    return _trial(out), seen


@pytest.mark.parametrize("every", [1, 2])
def test_an_optimizer_stepped_in_backward_saves_the_gradients_it_applied(every: int, tmp_path: Path) -> None:
    """The optimizer step fused into the backward, its hooks registered before capture, no optimizer
    attached: the user's hook ran before tensortap's and set ``p.grad`` to ``None``, so the trial held no
    gradient at all, without a word. tensortap's hook now runs first: each step (one forward) has
    ``p.grad`` after its backward's accumulation, which the optimizers applied at the end of a window.
    Attached, a step ends when every per-parameter optimizer has stepped, with the gradients they applied."""
    trial, seen = _optimizer_in_backward(tmp_path / "forwards", attach=False, every=every)
    assert trial.steps() == [0, 1, 2, 3]
    for s, values in enumerate(seen):
        assert len(values) == 8
        for name, value in values.items():
            np.testing.assert_array_equal(_value(trial, name, s), value)
    trial, seen = _optimizer_in_backward(tmp_path / "attached", attach=True, every=every)
    windows = seen[every - 1 :: every]
    assert trial.steps() == list(range(len(windows)))
    for s, values in enumerate(windows):
        for name, value in values.items():
            np.testing.assert_array_equal(_value(trial, name, s), value)


def test_a_gradient_another_hook_cleared_before_it_was_read_is_warned_about(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Where tensortap's post-accumulate-grad hook cannot run first (a torch that keeps these hooks
    otherwise), an optimizer stepped in a hook before it leaves it ``p.grad = None``: the gradients were
    dropped without a word. One warning now names the first one, and says how to save them."""
    monkeypatch.setattr(
        patches, "after_accumulation", lambda p, tap: p.register_post_accumulate_grad_hook(tap), raising=False
    )
    with caplog.at_level(logging.WARNING, logger="tensortap"):
        trial, _ = _optimizer_in_backward(tmp_path, attach=False, every=1)
    assert not trial.tensor_names(collection="gradients")
    warned = [r.getMessage() for r in caplog.records if "set p.grad to None" in r.getMessage()]
    assert len(warned) == 1 and "hook.attach_optimizer" in warned[0]


def test_outputs_are_what_a_module_returned_whichever_hook_replaced_them(tmp_path: Path) -> None:
    """A forward hook of the user's that returns a new value replaces the module's output. Registered
    after capture, tensortap's hook ran before it: ``outputs/0`` was the value replaced, half of what
    layer 1 received (``inputs/1``); registered before, the value returned. ``outputs/<module>`` is now the
    value the call returned (what the next module receives), whichever was registered first, the
    registered model's own included."""
    model = _mlp()
    model[2].register_forward_hook(lambda m, a, o: o + 1)  # before capture
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hook = ttt.capture(model, tmp_path, optimizer=opt, save_config=EVERY_STEP, include_collections=["outputs"])
    model[0].register_forward_hook(lambda m, a, o: o * 2)  # after capture
    model.register_forward_hook(lambda m, a, o: o - 1)
    returned: list[dict[str, torch.Tensor]] = []
    for module, name in ((model[0], "0"), (model[2], "2"), (model, "Sequential")):
        module.register_forward_hook(lambda m, a, o, n=name: returned[-1].__setitem__(n, o.detach()))
    gen = torch.Generator().manual_seed(33)
    for _ in range(2):
        returned.append({})
        x, y = _batch(gen)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    hook.close()
    trial = _trial(tmp_path)
    for s, outputs in enumerate(returned):
        for name, value in outputs.items():
            np.testing.assert_array_equal(_value(trial, f"outputs/{name}", s), value.numpy())


def test_a_value_given_at_no_saved_step_is_named_when_the_hook_closes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """accelerate's nlp_example shape: each epoch's accuracy is given with ``save_scalar`` after the evaluation
    loop, so it belongs to the last EVAL step, which the default save config does not save: every value was
    dropped, without a word. One warning names it when the hook closes; a value saved at some step is not named
    (an ``lr`` given at every step, saved every 100)."""
    caplog.set_level(logging.WARNING, logger="tensortap")
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hook = ttt.capture(model, tmp_path, optimizer=opt)  # the defaults: every 100th step of each mode
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        model.train()
        for _ in range(4):
            hook.save_scalar("lr", opt.param_groups[0]["lr"])
            x, y = _batch(gen)
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            correct = sum(int((model(x).argmax(-1) == y).sum()) for x, y in (_batch(gen) for _ in range(3)))
        hook.save_scalar("accuracy", correct / 24)
    hook.close()
    trial = _trial(tmp_path)
    assert trial.tensor_names(collection="metrics") == ["metrics/lr"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == [
        "tensortap: metrics/accuracy (given 3 times) fell on no saved step: none of their values is in the trial "
        "(a value belongs to the step it is given in, which the save config may not save: after an evaluation "
        "loop, its last EVAL step; give it at a saved step, or save more steps of that mode)"
    ]


def test_a_run_resumed_from_a_checkpoint_numbers_on_with_number_on(tmp_path: Path) -> None:
    """A run resumed from a checkpoint (model, optimizer and the count of steps done) numbers its steps from 0 in
    a new trial, as the quickstart says; ``hook.number_on("train", done)`` numbers them on from the
    checkpoint's count, as the Keras, Lightning and Transformers callbacks do from their framework's."""
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    _train(model, opt, 2, seed=0)
    checkpoint = {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": 2}
    resumed = _mlp()
    opt = torch.optim.Adam(resumed.parameters(), lr=0.01)
    resumed.load_state_dict(checkpoint["model"])
    opt.load_state_dict(checkpoint["optimizer"])
    hook = ttt.capture(resumed, tmp_path, optimizer=opt, save_config=EVERY_STEP)
    hook.number_on("train", checkpoint["step"])
    _train(resumed, opt, 3, seed=1)
    hook.close()
    trial = _trial(tmp_path)
    assert trial.steps(mode=Mode.TRAIN) == [2, 3, 4]
    np.testing.assert_array_equal(_value(trial, "2.weight", 4, Mode.TRAIN), resumed[2].weight.detach().numpy())


def test_a_value_given_twice_in_a_saved_step_is_named_in_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Gradient accumulation over two micro-batches, each giving its loss with ``save_scalar``: the step keeps
    the last value alone (``record_loss`` keeps each, as ``:0``, ``:1``); the first was dropped without a
    word. One warning names it, once."""
    caplog.set_level(logging.WARNING, logger="tensortap")
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hook = ttt.capture(model, tmp_path, optimizer=opt, save_config=EVERY_STEP)
    gen = torch.Generator().manual_seed(0)
    given = []
    for _ in range(2):
        for _ in range(2):
            x, y = _batch(gen)
            loss = F.cross_entropy(model(x), y)
            hook.save_scalar("train_loss", loss.item())
            given.append(loss.item())
            (loss / 2).backward()
        opt.step()
        opt.zero_grad()
    hook.close()
    trial = _trial(tmp_path)
    assert [float(_value(trial, "metrics/train_loss", s)) for s in (0, 1)] == pytest.approx(given[1::2])
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == [
        "tensortap: metrics/train_loss was given more than once in step 0: only its last value in a step is kept "
        "(give each value a name of its own to keep them all)"
    ]
