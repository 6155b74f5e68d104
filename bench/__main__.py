"""Run every benchmark and write docs/performance.md: ``python -m bench [NAME ...] [--quick] [--no-write]``."""

from __future__ import annotations

import argparse
import importlib
import math
import os
import platform
import re
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

from bench import harness

BENCHMARKS = {
    "io": "bench.bench_io",
    "torch": "bench.bench_torch",
    "keras": "bench.bench_keras",
    "xgboost": "bench.bench_xgboost",
    "read": "bench.bench_read",
    "trial": "bench.bench_trial",
    "pandas": "bench.bench_pandas",
    "histogram": "bench.bench_histogram",
}
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = ROOT / "docs" / "performance.md"
PROFILES_OUT = ROOT / "docs" / "profiles.md"  # every profile write-up, in full
NOTES = HERE / "notes.md"  # "How to read these figures" and other hand-written notes, included verbatim
MISSED = HERE / "missed.md"  # what holds each missed target, written by hand: after the targets table, verbatim
SUMMARY = HERE / "summary.md"  # the profiles in short, what changed because of each: after MISSED, verbatim
PROFILES = HERE / "profiles"  # hand-written profile write-ups (*.md), in full in PROFILES_OUT, sorted by name
INCLUDED = (MISSED, SUMMARY, NOTES)  # the hand-written parts of OUT, between markers (_included)

Row = dict[str, Any]


class Of(NamedTuple):
    """A bound taken from another row of the run: ``factor`` times its value in the same column."""

    label: str
    benchmark: str
    case: str
    factor: float = 1.0


# (figure, benchmark name contains, case contains, column, "<=" or ">=", bound): every target of issue #14
TARGETS: list[tuple[str, str, str, str, str, float | Of]] = [
    ("PyTorch MLP, every step / no hook", "torch MLP", "tensortap: weights+biases+gradients+losses, every step",
     "ratio", "<=", 1.3),
    ("PyTorch MLP, every 100 steps / no hook", "torch MLP", "tensortap: weights+biases+gradients+losses, every 100",
     "ratio", "<=", 1.02),
    ("Keras TF, every step / no callback", "keras (tensorflow)", "losses, every step", "ratio", "<=", 1.5),
    ("Keras torch, every step / no callback", "keras (torch)", "losses, every step", "ratio", "<=", 1.5),
    ("Keras JAX, every step / no callback", "keras (jax)", "losses, every step", "ratio", "<=", 1.5),
    ("Keras TF, every 100 steps / no callback", "keras (tensorflow)", "every 100 steps", "ratio", "<=", 1.03),
    ("Keras torch, every 100 steps / no callback", "keras (torch)", "every 100 steps", "ratio", "<=", 1.03),
    ("Keras JAX, every 100 steps / no callback", "keras (jax)", "every 100 steps", "ratio", "<=", 1.03),
    ("XGBoost 100 rounds, default collections / no callback", "xgboost", "default collections", "ratio", "<=", 1.05),
    ("write path bytes/s / numpy.save floor", "write", "tensortap Writer", "floor/this (bytes/s)", ">=", 0.8),
    ("histogram reduction (64 bins) on every weight and gradient, every step / no hook", "torch MLP",
     "histogram=64", "ratio", "<=", 1.15),
    ("read a scalar over 1,000 steps: smdebug / tensortap", "read the loss (a scalar) over 1000 steps", "smdebug",
     "ratio", ">=", 20),
    ("read a 1.6 MB tensor over 1,000 steps: smdebug / tensortap", "read a 1.6 MB weight, each value dropped",
     "smdebug", "ratio", ">=", 5),
    ("the same, every value kept (1.6 GB in memory)", "read a 1.6 MB weight, every value kept", "smdebug",
     "ratio", ">=", 5),
    ("tensor_names() on 100,000 steps x 200 tensors (s)", "trial of 100000 steps", "tensor_names()", "seconds",
     "<=", 0.2),
    ("tensor_names() flat in steps: at 100,000 steps (s)", "trial of 100000 steps", "tensor_names()", "seconds",
     "<=", Of("2 x its time at 10,000 steps", "trial of 10000 steps", "tensor_names()", 2.0)),
    ("tensor_names(mode=TRAIN) on 100,000 steps x 200 tensors (s)", "trial of 100000 steps",
     "tensor_names(mode=TRAIN)", "seconds", "<=", 0.2),
    ("steps() on 100,000 steps x 200 tensors (s)", "trial of 100000 steps", "steps()", "seconds", "<=", 0.2),
    # steps() returns a new list of every step (SPEC), O(steps) by contract: flat is its time over
    # copying that list (its baseline), which a scan of the trial's steps or files would raise
    ("steps() flat in steps: its time over copying its list, at 100,000 steps", "trial of 100000 steps",
     "steps()", "ratio", "<=", Of("2 x the same at 10,000 steps", "trial of 10000 steps", "steps()", 2.0)),
    ("open a trial of 100,000 steps, first steps() (s)", "trial of 100000 steps", "open", "seconds", "<=", 1.0),
    ("a saved step visible to a live trial in another process, max (s)", "live", "max", "seconds", "<=", 1.0),
    ("peak extra memory while saving every step (MB)", "peak memory", "tensortap, extra", "MB",
     "<=", Of("the shard budget, ShardPolicy.max_bytes", "peak memory", "shard budget")),
]  # fmt: skip


# The floor of every-step raw capture on this machine: a step that saves its weights and gradients (the
# Keras MLP has the same as the torch one) cannot be shorter than a bare step of the figure's benchmark
# plus the copy of those values on the training thread (the torch bench's copy floor arm, below, less its
# bare step), nor than the ms the torch bench's disk floor arm took to write and fsync them (perfectly
# overlapped on the other core); the floor is the longer of the two, over the bare step.
FLOOR_ARM = ("torch MLP", "floor: a step's weights and gradients written and fsynced")
FLOORS = {  # figure -> the benchmark whose baseline step the floor is compared with
    "PyTorch MLP, every step / no hook": "torch MLP",
    "Keras TF, every step / no callback": "keras (tensorflow)",
    "Keras torch, every step / no callback": "keras (torch)",
    "Keras JAX, every step / no callback": "keras (jax)",
}


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (tuple, list)):  # an interval (a list once through JSON)
        return " to ".join(_fmt(v) for v in value)
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def _table(rows: list[Row]) -> str:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(_fmt(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def _row(rows: list[Row], benchmark: str, case: str) -> Row | None:
    """The row whose benchmark contains ``benchmark`` and whose case is ``case``; without one, the first
    whose case contains it; None where not measured."""
    candidates = [r for r in rows if benchmark in str(r.get("benchmark")) and case in str(r.get("case"))]
    return next((r for r in candidates if r.get("case") == case), candidates[0] if candidates else None)


def _value(rows: list[Row], benchmark: str, case: str, column: str) -> float | None:
    """The ``column`` of :func:`_row`, None where not measured."""
    row = _row(rows, benchmark, case)
    value = None if row is None else row.get(column)
    return value if isinstance(value, float) and not math.isnan(value) else None


# The floor of counting histograms on another thread: the ratio of the torch bench's arm that trains and
# copies each step's weights and gradients (what the training thread must do at least), nothing else.
COPY_FLOOR_ARM = ("torch MLP", "floor: training that copies its weights and gradients every step")
COPY_FLOORS = {"histogram reduction (64 bins) on every weight and gradient, every step / no hook"}
# The floor of saving every N steps: a hook sees every step (the torch bench's arm that trains with the hooks
# tensortap registers, each doing nothing) and copies the values at every N-th (the copy floor arm's copy,
# over N); the writing, a shard every few seconds, can overlap on the other core.
HOOKS_FLOOR_ARM = ("torch MLP", "floor: training with the five hooks tensortap registers")
INTERVAL_FLOORS = {"PyTorch MLP, every 100 steps / no hook": 100}  # figure -> its save interval


def _floor(rows: list[Row], figure: str) -> float | None:
    """The least ratio ``figure`` can reach on this machine (see :data:`FLOORS`, :data:`COPY_FLOORS`,
    :data:`INTERVAL_FLOORS`), None where it has no floor or it was not measured."""
    if figure in COPY_FLOORS:
        return _value(rows, *COPY_FLOOR_ARM, "ratio")
    copy = _value(rows, *COPY_FLOOR_ARM, "ms_per_step")
    copy_step = _value(rows, COPY_FLOOR_ARM[0], "baseline", "ms_per_step")
    if figure in INTERVAL_FLOORS:
        hooks = _value(rows, *HOOKS_FLOOR_ARM, "ratio")
        if hooks is None or copy is None or copy_step is None:
            return None
        return max(1.0, hooks + (copy - copy_step) / copy_step / INTERVAL_FLOORS[figure])
    if figure not in FLOORS:
        return None
    step = _value(rows, FLOORS[figure], "baseline", "ms_per_step")
    write = _value(rows, *FLOOR_ARM, "ms_per_step")
    if step is None or (write is None and copy is None):
        return None
    floors = [1.0]
    if write is not None:
        floors.append(write / step)
    if copy is not None and copy_step is not None:
        floors.append(1.0 + (copy - copy_step) / step)
    return max(floors)


def targets(rows: list[Row]) -> list[Row]:
    """One row per target of :data:`TARGETS`: what was measured (or "not measured"), and measured / target."""
    out: list[Row] = []
    for figure, benchmark, case, column, op, bound in TARGETS:
        value = _value(rows, benchmark, case, column)
        limit = _value(rows, bound.benchmark, bound.case, column) if isinstance(bound, Of) else bound
        target = f"{op} {_fmt(bound)}"
        if isinstance(bound, Of):
            limit = None if limit is None else limit * bound.factor
            target = f"{op} {bound.label}" + ("" if limit is None else f" ({_fmt(limit)})")
        if value is None or limit is None:
            out.append({"figure": figure, "target": target, "measured": "not measured"})
            continue
        row = _row(rows, benchmark, case) or {}
        span = row.get(harness.interval_column(column))
        floor = _floor(rows, figure)
        unsettled = row.get(harness.UNSETTLED) if column == "ratio" else None
        out.append(
            {
                "figure": figure,
                "target": target,
                "measured": value,
                "95% interval": span,
                # the lower bound, where the arm waited for its writing at each block's end
                "settle left out": "" if unsettled is None or math.isclose(unsettled, value) else unsettled,
                "noise": row.get("noise", ""),
                "measured / target": value / limit,
                "met": _met(value, span, op, limit),
                "floor here": "" if floor is None else floor,
            }
        )
    return out


def _met(value: float, span: tuple[float, float] | None, op: str, limit: float) -> str:
    """Whether ``value`` meets the target: yes, **no**, or "within noise" when its 95% interval holds
    the limit (a run of this length cannot tell), whichever side ``value`` itself is on."""
    meets = (lambda v: v <= limit) if op == "<=" else (lambda v: v >= limit)
    if span is not None and meets(span[0]) != meets(span[1]):
        return "within noise"
    return "yes" if meets(value) else "**no**"


def _included(path: Path) -> str:
    """The hand-written ``path`` as docs/performance.md holds it: between two markers that name it, so
    that :func:`refresh` can put its text of the day in place without running the benchmarks again."""
    name = path.relative_to(ROOT).as_posix()
    return (
        f"<!-- from {name}: edit it there, then run `python -m bench --docs` -->\n\n"
        f"{path.read_text().strip()}\n\n<!-- end of {name} -->"
    )


_MARKED = re.compile(r"<!-- from (\S+): [^\n]* -->\n.*?<!-- end of \1 -->", re.DOTALL)


def refresh(doc: str) -> str:
    """``doc`` (docs/performance.md) with each hand-written part replaced by its file's text now.

    Raises
    ------
    ValueError
        If ``doc`` does not hold every part of :data:`INCLUDED` exactly once, or names another file.
    """
    known = {p.relative_to(ROOT).as_posix(): p for p in INCLUDED}
    found = [m.group(1) for m in _MARKED.finditer(doc)]
    if sorted(found) != sorted(known):
        raise ValueError(f"{OUT.name} holds the parts {found}, expected each of {sorted(known)} once")
    return _MARKED.sub(lambda m: _included(known[m.group(1)]), doc)


def profiles_document() -> str:
    """docs/profiles.md: every profile write-up of :data:`PROFILES` in full, sorted by file name."""
    profiles = [p.read_text().strip() for p in sorted(PROFILES.glob("*.md"))]
    return (
        "# Profiles\n\n"
        "Every profile behind docs/performance.md, in full: how each figure was profiled, what was found, "
        "what changed because of it and what was tried and not kept, as each session wrote it "
        "(`bench/profiles/*.md`). [Performance](performance.md#profiles-what-changed-because-of-them) "
        "sums them up.\n\n" + "\n\n".join(profiles) + "\n"
    )


def document(sections: list[str], every_row: list[Row], seconds: float) -> str:
    """docs/performance.md: the targets, what holds those missed, the profiles in short, every benchmark's
    section and the notes."""
    return (
        "# Performance\n\n"
        "Measured by `nox -s bench` (`python -m bench`); every figure is compared with a baseline "
        "measured in the same run on the same machine. `ratio` is an arm's time divided by the baseline's "
        "(1.0 = no overhead; lower is better).\n\n"
        f"Machine: {platform.platform()}, Python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs; run on {time.strftime('%Y-%m-%d')}, {seconds / 60:.1f} minutes in all.\n\n"
        "## Targets\n\n"
        "The targets of issue #14. `measured / target` says by how much a target is missed "
        "(a ratio above 1 for an upper bound, below 1 for a lower one); the next section says why, in short, "
        "and the one after it what the profiles found and changed ([Profiles](profiles.md): each in full). "
        "`95% interval` is how far the figure moves with the blocks the machine gave each arm "
        "(`bench/notes.md`); `met` is `within noise` when that interval holds the target. `settle left out` is "
        "the same ratio without each block's wait for the arm's last shard, which a long training overlaps "
        "with its next steps: a long training's figure lies between the two.\n\n"
        f"{_table(targets(every_row))}\n\n"
        + _included(MISSED)
        + "\n\n"
        + _included(SUMMARY)
        + "\n\n"
        + "\n".join(sections)
        + "\n"
        + _included(NOTES)
        + "\n"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("names", nargs="*", help=f"benchmarks to run: {', '.join(BENCHMARKS)} (default: all)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/performance.md alone")
    parser.add_argument(
        "--docs",
        action="store_true",
        help="run nothing: put the hand-written parts (bench/*.md, bench/profiles/*.md) of today into "
        "docs/performance.md (keeping the last run's figures) and docs/profiles.md",
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes: check that every script runs (implies --no-write)"
    )
    args = parser.parse_args()
    if args.docs:
        if args.names or args.quick or args.no_write:
            parser.error("--docs runs no benchmark: give it alone")
        try:
            OUT.write_text(refresh(OUT.read_text()))
        except ValueError as exc:
            parser.error(f"{exc}: run the benchmarks to write it anew")
        PROFILES_OUT.write_text(profiles_document())
        print(f"wrote {OUT} and {PROFILES_OUT}")
        return 0
    names = args.names or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; valid: {', '.join(BENCHMARKS)}")
    start = time.perf_counter()
    sections, every_row = [], []
    for name in names:
        print(f"== {name}", flush=True)
        t0 = time.perf_counter()
        module = importlib.import_module(BENCHMARKS[name])
        rows = module.run(quick=args.quick)
        for r in rows:
            print("  ", {k: _fmt(v) for k, v in r.items()}, flush=True)
        every_row += rows
        doc = (module.__doc__ or "").strip()
        sections.append(f"## {name}\n\n{doc}\n\n{_table(rows)}\n\n({time.perf_counter() - t0:.0f} s)\n")
    print(f"== targets\n{_table(targets(every_row))}", flush=True)
    if args.no_write or args.quick:
        return 0
    OUT.write_text(document(sections, every_row, time.perf_counter() - start))
    PROFILES_OUT.write_text(profiles_document())
    print(f"wrote {OUT} and {PROFILES_OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
