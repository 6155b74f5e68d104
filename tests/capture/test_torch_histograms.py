"""The histogram reduction during a real tiny PyTorch training, binned the way each device is."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import tensortap  # noqa: E402
import tensortap.torch as ttt  # noqa: E402
from tensortap import Collection, ReductionConfig, SaveConfig  # noqa: E402
from tensortap.capture.testing import numpy_histogram_rule, numpy_rule_edges  # noqa: E402

pytestmark = [pytest.mark.torch, pytest.mark.usefixtures("torch_one_thread")]

BINS = 8
STEPS = 4


class RecordingOps(ttt.TorchOps):
    """TorchOps that records whether the core asked for a host copy of a tensor."""

    def __init__(self) -> None:
        self.raw_asked: list[bool] = []

    def prepare(
        self, value: Any, keys: Sequence[str], raw: bool
    ) -> tuple[np.ndarray | None, dict[str, float], str | None]:
        self.raw_asked.append(raw)
        return super().prepare(value, keys, raw)


class DeviceBinnedOps(RecordingOps):
    """... and bins CPU tensors with the kernel CUDA tensors get (``torch.bucketize``)."""

    host_binned = frozenset()


@pytest.mark.parametrize("ops_class", [RecordingOps, DeviceBinnedOps], ids=["cpu-view", "device-kernel"])
def test_histograms_of_weights_and_gradients_equal_the_rule_on_torch_values(
    tmp_path: Path, ops_class: type[RecordingOps]
) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    hist_only = ReductionConfig(histogram=BINS)
    hook = ttt.capture(
        model,
        tmp_path,
        optimizer=opt,
        save_config=SaveConfig(save_interval=1),
        include_collections=["weights", "gradients"],
        collection_configs={c: Collection(c, reduction_config=hist_only) for c in ("weights", "gradients")},
    )
    hook.ops = ops = ops_class()
    gen = torch.Generator().manual_seed(1)
    grads, weights = [], []
    for _ in range(STEPS):
        x, y = torch.randn(8, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        grads.append(model[0].weight.grad.numpy().copy())
        opt.step()
        weights.append(model[0].weight.detach().numpy().copy())
    hook.close()

    assert ops.raw_asked and not any(ops.raw_asked)  # only counts came to the host, never a tensor
    trial = tensortap.create_trial(tmp_path)
    for name, seen in (("gradients/0.weight", grads), ("0.weight", weights)):
        t = trial.tensor(name)
        assert t.steps() == list(range(STEPS)) and not t.has_raw(0)
        edges = numpy_rule_edges(seen[0], BINS)  # fixed from the first saved value
        assert edges is not None
        for step, value in enumerate(seen):
            hist = t.histogram_value(step)
            np.testing.assert_array_equal(hist.edges, edges)
            np.testing.assert_array_equal(hist.counts, numpy_histogram_rule(value, edges), err_msg=f"{name} {step}")
        assert not np.array_equal(seen[0], seen[-1])  # the values moved under fixed bins
