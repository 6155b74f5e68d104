"""The framework-neutral capture core that every adapter drives.

The core is driven through four calls::

    hook.begin_step(mode)            # a step starts; returns whether anything is saved
    hook.offer(name, value, colls)   # a tensor is available (cheap no-op if not saved)
    hook.end_step()                  # the step is over: its record goes to the writer
    hook.close()

Framework adapters make these calls through a :class:`tensortap.capture.session.Session`
they own (deferred step close, call numbering, one naming rule) and supply a
:class:`TensorOps` that computes reductions on the framework's device and
copies raw values to host. On a step that is not saved, ``begin_step`` costs
a few comparisons and ``offer`` one attribute test.

Failure policy: a tensor that cannot be captured (its dtype is not numeric,
it is ragged, its framework cannot convert it, its name is not valid
Unicode) is skipped with one warning naming it; the rest of the step and of
the run is still captured. Capture disables itself (training goes on) only
for errors of the capture path itself: storage, disk, the writer.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, ClassVar, NoReturn, Protocol, TypeVar

import numpy as np

from .. import reductions as red
from ..backends import layout
from ..backends.registry import get_storage
from ..backends.shard import StepRecord, TensorRecord
from ..backends.storage import STORAGE_FAILURES
from ..config import (
    BUILTIN_COLLECTIONS,
    TRAINING_DATA,
    Collection,
    ModeSaveConfig,
    ReductionConfig,
    SaveConfig,
    SaveConfigLike,
    check_keys,
    compile_regexes,
)
from ..exceptions import TrialExistsError, no_attribute, suggest
from ..modes import Mode
from ..trial.rules.base import Rule
from . import counting
from .stop import STOP_POLL_SECONDS, StopChannel
from .writer import IfExists, ShardPolicy, TrialWriter, exception_text, logger, register_for_exit

CONFIG_ENV = "TENSORTAP_CONFIG"


SMDEBUG_CONFIG_ENV = "SMDEBUG_CONFIG_FILE_PATH"
SMDEBUG_CONFIG_KEYS = frozenset({"LocalPath", "S3OutputPath", "HookParameters", "CollectionConfigurations"})


def read_json_config(path: str | os.PathLike[str]) -> Any:
    """The parsed content of a JSON configuration file (see :meth:`Hook.from_json`).

    JSON only: nothing is pickled or eval'd. An smdebug configuration (its keys ``LocalPath``,
    ``HookParameters``, ...) is refused with a ``ValueError`` that says so: its keys are not the hook's.
    """
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{_config_file(path)}: not valid JSON ({exc})") from None
    if isinstance(data, dict) and (smdebug := sorted(SMDEBUG_CONFIG_KEYS & set(data))):
        raise ValueError(
            f"{_config_file(path)}: an smdebug (SageMaker Debugger) configuration ({', '.join(smdebug)}): "
            "tensortap's names the hook's arguments (out_dir, save_config, include_collections, ...); "
            "see docs/migrating-from-smdebug.md"
        )
    return data


def _config_file(path: str | os.PathLike[str]) -> str:
    """How errors name a configuration file: ``configuration file 'tensortap.json'``."""
    return f"configuration file {os.fspath(path)!r}"


Built = TypeVar("Built")


def from_config_file(
    path: str | os.PathLike[str],
    kwargs_of: Callable[[Any], dict[str, Any]],
    build: Callable[..., Built],
    overrides: Mapping[str, Any],
) -> Built:
    """What ``build`` makes of the keyword arguments the JSON file ``path`` gives (:meth:`Hook.from_json`).

    Parameters
    ----------
    path
        The configuration file (``TENSORTAP_CONFIG``).
    kwargs_of
        The keyword arguments of the file's parsed JSON, checked (a hook class's ``_kwargs_from_json``).
    build
        A hook class, or an adapter's callback class, called with them.
    overrides
        Keyword arguments given in code (``Hook.from_json(path, out_dir=...)``): they take precedence.

    Raises
    ------
    ValueError
        An invalid field, in the file or found by ``build`` (a ValueError or a TypeError, such as an
        ``out_dir`` that is a number): the message starts with ``configuration file 'path': ``; a missing
        ``out_dir`` (neither in the file nor in ``overrides``) is one. Subclasses of ValueError
        (``TrialExistsError``, the storage's errors: they name the trial) pass unchanged.
    """
    data = read_json_config(path)
    try:
        kwargs = kwargs_of(data) | dict(overrides)
        if "out_dir" not in kwargs:
            raise ValueError("out_dir: missing: the trial's folder or URL; give it in the file or as out_dir=...")
        if not isinstance(kwargs["out_dir"], (str, os.PathLike)):
            raise ValueError(f"out_dir: expected the trial's folder or URL (a string), got {kwargs['out_dir']!r}")
        return build(**kwargs)
    except (ValueError, TypeError) as exc:  # TypeError: a value of the wrong type (``"out_dir": 5``)
        if type(exc) not in (ValueError, TypeError):
            raise
        raise ValueError(f"{_config_file(path)}: {exc}") from None


def config_path() -> str | None:
    """The JSON configuration file ``$TENSORTAP_CONFIG`` names, or None (the adapters' ``from_env``).

    Where only smdebug's ``$SMDEBUG_CONFIG_FILE_PATH`` is set, one warning says that it is not read: a job
    moved from smdebug as it was captured nothing, without a word.
    """
    path = os.environ.get(CONFIG_ENV)
    if not path and os.environ.get(SMDEBUG_CONFIG_ENV):
        logger.warning(
            "tensortap: %s is set but %s is not: tensortap reads its configuration from %s (a JSON file of the "
            "hook's arguments; see docs/migrating-from-smdebug.md); no hook is made from the environment",
            SMDEBUG_CONFIG_ENV,
            CONFIG_ENV,
            CONFIG_ENV,
        )
    return path or None


Prepared = tuple[np.ndarray | None, dict[str, float], str | None]
"""What :meth:`TensorOps.prepare` returns: (raw host array or None, {reduction key: value}, original dtype or None)."""


class Batch(Protocol):
    """Tensors of one step taken where they are (a snapshot on their device), prepared together when the step ends.

    Made by :meth:`TensorOps.batch`, one per hook. The core offers each tensor to
    :meth:`take` first; what it takes, :meth:`deliver` prepares all at once (on a
    GPU: one transfer and one wait a step instead of one of each a tensor).
    """

    def take(self, value: Any, keys: Sequence[str], raw: bool) -> bool:
        """Snapshot ``value`` for :meth:`deliver` and return True, or return False: the core prepares it at once."""
        ...

    def deliver(self) -> list[Prepared | Exception]:
        """What :meth:`TensorOps.prepare` would have returned for each value taken, in the order taken (an
        exception for one that failed), and forget them."""
        ...

    def clear(self) -> None:
        """Forget the values taken (the step is dropped)."""
        ...


class TensorOps:
    """How the core turns one framework's tensors into stored values.

    The default handles NumPy arrays and anything ``numpy.asarray`` accepts.
    Adapters override :meth:`prepare` to reduce on the device before copying,
    and :meth:`histogram` (with :attr:`device_histogram` set) to bin there too.
    """

    #: Whether :meth:`histogram` takes the framework's tensor. When False the core asks
    #: :meth:`prepare` for the raw host array and bins that with NumPy.
    device_histogram: ClassVar[bool] = False

    def histogram(
        self, value: Any, edges: np.ndarray | None, bins: int, defer: bool = False
    ) -> red.Histogram | red.PendingHistogram | None:
        """The histogram of ``value`` over ``edges``; with ``edges=None`` first ``bins`` equal
        bins over its finite range. None if there are no edges to use (no finite value yet).

        Must count as :func:`tensortap.reductions.histogram_counts` does (``edges`` may repeat
        numbers: those fixed from a huge tensor of a small range). With ``defer`` and ``edges``,
        a value binned on the host may be returned as a :class:`~tensortap.reductions.PendingHistogram`
        (a copy of it, into a buffer of :data:`tensortap.capture.counting.COUNTER`), which the
        core hands to the counting thread.
        """
        a = np.asarray(value)
        if edges is None:
            return red.histogram(a, bins, self.bincount)
        if defer:
            out = None
            if a.dtype.kind in "biuf":
                out = counting.COUNTER.buffer(red.bin_dtype(red.dtype_name(a.dtype)), a.size)
            return red.pending_histogram(a, edges, self.bincount, out)
        return red.Histogram(edges, red.histogram_counts(a, edges, self.bincount))

    def bincount(self, codes: np.ndarray, minlength: int) -> np.ndarray:
        """Counts of ``codes`` (non-negative integers) as ``numpy.bincount(codes, minlength=minlength)``
        (int64): the counting step of the NumPy histogram formulas (used where the compiled kernel
        ``tensortap._bins`` was not built), which an adapter may do faster."""
        return np.bincount(codes, minlength=minlength)

    def batch(self) -> Batch | None:
        """A new :class:`Batch` for one hook, or None: every tensor is prepared when it is offered (the default)."""
        return None

    def prepare(self, value: Any, keys: Sequence[str], raw: bool) -> Prepared:
        """Return ``(raw host array or None, {reduction key: value}, original dtype or None)``.

        Parameters
        ----------
        value
            The tensor as the framework gave it.
        keys
            Reduction keys to compute (``"mean"``, ``"abs_max"``, ``"l2"``, ``"nan_count"``, ...).
        raw
            Whether the whole tensor is wanted on the host. The array returned may
            share memory with the framework's tensor: the core copies it into the
            shard buffer before ``offer`` returns, so an extra copy here is waste.
        """
        a, orig = widened(np.asarray(value))
        a = storable(a)
        return (a if raw else None), red.compute_many(a, list(keys)), orig


def widened(a: np.ndarray) -> tuple[np.ndarray, str | None]:
    """``a`` as a shard stores it, and its dtype's name where that is another: the floats NumPy lacks and
    ``ml_dtypes`` adds (``bfloat16``, ``float8_e4m3fn``, ...: dtype kind ``V``) as float32, which holds each
    of their values exactly; any other array as it is, and None."""
    if a.dtype.kind == "V" and red.dtype_name(a.dtype).startswith(("bfloat16", "float8", "float6", "float4")):
        return a.astype(np.float32), red.dtype_name(a.dtype)
    return a, None


def storable(a: np.ndarray) -> np.ndarray:
    """``a`` itself, where a shard can store its dtype (numbers and bool).

    Raises
    ------
    TypeError
        For any other dtype (object, string, datetime...): the core then skips that one tensor.
    """
    if a.dtype.kind not in "biufc":
        raise TypeError(f"cannot store a tensor of dtype {a.dtype} (numeric and bool only)")
    return a


@dataclass(frozen=True)
class _Plan:
    collections: tuple[str, ...]
    keys: tuple[str, ...]
    raw: bool
    histogram: int | tuple[float, ...] | None = None


_Taken = tuple[str, _Plan, Prepared, red.Histogram | red.PendingHistogram | None]
"""An offered tensor ready for the shard buffer: its name, plan, prepared value and histogram."""


def _as_collection(name: str, cfg: Collection | Mapping[str, Any]) -> Collection:
    if isinstance(cfg, Collection):
        return cfg
    if isinstance(cfg, Mapping):
        return Collection(name=name, **dict(cfg))
    raise ValueError(f"collection_configs[{name!r}]: expected a Collection or a dict, got {cfg!r}")


def _with_save_config(given: Collection | Mapping[str, Any], save_config: Any) -> Collection | Mapping[str, Any]:
    """``given`` (a collection configuration), with ``save_config`` when it has none."""
    if isinstance(given, Collection):
        return given if given.save_config is not None else dataclasses.replace(given, save_config=save_config)
    if isinstance(given, Mapping) and given.get("save_config") is None:
        return {**given, "save_config": save_config}
    return given


def _default_rank() -> int:
    for var in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def check_world_size(world_size: object) -> int:
    """``world_size`` as an int if it is an integer >= 1, else ``ValueError``."""
    if isinstance(world_size, bool) or not isinstance(world_size, (int, np.integer)) or world_size < 1:
        raise ValueError(
            f"world_size: expected an integer >= 1 (the number of processes of the training) or None, "
            f"got {world_size!r}"
        )
    return int(world_size)


def collection_names(collections: str | Sequence[str], where: str = "collections") -> tuple[str, ...]:
    """The collection names a user gave: one name, or a sequence of them.

    A string was read letter by letter (``save_tensor("t", v, "custom")`` saved ``t`` in collections ``c``,
    ``u``, ``s``, ...); anything else (smdebug's ``sm_metric=True`` given in that place) raises a ``TypeError``.
    """
    if isinstance(collections, str):
        return (collections,)
    if isinstance(collections, Sequence) and all(isinstance(c, str) for c in collections):
        return tuple(collections)
    raise TypeError(f"{where}: expected a collection name or a list of them, got {collections!r}")


_COLLECTION_CONFIGS = (
    "collection_configs={name: {'include_regex': [...], 'reduction_config': ..., 'save_config': ...}} given to "
    "the hook (docs/migrating-from-smdebug.md)"
)
_GET_HOOK = (
    "keep what made the capture (ttt.capture(...) or ttt.Hook(...), tensortap.keras.Callback(...), "
    "tensortap.xgboost.Callback(...)); Hook.from_env() makes one from TENSORTAP_CONFIG"
)
#: smdebug's names of hook methods that tensortap spells otherwise: the AttributeError says how.
SMDEBUG_HOOK = {
    "get_collection": _COLLECTION_CONFIGS,
    "get_collections": _COLLECTION_CONFIGS,
    "add_to_collection": "hook.save_tensor(name, value, collections=[...]), or an include_regex of collection_configs",
    "wrap_optimizer": "hook.attach_optimizer(optimizer) (PyTorch); the Keras callback needs no wrapped optimizer",
    "export_collections": "nothing: the trial's worker record holds the collections (trial.collections())",
    "create_from_json_file": "Hook.from_env() (TENSORTAP_CONFIG) or Hook.from_json(path)",
    "get_hook": _GET_HOOK,
}
#: smdebug's names in ``smdebug.pytorch`` / ``.tensorflow`` / ``.xgboost`` that tensortap's adapter modules lack.
SMDEBUG_MODULE = {
    "get_hook": _GET_HOOK,
    "SaveConfig": "tensortap.SaveConfig",
    "SaveConfigMode": "one tensortap.SaveConfig per mode: save_config={tensortap.Mode.TRAIN: SaveConfig(...)}",
    "ReductionConfig": "tensortap.ReductionConfig",
    "modes": "tensortap.Mode",
    "CollectionKeys": "the collection names as strings: 'weights', 'gradients', 'losses', ...",
    "KerasHook": "tensortap.keras.Callback",
}


def check_rules(rules: Iterable[object] | None) -> list[Rule]:
    """The in-process rules given as ``rules=``, checked: rule instances, each object once.

    Raises
    ------
    ValueError
        ``rules`` is not a list, or holds something other than a rule instance (a rule's command-line name,
        a rule class, a function), or the same rule object twice; the message names it and says what to write.
    """
    if rules is None:
        return []
    if isinstance(rules, (str, bytes, Rule)) or not isinstance(rules, Iterable):
        raise ValueError(f"rules: expected a list of rule instances, got {rules!r} (write rules=[...])")
    out: list[Rule] = []
    for rule in rules:
        if not isinstance(rule, Rule):
            raise ValueError(f"rules: expected rule instances (e.g. ExplodingTensor()), got {_not_a_rule(rule)}")
        if any(r is rule for r in out):
            raise ValueError(f"rules: {rule!r} is given twice (the same object); give each rule once")
        out.append(rule)
    return out


def _not_a_rule(value: object) -> str:
    """Words for a ``rules=`` entry that is no rule instance, with what to write instead."""
    if isinstance(value, type) and issubclass(value, Rule):
        return f"the class {value.__name__} (write {value.__name__}())"
    if isinstance(value, str):
        from ..trial.rules.builtin import BUILTIN_RULES, rule_class

        try:
            cls = rule_class(value).__name__
        except ValueError:
            return f"the string {value!r}; built-in rules: {', '.join(c.__name__ for c in BUILTIN_RULES.values())}"
        return f"the string {value!r} (write tensortap.rules.{cls}())"
    return repr(value)


def warn_next_run(before: str, earlier: str, model: str, now: str) -> None:
    """The one warning of a callback given the calls of two models (the Keras and Transformers callbacks).

    A run holds one model's steps: the callback that wrote those of ``before`` to ``earlier`` writes those
    of ``model`` (both described, as ``"model 'a'"``) to ``now``, the trial's next run.
    """
    logger.warning(
        "tensortap: this callback wrote the steps of %s to %s, and a run holds one model's steps: those of %s are "
        "written to %s, the trial's next run. Give each model a callback of its own",
        before,
        earlier,
        model,
        now,
    )


def module_attribute_error(module: str) -> Callable[[str], NoReturn]:
    """A module's ``__getattr__``: Python's AttributeError for a name ``module`` lacks, with tensortap's spelling
    of smdebug's names (:data:`SMDEBUG_MODULE`)."""

    def missing(name: str) -> NoReturn:
        raise no_attribute(f"module {module!r}", name, SMDEBUG_MODULE, "smd")

    return missing


class _HookClass(type):
    """The class of :class:`Hook`: smdebug's class attributes (``Hook.create_from_json_file()``) raise an
    AttributeError that names tensortap's spelling (:data:`SMDEBUG_HOOK`), as a hook's attributes do."""

    if not TYPE_CHECKING:  # mypy keeps checking attribute names

        def __getattr__(cls, name: str) -> Any:
            raise no_attribute(f"type object {cls.__name__!r}", name, SMDEBUG_HOOK, "Hook")


class Hook(metaclass=_HookClass):
    """Framework-neutral hook: configuration, step bookkeeping and saving.

    Parameters
    ----------
    out_dir
        Local directory or fsspec URL of the trial.
    save_config
        A :class:`SaveConfig`, or a mapping of :class:`Mode` to SaveConfig.
        Default: every 100 steps (every step for :class:`Writer`).
    reduction_config
        Default :class:`ReductionConfig` for collections without one; ``None``
        saves raw tensors.
    include_collections
        Collections to save; default :attr:`default_collections`.
    include_regex
        Tensors whose name matches one of these are saved too (collection ``custom``).
    save_all
        Save every tensor the adapter offers.
    collection_configs
        ``{name: Collection or {"save_config": ..., "reduction_config": ..., "include_regex": [...]}}``.
        Defines new collections or overrides built-in ones.
    include_workers
        ``"all"`` (every rank writes) or ``"one"`` (rank 0 only).
    rank
        The process's rank; default from ``RANK`` (and MPI/SLURM equivalents), else 0.
    world_size
        The number of processes of the training (ranks ``0 .. world_size - 1``), each of which makes
        a hook: recorded in the worker record so that a reader counts a rank that has not written
        anything yet. Default: not recorded (readers count the workers they see); it is not taken
        from the launcher or the process group, as a script may make its hook on some ranks only,
        and readers would wait for the others for ever. ``rank`` must be below it (a ``ValueError``
        names both). Not recorded with ``include_workers="one"`` (one worker writes the trial).
    strict
        Raise errors of the capture path instead of logging them once and disabling capture, and a
        ``ValueError`` for a step number that does not go up instead of saving nothing of that step.
    shard_policy
        When shards are published (:class:`ShardPolicy`).
    rules
        Rules evaluated in-process on every saved step (see :mod:`tensortap.rules`).
    storage_options
        Passed to fsspec for URLs.
    if_exists
        When ``out_dir`` already holds data of this worker (``worker_<rank>``: a previous
        run, or another process with the same rank): ``"error"`` (default) raises
        :class:`~tensortap.TrialExistsError`; ``"overwrite"`` replaces that worker's data;
        ``"new_run"`` writes every run to ``out_dir/run-<n>`` (then :attr:`out_dir` is that
        folder), so a KFold loop or a grid search keeps every fit. Ranks of one run share a run folder.
    run_id
        Continue the run of an earlier hook of the same training (its :attr:`run_id`, e.g. when
        an adapter's training goes on in a second call): that worker's data is kept and its steps
        go on, whatever ``if_exists`` says: from the last step that any worker of the run recorded,
        so that the ranks of a run resumed together number each step alike. A stop request the run
        before left in the trial (there when this hook starts) is stale: ignored, with one warning
        naming it. Default: a new run.

    Attributes
    ----------
    run_id
        Identifies this run in the worker record and every index record (``None`` when this
        process writes nothing).
    world_size
        The world size the worker record names; None when it names none.
    """

    framework: ClassVar[str] = "numpy"
    default_collections: ClassVar[tuple[str, ...]] = ("weights", "biases", "gradients", "losses", "metrics")
    default_interval: ClassVar[int] = 100
    # per-collection defaults an adapter sets, e.g. a coarser interval for SHAP (see _collection_configs)
    collection_defaults: ClassVar[Mapping[str, Mapping[str, Any]]] = {}
    ops: TensorOps = TensorOps()
    # minimum seconds between two looks for a stop request (class or instance attribute)
    stop_poll_seconds: float = STOP_POLL_SECONDS
    #: Set by an adapter while the step in progress is complete but not yet written (it waits for values
    #: that come after it, or for the next step to record it): at exit, on SIGTERM or after an exception
    #: (:meth:`close_for_exit`) the step is ended by calling it, instead of dropped. Cleared when called.
    end_at_exit: Callable[[], None] | None = None

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        save_config: SaveConfigLike | None = None,
        reduction_config: ReductionConfig | None = None,
        include_collections: Sequence[str] | None = None,
        include_regex: Sequence[str] | None = None,
        save_all: bool = False,
        collection_configs: Mapping[str, Collection | Mapping[str, Any]] | None = None,
        include_workers: str = "all",
        rank: int | None = None,
        world_size: int | None = None,
        strict: bool = False,
        shard_policy: ShardPolicy | None = None,
        rules: Sequence[Rule] | None = None,
        storage_options: Mapping[str, Any] | None = None,
        if_exists: IfExists = "error",
        run_id: str | None = None,
    ) -> None:
        self.strict = bool(strict)
        self.out_dir = os.fspath(out_dir)
        self.save_config = ModeSaveConfig(save_config, SaveConfig(save_interval=self.default_interval))
        if reduction_config is not None and not isinstance(reduction_config, ReductionConfig):
            raise ValueError(f"reduction_config: expected a ReductionConfig or None, got {reduction_config!r}")
        self.reduction_config = reduction_config
        if include_workers not in ("all", "one"):
            raise ValueError(f"include_workers: {include_workers!r} is not valid; valid: 'all', 'one'")
        self.shard_policy = shard_policy or ShardPolicy()
        if not isinstance(self.shard_policy, ShardPolicy):
            raise ValueError(f"shard_policy: expected a ShardPolicy, got {shard_policy!r}")
        self.collections: dict[str, Collection] = {n: Collection(n) for n in BUILTIN_COLLECTIONS}
        for name, given in self._collection_configs(save_config, collection_configs or {}).items():
            self.collections[name] = _as_collection(name, given)
        if include_regex:
            custom = self.collections["custom"]
            self.collections["custom"] = Collection(
                "custom", tuple(include_regex), custom.save_config, custom.reduction_config
            )
        compile_regexes("include_regex", include_regex)
        if isinstance(include_collections, str):
            raise ValueError(f"include_collections: expected a list of names, got the string {include_collections!r}")
        chosen = list(self.collections) if save_all else list(include_collections or self.default_collections)
        if include_regex and "custom" not in chosen:
            chosen.append("custom")
        for name in chosen:
            if name not in self.collections:
                raise ValueError(
                    f"include_collections: {name!r} is not a collection; valid: {', '.join(self.collections)} "
                    "(define new ones with collection_configs)"
                )
        self.save_all = bool(save_all)
        self.included = tuple(dict.fromkeys(chosen))
        self._save_configs = {
            n: ModeSaveConfig(c.save_config, self.save_config.default)
            if c.save_config is not None
            else self.save_config
            for n, c in self.collections.items()
        }
        self._regex_collections = [c for c in self.collections.values() if c.include_regex]
        self.rank = _default_rank() if rank is None else int(rank)
        self.worker = layout.worker_name(self.rank)
        size = None if world_size is None else check_world_size(world_size)
        if size is not None and self.rank >= size:
            raise ValueError(f"rank {self.rank} is not below world_size {size}: ranks go from 0 to world_size - 1")
        self.world_size = None if include_workers == "one" else size
        self.rules = check_rules(rules)
        self.step_listeners: list[Callable[[StepRecord], None]] = []
        self.end_listeners: list[Callable[[], None]] = []  # told once, when the hook closes
        self.mode = Mode.TRAIN
        self.step = -1
        self._step_before = -1  # the global step before the step in progress (drop_step(take_back=True))
        self._dropped: int | None = None  # the step begun last, if it was dropped (not reached: _progress)
        self.mode_steps: dict[Mode, int] = {}
        self.mode_step = -1
        self._active: frozenset[str] = frozenset()
        self._saving = False
        self._in_step = False
        self._refused = False  # the step in progress was given a number not greater than the last (_refuse)
        self._warned_refused = False
        self._records: list[TensorRecord] = []
        self._plans: dict[tuple[str, tuple[str, ...], frozenset[str], bool], _Plan | None] = {}
        # per mode, the first mode step that may be saved once a step saved nothing (inf: none will be)
        self._quiet_until: dict[Mode, float] = {}
        self._offered: set[str] = set()  # names in _records
        # tensors of the step in progress taken by the ops' batch, delivered at its end: (name, plan, histogram)
        self._taken: list[tuple[str, _Plan, red.Histogram | red.PendingHistogram | None]] = []
        self._batch: tuple[TensorOps, Batch | None] | None = None  # the batch of self.ops, made at first use
        self._skipped: set[str] = set()  # tensors that could not be captured (warned once)
        self._histogram_edges: dict[str, np.ndarray] = {}  # fixed per tensor from its first saved value
        self._histogram_unfixed: set[str] = set()  # warned once: no finite value to fix bins from yet
        self._given_at: dict[str, int] = {}  # the saved step each name given (save_tensor, ...) was last given at
        self._never_saved: dict[str, int] = {}  # of the names given at no saved step so far: how many times
        self._rule_named: set[str] = set()  # collections a rule asked for that the hook did not define
        self._warned_regiven: set[str] = set()  # names warned about: given twice in a saved step
        self._failed = False
        self._error: BaseException | None = None
        self.writer: TrialWriter | None = None
        self.run_id: str | None = None
        self.enabled = include_workers == "all" or self.rank == 0
        self.storage = get_storage(self.out_dir, **dict(storage_options or {}))
        # rules may widen what is captured (require_capture), so they attach before the
        # worker record, which lists the collections, is written
        for rule in self.rules:
            rule.attach_to_hook(self)
        self.end_listeners.append(self._warn_unmatched_regexes)
        self.end_listeners.append(self._warn_unfilled_rule_collections)
        if self.enabled:
            try:
                self.writer = TrialWriter(
                    self.storage,
                    self.worker,
                    self.shard_policy,
                    self._worker_info(),
                    self._on_writer_error,
                    if_exists,
                    run_id,
                )
                self.storage, self.out_dir = self.writer.storage, self.writer.storage.url  # new_run: the run folder
                self.run_id = self.writer.run_id
                last, modes = self.writer.recorded  # a continued run numbers on from the steps it recorded
                self.step = max(self.step, last)
                for mode, done in modes.items():
                    self.number_on(Mode(mode), done + 1)
            except TrialExistsError:
                raise
            except Exception as exc:
                self.fail(exc, f"cannot write the trial at {self.out_dir}")
        # after the writer chose the run folder (new_run); a resumed run ignores the requests left before it
        self.stop_channel = StopChannel(self.storage, resumed=run_id is not None)
        register_for_exit(self)

    # ---------------------------------------------------------------- config
    def _worker_info(self) -> dict[str, Any]:
        return {
            "framework": self.framework,
            "format_version": layout.FORMAT_VERSION,
            **({} if self.world_size is None else {"world_size": self.world_size}),
            "save_config": self.save_config.to_json(),
            "collections": {n: self.collections[n].to_json() for n in self.included},
        }

    @classmethod
    def from_json(cls, path: str | os.PathLike[str], **overrides: Any) -> Hook:
        """Build a hook from a JSON file (never pickled or eval'd).

        Keys: ``out_dir``, ``save_config`` (one SaveConfig object, or one per mode name
        plus ``"default"``), ``reduction_config``, ``include_collections``, ``include_regex``,
        ``save_all``, ``collection_configs`` (name to ``{"save_config", "reduction_config",
        "include_regex"}``), ``include_workers``, ``strict``, ``shard_policy``.
        Keyword arguments override the file.
        """
        return from_config_file(path, cls._kwargs_from_json, cls, overrides)

    @classmethod
    def from_env(cls, **overrides: Any) -> Hook | None:
        """Build a hook from the JSON file named by ``TENSORTAP_CONFIG``; None if it is unset (:func:`config_path`)."""
        path = config_path()
        return cls.from_json(path, **overrides) if path else None

    @classmethod
    def _kwargs_from_json(cls, data: Any) -> dict[str, Any]:
        valid = {
            "out_dir",
            "save_config",
            "reduction_config",
            "include_collections",
            "include_regex",
            "save_all",
            "collection_configs",
            "include_workers",
            "strict",
            "shard_policy",
            "if_exists",
        }
        if not isinstance(data, dict):
            raise ValueError(f"config: expected a JSON object, got {type(data).__name__}")
        unknown = set(data) - valid
        if unknown:
            raise ValueError(f"config: unknown key(s) {', '.join(sorted(unknown))}; valid: {', '.join(sorted(valid))}")
        kw = dict(data)
        if "save_config" in kw:
            kw["save_config"] = ModeSaveConfig.from_json(kw["save_config"])
        if kw.get("reduction_config") is not None:
            kw["reduction_config"] = ReductionConfig.from_json(kw["reduction_config"])
        if "collection_configs" in kw:
            configs = kw["collection_configs"]
            if not isinstance(configs, dict):
                raise ValueError(f"collection_configs: expected an object of name to collection, got {configs!r}")
            for n, c in configs.items():
                check_keys(f"collection_configs[{n!r}]", c, {"include_regex", "save_config", "reduction_config"})
            kw["collection_configs"] = {n: Collection.from_json({"name": n, **c}) for n, c in configs.items()}
        if "shard_policy" in kw:
            kw["shard_policy"] = ShardPolicy.from_json(kw["shard_policy"])
        return kw

    # ------------------------------------------------------------------ steps
    def set_mode(self, mode: Mode | str) -> None:
        """Set the mode of the steps that follow."""
        self.mode = Mode.parse(mode)

    def begin_step(self, mode: Mode | str | None = None, step: int | None = None) -> bool:
        """Start the next step and return whether anything is saved at it.

        Parameters
        ----------
        mode
            Mode of this step (default: the current mode).
        step
            Explicit global step number; default: last + 1. One that is not greater than the last
            step is refused (:meth:`_refuse`): the step is in progress until :meth:`end_step` and saves
            nothing, and the numbers and the mode stay as they were.

        Raises
        ------
        ValueError
            With ``strict=True``, if ``step`` is not greater than the last step (a worker saves a step
            once, in order: a shard holding steps out of order or twice is refused by readers, with every
            step in it); nothing changes then.
        """
        given = None if step is None else int(step)
        if given is not None and given <= self.step:
            if self.strict:
                raise ValueError(f"step: {given} is not greater than the last step, {self.step}")
            return self._refuse(given)
        self._take_writer_error()
        self._in_step, self._refused = True, False
        self._drop_step_values()  # of a step that never ended (interrupted)
        if mode is not None:
            self.mode = mode if isinstance(mode, Mode) else Mode.parse(mode)
        self._step_before, self._dropped = self.step, None
        self.step = self.step + 1 if given is None else given
        self.mode_step = self.mode_steps.get(self.mode, -1) + 1
        self.mode_steps[self.mode] = self.mode_step
        return self._decide()

    def _refuse(self, step: int) -> bool:
        """Begin a step given the number ``step``, not greater than the last: it saves nothing (False is
        returned), as saved it would make the worker's shard unreadable (steps out of order or twice) with
        every step in it. It is in progress until :meth:`end_step` or :meth:`drop_step` as any step, but the
        numbers and the mode stay those of the last step. One warning, later cases at INFO: capture never
        stops the training (``strict=True`` raises instead)."""
        self._in_step, self._refused = True, True
        self._drop_step_values()  # of a step that never ended (interrupted)
        self._saving, self._active = False, frozenset()
        log = logger.info if self._warned_refused else logger.warning
        self._warned_refused = True
        log(
            "tensortap: step %d is not greater than the last step, %d: a worker saves each step once and in "
            "order, so nothing of step %d is saved and training goes on; number the steps upward (later cases: "
            "at INFO; strict=True raises)",
            step,
            self.step,
            step,
        )
        return False

    def number_on(self, mode: Mode | str, done: int) -> None:
        """Number the next step of ``mode`` ``done`` (or on from the last, if that is further): the training
        goes on after ``done`` steps of ``mode`` as its framework counts them (resumed from a checkpoint, or
        trained further without the hook), and the captured steps keep the framework's numbers.

        Call it between steps.
        """
        mode = Mode.parse(mode)
        self.mode_steps[mode] = max(self.mode_steps.get(mode, -1), done - 1)

    def _decide(self) -> bool:
        """Decide what the step in progress saves, from its mode and mode step; return whether it saves anything.

        Once a failure disabled capture, a step is still taken for the in-process rules (the step listeners),
        if there are any: it is decided as before and goes to them alone (:meth:`_stage`, :meth:`end_step`).
        """
        if not self.enabled or (self._failed and not self.step_listeners):
            self._saving = False
            return False
        if self.mode_step < self._quiet_until.get(self.mode, 0):  # the cheap path of most unsaved steps
            self._active = frozenset()
            self._saving = False
            return False
        names = self.collections if self.save_all else self.included
        active = frozenset(n for n in names if self._save_configs[n].should_save(self.mode, self.mode_step))
        self._active = active
        self._saving = bool(active)
        if not active:
            later = (self._save_configs[n].next_saved(self.mode, self.mode_step) for n in names)
            self._quiet_until[self.mode] = min((s for s in later if s is not None), default=math.inf)
        return self._saving

    def _warn_unmatched_regexes(self) -> None:
        """At the close: one warning for each saved collection that takes tensors by name (``include_regex``)
        where no tensor offered at a saved step matched, which would leave it empty without a word."""
        offered = sorted({name for name, *_ in self._plans})
        if not offered:
            return
        for c in self._regex_collections:
            if (self.save_all or c.name in self.included) and not any(c.matches(n) for n in offered):
                logger.warning(
                    "tensortap: include_regex %s of collection %r matched none of the %d tensor names offered "
                    "(e.g. %s): nothing was saved in it",
                    list(c.include_regex),
                    c.name,
                    len(offered),
                    ", ".join(map(repr, offered[:5])),
                )

    def _warn_unfilled_rule_collections(self) -> None:
        """At the close: one warning for each collection a rule asked for that the hook does not define and no
        tensor was given to (a misspelled ``collection_names=["losses", "gradiants"]``): the rule judged the
        others alone, without a word (an offline run says it lacks that input)."""
        if not self.enabled or not self._plans:  # no step saved here: nothing to tell of one collection
            return
        offered = {c for _, collections, *_ in self._plans for c in collections}
        for name in sorted(self._rule_named - offered):
            hint = suggest(name, set(self.collections) - self._rule_named).removeprefix("; ")
            logger.warning(
                "tensortap: a rule asked for collection %r, which is none of this hook's, and no tensor was given "
                "to it%s: the rule judged without it",
                name,
                f" ({hint})" if hint else "",
            )

    @property
    def regex_collections(self) -> tuple[Collection, ...]:
        """The collections that take tensors by name (``include_regex``): any tensor may belong to them."""
        return tuple(self._regex_collections)

    def relabel_step(self, mode: Mode | str) -> None:
        """Give the step in progress another mode: it turned out to be something else than it was opened as.

        Its global step number stays; it takes the next step number of ``mode``, and what is saved
        at it is decided again for that mode and step (``save_config`` per mode): if it is not saved
        in ``mode``, the values it took so far are dropped. Values offered before, while it was not
        saved, were never taken.
        """
        mode = Mode.parse(mode)
        if not self._in_step or self._refused or mode == self.mode:
            return
        if self.mode_step == 0:
            self.mode_steps.pop(self.mode, None)
        else:
            self.mode_steps[self.mode] = self.mode_step - 1
        self.mode = mode
        self.mode_step = self.mode_steps.get(mode, -1) + 1
        self.mode_steps[mode] = self.mode_step
        saved = self._saving
        if self._decide() or not saved:
            return
        self._drop_step_values()
        if self.writer is not None:
            self.writer.rollback()

    def is_saving(self, collection: str | None = None) -> bool:
        """Whether the current step is saved (for ``collection``, if given)."""
        if collection is None:
            return self._saving
        return self._saving and collection in self._active

    def _plan(self, name: str, collections: tuple[str, ...], force: bool) -> _Plan | None:
        key = (name, collections, self._active, force)
        if key not in self._plans:
            if not layout.is_unicode(name):  # stored as UTF-8: fail here, not when the whole shard is written
                raise ValueError(f"name: {name!r} is not valid Unicode")
            member = set(collections) | {c.name for c in self._regex_collections if c.matches(name)}
            saved = sorted(member) if force or self.save_all else sorted(member & self._active)
            if not saved:
                self._plans[key] = None
            else:
                keys: dict[str, None] = {}
                raw = False
                histogram: int | tuple[float, ...] | None = None
                for n in saved:
                    rc = self.collections[n].reduction_config if n in self.collections else None
                    rc = rc or self.reduction_config
                    if rc is None:
                        raw = True
                    else:
                        keys.update(dict.fromkeys(rc.keys))
                        raw = raw or rc.saves_raw
                        histogram = histogram if histogram is not None else rc.histogram
                self._plans[key] = _Plan(tuple(sorted(member)), tuple(keys), raw, histogram)
        return self._plans[key]

    def offer(self, name: str, value: Any, collections: str | Sequence[str] = ("custom",), force: bool = False) -> None:
        """Offer a tensor at the current step; it is saved if one of its collections is.

        Parameters
        ----------
        name
            The tensor's name (any string).
        value
            The tensor, in the adapter's framework (see :attr:`ops`).
        collections
            Collections the tensor belongs to (a name, or a list of them).
        force
            Save it on this saved step whatever ``include_collections`` says.
        """
        if not self._saving:
            return
        taken = self._take(name, value, collection_names(collections), force)
        if taken is not None:
            self._stage([taken])

    def offer_many(self, items: Iterable[tuple[str, Any, tuple[str, ...]]]) -> None:
        """Offer ``(name, value, collections)`` tensors, as :meth:`offer` one after the other would.

        For the tensors an adapter offers together (a model's parameters, their gradients): they go
        into the shard buffer at once, under one hold of the writer's lock, which saves a tenth to a
        quarter of what a small tensor costs the training thread (``bench/profiles/torch.md``, session 42).
        """
        if not self._saving:
            return
        self._stage([one for name, value, colls in items if (one := self._take(name, value, colls, False)) is not None])

    def _take(self, name: str, value: Any, collections: tuple[str, ...], force: bool) -> _Taken | None:
        """Plan and prepare one offered tensor of a saved step; None when it is not saved, was skipped, or
        the device batch took it (delivered at the step's end)."""
        try:
            plan = self._plan(name, collections, force)
            if plan is None:
                return None
            on_host = plan.histogram is not None and not self.ops.device_histogram
            hist = None
            if plan.histogram is not None and not on_host:  # binned where the tensor is
                hist = self._histogram(name, value, plan.histogram)
            batch = self._ops_batch()
            if not on_host and batch is not None and batch.take(value, plan.keys, plan.raw):
                self._taken.append((name, plan, hist))
                return None
            if self._taken and any(n == name for n, _, _ in self._taken):  # its earlier value first: the last wins
                self._deliver()
            raw, values, orig = self.ops.prepare(value, plan.keys, plan.raw or on_host)
            if raw is not None:  # whatever an adapter's ops made of it: one odd value must not end the capture
                storable(raw)
            if on_host and plan.histogram is not None:  # binned from the host copy, kept only if it is saved
                hist = self._histogram(name, raw, plan.histogram)
                raw = raw if plan.raw else None
        except Exception as exc:  # this tensor cannot be captured; the others can
            self._skip(name, exc)
            return None
        return name, plan, (raw, values, orig), hist

    def _stage(self, taken: Sequence[_Taken]) -> None:
        """Copy prepared tensors into the writer's shard buffer and keep their records for the step's end.

        Once a failure disabled capture, they are kept for the in-process rules alone, their raw values
        copied (a prepared value may share the framework's memory)."""
        if not taken or not self._saving:
            return
        stored: list[Any]
        if self._failed:
            stored = [None if raw is None else np.array(raw) for _, _, (raw, _, _), _ in taken]
        else:
            assert self.writer is not None
            entries = [(name, plan.collections, *prepared, hist) for name, plan, prepared, hist in taken]
            try:
                stored = self.writer.stage(self.step, entries)
            except Exception as exc:
                first = taken[0][0]
                what = f"tensor {first!r}" if len(taken) == 1 else f"{len(taken)} tensors from {first!r} on"
                self.fail(exc, f"cannot buffer {what} at step {self.step}")
                return
        for (name, plan, (_, values, orig), hist), raw in zip(taken, stored, strict=True):
            record = TensorRecord(name, plan.collections, raw, values, orig, hist)
            if name in self._offered:  # offered again in this step: the last value wins
                self._records = [r for r in self._records if r.name != name]
            self._offered.add(name)
            self._records.append(record)

    def _ops_batch(self) -> Batch | None:
        """The batch of :attr:`ops` (made the first time: an adapter or a test may replace ``ops``)."""
        if self._batch is None or self._batch[0] is not self.ops:
            if self._batch is not None and self._batch[1] is not None:
                self._deliver()  # taken by the ops replaced
            self._batch = (self.ops, self.ops.batch())
        return self._batch[1]

    def _deliver(self) -> None:
        """Stage the tensors the batch took during this step, in the order they were offered."""
        if not self._taken or self._batch is None or self._batch[1] is None:
            return
        taken, self._taken = self._taken, []
        try:
            delivered = self._batch[1].deliver()
        except Exception as exc:  # the batch's own failure: its tensors are skipped, not the run
            delivered = [exc] * len(taken)
        ready: list[_Taken] = []  # staged together, up to a tensor the batch could not prepare
        for (name, plan, hist), prepared in zip(taken, delivered, strict=True):
            if isinstance(prepared, Exception):
                self._stage(ready)  # those offered before it first
                ready = []
                self._skip(name, prepared)
            else:
                ready.append((name, plan, prepared, hist))
        self._stage(ready)

    def _drop_step_values(self) -> None:
        """Forget what the step in progress saved so far."""
        self._records = []
        self._offered = set()
        self._taken = []
        if self._batch is not None and self._batch[1] is not None:
            self._batch[1].clear()

    def _skip(self, name: str, exc: BaseException) -> None:
        if self.strict:
            raise RuntimeError(f"tensortap: cannot capture tensor {name!r} at step {self.step}: {exc}") from exc
        if name not in self._skipped:
            self._skipped.add(name)
            logger.warning("tensortap: %s cannot be captured and is skipped: %s", name, exc)

    def _histogram(
        self, name: str, value: Any, spec: int | tuple[float, ...]
    ) -> red.Histogram | red.PendingHistogram | None:
        """The histogram of ``value``, on bins fixed for ``name`` by its first value (or ``spec``'s edges).

        Once the bins are fixed, a value binned on the host is taken as a
        :class:`~tensortap.reductions.PendingHistogram`, handed to the counting thread
        (:mod:`tensortap.capture.counting`) at the step's end, unless step listeners want it
        now or that thread already holds its limit of values.
        """
        edges = self._histogram_edges.get(name)
        if edges is None and not isinstance(spec, int):
            edges = np.asarray(spec, dtype=np.float64)
        bins = spec if isinstance(spec, int) else len(spec) - 1
        defer = not self.step_listeners and counting.COUNTER.has_room()  # else counted now: backpressure
        hist = self.ops.histogram(value, edges, bins, defer=defer)
        if hist is not None:
            self._histogram_edges.setdefault(name, hist.edges)
        elif name not in self._histogram_unfixed:
            self._histogram_unfixed.add(name)
            logger.warning(
                "tensortap: no histogram of %r at step %d: no finite value to fix its bins from "
                "(they are fixed at its first step that has one)",
                name,
                self.step,
            )
        return hist

    def save_tensor(self, name: str, value: Any, collections: str | Sequence[str] = ("custom",)) -> None:
        """Save ``value`` under ``name`` on the current step if it is saved, whatever the collections (a name,
        or a list of them)."""
        self.note_given(name)
        self.offer(name, value, collection_names(collections), force=True)

    def note_given(self, name: str) -> None:
        """A value was given for ``name`` (``save_tensor``, ``save_scalar``) at the current step: a name given
        only at steps that are not saved is named when the hook closes (:meth:`_warn_never_saved`); one given
        twice in a saved step, whose last value alone is kept, in one warning."""
        if self._saving:
            self._never_saved.pop(name, None)
            if self._given_at.get(name) == self.step and name not in self._warned_regiven:
                self._warned_regiven.add(name)
                logger.warning(
                    "tensortap: %s was given more than once in step %d: only its last value in a step is kept "
                    "(give each value a name of its own to keep them all)",
                    name,
                    self.step,
                )
            self._given_at[name] = self.step
        elif name not in self._given_at:
            self._never_saved[name] = self._never_saved.get(name, 0) + 1

    def _warn_never_saved(self) -> None:
        """One warning naming the values given that fell on no saved step: none of them is in the trial."""
        if not self._never_saved or self._failed or not self.enabled:
            return
        given = sorted(self._never_saved.items())
        logger.warning(
            "tensortap: %s%s fell on no saved step: none of their values is in the trial (a value belongs to the "
            "step it is given in, which the save config may not save: after an evaluation loop, its last EVAL "
            "step; give it at a saved step, or save more steps of that mode)",
            ", ".join(f"{name} (given {n} time{'s' if n > 1 else ''})" for name, n in given[:5]),
            f" and {len(given) - 5} more" if len(given) > 5 else "",
        )
        self._never_saved.clear()

    def save_scalar(self, name: str, value: Any, collections: str | Sequence[str] = ("metrics",)) -> None:
        """Save a scalar as ``<first collection>/<name>`` on the current step if it is saved (``collections``:
        a name, or a list of them)."""
        colls = collection_names(collections) or ("metrics",)
        self.save_tensor(f"{colls[0]}/{name}", np.array(value), colls)

    def end_step(self) -> None:
        """End the current step and hand its record to the writer."""
        self._in_step = self._refused = False
        if not self._saving:
            return
        self._deliver()
        self._saving = False
        records, self._records = self._records, []
        self._offered = set()
        if not records:
            return
        if self.step_listeners:
            self._tell_listeners(records)
        if self._failed or self.writer is None:  # capture is disabled: the step was taken for the rules alone
            return
        pending = [r.histogram for r in records if isinstance(r.histogram, red.PendingHistogram)]
        # The records' values are views of the shard buffer's rows. Dropped before the hand-off: a shard
        # the writer thread publishes before this returns could not give its arrays back to the pool
        # otherwise (BufferPool.put refuses an array still viewed), and the next shard's would be fresh
        # memory, its first touch paid on the training thread (bench/profiles/torch.md, session 15).
        del records
        self.writer.commit(self.step, int(self.mode), self.mode_step)
        counting.COUNTER.submit(pending)
        self._raise_if_strict()

    def _tell_listeners(self, records: list[TensorRecord]) -> None:
        """Hand the step's record to the step listeners (its pending histograms counted first)."""
        for r in records:
            if r.histogram is not None:
                r.histogram = red.resolved(r.histogram)  # a listener added within the step
        record = StepRecord(self.step, int(self.mode), self.mode_step, records)
        for listener in self.step_listeners:
            listener(record)

    def drop_step(self, why: BaseException | None, *, take_back: bool = False) -> None:
        """Drop the step in progress, which ``why`` interrupted: nothing of it is written; the run goes on.

        The step keeps its number (the next step is the one after it) unless ``take_back``. One
        warning names it when it was saved (values of it were about to be written) and ``why`` is given.

        Parameters
        ----------
        why
            The exception that left the step; None when the step did not happen for a reason that is
            no failure (its framework had no batch left for it): no warning.
        take_back
            Give the step's numbers (global and of its mode) to the next step: for a framework that
            does not count a step that failed.
        """
        if not self._in_step:
            return
        if self._refused:  # it took no number, nor anything else
            self._forget_step()
            return
        if self._saving and why is not None:
            logger.warning(
                "tensortap: step %d was interrupted by %s and is dropped: nothing of it is saved",
                self.step,
                exception_text(why),
            )
        self._forget_step()
        if take_back:
            self.step = self._step_before
            self.mode_step -= 1
            self.mode_steps[self.mode] = self.mode_step
        else:
            self._dropped = self.step

    def _forget_step(self) -> None:
        """Forget the step in progress, also what the writer staged of it."""
        self._in_step = self._refused = False
        self._saving = False
        self._drop_step_values()
        if self.writer is not None:
            self.writer.rollback()

    @contextmanager
    def stepping(self, mode: Mode | str | None = None, step: int | None = None) -> Iterator[bool]:
        """``with hook.stepping(): ...`` brackets one step; yields whether it is saved.

        A block left by an exception (``KeyboardInterrupt`` included) did not finish its step: the
        step is dropped (:meth:`drop_step`) and the exception goes on; the run stays open.

        Parameters
        ----------
        mode
            Mode of the step (default: the current mode).
        step
            Explicit global step number; default: last + 1. One not greater than the last step is
            refused: the block runs and nothing of it is saved, with a warning (:meth:`begin_step`;
            ``strict=True`` raises a ``ValueError`` before the block).
        """
        saving = self.begin_step(mode, step)
        try:
            yield saving
        except BaseException as exc:
            self.drop_step(exc)
            raise
        self.end_step()

    def _collection_configs(
        self, save_config: SaveConfigLike | None, given: Mapping[str, Collection | Mapping[str, Any]]
    ) -> dict[str, Collection | Mapping[str, Any]]:
        """The collection configurations: ``given``, with :attr:`collection_defaults` where they apply.

        The defaults apply only when no ``save_config`` is given (an explicit ``save_config``
        is for every collection without a configuration of its own); a configuration given
        without a ``save_config`` keeps the default's.
        """
        if save_config is not None:
            return dict(given)
        configs: dict[str, Collection | Mapping[str, Any]] = {}
        for name, default in self.collection_defaults.items():
            own = given.get(name)
            configs[name] = (
                Collection(name, **dict(default)) if own is None else _with_save_config(own, default.get("save_config"))
            )
        return {**given, **configs}

    def require_capture(self, collection: str, reductions: Sequence[str] = (), raw: bool = False) -> None:
        """Make sure ``collection`` is saved with these reduction keys (and the raw tensor if ``raw``).

        Used by rules attached with ``Hook(rules=[...])``. Adds the collection to the
        included ones and widens its reduction configuration; when its tensors are
        already saved raw, every reduction is computable and nothing changes.

        Parameters
        ----------
        collection
            A collection name; unknown names are defined as new, empty collections.
        reductions
            Reduction keys such as ``"abs_mean"``, ``"l2"`` or ``"nan_count"``.
        raw
            Whether the rule needs the raw tensor.

        Raises
        ------
        UnknownName
            A reduction key names no reduction (a ``ValueError``; the message suggests the closest).
        """
        for key in reductions:
            red.check_key(key)
        if collection not in self.collections and collection != TRAINING_DATA:
            self._rule_named.add(collection)
        current = self.collections.get(collection) or Collection(collection)
        rc = current.reduction_config or self.reduction_config
        if rc is not None:
            plain = [red.split_key(k)[0] for k in reductions if not red.split_key(k)[1]]
            absolute = [red.split_key(k)[0] for k in reductions if red.split_key(k)[1]]
            rc = ReductionConfig(
                reductions=tuple(dict.fromkeys([*rc.reductions, *(r for r in plain if r not in red.NORMS)])),
                abs_reductions=tuple(dict.fromkeys([*rc.abs_reductions, *(r for r in absolute if r not in red.NORMS)])),
                norms=tuple(dict.fromkeys([*rc.norms, *(r for r in plain if r in red.NORMS)])),
                abs_norms=tuple(dict.fromkeys([*rc.abs_norms, *(r for r in absolute if r in red.NORMS)])),
                save_raw_tensor=rc.save_raw_tensor or raw,
            )
        self.collections[collection] = Collection(collection, current.include_regex, current.save_config, rc)
        if collection not in self._save_configs:
            self._save_configs[collection] = self.save_config
        self._regex_collections = [c for c in self.collections.values() if c.include_regex]
        if not self.save_all and collection not in self.included:
            self.included = (*self.included, collection)
        self._plans.clear()
        self._quiet_until.clear()

    # --------------------------------------------------------------- control
    def request_stop(self, reason: str, **details: Any) -> None:
        """Write a stop request into the trial (as :meth:`tensortap.Trial.request_stop` does) and see it at once.

        Used by in-process rules; :attr:`should_stop` is true from now on.
        """
        self.stop_channel.request(reason, **details)

    @property
    def should_stop(self) -> bool:
        """True once a stop request was written into the trial.

        The trial is polled at most every :attr:`stop_poll_seconds` (default 1).
        """
        return self.stop_channel.poll(self.stop_poll_seconds)

    @property
    def stop_reason(self) -> str | None:
        """The reason given by the stop request, once :attr:`should_stop` is true."""
        return self.stop_channel.reason

    # -------------------------------------------------------------- failures
    def fail(self, exc: BaseException, context: str) -> None:
        """An error of the capture path: log it once and disable capture (raise it with ``strict=True``).

        Training goes on; the step in progress is dropped. In-process rules go on: the steps that would
        have been saved are still taken for them (:meth:`_decide`), and nothing more is written.
        """
        if self.strict:
            raise RuntimeError(f"tensortap: {context}: {exc}") from exc
        if not self._failed:
            logger.error(
                "tensortap: %s: %s; capture is disabled, training continues%s",
                context,
                exc,
                "; the in-process rules go on judging the steps it would have saved" if self.step_listeners else "",
                exc_info=None if isinstance(exc, STORAGE_FAILURES) else exc,  # those name their cause: no traceback
            )
        self._failed = True
        self._saving = False
        self._drop_step_values()
        if self.writer is not None:
            self.writer.disable(*self._progress(), f"{context}: {exc}")  # publishes, then the end marker

    _fail = fail  # the name the XGBoost adapter still uses

    def _on_writer_error(self, exc: BaseException) -> None:
        """On the writer's thread: a publish failed; the training thread turns capture off at its next step,
        flush or close (:meth:`_take_writer_error`), not in the middle of a step it is saving."""
        self._error = exc

    def _take_writer_error(self) -> bool:
        """On the training thread: a publish failed (:meth:`_on_writer_error`): capture is turned off now
        (with ``strict=True``, the error is raised by :meth:`flush` and :meth:`close`); whether it was."""
        if self._error is None or self._failed or self.strict:
            return False
        self.fail(self._error, f"cannot publish a shard to {self.out_dir}")
        return True

    def _raise_if_strict(self) -> None:
        if self.strict and self._error is not None:
            exc, self._error = self._error, None
            raise RuntimeError(f"tensortap: cannot publish a shard to {self.out_dir}: {exc}") from exc

    @property
    def failed(self) -> bool:
        """True once capture disabled itself after an error."""
        return self._failed

    # --------------------------------------------------------------- closing
    def flush(self) -> None:
        """Publish everything saved so far (a partial shard) and wait for it."""
        if self.writer is not None:
            self.writer.flush()
            if self._take_writer_error():
                self.writer.drain()  # the end marker the failure wrote, as readers see it before flush returns
            self._raise_if_strict()

    def close(self, reason: str = "closed") -> None:
        """Publish what is left and mark this worker's training as ended. Idempotent."""
        if self._in_step:
            self.end_step()
        if self.writer is not None and self.stop_channel.requested and reason == "closed":
            reason = "stop_request"
        self._close_writer(reason)
        self._raise_if_strict()

    def close_for_exit(self, reason: str, error: str | None = None) -> None:
        """Close at interpreter exit, on SIGTERM or after an exception, dropping a step still in progress.

        A step that :attr:`end_at_exit` says is complete is ended by it first.

        Parameters
        ----------
        reason
            The end reason: ``exit``, ``sigterm``, ``exception``.
        error
            The exception's ``"Type: message"``, for the end marker's ``error``.
        """
        end, self.end_at_exit = self.end_at_exit, None
        if end is not None and self._in_step:
            try:
                end()
            except Exception:  # closing: report, and still close
                logger.exception("tensortap: writing step %d, which had ended, at %s failed", self.step, reason)
        self.drop_step(None)  # a step in progress: not reached (_progress)
        self._forget_step()
        self._close_writer(reason, error)

    def _progress(self) -> tuple[int | None, dict[str, int]]:
        """The last step reached and the last step of each mode, for the end marker. A step dropped last
        was not: the trial has no such step, and readers say the training ended before it."""
        step, modes = self.step, dict(self.mode_steps)
        if self._dropped is not None and self._dropped == step:
            step = self._step_before
            if modes.get(self.mode) == self.mode_step:
                modes[self.mode] -= 1
        return (step if step >= 0 else None), {m.name: s for m, s in modes.items() if s >= 0}

    def _close_writer(self, reason: str, error: str | None = None) -> None:
        self._take_writer_error()
        self._warn_never_saved()
        listeners, self.end_listeners = self.end_listeners, []
        for listener in listeners:
            listener()
        if self.writer is not None:
            self.writer.close(reason, *self._progress(), error=error)
            self._take_writer_error()  # a publish the close waited for failed

    if not TYPE_CHECKING:  # mypy keeps checking attribute names

        def __getattr__(self, name: str) -> Any:
            raise no_attribute(f"{type(self).__name__!r} object", name, SMDEBUG_HOOK, "hook")

    def __enter__(self) -> Hook:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        """Close: reason ``closed`` when the block ended (or a Ctrl-C left it), else ``exception`` with its
        text; a step the exception (or the Ctrl-C) interrupted is dropped, as the exit handlers do."""
        if value is None:
            self.close()
        elif isinstance(value, KeyboardInterrupt):
            self.drop_step(value)
            self.close()
        else:
            self.close_for_exit("exception", exception_text(value))


class Writer(Hook):
    """Capture from plain NumPy, without a framework.

    Saves every step by default and every collection offered::

        with tensortap.capture.Writer("/tmp/run") as w:
            for step in range(10):
                with w.stepping():
                    w.save("losses/loss", np.float32(loss), collections=["losses"])
    """

    default_interval = 1

    def __init__(self, out_dir: str | os.PathLike[str], **kwargs: Any) -> None:
        if "include_collections" not in kwargs and not kwargs.get("include_regex"):
            kwargs.setdefault("save_all", True)
        super().__init__(out_dir, **kwargs)

    def save(self, name: str, value: Any, collections: str | Sequence[str] = ("custom",)) -> None:
        """Offer ``value`` under ``name`` at the current step (see :meth:`Hook.offer`)."""
        if not self._in_step:
            raise RuntimeError("Writer.save: no step is open; call begin_step() or use `with writer.stepping():`")
        self.offer(name, value, collections)
