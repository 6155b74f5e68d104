"""Run every benchmark and write docs/performance.md: ``python -m bench [NAME ...]``."""

from __future__ import annotations

import argparse
import importlib
import json
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
    "pandas": "bench.bench_pandas",
    "histogram": "bench.bench_histogram",
}
OUT = Path(__file__).resolve().parent.parent / "docs" / "performance.md"
# rows measured in another environment (smdebug needs NumPy < 2.3), merged into a section
EXTERNAL = {"torch": Path(__file__).resolve().parent / "results" / "smdebug-torch.json"}


NOTES = """
## Notes

- smdebug 1.0.34 runs only in its own environment (NumPy < 2.3, protobuf <= 3.20.3); `nox -s bench`
  builds one in `.nox/smdebug` and merges its PyTorch rows above. Its XGBoost hook cannot run with
  XGBoost >= 1.6: it is a function-style callback (`__call__(env)`), an API XGBoost removed, and it
  asks `pkg_resources` for the `xgboost` distribution; so the XGBoost table has no smdebug row.
- Saving raw tensors every step is bound by copying and writing the bytes (4.3 MB per step for the
  MLP); the default interval of 100 steps is the case to read for the everyday cost.
- The histogram reduction in the `histogram` table runs with NumPy on the host (the core asks the
  adapter for a host copy of the tensor, bins it with `numpy.histogram` and drops the copy): it costs
  about as much CPU per step as raw capture, and writes about 250 times fewer bytes. Adapters that bin
  on the device (`TensorOps.device_histogram`) skip the host copy.
- `to_pandas(reductions=...)` of a raw tensor reads each shard once and reduces all its steps as one
  block; on these shared machines its ratio to `values()` varies between runs from about 1.1 to 2.7.
- These machines are small shared VMs (2 cores): the first touch of fresh memory is expensive and
  other jobs add noise, so each case is the best of several interleaved runs.
"""


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def _table(rows: list[dict[str, Any]]) -> str:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(_fmt(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("names", nargs="*", help=f"benchmarks to run: {', '.join(BENCHMARKS)} (default: all)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/performance.md alone")
    args = parser.parse_args()
    names = args.names or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; valid: {', '.join(BENCHMARKS)}")
    sections = []
    for name in names:
        print(f"== {name}", flush=True)
        t0 = time.perf_counter()
        rows = importlib.import_module(BENCHMARKS[name]).run()
        external = EXTERNAL.get(name)
        if external is not None and external.exists():
            extra = json.loads(external.read_text())
            base = next(r for r in extra if r["ratio"] == 1.0)
            rows += [
                dict(r, case=f"{r['case']} (own env, its no hook {base['ms_per_step']:.3g} ms)")
                for r in extra
                if r is not base
            ]
        for r in rows:
            print("  ", {k: _fmt(v) for k, v in r.items()}, flush=True)
        doc = (importlib.import_module(BENCHMARKS[name]).__doc__ or "").strip()
        sections.append(f"## {name}\n\n{doc}\n\n{_table(rows)}\n\n({time.perf_counter() - t0:.0f} s)\n")
    if args.no_write:
        return 0
    header = (
        "# Performance\n\n"
        "Measured by `nox -s bench` (`python -m bench`); every figure is compared with a baseline "
        "measured in the same run on the same machine. `ratio` is time with tensortap divided by "
        "the baseline's time (1.0 = no overhead; lower is better).\n\n"
        f"Machine: {platform.platform()}, Python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs; run on {time.strftime('%Y-%m-%d')}.\n\n"
    )
    OUT.write_text(header + "\n".join(sections) + NOTES)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
