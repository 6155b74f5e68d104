"""The Trial API's answers on trials of real trainings, checked against what the framework computed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers.trials import torch_train_and_eval

import tensortap
from tensortap import NoMoreData, SaveConfig, StepUnavailable, TensorUnavailableForStep


@pytest.mark.torch
def test_errors_about_a_mode_step_name_its_mode(tmp_path: Path) -> None:
    """A step asked for with ``mode=`` was named by the mode's number or not at all: ``step 1 in mode 2 was
    not saved and never will be``, ``training has ended at step 3; there is no step 5`` (in a trial whose
    global steps go on to 7), ``'gradients/0.weight' was not saved at step 0`` (an eval step, where no
    backward runs). They name it as ``eval step 1`` now."""
    torch = pytest.importorskip("torch")
    import tensortap.torch as ttt

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_fn = torch.nn.MSELoss()
    hook = ttt.capture(model, tmp_path, optimizer=opt, loss=loss_fn, save_config=SaveConfig(save_interval=2))
    x, y = torch.randn(4, 3), torch.randn(4, 2)
    eval_losses = []
    for _ in range(4):  # a train step, then an eval step
        model.train()
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
        model.eval()
        with torch.no_grad():
            eval_losses.append(loss_fn(model(x), y).item())
    hook.close()

    trial = tensortap.create_trial(tmp_path)
    loss = trial.tensor("losses/MSELoss")
    assert loss.steps(mode="eval") == [0, 2]
    np.testing.assert_allclose([loss.value(s, mode="eval") for s in (0, 2)], eval_losses[::2], rtol=1e-6)
    with pytest.raises(StepUnavailable, match=r"^eval step 1 was not saved and never will be$"):
        loss.value(1, mode="eval")
    ended = r"^training has ended at eval step 3; there is no eval step 5$"
    with pytest.raises(NoMoreData, match=ended):
        loss.value(5, mode="eval")
    with pytest.raises(NoMoreData, match=ended):
        trial.wait_for_steps([5], mode="eval")
    with pytest.raises(TensorUnavailableForStep, match=r"^'gradients/0.weight' was not saved at eval step 0 \("):
        trial.tensor("gradients/0.weight").value(0, mode="eval")
    with pytest.raises(StepUnavailable, match=r"^step 3 was not saved and never will be$"):
        loss.value(3)  # a global step (eval step 1): named as before
    # workers(): who saved it, [] at a step of the trial without it; a step the trial has not raises as value()
    # does (hunt 33 L8: workers(100) was [] while shape(100) raised NoMoreData)
    assert loss.workers(2, mode="eval") == ["worker_0"]
    assert trial.tensor("gradients/0.weight").workers(0, mode="eval") == []
    with pytest.raises(NoMoreData, match=ended):
        loss.workers(5, mode="eval")
    with pytest.raises(StepUnavailable, match=r"^eval step 1 was not saved and never will be$"):
        loss.workers(1, mode="eval")
    # arguments of the wrong type: a TypeError that says what is expected, not an answer about another step
    for step in (2.0, "2"):
        with pytest.raises(TypeError, match=r"^step: expected an integer, got "):
            loss.value(step, mode="eval")  # type: ignore[arg-type]
    np.testing.assert_allclose(loss.value(np.int64(2), mode="eval"), eval_losses[2], rtol=1e-6)
    with pytest.raises(TypeError, match=r"^name: expected a tensor name \(a string\), got 123$"):
        trial.tensor(123)  # type: ignore[arg-type]
    one = trial.to_pandas("gradients/0.weight", reductions="mean")  # one key, as one name: it read "m", "e", ...
    assert set(one["reduction"]) == {"mean"} and len(one) == len(trial.tensor("gradients/0.weight").steps())


@pytest.mark.torch
def test_a_training_that_ended_before_saving_a_step_says_so(tmp_path: Path) -> None:
    """A training closed before it saved any step: ``training has ended at step -1; there is no step 0``."""
    torch = pytest.importorskip("torch")
    import tensortap.torch as ttt

    model = torch.nn.Linear(3, 2)
    ttt.capture(model, tmp_path, optimizer=torch.optim.SGD(model.parameters(), lr=0.1)).close()
    trial = tensortap.create_trial(tmp_path)
    assert trial.training_ended and trial.steps() == []
    with pytest.raises(NoMoreData, match=r"^training has ended before saving any step; there is no step 0$"):
        trial.wait_for_steps([0])
    with pytest.raises(NoMoreData, match=r"^training has ended before saving any eval step; there is no eval step 0$"):
        trial.wait_for_steps([0], mode="eval")


@pytest.mark.torch
def test_smdebug_idioms_get_a_clear_error_or_the_answer(tmp_path: Path) -> None:
    """Calls ported from smdebug as they were written. ``global_step(Mode.EVAL, 1)`` (smdebug's order) answered
    for TRAIN step 2, as Mode is an IntEnum; ``reduction_value(step, "mean", Mode.TRAIN)`` (smdebug's third
    parameter is the mode) read ``abs=Mode.TRAIN``; ``reduction_values(0)`` failed with ``'int' object has no
    attribute 'startswith'``; ``tensor_names(collection=<Collection>)`` with ``unhashable type``; smdebug's
    method names with Python's bare AttributeError."""
    torch = pytest.importorskip("torch")
    from tensortap import Mode

    torch.set_num_threads(1)
    torch.manual_seed(0)
    torch_train_and_eval(tmp_path, torch.randn(4, 3), torch.randn(4, 1), lr=0.1)  # TRAIN 0 1 3 4, EVAL 2 5
    trial = tensortap.create_trial(tmp_path)
    assert trial.global_step(1, Mode.EVAL) == 5 and trial.global_step(2, Mode.TRAIN) == 3

    order = r"tensortap takes the step first, then the mode"
    with pytest.raises(TypeError, match=rf"^step: expected a step \(an integer\), got Mode.EVAL, a mode; {order}: "):
        trial.global_step(Mode.EVAL, 1)
    with pytest.raises(TypeError, match=r"global_step\(step, mode\) \(smdebug's was global_step\(mode, mode_step\)\)"):
        trial.global_step(Mode.EVAL, 1)
    loss = trial.tensor("losses/MSELoss")
    grad = trial.tensor("gradients/weight")
    for call in (
        lambda: trial.has_passed_step(Mode.EVAL, 1),
        lambda: trial.wait_for_steps([Mode.EVAL]),
        lambda: trial.tensor_names(step=Mode.EVAL, mode=1),
        lambda: trial.mode_step(Mode.EVAL),
        lambda: loss.value(Mode.EVAL, 1),
        lambda: loss.reduction_value(Mode.TRAIN, "mean"),
        lambda: loss.workers(Mode.EVAL),
    ):
        with pytest.raises(TypeError, match=r"^step: expected a step \(an integer\), got Mode.(EVAL|TRAIN), a mode; "):
            call()
    # smdebug's reduction_value(step, name, mode, worker, abs): a mode given third is not abs
    with pytest.raises(TypeError, match=r"^abs: expected True or False, got Mode.TRAIN, a mode; .*mode=Mode.TRAIN"):
        grad.reduction_value(0, "mean", Mode.TRAIN)
    assert grad.reduction_value(0, "mean", mode=Mode.TRAIN) == pytest.approx(float(grad.value(0).mean()))

    # reduction_values takes a reduction name (smdebug's took a step and gave every reduction there)
    with pytest.raises(TypeError, match=r"^reduction: expected a reduction name \(a string, e.g. 'mean'\), got 0; "):
        grad.reduction_values(0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"available_reductions\(step\) and reduction_value\(step, reduction\)"):
        grad.reduction_values(0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^reduction: expected a reduction name"):
        grad.reduction_value(0, 1)  # type: ignore[arg-type]
    assert list(grad.reduction_values("mean")) == [0, 1, 3, 4]

    # a Collection, as smdebug took it, stands for its name
    gradients = trial.tensor_names(collection="gradients")
    assert gradients == ["gradients/bias", "gradients/weight"]
    assert trial.tensor_names(collection=trial.collection("gradients")) == gradients
    assert trial.tensor_names(collection=trial.collection("gradients"), step=1, mode="eval") == []
    with pytest.raises(TypeError, match=r"^collection: expected a collection name \(a string\) or a Collection, got "):
        trial.tensor_names(True)  # type: ignore[arg-type]  # smdebug's first parameter: show_prefixed_tensors

    # smdebug's names: an AttributeError that says how tensortap spells it
    hints = {
        "has_tensor": r"name in trial.tensor_names\(\)",
        "mode_modestep": r"trial.mode_step\(step\)",
        "mode": r"trial.mode_step\(step\)\[0\]",
        "loaded_all_steps": r"trial.training_ended",
        "num_workers": r"len\(trial.workers\(\)\)",
        "maybe_refresh": r"trial.refresh\(\)",
    }
    for name, hint in hints.items():
        with pytest.raises(AttributeError, match=rf"^'Trial' object has no attribute '{name}': smdebug's .*{hint}"):
            getattr(trial, name)
    with pytest.raises(AttributeError, match=r"^'Tensor' object has no attribute 'prev_steps': smdebug's .*s <= step"):
        loss.prev_steps(3, 2)
    with pytest.raises(AttributeError, match=r"^'Trial' object has no attribute 'no_such_thing'$"):
        trial.no_such_thing  # noqa: B018
    assert not hasattr(trial, "has_tensor") and hasattr(trial, "tensor_names")
