"""Capture on CUDA tensors: values, on-device reductions and histograms, synchronisations and the step-time ratio.

Run on a machine with a GPU: ``python -m bench.gpu_check`` (about a minute).
Without CUDA it says so and exits 0; ``python -m bench.gpu_check --device cpu``
runs the same checks on the CPU (the tests do, so that the script is known to
work before a GPU is at hand). It trains the MLP of
:mod:`bench.bench_torch` on the GPU with tensortap saving weights, biases,
gradients and losses every step (raw tensors, reductions and 64-bin
histograms), once in float32 and once with autocast and a ``GradScaler``
(float16 on CUDA, bfloat16 on the CPU), and checks:

1. values: every captured weight and gradient is bit-equal to a copy taken
   on the device at the same point of the step (gradients, unscaled, just
   before the optimizer's step, weights just after), and the loss equals
   ``loss.item()``;
2. reductions: the stored ``mean``, ``l2``, ``max`` and health counts equal
   the NumPy formulas on the captured raw values (relative 1e-6);
3. histograms: the stored counts, binned on the device, equal the NumPy rule
   on the captured raw values and the stored edges;
4. synchronisation (CUDA only): how many CUDA synchronisations the training
   thread makes per saved step, in the forward and backward pass and in the
   optimizer's step (``torch.cuda.set_sync_debug_mode("warn")`` counts them;
   ``GradScaler.step`` makes one of its own);
5. cost: interleaved blocks of steps with and without the hook, with a
   second no-hook arm for the run's noise (:mod:`bench.harness`): raw values
   and reductions every step, the same with every tensor prepared when it is
   offered (the path before a step's tensors were taken into a batch,
   :mod:`tensortap.capture.torch.batch`), histograms of weights and gradients
   every step (the target's histogram figure), raw values and reductions
   every 100 steps; and on a Transformer encoder (on CUDA 6 layers of width
   512, 150 weights and gradients a step, 160 MB), what a long training
   saves: a few reductions of every weight and gradient every step (with a
   batch, and one tensor at a time), raw values every 100 steps.

Exits 1 when a value, reduction or histogram is wrong.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

import tensortap
import tensortap.torch as ttt
from bench import harness
from tensortap.capture.testing import numpy_histogram_rule

STEPS = 20
BATCH = 256
BINS = 64
REDUCTIONS = ["mean", "max", "nan_count", "inf_count"]
RAW_AND_REDUCTIONS = tensortap.ReductionConfig(reductions=REDUCTIONS, norms=["l2"], save_raw_tensor=True)
CHECKED = tensortap.ReductionConfig(reductions=REDUCTIONS, norms=["l2"], save_raw_tensor=True, histogram=BINS)
EVERYTHING = ("weights", "biases", "gradients", "losses")
WEIGHTS = ("weights", "biases", "gradients")
# what a long GPU training would save every step: a few numbers per tensor, no raw values
REDUCED = tensortap.ReductionConfig(reductions=["mean", "max", "nan_count"], norms=["l2"], abs_reductions=["mean"])
VOCAB = 1000


def _model(device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 10)).to(device)


def _hook(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    loss_fn: nn.Module,
    out_dir: str,
    config: tensortap.ReductionConfig,
    interval: int = 1,
    collections: Sequence[str] = EVERYTHING,
) -> Any:
    return ttt.capture(
        model,
        out_dir,
        optimizer=opt,
        loss=loss_fn,
        save_config=tensortap.SaveConfig(save_interval=interval),
        include_collections=list(collections),
        reduction_config=config,
    )


def _synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (CUDA); a CPU runs it synchronously already."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def _counted(syncs: dict[str, int], where: str, cuda: bool) -> Iterator[None]:
    """Add to ``syncs[where]`` the CUDA synchronisations made inside the block (none counted on a CPU)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if cuda:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            yield
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode("default")
    syncs[where] = syncs.get(where, 0) + sum("synchroniz" in str(w.message) for w in caught)


def _problems(trial: Any, name: str, step: int, want: np.ndarray) -> list[str]:
    """What differs between the captured ``name`` at ``step`` and ``want``: value, reductions, histogram."""
    tensor = trial.tensor(name)
    got = tensor.value(step)
    if got.dtype != want.dtype or not np.array_equal(got, want):
        return [f"{name} at step {step}: captured value differs from the device copy"]
    wide = want.astype(np.float64)
    formulas = {
        "mean": wide.mean(),
        "max": wide.max(),
        "l2": np.sqrt((wide * wide).sum()),
        "nan_count": float(np.isnan(wide).sum()),
        "inf_count": float(np.isinf(wide).sum()),
    }
    problems = []
    for key, value in formulas.items():
        stored = tensor.reduction_value(step, key)
        if not np.isclose(stored, value, rtol=1e-6, atol=1e-12):
            problems.append(f"{name} at step {step}: {key} {stored!r} != {value!r}")
    hist = tensor.histogram_value(step)
    if len(hist.counts) != BINS or not np.array_equal(hist.counts, numpy_histogram_rule(want, hist.edges)):
        problems.append(f"{name} at step {step}: histogram counts differ from the NumPy rule on the raw value")
    return problems


def check_values(device: torch.device, out_dir: str, amp: bool = False) -> list[str]:
    """Train ``STEPS`` steps with the hook (with autocast and a ``GradScaler`` if ``amp``); return the
    problems found (empty: all equal)."""
    model = _model(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loss_fn = nn.CrossEntropyLoss()
    hook = _hook(model, opt, loss_fn, out_dir, CHECKED)
    scaler = torch.amp.GradScaler(device.type) if amp else None
    half = torch.float16 if device.type == "cuda" else torch.bfloat16
    cuda = device.type == "cuda"  # synchronisations are counted on CUDA only
    expected: dict[tuple[str, int], np.ndarray] = {}
    losses: list[float] = []
    syncs: dict[str, int] = {}
    for step in range(STEPS):
        x = torch.randn(BATCH, 784, device=device)
        y = torch.randint(0, 10, (BATCH,), device=device)
        opt.zero_grad()
        with _counted(syncs, "forward and backward", cuda):
            with torch.autocast(device.type, dtype=half, enabled=amp):
                loss = loss_fn(model(x), y)
            (loss if scaler is None else scaler.scale(loss)).backward()
        if scaler is not None:
            scaler.unscale_(opt)  # as before clipping: the optimizer's step sees these gradients
        for name, p in model.named_parameters():
            assert p.grad is not None
            expected[(f"gradients/{name}", step)] = p.grad.detach().clone().cpu().numpy()
        losses.append(loss.item())
        _synchronize(device)
        with _counted(syncs, "optimizer step", cuda):
            if scaler is None:
                opt.step()  # the hook saves the step here
            else:
                scaler.step(opt)
        if scaler is not None:
            scaler.update()
        for name, p in model.named_parameters():
            expected[(name, step)] = p.detach().clone().cpu().numpy()
    hook.close()
    if cuda:
        counts = ", ".join(f"{where} {n / STEPS:.1f}" for where, n in syncs.items())
        print(f"  CUDA synchronisations per saved step with the hook: {counts}")
    trial = tensortap.create_trial(out_dir)
    problems = [p for (name, step), want in expected.items() for p in _problems(trial, name, step, want)]
    (loss_name,) = trial.tensor_names(collection="losses")
    for step, want in enumerate(losses):
        got = float(trial.tensor(loss_name).value(step))
        if got != want:
            problems.append(f"{loss_name} at step {step}: {got!r} != loss.item() {want!r}")
    return problems


class OneByOne(ttt.TorchOps):
    """TorchOps that prepares every tensor when it is offered, CUDA ones too (no batch): for comparison."""

    batched: ClassVar[frozenset[str]] = frozenset()


Workload = tuple[nn.Module, torch.optim.Optimizer, nn.Module, torch.Tensor, torch.Tensor]


def _mlp(device: torch.device) -> Workload:
    """The MLP, SGD, one batch of ``BATCH`` random images."""
    model = _model(device)
    x, y = torch.randn(BATCH, 784, device=device), torch.randint(0, 10, (BATCH,), device=device)
    return model, torch.optim.SGD(model.parameters(), lr=0.01), nn.CrossEntropyLoss(), x, y


def _transformer(device: torch.device) -> Workload:
    """A Transformer encoder language model, AdamW, one batch of random tokens: on CUDA 6 layers of
    width 512, 32 sequences of 128 tokens (75 parameter tensors, 20 M parameters); on a CPU a tiny one."""
    d, heads, layers, batch, tokens = (512, 8, 6, 32, 128) if device.type == "cuda" else (32, 2, 1, 4, 16)
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True)
    model = nn.Sequential(
        nn.Embedding(VOCAB, d), nn.TransformerEncoder(layer, layers, enable_nested_tensor=False), nn.Linear(d, VOCAB)
    ).to(device)
    x, y = (torch.randint(0, VOCAB, (batch, tokens), device=device) for _ in range(2))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4), nn.CrossEntropyLoss(), x, y


class DeviceArm:
    """Training steps on the device, with or without the hook (synchronised at each block's end)."""

    def __init__(
        self,
        device: torch.device,
        config: tensortap.ReductionConfig | None,
        interval: int = 1,
        collections: Sequence[str] = EVERYTHING,
        ops: ttt.TorchOps | None = None,
        workload: Callable[[torch.device], Workload] = _mlp,
    ) -> None:
        self.device = device
        self.model, self.opt, self.loss_fn, self.x, self.y = workload(device)
        self.out_dir = tempfile.mkdtemp(prefix="tensortap-gpu-")
        hooked = config is not None
        self.hook = (
            _hook(self.model, self.opt, self.loss_fn, self.out_dir, config, interval, collections) if hooked else None
        )
        if self.hook is not None and ops is not None:
            self.hook.ops = ops

    def run(self, n: int) -> None:
        for _ in range(n):
            self.opt.zero_grad()
            out = self.model(self.x)
            self.loss_fn(out.reshape(-1, out.shape[-1]), self.y.reshape(-1)).backward()
            self.opt.step()
        _synchronize(self.device)

    def close(self) -> None:
        if self.hook is not None:
            self.hook.close()

    def discard(self) -> None:
        """Remove the trial (untimed: see :func:`bench.harness.discard`)."""
        shutil.rmtree(self.out_dir, ignore_errors=True)


def _show(benchmark: str, timings: dict[str, harness.Timing]) -> None:
    print(benchmark)
    for row in harness.rows(benchmark, timings):
        print(f"  {row['case']:62s} {row['ms_per_step']:8.3f} ms/step  x{row['ratio']:.2f}  (noise {row['noise']:.3f})")


def main(argv: list[str] | None = None) -> int:
    """Run the checks; 0 when everything is right (or there is no GPU), 1 otherwise."""
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="where to train (default: cuda)")
    parser.add_argument("--rounds", type=int, default=8, help="blocks each arm is timed in (default: 8)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: the GPU check is skipped")
        return 0
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {name}, torch {torch.__version__}")
    problems = []
    for amp in (False, True):
        print("float32" if not amp else "autocast and GradScaler")
        out_dir = tempfile.mkdtemp(prefix="tensortap-gpu-")
        try:
            problems += check_values(device, out_dir, amp)
        finally:
            shutil.rmtree(out_dir, ignore_errors=True)
    for p in problems[:20]:
        print("PROBLEM:", p)
    print(f"values, reductions and histograms: {'all equal' if not problems else f'{len(problems)} problems'}")
    histograms = tensortap.ReductionConfig(histogram=BINS)
    mlp = harness.interleave(
        {
            harness.BASELINE: lambda: DeviceArm(device, None),
            harness.BASELINE_2: lambda: DeviceArm(device, None),
            "tensortap, every step, raw + reductions": lambda: DeviceArm(device, RAW_AND_REDUCTIONS),
            "the same, one tensor at a time (no batch)": lambda: DeviceArm(device, RAW_AND_REDUCTIONS, ops=OneByOne()),
            "tensortap, every step, histograms of weights and gradients": lambda: DeviceArm(
                device, histograms, collections=("weights", "gradients")
            ),
            "tensortap, every 100 steps, raw + reductions": lambda: DeviceArm(device, RAW_AND_REDUCTIONS, 100),
        },
        rounds=args.rounds,
        block=100,
        warmup=10,
    )
    _show(f"{device.type.upper()} MLP 784-512-256-10, batch 256", mlp)
    big = functools.partial(DeviceArm, device, workload=_transformer)
    transformer = harness.interleave(
        {
            harness.BASELINE: lambda: big(None),
            harness.BASELINE_2: lambda: big(None),
            "tensortap, every step, reductions of weights and gradients": lambda: big(REDUCED, collections=WEIGHTS),
            "the same, one tensor at a time (no batch)": lambda: big(REDUCED, collections=WEIGHTS, ops=OneByOne()),
            "tensortap, every 100 steps, raw weights and gradients + losses": lambda: big(
                RAW_AND_REDUCTIONS, 100, collections=(*WEIGHTS, "losses")
            ),
        },
        rounds=args.rounds,
        block=20,
        warmup=5,
    )
    _show(f"{device.type.upper()} Transformer encoder, AdamW", transformer)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
