"""The PyTorch adapter on real tiny trainings: captured values against what PyTorch reports."""

from __future__ import annotations

import gc
import json
import logging
import os
import socket
import subprocess
import sys
import time
import warnings
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import tensortap  # noqa: E402
import tensortap.torch as ttt  # noqa: E402
from tensortap import Mode, ReductionConfig, SaveConfig  # noqa: E402
from tensortap.capture import Writer  # noqa: E402

pytestmark = [pytest.mark.torch, pytest.mark.usefixtures("torch_one_thread")]

EVERY_STEP = SaveConfig(save_interval=1)


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 5)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.relu(self.fc1(x)))

    @staticmethod
    def data(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(8, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen)

    @staticmethod
    def expected_outputs(params: dict[str, torch.Tensor], x: torch.Tensor) -> dict[str, torch.Tensor]:
        fc1 = F.linear(x, params["fc1.weight"], params["fc1.bias"])
        relu = fc1.clamp_min(0)
        return {"fc1": fc1, "relu": relu, "fc2": F.linear(relu, params["fc2.weight"], params["fc2.bias"])}


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(3 * 3 * 3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(F.relu(self.conv(x))), 1))

    @staticmethod
    def data(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(5, 1, 8, 8, generator=gen), torch.randint(0, 4, (5,), generator=gen)

    @staticmethod
    def expected_outputs(params: dict[str, torch.Tensor], x: torch.Tensor) -> dict[str, torch.Tensor]:
        conv = F.conv2d(x, params["conv.weight"], params["conv.bias"])
        pool = F.max_pool2d(conv.clamp_min(0), 2)
        return {"conv": conv, "pool": pool, "fc": F.linear(pool.flatten(1), params["fc.weight"], params["fc.bias"])}


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _trial(path: Path) -> tensortap.Trial:
    return tensortap.create_trial(path)


@pytest.mark.parametrize(
    ("model_cls", "make_opt"),
    [
        (MLP, lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9)),
        (CNN, lambda ps: torch.optim.Adam(ps, lr=0.01)),
    ],
    ids=["mlp-sgd", "cnn-adam"],
)
def test_captured_values_equal_what_pytorch_reports(
    tmp_path: Path, model_cls: type[nn.Module], make_opt: Callable[[Any], torch.optim.Optimizer]
) -> None:
    model = model_cls()
    opt = make_opt(model.parameters())
    loss_fn = nn.CrossEntropyLoss()
    hook = ttt.capture(
        model,
        tmp_path,
        optimizer=opt,
        loss=loss_fn,
        save_config=EVERY_STEP,
        include_collections=["weights", "biases", "gradients", "losses", "outputs", "optimizer_variables"],
    )
    gen = torch.Generator().manual_seed(1)
    seen: list[dict[str, Any]] = []
    for _ in range(4):
        x, y = model_cls.data(gen)  # type: ignore[attr-defined]
        before = _params(model)
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        opt.step()
        seen.append(
            {
                "after": _params(model),
                "grads": grads,
                "loss": loss.item(),
                "outputs": model_cls.expected_outputs(before, x),  # type: ignore[attr-defined]
                "state": {(n, k): v.clone() for n, p in model.named_parameters() for k, v in opt.state[p].items()},
            }
        )
    hook.close()

    trial = _trial(tmp_path)
    assert trial.steps() == [0, 1, 2, 3]
    assert trial.workers() == ["worker_0"]
    for step, s in enumerate(seen):
        for name, value in s["after"].items():
            np.testing.assert_array_equal(trial.tensor(name).value(step), value.numpy(), err_msg=f"{name} @ {step}")
        for name, value in s["grads"].items():
            np.testing.assert_array_equal(trial.tensor(f"gradients/{name}").value(step), value.numpy())
        for name, value in s["outputs"].items():
            np.testing.assert_allclose(trial.tensor(f"outputs/{name}").value(step), value.numpy(), rtol=1e-6, atol=1e-6)
        assert float(trial.tensor("losses/CrossEntropyLoss").value(step)) == pytest.approx(s["loss"], rel=1e-7)
        for (name, key), value in s["state"].items():
            np.testing.assert_array_equal(trial.tensor(f"optimizer/{name}/{key}").value(step), value.numpy())
    assert set(trial.tensor_names(collection="biases")) == {n for n in seen[0]["after"] if n.endswith("bias")}
    assert trial.training_ended


def test_a_closed_hook_and_its_model_are_freed(tmp_path: Path) -> None:
    """Nothing of tensortap keeps a hook, or the model it captured, alive once it is closed and let go (a
    notebook that trains one model after another frees each). Before, the writer thread's loop kept the last
    writer it looked at, with its hook and model, for the rest of the process."""
    from tensortap.capture.writer import POLL_SECONDS

    def closed() -> list[weakref.ref[Any]]:
        model = MLP()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        hook = ttt.capture(model, tmp_path, optimizer=optimizer, save_config=SaveConfig(save_interval=1))
        for _ in range(3):
            optimizer.zero_grad()
            F.mse_loss(model(torch.randn(4, 6)), torch.randn(4, 3)).backward()
            optimizer.step()
        time.sleep(3 * POLL_SECONDS)  # the writer thread looks at the open writer
        hook.close()
        return [weakref.ref(hook), weakref.ref(model)]

    refs = closed()
    time.sleep(3 * POLL_SECONDS)  # and goes on looking
    gc.collect()
    assert [r() for r in refs] == [None, None]
    assert tensortap.create_trial(tmp_path).steps() == [0, 1, 2]


def test_gradient_accumulation_is_one_step_per_optimizer_step(tmp_path: Path) -> None:
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(2)
    grads: list[dict[str, torch.Tensor]] = []
    losses: list[list[float]] = []
    with ttt.capture(model, tmp_path, optimizer=opt, loss=loss_fn, save_config=EVERY_STEP):
        for _ in range(3):
            opt.zero_grad()
            losses.append([])
            for _ in range(4):
                x, y = MLP.data(gen)
                loss = loss_fn(model(x), y) / 4
                loss.backward()
                losses[-1].append(loss.item() * 4)
            grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters()})
            opt.step()
    trial = _trial(tmp_path)
    assert trial.steps() == [0, 1, 2]
    assert trial.tensor_names(collection="losses") == [f"losses/CrossEntropyLoss:{i}" for i in range(4)] + [
        f"losses/loss:{i}" for i in range(4)
    ]
    for step in range(3):
        for name, g in grads[step].items():
            np.testing.assert_array_equal(trial.tensor(f"gradients/{name}").value(step), g.numpy())
        for i in range(4):
            captured = float(trial.tensor(f"losses/CrossEntropyLoss:{i}").value(step))
            assert captured == pytest.approx(losses[step][i], rel=1e-6)  # the loss module's output, unscaled
            differentiated = float(trial.tensor(f"losses/loss:{i}").value(step))
            assert differentiated == pytest.approx(losses[step][i] / 4, rel=1e-6)  # what backward() was called on


class Shared(nn.Module):
    """One Linear applied three times, and a frozen layer."""

    def __init__(self) -> None:
        super().__init__()
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)
        self.block = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(torch.tanh(self.block(torch.tanh(self.block(self.frozen(x))))))


def test_module_called_three_times_and_frozen_parameters(tmp_path: Path) -> None:
    model = Shared()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x = torch.randn(3, 4)
    with ttt.capture(
        model,
        tmp_path,
        optimizer=opt,
        save_config=EVERY_STEP,
        include_collections=["weights", "biases", "gradients", "outputs", "inputs"],
    ):
        before = _params(model)
        opt.zero_grad()
        model(x).sum().backward()
        opt.step()
    trial = _trial(tmp_path)
    w, b = before["block.weight"], before["block.bias"]
    h = F.linear(x, before["frozen.weight"], before["frozen.bias"])
    expected = []
    for _ in range(3):
        h = F.linear(h, w, b)
        expected.append(h)
        h = torch.tanh(h)
    assert trial.tensor_names(regex="^outputs/block") == ["outputs/block:0", "outputs/block:1", "outputs/block:2"]
    assert trial.tensor_names(regex="^inputs/block") == ["inputs/block:0", "inputs/block:1", "inputs/block:2"]
    for i, e in enumerate(expected):
        np.testing.assert_allclose(trial.tensor(f"outputs/block:{i}").value(0), e.numpy(), rtol=1e-6, atol=1e-6)
    values = [trial.tensor(f"outputs/block:{i}").value(0) for i in range(3)]
    assert not np.array_equal(values[0], values[1]) and not np.array_equal(values[1], values[2])
    assert "gradients/frozen.weight" not in trial.tensor_names()
    assert "gradients/block.weight" in trial.tensor_names()
    np.testing.assert_array_equal(trial.tensor("frozen.weight").value(0), before["frozen.weight"].numpy())


def test_one_collection_given_as_a_string_is_one_collection(tmp_path: Path) -> None:
    """``save_tensor("t", v, "custom")`` saved ``t`` in collections c, u, s, t, o, m, and ``save_scalar("acc", v,
    "metrics")`` as ``m/acc``: the string was read letter by letter (smdebug's code passes one name so).
    smdebug's ``save_scalar(name, value, sm_metric=True)`` in third place is a TypeError that says what is
    expected, not "'bool' object is not iterable"."""
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(3)
    hook = ttt.capture(model, tmp_path, optimizer=opt, save_config=EVERY_STEP, include_collections=["losses"])
    x, y = MLP.data(gen)
    opt.zero_grad()
    loss = F.cross_entropy(model(x), y)
    hook.save_tensor("t", torch.arange(3.0), "custom")
    hook.save_scalar("acc", 0.5, "metrics")
    with pytest.raises(TypeError, match=r"^collections: expected a collection name or a list of them, got True$"):
        hook.save_scalar("acc", 0.5, True)  # type: ignore[arg-type]
    loss.backward()
    opt.step()
    hook.close()
    trial = tensortap.create_trial(tmp_path)
    assert trial.tensor_names(collection="custom") == ["t"] and trial.tensor_names(collection="metrics") == [
        "metrics/acc"
    ]
    assert float(trial.tensor("metrics/acc").value(0)) == 0.5
    with Writer(tmp_path / "writer") as w, w.stepping():
        w.save("v", np.ones(2), "custom")
    assert tensortap.create_trial(tmp_path / "writer").tensor_names(collection="custom") == ["v"]


def test_values_of_types_numpy_lacks_are_saved_as_float32_with_their_type(tmp_path: Path) -> None:
    """``hook.save_scalar("lr", bf16_tensor)`` raised TypeError (``.numpy()`` of a bfloat16 tensor) into the
    training loop at every saved step, and the Writer skipped an ml_dtypes bfloat16 array with a warning:
    SPEC §2 stores such types as float32 with the original dtype recorded (session 48's numerics hunt)."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hook = ttt.capture(model, tmp_path, optimizer=opt, save_config=EVERY_STEP, include_collections=["metrics"])
    x, y = MLP.data(torch.Generator().manual_seed(3))
    opt.zero_grad()
    loss = F.cross_entropy(model(x), y)
    hook.save_scalar("loss_bf16", loss.detach().to(torch.bfloat16))
    loss.backward()
    opt.step()
    hook.close()
    saved = tensortap.create_trial(tmp_path).tensor("metrics/loss_bf16")
    assert saved.summary()["orig_dtype"] == "bfloat16"
    assert saved.value(0).dtype == np.float32 and saved.value(0) == loss.detach().to(torch.bfloat16).float().item()
    given = np.array([1.5, -2.25, 3e38], dtype=ml_dtypes.bfloat16)
    with Writer(tmp_path / "writer") as w, w.stepping():
        w.save("bf16", given, "custom")
    written = tensortap.create_trial(tmp_path / "writer").tensor("bf16")
    assert written.summary()["orig_dtype"] == "bfloat16"
    np.testing.assert_array_equal(written.value(0), given.astype(np.float32))


def test_eval_and_predict_steps_count_in_their_own_modes(tmp_path: Path) -> None:
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(3)
    hook = ttt.capture(model, tmp_path, optimizer=opt, loss=loss_fn, save_config=EVERY_STEP)

    def train_step() -> None:
        hook.save_scalar("lr", 0.1)  # a value given after optimizer.step() belongs to the next step
        x, y = MLP.data(gen)
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()

    eval_losses = []
    for _ in range(2):
        train_step()
    model.eval()  # detected
    with torch.no_grad():
        for _ in range(3):
            x, y = MLP.data(gen)
            eval_losses.append(loss_fn(model(x), y).item())
    model.train()
    train_step()
    hook.set_mode(Mode.PREDICT)  # explicit
    with torch.no_grad():
        model(torch.randn(2, 6))
    hook.close()

    trial = _trial(tmp_path)
    assert trial.modes() == [Mode.TRAIN, Mode.EVAL, Mode.PREDICT]
    assert trial.steps() == list(range(7))
    assert trial.steps(mode=Mode.TRAIN) == [0, 1, 2]
    assert trial.steps(mode=Mode.EVAL) == [0, 1, 2]
    assert trial.steps(mode=Mode.PREDICT) == [0]
    assert trial.tensor("metrics/lr").steps(mode=Mode.TRAIN) == [0, 1, 2]
    loss = trial.tensor("losses/CrossEntropyLoss")
    assert [float(loss.value(s, mode=Mode.EVAL)) for s in range(3)] == pytest.approx(eval_losses, rel=1e-7)
    assert loss.steps(mode=Mode.PREDICT) == []


@pytest.mark.parametrize("last", [3, 2])
def test_a_step_opened_by_a_value_is_saved_as_its_mode_says(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, last: int
) -> None:
    """``save_scalar`` after ``optimizer.step()`` opens a step that the next forward makes an EVAL step: whether it
    is saved is the EVAL interval's decision, not that of the TRAIN step it was opened as (found by the docs
    audit: EVAL steps 0, 1, 2 saved with ``save_interval=2``). A scalar given while it was an unsaved TRAIN step
    is lost when it becomes a saved EVAL step: said in one warning."""
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hook = ttt.capture(model, tmp_path, optimizer=opt, save_config=SaveConfig(save_interval=2))
    gen = torch.Generator().manual_seed(8)
    with caplog.at_level(logging.WARNING, logger="tensortap"):
        for i in range(12):
            x, y = MLP.data(gen)
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            hook.save_scalar("lr", 0.1)  # opens TRAIN step i + 1 (saved when even)...
            if i % 4 == last:  # ... which this forward makes EVAL step 0, 1, 2
                model.eval()
                with torch.no_grad():
                    model(x)
                model.train()
    hook.close()
    trial = _trial(tmp_path)
    assert trial.steps(mode=Mode.EVAL) == [0, 2]
    assert trial.steps(mode=Mode.TRAIN) == list(range(0, 12 if last == 3 else 13, 2))  # 12: the last scalar's
    assert trial.tensor("fc1.weight").steps(mode=Mode.EVAL) == [0, 2]
    lost = [r.getMessage() for r in caplog.records if "before its forward were not saved" in r.getMessage()]
    if last == 3:  # opened as saved TRAIN steps 4, 8, 12
        assert trial.tensor("metrics/lr").steps(mode=Mode.EVAL) == [0, 2]
        assert lost == []
    else:  # opened as unsaved TRAIN steps 3, 7, 11
        assert trial.tensor("metrics/lr").steps(mode=Mode.EVAL) == []
        assert len(lost) == 1 and "EVAL step 0" in lost[0]


def test_save_interval_and_no_work_on_unsaved_steps(tmp_path: Path) -> None:
    class CountingOps(ttt.TorchOps):
        def __init__(self) -> None:
            self.calls: list[int] = []

        def prepare(self, value: Any, keys: Any, raw: bool) -> Any:
            self.calls.append(hook.step)
            return super().prepare(value, keys, raw)

    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_fn = nn.CrossEntropyLoss()
    hook = ttt.capture(
        model,
        tmp_path,
        optimizer=opt,
        loss=loss_fn,
        save_config=SaveConfig(save_interval=3),
        include_collections=["weights", "gradients", "losses", "outputs", "inputs"],
    )
    hook.ops = CountingOps()
    gen = torch.Generator().manual_seed(4)
    for _ in range(7):
        x, y = MLP.data(gen)
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
        hook.save_scalar("lr", 0.1)
    hook.close()
    assert sorted(set(hook.ops.calls)) == [0, 3, 6]
    trial = _trial(tmp_path)
    assert trial.steps() == [0, 3, 6]
    assert trial.last_complete_step() == 6
    assert trial.tensor("gradients/fc1.weight").steps() == [0, 3, 6]


def test_training_without_optimizer_steps_per_forward(tmp_path: Path) -> None:
    model = MLP()
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(5)
    seen = []
    with ttt.Hook(
        tmp_path, save_config=EVERY_STEP, include_collections=["weights", "biases", "gradients", "losses"]
    ) as hook:
        hook.register_module(model)
        hook.register_loss(loss_fn, name="xent")
        for _ in range(3):
            model.zero_grad()
            x, y = MLP.data(gen)
            loss = loss_fn(model(x), y)
            loss.backward()
            grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.1 * p.grad
            seen.append((grads, _params(model), loss.item()))
    trial = _trial(tmp_path)
    assert trial.steps() == [0, 1, 2]
    for step, (grads, after, loss) in enumerate(seen):
        for name in grads:
            np.testing.assert_array_equal(trial.tensor(f"gradients/{name}").value(step), grads[name].numpy())
            np.testing.assert_array_equal(trial.tensor(name).value(step), after[name].numpy())
        assert float(trial.tensor("losses/xent").value(step)) == pytest.approx(loss, rel=1e-7)


def test_save_tensor_save_scalar_and_reductions(tmp_path: Path) -> None:
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hook = ttt.Hook(
        tmp_path,
        save_config=EVERY_STEP,
        include_collections=["gradients"],
        reduction_config=ReductionConfig(reductions=["mean", "nan_count"], norms=["l2"]),
    )
    hook.register_module(model)
    hook.attach_optimizer(opt)
    model(torch.randn(4, 6)).sum().backward()
    grad = model.fc1.weight.grad.detach().clone()
    t = torch.tensor([1.0, float("nan"), 3.0])
    hook.save_tensor("my/tensor", t, collections=["custom"])
    hook.save_scalar("loss_scale", torch.tensor(2.5), collections=["metrics"])
    opt.step()
    hook.close()
    trial = _trial(tmp_path)
    assert trial.tensor_names() == sorted(
        ["my/tensor", "metrics/loss_scale"] + [f"gradients/{n}" for n, _ in model.named_parameters()]
    )
    g = trial.tensor("gradients/fc1.weight")
    assert g.reduction_value(0, "mean") == pytest.approx(grad.double().mean().item(), rel=1e-12)
    assert g.reduction_value(0, "l2") == pytest.approx(float(np.sqrt((grad.double().numpy() ** 2).sum())), rel=1e-12)
    with pytest.raises(tensortap.TensorUnavailableForStep):
        g.value(0)
    assert trial.tensor("my/tensor").reduction_value(0, "nan_count") == 1.0
    assert trial.tensor("metrics/loss_scale").reduction_value(0, "mean") == 2.5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.bool])
def test_torch_ops_prepare_matches_numpy_formulas(dtype: torch.dtype) -> None:
    from tensortap import reductions as red

    base = torch.tensor([[0.0, -1.5, 2.25], [float("inf"), float("nan"), 3.0]])
    if dtype in (torch.int64, torch.bool):
        base = torch.tensor([[0, -1, 2], [5, 0, 3]])
    t = base.to(dtype)
    keys = [
        "min",
        "max",
        "mean",
        "std",
        "variance",
        "sum",
        "prod",
        "l1",
        "l2",
        "abs_mean",
        "abs_max",
        "nan_count",
        "inf_count",
        "zero_count",
    ]
    raw, values, orig = ttt.TorchOps().prepare(t, keys, raw=True)
    assert raw is not None
    assert orig == ("bfloat16" if dtype == torch.bfloat16 else None)
    assert ttt.TorchOps().prepare(t, [], raw=False) == (None, {}, orig)  # a histogram alone: the dtype only
    reference = t.float().numpy() if dtype == torch.bfloat16 else t.numpy()
    np.testing.assert_array_equal(raw, reference)
    expected = red.compute_many(reference, keys)
    for key in keys:
        assert values[key] == pytest.approx(expected[key], rel=1e-12, nan_ok=True), key
    empty_raw, empty_values, _ = ttt.TorchOps().prepare(torch.empty(0, 3), ["mean", "sum"], raw=True)
    assert empty_raw is not None and empty_raw.shape == (0, 3)
    assert np.isnan(empty_values["mean"]) and empty_values["sum"] == 0.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_torch_ops_on_cuda_pinned_copy_and_device_reductions() -> None:
    t = torch.randn(64, 33, device="cuda").to(torch.bfloat16)
    raw, values, orig = ttt.TorchOps().prepare(t, ["mean", "l2", "nan_count"], raw=True)
    reference = t.float().cpu().numpy()
    assert orig == "bfloat16"
    np.testing.assert_array_equal(raw, reference)
    assert values["mean"] == pytest.approx(float(reference.astype(np.float64).mean()), rel=1e-9)
    assert values["l2"] == pytest.approx(float(np.sqrt((reference.astype(np.float64) ** 2).sum())), rel=1e-9)
    raw_only, _, _ = ttt.TorchOps().prepare(t.float(), [], raw=True)  # no reductions: the copy is waited for
    np.testing.assert_array_equal(raw_only, reference)


def test_unwritable_out_dir_logs_once_and_training_continues(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with caplog.at_level(logging.ERROR, logger="tensortap"):
        hook = ttt.capture(model, blocker / "trial", optimizer=opt, save_config=EVERY_STEP)
        for _ in range(3):
            opt.zero_grad()
            model(torch.randn(4, 6)).sum().backward()
            opt.step()
        hook.close()
    assert hook.failed
    assert len([r for r in caplog.records if r.name == "tensortap"]) == 1
    with pytest.raises(RuntimeError, match="tensortap"):
        ttt.capture(model, blocker / "trial", optimizer=opt, strict=True)


def test_an_in_process_stop_stops_the_training_when_the_trial_refuses_its_request(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The stop request cannot be written (a folder in its place): the training stops all the same, with a
    warning that other readers of the trial will not see the request; the rule stays on."""
    from tensortap.rules import ExplodingTensor, StopTraining

    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=1e4)  # diverges to infinity, then NaN, in a few steps
    rule = ExplodingTensor(only_nan=True).add_action(StopTraining())
    hook = ttt.capture(
        model,
        tmp_path,
        optimizer=opt,
        save_config=EVERY_STEP,
        include_collections=["losses"],
        raise_on_stop=True,
        rules=[rule],
    )
    (tmp_path / "control" / "stop.json").mkdir(parents=True)  # where the request would go
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    steps = 0
    with caplog.at_level(logging.WARNING, logger="tensortap"), pytest.raises(tensortap.StopTrainingRequested):
        for _ in range(50):
            opt.zero_grad()
            F.mse_loss(model(x), y).backward()
            opt.step()
            steps += 1
    hook.close()
    assert rule.fired_steps and steps <= rule.fired_steps[0] + 1
    messages = [r.getMessage() for r in caplog.records]
    assert any("stop request" in m and "could not be written" in m for m in messages), messages
    assert not any("switched off" in m for m in messages)


def test_stop_request_sets_should_stop_and_raises_on_opt_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ttt.Hook, "stop_poll_seconds", 0.0)
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hook = ttt.capture(model, tmp_path, optimizer=opt, save_config=EVERY_STEP, raise_on_stop=True)
    steps_done = 0
    with pytest.raises(tensortap.StopTrainingRequested, match="loss diverged"):
        for step in range(10):
            if step == 2:
                _trial(tmp_path).request_stop("loss diverged")
            opt.zero_grad()
            model(torch.randn(4, 6)).sum().backward()
            opt.step()
            steps_done += 1
    assert steps_done == 2  # the third optimizer step completed, then raised
    assert hook.should_stop and hook.stop_reason == "loss diverged"
    trial = _trial(tmp_path)
    assert trial.steps() == [0, 1, 2]
    assert trial.end_reasons() == {"worker_0": "stop_request"}


def test_should_stop_without_raising(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ttt.Hook, "stop_poll_seconds", 0.0)
    model = MLP()
    with ttt.capture(model, tmp_path, save_config=EVERY_STEP) as hook:
        model(torch.randn(2, 6))
        assert not hook.should_stop
        _trial(tmp_path).request_stop("enough")
        assert hook.should_stop
        model(torch.randn(2, 6))  # nothing raises without raise_on_stop
    assert _trial(tmp_path).end_reasons() == {"worker_0": "stop_request"}


def test_compiled_module_warns_at_registration(tmp_path: Path) -> None:
    compiled = torch.compile(MLP())
    with ttt.Hook(tmp_path, include_collections=["weights", "outputs"]) as hook:
        with pytest.warns(UserWarning, match="torch.compile"):
            hook.register_module(compiled)
    assert compiled.fc1 is not None


def _train_and_evaluate(model: nn.Module, out: Path, compile_in_place: bool) -> tensortap.Trial:
    """Three iterations of a training step and an evaluation forward, all of ``MLP``'s collections saved."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    if compile_in_place:
        model.compile(backend="eager")  # Dynamo traces the calls as inductor's would; eager runs the graphs fast
    gen = torch.Generator().manual_seed(1)
    collections = ["weights", "biases", "gradients", "losses", "outputs"]
    with ttt.capture(model, out, optimizer=opt, save_config=EVERY_STEP, include_collections=collections):
        for _ in range(3):
            x, y = MLP.data(gen)
            model.train()
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            model.eval()
            with torch.no_grad():
                model(x)
    return _trial(out)


def test_a_module_compiled_in_place_before_registration_is_captured_as_uncompiled(tmp_path: Path) -> None:
    """hunt 50 F1: ``model.compile()`` (in place: its calls, hooks included, run compiled) before registration:
    tensortap's hooks on it were traced into the compiled code and ran once, for the tracer, so its forwards
    were unseen: no EVAL step and no outputs (with a warning that it was compiled "after register_module()").
    Now its hooks run between the compiled graphs: the trial is that of the model uncompiled, but for the
    outputs of its submodules (inside the compiled code, named in the warning at registration)."""
    torch.manual_seed(0)
    compiled, plain = MLP(), MLP()
    plain.load_state_dict(compiled.state_dict())
    with pytest.warns(UserWarning, match="outputs and inputs of its submodules are not captured"):
        got = _train_and_evaluate(compiled, tmp_path / "compiled", compile_in_place=True)
    want = _train_and_evaluate(plain, tmp_path / "plain", compile_in_place=False)
    for mode in (Mode.TRAIN, Mode.EVAL):
        assert got.steps(mode=mode) == want.steps(mode=mode) == [0, 1, 2]
    assert got.tensor_names(collection="outputs") == ["outputs/MLP"]
    assert set(got.tensor_names()) == set(want.tensor_names()) - {f"outputs/{n}" for n in ("fc1", "relu", "fc2")}
    for name in got.tensor_names():
        tensor, expected = got.tensor(name), want.tensor(name)
        assert tensor.steps() == expected.steps(), name
        for step in tensor.steps():
            np.testing.assert_allclose(tensor.value(step), expected.value(step), rtol=1e-6, err_msg=name)


def test_a_module_compiled_in_place_after_registration_is_named_so_in_the_warning(tmp_path: Path) -> None:
    """hunt 50 F1: ``model.compile()`` after registration: tensortap's hooks on it are traced into the compiled
    code, its forwards unseen; the one warning says how it was compiled and when, and to compile it before
    registering it (its advice was to register ``torch.compile(model)`` even for a model compiled before)."""
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with ttt.capture(model, tmp_path, optimizer=opt, save_config=EVERY_STEP, include_collections=["outputs"]):
        model.compile(backend="eager")
        with pytest.warns(UserWarning, match=r"compiled in place with its compile\(\) method after register_module"):
            model(torch.randn(2, 6)).sum().backward()
            opt.step()


def _train_in_a_compiled_step(model: nn.Module, out: Path, compiled: str) -> tensortap.Trial:
    """Three training iterations of ``MLP`` whose forward and loss run in a function compiled with ``torch.compile``
    (``compiled``: "fullgraph", "graph breaks", or "" for none), backward and ``optimizer.step()`` outside it."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def forward_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(x), y)

    if compiled:
        forward_loss = torch.compile(forward_loss, backend="eager", fullgraph=compiled == "fullgraph")
    gen = torch.Generator().manual_seed(1)
    collections = ["weights", "biases", "gradients", "losses", "outputs"]
    with ttt.capture(model, out, optimizer=opt, save_config=EVERY_STEP, include_collections=collections):
        for _ in range(3):
            opt.zero_grad()
            forward_loss(*MLP.data(gen)).backward()
            opt.step()
    return _trial(out)


@pytest.mark.parametrize("in_place", [False, True], ids=["plain", "compiled in place"])
@pytest.mark.parametrize("compiled", ["fullgraph", "graph breaks"])
def test_a_model_called_in_a_compiled_function_trains_as_without_tensortap(
    tmp_path: Path, compiled: str, in_place: bool
) -> None:
    """review 58 D2: a registered model called in a function compiled with ``torch.compile(fn, fullgraph=True)``
    (``@torch.compile(fullgraph=True) def train_step``) stopped the training: Dynamo traced tensortap's forward
    pre-hook, whose ``with`` on a lock (the recursion limit it lends) it cannot trace ("Unsupported context
    manager"); a model compiled in place (``model.compile()``) before registration, whose hooks are disabled for
    Dynamo, stopped it too ("Skip inlining torch.compiler.disable()d function"). Now a hook traced where the graph
    may not break does nothing but set a flag, told of in one warning from eager code: the trial is that of the
    model uncompiled but for its forwards in the compiled function (outputs), values equal. Where the graph may
    break, the hooks run as before: a model compiled in place is captured whole, a plain one as unseen."""
    torch.manual_seed(0)
    model, plain = MLP(), MLP()
    plain.load_state_dict(model.state_dict())
    if in_place:
        model.compile(backend="eager")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        got = _train_in_a_compiled_step(model, tmp_path / "compiled", compiled)
    want = _train_in_a_compiled_step(plain, tmp_path / "plain", compiled="")
    unseen = [str(w.message) for w in record if "are not seen" in str(w.message)]
    assert got.steps(mode=Mode.TRAIN) == want.steps(mode=Mode.TRAIN) == [0, 1, 2]
    outputs = {f"outputs/{n}" for n in ("MLP", "fc1", "relu", "fc2")}
    if in_place and compiled == "graph breaks":  # the hooks run between the graphs (hunt 50 F1)
        assert not unseen
        assert set(got.tensor_names()) == set(want.tensor_names()) - outputs | {"outputs/MLP"}
    else:
        how = "compiled in place with its compile() method;" if in_place else "called in code compiled with"
        assert len(unseen) == 1 and unseen[0].startswith(f"tensortap: MLP was {how}"), unseen
        assert set(got.tensor_names()) == set(want.tensor_names()) - outputs
    for name in got.tensor_names():
        tensor, expected = got.tensor(name), want.tensor(name)
        assert tensor.steps() == expected.steps(), name
        for step in tensor.steps():
            np.testing.assert_allclose(tensor.value(step), expected.value(step), rtol=1e-6, err_msg=name)
    for (name, p), q in zip(model.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p, q, msg=name)  # trained as the model uncompiled was


def _train_with_autograd_grad(model: nn.Module) -> None:
    """Ten iterations of ``MLP``: ``torch.autograd.grad(loss, params)`` in a function compiled with
    ``fullgraph=True``, the parameters updated with the gradients outside it."""
    params = list(model.parameters())

    def gradients(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return torch.autograd.grad(F.cross_entropy(model(x), y), params)

    compiled = torch.compile(gradients, backend="eager", fullgraph=True)
    gen = torch.Generator().manual_seed(1)
    for _ in range(10):  # more than Dynamo's recompile limit (8)
        grads = compiled(*MLP.data(gen))
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                p -= 0.1 * g


def test_autograd_grad_in_a_fullgraph_compiled_function_trains_as_without_tensortap_and_is_named_in_a_warning(
    tmp_path: Path,
) -> None:
    """review 58 D2 follow-up: ``torch.autograd.grad`` called in a function compiled with ``fullgraph=True`` ran
    tensortap's bookkeeping of its losses and gradients for the tracer only: nothing of it was captured, without a
    warning, and what it read made Dynamo recompile at each call (with torch's own ``autograd.grad`` traced
    without its checks, past the recompile limit the training failed). Now the traced wrapper is torch's
    function alone: the training is that without tensortap, and one warning names ``torch.autograd.grad``."""
    import torch._dynamo

    if not hasattr(torch._dynamo.config, "trace_autograd_ops"):
        pytest.skip("this torch has no trace_autograd_ops: torch.autograd.grad is refused in fullgraph mode")
    torch.manual_seed(0)
    model, plain = MLP(), MLP()
    plain.load_state_dict(model.state_dict())
    with torch._dynamo.config.patch(trace_autograd_ops=True):  # else torch itself refuses it (fullgraph)
        _train_with_autograd_grad(plain)
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            with ttt.capture(model, tmp_path, save_config=EVERY_STEP):
                _train_with_autograd_grad(model)
    grad_warnings = [str(w.message) for w in record if "torch.autograd.grad" in str(w.message)]
    assert len(grad_warnings) == 1 and grad_warnings[0].startswith(
        "tensortap: torch.autograd.grad was called in code torch.compile compiled with fullgraph=True; the losses "
        "and gradients it returned there are not captured"
    ), grad_warnings
    for (name, p), q in zip(model.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p, q, msg=name)


def test_a_registered_loss_called_in_a_fullgraph_compiled_function_is_named_in_a_warning(tmp_path: Path) -> None:
    """review 58 D2 follow-up: a loss module given to ``register_loss`` and called in a function compiled with
    ``fullgraph=True`` (the model outside it) was not saved under its name, without a warning: its tap, traced,
    does nothing, and the backward on its value saved it as ``losses/loss``. One warning now names it."""
    model, criterion = MLP(), nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_of = torch.compile(lambda out, y: criterion(out, y), backend="eager", fullgraph=True)
    gen = torch.Generator().manual_seed(1)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        hook = ttt.capture(model, tmp_path, optimizer=opt, save_config=EVERY_STEP, include_collections=["losses"])
        hook.register_loss(criterion)
        for _ in range(3):
            opt.zero_grad()
            x, y = MLP.data(gen)
            loss_of(model(x), y).backward()
            opt.step()
        hook.close()
    assert [str(w.message).split(";")[0] for w in record] == [
        "tensortap: the loss CrossEntropyLoss (register_loss) was called in code torch.compile compiled with "
        "fullgraph=True"
    ]
    assert _trial(tmp_path).tensor_names() == ["losses/loss"]


def test_a_model_called_only_in_a_fullgraph_compiled_function_is_named_in_the_warning_at_close(tmp_path: Path) -> None:
    """review 58 D2: predictions of a registered model in a function compiled with ``fullgraph=True``, no backward
    and no optimizer after them: the predictions are those without tensortap (before: "Unsupported context
    manager"), and the one warning naming the model comes at ``close`` (nothing else runs eagerly to give it)."""
    model = MLP()
    predict = torch.compile(lambda x: model(x).argmax(-1), backend="eager", fullgraph=True)
    x = torch.randn(4, 6)
    want = model(x).argmax(-1)
    hook = ttt.capture(model, tmp_path, save_config=EVERY_STEP, include_collections=["outputs"])
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(2):
            torch.testing.assert_close(predict(x), want)
        assert not record
        hook.close()
    assert [str(w.message).split(";")[0] for w in record] == [
        "tensortap: MLP was called in code compiled with torch.compile (a compiled function, or torch.compile(model) "
        "since)"
    ]
    assert _trial(tmp_path).steps() == []


def test_a_compiled_submodule_is_named_as_the_module_inside(tmp_path: Path) -> None:
    """``model.fc1 = torch.compile(model.fc1)`` gave ``fc1._orig_mod.weight``: a model compiled whole is named
    without ``_orig_mod.``, and so is one compiled part by part (as the Lightning and Transformers adapters)."""
    torch.manual_seed(0)
    model = MLP()
    plain = [n for n, _ in model.named_parameters()]
    model.fc1 = torch.compile(model.fc1)  # type: ignore[assignment]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(1)
    applied = []
    with ttt.capture(model, tmp_path, optimizer=opt, save_config=EVERY_STEP):
        for _ in range(2):
            x, y = MLP.data(gen)
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            applied.append({n.replace("_orig_mod.", ""): p.grad.clone() for n, p in model.named_parameters()})
            opt.step()
    trial = _trial(tmp_path)
    assert sorted(trial.tensor_names(collection="weights") + trial.tensor_names(collection="biases")) == sorted(plain)
    for step, grads in enumerate(applied):
        for name, grad in grads.items():
            np.testing.assert_array_equal(trial.tensor(f"gradients/{name}").value(step), grad.numpy())
    for raw, p in model.named_parameters():
        np.testing.assert_array_equal(trial.tensor(raw.replace("_orig_mod.", "")).value(1), p.detach().numpy())


def test_an_orig_mod_name_of_a_module_never_compiled_is_kept(tmp_path: Path) -> None:
    """Only the ``_orig_mod`` of a compiled module is left out of names: a parameter named ``_orig_mod`` was saved
    as ``''`` (at the top) or under its module's name, and a plain submodule named ``_orig_mod`` lost its outputs
    and had its parameters renamed (session 49's hunt 22)."""

    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self._orig_mod = nn.Parameter(torch.ones(2))
            self.inner = nn.Module()
            self.inner._orig_mod = nn.Linear(2, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner._orig_mod(x * self._orig_mod)

    torch.manual_seed(0)
    model = Odd()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with ttt.capture(model, tmp_path, optimizer=opt, include_collections=["weights", "biases", "gradients", "outputs"]):
        opt.zero_grad()
        model(torch.ones(3, 2)).sum().backward()
        opt.step()
    trial = _trial(tmp_path)
    names = [n for n, _ in model.named_parameters()]
    assert names == ["_orig_mod", "inner._orig_mod.weight", "inner._orig_mod.bias"]
    assert sorted(trial.tensor_names(collection="weights") + trial.tensor_names(collection="biases")) == sorted(names)
    assert sorted(trial.tensor_names(collection="gradients")) == sorted(f"gradients/{n}" for n in names)
    assert "outputs/inner._orig_mod" in trial.tensor_names(collection="outputs")
    for name, p in model.named_parameters():
        np.testing.assert_array_equal(trial.tensor(name).value(0), p.detach().numpy())


def test_from_json_builds_a_torch_hook(tmp_path: Path) -> None:
    cfg = tmp_path / "cfg.json"
    cfg.write_text('{"save_config": {"save_interval": 2}, "include_collections": ["weights"], "raise_on_stop": true}')
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hook = ttt.Hook.from_json(cfg, out_dir=tmp_path / "trial")
    assert isinstance(hook, ttt.Hook) and hook.raise_on_stop
    hook.register_module(model)
    hook.attach_optimizer(opt)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(2, 6)).sum().backward()
        opt.step()
    hook.close()
    trial = _trial(tmp_path / "trial")
    assert trial.steps() == [0, 2]
    assert trial.tensor_names() == ["fc1.weight", "fc2.weight"]


def test_a_with_block_left_by_an_exception_ends_with_the_reason_exception(tmp_path: Path) -> None:
    """``with ttt.capture(...) as hook:`` left by an exception ended with the reason ``closed``, as a
    training that finished: a reader could not tell them apart. The step it interrupted is dropped."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    with pytest.raises(ValueError, match="bad batch"):
        with ttt.capture(model, tmp_path, optimizer=opt, save_config=SaveConfig(save_interval=1)):
            for step in range(5):
                opt.zero_grad()
                loss = F.cross_entropy(model(torch.ones(2, 4) * step), torch.tensor([0, 1]))
                loss.backward()
                if step == 3:
                    raise ValueError("bad batch")  # after backward: step 3 is half recorded
                opt.step()
                losses.append(float(loss))
    trial = _trial(tmp_path)
    assert trial.end_reasons() == {"worker_0": "exception"}
    assert json.loads((tmp_path / "end" / "worker_0.json").read_text())["error"] == "ValueError: bad batch"
    assert trial.steps() == [0, 1, 2]
    assert [float(v) for v in trial.tensor("losses/loss").values().values()] == losses
    with ttt.capture(nn.Linear(2, 2), tmp_path / "ok"):
        pass
    assert _trial(tmp_path / "ok").end_reasons() == {"worker_0": "closed"}


def test_exit_without_close_keeps_the_last_step(tmp_path: Path) -> None:
    code = (
        "import sys, torch, tensortap, tensortap.torch as ttt\n"
        "torch.set_num_threads(1)\n"
        "m = torch.nn.Linear(3, 2); opt = torch.optim.SGD(m.parameters(), lr=0.1)\n"
        "hook = ttt.capture(m, sys.argv[1], optimizer=opt, save_config=tensortap.SaveConfig(save_interval=1))\n"
        "for _ in range(3):\n"
        "    opt.zero_grad(); m(torch.randn(4, 3)).sum().backward(); opt.step()\n"
        "print(m.weight.detach().numpy().tolist())\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    trial = _trial(tmp_path)
    assert trial.steps() == [0, 1, 2]
    assert trial.end_reasons() == {"worker_0": "exit"}
    np.testing.assert_array_equal(trial.tensor("weight").value(2), np.array(json.loads(out.stdout), dtype=np.float32))


def test_missing_torch_gives_an_install_hint() -> None:
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import tensortap\n"
        "try:\n    import tensortap.torch\nexcept ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert 'pip install "tensortap[torch]"' in out.stdout


@pytest.mark.parametrize("adapter", ["torch", "lightning", "transformers"])
def test_a_torch_older_than_the_bound_fails_at_import_naming_the_version(adapter: str) -> None:
    """torch 2.5 has no ``torch.distributed.fsdp.FSDPModule``: the adapters refuse it at import, not at
    registration with torch's own ImportError (the Lightning and Transformers callbacks too)."""
    pytest.importorskip(adapter)
    code = (
        "import torch\n"
        "torch.__version__ = '2.5.1+cpu'\n"
        f"try:\n    import tensortap.{adapter}\nexcept ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.startswith("tensortap.torch needs PyTorch 2.6 or newer, not 2.5.1+cpu"), out.stdout


@pytest.mark.slow
def test_ddp_two_ranks_with_torchrun(tmp_path: Path) -> None:
    worker = Path(__file__).with_name("ddp_worker.py")
    out, rec = tmp_path / "trial", tmp_path / "rec"
    rec.mkdir()
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        str(worker),
        str(out),
        str(rec),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    trial = _trial(out)
    assert trial.workers() == ["worker_0", "worker_1"]
    records = {r: np.load(rec / f"rank{r}.npz") for r in (0, 1)}
    # rank 0 asked to stop after step 2; the ranks agree every 10 steps and both raise after step 10
    assert int(records[0]["stopped_at"]) == int(records[1]["stopped_at"]) == 10
    assert trial.steps() == list(range(11))
    assert trial.end_reasons() == {"worker_0": "stop_request", "worker_1": "stop_request"}
    names = [n for n, _ in nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).named_parameters()]
    for r, record in records.items():
        for step in range(3):
            for name in names:
                g = trial.tensor(f"gradients/{name}")
                assert g.workers(step) == ["worker_0", "worker_1"]
                np.testing.assert_array_equal(g.value(step, worker=f"worker_{r}"), record[f"grad/{step}/{name}"])
            loss = trial.tensor("losses/CrossEntropyLoss").value(step, worker=f"worker_{r}")
            assert float(loss) == pytest.approx(float(record[f"loss/{step}"]), rel=1e-7)
    # weights are identical across ranks and saved from rank 0 only
    for step in range(3):
        w = trial.tensor("0.weight")
        assert w.workers(step) == ["worker_0"]
        np.testing.assert_array_equal(w.value(step), records[1][f"param/{step}/0.weight"])
    # DDP averages gradients: each rank saw the same p.grad, different losses
    np.testing.assert_allclose(records[0]["grad/0/0.weight"], records[1]["grad/0/0.weight"], rtol=1e-6)
    assert records[0]["loss/0"] != records[1]["loss/0"]


@pytest.mark.slow
def test_ddp_a_live_reader_waits_for_a_rank_that_starts_late(tmp_path: Path) -> None:
    """Rank 0 of a DDP training starts capturing after rank 1 has trained and closed (slow data loading on
    one rank). A live reader took the run for ended, and rank 1's steps for complete, before rank 0 wrote
    anything: readers knew only the workers that had written their record. Each hook is given the process
    group's world size (``world_size=dist.get_world_size()``), and the reader waits for every rank of it."""
    worker = Path(__file__).with_name("ddp_late_worker.py")
    out, go = tmp_path / "trial", tmp_path / "go"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "RANK"}
    logs = [(tmp_path / f"rank{rank}.log").open("w") for rank in (0, 1)]
    procs = [
        subprocess.Popen(
            [sys.executable, str(worker), str(rank), str(port), str(out), str(go)],
            env=env,
            stdout=logs[rank],
            stderr=subprocess.STDOUT,
        )
        for rank in (1, 0)
    ]
    try:
        trial = tensortap.create_trial(out, wait=True, timeout=120)
        deadline = time.monotonic() + 120
        while "worker_1" not in trial.end_reasons() and time.monotonic() < deadline:  # rank 1 closed
            time.sleep(0.1)
        assert trial.end_reasons() == {"worker_1": "closed"}
        assert trial.steps(show_incomplete=True) == [0, 1, 2]
        assert trial.workers() == ["worker_0", "worker_1"]
        assert not trial.training_ended
        assert trial.steps() == [] and trial.last_complete_step() is None
        with pytest.raises(tensortap.StepNotYetAvailable):
            trial.wait_for_steps([0], timeout=0)
        go.touch()  # rank 0 starts
        trial.wait_for_steps([0, 1, 2], timeout=120)
        assert [p.wait(timeout=120) for p in procs] == [0, 0], [(tmp_path / f"rank{r}.log").read_text() for r in (0, 1)]
        trial.refresh()
        assert trial.training_ended and trial.steps() == [0, 1, 2] and trial.last_complete_step() == 2
        assert json.loads((out / "workers" / "worker_0.json").read_text())["world_size"] == 2
    finally:
        go.touch()
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in logs:
            log.close()


def test_value_is_copied_when_captured_not_later(tmp_path: Path) -> None:
    """An in-place ReLU overwrites the linear layer's output after the hook saw it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(inplace=True))
    x = torch.randn(16, 4)
    with torch.no_grad():
        expected = model[0](x).numpy().copy()
    assert (expected < 0).any()
    hook = ttt.capture(
        model, tmp_path / "run", save_config=tensortap.SaveConfig(save_interval=1), include_collections=["outputs"]
    )
    model(x)
    hook.close()
    captured = tensortap.create_trial(tmp_path / "run").tensor("outputs/0").value(0)
    np.testing.assert_array_equal(captured, expected)


class Nest(nn.Module):
    """``depth`` modules, each calling the next, around a linear layer: ``inner.inner. ... .inner``."""

    def __init__(self, depth: int) -> None:
        super().__init__()
        self.inner: nn.Module = Nest(depth - 1) if depth else nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


def _free_frames() -> int:
    """How many more nested Python calls the recursion limit allows here."""

    def down(n: int) -> int:
        try:
            return down(n + 1)
        except RecursionError:
            return n

    return down(0)


def test_a_model_nested_near_the_recursion_limit_runs_captured(tmp_path: Path) -> None:
    """An outputs hook on every submodule adds a frame per nesting level (torch's hooked call path): a model
    that runs bare with 200 frames left must run captured too, its innermost output saved, the limit restored."""
    depth = 44  # with 200 frames left it runs bare up to 48 levels; with a frame more a level, up to 36
    model = Nest(depth)
    x = torch.randn(1, 2)
    limit = sys.getrecursionlimit()

    def step_with_200_frames_left() -> int:
        """One training step under a limit 200 frames above here; how much it changed that limit."""
        tight = limit - _free_frames() + 200
        sys.setrecursionlimit(tight)
        try:
            model(x).sum().backward()
            return sys.getrecursionlimit() - tight
        finally:
            sys.setrecursionlimit(limit)

    model(x).sum().backward()  # what torch imports at its first backward, imported at the usual limit
    step_with_200_frames_left()  # bare: the test's own premise
    hook = ttt.capture(model, tmp_path / "run", save_config=EVERY_STEP, include_collections=["outputs"])
    try:
        model(x).sum().backward()  # step 0, and what capture imports, at the usual limit
        changed = step_with_200_frames_left()  # step 1
    finally:
        hook.close()
    assert not hook.failed
    assert changed == 0  # frames lent for the forward only
    innermost = ".".join(["inner"] * (depth + 1))
    np.testing.assert_allclose(
        tensortap.create_trial(tmp_path / "run").tensor("outputs/" + innermost).value(1),
        model.get_submodule(innermost)(x).detach().numpy(),
        rtol=1e-6,
    )
