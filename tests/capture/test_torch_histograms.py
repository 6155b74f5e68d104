"""The histogram reduction during a real tiny PyTorch training, binned the way each device is."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import tensortap  # noqa: E402
import tensortap.torch as ttt  # noqa: E402
from tensortap import Collection, ReductionConfig, SaveConfig  # noqa: E402
from tensortap import reductions as red  # noqa: E402
from tensortap.capture import counting  # noqa: E402
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


class DeviceBatchedOps(DeviceBinnedOps):
    """... and takes CPU tensors into a step's batch as it takes CUDA ones (tensortap.capture.torch.batch)."""

    batched = frozenset({"cpu"})


OPS = pytest.mark.parametrize(
    "ops_class", [RecordingOps, DeviceBinnedOps, DeviceBatchedOps], ids=["cpu-view", "device-kernel", "device-batch"]
)


def _classifier() -> tuple[nn.Module, torch.optim.Optimizer]:
    """A small classifier (the same initial weights every time) and its SGD optimizer."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    return model, torch.optim.SGD(model.parameters(), lr=0.5)


def _histograms_every_step(model: nn.Module, opt: torch.optim.Optimizer, out_dir: Path) -> Any:
    """A hook saving histograms of ``BINS`` bins (no raw values) of the weights and gradients, every step."""
    hist_only = ReductionConfig(histogram=BINS)
    return ttt.capture(
        model,
        out_dir,
        optimizer=opt,
        save_config=SaveConfig(save_interval=1),
        include_collections=["weights", "gradients"],
        collection_configs={c: Collection(c, reduction_config=hist_only) for c in ("weights", "gradients")},
    )


@contextlib.contextmanager
def _counting_held() -> Iterator[None]:
    """Hold the counting thread for the block: it waits on a histogram whose lock the block holds, so
    nothing handed to it later is counted by it before the block ends (the writer still may)."""
    blocker = red.pending_histogram(np.zeros(4, np.float32), np.array([0.0, 1.0]))
    blocker._lock.acquire()
    counting.COUNTER.submit([blocker])
    try:
        yield
    finally:
        blocker._lock.release()


def _batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``STEPS`` batches of inputs and class labels for :func:`_classifier`, the same every time."""
    gen = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        yield torch.randn(8, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen)


@OPS
def test_histograms_of_weights_and_gradients_equal_the_rule_on_torch_values(
    tmp_path: Path, ops_class: type[RecordingOps]
) -> None:
    model, opt = _classifier()
    hook = _histograms_every_step(model, opt, tmp_path)
    hook.ops = ops = ops_class()
    grads, weights = [], []
    for x, y in _batches():
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


def test_the_device_kernel_makes_a_tensors_bounds_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The bounds of a tensor's fixed bins are computed, and copied to its device, at its first
    count only (a copy to a CUDA device from pageable memory waits for the work queued there)."""
    from tensortap.capture.torch import ops as torch_ops

    made: list[int] = []
    real = torch_ops.red.bin_bounds
    monkeypatch.setattr(torch_ops, "_BOUNDS", torch_ops.red.Remembered(4096))
    monkeypatch.setattr(torch_ops.red, "bin_bounds", lambda edges, work: made.append(1) or real(edges, work))
    model, opt = _classifier()
    hook = _histograms_every_step(model, opt, tmp_path)
    hook.ops = DeviceBinnedOps()
    for x, y in _batches():
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    hook.close()
    names = tensortap.create_trial(tmp_path).tensor_names()
    assert len(names) == 6  # 2 weights (biases are not in "weights"), the gradients of all 4 parameters
    assert len(made) == len(names)  # once each, not once a step


# ---------------------------------------------------------------- the patterns real scripts use
# Each run saves the raw tensor AND its histogram: the histogram of a step must be the rule applied to
# the raw value captured at that step, on the edges the first raw value fixes; the raw values are
# compared with what torch itself reported (forward hooks, .grad, the parameters).
RAW_AND_HISTOGRAM = ReductionConfig(save_raw_tensor=True, histogram=BINS)


def _capture(model: nn.Module, path: Path, ops_class: type[RecordingOps], collections: list[str], **kw: Any) -> Any:
    hook = ttt.capture(
        model,
        path,
        save_config=SaveConfig(save_interval=1),
        include_collections=collections,
        collection_configs={c: Collection(c, reduction_config=RAW_AND_HISTOGRAM) for c in collections},
        **kw,
    )
    hook.ops = ops_class()
    return hook


def _assert_histograms_are_the_rule_on_raw(trial: tensortap.Trial, steps: int) -> None:
    """Every tensor of ``trial``, at every step: histogram == the rule on its raw value, edges fixed from the first."""
    for name in trial.tensor_names():
        t = trial.tensor(name)
        assert t.steps() == list(range(steps)), name
        edges = numpy_rule_edges(t.value(0), BINS)
        assert edges is not None, name
        for step in range(steps):
            hist = t.histogram_value(step)
            np.testing.assert_array_equal(hist.edges, edges, err_msg=f"{name} {step}")
            np.testing.assert_array_equal(hist.counts, numpy_histogram_rule(t.value(step), edges), f"{name} {step}")


def _record(module: nn.Module) -> list[tuple[Any, Any]]:
    """What ``module``'s forward was given and returned, call after call, as torch gave it (detached copies)."""
    seen: list[tuple[Any, Any]] = []

    def record(m: nn.Module, args: Any, out: Any) -> None:
        seen.append(torch.utils._pytree.tree_map(_copy, (args, out)))

    module.register_forward_hook(record)
    return seen


def _copy(t: Any) -> Any:
    return t.detach().clone() if isinstance(t, torch.Tensor) else t


@OPS
def test_bfloat16_autocast_and_gradscaler_histograms_of_the_values_as_captured(
    tmp_path: Path, ops_class: type[RecordingOps], caplog: pytest.LogCaptureFixture
) -> None:
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    scaler = torch.amp.GradScaler("cpu")
    colls = ["weights", "gradients", "outputs", "inputs", "losses"]
    hook = _capture(model, tmp_path, ops_class, colls, optimizer=opt)
    calls = _record(model[2])
    gen = torch.Generator().manual_seed(1)
    grads, weights = [], []
    for _ in range(STEPS):
        x, y = torch.randn(8, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen)
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        scaler.step(opt)  # unscales p.grad in place before opt.step(), which the hook sees
        grads.append(model[0].weight.grad.numpy().copy())
        scaler.update()
        weights.append(model[0].weight.detach().numpy().copy())
    hook.close()
    ins, outs = [args[0] for args, _ in calls], [out for _, out in calls]
    assert outs[0].dtype == ins[0].dtype == torch.bfloat16 and loss.dtype == torch.float32
    assert not [r for r in caplog.records if r.name == "tensortap"]
    trial = tensortap.create_trial(tmp_path)
    for name in ("outputs/2", "inputs/2"):  # bfloat16 values: stored as float32, the original dtype recorded
        assert trial.tensor(name).summary()["orig_dtype"] == "bfloat16"
        assert trial.tensor(name).summary()["dtype"] == "float32"
    assert trial.tensor("gradients/0.weight").summary()["orig_dtype"] is None
    for step in range(STEPS):
        np.testing.assert_array_equal(trial.tensor("outputs/2").value(step), outs[step].float().numpy())
        np.testing.assert_array_equal(trial.tensor("inputs/2").value(step), ins[step].float().numpy())
        np.testing.assert_array_equal(trial.tensor("gradients/0.weight").value(step), grads[step])  # unscaled
        np.testing.assert_array_equal(trial.tensor("0.weight").value(step), weights[step])
    _assert_histograms_are_the_rule_on_raw(trial, STEPS)


@OPS
def test_lbfgs_closure_histograms_per_call_and_of_the_first_gradients(
    tmp_path: Path, ops_class: type[RecordingOps]
) -> None:
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 1))
    opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=3)
    hook = _capture(model, tmp_path, ops_class, ["gradients", "outputs", "losses"], optimizer=opt)
    outs = _record(model[2])
    gen = torch.Generator().manual_seed(7)
    x, y = torch.randn(16, 4, generator=gen), torch.randn(16, 1, generator=gen)
    first: list[np.ndarray] = []
    calls = [0]

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        if calls[0] == 0:
            first.append(model[0].weight.grad.numpy().copy())
        calls[0] += 1
        return loss

    per_step = []
    for _ in range(3):
        calls[0] = 0
        opt.step(closure)
        per_step.append(calls[0])
    hook.close()
    assert min(per_step) > 1  # backward ran several times in each step
    trial = tensortap.create_trial(tmp_path)
    call = 0
    for step, n in enumerate(per_step):
        np.testing.assert_array_equal(trial.tensor("gradients/0.weight").value(step), first[step])
        for i in range(n):
            np.testing.assert_array_equal(trial.tensor(f"outputs/2:{i}").value(step), outs[call][1].numpy())
            call += 1
    _assert_histograms_are_the_rule_on_raw(trial, 3)


class _Text(nn.Module):
    """Token ids -> sparse embedding -> LSTM -> GRU -> classes."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(30, 6, sparse=True)
        self.lstm = nn.LSTM(6, 5, batch_first=True)
        self.gru = nn.GRU(5, 4, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h, _ = self.lstm(self.emb(ids))
        g, _ = self.gru(h)
        return self.head(g[:, -1])


@OPS
def test_int64_token_ids_sparse_embedding_gradients_and_recurrent_tuple_outputs(
    tmp_path: Path, ops_class: type[RecordingOps]
) -> None:
    model = _Text()
    dense = [p for n, p in model.named_parameters() if not n.startswith("emb.")]
    sparse_opt, dense_opt = torch.optim.SparseAdam(list(model.emb.parameters()), lr=0.01), torch.optim.Adam(dense)
    hook = _capture(model, tmp_path, ops_class, ["weights", "gradients", "outputs", "inputs"])
    hook.attach_optimizer(sparse_opt)
    hook.attach_optimizer(dense_opt)
    lstm, gru = _record(model.lstm), _record(model.gru)
    gen = torch.Generator().manual_seed(3)
    ids_seen, emb_grads = [], []
    for _ in range(STEPS):
        ids, y = torch.randint(0, 30, (4, 7), generator=gen), torch.randint(0, 3, (4,), generator=gen)
        sparse_opt.zero_grad()
        dense_opt.zero_grad()
        nn.functional.cross_entropy(model(ids), y).backward()
        assert model.emb.weight.grad.layout == torch.sparse_coo
        emb_grads.append(model.emb.weight.grad.to_dense().numpy().copy())
        ids_seen.append(ids.numpy().copy())
        sparse_opt.step()
        dense_opt.step()
    hook.close()
    trial = tensortap.create_trial(tmp_path)
    for step in range(STEPS):
        ids = trial.tensor("inputs/emb").value(step)
        assert ids.dtype == np.int64
        np.testing.assert_array_equal(ids, ids_seen[step])
        assert trial.tensor("inputs/emb").histogram_value(step).counts.sum() == ids.size  # every id counted
        np.testing.assert_array_equal(trial.tensor("gradients/emb.weight").value(step), emb_grads[step])
        out, (h, c) = lstm[step][1]
        for name, want in (("outputs/lstm/0", out), ("outputs/lstm/1/0", h), ("outputs/lstm/1/1", c)):
            np.testing.assert_array_equal(trial.tensor(name).value(step), want.numpy(), err_msg=name)
        out, h = gru[step][1]
        np.testing.assert_array_equal(trial.tensor("outputs/gru/0").value(step), out.numpy())
        np.testing.assert_array_equal(trial.tensor("outputs/gru/1").value(step), h.numpy())
    _assert_histograms_are_the_rule_on_raw(trial, STEPS)


@OPS
def test_clipped_gradients_are_histogrammed_after_clipping(tmp_path: Path, ops_class: type[RecordingOps]) -> None:
    model, opt = _classifier()
    hook = _capture(model, tmp_path, ops_class, ["gradients"], optimizer=opt)
    unclipped, clipped = [], []
    for x, y in _batches():
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        unclipped.append(model[0].weight.grad.numpy().copy())
        nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.01)
        clipped.append(model[0].weight.grad.numpy().copy())
        opt.step()
    hook.close()
    trial = tensortap.create_trial(tmp_path)
    t = trial.tensor("gradients/0.weight")
    edges = t.histogram_value(0).edges
    for step in range(STEPS):
        np.testing.assert_array_equal(t.value(step), clipped[step])
        assert np.abs(unclipped[step]).max() > edges[-1] - edges[0]  # clipping changed what is binned
        np.testing.assert_array_equal(t.histogram_value(step).counts, numpy_histogram_rule(clipped[step], edges))
    _assert_histograms_are_the_rule_on_raw(trial, STEPS)


@OPS
def test_conjugate_and_negated_views_are_captured_and_binned(tmp_path: Path, ops_class: type[RecordingOps]) -> None:
    """Tensors with torch's lazy conjugate or negative bit (numpy() refuses them) were skipped with a warning."""
    model = nn.Linear(4, 8)
    hook = _capture(model, tmp_path, ops_class, ["custom"])
    gen = torch.Generator().manual_seed(2)
    seen = []
    for _ in range(STEPS):
        z = torch.fft.fft(model(torch.randn(3, 4, generator=gen)).detach())
        w = torch.randn(5, generator=gen)
        views = {"conj": z.conj(), "neg": torch._neg_view(w)}
        assert views["conj"].is_conj() and views["neg"].is_neg()
        for name, v in views.items():
            hook.save_tensor(name, v)
        seen.append({"conj": np.conj(z.numpy()), "neg": -w.numpy()})
    hook.close()
    trial = tensortap.create_trial(tmp_path)
    assert sorted(trial.tensor_names()) == ["conj", "neg"]
    for step in range(STEPS):
        for name, want in seen[step].items():
            np.testing.assert_array_equal(trial.tensor(name).value(step), want, err_msg=name)
    _assert_histograms_are_the_rule_on_raw(trial, STEPS)


@OPS
def test_float16_gradscaler_skipped_step_fixes_the_bins_at_the_first_finite_gradients(
    tmp_path: Path, ops_class: type[RecordingOps], caplog: pytest.LogCaptureFixture
) -> None:
    """The first scale overflows (every gradient Inf/NaN, the step skipped): that step has no gradients (none was
    applied), one warning says so; bins are fixed from the next step's gradients."""
    model = nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127, backoff_factor=2.0**-120)
    hook = _capture(model, tmp_path, ops_class, ["gradients", "outputs"], optimizer=opt)
    gen = torch.Generator().manual_seed(8)
    grads = []
    for _ in range(STEPS):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            out = model(torch.randn(8, 4, generator=gen))
        scaler.scale(out.float().pow(2).mean()).backward()
        scaler.step(opt)
        grads.append(model.weight.grad.numpy().copy())
        scaler.update()
    hook.close()
    assert not np.isfinite(grads[0]).any() and np.isfinite(grads[1]).all()
    warned = [r.getMessage() for r in caplog.records if r.name == "tensortap"]
    assert len(warned) == 1 and warned[0].startswith("tensortap: step 0 has no gradients: the GradScaler skipped")
    trial = tensortap.create_trial(tmp_path)
    t = trial.tensor("gradients/weight")
    assert t.steps() == list(range(1, STEPS))
    edges = numpy_rule_edges(grads[1], BINS)
    assert edges is not None
    for step in range(1, STEPS):
        np.testing.assert_array_equal(t.value(step), grads[step])
        hist = t.histogram_value(step)
        np.testing.assert_array_equal(hist.edges, edges)
        np.testing.assert_array_equal(hist.counts, numpy_histogram_rule(grads[step], edges))
    assert trial.tensor("outputs/Linear").summary()["dtype"] == "float16"  # NumPy has it: stored as is


def test_a_drain_that_outwaits_the_counting_says_so_and_loses_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A histogram still not counted after ``ShardPolicy.timeout``: ``drain`` returns with one warning, and
    the histogram is counted when its shard is written (here at ``close``), of the values at save."""
    model, opt = _classifier()
    hook = _histograms_every_step(model, opt, tmp_path)
    hook.writer.policy = dataclasses.replace(hook.writer.policy, timeout=0.2)
    grads = []
    with _counting_held():  # nothing after it is counted while the steps run
        for x, y in list(_batches())[:3]:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            grads.append(model[0].weight.grad.numpy().copy())
            opt.step()
        model(x)  # ends the last step
        with caplog.at_level(logging.WARNING, logger="tensortap"):
            hook.writer.drain()
    assert [r.getMessage() for r in caplog.records] == [
        "tensortap: histograms taken so far are not counted after 0.2 s; each is counted at the latest when "
        "its shard is written"
    ]
    hook.close()
    t = tensortap.create_trial(tmp_path).tensor("gradients/0.weight")
    edges = numpy_rule_edges(grads[0], BINS)
    for step, grad in enumerate(grads):
        np.testing.assert_array_equal(t.histogram_value(step).counts, numpy_histogram_rule(grad, edges))


def test_histograms_counted_later_are_of_the_values_at_save(tmp_path: Path) -> None:
    """The counting thread counts after the values changed in place: it must count the copies taken at save.

    The test holds the counting thread (the training thread, this one, still hands it each step's
    histograms), so nothing is counted before ``close()``: by then the weights have moved
    with every later ``opt.step()`` and each step's gradients were scaled by -1e6 in place right after
    ``opt.step()`` read them (and zeroed in place by the next ``zero_grad``).
    """
    model, opt = _classifier()
    hook = _histograms_every_step(model, opt, tmp_path)
    counter = counting.COUNTER
    grads, weights = [], []
    with _counting_held():
        for x, y in _batches():
            out = model(x)  # ends the step before, whose histograms go to the (held) counting thread
            assert len(grads) < 2 or counter._queue  # the first step fixes the bins: counted at once
            opt.zero_grad(set_to_none=False)  # the same gradient tensors every step
            nn.functional.cross_entropy(out, y).backward()
            grads.append(model[0].weight.grad.numpy().copy())
            opt.step()  # gradients saved now, weights at the step's end
            weights.append(model[0].weight.detach().numpy().copy())
            with torch.no_grad():
                for p in model.parameters():
                    p.grad.mul_(-1e6)  # after the save: counted, they would fill the outer bins
    hook.close()
    assert not counter._queue
    trial = tensortap.create_trial(tmp_path)
    for name, seen in (("gradients/0.weight", grads), ("0.weight", weights)):
        t = trial.tensor(name)
        edges = numpy_rule_edges(seen[0], BINS)
        assert edges is not None
        for step, value in enumerate(seen):
            counts = t.histogram_value(step).counts
            np.testing.assert_array_equal(counts, numpy_histogram_rule(value, edges), err_msg=f"{name} {step}")
            assert counts[0] + counts[-1] < value.size / 2, f"{name} {step}"  # not the values changed after
    assert not np.array_equal(weights[1], weights[-1])


def test_a_bfloat16_weight_saved_as_a_histogram_alone_keeps_its_dtype_and_counts(tmp_path: Path) -> None:
    # histogram only (no raw value, no reduction): the hook takes no host copy for the record,
    # yet the original dtype is recorded and the counts are the rule's on the widened values
    model = nn.Linear(32, 16).to(torch.bfloat16)
    hook = ttt.capture(
        model,
        tmp_path,
        save_config=SaveConfig(save_interval=1),
        include_collections=["weights"],
        collection_configs={"weights": Collection("weights", reduction_config=ReductionConfig(histogram=BINS))},
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    weights = []
    for step in range(3):
        model(torch.randn(4, 32, generator=torch.Generator().manual_seed(step)).to(torch.bfloat16)).sum().backward()
        opt.step()
        opt.zero_grad()
        weights.append(model.weight.detach().float().numpy().copy())
    hook.close()
    t = tensortap.create_trial(tmp_path).tensor("weight")
    assert t.summary()["orig_dtype"] == "bfloat16"
    with pytest.raises(tensortap.TensorUnavailableForStep):
        t.value(0)  # no raw value was saved
    edges = numpy_rule_edges(weights[0], BINS)
    assert edges is not None
    for step, w in enumerate(weights):
        np.testing.assert_array_equal(t.histogram_value(step).counts, numpy_histogram_rule(w, edges))
