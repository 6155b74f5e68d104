"""End-to-end demo (``nox -s demo``): train with capture on PyTorch, Keras and XGBoost,
then query each trial, judge it with rules, plot its losses and check its files.

Usage: ``python examples/demo.py [OUT_DIR]`` (default ``./tensortap-demo``; emptied first).
Exits non-zero if any step fails.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

from tensortap.cli import main as tensortap

HERE = Path(__file__).resolve().parent

# example script -> rules to run on its trial (tensortap rules syntax)
RUNS = {
    "pytorch_mnist_like.py": ["loss_not_decreasing", "vanishing_gradient", "exploding_tensor", "dead_relu"],
    "keras_mnist_like.py": ["loss_not_decreasing", "vanishing_gradient", "exploding_tensor"],
    "xgboost_tabular.py": ["loss_not_decreasing", "feature_importance_overweight", "class_imbalance"],
}


def banner(text: str) -> None:
    print(f"\n{'=' * 78}\n{text}\n{'=' * 78}", flush=True)


def main() -> int:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "tensortap-demo").resolve()
    shutil.rmtree(root, ignore_errors=True)
    failures = []
    for script, rules in RUNS.items():
        trial = root / script.removesuffix(".py")
        banner(f"train: python examples/{script} {trial}")
        t0 = time.perf_counter()
        if subprocess.run([sys.executable, str(HERE / script), str(trial)], check=False).returncode != 0:
            failures.append(f"{script} failed")
            continue
        print(f"({time.perf_counter() - t0:.1f} s)")
        banner(f"tensortap ls {trial}")
        tensortap(["ls", str(trial)])
        args = [a for r in rules for a in ("--rule", r)]
        banner(f"tensortap rules {trial} {' '.join(args)}")
        status = tensortap(["rules", str(trial), *args])
        print(
            f"(exit status {status}: {'a rule fired' if status == 1 else 'nothing fired' if status == 0 else 'error'})"
        )
        if status not in (0, 1):
            failures.append(f"rules on {trial} exited {status}")
        plot = trial / "losses.png"
        banner(f"tensortap plot {trial} --regex ^losses/ -o {plot}")
        if tensortap(["plot", str(trial), "--regex", "^losses/", "-o", str(plot)]) != 0:
            failures.append(f"plot of {trial} failed")
        banner(f"tensortap check {trial}")
        if tensortap(["check", str(trial)]) != 0:
            failures.append(f"check found problems in {trial}")
    banner("demo " + ("failed: " + "; ".join(failures) if failures else f"done: trials are under {root}"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
