"""A step's tensors taken into a batch (as CUDA tensors are) store what tensors prepared one by one store.

The batch (:mod:`tensortap.capture.torch.batch`) is made for CUDA tensors; these
tests have it take CPU tensors too (``batched = {"cpu"}``), so that the same code
runs here on real trainings, beside the same trainings with every tensor
prepared when it is offered. ``python -m bench.gpu_check`` runs it on CUDA.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import tensortap  # noqa: E402
import tensortap.torch as ttt  # noqa: E402
from tensortap import ReductionConfig, SaveConfig  # noqa: E402
from tensortap.capture.torch import batch as batch_module  # noqa: E402

pytestmark = [pytest.mark.torch, pytest.mark.usefixtures("torch_one_thread")]

EVERY_STEP = SaveConfig(save_interval=1)
STEPS = 4
KEYS = ReductionConfig(
    reductions=["mean", "max", "min", "sum"], abs_reductions=["max", "mean"], norms=["l1", "l2"], save_raw_tensor=True
)


class BatchedOps(ttt.TorchOps):
    """TorchOps that takes CPU tensors into a step's batch, as TorchOps takes CUDA ones."""

    batched = frozenset({"cpu"})


def _train(out_dir: Path, batched: bool) -> list[np.ndarray]:
    """A bfloat16-autocast training with a GradScaler, clipping and a scheduler; returns the unscaled
    gradients of the first layer as the loop saw them."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2)
    scaler = torch.amp.GradScaler("cpu")
    hook = ttt.capture(
        model,
        out_dir,
        optimizer=opt,
        save_config=EVERY_STEP,
        include_collections=["weights", "biases", "gradients", "losses", "outputs"],
        reduction_config=KEYS,
    )
    if batched:
        hook.ops = BatchedOps()
    gen = torch.Generator().manual_seed(3)
    grads = []
    for _ in range(STEPS):
        x, y = torch.randn(8, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen)
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        grads.append(model[0].weight.grad.numpy().copy())
        scaler.step(opt)
        scaler.update()
        sched.step()
    hook.close()
    return grads


@pytest.mark.parametrize(
    ("batch_bytes", "chunk"),
    [(batch_module.BATCH_BYTES, batch_module.CHUNK_ELEMENTS), (600, batch_module.CHUNK_ELEMENTS), (1 << 20, 50)],
    ids=["whole-steps", "steps-in-part", "reduced-in-chunks"],
)
def test_a_training_taken_in_batches_stores_what_one_by_one_stores(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, batch_bytes: int, chunk: int, caplog: pytest.LogCaptureFixture
) -> None:
    """Bit for bit raw values, names, dtypes (bfloat16 outputs widened, named) and steps; the reductions to
    float64's last digits. With a 600-byte batch most of each step is prepared one by one, the rest taken;
    with 50-value chunks a step is reduced a few tensors at a time, the weights (96 values) alone."""
    monkeypatch.setattr(batch_module, "BATCH_BYTES", batch_bytes)
    monkeypatch.setattr(batch_module, "CHUNK_ELEMENTS", chunk)
    monkeypatch.setattr(batch_module, "_FIRST_BYTES", min(batch_bytes, batch_module._FIRST_BYTES))
    one_by_one = _train(tmp_path / "one-by-one", batched=False)
    with caplog.at_level(logging.WARNING, logger="tensortap"):
        batched = _train(tmp_path / "batched", batched=True)
    assert not caplog.records
    for a, b in zip(one_by_one, batched, strict=True):
        np.testing.assert_array_equal(a, b)  # the same training
    want, got = tensortap.create_trial(tmp_path / "one-by-one"), tensortap.create_trial(tmp_path / "batched")
    assert got.tensor_names() == want.tensor_names() and got.steps() == want.steps() == list(range(STEPS))
    assert "outputs/2" in got.tensor_names()
    for name in want.tensor_names():
        mine, theirs = got.tensor(name), want.tensor(name)
        assert mine.summary()["orig_dtype"] == theirs.summary()["orig_dtype"], name
        for step in range(STEPS):
            np.testing.assert_array_equal(mine.value(step), theirs.value(step))
            for key in ("mean", "max", "min", "sum", "l1", "l2"):
                assert mine.reduction_value(step, key) == pytest.approx(theirs.reduction_value(step, key), rel=1e-12)
            for key in ("max", "mean"):
                assert mine.reduction_value(step, key, abs=True) == pytest.approx(
                    theirs.reduction_value(step, key, abs=True), rel=1e-12
                )
    for step, grad in enumerate(batched):
        np.testing.assert_array_equal(got.tensor("gradients/0.weight").value(step), grad)  # unscaled, clipped
    assert want.tensor("outputs/2").summary()["orig_dtype"] == "bfloat16"


def _one_step(out_dir: Path, *offers: tuple[str, Any]) -> tensortap.Trial:
    """One training step during which each ``(name, value)`` is saved with ``save_tensor``, its value then
    changed in place where it is a tensor."""
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hook = ttt.capture(model, out_dir, optimizer=opt, save_config=EVERY_STEP, include_collections=["custom"])
    hook.ops = BatchedOps()
    opt.zero_grad()
    model(torch.ones(1, 3)).sum().backward()
    for name, value in offers:
        hook.save_tensor(name, value)
        if isinstance(value, torch.Tensor):
            value.add_(100)  # after it was offered
    opt.step()
    hook.close()
    return tensortap.create_trial(out_dir)


def test_a_value_changed_after_it_was_offered_is_stored_as_offered(tmp_path: Path) -> None:
    trial = _one_step(tmp_path, ("custom/x", torch.tensor([1.0, 2.0])))
    np.testing.assert_array_equal(trial.tensor("custom/x").value(0), [1.0, 2.0])


@pytest.mark.parametrize("order", ["taken-then-prepared", "prepared-then-taken", "taken-twice"])
def test_a_name_offered_twice_in_a_step_keeps_its_last_value(tmp_path: Path, order: str) -> None:
    taken_first, taken_second = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])
    prepared = np.array([5.0, 6.0], dtype=np.float32)  # a NumPy array: never taken, prepared when offered
    first, second = {
        "taken-then-prepared": (taken_first, prepared),
        "prepared-then-taken": (prepared, taken_second),
        "taken-twice": (taken_first, taken_second),
    }[order]
    want = np.array(second).copy() if isinstance(second, np.ndarray) else second.numpy().copy()
    trial = _one_step(tmp_path, ("custom/x", first), ("custom/x", second))
    np.testing.assert_array_equal(trial.tensor("custom/x").value(0), want)


def test_a_batch_that_fails_skips_its_tensors_with_one_warning_each_and_the_run_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("no segmented reductions here")

    monkeypatch.setattr(torch, "segment_reduce", broken)
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hook = ttt.capture(
        model,
        tmp_path,
        optimizer=opt,
        save_config=EVERY_STEP,
        include_collections=["weights", "biases", "custom"],
        reduction_config=KEYS,
    )
    hook.ops = BatchedOps()
    with caplog.at_level(logging.WARNING, logger="tensortap"):
        for s in range(2):
            opt.zero_grad()
            model(torch.ones(1, 3)).sum().backward()
            hook.save_tensor("custom/step", np.array([s]))  # prepared when offered: kept
            opt.step()
        hook.close()
    assert not hook.failed
    warned = sorted(r.getMessage() for r in caplog.records)  # each tensor once, not at every step
    assert len(warned) == 2 and all("no segmented reductions here" in w for w in warned)
    assert "bias" in warned[0] and "weight" in warned[1]
    trial = tensortap.create_trial(tmp_path)
    assert trial.tensor_names() == ["custom/step"]
    assert [int(trial.tensor("custom/step").value(s)[0]) for s in range(2)] == [0, 1]


def test_a_batch_refused_memory_prepares_the_tensors_one_by_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """No memory for a batch's buffer (CUDA's OutOfMemoryError is a RuntimeError): nothing is skipped,
    the tensors are prepared when offered, and the batch does not ask again at every step."""
    asked = []

    def refused(size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        asked.append(size)
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(batch_module, "_buffer", refused)
    with caplog.at_level(logging.WARNING, logger="tensortap"):
        grads = _train(tmp_path / "batched", batched=True)
    assert not caplog.records
    assert len(asked) == 1  # one dtype (float32, bfloat16 outputs widened to it), asked once
    trial = tensortap.create_trial(tmp_path / "batched")
    assert trial.steps() == list(range(STEPS))
    for step, grad in enumerate(grads):
        np.testing.assert_array_equal(trial.tensor("gradients/0.weight").value(step), grad)
    assert trial.tensor("outputs/2").summary()["orig_dtype"] == "bfloat16"


class HistogramFailsOnMatrices(BatchedOps):
    """BatchedOps whose histogram of a matrix fails (a tensor that cannot be binned)."""

    def histogram(self, value: Any, edges: np.ndarray | None, bins: int, defer: bool = False) -> Any:
        if isinstance(value, torch.Tensor) and value.dim() == 2:
            raise ValueError("cannot bin this one")
        return super().histogram(value, edges, bins, defer)


def test_a_taken_tensor_whose_histogram_fails_is_skipped_alone(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    config = ReductionConfig(reductions=["mean"], histogram=8, save_raw_tensor=True)
    hook = ttt.capture(
        model,
        tmp_path,
        optimizer=opt,
        save_config=EVERY_STEP,
        include_collections=["weights", "biases"],
        reduction_config=config,
    )
    hook.ops = HistogramFailsOnMatrices()
    biases = []
    with caplog.at_level(logging.WARNING, logger="tensortap"):
        for _ in range(2):
            opt.zero_grad()
            model(torch.ones(1, 3)).sum().backward()
            opt.step()
            biases.append(model.bias.detach().numpy().copy())
        hook.close()
    assert not hook.failed
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1 and "weight" in warned[0] and "cannot bin this one" in warned[0]
    trial = tensortap.create_trial(tmp_path)
    assert trial.tensor_names() == ["bias"]
    for step, bias in enumerate(biases):
        np.testing.assert_array_equal(trial.tensor("bias").value(step), bias)
        assert trial.tensor("bias").histogram_value(step).counts.sum() == 2
