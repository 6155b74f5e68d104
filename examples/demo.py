"""End-to-end demo (``nox -s demo``): train with capture on PyTorch, Keras and XGBoost,
then query each trial, judge it with rules, plot its losses and check its files.

Usage: ``python examples/demo.py [OUT_DIR]`` (default ``./tensortap-demo``). The demo's trials
left there by an earlier run are replaced; anything else in OUT_DIR is left alone, and a folder of a
trial's name that is not a trial stops the demo before it trains. Exits non-zero if any step fails.
"""

from __future__ import annotations

import argparse
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


def fresh(trial: Path) -> bool:
    """Remove the trial an earlier demo left at ``trial``; False (nothing removed) where something else is there."""
    if trial.is_symlink() or (trial.exists() and not (trial / "workers").is_dir()):
        return False
    shutil.rmtree(trial, ignore_errors=True)
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", nargs="?", default="tensortap-demo", help="where the trials go")
    root = Path(parser.parse_args().out_dir).resolve()
    trials = {script: root / script.removesuffix(".py") for script in RUNS}
    for trial in trials.values():
        if not fresh(trial):
            parser.error(f"{trial} exists and is not a trial of an earlier demo; give another out_dir")
    failures = []
    for script, rules in RUNS.items():
        trial = trials[script]
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
