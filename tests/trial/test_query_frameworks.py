"""The Trial API's answers on trials of real trainings, checked against what the framework computed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

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
