"""Cost of the PyTorch adapter on a small training, against the same training without a hook.

An MLP 784-512-256-10 (535k parameters), batch 64, SGD, ``STEPS`` steps on one
CPU thread (``torch.set_num_threads(1)``). Cases: no hook; tensortap saving
weights, biases, gradients and losses (raw tensors) every step and every 100
steps; and with every layer's outputs too, every step. Cases are interleaved
and their order rotated between ``REPEATS`` rounds; the best run of each counts.
Hook construction and ``close()`` (publishing the last shard) are inside the
timed region. ``bench/bench_torch_smdebug.py`` times smdebug on the same cases.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

STEPS = 300
BATCH = 64
REPEATS = 3
BENCHMARK = "torch MLP 784-512-256-10, batch 64"
BASIC = ("weights", "biases", "gradients", "losses")
# (case, save interval, collections); interval None: no hook
CASES: list[tuple[str, int | None, Sequence[str]]] = [
    ("no hook", None, ()),
    ("weights+biases+gradients+losses, every step", 1, BASIC),
    ("weights+biases+gradients+losses, every 100 steps", 100, BASIC),
    ("weights+biases+gradients+losses+outputs, every step", 1, (*BASIC, "outputs")),
]

# builds a hook for (model, optimizer, loss module, out_dir, interval, collections); returns it (with close())
HookFactory = Callable[[nn.Module, torch.optim.Optimizer, nn.Module, str, int, Sequence[str]], Any]


def data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``STEPS`` random batches, the same in every run."""
    gen = torch.Generator().manual_seed(0)
    return [
        (torch.randn(BATCH, 784, generator=gen), torch.randint(0, 10, (BATCH,), generator=gen)) for _ in range(STEPS)
    ]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 10))


def seconds_per_step(
    make_hook: HookFactory | None,
    interval: int | None,
    collections: Sequence[str],
    batches: list[tuple[torch.Tensor, torch.Tensor]],
) -> float:
    """Seconds per training step of one run with a hook from ``make_hook`` (None or interval None: no hook)."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loss_fn = nn.CrossEntropyLoss()
    out_dir = tempfile.mkdtemp(prefix="tensortap-bench-")
    try:
        t0 = time.perf_counter()
        hook = None
        if make_hook is not None and interval is not None:
            hook = make_hook(model, opt, loss_fn, out_dir, interval, collections)
        for x, y in batches:
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
        if hook is not None:
            hook.close()
        return (time.perf_counter() - t0) / len(batches)
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)


def measure(make_hook: HookFactory, library: str) -> list[dict[str, Any]]:
    """Time every case of :data:`CASES` with hooks from ``make_hook``; one row per case."""
    torch.set_num_threads(1)
    batches = data()
    seconds_per_step(None, None, (), batches[:30])  # warm up
    best = {case: float("inf") for case, _, _ in CASES}
    for r in range(REPEATS):
        for case, interval, collections in CASES[r % len(CASES) :] + CASES[: r % len(CASES)]:
            best[case] = min(best[case], seconds_per_step(make_hook, interval, collections, batches))
    base = best["no hook"]
    return [
        {
            "benchmark": BENCHMARK,
            "case": case if interval is None else f"{library}: {case}",
            "ms_per_step": best[case] * 1e3,
            "ratio": best[case] / base,
        }
        for case, interval, _ in CASES
    ]


def _tensortap_hook(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    loss_fn: nn.Module,
    out_dir: str,
    interval: int,
    collections: Sequence[str],
) -> Any:
    import tensortap
    import tensortap.torch as ttt

    return ttt.capture(
        model,
        out_dir,
        optimizer=opt,
        loss=loss_fn,
        save_config=tensortap.SaveConfig(save_interval=interval),
        include_collections=list(collections),
    )


def run() -> list[dict[str, Any]]:
    """Measure and return one row per case: ms per step and the ratio to no hook."""
    return measure(_tensortap_hook, "tensortap")


def show(rows: list[dict[str, Any]]) -> None:
    """Print rows as a small table."""
    for row in rows:
        print(f"{row['case']:66s} {row['ms_per_step']:7.2f} ms/step  x{row['ratio']:.2f}")


if __name__ == "__main__":
    show(run())
