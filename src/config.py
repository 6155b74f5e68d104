"""What to save and when: SaveConfig, ReductionConfig, Collection.

Invalid values raise :class:`ValueError` at construction with a message that
names the field, the value and what would be valid.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeAlias

from .modes import Mode
from .reductions import HEALTH_COUNTS, MAX_BINS, NORMS, REDUCTIONS, check_edges, reduction_key

DEFAULT_SAVE_INTERVAL = 100

BUILTIN_COLLECTIONS = (
    "weights",
    "biases",
    "gradients",
    "outputs",
    "inputs",
    "losses",
    "metrics",
    "optimizer_variables",
    "hyperparameters",
    "feature_importance",
    "predictions",
    "labels",
    "average_shap",
    "full_shap",
    "trees",
    "custom",
)
# a marker collection: an adapter also puts there the losses and metrics computed on the
# training data itself, so that rules tell them from validation ones whatever their names
TRAINING_DATA = "training_data"


# the keys of a SaveConfig in JSON, and those of a save_config given per mode (mode names, in any case)
SAVE_CONFIG_KEYS = ("save_interval", "start_step", "end_step", "save_steps")
MODE_KEYS = ("default", *Mode.__members__)


def _check_int(field_name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{field_name}: expected an integer >= {minimum}, got {value!r}")
    return value


@dataclass(frozen=True)
class SaveConfig:
    """When to save.

    A step ``s`` (the mode step: steps are counted per mode) is saved when
    ``start_step <= s < end_step`` and ``(s - start_step) % save_interval == 0``,
    or when ``s`` is in ``save_steps``.

    Parameters
    ----------
    save_interval
        Save every this many steps (default 100, so that the default is cheap).
    start_step
        First step that may be saved.
    end_step
        First step that is no longer saved by the interval (``None``: no end).
    save_steps
        Steps saved in addition, whatever the interval says.
    """

    save_interval: int = DEFAULT_SAVE_INTERVAL
    start_step: int = 0
    end_step: int | None = None
    save_steps: frozenset[int] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        _check_int("save_interval", self.save_interval, 1)
        _check_int("start_step", self.start_step, 0)
        if self.end_step is not None:
            _check_int("end_step", self.end_step, 0)
            if self.end_step <= self.start_step:
                raise ValueError(f"end_step: must be greater than start_step={self.start_step}, got {self.end_step}")
        steps = self.save_steps if self.save_steps is not None else ()
        if not isinstance(steps, Iterable) or isinstance(steps, (str, bytes)):
            raise ValueError(f"save_steps: expected a list of integers >= 0, got {steps!r}")
        for s in steps:
            _check_int("save_steps", s, 0)
        object.__setattr__(self, "save_steps", frozenset(steps))

    def should_save(self, step: int) -> bool:
        """Return whether ``step`` is saved."""
        if step in self.save_steps:
            return True
        if step < self.start_step or (self.end_step is not None and step >= self.end_step):
            return False
        return (step - self.start_step) % self.save_interval == 0

    def next_saved(self, step: int) -> int | None:
        """Return the first step from ``step`` on that is saved (``None``: no later step is)."""
        later = [s for s in self.save_steps if s >= step]
        first = max(step, self.start_step)
        first += -(first - self.start_step) % self.save_interval
        if self.end_step is None or first < self.end_step:
            later.append(first)
        return min(later, default=None)

    def to_json(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict (inverse of :meth:`from_json`)."""
        return {
            "save_interval": self.save_interval,
            "start_step": self.start_step,
            "end_step": self.end_step,
            "save_steps": sorted(self.save_steps),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any], field_name: str = "save_config") -> SaveConfig:
        """Build from a dict such as one :meth:`to_json` returned (``field_name``: how errors name it)."""
        check_keys(field_name, data, set(SAVE_CONFIG_KEYS))
        return cls(**dict(data))


SaveConfigLike: TypeAlias = "SaveConfig | Mapping[Mode, SaveConfig] | Mapping[str, SaveConfig] | ModeSaveConfig"


class ModeSaveConfig:
    """A SaveConfig per mode; modes not given use the default one."""

    def __init__(self, config: SaveConfigLike | None = None, default: SaveConfig | None = None) -> None:
        self.default = default or SaveConfig()
        self.by_mode: dict[Mode, SaveConfig] = {}
        if config is None:
            return
        if isinstance(config, SaveConfig):
            self.default = config
            return
        if isinstance(config, ModeSaveConfig):
            self.default, self.by_mode = config.default, dict(config.by_mode)
            return
        if not isinstance(config, Mapping):
            raise ValueError(f"save_config: expected a SaveConfig or a mapping of Mode to SaveConfig, got {config!r}")
        for mode, cfg in config.items():
            if not isinstance(cfg, SaveConfig):
                raise ValueError(f"save_config[{mode!r}]: expected a SaveConfig, got {cfg!r}")
            self.by_mode[Mode.parse(mode)] = cfg

    def for_mode(self, mode: Mode) -> SaveConfig:
        """Return the SaveConfig that applies to ``mode``."""
        return self.by_mode.get(mode, self.default)

    def should_save(self, mode: Mode, mode_step: int) -> bool:
        """Return whether mode step ``mode_step`` of ``mode`` is saved."""
        return self.for_mode(mode).should_save(mode_step)

    def next_saved(self, mode: Mode, mode_step: int) -> int | None:
        """Return the first mode step of ``mode`` from ``mode_step`` on that is saved (``None``: none is)."""
        return self.for_mode(mode).next_saved(mode_step)

    def to_json(self) -> dict[str, Any]:
        """Return ``{"default": {...}, "TRAIN": {...}, ...}``."""
        out = {"default": self.default.to_json()}
        out.update({m.name: c.to_json() for m, c in self.by_mode.items()})
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ModeSaveConfig:
        """Accept either one SaveConfig dict or one per mode: ``{"default": ..., "TRAIN": ...}`` (any case).

        Raises
        ------
        ValueError
            For a key of neither form, or keys of both; the message lists the keys of both forms.
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"save_config: expected an object, got {data!r}")
        modes = [k for k in data if k == "default" or (isinstance(k, str) and k.upper() in Mode.__members__)]
        wrong = [k for k in data if k not in (modes or SAVE_CONFIG_KEYS)]
        if wrong:
            problem = f"unknown key(s) {', '.join(wrong)}"
            if modes:
                problem = f"{', '.join(map(repr, wrong))} beside the mode name(s) {', '.join(modes)}: not a mode name"
            raise ValueError(
                f"save_config: {problem}; valid: either the keys of one SaveConfig for every mode "
                f"({', '.join(SAVE_CONFIG_KEYS)}), or mode names ({', '.join(MODE_KEYS)}) each with its "
                "SaveConfig, not both"
            )
        if not modes:
            return cls(SaveConfig.from_json(data))
        default = SaveConfig.from_json(data.get("default", {}), "save_config['default']")
        by_mode = {
            Mode.parse(k): SaveConfig.from_json(v, f"save_config[{k!r}]") for k, v in data.items() if k != "default"
        }
        return cls(by_mode, default)


def _check_names(field_name: str, values: Sequence[str] | None, valid: Sequence[str]) -> tuple[str, ...]:
    if values is None:
        return ()
    if isinstance(values, str):
        raise ValueError(f"{field_name}: expected a list of names, got the string {values!r}")
    for v in values:
        if v not in valid:
            raise ValueError(f"{field_name}: {v!r} is not valid; valid: {', '.join(valid)}")
    return tuple(values)


@dataclass(frozen=True)
class ReductionConfig:
    """Which reductions of a tensor to save, and whether to save the tensor itself.

    Parameters
    ----------
    reductions
        From ``min max mean std variance sum prod`` and the health counts
        ``nan_count inf_count zero_count``.
    abs_reductions
        The same reductions computed on the absolute values (stored as ``abs_<name>``).
    norms
        ``l1`` (sum of absolute values) and/or ``l2`` (square root of the sum of squares),
        element-wise over the whole tensor.
    abs_norms
        Norms of the absolute values (equal to ``norms``; kept for smdebug compatibility).
    save_raw_tensor
        Also save the full tensor. When no reduction is asked for, the raw tensor
        is always saved.
    histogram
        Also save a histogram of the tensor's finite values at every saved step,
        read back as ``(edges, counts)`` (:meth:`tensortap.Tensor.histogram_value`):
        a number of equal bins (e.g. ``64``) over the range of the first value
        saved, then fixed for that tensor, or explicit bin edges. Values outside
        the fixed range count in the first or last bin.
    """

    reductions: tuple[str, ...] = ()
    abs_reductions: tuple[str, ...] = ()
    norms: tuple[str, ...] = ()
    abs_norms: tuple[str, ...] = ()
    save_raw_tensor: bool = False
    histogram: int | tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "reductions", _check_names("reductions", self.reductions, REDUCTIONS + HEALTH_COUNTS))
        object.__setattr__(self, "abs_reductions", _check_names("abs_reductions", self.abs_reductions, REDUCTIONS))
        object.__setattr__(self, "norms", _check_names("norms", self.norms, NORMS))
        object.__setattr__(self, "abs_norms", _check_names("abs_norms", self.abs_norms, NORMS))
        if not isinstance(self.save_raw_tensor, bool):
            raise ValueError(f"save_raw_tensor: expected True or False, got {self.save_raw_tensor!r}")
        object.__setattr__(self, "histogram", _check_histogram(self.histogram))

    @property
    def keys(self) -> tuple[str, ...]:
        """Stored keys of every reduction asked for, e.g. ``("mean", "abs_max", "l2")``."""
        keys = [reduction_key(r) for r in self.reductions + self.norms]
        keys += [reduction_key(r, abs=True) for r in self.abs_reductions + self.abs_norms]
        return tuple(dict.fromkeys(keys))

    @property
    def saves_raw(self) -> bool:
        """Whether the raw tensor is saved (asked for, or neither a reduction nor a histogram asked for)."""
        return self.save_raw_tensor or (not self.keys and self.histogram is None)

    def to_json(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict."""
        out: dict[str, Any] = {
            "reductions": list(self.reductions),
            "abs_reductions": list(self.abs_reductions),
            "norms": list(self.norms),
            "abs_norms": list(self.abs_norms),
            "save_raw_tensor": self.save_raw_tensor,
        }
        if self.histogram is not None:
            out["histogram"] = self.histogram if isinstance(self.histogram, int) else list(self.histogram)
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ReductionConfig:
        """Build from a dict such as one :meth:`to_json` returned."""
        check_keys(
            "reduction_config",
            data,
            {"reductions", "abs_reductions", "norms", "abs_norms", "save_raw_tensor", "histogram"},
        )
        kwargs: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**kwargs)


def _check_histogram(value: Any) -> int | tuple[float, ...] | None:
    """``None``, a number of bins (1 to MAX_BINS) or a tuple of bin edges; a ValueError naming the field else."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_BINS:
        return value
    if not isinstance(value, (int, str, bytes)) and isinstance(value, Iterable):
        try:
            return tuple(float(e) for e in check_edges(list(value)))
        except (TypeError, ValueError):
            pass
    raise ValueError(
        f"histogram: expected a number of bins (1 to {MAX_BINS}) or a list of 2 to {MAX_BINS + 1} finite, "
        f"strictly increasing edges, got {value!r}"
    )


def compile_regexes(field_name: str, patterns: Sequence[str] | str | None) -> tuple[re.Pattern[str], ...]:
    """Compile ``patterns``, raising a ValueError that names the bad one."""
    if patterns is None:
        return ()
    if isinstance(patterns, str):
        patterns = [patterns]
    out = []
    for p in patterns:
        try:
            out.append(re.compile(p))
        except (re.error, TypeError) as exc:
            raise ValueError(f"{field_name}: {p!r} is not a valid regular expression ({exc})") from None
    return tuple(out)


@dataclass
class Collection:
    """A named group of tensors with its own save and reduction configuration.

    Parameters
    ----------
    name
        The collection's name, e.g. ``"gradients"`` or one of your own.
    include_regex
        Tensors whose name matches any of these (``re.search``) belong to the
        collection, in addition to those an adapter puts there.
    save_config
        When this collection is saved (default: the hook's).
    reduction_config
        What is saved of its tensors (default: the hook's, else raw tensors).
    """

    name: str
    include_regex: Sequence[str] = ()
    save_config: SaveConfigLike | None = None
    reduction_config: ReductionConfig | None = None
    tensor_names: set[str] = field(default_factory=set, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"name: expected a non-empty string, got {self.name!r}")
        self.include_regex = tuple([self.include_regex] if isinstance(self.include_regex, str) else self.include_regex)
        self._patterns = compile_regexes("include_regex", self.include_regex)
        if self.save_config is not None:
            ModeSaveConfig(self.save_config)  # validate
        if self.reduction_config is not None and not isinstance(self.reduction_config, ReductionConfig):
            raise ValueError(f"reduction_config: expected a ReductionConfig, got {self.reduction_config!r}")

    #: Tensor names a repr shows, sorted (a collection of a large model holds thousands: a notebook cell's output)
    REPR_NAMES = 10

    def __repr__(self) -> str:
        names = sorted(self.tensor_names)
        shown = ", ".join(map(repr, names[: self.REPR_NAMES]))
        if len(names) > self.REPR_NAMES:
            shown += f", ... ({len(names)} in all)"
        return (
            f"Collection(name={self.name!r}, include_regex={self.include_regex!r}, save_config={self.save_config!r}, "
            f"reduction_config={self.reduction_config!r}, tensor_names={{{shown}}})"
        )

    def matches(self, tensor_name: str) -> bool:
        """Return whether ``tensor_name`` matches one of the collection's regexes."""
        return any(p.search(tensor_name) for p in self._patterns)

    def to_json(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict."""
        save: dict[str, Any] | None = None
        if self.save_config is not None:
            save = ModeSaveConfig(self.save_config).to_json()
        return {
            "name": self.name,
            "include_regex": list(self.include_regex),
            "save_config": save,
            "reduction_config": self.reduction_config.to_json() if self.reduction_config else None,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Collection:
        """Build from a dict such as one :meth:`to_json` returned."""
        check_keys("collection", data, {"name", "include_regex", "save_config", "reduction_config"})
        save = data.get("save_config")
        red = data.get("reduction_config")
        msc = ModeSaveConfig.from_json(save) if save else None
        return cls(
            name=data["name"],
            include_regex=tuple(data.get("include_regex") or ()),
            save_config=msc,
            reduction_config=ReductionConfig.from_json(red) if red else None,
        )


def check_keys(field_name: str, data: Mapping[str, Any], valid: set[str]) -> None:
    """Raise a ValueError unless ``data`` is a mapping whose keys are all in ``valid`` (JSON configs)."""
    if not isinstance(data, Mapping):
        raise ValueError(f"{field_name}: expected an object, got {data!r}")
    unknown = set(data) - valid
    if unknown:
        raise ValueError(
            f"{field_name}: unknown key(s) {', '.join(sorted(unknown))}; valid: {', '.join(sorted(valid))}"
        )
