"""Capture on CUDA tensors: values, on-device reductions, synchronisations and the step-time ratio.

Run on a machine with a GPU: ``python -m bench.gpu_check`` (about a minute).
Without CUDA it says so and exits 0; ``python -m bench.gpu_check --device cpu``
runs the same checks on the CPU (the tests do, so that the script is known to
work before a GPU is at hand). It trains the MLP of
:mod:`bench.bench_torch` on the GPU with tensortap saving weights, biases,
gradients and losses every step (raw tensors and reductions) and checks:

1. values: every captured weight and gradient is bit-equal to a copy taken
   on the device at the same point of the step (gradients just before
   ``optimizer.step()``, weights just after);
2. reductions: the stored ``mean``, ``l2``, ``max`` and health counts equal
   the NumPy formulas on the captured raw values (relative 1e-6);
3. synchronisation (CUDA only): how many CUDA synchronisations the hook adds
   per saved step (``torch.cuda.set_sync_debug_mode("warn")`` counts them);
4. cost: interleaved blocks of steps with and without the hook, with a
   second no-hook arm for the run's noise (:mod:`bench.harness`).

Exits 1 when a value or reduction is wrong.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import warnings
from typing import Any

import numpy as np
import torch
from torch import nn

import tensortap
import tensortap.torch as ttt
from bench import harness

STEPS = 20
BATCH = 256
REDUCTIONS = ["mean", "max", "nan_count", "inf_count"]


def _model(device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 10)).to(device)


def _hook(model: nn.Module, opt: torch.optim.Optimizer, loss_fn: nn.Module, out_dir: str) -> Any:
    return ttt.capture(
        model,
        out_dir,
        optimizer=opt,
        loss=loss_fn,
        save_config=tensortap.SaveConfig(save_interval=1),
        include_collections=["weights", "biases", "gradients", "losses"],
        reduction_config=tensortap.ReductionConfig(reductions=REDUCTIONS, norms=["l2"], save_raw_tensor=True),
    )


def _synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (CUDA); a CPU runs it synchronously already."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_values(device: torch.device, out_dir: str) -> list[str]:
    """Train ``STEPS`` steps with the hook; return the problems found (empty: all equal)."""
    model = _model(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loss_fn = nn.CrossEntropyLoss()
    hook = _hook(model, opt, loss_fn, out_dir)
    cuda = device.type == "cuda"  # synchronisations are counted on CUDA only
    expected: dict[tuple[str, int], np.ndarray] = {}
    syncs = 0
    for step in range(STEPS):
        x = torch.randn(BATCH, 784, device=device)
        y = torch.randint(0, 10, (BATCH,), device=device)
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        for name, p in model.named_parameters():
            assert p.grad is not None
            expected[(f"gradients/{name}", step)] = p.grad.detach().clone().cpu().numpy()
        _synchronize(device)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if cuda:
                torch.cuda.set_sync_debug_mode("warn")
            try:
                opt.step()  # the hook saves the step here
            finally:
                if cuda:
                    torch.cuda.set_sync_debug_mode("default")
        syncs += sum("synchroniz" in str(w.message) for w in caught)
        for name, p in model.named_parameters():
            expected[(name, step)] = p.detach().clone().cpu().numpy()
    hook.close()
    if cuda:
        print(f"CUDA synchronisations inside optimizer.step() with the hook: {syncs / STEPS:.1f} per saved step")
    problems = []
    trial = tensortap.create_trial(out_dir)
    for (name, step), want in expected.items():
        tensor = trial.tensor(name)
        got = tensor.value(step)
        if got.dtype != want.dtype or not np.array_equal(got, want):
            problems.append(f"{name} at step {step}: captured value differs from the device copy")
            continue
        wide = want.astype(np.float64)
        formulas = {
            "mean": wide.mean(),
            "max": wide.max(),
            "l2": np.sqrt((wide * wide).sum()),
            "nan_count": float(np.isnan(wide).sum()),
            "inf_count": float(np.isinf(wide).sum()),
        }
        for key, value in formulas.items():
            stored = tensor.reduction_value(step, key)
            if not np.isclose(stored, value, rtol=1e-6, atol=1e-12):
                problems.append(f"{name} at step {step}: {key} {stored!r} != {value!r}")
    return problems


class DeviceArm:
    """Training steps on the device, with or without the hook (synchronised at each block's end)."""

    def __init__(self, device: torch.device, hooked: bool) -> None:
        self.device = device
        self.model = _model(device)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01)
        self.loss_fn = nn.CrossEntropyLoss()
        self.x = torch.randn(BATCH, 784, device=device)
        self.y = torch.randint(0, 10, (BATCH,), device=device)
        self.out_dir = tempfile.mkdtemp(prefix="tensortap-gpu-")
        self.hook = _hook(self.model, self.opt, self.loss_fn, self.out_dir) if hooked else None

    def run(self, n: int) -> None:
        for _ in range(n):
            self.opt.zero_grad()
            self.loss_fn(self.model(self.x), self.y).backward()
            self.opt.step()
        _synchronize(self.device)

    def close(self) -> None:
        if self.hook is not None:
            self.hook.close()

    def discard(self) -> None:
        """Remove the trial (untimed: see :func:`bench.harness.discard`)."""
        shutil.rmtree(self.out_dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """Run the checks; 0 when everything is right (or there is no GPU), 1 otherwise."""
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="where to train (default: cuda)")
    parser.add_argument("--rounds", type=int, default=8, help="blocks of 25 steps each arm is timed in (default: 8)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: the GPU check is skipped")
        return 0
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {name}, torch {torch.__version__}")
    out_dir = tempfile.mkdtemp(prefix="tensortap-gpu-")
    try:
        problems = check_values(device, out_dir)
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    for p in problems[:20]:
        print("PROBLEM:", p)
    print(f"values and reductions: {'all equal' if not problems else f'{len(problems)} problems'}")
    timings = harness.interleave(
        {
            harness.BASELINE: lambda: DeviceArm(device, False),
            harness.BASELINE_2: lambda: DeviceArm(device, False),
            "tensortap, every step, raw + reductions": lambda: DeviceArm(device, True),
        },
        rounds=args.rounds,
        block=25,
        warmup=10,
    )
    for row in harness.rows(f"{device.type.upper()} MLP 784-512-256-10, batch 256", timings):
        print(f"{row['case']:45s} {row['ms_per_step']:8.3f} ms/step  x{row['ratio']:.2f}  (noise {row['noise']:.3f})")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
