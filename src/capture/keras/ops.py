"""Backend tensors: what is a tensor, what cannot be captured, reductions on the device, host copies."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import keras
import numpy as np

from ... import reductions as red
from ..core import TensorOps

BACKEND = keras.backend.backend()
_NUMPY_DTYPES = frozenset(
    [
        "bool",
        "int8",
        "int16",
        "int32",
        "int64",
        "uint8",
        "uint16",
        "uint32",
        "uint64",
        "float16",
        "float32",
        "float64",
        "complex64",
        "complex128",
    ]
)

if BACKEND == "tensorflow":
    import tensorflow as tf
elif BACKEND == "jax":
    import jax
elif BACKEND == "torch":
    import torch


def to_numpy(value: Any) -> np.ndarray:
    """A host array of a backend tensor (through the framework's own conversion)."""
    if BACKEND == "torch" and isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    if BACKEND == "tensorflow" and isinstance(value, (tf.Tensor, tf.Variable)):
        return np.asarray(value.numpy())
    return np.asarray(value)


def is_tracer(value: Any) -> bool:
    """Whether ``value`` is a JAX tracer (inside ``jit`` or ``grad``)."""
    return BACKEND == "jax" and isinstance(value, jax.core.Tracer)


def graph_mode() -> bool:
    """Whether TensorFlow is tracing a graph (``tf.function``) right now."""
    return BACKEND == "tensorflow" and not tf.executing_eagerly()


def is_tensor(value: Any) -> bool:
    """Whether ``value`` is a tensor of the backend (ragged and sparse ones too) or a NumPy array."""
    if isinstance(value, (np.ndarray, np.generic)):
        return True
    if BACKEND == "tensorflow" and isinstance(value, (tf.Variable, tf.RaggedTensor, tf.SparseTensor)):
        return True
    return bool(keras.ops.is_tensor(value)) or is_tracer(value)


def is_scalar(value: Any) -> bool:
    """Whether ``value`` is a tensor of rank 0 (a loss)."""
    shape = getattr(value, "shape", None)
    return is_tensor(value) and shape is not None and len(shape) == 0


def uncapturable(value: Any) -> str | None:
    """Why ``value`` cannot be stored (``"a ragged tensor"``, ``"a string tensor"``), or None if it can."""
    if BACKEND == "tensorflow":
        if isinstance(value, tf.RaggedTensor):
            return "a ragged tensor"
        if isinstance(value, tf.SparseTensor):
            return "a sparse tensor"
    dtype = getattr(value, "dtype", None)
    if dtype is None:
        return None
    try:
        name = keras.backend.standardize_dtype(dtype)
    except ValueError:
        return f"a tensor of dtype {dtype}"
    if name == "string" or name.startswith(("str", "object")):
        return "a string tensor"
    return None


def snapshot(value: Any) -> Any:
    """A copy that in-place changes later in the step cannot reach (torch only; other tensors are immutable)."""
    if BACKEND == "torch" and isinstance(value, torch.Tensor):
        return value.detach().clone()
    return value


AllReduceMax = Callable[[int], int]


def backend_all_reduce_max() -> AllReduceMax | None:
    """The backend's all-reduce (maximum of one integer over every process), or None alone or without one.

    torch: ``torch.distributed`` when a process group of more than one rank is
    initialised; JAX: ``multihost_utils.process_allgather`` when
    ``jax.process_count() > 1``; TensorFlow: none (a ``tf.distribute`` strategy
    reduces only inside its own ``run``), so pass ``all_reduce_max`` yourself.
    """
    if BACKEND == "torch":
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:

            def torch_max(flag: int) -> int:
                device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
                t = torch.tensor([flag], device=device)
                dist.all_reduce(t, op=dist.ReduceOp.MAX)
                return int(t.item())

            return torch_max
    if BACKEND == "jax" and jax.process_count() > 1:
        from jax.experimental import multihost_utils

        def jax_max(flag: int) -> int:
            return int(np.max(multihost_utils.process_allgather(np.array([flag], dtype=np.int32))))

        return jax_max
    return None


class KerasOps(TensorOps):
    """Reductions with ``keras.ops`` on the tensor's device, then one copy to host.

    JAX values (which arrive on the host through ``jax.debug.callback``) and
    NumPy arrays use the NumPy formulas; TensorFlow and torch tensors are
    reduced on their device. Either way in float64.
    """

    def prepare(
        self, value: Any, keys: Sequence[str], raw: bool
    ) -> tuple[np.ndarray | None, dict[str, float], str | None]:
        if BACKEND == "torch" and isinstance(value, torch.Tensor):
            value = value.detach()
        elif BACKEND == "tensorflow" and isinstance(value, tf.Variable):
            value = tf.convert_to_tensor(value)
        if (
            isinstance(value, (np.ndarray, np.generic, int, float))
            or BACKEND == "jax"
            or not keras.ops.is_tensor(value)
        ):
            host = to_numpy(value)
            dtype = keras.backend.standardize_dtype(host.dtype)
            orig = None
            if dtype not in _NUMPY_DTYPES:
                host, orig = host.astype(np.float32), dtype
            return (*super().prepare(host, keys, raw)[:2], orig)
        dtype = keras.backend.standardize_dtype(value.dtype)
        orig = None
        if dtype not in _NUMPY_DTYPES:
            value, orig = keras.ops.cast(value, "float32"), dtype
        values: dict[str, float] = {}
        if keys:
            values = self._reduce(value, list(keys))
        # no copy here: the core copies the host view into the shard buffer before offer returns
        return (to_numpy(value) if raw else None), values, orig

    @staticmethod
    def _reduce(value: Any, keys: list[str]) -> dict[str, float]:
        ops = keras.ops
        if int(np.prod(ops.shape(value))) == 0:
            return red.compute_many(to_numpy(value), keys)
        x = ops.cast(value, "float64")
        n = float(np.prod(ops.shape(value)))

        def variance(a: Any) -> Any:  # NumPy's formula; keras.ops.var/mean may reduce in float32 (torch)
            return ops.sum(ops.square(a - ops.sum(a) / n)) / n

        formulas: dict[str, Callable[[Any], Any]] = {
            "min": ops.min,
            "max": ops.max,
            "mean": lambda a: ops.sum(a) / n,
            "std": lambda a: ops.sqrt(variance(a)),
            "variance": variance,
            "sum": ops.sum,
            # keras.ops.prod returns float32 on torch, whatever the input
            "prod": torch.prod if BACKEND == "torch" else ops.prod,
            "l1": lambda a: ops.sum(ops.abs(a)),
            "l2": lambda a: ops.sqrt(ops.sum(a * a)),
            "nan_count": lambda a: ops.sum(ops.cast(ops.isnan(a), "float64")),
            "inf_count": lambda a: ops.sum(ops.cast(ops.isinf(a), "float64")),
            "zero_count": lambda a: ops.sum(ops.cast(ops.equal(a, 0), "float64")),
        }
        out = []
        for key in keys:
            name, absolute = red.split_key(key)
            out.append(formulas[name](ops.abs(x) if absolute else x))
        host = to_numpy(ops.stack(out))
        return {k: float(v) for k, v in zip(keys, host, strict=True)}
