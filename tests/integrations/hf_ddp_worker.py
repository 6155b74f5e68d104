"""One rank of a Trainer's DDP training (gloo, CPU), started by ``torchrun`` from test_transformers.py.

Usage: ``torchrun --standalone --nproc-per-node=2 hf_ddp_worker.py TMP_DIR``. Rank 0 requests a stop
after the Trainer's step 2 and looks for it at every step; rank 1 looks once an hour, so it stops only
because the ranks agree (``stop_sync_steps=1``). Both then ``evaluate()``, as the example scripts do.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).parents[1]))  # the helpers test_transformers imports
sys.path.insert(0, str(Path(__file__).parent))
from test_transformers import Rows, StopAt, arguments, tiny_bert

import tensortap.transformers as tth


def main(tmp: Path) -> None:
    torch.set_num_threads(1)
    out = tmp / "trial"
    rank = int(os.environ["RANK"])

    callback = tth.Callback(
        out, include_collections=["losses"], stop_poll_seconds=0 if rank == 0 else 3600, stop_sync_steps=1
    )
    trainer = transformers.Trainer(
        model=tiny_bert(),
        args=arguments(tmp, num_train_epochs=3, ddp_backend="gloo"),
        train_dataset=Rows(64, 0),
        eval_dataset=Rows(16, 1),
        callbacks=[*([StopAt(out, 2)] if rank == 0 else []), callback],
    )
    trainer.train()
    assert trainer.state.global_step == 2, trainer.state.global_step
    trainer.evaluate()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
