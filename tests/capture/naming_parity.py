"""The naming-parity cases: nested values a layer (Keras) or module (PyTorch) returns, and their names.

Both adapters' tests build a model whose sub-layers/modules named after the
keys of :func:`structures` return those values, capture ``outputs``, and
compare the names in the trial with :data:`EXPECTED`: one naming rule for
every framework (SPEC section 9, :func:`tensortap.capture.session.flatten`).
"""

from __future__ import annotations

from typing import Any


def structures(a: Any, b: Any, c: Any) -> dict[str, Any]:
    """The nested values, built from three tensors of the framework under test."""
    return {
        "single": a,
        "one_tuple": (a,),
        "pair": (a, b),
        "with_none": [a, None, b],
        "dict": {"h": a, "c": (b,)},
        "nested": (a, (b, c)),
        "deep": {"x": {"y": a, "z": [b, c]}},
    }


EXPECTED = {
    "single": ["outputs/single"],
    "one_tuple": ["outputs/one_tuple"],
    "pair": ["outputs/pair/0", "outputs/pair/1"],
    "with_none": ["outputs/with_none/0", "outputs/with_none/2"],
    "dict": ["outputs/dict/h", "outputs/dict/c"],
    "nested": ["outputs/nested/0", "outputs/nested/1/0", "outputs/nested/1/1"],
    "deep": ["outputs/deep/x/y", "outputs/deep/x/z/0", "outputs/deep/x/z/1"],
}
