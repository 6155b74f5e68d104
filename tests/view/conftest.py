"""A real tiny PyTorch training captured with raw weights, histogram-reduced gradients, losses in two modes."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import tensortap  # noqa: E402
import tensortap.torch as ttt  # noqa: E402
from tensortap import Collection, ReductionConfig, SaveConfig  # noqa: E402

TRAIN_STEPS = 12
EVAL_EVERY = 4
BINS = 16


@dataclass
class Run:
    """The trial and what PyTorch itself computed during the training."""

    path: Path
    train_loss: list[float] = field(default_factory=list)
    eval_loss: list[float] = field(default_factory=list)
    grads: list[dict[str, np.ndarray]] = field(default_factory=list)
    weights: list[dict[str, np.ndarray]] = field(default_factory=list)

    def trial(self) -> tensortap.Trial:
        return tensortap.create_trial(self.path)


def train(path: Path, seed: int = 0, lr: float = 0.1) -> Run:
    """Train a 2-layer MLP for TRAIN_STEPS steps, evaluating every EVAL_EVERY steps."""
    torch.manual_seed(seed)
    torch.set_num_threads(1)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    grads = Collection("gradients", reduction_config=ReductionConfig(norms=["l2"], histogram=BINS))
    hook = ttt.capture(
        model,
        path,
        optimizer=opt,
        loss=loss_fn,
        save_config=SaveConfig(save_interval=1),
        include_collections=["weights", "biases", "gradients", "losses"],
        collection_configs={"gradients": grads},
    )
    gen = torch.Generator().manual_seed(seed + 1)
    run = Run(path)
    x_eval, y_eval = torch.randn(16, 6, generator=gen), torch.randint(0, 3, (16,), generator=gen)
    for step in range(TRAIN_STEPS):
        model.train()
        x, y = torch.randn(8, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen)
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        run.grads.append({n: p.grad.detach().numpy().copy() for n, p in model.named_parameters()})
        opt.step()
        run.train_loss.append(loss.item())
        run.weights.append({n: p.detach().numpy().copy() for n, p in model.named_parameters()})
        if (step + 1) % EVAL_EVERY == 0:
            model.eval()
            with torch.no_grad():
                run.eval_loss.append(loss_fn(model(x_eval), y_eval).item())
    hook.close()
    return run


@pytest.fixture(scope="session")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    return train(tmp_path_factory.mktemp("view") / "run_a")


@pytest.fixture(scope="session")
def run_b(tmp_path_factory: pytest.TempPathFactory) -> Run:
    return train(tmp_path_factory.mktemp("view") / "run_b", seed=1, lr=0.05)
