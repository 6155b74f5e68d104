"""One rank of a DDP training (gloo, 127.0.0.1) whose rank 0 starts capturing late, started by test_torch.py.

Usage: ``ddp_late_worker.py RANK PORT OUT_DIR GO_FILE``. Both ranks join a process group of two and
wrap the same tiny MLP in DDP. Rank 1 then trains ``STEPS`` steps without gradient sync
(``no_sync``, as in gradient accumulation) and closes its hook; rank 0 first waits for GO_FILE (as
with slow data loading on one rank), then does the same. Each hook is given the process group's world
size. The ranks meet at a barrier before they exit.
"""

from __future__ import annotations

import os
import sys
import time

import torch
import torch.distributed as dist
from torch import nn

import tensortap
import tensortap.torch as ttt

STEPS = 3


def main(rank: int, port: int, out_dir: str, go_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(0)
    ddp = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)))
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    while rank == 0 and not os.path.exists(go_file):
        time.sleep(0.05)
    hook = ttt.capture(
        ddp,
        out_dir,
        optimizer=opt,
        save_config=tensortap.SaveConfig(save_interval=1),
        world_size=dist.get_world_size(),
    )
    gen = torch.Generator().manual_seed(rank)
    with ddp.no_sync():
        for _ in range(STEPS):
            opt.zero_grad()
            ddp(torch.randn(8, 4, generator=gen)).sum().backward()
            opt.step()
    hook.close()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
