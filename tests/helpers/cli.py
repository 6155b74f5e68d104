"""The ``tensortap`` command run as a script runs it: a subprocess, its output parsed strictly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any


def cli(
    *args: str, env: dict[str, str] | None = None, module: str = "tensortap.cli"
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m tensortap.cli ARGS`` and return what it did."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def strict_json(text: str) -> Any:
    """Parse JSON, refusing the NaN / Infinity literals Python would accept."""

    def refuse(literal: str) -> None:
        raise AssertionError(f"{literal} literal in JSON output")

    return json.loads(text, parse_constant=refuse)
