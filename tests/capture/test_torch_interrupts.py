"""A PyTorch training interrupted where torch runs none of the hook's hooks after the call (a notebook's
"interrupt kernel" raises KeyboardInterrupt in a forward or a backward; any exception in an optimizer's
step()), then going on, as running the cell again does: the interrupted step is dropped with one warning
and every later step holds its own iteration's values (session 48's notebook hunt, findings 1 and 2)."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from helpers.trials import logged_warnings

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import tensortap  # noqa: E402
import tensortap.torch as ttt  # noqa: E402

pytestmark = [pytest.mark.torch, pytest.mark.usefixtures("torch_one_thread")]


class _Raise(torch.autograd.Function):
    """Identity whose backward raises ``Net.fault`` when ``Net.where`` says so."""

    @staticmethod
    def forward(ctx: object, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:
        Net.raise_at("backward")
        return grad


class Net(nn.Module):
    """A small MLP that raises ``fault`` once, in its forward or its backward, when armed."""

    where = ""
    fault: type[BaseException] = KeyboardInterrupt

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 3)

    @classmethod
    def raise_at(cls, where: str) -> None:
        if cls.where == where:
            cls.where = ""
            raise cls.fault("interrupted")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = _Raise.apply(torch.relu(self.fc1(x)))
        Net.raise_at("forward")
        return self.fc2(h)


class _FailingSGD(torch.optim.SGD):
    """SGD whose step() raises ``Net.fault`` once, before updating, when armed."""

    def step(self, closure: object = None) -> None:  # type: ignore[override]
        Net.raise_at("step")
        super().step()


@pytest.mark.parametrize("fault", [KeyboardInterrupt, RuntimeError])
@pytest.mark.parametrize("where", ["forward", "backward", "step"])
def test_an_interrupted_iteration_is_dropped_and_the_next_ones_hold_their_own_values(
    tmp_path: Path, where: str, fault: type[BaseException]
) -> None:
    torch.manual_seed(0)
    model = Net()
    opt = _FailingSGD(model.parameters(), lr=0.1)
    hook = ttt.capture(
        model,
        tmp_path,
        optimizer=opt,
        save_config=tensortap.SaveConfig(save_interval=1),
        include_collections=["losses", "outputs"],
    )
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    outputs: list[np.ndarray] = []  # each finished iteration's, as torch computed them
    losses: list[float] = []
    limit = sys.getrecursionlimit()

    def iterate() -> None:
        opt.zero_grad()
        out = model(x)
        loss = F.cross_entropy(out, y)
        loss.backward()
        opt.step()
        outputs.append(out.detach().numpy().copy())
        losses.append(loss.item())

    for _ in range(3):
        iterate()
    Net.where, Net.fault = where, fault
    with logged_warnings() as warned:
        with pytest.raises(fault):
            iterate()  # step 3
        for _ in range(3):  # the cell run again
            iterate()
        hook.close()
    assert sys.getrecursionlimit() == limit  # the frames lent to the forward left came back

    trial = tensortap.create_trial(tmp_path)
    saved = [0, 1, 2, 4, 5, 6]
    assert trial.steps() == saved
    assert trial.tensor_names() == ["losses/loss", "outputs/Net", "outputs/fc1", "outputs/fc2"]  # no ":0", ":1"
    for name in ("losses/loss", "outputs/Net"):
        assert trial.tensor(name).steps() == saved
    for i, step in enumerate(saved):
        np.testing.assert_array_equal(trial.tensor("outputs/Net").value(step), outputs[i])
        assert float(trial.tensor("losses/loss").value(step)) == pytest.approx(losses[i], rel=1e-6)
    dropped = [w for w in warned if "step 3 was interrupted" in w and "is dropped" in w]
    assert len(dropped) == 1, warned


def test_a_forward_of_another_thread_still_running_is_no_interrupt(tmp_path: Path) -> None:
    """A thread's forward (an evaluation under no_grad) that starts in a training forward and outlives it:
    the training's next forward took the one that ended for one an interrupt left, and dropped a step that
    had finished (hunt 18, a regression of the interrupt recovery)."""
    started, release = threading.Event(), threading.Event()

    class Slow(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if threading.current_thread() is not threading.main_thread():
                started.set()
                release.wait(60)
            elif len(losses) == 1:  # the second iteration: the other thread's forward starts inside this one
                threading.Thread(target=evaluate).start()
                started.wait(60)
            return self.fc(x)

    def evaluate() -> None:
        with torch.no_grad():
            model(torch.randn(2, 4))

    torch.manual_seed(0)
    model = Slow()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hook = ttt.capture(
        model,
        tmp_path,
        optimizer=opt,
        save_config=tensortap.SaveConfig(save_interval=1),
        include_collections=["losses"],
    )
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    losses: list[float] = []
    with logged_warnings() as warned:
        for _ in range(5):
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        release.set()
        hook.close()
    assert not [w for w in warned if "dropped" in w], warned
    trial = tensortap.create_trial(tmp_path)
    assert trial.tensor("losses/loss").steps() == [0, 1, 2, 3, 4]
    assert [float(trial.tensor("losses/loss").value(s)) for s in range(5)] == pytest.approx(losses, rel=1e-6)
