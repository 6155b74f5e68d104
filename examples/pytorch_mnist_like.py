"""Capture a small PyTorch training with tensortap, then read it back with a Trial.

MNIST-shaped random data (no download), a small CNN, an Adam optimizer, a
validation pass after each epoch. Runs in a few seconds on a CPU::

    python examples/pytorch_mnist_like.py [OUT_DIR]
"""

from __future__ import annotations

import sys
import tempfile

import torch
from torch import nn

import tensortap
import tensortap.torch as ttt

EPOCHS = 2
BATCHES = 30
BATCH = 32


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 5, stride=2)
        self.relu = nn.ReLU()
        self.fc1 = nn.Linear(8 * 12 * 12, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu(self.conv(x)).flatten(1)
        return self.fc2(self.relu(self.fc1(h)))


def batches(gen: torch.Generator, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Random 28x28 images whose label is the brightest of ten image bands (learnable)."""
    out = []
    for _ in range(n):
        x = torch.rand(BATCH, 1, 28, 28, generator=gen)
        y = torch.randint(0, 10, (BATCH,), generator=gen)
        x[torch.arange(BATCH), 0, y * 2 + 4] += 0.3
        out.append((x, y))
    return out


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    train, val = batches(gen, BATCHES), batches(gen, 5)
    model = Net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()

    hook = ttt.capture(
        model,
        out_dir,
        optimizer=opt,
        loss=loss_fn,
        save_config=tensortap.SaveConfig(save_interval=10),
        include_collections=["weights", "biases", "gradients", "losses", "outputs", "metrics"],
        reduction_config=None,  # raw tensors
    )
    with hook:
        for epoch in range(EPOCHS):
            model.train()
            for x, y in train:
                hook.save_scalar("lr", opt.param_groups[0]["lr"])  # after opt.step() it would be the next step's
                opt.zero_grad()
                loss = loss_fn(model(x), y)
                loss.backward()
                opt.step()  # a training step ends here
            model.eval()  # validation forwards count as EVAL steps
            correct = 0
            with torch.no_grad():
                for x, y in val:
                    correct += int((model(x).argmax(1) == y).sum())
            acc = correct / (len(val) * BATCH)
            print(f"epoch {epoch}: last train loss {loss.item():.3f}, validation accuracy {acc:.2f}")

    trial = tensortap.create_trial(out_dir)
    print(f"\ntrial at {out_dir}: workers {trial.workers()}, modes {[m.name for m in trial.modes()]}")
    print(f"saved training steps: {trial.steps(mode=tensortap.Mode.TRAIN)}")
    print(f"saved validation steps: {trial.steps(mode=tensortap.Mode.EVAL)}")
    for coll in ("weights", "gradients", "outputs", "losses", "metrics"):
        print(f"  {coll:9s} {trial.tensor_names(collection=coll)}")
    loss_t = trial.tensor("losses/CrossEntropyLoss")
    curve = {s: round(float(loss_t.value(s, mode=tensortap.Mode.TRAIN)), 3) for s in loss_t.steps(mode="train")}
    print(f"training loss by step: {curve}")
    g = trial.tensor("gradients/fc1.weight")
    print(f"mean |grad fc1.weight| at step 0: {g.reduction_value(0, 'mean', abs=True):.2e}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="tensortap-torch-"))
