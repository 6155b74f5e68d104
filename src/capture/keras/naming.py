"""Keras's logs as its callbacks see them (the names of nested layer outputs come from
:func:`tensortap.capture.session.flatten`, the rule every adapter follows)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def flatten_logs(logs: Mapping[str, Any]) -> dict[str, Any]:
    """A step's returned logs with nested dicts (``compile_metrics``) merged into the top level, as Keras does."""
    out: dict[str, Any] = {}
    for key, value in logs.items():
        if isinstance(value, Mapping):
            out.update(flatten_logs(value))
        else:
            out[str(key)] = value
    return out
