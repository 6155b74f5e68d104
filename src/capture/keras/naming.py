"""Names of the tensors in a nested value (SPEC section 9, the rule every adapter follows).

A single tensor, or a structure holding exactly one tensor, is ``<name>``; a
list or tuple gives ``<name>/<i>``, a dict ``<name>/<key>``, recursively (a
sub-structure holding one tensor is named like that tensor).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

IsTensor = Callable[[Any], bool]


def _items(value: Any) -> Iterator[tuple[Any, Any]]:
    if isinstance(value, (list, tuple)):
        return iter(enumerate(value))
    if isinstance(value, Mapping):
        return iter(value.items())
    return iter(())


def _leaves(value: Any, is_tensor: IsTensor) -> Iterator[Any]:
    if is_tensor(value):
        yield value
        return
    for _, v in _items(value):
        yield from _leaves(v, is_tensor)


def flatten(name: str, value: Any, is_tensor: IsTensor) -> list[tuple[str, Any]]:
    """The tensors in a (nested) value with their names.

    Examples
    --------
    ``t`` and ``(t,)`` -> ``name``; ``(a, b)`` -> ``name/0``, ``name/1``;
    ``{"h": a, "c": (b,)}`` -> ``name/h``, ``name/c``.
    """
    leaves = list(_leaves(value, is_tensor))
    if len(leaves) <= 1:
        return [(name, leaf) for leaf in leaves]
    out: list[tuple[str, Any]] = []
    for key, v in _items(value):
        out.extend(flatten(f"{name}/{key}", v, is_tensor))
    return out


def flatten_logs(logs: Mapping[str, Any]) -> dict[str, Any]:
    """Keras's logs as its callbacks see them: a nested dict (``compile_metrics``) merged into the top level."""
    out: dict[str, Any] = {}
    for key, value in logs.items():
        if isinstance(value, Mapping):
            out.update(flatten_logs(value))
        else:
            out[str(key)] = value
    return out
