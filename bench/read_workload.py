"""The training whose trial both readers read (tensortap and smdebug write it each with their own hook).

A ``Linear(640, 640)`` (its weight is 1.6 MB of float32) trained ``STEPS``
steps with SGD on an MSE loss; the hook saves the weights and the loss every
step. Only the standard library and torch are imported here: smdebug's own
environment runs it too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

STEPS = 1000

# (model, optimizer, loss module) -> hook (with close())
MakeHook = Callable[[nn.Module, torch.optim.Optimizer, nn.Module], Any]


def train(make_hook: MakeHook, steps: int = STEPS) -> None:
    """Train with a hook from ``make_hook`` and close it."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = nn.Sequential(nn.Linear(640, 640))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    loss_fn = nn.MSELoss()
    hook = make_hook(model, opt, loss_fn)
    x, y = torch.randn(8, 640), torch.randn(8, 640)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    hook.close()
