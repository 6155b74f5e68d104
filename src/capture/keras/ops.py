"""Backend tensors: what is a tensor, what cannot be captured, reductions on the device, host copies."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

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


_DTYPE_NAMES: dict[Any, str] = {}


def dtype_name(dtype: Any) -> str:
    """``keras.backend.standardize_dtype(dtype)``, remembered per dtype (it costs several microseconds a call).

    Raises ValueError for a dtype Keras does not know, as Keras does.
    """
    if dtype is None:  # Keras's floatx, which may change
        return str(keras.backend.standardize_dtype(dtype))
    try:
        return _DTYPE_NAMES[dtype]
    except KeyError:
        name = _DTYPE_NAMES[dtype] = str(keras.backend.standardize_dtype(dtype))
        return name
    except TypeError:  # an unhashable dtype
        return str(keras.backend.standardize_dtype(dtype))


def to_numpy(value: Any) -> np.ndarray:
    """A host array of a backend tensor (through the framework's own conversion).

    It may share memory with the tensor and be read-only (a TensorFlow tensor's
    ``numpy()`` copies, ``numpy.asarray`` of it does not): copy it to keep it.
    """
    if BACKEND == "torch" and isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    if BACKEND == "tensorflow" and isinstance(value, tf.Variable):
        return np.asarray(value.numpy())
    return np.asarray(value)


def device_type(value: Any) -> str:
    """``"cpu"``, ``"cuda"``/``"gpu"``, ``"tpu"``, ...: where a backend tensor lives."""
    if BACKEND == "torch" and isinstance(value, torch.Tensor):
        return str(value.device.type)
    if BACKEND == "jax" and isinstance(value, jax.Array):
        return str(next(iter(value.devices())).platform)
    device = str(getattr(value, "device", "") or "")  # TensorFlow: "/job:localhost/.../device:GPU:0"
    return device.rsplit("device:", 1)[-1].split(":", 1)[0].lower() or "cpu"


def has_float64() -> bool:
    """Whether the backend holds float64 tensors (JAX only with ``jax_enable_x64``)."""
    return BACKEND != "jax" or bool(jax.config.read("jax_enable_x64"))


def is_tracer(value: Any) -> bool:
    """Whether ``value`` is a JAX tracer (inside ``jit`` or ``grad``)."""
    return BACKEND == "jax" and isinstance(value, jax.core.Tracer)


def graph_mode() -> bool:
    """Whether TensorFlow is tracing a graph (``tf.function``) right now."""
    return BACKEND == "tensorflow" and not tf.executing_eagerly()


def trace_level() -> Any:
    """Where tensors are being computed now: the TensorFlow graph being traced, the JAX trace; None if eager.

    Compared for equality: a value tapped at the level of the step's own trace can be
    returned from the step; one of a nested ``while``/``cond`` body graph or of a
    ``jax.value_and_grad`` inside the jit cannot.
    """
    if BACKEND == "tensorflow":
        return None if tf.executing_eagerly() else tf.compat.v1.get_default_graph()
    if BACKEND == "jax":
        try:
            from jax._src.core import get_opaque_trace_state
        except ImportError:  # pragma: no cover - a JAX without it: no value counts as the step's own
            return object()
        return get_opaque_trace_state(None)  # JAX 0.4.36 to 0.6 ask for the (unused) convention argument
    return None


def at_level(value: Any, level: Any) -> Any | None:
    """``value`` as a value of the trace ``level`` (see :func:`trace_level`), or None where it has none.

    JAX: a value computed inside ``jax.value_and_grad`` (or ``jax.jvp``) in a jitted
    step is a tracer of the differentiation whose primal, the same value, is computed
    in the enclosing trace: the primal of the step's own trace can be returned from
    the step (no host callback). A tracer of any other trace (``lax.scan``/``cond``
    bodies, ``vmap``) has none. Other backends: None.
    """
    if BACKEND != "jax":
        return None
    try:
        from jax._src.core import OpaqueTraceState
    except ImportError:  # pragma: no cover - a JAX without it: every such value keeps the callback
        return None
    while isinstance(value, jax.core.Tracer):
        trace = getattr(value, "_trace", None)
        if trace is not None and OpaqueTraceState(getattr(trace, "_weakref", None)) == level:
            return value
        value = getattr(value, "primal", None)  # JVPTracer, LinearizeTracer
    return None


def as_output(value: Any) -> Any:
    """``value`` as an output of a compiled step (a TensorFlow variable as its tensor)."""
    if BACKEND == "tensorflow":
        return tf.convert_to_tensor(value)
    return value


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


def is_symbolic(value: Any) -> bool:
    """Whether ``value`` is a tensor without values: Keras's torch backend builds a model (``train_on_batch``'s
    first call) by calling its layers on tensors of the ``meta`` device."""
    return BACKEND == "torch" and isinstance(value, torch.Tensor) and value.is_meta


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
        name = dtype_name(dtype)
    except ValueError:
        return f"a tensor of dtype {dtype}"
    if name == "string" or name.startswith(("str", "object")):
        return "a string tensor"
    return None


def snapshot(value: Any) -> Any:
    """``value``, taken eagerly, as kept until the step ends: on torch a copy that in-place changes later in
    the step cannot reach (other tensors are immutable); on TensorFlow an ``IndexedSlices`` (the gradient
    of an ``Embedding``) as the dense tensor it adds up to, as the compiled routes convert it."""
    if BACKEND == "torch" and isinstance(value, torch.Tensor):
        return value.detach().clone()
    if BACKEND == "tensorflow" and isinstance(value, tf.IndexedSlices):
        return tf.convert_to_tensor(value)
    return value


@dataclass(frozen=True)
class Held:
    """A torch tensor given in a step, kept without a copy until the step ends (:func:`hold`)."""

    tensor: Any  # the tensor, detached
    version: int  # its version counter when it was given: an in-place change since moves it
    copy: Any  # a copy taken when it was given, or None


def hold(value: Any, copy: bool) -> Any:
    """``value`` as kept until the step ends: :func:`snapshot`, except a torch tensor, which is a :class:`Held`
    (with its copy only where ``copy``): :func:`release` gives it back if nothing changed it in place since.

    A copy of the bench MLP's 2.1 MB of gradients costs 4-6% of its step: the callback copies a value
    until a step has left it as given, and only references it from then on
    (``Callback._release_held``)."""
    if BACKEND != "torch" or not isinstance(value, torch.Tensor):
        return snapshot(value)
    t = value.detach()  # shares the version counter
    try:
        version = t._version
    except RuntimeError:  # an inference tensor has no version counter: copied
        return snapshot(value)
    return Held(t, version, snapshot(t) if copy else None)


def release(held: Held) -> tuple[Any, bool]:
    """``(value, changed)``: the value ``held`` was given with (None where it was changed in place since and no
    copy was taken), and whether it was changed in place since (an in-place change through a NumPy view of
    its memory, or through ``.data``, moves no version counter: it goes unseen)."""
    changed = held.tensor._version != held.version
    if held.copy is not None:
        return held.copy, changed
    return (None if changed else held.tensor), changed


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


def _unwrap(value: Any) -> Any:
    """A torch tensor detached, a TensorFlow variable as a tensor; anything else as it is."""
    if BACKEND == "torch" and isinstance(value, torch.Tensor):
        return value.detach()
    if BACKEND == "tensorflow" and isinstance(value, tf.Variable):
        return tf.convert_to_tensor(value)
    return value


def _host_array(value: Any) -> np.ndarray:
    """The host array of a tensor, dtypes NumPy lacks (bfloat16, float8) as float32."""
    if keras.ops.is_tensor(value) and dtype_name(value.dtype) not in _NUMPY_DTYPES:
        value = keras.ops.cast(value, "float32")
    host = to_numpy(value)
    return host if dtype_name(host.dtype) in _NUMPY_DTYPES else host.astype(np.float32)


class KerasOps(TensorOps):
    """Reductions with ``keras.ops`` on the tensor's device, then one copy to host.

    JAX values (which arrive on the host through ``jax.debug.callback``) and
    NumPy arrays use the NumPy formulas; TensorFlow and torch tensors are
    reduced on their device. Either way in float64.

    Histograms are binned on the tensor's device with ``keras.ops`` (all three
    backends) and only the counts come to the host; tensors on the CPU are
    binned with NumPy on the host (faster there, see :attr:`host_binned`).
    """

    device_histogram = True
    #: Device types whose tensors are binned with NumPy from the host array (a view or one copy in memory):
    #: on a CPU, ``numpy.sort`` is several times faster than the backends' ``searchsorted``.
    host_binned: ClassVar[frozenset[str]] = frozenset({"cpu"})

    def histogram(
        self, value: Any, edges: np.ndarray | None, bins: int, defer: bool = False
    ) -> red.Histogram | red.PendingHistogram | None:
        """Bin with ``keras.ops.searchsorted`` and ``keras.ops.bincount`` by the rule of
        :class:`tensortap.reductions.BinBounds` (the counts equal the NumPy ones)."""
        value = _unwrap(value)
        if not keras.ops.is_tensor(value) or isinstance(value, (np.ndarray, np.generic)):
            return super().histogram(_host_array(value), edges, bins, defer)
        dtype = dtype_name(value.dtype)
        work = red.bin_dtype(dtype)
        if (
            dtype.startswith("complex")
            or int(np.prod(keras.ops.shape(value))) == 0
            or device_type(value) in self.host_binned
            or (work == "float64" and not has_float64())
        ):
            return super().histogram(_host_array(value), edges, bins, defer)
        ops = keras.ops
        x = ops.reshape(ops.cast(value, work), [-1])
        finite = ops.isfinite(x)
        if edges is None:
            low, high = ops.min(ops.where(finite, x, np.inf)), ops.max(ops.where(finite, x, -np.inf))
            lo, hi = to_numpy(ops.stack([low, high]))
            if lo > hi:  # no finite value
                return None
            edges = red.equal_edges(float(lo), float(hi), bins)
        b = red.bin_bounds(edges, work)
        index = ops.searchsorted(ops.convert_to_tensor(b.bounds), x, side="right")
        index = ops.where(finite, ops.clip(index, b.first, b.bins) - 1, b.bins)  # non-finite: an extra bin, dropped
        counts = to_numpy(ops.bincount(index, minlength=b.bins + 1))[: b.bins]
        return red.Histogram(edges, counts.astype(np.int64))

    def prepare(
        self, value: Any, keys: Sequence[str], raw: bool
    ) -> tuple[np.ndarray | None, dict[str, float], str | None]:
        value = _unwrap(value)
        if (
            isinstance(value, (np.ndarray, np.generic, int, float))
            or BACKEND == "jax"
            or not keras.ops.is_tensor(value)
        ):
            host = to_numpy(value)
            dtype = dtype_name(host.dtype)
            orig = None
            if dtype not in _NUMPY_DTYPES:
                host, orig = host.astype(np.float32), dtype
            return (*super().prepare(host, keys, raw)[:2], orig)
        dtype = dtype_name(value.dtype)
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
