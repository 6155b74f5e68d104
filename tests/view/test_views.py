"""Notebook views of a real PyTorch trial: reprs, series, plots and histograms, checked against PyTorch's numbers."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from html import escape
from pathlib import Path

import numpy as np
import pytest

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
pd = pytest.importorskip("pandas")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import colormaps  # noqa: E402

import tensortap  # noqa: E402
from tensortap import Mode, ReductionConfig, TensorUnavailableForStep  # noqa: E402
from tensortap.capture import Writer  # noqa: E402
from tensortap.trial.views import default_series  # noqa: E402

from .conftest import BINS, EVAL_EVERY, TRAIN_STEPS, Run  # noqa: E402

pytestmark = pytest.mark.torch


@pytest.fixture(autouse=True)
def _close_figures() -> None:
    yield
    plt.close("all")


def loss_name(trial: tensortap.Trial) -> str:
    (name,) = trial.tensor_names(regex="^losses/")
    return name


def test_plain_and_html_repr_of_trial(run: Run) -> None:
    trial = run.trial()
    text = repr(trial)
    assert f"{TRAIN_STEPS + TRAIN_STEPS // EVAL_EVERY} steps" in text
    assert f"train {TRAIN_STEPS}" in text and f"eval {TRAIN_STEPS // EVAL_EVERY}" in text and "ended" in text
    html = trial._repr_html_()
    assert "worker_0" in html and "pytorch" in html
    assert f"train steps</th><td style='text-align:left'>{TRAIN_STEPS} (0-{TRAIN_STEPS - 1})" in html
    assert "gradients (4)" in html and "weights (2)" in html
    row = re.search(r"<tr><td style='text-align:left'>0.weight</td><td>(.*?)</td><td>(.*?)</td><td>(.*?)</td>", html)
    assert row is not None and row.groups() == ("weights", "8x6", "float32")
    assert "steps/s" in html


def test_a_short_run_has_ticks_at_whole_steps_only(tmp_path: Path) -> None:
    """A run of three steps was drawn with ticks at 0.25, 0.5, ... on its step axis, steps that do not exist."""
    with Writer(tmp_path) as w:
        for step in range(3):
            with w.stepping():
                w.save("losses/loss", np.float32(1.0 / (step + 1)), ["losses"])
                w.save("weights/w", np.arange(4.0) * step, ["weights"])
    trial = tensortap.create_trial(tmp_path)
    for ax in (trial.plot("losses/loss"), trial.tensor("weights/w").plot_histograms()):
        ax.figure.canvas.draw()
        ticks = ax.get_xticks()
        assert len(ticks) and all(float(t).is_integer() for t in ticks), ticks
    assert not all(float(t).is_integer() for t in trial.plot("losses/loss", x="time").get_xticks())


def test_the_html_view_of_an_empty_trial_says_what_ls_says(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The notebook's view of an empty folder (a run about to start) said "running (or stopped without an end
    marker)" where ``ls`` says "no data yet"."""
    from tensortap.cli import main

    html = tensortap.create_trial(tmp_path)._repr_html_()
    assert "no data yet (no worker has started)" in html and "running" not in html
    assert main(["ls", str(tmp_path)]) == 0
    assert "no data yet (no worker has started)" in capsys.readouterr().out


def test_html_escapes_names_from_the_trial(tmp_path: Path) -> None:
    with Writer(tmp_path) as w, w.stepping():
        w.save("<script>alert(1)</script>", np.float32(1.0))
    trial = tensortap.create_trial(tmp_path)
    assert "<script>" not in trial._repr_html_()
    assert "&lt;script&gt;" in trial._repr_html_()
    assert "<script>" not in trial.tensor("<script>alert(1)</script>")._repr_html_()


ODD_NAMES = ["\x1b]0;pwned\x07\x1b[31mred", "a\nb", "\u202eRTL", "c1\x9bcsi", "del\x7f", "w$\\frac{$"]
CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\xad\u061c\u180e\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff]")


def test_views_and_the_report_escape_control_characters_of_names(tmp_path: Path) -> None:
    """The notebook's HTML, a tensor's repr (its collections) and the HTML report held a stranger's names
    raw: an ESC byte, a C1 control or a right-to-left override that reorders what a reader sees. They are
    written as text output writes them (``\\x1b``), as the command line does. In plots a name holding
    ``$...$`` was mathtext: ``$\\frac{$`` failed when drawn (the report said "not drawn")."""
    from tensortap.trial.report import build_report

    with Writer(tmp_path) as w:
        for step in range(2):
            with w.stepping():
                for name in ODD_NAMES:
                    w.save(name, np.array([1.0, 1e9 if step else 1.0]), ["weights", "odd\x1b[2Jcollection"])
    trial = tensortap.create_trial(tmp_path)
    report = build_report(trial, rules=["exploding_tensor"], show_progress=False)
    shown = {
        "trial html": trial._repr_html_(),
        "tensor html": trial.tensor(ODD_NAMES[0])._repr_html_(),
        "tensor repr": repr(trial.tensor(ODD_NAMES[0])),
        "report": report.replace("\n", ""),
    }
    for where, text in shown.items():
        assert not CONTROL.search(text), (where, CONTROL.findall(text))
    assert r"\x1b]0;pwned\x07\x1b[31mred" in shown["trial html"] and r"\u202eRTL" in shown["trial html"]
    assert r"odd\x1b[2Jcollection" in shown["tensor repr"]
    assert "fired" in report and r"\x1b]0;pwned" in report and "not drawn" not in report
    for name in ODD_NAMES:
        trial.plot(name).figure.savefig(tmp_path / "plot.png")
        trial.tensor(name).plot_histograms().figure.savefig(tmp_path / "histograms.png")


def test_a_very_long_name_is_drawn_shortened(tmp_path: Path) -> None:
    """A stranger's name of two million characters took matplotlib minutes and a gigabyte, then failed to
    draw ("raster overflow"); a name is drawn with its start and end around an ellipsis."""
    name = "w/" + "A" * 100_000 + "tail$"
    with Writer(tmp_path) as w:
        for _ in range(2):
            with w.stepping():
                w.save(name, np.float32(1.0))
    ax = tensortap.create_trial(tmp_path).plot(name)
    texts = [ax.get_ylabel(), ax.get_legend().get_texts()[0].get_text()]
    assert all(t.startswith("w/AAA") and "\u2026" in t and len(t) < 200 for t in texts), texts
    assert "tail\\$" in texts[1]
    ax.figure.savefig(tmp_path / "plot.png")


def test_tensor_repr_and_sparkline(run: Run) -> None:
    trial = run.trial()
    t = trial.tensor(loss_name(trial))
    assert (
        repr(t)
        == f"<Tensor {t.name!r}: {TRAIN_STEPS + TRAIN_STEPS // EVAL_EVERY} steps, float32 scalar, collections losses>"
    )
    html = t._repr_html_()
    points = re.search(r"points='([^']+)'", html)
    assert points is not None
    ys = [float(p.split(",")[1]) for p in points.group(1).split()]
    values = list(t.to_series(mode="train").values)  # the train losses alone: eval ones between read as spikes
    np.testing.assert_allclose(values, run.train_loss, rtol=1e-6)
    assert len(ys) == len(values) == TRAIN_STEPS and "value (train)" in html
    # the highest loss is drawn highest (smallest SVG y), the lowest lowest
    assert int(np.argmin(ys)) == int(np.argmax(values)) and int(np.argmax(ys)) == int(np.argmin(values))
    g = trial.tensor("gradients/0.weight")
    assert "reductions only" in repr(g) and "l2" in g._repr_html_()


def test_to_series_of_a_scalar_is_floats(run: Run) -> None:
    trial = run.trial()
    t = trial.tensor(loss_name(trial))
    train = t.to_series(mode="train")
    assert train.dtype == np.float64 and train.index.name == "train step"
    assert list(train.index) == list(range(TRAIN_STEPS))
    np.testing.assert_allclose(train.values, run.train_loss, rtol=1e-6)
    np.testing.assert_allclose(t.to_series(mode="eval").values, run.eval_loss, rtol=1e-6)
    assert t.to_series().index.name == "step" and len(t.to_series()) == len(trial.steps())
    assert math.isclose(t.to_series().mean(), np.mean(run.train_loss + run.eval_loss), rel_tol=1e-6)
    with pytest.raises(ValueError, match=r"not a scalar.*shape is \(8, 6\)"):
        trial.tensor("0.weight").to_series()
    w = trial.tensor("0.weight").to_series("abs_max", mode="train")
    np.testing.assert_allclose(w.values, [np.abs(s["0.weight"]).max() for s in run.weights], rtol=1e-6)


def test_tensor_plot_modes_as_lines_against_mode_step(run: Run) -> None:
    trial = run.trial()
    ax = trial.tensor(loss_name(trial)).plot(x="step")
    lines = {line.get_label(): line for line in ax.get_lines()}
    name = loss_name(trial)
    assert set(lines) == {f"{name} (train)", f"{name} (eval)"}
    train, evals = lines[f"{name} (train)"], lines[f"{name} (eval)"]
    assert list(train.get_xdata()) == list(range(TRAIN_STEPS))
    np.testing.assert_allclose(train.get_ydata(), run.train_loss, rtol=1e-6)
    assert list(evals.get_xdata()) == [0, 1, 2]
    np.testing.assert_allclose(evals.get_ydata(), run.eval_loss, rtol=1e-6)
    assert ax.get_xlabel() == "step" and ax.get_ylabel() == name


def test_plot_against_global_step_and_time(run: Run) -> None:
    trial = run.trial()
    name = loss_name(trial)
    ax = trial.tensor(name).plot(x="global_step", mode="eval")
    (line,) = ax.get_lines()
    assert list(line.get_xdata()) == [trial.global_step(s, "eval") for s in range(3)] == [4, 9, 14]
    assert ax.get_xlabel() == "global step"
    ax = trial.tensor(name).plot(x="time", mode="train")
    (line,) = ax.get_lines()
    xs = np.asarray(line.get_xdata())
    assert xs[0] == 0.0 and np.all(np.diff(xs) > 0)
    assert ax.get_xlabel() == "time since start (s)"
    assert trial.steps_per_second() is not None and trial.steps_per_second() > 0


def test_trial_plot_regex_with_a_reduction(run: Run) -> None:
    trial = run.trial()
    ax = trial.plot("^gradients/.*weight", reduction="l2", mode="train")
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert set(lines) == {"gradients/0.weight", "gradients/2.weight"}
    for layer in ("0.weight", "2.weight"):
        np.testing.assert_allclose(
            lines[f"gradients/{layer}"].get_ydata(), [np.linalg.norm(g[layer]) for g in run.grads], rtol=1e-5
        )
    assert ax.get_ylabel() == "l2" and ax.get_xlabel() == "train step"
    with pytest.raises(tensortap.TensorUnavailable, match="no tensor name matches"):
        trial.plot("^nothing")


def test_histogram_reduction_equals_numpy_on_pytorch_gradients(run: Run) -> None:
    trial = run.trial()
    g = trial.tensor("gradients/0.weight")
    first = run.grads[0]["0.weight"]
    edges0 = np.linspace(float(first.min()), float(first.max()), BINS + 1)  # float64, as tensortap fixes them
    for step in range(TRAIN_STEPS):
        edges, counts = g.histogram_value(step, mode="train")
        np.testing.assert_allclose(edges, edges0, rtol=1e-6)  # fixed from the first saved range
        grad = run.grads[step]["0.weight"].astype(np.float64)
        want, _ = np.histogram(np.clip(grad, edges[0], edges[-1]), bins=edges)
        np.testing.assert_array_equal(counts, want)
        assert counts.sum() == grad.size
    with pytest.raises(TensorUnavailableForStep):
        g.value(0, mode="train")


def test_histogram_plot_draws_the_counts(run: Run) -> None:
    trial = run.trial()
    ax = trial.tensor("gradients/2.weight").histogram(3, mode="train")
    (patch,) = ax.patches
    values, edges, _ = patch.get_data()
    saved = trial.tensor("gradients/2.weight").histogram_value(3, mode="train")
    np.testing.assert_array_equal(values, saved.counts)
    np.testing.assert_array_equal(edges, saved.edges)
    assert ax.get_xlabel() == "gradients/2.weight (value)" and ax.get_ylabel() == "count"
    # a raw tensor is binned on the fly
    ax = trial.tensor("0.weight").histogram(0, mode="train", bins=10)
    values, edges, _ = ax.patches[0].get_data()
    w = run.weights[0]["0.weight"]
    np.testing.assert_array_equal(values, np.histogram(w.astype(np.float64), bins=10)[0])


def test_histograms_over_steps_heat_map(run: Run) -> None:
    trial = run.trial()
    ax = trial.tensor("gradients/0.weight").plot_histograms()
    (mesh,) = ax.collections
    counts = np.asarray(mesh.get_array()).reshape(BINS, TRAIN_STEPS)
    for step in range(TRAIN_STEPS):
        np.testing.assert_array_equal(
            counts[:, step], trial.tensor("gradients/0.weight").histogram_value(step, "train").counts
        )
    assert ax.get_xlabel() == "train step" and ax.get_ylabel() == "gradients/0.weight (value)"
    # raw weights: common bins over every step's range
    ax = trial.tensor("2.weight").plot_histograms(bins=8)
    (mesh,) = ax.collections
    counts = np.asarray(mesh.get_array()).reshape(8, TRAIN_STEPS)
    assert list(counts.sum(axis=0)) == [24] * TRAIN_STEPS
    lo = min(w["2.weight"].min() for w in run.weights)
    hi = max(w["2.weight"].max() for w in run.weights)
    edges = np.linspace(lo, hi, 9)
    np.testing.assert_array_equal(counts[:, 5], np.histogram(run.weights[5]["2.weight"].astype(np.float64), edges)[0])


def test_a_tail_of_few_values_shows_beside_a_peak_of_thousands(tmp_path: Path) -> None:
    """Counts are coloured on a log scale: on the linear one a bin of 2 beside a peak of 10,000 had the
    empty bins' colour, and a gradient's tails did not show. A bin of 1 is not taken for an empty one."""
    with Writer(tmp_path, reduction_config=ReductionConfig(histogram=[-1.0, 0.0, 1.0, 2.0, 3.0])) as w:
        for _ in range(3):
            with w.stepping():
                w.save("g", np.concatenate([[-0.5], np.zeros(10_000), [1.5, 1.5]]))
    tensor = tensortap.create_trial(tmp_path).tensor("g")
    colours = {}
    for log in (True, False):
        mesh = tensor.plot_histograms(log=log).collections[0]
        np.testing.assert_array_equal(np.asarray(mesh.get_array()).reshape(4, 3)[:, 0], [1, 10_000, 2, 0])
        colours[log] = mesh.to_rgba(mesh.get_array()).reshape(4, 3, 4)[:, 0, :3]  # the bins at step 0
    one, peak, two, empty = colours[True]
    assert np.array_equal(empty, [1, 1, 1])  # white
    assert all(np.abs(c - empty).max() > 0.2 for c in (one, peak, two))
    assert np.abs(two - one).max() > 0.05 and np.abs(peak - two).max() > 0.05
    linear = colours[False]
    assert np.abs(linear[2] - linear[3]).max() < 0.01  # linear: the bin of 2 had the empty bins' colour


def test_empty_bins_are_white_when_no_bin_holds_more_than_one_value(tmp_path: Path) -> None:
    """Where no bin held more than one value (a bias of two values), the scale fell back to a linear one
    from 0 and the empty bins took the colour a bin of one value has in every other heat map."""
    with Writer(tmp_path, reduction_config=ReductionConfig(histogram=[0.0, 1.0, 2.0, 3.0])) as w:
        for _ in range(2):
            with w.stepping():
                w.save("bias", np.array([0.5, 2.5]))
    ax = tensortap.create_trial(tmp_path).tensor("bias").plot_histograms()
    mesh = ax.collections[0]
    np.testing.assert_array_equal(np.ma.getdata(mesh.get_array()).reshape(3, 2)[:, 0], [1, 0, 1])
    one, empty, _ = mesh.to_rgba(mesh.get_array()).reshape(3, 2, 4)[:, 0, :3]
    assert np.array_equal(empty, [1, 1, 1])
    assert np.allclose(one, colormaps["viridis"](0.0)[:3])  # a bin of one value: the lowest colour, as elsewhere
    assert ax.figure.axes[-1].get_ylabel() == "count (log scale)"


def test_curves_of_train_and_eval_losses_are_drawn_against_the_global_step(run: Run) -> None:
    """``tensor.plot()``, ``trial.plot``, the report and ``tensortap plot`` drew an eval loss at its own mode
    steps (0, 1, 2) on the axis of the train steps, as if it had been computed at the first train steps."""
    from tensortap.trial.plot import curves_axis

    trial = run.trial()
    name = loss_name(trial)
    assert curves_axis([trial], [name]) == "global_step" and curves_axis([trial], [name], "eval") == "step"
    assert curves_axis([trial], ["gradients/0.weight"]) == "step"  # one mode: its own steps
    for ax in (trial.tensor(name).plot(), trial.plot(name)):
        lines = {line.get_label(): line for line in ax.get_lines()}
        assert set(lines) == {f"{name} (train)", f"{name} (eval)"} and ax.get_xlabel() == "global step"
        for mode, line in (("train", lines[f"{name} (train)"]), ("eval", lines[f"{name} (eval)"])):
            steps = trial.tensor(name).steps(mode)
            assert list(line.get_xdata()) == [trial.global_step(s, mode) for s in steps]
        np.testing.assert_allclose(lines[f"{name} (eval)"].get_ydata(), run.eval_loss, rtol=1e-6)
        assert max(lines[f"{name} (eval)"].get_xdata()) > len(run.eval_loss)  # not at its mode steps
    ax = trial.tensor(name).plot(mode="eval")  # one mode: its own steps
    assert list(ax.get_lines()[0].get_xdata()) == [0, 1, 2] and ax.get_xlabel() == "eval step"


def test_the_reports_gradient_norms_hold_the_gradient_of_a_one_output_head(tmp_path: Path) -> None:
    """The report left out of its gradient norms every gradient of one value (the bias of a ``Linear(n, 1)`` or
    ``Dense(1)`` head), which it took for a scalar curve; it showed in no section. Each image now says in its
    text which lines it draws."""
    from tensortap.trial.report import build_report

    with Writer(tmp_path) as w:
        for step in range(3):
            with w.stepping():
                w.save("gradients/head.weight", np.full((1, 4), 0.1 * (step + 1)), ["gradients"])
                w.save("gradients/head.bias", np.array([0.5 / (step + 1)]), ["gradients"])
    page = build_report(tensortap.create_trial(tmp_path), rules=[], show_progress=False)
    alts = re.findall(r"<img alt='([^']*)'", page)
    norms = [a for a in alts if "gradients/head.weight" in a and "distribution" not in a]
    assert norms and "gradients/head.bias" in norms[0], alts


def test_the_report_says_once_what_a_rule_lacked(run: Run) -> None:
    """A rule that found none of its inputs was explained twice in one cell (its missing input, then the
    error that repeats it)."""
    from tensortap.trial.report import build_report

    page = build_report(run.trial(), rules=["dead_relu"], show_progress=False)
    assert "could not judge" in page and page.count("collection &#x27;outputs&#x27;") == 1


def test_compare_plots_runs_side_by_side(run: Run, run_b: Run) -> None:
    cmp = tensortap.compare([run.trial(), str(run_b.path)])
    assert cmp.labels == ["run_a", "run_b"]
    name = loss_name(run.trial())
    ax = cmp.plot(name, mode="train")
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert set(lines) == {f"run_a: {name}", f"run_b: {name}"}
    np.testing.assert_allclose(lines[f"run_a: {name}"].get_ydata(), run.train_loss, rtol=1e-6)
    np.testing.assert_allclose(lines[f"run_b: {name}"].get_ydata(), run_b.train_loss, rtol=1e-6)
    df = cmp.to_pandas([name])
    assert set(df["run"]) == {"run_a", "run_b"}


def test_compare_to_pandas_takes_a_name_and_refuses_one_no_run_saved(run: Run, run_b: Run) -> None:
    """``compare([...]).to_pandas("losses/...")`` read the string letter by letter and returned an empty
    table; a misspelt name in the list gave an empty table too, without a word. A string is a name or a
    regular expression now, as in ``plot``, and a name that no run saved raises TensorUnavailable."""
    cmp = tensortap.compare([run.trial(), run_b.trial()])
    name = loss_name(run.trial())
    df = cmp.to_pandas(name)
    for r, label in ((run, "run_a"), (run_b, "run_b")):
        train = df[(df["run"] == label) & (df["mode"] == "TRAIN")].sort_values("mode_step")
        np.testing.assert_allclose(train.value, r.train_loss, rtol=1e-6)
    where = f"{run.trial().path}, {run_b.trial().path}"  # paths, not the labels (hunt 33 L9)
    with pytest.raises(tensortap.TensorUnavailable, match=re.escape(f"no tensor named {name[:-1]!r} in {where}; did")):
        cmp.to_pandas([name[:-1]])


def test_a_misspelt_name_given_as_one_string_gets_the_closest_names(run: Run, run_b: Run) -> None:
    """``plot("losses/MSELosss")`` (one string, not a list) said no name matched, with no suggestion, while the
    list form suggested; ``compare(...).plot("([")`` raised a bare ``re.error`` where ``Trial.plot`` raised the
    ValueError that names the regular expression."""
    cmp = tensortap.compare([run.trial(), run_b.trial()])
    misspelt = loss_name(run.trial()) + "s"
    for call in (cmp.plot, cmp.to_pandas, run.trial().plot):
        with pytest.raises(tensortap.TensorUnavailable, match=f"no tensor name matches {misspelt!r} in .*; did you"):
            call(misspelt)
    for call in (cmp.plot, cmp.to_pandas, run.trial().plot):
        with pytest.raises(ValueError, match="not a valid regular expression"):
            call("([")


def test_to_pandas_computes_reductions_of_raw_tensors(run: Run) -> None:
    trial = run.trial()
    df = trial.to_pandas(names=["0.weight", "gradients/0.weight"], reductions=["mean", "l2"])
    w = df[(df.name == "0.weight") & (df["mode"] == "TRAIN")]
    assert len(w) == 2 * TRAIN_STEPS
    means = w[w.reduction == "mean"].sort_values("mode_step")["value"].to_numpy()
    np.testing.assert_allclose(means, [s["0.weight"].astype(np.float64).mean() for s in run.weights], rtol=1e-6)
    g = df[df.name == "gradients/0.weight"]
    assert set(g.reduction) == {"l2"}  # saved; the mean is not computable without the raw tensor
    default = trial.to_pandas(names=["0.weight"])
    assert set(default.reduction) == set(tensortap.trial.trial.DEFAULT_RAW_REDUCTIONS)


def test_to_pandas_takes_names_and_a_collection_together_and_one_name(run: Run) -> None:
    """``to_pandas(names=[...], collection="losses")`` left the collection out silently (the weights came
    too), and ``to_pandas("losses/...")`` read the string letter by letter: ``no tensor named 'l'``."""
    trial = run.trial()
    loss = loss_name(trial)
    df = trial.to_pandas(names=[loss, "0.weight"], collection="losses")
    assert set(df.name) == {loss}
    train = df[df["mode"] == "TRAIN"].sort_values("mode_step")
    np.testing.assert_allclose(train.value, run.train_loss, rtol=1e-6)
    pd.testing.assert_frame_equal(trial.to_pandas(loss), trial.to_pandas(names=[loss]))
    with pytest.raises(tensortap.TensorUnavailable, match=f"did you mean {loss!r}"):
        trial.to_pandas(names=[loss[:-1]], collection="losses")


def test_wall_times_of_a_trial_written_before_format_1_1(tmp_path: Path) -> None:
    """Old trials have no wall time: they still read, and time plots say why they cannot."""
    import json

    with Writer(tmp_path) as w:
        for _ in range(3):
            with w.stepping():
                w.save("x", np.float32(w.step))
    for record in (tmp_path / "index" / "worker_0").glob("*.json"):
        data = json.loads(record.read_text())
        del data["wall_times"], data["format_minor"]
        record.write_text(json.dumps(data))
    trial = tensortap.create_trial(tmp_path)
    assert trial.wall_times() == {} and trial.steps_per_second() is None
    assert list(trial.tensor("x").to_series()) == [0.0, 1.0, 2.0]
    with pytest.raises(ValueError, match="no wall times"):
        trial.tensor("x").plot(x="time")


def test_histogram_config_validation_and_json() -> None:
    assert ReductionConfig(histogram=64).saves_raw is False
    assert ReductionConfig(histogram=[0, 1, 2]).histogram == (0.0, 1.0, 2.0)
    for bad in (0, True, "64", [1.0], [0, 0], [0, float("nan")], 10**6):
        with pytest.raises(ValueError, match="histogram"):
            ReductionConfig(histogram=bad)  # type: ignore[arg-type]
    rc = ReductionConfig(norms=["l2"], histogram=[-1, 0, 1])
    assert ReductionConfig.from_json(rc.to_json()) == rc
    assert "histogram" not in ReductionConfig(norms=["l2"]).to_json()


def test_histogram_with_explicit_edges_and_no_finite_values(tmp_path: Path) -> None:
    rc = ReductionConfig(histogram=[-1.0, 0.0, 1.0])
    with Writer(tmp_path, reduction_config=rc) as w:
        for values in ([np.nan, np.inf], [-5.0, -0.5, 0.5, 0.7, np.nan]):
            with w.stepping():
                w.save("x", np.array(values))
    t = tensortap.create_trial(tmp_path).tensor("x")
    np.testing.assert_array_equal(t.histogram_value(0).counts, [0, 0])  # no finite value: nothing counted
    edges, counts = t.histogram_value(1)
    np.testing.assert_array_equal(edges, [-1.0, 0.0, 1.0])
    np.testing.assert_array_equal(counts, [2, 2])  # -5 counts in the first bin


def test_bins_fixed_from_the_first_step_with_a_finite_value(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with Writer(tmp_path, reduction_config=ReductionConfig(histogram=4)) as w:
        for values in ([np.nan], [np.inf], [0.0, 4.0], [10.0, 1.0]):
            with w.stepping():
                w.save("x", np.array(values))
    warnings = [r.getMessage() for r in caplog.records if r.name == "tensortap"]
    assert len(warnings) == 1 and "no histogram of 'x' at step 0: no finite value" in warnings[0]
    t = tensortap.create_trial(tmp_path).tensor("x")
    assert t.steps() == [2, 3]  # nothing could be stored at steps 0 and 1
    np.testing.assert_array_equal(t.histogram_value(3).edges, [0.0, 1.0, 2.0, 3.0, 4.0])
    np.testing.assert_array_equal(t.histogram_value(3).counts, [0, 1, 0, 1])


def test_histograms_counted_on_the_writer_thread_are_of_the_value_at_save(tmp_path: Path) -> None:
    """Once a tensor's bins are fixed, its histograms are counted when the shard is written, from a copy
    taken at save: changing the array afterwards (as training changes a weight in place) changes nothing;
    step listeners (in-process rules) get them counted at the step's end."""
    heard: list[tuple[int, object]] = []
    a = np.array([0.0, 1.0, 2.0, 3.0])
    with Writer(tmp_path, reduction_config=ReductionConfig(histogram=3)) as w:
        for step in range(3):
            if step == 2:
                w.step_listeners.append(lambda r: heard.extend((r.step, t.histogram) for t in r.tensors))
            with w.stepping():
                w.save("x", a)
                a[:] = [0.5, 0.5, 2.5, 2.5] if step == 0 else [0.0, 0.0, 0.0, 0.0]  # in place, after the save
    t = tensortap.create_trial(tmp_path).tensor("x")
    np.testing.assert_array_equal(t.histogram_value(0).counts, [1, 1, 2])  # bins fixed from [0, 3]
    np.testing.assert_array_equal(t.histogram_value(1).counts, [2, 0, 2])  # not the zeros written after
    ((step, hist),) = heard
    assert step == 2 and isinstance(hist, tensortap.reductions.Histogram)
    np.testing.assert_array_equal(hist.counts, t.histogram_value(2).counts)


def test_mode_lines_reject_an_unknown_axis(run: Run) -> None:
    trial = run.trial()
    with pytest.raises(ValueError, match="x: 'epoch'"):
        trial.tensor(loss_name(trial)).plot(x="epoch")  # type: ignore[arg-type]
    assert Mode.TRAIN in trial.modes()


def test_a_tensor_two_workers_saved_is_drawn_per_worker_never_joined(tmp_path: Path) -> None:
    """Two ranks of a PyTorch training, rank 0 stopping after 2 steps: each rank's loss is a line of its own, and
    the sparkline of the tensor's repr is the first rank's. Before, both took each step from the first worker
    that saved it: rank 0's two losses, then rank 1's."""
    torch = pytest.importorskip("torch")
    import tensortap.torch as ttt

    losses: dict[str, list[float]] = {}
    for rank, steps in ((0, 2), (1, 4)):
        torch.manual_seed(rank)
        model, loss_fn = torch.nn.Linear(3, 1), torch.nn.MSELoss()
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        x, y = torch.randn(8, 3) * (rank + 1), torch.randn(8, 1)
        with ttt.capture(model, tmp_path, optimizer=opt, loss=loss_fn, rank=rank, save_config=tensortap.SaveConfig(1)):
            for _ in range(steps):
                opt.zero_grad()
                loss = loss_fn(model(x), y)
                loss.backward()
                opt.step()
                losses.setdefault(f"worker_{rank}", []).append(loss.item())
    trial = tensortap.create_trial(tmp_path)
    ax = trial.plot("losses/MSELoss")
    lines = {line.get_label(): list(line.get_ydata()) for line in ax.get_lines()}
    assert list(lines) == ["losses/MSELoss [worker_0]", "losses/MSELoss [worker_1]"]
    for worker, values in losses.items():
        np.testing.assert_allclose(lines[f"losses/MSELoss [{worker}]"], values, rtol=1e-6)
    label, spark = default_series(trial.tensor("losses/MSELoss"))
    assert label == "value [worker_0]"
    np.testing.assert_allclose(list(spark.values()), losses["worker_0"], rtol=1e-6)


def test_histogram_arguments_are_checked_before_anything_is_drawn(tmp_path: Path) -> None:
    """hunt 33 L2, L3: ``plot_histograms(x="epoch")`` raised a bare KeyError after drawing, where ``plot``
    gives a ValueError naming the valid axes; ``bins=0`` gave an empty histogram and ``bins=-3`` NumPy's
    error, where ``bins=1.5`` got the package's "1 to 4096" message."""
    with Writer(tmp_path) as w:
        for s in range(2):
            with w.stepping():
                w.save("x", np.arange(5.0) + s)
    x = tensortap.create_trial(tmp_path).tensor("x")
    figures = len(plt.get_fignums())
    with pytest.raises(ValueError, match="x: 'epoch' is not valid; valid: step, global_step, time"):
        x.plot_histograms(x="epoch")  # type: ignore[arg-type]
    assert len(plt.get_fignums()) == figures  # nothing drawn
    for bins in (0, -3, np.int64(0), 5000, True):
        for read in (lambda b: x.histogram_value(1, bins=b), lambda b: x.histogram_values(bins=b)):
            with pytest.raises(ValueError, match=r"bins: expected a number of bins \(1 to 4096\)"):
                read(bins)
    assert x.histogram_value(1, bins=np.int64(2)).counts.tolist() == [2, 3]


def test_a_sparkline_marks_nan_and_inf_values_at_their_steps(tmp_path: Path) -> None:
    """hunt 41 F2: the sparkline of a loss that diverged (NaN, inf) left those values out and spaced the rest
    evenly: 1.0, 0.9, 0.7, 0.5 read as a smooth decreasing loss, and nothing in the view said NaN; a tensor
    whose mean was NaN at every step lost its sparkline row without a word."""
    loss = [1.0, 0.9, np.nan, 0.7, np.inf, 0.5, np.nan, np.nan]
    with Writer(tmp_path) as w:
        for value in loss:
            with w.stepping():
                w.save("losses/loss", np.float32(value), ["losses"])
                w.save("weights/nanw", np.full(3, np.nan, np.float32), ["weights"])
    trial = tensortap.create_trial(tmp_path)
    html = trial.tensor("losses/loss")._repr_html_()
    assert "3 NaN, 1 inf of 8 values (red marks)" in html
    points = re.search(r"points='([^']+)'", html)
    assert points is not None
    xs = [float(p.split(",")[0]) for p in points.group(1).split()]
    marks = [float(x) for x in re.findall(r"<line x1='([^']+)'", html)]
    step_x = [1 + s / 7 * 158 for s in range(8)]  # placed by step: the gaps show
    np.testing.assert_allclose(xs, [step_x[s] for s in (0, 1, 3, 5)], atol=0.06)
    np.testing.assert_allclose(marks, [round(step_x[s]) for s in (2, 4, 6, 7)])
    assert "8 NaN of 8 values (red marks)" in trial.tensor("weights/nanw")._repr_html_()


def test_a_name_starting_with_an_underscore_keeps_its_legend_entry(tmp_path: Path) -> None:
    """hunt 41 F4: matplotlib leaves a label starting with ``_`` out of the legend, so a PyTorch submodule
    ``self._head`` was drawn as an unnamed line (alone: an empty legend and matplotlib's warning), and the
    report's image text left it out too."""
    from tensortap.trial.report import build_report

    with Writer(tmp_path) as w:
        for step in range(3):
            with w.stepping():
                for name in ("_head.weight", "body.weight"):
                    w.save(f"gradients/{name}", np.arange(4.0) * step, ["gradients"])
                w.save("_loss", np.float32(1.0 / (step + 1)), ["losses"])
    trial = tensortap.create_trial(tmp_path)
    ax = trial.plot(["gradients/body.weight", "gradients/_head.weight"])
    legend = [t.get_text().strip() for t in ax.get_legend().get_texts()]
    assert legend == ["gradients/body.weight", "gradients/_head.weight"]
    assert [t.get_text().strip() for t in trial.tensor("_loss").plot().get_legend().get_texts()] == ["_loss"]
    alts = re.findall(r"<img alt='([^']*)'", build_report(trial, rules=["exploding_tensor"], show_progress=False))
    assert any(a.endswith("; _loss") for a in alts), alts
    assert any("gradients/_head.weight, gradients/body.weight" in a for a in alts), alts


FAILING_TRAINING = """
import numpy as np, os, signal, sys
from tensortap.capture import Writer
w = Writer(sys.argv[1])
for step in range(3):
    with w.stepping():
        w.save("losses/loss", np.float32(1.0 / (step + 1)), ["losses"])
if sys.argv[2] == "killed":
    w.flush()
    os.kill(os.getpid(), signal.SIGKILL)
with w:
    raise RuntimeError("CUDA out of memory at epoch 1")
"""


def test_a_failed_killed_or_empty_trial_reads_so_in_repr_html_ls_and_the_report(tmp_path: Path) -> None:
    """hunt 41 F5, F6: a training that died of an exception read as plain "ended" in the notebook view, its
    ``repr``, ``ls`` and the report's summary (only ``rules`` said so); ``repr`` said "ended" of a killed
    run and "running" of an empty folder, where the HTML view said "worker_0 killed" and "no data yet"."""
    from helpers.cli import cli

    from tensortap.trial.report import build_report

    for how in ("failed", "killed"):
        subprocess.run([sys.executable, "-c", FAILING_TRAINING, str(tmp_path / how), how], timeout=120)
    (tmp_path / "empty").mkdir()
    expected = {
        "failed": "ended: worker_0 ended with reason 'exception': RuntimeError: CUDA out of memory at epoch 1",
        "killed": "ended: worker_0 killed",
        "empty": "no data yet (no worker has started)",
    }
    for how, status in expected.items():
        trial = tensortap.create_trial(tmp_path / how)
        assert repr(trial).endswith(f", {status}>"), repr(trial)
        assert f"<td style='text-align:left'>{escape(status)}</td>" in trial._repr_html_()
        assert f"[{status}]" in cli("ls", str(tmp_path / how)).stdout
    report = build_report(tensortap.create_trial(tmp_path / "failed"), show_progress=False)
    assert escape(expected["failed"]) in report


def test_a_training_that_failed_on_every_rank_names_the_first_error_and_counts_the_others(tmp_path: Path) -> None:
    """review 56 F4: a DDP job that times out fails on every rank; the status (``repr``, the HTML view, ``ls``,
    the report) gave each worker's note, its error up to 500 characters: 7,519 characters of ``repr`` at 32
    ranks. Now the first worker's error in full, then the others by name, capped as the awaited workers are."""
    error = "RuntimeError: [Rank {}] Watchdog caught collective operation timeout: WorkNCCL(OpType=ALLREDUCE)"
    for rank in range(32):
        w = Writer(tmp_path, rank=rank, world_size=32)
        with w.stepping():
            w.save("a", np.float32(1.0), ["metrics"])
        w.close_for_exit("exception" if rank < 31 else "error", error.format(rank))
    trial = tensortap.create_trial(tmp_path)
    others = ", ".join(sorted(f"worker_{rank}" for rank in range(1, 31))[:10])
    status = (
        f"ended: worker_0 ended with reason 'exception': {error.format(0)}: {others} and 20 more also ended with "
        "reason 'exception': worker_31 also ended with reason 'error'"
    )
    assert repr(trial).endswith(f", {status}>"), repr(trial)


def test_a_trial_path_that_is_not_utf_8_is_shown_escaped(tmp_path: Path) -> None:
    """hunt 41 F7: a trial folder named with a byte that is not UTF-8 (Latin-1 ``r\\xe9sultats``, which Python
    reads as the lone surrogate ``\\udce9``) failed to draw any plot ("set_text(): incompatible function
    arguments", the path is every plot's title), ``write_report`` raised it, and the notebook's HTML held the
    surrogate, which cannot be sent as UTF-8."""
    from tensortap.trial.report import write_report

    folder = os.fsdecode(os.fsencode(str(tmp_path)) + b"/r\xe9sultats")
    try:
        os.mkdir(folder)
    except (UnicodeEncodeError, OSError):
        pytest.skip("this file system takes no name that is not UTF-8")
    with Writer(folder) as w:
        for step in range(3):
            with w.stepping():
                w.save("losses/loss", np.float32(1.0 / (step + 1)), ["losses"])
                w.save("weights/w", np.arange(4.0) * step, ["weights"])
    trial = tensortap.create_trial(folder)
    ax = trial.plot("losses/loss")
    ax.figure.savefig(tmp_path / "plot.png")
    assert ax.get_title().endswith("r\\udce9sultats")
    write_report(trial, tmp_path / "report.html", rules=["exploding_tensor"], show_progress=False)
    assert "r\\udce9sultats" in (tmp_path / "report.html").read_text(encoding="utf-8")
    assert "r\\udce9sultats" in trial._repr_html_().encode("utf-8").decode("utf-8")


def test_plot_histograms_of_a_tensor_two_workers_saved_names_the_worker_drawn(tmp_path: Path) -> None:
    """hunt 41 F8: the heat map of a tensor two workers saved drew each step's first worker's values with a
    title that named none (worker_1's values, 1000 more, were nowhere); ``worker=`` draws another one's."""
    for rank in (0, 1):
        with Writer(tmp_path, rank=rank, world_size=2) as w:
            for step in range(3):
                with w.stepping():
                    w.save("weights/w", np.full(4, step + 1000.0 * rank, np.float32), ["weights"])
    tensor = tensortap.create_trial(tmp_path).tensor("weights/w")
    for worker, low in (("worker_0", 0.0), ("worker_1", 1000.0)):
        ax = tensor.plot_histograms(worker=None if worker == "worker_0" else worker)
        assert ax.get_title() == f"weights/w: distribution over steps [{worker}]"
        edges = ax.collections[0].get_coordinates()[:, 0, 1]
        assert low <= edges.min() and edges.max() <= low + 3


def test_plots_of_a_tensor_whose_steps_wait_for_a_worker_say_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """hunt 49 F2: with rank 1 of two not started yet, `plot` (`Trial.plot`, `Tensor.plot`, the command) said
    the tensor "has no step" and `plot_histograms` that "no raw tensor was saved at any step" (10 were),
    while `show` said the steps wait for worker_1 (hunt 33 L4); the repr listed the mode as `(train 0)`. They
    now say what `show` and `ls` say."""
    from tensortap.cli import main

    with Writer(tmp_path, rank=0, world_size=2) as w:
        for s in range(10):
            with w.stepping():
                w.save("b", np.arange(4.0) * s)
                w.save("loss", np.float32(1 / (s + 1)), ["losses"])
    trial = tensortap.create_trial(tmp_path)
    waiting = "has no complete step yet: 10 saved steps wait for the other workers to write them (worker_1 has"
    for plot in (lambda: trial.plot("loss"), lambda: trial.tensor("loss").plot()):
        with pytest.raises(tensortap.TensorUnavailable, match=re.escape(f"; 'loss' {waiting} written nothing yet)")):
            plot()
    with pytest.raises(ValueError, match=re.escape(f"'b' {waiting.replace('step', 'train step', 1)} written")):
        trial.tensor("b").plot_histograms()
    assert main(["plot", str(tmp_path), "loss", "-o", str(tmp_path / "loss.png")]) == 2
    assert f"'loss' {waiting} written nothing yet)" in capsys.readouterr().err
    assert "0 steps (+10 incomplete) (train none)" in repr(trial)
    plt.close("all")
