"""The benchmark scripts still run (``nox -s bench -- --quick``), and the GPU check skips without CUDA."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "TENSORTAP_SMDEBUG_PYTHON"}
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, check=False
    )


@pytest.mark.slow
def test_every_benchmark_runs_quick() -> None:
    performance = (ROOT / "docs" / "performance.md").read_text()
    done = _run("bench", "--quick")
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("io", "torch", "keras", "xgboost", "read", "trial"):
        assert f"== {name}" in done.stdout
    assert "'case': 'baseline (2nd arm)'" in done.stdout  # every timed table has its noise arm
    assert (ROOT / "docs" / "performance.md").read_text() == performance  # --quick writes nothing


def test_gpu_check_without_cuda_says_so() -> None:
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: run python -m bench.gpu_check by hand")
    done = _run("bench.gpu_check")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "no CUDA device" in done.stdout
