"""The training whose trial both readers read, and the command line of their processes.

A ``Linear(640, 640)`` (its weight is 1.6 MB of float32) trained ``STEPS``
steps with SGD on an MSE loss; each library's own hook saves the weights and
the loss every step. :func:`main` is the command line of a reader or writer
process, for tensortap (:mod:`bench.bench_read`) and for smdebug in its own
environment (:mod:`bench.bench_read_smdebug`). Only the standard library (and
torch, to train) is imported here: smdebug's own environment runs it too.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn, optim

STEPS = 1000
# what each figure reads: the first tensor of a collection, and whether the reader keeps every value
# (a list of them) or drops each once read (the two libraries then do the same work)
KINDS = {"small": ("losses", True), "big": ("weights", False), "big-kept": ("weights", True)}

# (model, optimizer, loss module, out_dir) -> hook (with close())
MakeHook = Callable[["nn.Module", "optim.Optimizer", "nn.Module", str], Any]
# (trial directory, collection, keep) -> number of steps read, every value of the first tensor of that
# collection, kept in memory or dropped once read
Read = Callable[[str, str, bool], int]


def train(make_hook: MakeHook, out_dir: str, steps: int = STEPS) -> None:
    """Train with a hook from ``make_hook`` writing into ``out_dir``, and close it."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = nn.Sequential(nn.Linear(640, 640))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    loss_fn = nn.MSELoss()
    hook = make_hook(model, opt, loss_fn, out_dir)
    x, y = torch.randn(8, 640), torch.randn(8, 640)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    hook.close()


def main(make_hook: MakeHook, read: Read) -> None:
    """``write DIR STEPS``: train into ``DIR``; ``read DIR KIND N``: time ``N`` reads, print the seconds.

    A read creates a fresh trial and reads every value of the tensor of
    ``KIND`` (see :data:`KINDS`: ``small``, the loss; ``big``, the weight,
    each value dropped once read; ``big-kept``, the weight, every value
    kept). An untimed read of the loss comes first (imports, lazy
    initialisation), so only reads count.
    """
    command, path = sys.argv[1], sys.argv[2]
    if command == "write":
        train(make_hook, path, int(sys.argv[3]))
        return
    (collection, keep), n = KINDS[sys.argv[3]], int(sys.argv[4])
    steps = read(path, *KINDS["small"])
    t0 = time.perf_counter()
    for _ in range(n):
        assert read(path, collection, keep) == steps
    print(time.perf_counter() - t0)
