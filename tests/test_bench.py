"""The benchmark scripts still run (``nox -s bench -- --quick``), the targets table and docs/performance.md
are put together as documented, and the GPU check skips without CUDA."""

from __future__ import annotations

import functools
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# bench/ is not installed and the repository root is not on sys.path under `pytest`: load the generator
# by path, and the harness it imports with the root on sys.path for the while
_spec = importlib.util.spec_from_file_location("bench_generator", ROOT / "bench" / "__main__.py")
assert _spec is not None and _spec.loader is not None
generator = importlib.util.module_from_spec(_spec)
sys.path.insert(0, str(ROOT))
try:
    _spec.loader.exec_module(generator)
    from bench import harness
finally:
    sys.path.remove(str(ROOT))


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "TENSORTAP_SMDEBUG_PYTHON"}
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, check=False
    )


@pytest.mark.slow
@pytest.mark.torch
@pytest.mark.keras
@pytest.mark.xgboost
@pytest.mark.timeout(900)
def test_every_benchmark_runs_quick() -> None:
    performance = (ROOT / "docs" / "performance.md").read_text()
    done = _run("bench", "--quick")
    assert done.returncode == 0, done.stderr[-3000:]
    for name in generator.BENCHMARKS:
        assert f"== {name}" in done.stdout
    # every timed table has its noise arm: io, torch, keras (one backend), xgboost, read (2), pandas, histogram
    assert done.stdout.count("'case': 'baseline (2nd arm)'") >= 8
    for figure, *_ in generator.TARGETS:
        assert f"| {figure} |" in done.stdout  # every target has a row, measured or not
    assert (ROOT / "docs" / "performance.md").read_text() == performance  # --quick writes nothing


def _row(benchmark: str, case: str, **values: float) -> dict[str, object]:
    return {"benchmark": benchmark, "case": case, **values}


def test_targets_say_what_was_not_measured_and_by_how_much_one_is_missed() -> None:
    rows = [
        _row("torch MLP 784-512-256-10, batch 64", "baseline", ratio=1.0, noise=0.05, ms_per_step=2.0),
        _row("torch MLP 784-512-256-10, batch 64", "tensortap: weights+biases+gradients+losses, every step",
             ratio=2.6, noise=0.05, **{harness.UNSETTLED: 1.9}),
        _row("torch MLP 784-512-256-10, batch 64", "tensortap: weights+biases+gradients+losses, every 100 steps",
             ratio=1.01, **{harness.UNSETTLED: 1.01}),
        _row("torch MLP 784-512-256-10, batch 64", generator.FLOOR_ARM[1] + ", no training", ms_per_step=3.0),
        _row("torch MLP 784-512-256-10, batch 64", generator.COPY_FLOOR_ARM[1] + ", nothing else", ms_per_step=2.5),
        _row("torch MLP 784-512-256-10, batch 64", generator.HOOKS_FLOOR_ARM[1] + ", each doing nothing",
             ratio=1.012),
        _row("keras (torch) MLP 784-512-256-10, batch 64", "baseline", ms_per_step=6.0),
        _row("keras (torch) MLP 784-512-256-10, batch 64", "tensortap: weights+biases+gradients+losses, every step",
             ratio=2.0),
        _row("read a 1.6 MB weight, each value dropped once read, over 1000 steps", "smdebug", ratio=10.0, noise=0.1),
        _row("peak memory, torch MLP, 300 steps", "tensortap, extra (MB)", MB=300.0),
        _row("peak memory, torch MLP, 300 steps", "shard budget max_bytes (MB)", MB=200.0),
        _row("trial of 10000 steps x 200 tensors", "tensor_names()", seconds=0.01),
        _row("trial of 100000 steps x 200 tensors", "tensor_names()", seconds=0.015),
        _row("trial of 10000 steps x 200 tensors", "steps()", seconds=2e-5, ratio=1.2),
        _row("trial of 100000 steps x 200 tensors", "steps()", seconds=2e-4, ratio=1.8),  # 10x the time: its list
    ]  # fmt: skip
    table = {r["figure"]: r for r in generator.targets(rows)}
    assert list(table) == [t[0] for t in generator.TARGETS]
    every_step = table["PyTorch MLP, every step / no hook"]
    assert every_step["measured / target"] == pytest.approx(2.0) and every_step["met"] == "**no**"
    assert every_step["noise"] == 0.05
    assert every_step["settle left out"] == 1.9  # the lower bound beside it
    every_100 = table["PyTorch MLP, every 100 steps / no hook"]
    assert every_100["settle left out"] == ""  # the same: not repeated
    # the hooks doing nothing at every step, and the copy (0.5 ms over a bare step of 2) at every 100th
    assert every_100["floor here"] == pytest.approx(1.012 + 0.25 / 100)
    assert every_step["floor here"] == pytest.approx(1.5)  # the disk floor arm's 3 ms over a bare step's 2 ms
    # the disk is faster than its step of 6 ms; the copy of the values (0.5 ms in the torch table) is not
    assert table["Keras torch, every step / no callback"]["floor here"] == pytest.approx(6.5 / 6)
    assert table["read a 1.6 MB tensor over 1,000 steps: smdebug / tensortap"]["met"] == "yes"
    memory = table["peak extra memory while saving every step (MB)"]
    assert memory["measured / target"] == pytest.approx(1.5) and "(200)" in memory["target"]
    flat = table["tensor_names() flat in steps: at 100,000 steps (s)"]
    assert flat["measured / target"] == pytest.approx(0.75) and flat["met"] == "yes"
    assert table["Keras JAX, every step / no callback"]["measured"] == "not measured"
    steps = table["steps() flat in steps: its time over copying its list, at 100,000 steps"]
    assert steps["measured / target"] == pytest.approx(0.75) and steps["met"] == "yes"  # 1.8 against 2 x 1.2
    assert table["open a trial of 100,000 steps, first steps() (s)"]["measured"] == "not measured"


def test_a_figure_whose_interval_holds_the_target_is_within_noise() -> None:
    bench = "xgboost 10k x 50, 100 rounds"
    figure = "XGBoost 100 rounds, default collections / no callback"  # <= 1.05
    cases = [(1.08, (1.01, 1.12), "within noise"), (1.1, (1.06, 1.2), "**no**"), (1.0, (0.97, 1.04), "yes"),
             (1.08, None, "**no**")]  # fmt: skip
    for ratio, span, met in cases:
        rows = [_row(bench, "default collections", ratio=ratio, noise=0.01, **{harness.INTERVAL: span})]
        row = next(r for r in generator.targets(rows) if r["figure"] == figure)
        assert row["met"] == met and row["95% interval"] == span
    write = next(r for r in generator.targets([_row("write", "tensortap Writer", **{
        "floor/this (bytes/s)": 0.85, harness.interval_column("floor/this (bytes/s)"): (0.7, 0.95)})])
        if r["figure"] == "write path bytes/s / numpy.save floor")  # fmt: skip
    assert write["met"] == "within noise"  # >= 0.8


def test_the_interval_of_a_ratio_follows_the_rounds_in_pairs() -> None:
    slow = [1.0, 3.0, 1.0, 5.0, 1.0, 2.0, 1.0, 4.0]  # the machine's slow spells, round by round
    base = harness.Timing(blocks=slow, closing=0.5)
    # every round, the arm took twice the baseline: however uneven the rounds, the ratio is 2
    low, high = harness.interval(harness.Timing(blocks=[2 * b for b in slow], closing=1.0), base) or (0, 0)
    assert low == pytest.approx(2.0) and high == pytest.approx(2.0)
    assert harness.spread(base) > 1  # while the blocks themselves spread widely
    # an arm that pays a cost in a few rounds only: its interval is wide, and holds its ratio
    uneven = harness.Timing(blocks=[b + (3.0 if i % 4 == 0 else 0.0) for i, b in enumerate(slow)], closing=0.5)
    low, high = harness.interval(uneven, base) or (0, 0)
    assert low < uneven.total / base.total < high and high - low > 0.1
    assert harness.interval(harness.Timing(blocks=[1.0] * 3), harness.Timing(blocks=[1.0] * 3)) is None


def test_document_holds_targets_sections_notes_and_the_profiles_in_short(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "torch.md").write_text("### torch profile\n\nsaving took *most* of it\n")
    (tmp_path / "index.md").write_text("### index profile\n")
    monkeypatch.setattr(generator, "PROFILES", tmp_path)
    doc = generator.document(["## io\n\ntable\n"], [], 90.0)
    missed = doc.index("## The targets missed: what holds each")
    summary = doc.index("## Profiles: what changed because of them")
    assert doc.index("## Targets") < missed < summary < doc.index("## io") < doc.index("## How to read these figures")
    assert "| write path bytes/s / numpy.save floor | >= 0.8 | not measured |" in doc
    assert "1.5 minutes in all" in doc
    assert "torch profile" not in doc  # in full in docs/profiles.md only
    profiles = generator.profiles_document()
    assert profiles.index("### index profile") < profiles.index("### torch profile")
    assert "saving took *most* of it" in profiles


def test_the_documents_hold_the_hand_written_parts_as_they_are_now() -> None:
    """docs/performance.md and docs/profiles.md say what bench/*.md and bench/profiles/*.md say today: a
    part edited there and not put in the documents (``python -m bench --docs``) fails here."""
    performance = (ROOT / "docs" / "performance.md").read_text()
    assert generator.refresh(performance) == performance
    assert (ROOT / "docs" / "profiles.md").read_text() == generator.profiles_document()


def test_docs_refresh_puts_the_hand_written_parts_of_today_and_keeps_the_figures(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    notes = tmp_path / "notes.md"
    notes.write_text("## How to read these figures\n\nfirst-draft\n")
    missed, summary = tmp_path / "missed.md", tmp_path / "summary.md"
    missed.write_text("## The targets missed: what holds each\n")
    summary.write_text("## Profiles: what changed because of them\n")
    monkeypatch.setattr(generator, "ROOT", tmp_path)
    monkeypatch.setattr(generator, "INCLUDED", (missed, summary, notes))
    monkeypatch.setattr(generator, "NOTES", notes)
    monkeypatch.setattr(generator, "MISSED", missed)
    monkeypatch.setattr(generator, "SUMMARY", summary)
    doc = generator.document(["## io\n\n| a figure | 1.23 |\n"], [], 90.0)
    notes.write_text("## How to read these figures\n\nsecond-draft\n")
    fresh = generator.refresh(doc)
    assert "second-draft" in fresh and "first-draft" not in fresh
    assert "| a figure | 1.23 |" in fresh and "1.5 minutes in all" in fresh
    assert fresh == doc.replace("\n\nfirst-draft\n", "\n\nsecond-draft\n")
    with pytest.raises(ValueError, match="expected each of"):
        generator.refresh(doc.replace("<!-- end of notes.md -->", ""))


def test_a_remote_arm_keeps_its_process_and_reports_its_own_time() -> None:
    child = "from bench import harness; harness.serve(lambda: harness.Repeat(lambda: print('chatter')))"
    arm = harness.Remote([sys.executable, "-c", child], cwd=str(ROOT))
    pid = arm.proc.pid
    assert all(isinstance(arm.run(3), float) for _ in range(2))  # its printing went to stderr, not the replies
    assert arm.settled == 0.0  # an arm without a settle: nothing kept apart, as in this process
    assert arm.proc.pid == pid and arm.proc.poll() is None
    arm.close()
    assert arm.proc.poll() is None  # it waits to discard what it wrote, untimed
    harness.discard(arm)
    assert arm.proc.returncode == 0
    with pytest.raises(RuntimeError, match="ZeroDivisionError"):
        harness.Remote([sys.executable, "-c", "1 / 0"], cwd=str(ROOT))


def test_a_remote_arm_reports_its_settle_apart() -> None:
    child = (
        "import time\nfrom bench import harness\n"
        "class Writing(harness.Repeat):\n    def settle(self): time.sleep(0.05)\n"
        "harness.serve(lambda: Writing(lambda: None))"
    )
    arm = harness.Remote([sys.executable, "-c", child], cwd=str(ROOT))
    seconds = arm.run(2)
    assert seconds >= arm.settled >= 0.05  # the block's time holds its settle, also kept apart
    timings = harness.interleave({"remote": lambda: arm}, rounds=1, block=1)
    assert timings["remote"].settles[0] >= 0.05  # and the harness keeps it with the arm's timing


def test_gpu_check_without_cuda_says_so() -> None:
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: run python -m bench.gpu_check by hand")
    done = _run("bench.gpu_check")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "no CUDA device" in done.stdout


@pytest.mark.timeout(300)
def test_the_gpu_check_runs_its_checks_on_the_cpu() -> None:
    """The script a GPU machine runs is run here on the CPU, so that it is known to work before one is lent:
    the captured values bit-equal to copies taken in the loop, the reductions and histograms equal to NumPy's."""
    pytest.importorskip("torch")
    done = _run("bench.gpu_check", "--device", "cpu", "--rounds", "1")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "device: CPU" in done.stdout and "values, reductions and histograms: all equal" in done.stdout
    assert "autocast and GradScaler" in done.stdout  # checked with mixed precision too
    assert "tensortap, every step, raw + reductions" in done.stdout  # the timed arms ran too
    assert "tensortap, every step, reductions of weights and gradients" in done.stdout  # the Transformer's


@pytest.mark.timeout(300)
def test_an_arm_leaves_no_shard_to_be_published_while_another_arm_runs() -> None:
    """A torch arm with a hook publishes what it holds when it settles (the writer thread would
    otherwise publish its open shard by time in another arm's block, billed to that arm)."""
    pytest.importorskip("torch")
    import tensortap
    from bench import bench_torch  # the package is imported above, with the root on sys.path

    arm = bench_torch.TrainArm(bench_torch._tensortap_hook, 1, ("weights", "losses"))
    try:
        arm.run(4)  # 4 steps of 2 MB: neither full nor due by time (0.25 s at the earliest)
        arm.settle()
        trial = tensortap.create_trial(arm.out_dir)
        assert trial.steps()[:3] == [0, 1, 2]  # published before the arm's next block
    finally:
        arm.close()
        arm.discard()


class _Settling:
    """An arm whose blocks take ``work`` seconds a unit, then ``tail`` seconds to settle."""

    def __init__(self, work: float, tail: float) -> None:
        self.work, self.tail = work, tail

    def run(self, n: int) -> None:
        time.sleep(self.work * n)

    def settle(self) -> None:
        time.sleep(self.tail)

    def close(self) -> None:
        """Nothing to finish."""


def test_a_blocks_settle_is_timed_with_it_and_kept_apart() -> None:
    arms = {
        harness.BASELINE: lambda: _Settling(0.01, 0.0),
        harness.BASELINE_2: lambda: _Settling(0.01, 0.0),
        "writer": lambda: _Settling(0.01, 0.2),  # a tail four times as long as its 5 steps
    }
    timings = harness.interleave(arms, rounds=4, block=5)
    writer = timings["writer"]
    assert len(writer.settles) == len(writer.blocks) == 4
    assert all(0.2 <= s < b for s, b in zip(writer.settles, writer.blocks, strict=True))
    no_settle = harness.interleave({harness.BASELINE: lambda: harness.Repeat(lambda: None)}, rounds=2, block=1)
    assert no_settle[harness.BASELINE].settles == [0.0, 0.0]  # an arm without a settle: nothing kept apart
    row = next(r for r in harness.rows("b", timings) if r["case"] == "writer")
    # about 5 with the tail, 1 without: margins wide enough for a loaded machine's late wake-ups
    assert row["ratio"] > 3 and row[harness.UNSETTLED] < 2


def test_the_arms_close_the_last_built_first() -> None:
    """A cost the process pays at the last capture's close (freeing the pool of shard arrays) falls on
    the first arm built, the one saving every step in the torch table, not on a small arm built last."""
    closed: list[str] = []

    class Closing(_Settling):
        def __init__(self, name: str) -> None:
            super().__init__(0.0, 0.0)
            self.name = name

        def close(self) -> None:
            closed.append(self.name)

    names = [harness.BASELINE, "every step", "step 0 only"]
    harness.interleave({n: functools.partial(Closing, n) for n in names}, rounds=1, block=1)
    assert closed == names[::-1]
