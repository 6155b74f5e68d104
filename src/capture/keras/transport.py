"""How values leave a running step.

- As extra outputs of a compiled step (``fit``, ``evaluate`` and ``predict`` on
  TensorFlow and JAX): :class:`StepVariants` builds the step function twice
  (and once more per other set of saved collections) with Keras's own
  ``make_<kind>_function``: a *plain* variant that taps nothing, run on every
  step that saves nothing from inside the step, and a *capturing* variant
  whose step returns ``(out, {key: tensor})`` (JAX: ``((out, {key: tensor}), state)``),
  run on the steps that do (on TensorFlow also the variables a ``fit`` step saves,
  read after its update); the extras are stripped before Keras sees the output. A TensorFlow
  step drawing from stateful random ops (``tf.random.normal``) runs one capturing variant at
  every step, dropping what an unsaved step captured (see :meth:`StepVariants._only`).
- Values computed inside ``jax.value_and_grad`` in a jitted step: their primal, computed
  in the step's own trace (:func:`.ops.at_level`), is returned like the others.
- Values the compiled step cannot return (computed in a TensorFlow ``while``/``cond``
  body graph, or in a JAX ``lax.scan``/``cond`` body): through ``tf.Variable`` taps
  (:class:`TFGraphTaps`) or ``jax.debug.callback``, traced into the capturing
  variant only.
- Steps run eagerly (torch, ``run_eagerly=True``): directly.
- Loops of your own and the steps Keras's variants cannot serve (TensorFlow or JAX
  ``predict`` with ``steps_per_execution > 1`` concatenates outputs; a TensorFlow
  strategy of several replicas reduces them; JAX without ``jit_compile``): the
  taps above under a flag per collection (a ``tf.Variable``, or an array fed with
  each batch into the jitted step, see :class:`FlagIterator`).
"""

from __future__ import annotations

import functools
import itertools
import logging
import weakref
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple, Protocol

import numpy as np

from ...modes import Mode
from .ops import BACKEND

if BACKEND == "tensorflow":
    import tensorflow as tf
    from tensorflow.python.framework import op_def_registry
    from tensorflow.python.ops import control_flow_util, resource_variable_ops
    from tensorflow.python.ops.control_flow_v2_func_graphs import WhileBodyFuncGraph

logger = logging.getLogger("tensortap")

# collections whose tensors come from inside the step (the others are read after it)
STEP_COLLECTIONS = ("gradients", "outputs", "inputs", "losses", "metrics")
NO_FLAGS = np.zeros(len(STEP_COLLECTIONS), dtype=bool)
# collections whose slots are calls of a layer (numbered by their order in the step)
CALL_COLLECTIONS = ("outputs", "inputs")
EAGER = 0
"""The origin of a value handed over eagerly (a traced graph's is its serial number, from 1)."""


class Slot(NamedTuple):
    """Where a captured value goes: a plain ``name``, or one call of a layer (``name`` is then its base name).

    ``call`` is the layer's call index in the step (None for a plain name; in a traced
    graph, counted in its trace: see :func:`in_run_order`), a loss's source for a loss,
    and ``sub`` the value's place in the call's nested output (``""``, ``"/0"``, ``"/key"``).
    """

    name: str
    call: int | None = None
    sub: str = ""

    def label(self) -> str:
        """A readable name for messages."""
        return self.name + self.sub


class Tagged(NamedTuple):
    """A batch and the step's collection flags, as one (JAX pytree) input of the jitted step."""

    data: Any
    flags: np.ndarray


class _FlagSource(Protocol):
    @property
    def flags_now(self) -> np.ndarray: ...


class FlagIterator:
    """Yields each batch of Keras's JAX data iterator tagged with the callback's current flags."""

    def __init__(self, iterator: Any, source: _FlagSource) -> None:
        self.iterator = iterator
        self.source = source

    def __iter__(self) -> FlagIterator:
        return self

    def __next__(self) -> Tagged:
        return Tagged(next(self.iterator), self.source.flags_now)


class _VariantOwner(Protocol):
    """The callback side of :class:`StepVariants`."""

    #: the variant being run (its wanted collections), None outside a call of a variant
    running: frozenset[str] | None
    #: the extras returned by the variants run in the open step
    extras_out: list[dict[str, Any]]

    def wanted_in(self, mode: Mode) -> frozenset[str]:
        """Step collections saved from inside a step function of ``mode`` run now (empty: the plain variant runs)."""
        ...

    def returnable_in(self, mode: Mode) -> frozenset[str]:
        """The collections a capturing variant of ``mode`` may return at some step (empty: none)."""
        ...

    def step_ran(self, mode: Mode, out: Any) -> None:
        """A step function of ``mode`` returned ``out``: the open step of that mode is complete."""
        ...

    def step_raised(self, mode: Mode, why: BaseException) -> None:
        """A step function of ``mode`` raised ``why``: the open step of that mode did not happen."""
        ...


class ReportedStep:
    """``model.<kind>_function`` while the callback is active, where :class:`StepVariants` do not serve (a
    step run eagerly, or one that taps under flags): Keras's own, saying to ``owner`` when a step returns
    (and what it returned) or raises.

    The function, not the step wrapper inside it, says so: a compiled function runs the
    wrapper only while it is traced, and Keras's function reads the batch before the wrapper
    runs (on TensorFlow it raises there when data of unknown length runs out: how the epoch
    ends).
    """

    def __init__(self, fn: Callable[..., Any], owner: _VariantOwner, mode: Mode) -> None:
        self.fn = fn
        self.owner = owner
        self.mode = mode

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.run(self.fn, args, kwargs)

    def run(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """``fn(*args, **kwargs)``, reported."""
        try:
            out = fn(*args, **kwargs)
        except BaseException as exc:
            self.owner.step_raised(self.mode, exc)
            raise
        self.owner.step_ran(self.mode, out)
        return out


class StepVariants(ReportedStep):
    """``model.<kind>_function`` while the callback is active: the plain step function or a capturing one.

    Parameters
    ----------
    plain
        The step function Keras built with the callback's wrappers tapping nothing.
    build
        Builds a capturing variant (a distinct function object each time, traced
        on its first call, once for each set of wanted collections).
    owner
        Says which collections the open step saves from a step function of ``mode``,
        learns which variant runs (read by the step wrapper while tracing) and
        receives the extras.
    jax_outputs
        The function returns ``(out, state)`` (JAX) rather than ``out``.
    mode
        The mode of its steps (TRAIN for ``train_function``, ...).
    """

    def __init__(
        self,
        plain: Callable[..., Any],
        build: Callable[[], Callable[..., Any]],
        owner: _VariantOwner,
        jax_outputs: bool,
        mode: Mode,
    ) -> None:
        super().__init__(plain, owner, mode)
        self.plain = plain
        self.build = build
        self.jax_outputs = jax_outputs
        self.capturing: dict[frozenset[str], Callable[..., Any]] = {}
        #: the variant of the last call: its wanted collections, empty for the plain one
        self.last: frozenset[str] | None = None
        #: the variant every step runs (empty: each step runs its own), known at the first call (see :meth:`_only`)
        self.only: frozenset[str] | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        owner = self.owner
        wanted = owner.wanted_in(self.mode)
        if self.only is None:
            try:
                self.only = self._only(wanted, args, kwargs)
            except BaseException as exc:  # the step's trace raised: so would its call
                owner.step_raised(self.mode, exc)
                raise
        key = self.only or wanted
        fn = self._variant(key)
        owner.running = key
        try:
            out = self.run(fn, args, kwargs)
        finally:
            owner.running = None
        self.last = key
        if not key:
            return out
        if self.jax_outputs:
            (first, extras), state = out
            out = (first, state)
        else:
            out, extras = out
        if wanted:  # an unsaved step's extras (the `only` variant's) are dropped
            owner.extras_out.append(extras)
        return out

    def _variant(self, key: frozenset[str]) -> Callable[..., Any]:
        """The step function that captures the collections ``key`` (the plain one for none), built once."""
        if not key:
            return self.plain
        fn = self.capturing.get(key)
        if fn is None:
            fn = self.capturing[key] = self.build()
        return fn

    def _only(self, wanted: frozenset[str], args: tuple[Any, ...], kwargs: dict[str, Any]) -> frozenset[str]:
        """Before the first step: the variant every step must run, empty where each step may run its own.

        TensorFlow gives each stateful random op (``tf.random.normal``, ...) of each traced function a
        random state of its own, seeded alike: steps run by two variants would draw the same numbers
        again, and training would change. Where the graph of the first step's variant (``wanted``; traced
        here for ``args``, not run: its call then uses this trace) holds such ops, every step runs the
        variant of every collection the mode may return, and the extras of an unsaved step are dropped:
        one random state goes on, as without the callback.
        """
        every = self.owner.returnable_in(self.mode) if BACKEND == "tensorflow" else frozenset()
        if not every:
            return frozenset()
        self.owner.running = wanted  # traced as it runs
        try:
            graph = traced_graph(self._variant(wanted), args, kwargs)
        finally:
            self.owner.running = None
        try:
            found = stateful_random_ops(graph) if graph is not None else []
        except Exception as exc:  # a graph too large to serialize, ...: each step runs its own variant
            logger.warning(
                "tensortap: the %s step's graph could not be looked into for random ops: %s", self.mode.name, exc
            )
            found = []
        if not found:
            return frozenset()
        logger.warning(
            "tensortap: the %s step draws with TensorFlow's stateful random ops (%s), from a state of each traced "
            "function's own: every step runs the capturing step function, so that it draws as without the "
            "callback (unsaved steps drop what it captures, at a cost in time; keras.random with a SeedGenerator, "
            "or tf.random.Generator, keeps its state in a variable and lets unsaved steps run the plain function)",
            self.mode.name,
            ", ".join(found),
        )
        return every


def traced_graph(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """TensorFlow: the graph of Keras's step function ``fn`` traced for ``args`` without running it (the trace
    serves its call), None where it cannot be traced alone.

    ``fn`` is a ``tf.function`` (``predict``), or Keras's function of ``fit`` and ``evaluate``, which
    runs the ``tf.function`` ``multi_step_on_iterator`` of its closure on a ``tf.data`` iterator.
    """
    traced: Any = fn
    if not isinstance(fn, tf.types.experimental.PolymorphicFunction):
        code, cells = getattr(fn, "__code__", None), getattr(fn, "__closure__", None) or ()
        inner = dict(zip(code.co_freevars, cells, strict=True)).get("multi_step_on_iterator") if code else None
        iterators = (tf.data.Iterator, tf.distribute.DistributedIterator)
        if inner is None or not args or not isinstance(args[0], iterators):
            return None
        traced = inner.cell_contents
    return traced.get_concrete_function(*args, **kwargs).graph


def stateful_random_ops(graph: Any) -> list[str]:
    """The types of the ops of ``graph`` (with the functions it calls) that draw from a random state their
    kernel keeps (``RandomStandardNormal``, ``RandomUniform``, ``TruncatedNormal``, ``Multinomial``, ...)."""
    graph_def = graph.as_graph_def()
    nodes = itertools.chain(graph_def.node, *(f.node_def for f in graph_def.library.function))
    return sorted({node.op for node in nodes if _keeps_random_state(node.op)})


@functools.cache
def _keeps_random_state(op_type: str) -> bool:
    """Whether ops of ``op_type`` are stateful and seeded by their ``seed`` and ``seed2`` attributes (not by
    a variable, as ``tf.random.Generator``'s, nor by their inputs, as stateless ones)."""
    op_def = op_def_registry.get(op_type)
    return op_def is not None and op_def.is_stateful and {"seed", "seed2"} <= {a.name for a in op_def.attr}


class Run(NamedTuple):
    """A value handed over in a step, with where it was computed and when.

    ``origin`` is the traced graph whose run wrote it (its serial number), or
    :data:`EAGER`; ``order`` its place on the step's clock (:meth:`TFGraphTaps.tick`);
    ``replica`` the replica that computed it, of ``replicas`` that run the step (a
    TensorFlow strategy of several replicas; see :func:`across_replicas`).
    """

    slot: Slot
    collection: str
    value: Any
    origin: int
    order: int
    replica: int = 0
    replicas: int = 1


def across_replicas(runs: Iterable[Run], warned: set[str]) -> list[Run]:
    """``runs`` with the values each replica of a strategy computed joined into the step's own.

    Each replica runs the step on its part of the batch; what the step did as a whole is
    what Keras applies and reports: the gradients the optimizer applies (its all-reduce
    sums the replicas' gradients of their scaled losses), the loss of those gradients and
    the metrics (the mean over the replicas: the metrics Keras logs, and its logged loss
    where the batch splits evenly), and the layers' inputs and outputs of the whole batch
    (the replicas' parts in order, as ``predict`` joins them). A value not every replica
    wrote, or one without a batch axis to join, is replica 0's (or none), and one warning
    names it (``warned`` holds the names warned about).
    """
    out: list[Run] = []
    parts: dict[tuple[int, Slot, str], list[Run]] = {}
    for r in runs:
        if r.replicas == 1:
            out.append(r)
        else:
            parts.setdefault((r.origin, r.slot, r.collection), []).append(r)
    for group in parts.values():
        group.sort(key=lambda r: r.replica)
        first, values = group[0], [np.asarray(r.value) for r in group]
        joined, why = None, ""
        if [r.replica for r in group] != list(range(first.replicas)):
            why = f"written by replicas {', '.join(str(r.replica) for r in group)} of {first.replicas} only"
        elif first.collection == "gradients":
            joined = functools.reduce(np.add, values)
        elif first.collection in ("losses", "metrics"):
            joined = functools.reduce(np.add, values) / len(values)
        elif values[0].ndim and len({v.shape[1:] for v in values}) == 1:
            joined = np.concatenate(values)
        else:
            why = "a value of each replica without a batch axis to join them along"
        if joined is None:
            joined = values[0] if first.replica == 0 else None
            if first.slot.label() not in warned:
                warned.add(first.slot.label())
                kept = "replica 0's value is kept" if joined is not None else "it is not captured"
                logger.warning("tensortap: %s is %s: %s", first.slot.label(), why, kept)
        if joined is not None:
            out.append(first._replace(value=joined, replica=0, replicas=1))
    return out


def in_run_order(runs: Iterable[Run]) -> list[tuple[Slot, str, Any]]:
    """``(slot, collection, value)`` of ``runs`` in the order they were written, each layer call's
    slot numbered by its place among the calls of its layer in the step.

    Two step functions run in one step (a GAN's ``d.train_on_batch`` then
    ``combined.train_on_batch``) each count the calls of a layer from 0 in their own
    trace; here the first run's call is 0 and the second's 1 (``outputs/d/dense:0``,
    ``:1``), as eager calls are numbered. Other slots keep theirs; a later value wins.
    """
    ordered = sorted(runs, key=lambda r: r.order)  # stable: values of one order stay as they came
    places: dict[str, dict[tuple[int, int | None], int]] = {}
    for r in ordered:
        if r.collection in CALL_COLLECTIONS:
            calls = places.setdefault(r.slot.name, {})
            calls.setdefault((r.origin, r.slot.call), len(calls))
    out = []
    for r in ordered:
        slot = r.slot
        if r.collection in CALL_COLLECTIONS:
            slot = slot._replace(call=places[slot.name][(r.origin, slot.call)])
        out.append((slot, r.collection, r.value))
    return out


def _variable(initial: Any, shape: Any = None) -> Any:
    """A non-trainable variable made now, even while a ``tf.function`` is traced a second time.

    ``tf.Variable`` refuses that (*tf.function only supports singleton tf.Variables created on
    the first call*), even under ``tf.init_scope()``; the class itself is not watched. Made
    under ``tf.init_scope()``, it is initialised at once, eagerly.
    """
    return resource_variable_ops.ResourceVariable(initial, shape=shape, trainable=False)


class _TFTap:
    """One captured tensor of one traced graph: a variable holding its value, and ``meta``: the step that
    wrote it last, when (the step's clock) and how many times in that step.

    Without a variable (``value`` None): a *mark*, where a value that cannot be kept was computed (one
    without a static shape under XLA), so that no earlier value of its slot passes for it.
    """

    def __init__(
        self,
        slot: Slot,
        collection: str,
        value: Any,
        static: bool,
        origin: int,
        looped: bool,
        replica: tuple[int, int],
    ) -> None:
        self.slot = slot
        self.collection = collection
        self.origin = origin
        self.looped = looped  # traced in a while loop's body: written once per iteration
        self.replica = replica  # (the replica that writes it, how many replicas run the graph)
        self.var: Any = None
        if value is not None:
            shape = value.shape if static else tf.TensorShape(None)
            init = tf.zeros([d or 0 for d in value.shape] if value.shape.rank is not None else [], value.dtype)
            self.var = _variable(init, shape)
        self.meta = _variable(tf.constant([-1, 0, 0], tf.int64))

    def save(self, value: Any, step: Any, order: Any) -> None:
        """In the graph: keep ``value``, written at ``step`` (a scalar tensor) at ``order`` on its clock."""
        if self.var is not None:
            self.var.assign(value)
        before = self.meta.read_value()
        writes = tf.where(before[0] == step, before[2] + 1, tf.constant(1, tf.int64))
        self.meta.assign(tf.stack([step, order, writes]))


def replica_now() -> tuple[int, int]:
    """The replica whose step function runs (or is traced) now, and how many replicas run it in this process:
    ``(0, 1)`` but for a TensorFlow strategy of several replicas, such as ``MirroredStrategy``, which runs (or
    traces) the step once for each. (A strategy of several workers numbers the replicas of all; here they
    are numbered from 0 in each process, which captures its own.)"""
    if BACKEND != "tensorflow":
        return 0, 1
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return 0, 1
    replica = tf.get_static_value(context.replica_id_in_sync_group)
    if replica is None:  # known only when the step runs (TPUStrategy): each replica writes the same taps
        return 0, 1
    here = len(context.strategy.extended.worker_devices)
    return int(replica) % here, here


def in_xla_context() -> bool:
    """Whether the graph being traced will be compiled by XLA.

    ``tf.function(jit_compile=True)`` (Keras's ``jit_compile=True`` and a loop's own
    function alike) traces its function inside an ``XLAControlFlowContext`` of the
    function's graph; the ``while``/``cond`` body graphs traced in it see it through
    their outer graphs.
    """
    return bool(control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()))


class TFGraphTaps:
    """Getting tensors out of TensorFlow graphs (``tf.function``, with or without XLA).

    Each traced graph has taps of its own, so that two step functions run in one step
    (a GAN's ``d.train_on_batch`` then ``combined.train_on_batch``) each keep the values
    of a layer both run; a clock (a counter every run of a tap and every eager call
    advances) says in which order they came (:func:`in_run_order`).

    Parameters
    ----------
    xla
        Every graph tapped is compiled by XLA (besides those seen tracing under XLA,
        see :func:`in_xla_context`).
    one_function
        Every graph tapped is a trace of one step function (that of a ``fit``, ``evaluate``
        or ``predict``), which may be traced anew within a step: Keras's ``predict`` with
        ``steps_per_execution`` calls its one-batch function once per batch, and traces it
        again for a last, partial batch. Of the taps of one slot that a step wrote, only the
        last written is kept (see :meth:`written`).
    """

    def __init__(self, xla: bool = False, one_function: bool = False) -> None:
        self.xla = xla
        self.one_function = one_function
        self.flags = {c: tf.Variable(False, trainable=False) for c in STEP_COLLECTIONS}
        self._assigned = dict.fromkeys(STEP_COLLECTIONS, False)  # what the flag variables hold
        self._wanted = dict.fromkeys(STEP_COLLECTIONS, False)
        self._step = -1
        self.step = tf.Variable(tf.constant(-1, tf.int64), trainable=False)
        self.clock = tf.Variable(tf.constant(0, tf.int64), trainable=False)
        # by (origin, slot, shape or dtype, replica)
        self.taps: dict[tuple[int, Slot, Any, tuple[int, int]], _TFTap] = {}
        self.skipped: set[str] = set()
        self.rerun: set[str] = set()  # names warned about: a graph run several times in one step wrote them
        self.one_replica: set[str] = set()  # names warned about: a value of one replica (see across_replicas)
        self._origins: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()
        self._serials = itertools.count(EAGER + 1)

    def set_flags(self, wanted: dict[str, bool], step: int) -> None:
        """Before a step: which collections it saves.

        The variables are assigned (only what changed) once a traced graph reads them:
        the step variants of ``fit`` usually have no tap here, and then nothing is assigned.
        """
        self._wanted, self._step = dict(wanted), step
        if self.taps:
            self._assign()

    def _assign(self) -> None:
        for c, w in self._wanted.items():
            if w != self._assigned[c]:
                self.flags[c].assign(w)
                self._assigned[c] = w
        if any(self._wanted.values()):
            self.step.assign(self._step)

    def tap(self, collection: str, items: list[tuple[Slot, Any]]) -> None:
        """Inside a trace: store ``items`` when the collection's flag is set at run time."""
        graph = tf.compat.v1.get_default_graph()
        origin = self._origins.get(graph)
        if origin is None:
            origin = self._origins[graph] = next(self._serials)
        replica = replica_now()
        pairs = []
        for slot, value in items:
            value = tf.convert_to_tensor(value)
            static = self.xla or in_xla_context()
            kept: Any = value
            if static and not value.shape.is_fully_defined():
                if slot.label() not in self.skipped:
                    self.skipped.add(slot.label())
                    logger.warning(
                        "tensortap: %s has no static shape %s under XLA; it is not captured", slot.label(), value.shape
                    )
                if not self.one_function:
                    continue
                kept = None  # a mark: an earlier trace's value of the slot is not this run's
            key = (origin, slot, None if kept is None else tuple(value.shape) if static else value.dtype, replica)
            if key not in self.taps:
                with tf.init_scope():
                    first = not self.taps
                    self.taps[key] = _TFTap(slot, collection, kept, static, origin, _in_loop(graph), replica)
                    if first:  # from now on the flags are read: set them for the step being traced
                        self._assign()
            pairs.append((self.taps[key], value))
        if not pairs:
            return

        def save() -> Any:
            order = tf.convert_to_tensor(self.clock.assign_add(1))
            for t, v in pairs:
                t.save(v, self.step, order)
            return tf.constant(True)

        tf.cond(self.flags[collection], save, lambda: tf.constant(False))

    def tick(self) -> Any:
        """Eagerly: advance the clock; its value now (a tensor, read when the step ends)."""
        self.clock.assign_add(1, read_value=False)
        return self.clock.read_value()

    def forget(self, step: int) -> None:
        """``step`` raised: what its graphs wrote before is none of the step that takes its number next."""
        for t in self.taps.values():
            if t.meta[0] == step:
                t.meta.assign(tf.constant([-1, 0, 0], tf.int64))

    def written(self, step: int, runs: int = 1) -> list[Run]:
        """After a saved step: the values of the taps that step wrote.

        A graph run several times in the step (one ``tf.function`` called twice) wrote
        its taps each time: the last run's values are kept, and one warning says so (naming
        the layers not named by an earlier one), where it ran more than ``runs`` times (the
        batches of a step: ``steps_per_execution``, which Keras's ``predict`` unrolls).
        With ``one_function``, a slot written by several traces in the step (another
        shape: a partial batch) has the value of the last write, none if that was a mark.
        """
        found, rerun = [], {}
        for t in self.taps.values():
            if not self._wanted[t.collection]:
                continue
            at, order, writes = (int(x) for x in t.meta.numpy())
            if at != step:
                continue
            found.append((t, order))
            if writes > runs and not t.looped and t.collection != "metrics" and t.slot.name not in self.rerun:
                rerun[t.slot.name] = writes
        if self.one_function:
            found = list({(t.slot, t.collection, t.replica): (t, o) for t, o in sorted(found, key=_order)}.values())
        if rerun:
            self.rerun.update(rerun)
            names = sorted(rerun)
            logger.warning(
                "tensortap: a compiled function ran %d times in step %d: of %s%s, only the values of its last run "
                "are kept (run each tf.function once per step, or call it eagerly, to keep every run)",
                max(rerun.values()),
                step,
                ", ".join(names[:5]),
                f" and {len(names) - 5} more" if len(names) > 5 else "",
            )
        runs_found = [
            Run(t.slot, t.collection, t.var.value(), t.origin, o, *t.replica) for t, o in found if t.var is not None
        ]
        return across_replicas(runs_found, self.one_replica)


def _order(written: tuple[_TFTap, int]) -> int:
    """The place of a tap's write on the step's clock."""
    return written[1]


def _in_loop(graph: Any) -> bool:
    """Whether ``graph`` is (in) the body of a ``while`` loop (its taps are written once per iteration)."""
    while graph is not None:
        if isinstance(graph, WhileBodyFuncGraph):
            return True
        graph = getattr(graph, "outer_graph", None)
    return False
