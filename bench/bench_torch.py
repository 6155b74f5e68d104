"""Cost of the PyTorch adapter on a small training, against the same training without a hook.

An MLP 784-512-256-10 (535k parameters), batch 64, SGD, one CPU thread
(``torch.set_num_threads(1)``). Arms (each its own model, optimizer and hook
for the whole run, see :mod:`bench.harness`): no hook, twice (the run's
noise); tensortap saving weights, biases, gradients and losses (raw tensors)
every step and every 100 steps; the same with every layer's outputs, every
step; and (tensortap only) a 64-bin histogram of every weight and gradient,
no raw tensors, every step; tensortap saving step 0 only (what a step that is
not saved costs); the floor of every-step capture on this
machine (:class:`DiskFloorArm`: the same bytes written and fsynced, without
training); the floor of histograms counted off the training thread
(:class:`CopyFloorArm`: the training, copying its weights and gradients each
step); the floor of seeing every step (:class:`HooksFloorArm`: the training
with tensortap's five hooks, each doing nothing); and smdebug 1.0.34's hook on the first three cases, each arm a
process of smdebug's own environment (``bench/bench_torch_smdebug.py``,
:class:`bench.harness.Remote`). The arms run ``BLOCK`` steps at a time,
interleaved, ``ROUNDS`` times; an arm with a tensortap hook then publishes
the shard it is building and waits until its shards are published (so that none
is published by time in another arm's block), an smdebug arm writes its files
to disk (``os.sync``), and ``close()`` is timed with its arm. That wait is also
reported apart: ``ratio, settle left out`` is the ratio without it.

A second table measures what capture costs per tensor, where the values are
small and there are many: a 50-layer MLP of ``Linear(32, 32)`` (102 parameter
tensors, 13k parameters), batch 16, no hook (twice), tensortap saving weights,
biases, gradients and losses every step and every 100 steps, and smdebug
every step. ``us per tensor`` is the arm's time per step over the baseline's,
per tensor saved in a step.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from bench import harness

BATCH = 64
BLOCK = 100  # steps: each block pays once the wait for its last shard (the settle), a quarter of what 25 did
NEVER = 10**9  # a save interval no run reaches: only step 0 is saved
ROUNDS = 6  # 600 timed steps, a multiple of 100: the every-100-steps arm saves 6 times wherever it starts
WARMUP = 75  # untimed steps: five shards of the every-step arms, whose pool of shard arrays is then full
BENCHMARK = "torch MLP 784-512-256-10, batch 64"
BASIC = ("weights", "biases", "gradients", "losses")
FLOOR = "floor: a step's weights and gradients written and fsynced, no training"
COPY_FLOOR = "floor: training that copies its weights and gradients every step, nothing else"
HOOKS_FLOOR = "floor: training with the five hooks tensortap registers, each doing nothing"
UNSAVED = "tensortap: weights+biases+gradients+losses, step 0 only (what a step not saved costs)"
SMDEBUG_PYTHON = os.environ.get("TENSORTAP_SMDEBUG_PYTHON")  # smdebug's own environment, if there is one
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (arm, save interval, collections)
CASES: list[tuple[str, int, Sequence[str]]] = [
    ("weights+biases+gradients+losses, every step", 1, BASIC),
    ("weights+biases+gradients+losses, every 100 steps", 100, BASIC),
    ("weights+biases+gradients+losses+outputs, every step", 1, (*BASIC, "outputs")),
]

# builds a hook for (model, optimizer, loss module, out_dir, interval, collections); returns it (with close())
HookFactory = Callable[[nn.Module, torch.optim.Optimizer, nn.Module, str, int, Sequence[str]], Any]


def mlp() -> nn.Module:
    """The benchmark's model, with the same initial weights every time."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 10))


DEEP = "torch 50 x Linear(32, 32), batch 16 (102 parameter tensors)"
DEEP_CASES = CASES[:2]  # every step, every 100 steps


def deep() -> nn.Module:
    """The per-tensor benchmark's model: many small tensors, the same initial weights every time."""
    torch.manual_seed(0)
    return nn.Sequential(*[m for _ in range(50) for m in (nn.Linear(32, 32), nn.ReLU())], nn.Linear(32, 10))


class TrainArm:
    """One training (its own model, optimizer, data and, optionally, a hook) that runs steps on demand."""

    def __init__(
        self,
        make_hook: HookFactory | None = None,
        interval: int = 1,
        collections: Sequence[str] = (),
        model: Callable[[], nn.Module] = mlp,
        batch: int = BATCH,
    ) -> None:
        self.model = model()
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01)
        self.loss_fn = nn.CrossEntropyLoss()
        gen = torch.Generator().manual_seed(0)
        width = next(self.model.parameters()).shape[1]
        self.batches = [
            (torch.randn(batch, width, generator=gen), torch.randint(0, 10, (batch,), generator=gen)) for _ in range(16)
        ]
        self.i = 0
        self.out_dir = tempfile.mkdtemp(prefix="tensortap-bench-")
        self.hook = None
        if make_hook is not None:
            self.hook = make_hook(self.model, self.opt, self.loss_fn, self.out_dir, interval, collections)

    def run(self, n: int) -> None:
        for _ in range(n):
            x, y = self.batches[self.i % len(self.batches)]
            self.i += 1
            self.opt.zero_grad()
            self.loss_fn(self.model(x), y).backward()
            self.opt.step()

    def settle(self) -> None:
        """Publish what a tensortap hook holds and wait until it is published (see :func:`bench.harness.settle`)."""
        flush = getattr(getattr(self.hook, "writer", None), "flush", None)
        if flush is not None:
            flush()

    def close(self) -> None:
        if self.hook is not None:
            self.hook.close()

    def discard(self) -> None:
        """Remove the trial (untimed: see :func:`bench.harness.discard`)."""
        shutil.rmtree(self.out_dir, ignore_errors=True)


DEEP_ARM: dict[str, Any] = {"model": deep, "batch": 16}
"""The keywords of :class:`TrainArm` for an arm of the per-tensor table (:func:`deep`)."""
DeepArm = functools.partial(TrainArm, **DEEP_ARM)
"""An arm of the per-tensor table: ``DeepArm(make_hook, interval, collections)``."""


class CopyFloorArm(TrainArm):
    """The floor of histograms counted on another thread: the training thread must at least copy
    each step's weights and gradients (its gradients before the optimizer's step, its weights
    after it, as the hook takes them) before the optimizer or the next step changes them in
    place. Copies go into a few recycled buffers, as the hook's do; nothing else is done with them."""

    RING = 4  # sets of buffers in turn: those of the steps still being counted, in the hook

    def __init__(self) -> None:
        super().__init__()
        self.params = list(self.model.parameters())
        self.ring = [[np.empty(p.numel(), dtype=np.float32) for p in self.params] for _ in range(2 * self.RING)]
        self.copies = 0  # steps whose values were copied
        self.opt.register_step_pre_hook(lambda *_: self._copy(0, [p.grad for p in self.params]))
        self.opt.register_step_post_hook(lambda *_: self._copy(1, self.params))

    def _copy(self, which: int, tensors: Sequence[torch.Tensor | None]) -> None:
        """Copy a step's gradients (``which`` 0) or weights (1) into the next buffers of the ring."""
        bufs = self.ring[2 * (self.copies % self.RING) + which]
        self.copies += which
        for buf, t in zip(bufs, tensors, strict=True):
            assert t is not None
            np.copyto(buf, t.detach().numpy().reshape(-1))


class HooksFloorArm(TrainArm):
    """The floor of seeing every step: the training with the hooks tensortap's PyTorch adapter registers on it
    (before and after the model's forward, after the loss module's, before and after the optimizer's step),
    each a function that does nothing. PyTorch calls a module or an optimizer that has hooks through a
    longer path than one without; what a step that is not saved costs beyond this arm is tensortap's own."""

    def __init__(self) -> None:
        super().__init__()

        def nothing(*_: object, **__: object) -> None:
            return None

        self.model.register_forward_pre_hook(nothing)
        self.model.register_forward_hook(nothing, with_kwargs=True, always_call=True)
        self.loss_fn.register_forward_hook(nothing)
        self.opt.register_step_pre_hook(nothing)
        self.opt.register_step_post_hook(nothing)


class DiskFloorArm:
    """The floor of every-step raw capture: the bytes of a step's weights, biases and gradients
    written to one file, ``fsync``-ed each time it holds a default shard's bytes (as shards are published), without
    training, format, checksums or copies; its ratio to a training step is the least that saving
    every step can cost while the disk takes the bytes (when writing overlaps training perfectly,
    on the other core). The bytes are written as a shard writes large values: one page-aligned
    buffer a step, with ``O_DIRECT`` (around the page cache) where the file system takes it, else
    through the page cache, whose pages are dropped at each ``fsync``."""

    def __init__(self) -> None:
        # imported here: the processes of smdebug's environment import this module, without tensortap
        from tensortap.backends.shard import PAGE, page_aligned_empty
        from tensortap.backends.storage import drop_cached_pages
        from tensortap.capture import ShardPolicy

        self.drop_cached_pages = drop_cached_pages
        arrays = [p.detach().numpy().copy() for p in mlp().parameters() for _ in range(2)]  # value, gradient
        size = sum(a.nbytes for a in arrays)
        self.step = page_aligned_empty((size + (-size) % PAGE,), np.dtype(np.uint8))  # whole pages
        np.concatenate([a.view(np.uint8).reshape(-1) for a in arrays], out=self.step[:size])
        made, self.path = tempfile.mkstemp(prefix="tensortap-bench-floor-")
        os.close(made)
        try:
            self.fd = os.open(self.path, os.O_WRONLY | getattr(os, "O_DIRECT", 0))
        except OSError:  # a file system without O_DIRECT
            self.fd = os.open(self.path, os.O_WRONLY)
        self.steps = 0
        self.sync_every = max(1, ShardPolicy().shard_bytes // len(self.step))  # steps

    def run(self, n: int) -> None:
        for _ in range(n):
            os.pwrite(self.fd, self.step, self.steps * len(self.step))
            self.steps += 1
            if self.steps % self.sync_every == 0:
                self.settle()

    def settle(self) -> None:
        """Flush to disk and drop any cached pages, as a shard is when published (see
        :func:`bench.harness.settle`)."""
        os.fsync(self.fd)
        self.drop_cached_pages(self.fd)

    def close(self) -> None:
        self.settle()
        os.close(self.fd)

    def discard(self) -> None:
        """Remove the file (untimed, as the trials of the other arms: :func:`bench.harness.discard`)."""
        os.unlink(self.path)


def _tensortap_hook(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    loss_fn: nn.Module,
    out_dir: str,
    interval: int,
    collections: Sequence[str],
    histogram: int | None = None,
) -> Any:
    import tensortap
    import tensortap.torch as ttt

    configs = {}
    if histogram is not None:  # histograms only, no raw tensors
        only = tensortap.ReductionConfig(histogram=histogram)
        configs = {c: tensortap.Collection(c, reduction_config=only) for c in collections}
    return ttt.capture(
        model,
        out_dir,
        optimizer=opt,
        loss=loss_fn,
        save_config=tensortap.SaveConfig(save_interval=interval),
        include_collections=list(collections),
        collection_configs=configs,
    )


def _schedule(quick: bool) -> dict[str, int]:
    """The rounds, block and warm-up of :func:`bench.harness.interleave` (tiny with ``quick``)."""
    return {"rounds": 2, "block": 5, "warmup": 5} if quick else {"rounds": ROUNDS, "block": BLOCK, "warmup": WARMUP}


def run(quick: bool = False) -> list[dict[str, Any]]:
    """Measure and return one row per arm: ms per step, the ratio to no hook, the run's noise.

    The arms: no hook (twice), every case of :data:`CASES` with tensortap, tensortap's 64-bin
    histograms of weights and gradients, tensortap saving step 0 only, the disk floor, the copy floor,
    the hooks floor, and, where ``TENSORTAP_SMDEBUG_PYTHON``
    names smdebug's environment (not with ``quick``), every case of :data:`CASES` with smdebug.
    """
    torch.set_num_threads(1)
    arms: dict[str, Callable[[], harness.Arm]] = {harness.BASELINE: TrainArm, harness.BASELINE_2: TrainArm}
    for case, interval, collections in CASES:
        arms[f"tensortap: {case}"] = functools.partial(TrainArm, _tensortap_hook, interval, collections)
    histogram = functools.partial(_tensortap_hook, histogram=64)
    arms["tensortap: histogram=64 of weights and gradients, every step"] = lambda: TrainArm(
        histogram, 1, ("weights", "gradients")
    )
    arms[UNSAVED] = functools.partial(TrainArm, _tensortap_hook, NEVER, BASIC)
    arms[FLOOR] = DiskFloorArm
    arms[COPY_FLOOR] = CopyFloorArm
    arms[HOOKS_FLOOR] = HooksFloorArm
    if SMDEBUG_PYTHON and not quick:
        for i, (case, _, _) in enumerate(CASES):
            argv = [SMDEBUG_PYTHON, "-m", "bench.bench_torch_smdebug", str(i)]
            arms[f"smdebug 1.0.34: {case}"] = functools.partial(harness.Remote, argv, cwd=ROOT)
    timings = harness.interleave(arms, **_schedule(quick))
    return harness.rows(BENCHMARK, timings) + _run_deep(quick)


def _run_deep(quick: bool) -> list[dict[str, Any]]:
    """The per-tensor table: :func:`deep` without a hook (twice), with tensortap every step and every
    100 steps, and with smdebug every step where its environment is known."""
    arms: dict[str, Callable[[], harness.Arm]] = {harness.BASELINE: DeepArm, harness.BASELINE_2: DeepArm}
    for case, interval, collections in DEEP_CASES:
        arms[f"tensortap: {case}"] = functools.partial(DeepArm, _tensortap_hook, interval, collections)
    if SMDEBUG_PYTHON and not quick:
        argv = [SMDEBUG_PYTHON, "-m", "bench.bench_torch_smdebug", "0", "deep"]
        arms[f"smdebug 1.0.34: {DEEP_CASES[0][0]}"] = functools.partial(harness.Remote, argv, cwd=ROOT)
    timings = harness.interleave(arms, **_schedule(quick))
    rows = harness.rows(DEEP, timings)
    per_step = 2 * len(list(deep().parameters())) + 1  # weights or biases, their gradients, the loss
    base = timings[harness.BASELINE].per_unit
    for row, (name, t) in zip(rows, timings.items(), strict=True):
        if "every step" in name:
            row["us per tensor"] = (t.per_unit - base) * 1e6 / per_step
    return rows


def show(rows: list[dict[str, Any]]) -> None:
    """Print rows as a small table."""
    for row in rows:
        print(f"{row['case']:66s} {row['ms_per_step']:7.2f} ms/step  x{row['ratio']:.2f}  noise {row['noise']:.3f}")


if __name__ == "__main__":
    show(run())
