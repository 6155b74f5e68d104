"""One rank of a DDP training (gloo, CPU), started by ``torchrun`` from test_torch.py.

Usage: ``torchrun --standalone --nproc-per-node=2 ddp_worker.py OUT_DIR RECORD_DIR``. Each
rank trains the same tiny MLP on its own data for ``STEPS`` optimizer steps and
writes what PyTorch reported (``p.grad`` at each ``optimizer.step()``, the
parameters after it) to ``RECORD_DIR/rank<r>.npz`` for the test to compare.
Then rank 0 requests a stop and both ranks train on until
``StopTrainingRequested`` (``raise_on_stop=True``); the step each stopped at is recorded.
"""

from __future__ import annotations

import sys

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

import tensortap
import tensortap.torch as ttt

STEPS = 3
MAX_STEPS = 30


def main(out_dir: str, record_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    loss_fn = nn.CrossEntropyLoss()
    hook = ttt.capture(
        ddp,
        out_dir,
        optimizer=opt,
        loss=loss_fn,
        save_config=tensortap.SaveConfig(save_interval=1),
        weights_rank0_only=True,
        raise_on_stop=True,
    )
    # rank 0 looks for the request at every step; rank 1 never by itself: it learns it from the agreement
    hook.stop_poll_seconds = 0.0 if rank == 0 else 3600.0
    gen = torch.Generator().manual_seed(100 + rank)
    record: dict[str, np.ndarray] = {}
    for step in range(STEPS):
        x = torch.randn(8, 6, generator=gen)
        y = torch.randint(0, 3, (8,), generator=gen)
        opt.zero_grad()
        loss = loss_fn(ddp(x), y)
        loss.backward()
        for name, p in model.named_parameters():
            record[f"grad/{step}/{name}"] = p.grad.detach().clone().numpy()
        record[f"loss/{step}"] = np.asarray(loss.item())
        opt.step()
        for name, p in model.named_parameters():
            record[f"param/{step}/{name}"] = p.detach().clone().numpy()
    if rank == 0:
        tensortap.create_trial(out_dir).request_stop("requested by the test")
    step = STEPS
    try:
        for step in range(STEPS, MAX_STEPS):  # noqa: B007 - the step reached is recorded
            x = torch.randn(8, 6, generator=gen)
            opt.zero_grad()
            ddp(x).sum().backward()
            opt.step()
    except tensortap.StopTrainingRequested:
        record["stopped_at"] = np.asarray(step)
    hook.close()
    np.savez(f"{record_dir}/rank{rank}.npz", **record)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
