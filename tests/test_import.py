"""SPEC section 1: the core imports no ML framework."""

from __future__ import annotations

import json
import subprocess
import sys
import types

import pytest

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


def test_a_framework_older_than_its_adapter_needs_is_refused_naming_the_version() -> None:
    from tensortap.capture.versions import release, require

    framework = types.ModuleType("xgboost")
    releases = (("2.0.3", (2, 0, 3)), ("2.1", (2, 1, 0)), ("2.10.0rc1", (2, 10, 0)), ("3.0.0.dev0", (3, 0, 0)))
    for version, found in releases:
        framework.__version__ = version  # type: ignore[attr-defined]
        assert release(framework) == found
        if found < (2, 1):
            needs = r'^tensortap\.xgboost needs XGBoost 2\.1 or newer, not 2\.0\.3: pip install "tensortap\[xgboost'
            with pytest.raises(ImportError, match=needs + r'\]"$'):
                require(framework, "tensortap.xgboost", "XGBoost", (2, 1), 'pip install "tensortap[xgboost]"')
        else:
            require(framework, "tensortap.xgboost", "XGBoost", (2, 1), 'pip install "tensortap[xgboost]"')
