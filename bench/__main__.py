"""Run every benchmark and write docs/performance.md: ``python -m bench [NAME ...] [--quick] [--no-write]``."""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

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
OUT = Path(__file__).resolve().parent.parent / "docs" / "performance.md"
# rows measured in another environment (smdebug needs NumPy < 2.3), merged into a section
EXTERNAL = {"torch": Path(__file__).resolve().parent / "results" / "smdebug-torch.json"}

# (figure, benchmark name contains, case contains, column, "<=" or ">=", target)
TARGETS: list[tuple[str, str, str, str, str, float]] = [
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
    ("read a scalar over 1,000 steps: smdebug / tensortap", "read the loss", "tensortap", "ratio smdebug/this",
     ">=", 20),
    ("read a 1.6 MB tensor over 1,000 steps: smdebug / tensortap", "read a 1.6 MB", "tensortap",
     "ratio smdebug/this", ">=", 5),
    ("tensor_names() on 100,000 steps x 200 tensors (s)", "trial of 100000", "tensor_names()", "seconds", "<=", 0.2),
    ("steps() on 100,000 steps x 200 tensors (s)", "trial of 100000", "steps()", "seconds", "<=", 0.2),
    ("open a trial of 100,000 steps (s)", "trial of 100000", "open", "seconds", "<=", 1.0),
    ("a saved step visible to a live trial, max (s)", "live", "max", "seconds", "<=", 1.0),
]  # fmt: skip

NOTES = """
## How to read these figures

- Every table compares arms measured in the same run, interleaved in blocks (`bench/harness.py`):
  each arm keeps its own model and hook and runs a block of steps in turn, so a slow spell of the
  machine falls on every arm alike. Two arms run the baseline; `noise` is how far they disagree
  (|second / first - 1|): a ratio closer to 1 than the noise is no measurable overhead. `block
  spread` is the interquartile range of one arm's blocks over their median.
- smdebug 1.0.34 runs only in its own environment (NumPy < 2.3, protobuf <= 3.20.3); `nox -s bench`
  builds one in `.nox/smdebug`, runs the PyTorch arms there and merges its rows above, and reads
  its trials from there (`TENSORTAP_SMDEBUG_PYTHON`). Its XGBoost hook cannot run with
  XGBoost >= 1.6 (a function-style callback, an API XGBoost removed), so the XGBoost table has no
  smdebug row.
- Saving raw tensors every step is bound by copying and writing the bytes (4.3 MB per step for the
  MLP); the default interval of 100 steps is the case to read for the everyday cost.
- The histogram reduction in the `histogram` table runs with NumPy on the host (the core asks the
  adapter for a host copy of the tensor, bins it with `numpy.histogram` and drops the copy): it costs
  about as much CPU per step as raw capture, and writes about 250 times fewer bytes. Adapters that bin
  on the device (`TensorOps.device_histogram`) skip the host copy.
- `to_pandas(reductions=...)` of a raw tensor reads each shard once and reduces all its steps as one
  block; on these shared machines its ratio to `values()` varies between runs from about 1.1 to 2.7.
- These machines are small shared VMs (2 cores): figures measured while other jobs run are noisy,
  which the noise column shows.
"""


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def _table(rows: list[dict[str, Any]]) -> str:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(_fmt(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per target of :data:`TARGETS` that this run measured: the figure, the target, met or not."""
    out = []
    for figure, bench, case, column, op, target in TARGETS:
        row = next((r for r in rows if bench in str(r.get("benchmark")) and case in str(r.get("case"))), None)
        if row is None or column not in row or not isinstance(row[column], float) or math.isnan(row[column]):
            continue
        value = row[column]
        met = value <= target if op == "<=" else value >= target
        out.append(
            {
                "figure": figure,
                "measured": value,
                "noise": row.get("noise", ""),
                "target": f"{op} {target}",
                "met": "yes" if met else "**no**",
            }
        )
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("names", nargs="*", help=f"benchmarks to run: {', '.join(BENCHMARKS)} (default: all)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/performance.md alone")
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes: check that every script runs (implies --no-write)"
    )
    args = parser.parse_args()
    names = args.names or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; valid: {', '.join(BENCHMARKS)}")
    sections, every_row = [], []
    for name in names:
        print(f"== {name}", flush=True)
        t0 = time.perf_counter()
        module = importlib.import_module(BENCHMARKS[name])
        rows = module.run(quick=args.quick)
        external = EXTERNAL.get(name)
        if external is not None and external.exists() and not args.quick:
            extra = json.loads(external.read_text())
            base = next(r for r in extra if r["case"] == "baseline")
            rows += [
                dict(r, case=f"{r['case']} (own env, its baseline {base['ms_per_step']:.3g} ms)")
                for r in extra
                if r["case"].startswith("smdebug")
            ]
        for r in rows:
            print("  ", {k: _fmt(v) for k, v in r.items()}, flush=True)
        every_row += rows
        doc = (module.__doc__ or "").strip()
        sections.append(f"## {name}\n\n{doc}\n\n{_table(rows)}\n\n({time.perf_counter() - t0:.0f} s)\n")
    summary = targets(every_row)
    for r in summary:
        print("  ", {k: _fmt(v) for k, v in r.items()}, flush=True)
    if args.no_write or args.quick:
        return 0
    header = (
        "# Performance\n\n"
        "Measured by `nox -s bench` (`python -m bench`); every figure is compared with a baseline "
        "measured in the same run on the same machine. `ratio` is time with tensortap divided by "
        "the baseline's time (1.0 = no overhead; lower is better).\n\n"
        f"Machine: {platform.platform()}, Python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs; run on {time.strftime('%Y-%m-%d')}.\n\n"
        f"## Targets\n\n{_table(summary)}\n\n"
    )
    OUT.write_text(header + "\n".join(sections) + NOTES)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
