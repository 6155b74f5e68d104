"""Every exception tensortap raises on purpose; all are importable from ``tensortap``."""

from __future__ import annotations

import difflib
import functools
from collections.abc import Iterable, Mapping

from .modes import Mode, step_label


class TensortapError(Exception):
    """Base class of tensortap's own errors."""


class StepUnavailable(TensortapError):
    """The step was skipped or never saved, and never will be."""

    def __init__(self, step: int, mode: Mode | None = None) -> None:
        self.step = step
        self.mode = mode
        super().__init__(f"{step_label(step, mode)} was not saved and never will be")


class StepNotYetAvailable(TensortapError):
    """The step has not been written yet; training is still running."""

    def __init__(self, step: int, mode: Mode | None = None) -> None:
        self.step = step
        self.mode = mode
        super().__init__(f"{step_label(step, mode)} is not available yet (training still running)")


class NoMoreData(TensortapError):
    """A step past the end of a training that has ended was asked for."""


def suggest(name: str, valid: Iterable[str]) -> str:
    """``"; did you mean 'a' or 'b'?"`` for the valid names closest to ``name`` (difflib), or ``""`` (also for a
    ``name`` that is no str: the message of the error that names it must not fail)."""
    if not isinstance(name, str):
        return ""
    close = difflib.get_close_matches(name, list(valid), n=3, cutoff=0.6)
    return f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


class UnknownName(TensortapError, KeyError, ValueError):
    """A name that does not exist: a collection, reduction, rule, parameter, ...

    Both a ``KeyError`` and a ``ValueError`` (what the lookups raised before).
    The message names it, suggests the closest valid names and lists the valid
    ones when they are few.

    Parameters
    ----------
    kind
        What was looked up (``"collection"``, ``"reduction"``, ``"rule"``, ...).
    name
        The name given.
    valid
        The names that exist.
    where
        Where it was looked up, e.g. ``" in /tmp/run"``.
    listed
        What to list as the valid names, when ``valid`` is a family too long to list name by name
        (``"min, max, ..., each also as abs_NAME"``); default: ``valid``, when at most
        :attr:`MAX_LISTED`.

    Attributes
    ----------
    kind, name
        As given.
    valid
        The valid names, sorted.
    """

    MAX_LISTED = 20

    def __init__(self, kind: str, name: str, valid: Iterable[str], where: str = "", listed: str | None = None) -> None:
        self.kind, self.name = kind, name
        self.valid = sorted(set(valid))
        # the message (its suggestions: difflib) is made when shown, not when a caller that expects the
        # error catches it (the rules ask for collections a trial may not have, step after step)
        super().__init__(kind, name, tuple(self.valid), where, listed)

    @functools.cached_property
    def message(self) -> str:
        """What :func:`str` shows: the name, the closest valid names and, when few, every valid name."""
        kind, name, _, where, listed = self.args
        message = f"no {kind} {name!r}{where}{suggest(name, self.valid)}"
        if listed is not None:
            message += f" (valid: {listed})"
        elif not self.valid:
            message += f" (there is no {kind} at all)"
        elif len(self.valid) <= self.MAX_LISTED:
            message += f" (valid: {', '.join(self.valid)})"
        return message

    def __str__(self) -> str:  # KeyError would quote the message
        return self.message


class TensorUnavailable(TensortapError, KeyError):
    """No tensor of that name exists in the trial."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class TensorUnavailableForStep(TensortapError):
    """The tensor exists but not at that step (or not as asked: raw vs reductions)."""


class ShardUnreadable(TensorUnavailableForStep):
    """The value was saved, but its shard cannot be read (damaged): the reader skipped it with a warning.

    What reads every step (``tensortap show``, the rules) skips such a step and goes on with the others.

    Parameters
    ----------
    message
        The error message (names the tensor, the step and the shard).
    shard
        The shard's key in the trial (``shards/worker_0/0000000001.h5``).
    why
        Why the shard cannot be read.
    """

    def __init__(self, message: str, shard: str = "", why: str = "") -> None:
        super().__init__(message)
        self.shard, self.why = shard, why


class TrialNotFound(TensortapError, FileNotFoundError):
    """No tensortap trial at the path or URL: nothing there, a file, or a folder with no trial's marker files.

    Parameters
    ----------
    path
        The path or URL given.
    why
        What is there instead (``"nothing exists there"``, ``"it is a file"``, ...).
    trials_below
        Trials found in folders below ``path`` (paths relative to it).
    kind
        The kind of trial looked for (``"smdebug"`` where an smdebug trial is to be imported).

    Attributes
    ----------
    path, why, trials_below, kind
        As given.
    """

    MAX_LISTED = 10

    def __init__(self, path: str, why: str = "", trials_below: Iterable[str] = (), kind: str = "tensortap") -> None:
        self.path = path
        self.why = why
        self.trials_below = list(trials_below)
        self.kind = kind
        message = f"no {kind} trial at {path}" + (f": {why}" if why else "")
        if self.trials_below:
            shown = self.trials_below[: self.MAX_LISTED]
            more = len(self.trials_below) - len(shown)
            message += f"; trials found below it: {', '.join(shown)}" + (f" (and {more} more)" if more else "")
        super().__init__(message)

    def __str__(self) -> str:  # OSError would format (errno, strerror)
        return str(self.args[0]) if self.args else ""


class TrialTooNew(TensortapError):
    """The trial holds records of a newer format version than this tensortap reads: it was written by a newer
    tensortap, and reading what is left would show a trial with steps or workers missing.

    Parameters
    ----------
    path
        The trial's path or URL.
    records
        ``{key: why}`` of the records refused for their version (keys relative to the trial).

    Attributes
    ----------
    path, records
        As given.
    """

    def __init__(self, path: str, records: dict[str, str]) -> None:
        self.path, self.records = path, dict(records)
        key, why = next(iter(self.records.items()))
        more = f" and {len(self.records) - 1} more" if len(self.records) > 1 else ""
        super().__init__(
            f"{path} was written by a newer tensortap than this one: {key}{more} ({why}); upgrade tensortap "
            "(pip install -U tensortap) to read it"
        )


class RuleInputsMissing(TensortapError):
    """One or more rules found none of their inputs, so they judged nothing.

    Raised by :meth:`~tensortap.rules.RuleRunner.run` (and so by
    :func:`~tensortap.rules.invoke_rule` and ``tensortap rules``, which exits 2)
    when a rule evaluated steps but could use none of them: every step lacked
    what :meth:`~tensortap.rules.Rule.need` reported. A rule that finds no
    input is a wrong folder or a wrong capture setting, never a pass.

    Parameters
    ----------
    missing
        ``{rule name: [what it needs, ...]}`` for each rule that found nothing.
    fired
        ``{rule name: [steps]}`` where the rules of the same run fired (the
        results that would have been returned).

    Attributes
    ----------
    missing, fired
        As given.
    """

    def __init__(self, missing: dict[str, list[str]], fired: dict[str, list[int]] | None = None) -> None:
        self.missing = {k: list(v) for k, v in missing.items()}
        self.fired = dict(fired or {})
        parts = []
        for rule, needs in self.missing.items():
            words = "; ".join(n.removeprefix(f"{rule} ") for n in needs)
            parts.append(f"{rule} found none of its inputs" + (f": it {words}" if words else ""))
        super().__init__("; ".join(parts))


class StopTrainingRequested(TensortapError):
    """Raised from a framework's step when a stop request was found and raising was asked for."""


class TrialExistsError(TensortapError, ValueError):
    """A worker of that name already wrote into the trial folder (see ``if_exists``)."""


class UsageError(Exception):
    """A ``tensortap`` command used wrongly (a missing or conflicting argument): exit 2 with its message.

    Defined here, not in :mod:`tensortap.cli`, so that ``python -m tensortap.cli`` (the module run as
    ``__main__`` and imported again by the subcommands) has one class of it.
    """


class StorageUnreachable(TensortapError, ConnectionError):
    """Remote storage could not be used: no connection to its endpoint, no credentials to sign the
    requests or credentials it refused (an HTTP 403 ``AccessDenied``, ``InvalidAccessKeyId``, 400
    ``ExpiredToken``: also credentials that may list the trial but not read it), an endpoint that does
    not answer as the storage does (an HTTP 404 with no S3 error to a listing), or a request the
    storage failed after the client's retries (an HTTP 5xx). Never
    reported as a missing trial or a damaged shard: what is there is unknown, and a later request may
    succeed. Its message says what failed, naming the URL and the endpoint, with the client's error.
    """


class StorageOptionsError(TensortapError, ValueError):
    """``storage_options`` that the constructor of a storage plugin's class does not take (a name it
    does not know, a required one missing): a mistake of the caller, not of the plugin. The message
    names the URL, the scheme, the options and the names the plugin takes."""


def no_attribute(owner: str, name: str, hints: Mapping[str, str], what: str) -> AttributeError:
    """Python's AttributeError for the attribute ``name`` of ``owner`` (``"'Trial' object"``, ``"module
    'tensortap.torch'"``), saying how tensortap spells it where smdebug had that name: ``hints[name]``, about
    smdebug's ``what`` (``"trial"``, ``"hook"``, ...)."""
    message = f"{owner} has no attribute {name!r}"
    if name in hints:
        message += f": smdebug's {what}.{name}: in tensortap, {hints[name]}"
    return AttributeError(message)
