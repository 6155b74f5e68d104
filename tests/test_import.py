"""SPEC section 1: the core imports no ML framework."""

from __future__ import annotations

import json
import subprocess
import sys

FRAMEWORKS = ("torch", "tensorflow", "keras", "jax", "xgboost")


def test_import_tensortap_imports_no_framework() -> None:
    code = (
        "import json, sys\n"
        "import tensortap, tensortap.trial, tensortap.backends, tensortap.capture, tensortap.trial.rules\n"
        "from tensortap.capture import Writer\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {FRAMEWORKS!r})))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert json.loads(out.stdout) == []


def test_public_names() -> None:
    import tensortap

    for name in (
        "create_trial", "open_trial", "Trial", "Tensor", "Mode", "StepState", "SaveConfig", "ReductionConfig",
        "Collection", "StepUnavailable", "StepNotYetAvailable", "TensorUnavailable", "TensorUnavailableForStep",
        "NoMoreData", "TrialNotFound",
    ):  # fmt: skip
        assert hasattr(tensortap, name), name
    assert issubclass(tensortap.TrialNotFound, FileNotFoundError)
    assert tensortap.open_trial is tensortap.create_trial
