"""The capture session: the step machinery every adapter shares.

An adapter (``capture/torch``, ``capture/keras``, ...) translates its
framework's events into calls on one :class:`Session` that it owns; the
session drives the core (:class:`tensortap.capture.Hook`) through its public
methods only. Adapters never reimplement what is here, and never touch a
``_private`` of the core.

Interface
---------
::

    session = Session(hook, is_tensor=torch.is_tensor, snapshot=lambda t: t.detach().clone())

    # is a collection saved at any step / at the open step (regex collections count)
    session.may_save("outputs", "inputs") -> bool
    session.saving("gradients") -> bool

    # steps: a step is open from open() to finish(); end() marks it as over,
    # and it is recorded when the next one opens (deferred close) or at finish()
    session.open(mode, step=None) -> bool   # finishes the previous step first; True if saved
    session.end()                           # the open step is over (pending)
    session.finish()                        # record the open or pending step now
    session.is_open, session.pending
    session.at_finish(callback)             # adapter work run when a saved step is recorded,
                                            # before it is (e.g. read weights after the update)

    # values
    session.offer(name, value, collections)       # the last value given for a name in a step wins
    session.offer_many(items)                     # (name, value, collections) tensors, as offer() each
    session.offer_tree(name, value, collections)  # a nested value, named by flatten()
    session.offer_call(base, value, collections)  # one call of a module/layer: base, or base:<i>
                                                  # when called several times in the step
    session.offer_call(base, args, collections, keywords=kwargs)  # and its keyword arguments: base/<key>
    session.give(name, value, collections, held=...)  # a value the user gave (save_tensor): saved whatever
                                                      # the collections; held, forget() may drop it
    session.mark(apart=...) -> int                    # a mark between what was offered before and after
    session.forget(start, stop) -> bool               # drop the calls and held values offered between two marks
    session.guard(fn, *args)                      # run capture work; errors disable capture, never training

Naming of nested values (:func:`flatten`, SPEC section 9): a single tensor, or
a structure holding exactly one tensor, is ``<name>``; a list or tuple gives
``<name>/<i>``, a dict ``<name>/<key>``, recursively (a sub-structure holding
one tensor is named like that tensor). A module or layer called several
times in a step adds ``:<i>`` to its name: ``outputs/<name>:<i>/<j>``.

Repeated calls (a cell called once per time step in a Python loop) are
bounded: calls ``0 .. max_calls - 1`` are saved, and of the calls beyond,
only the last (under its true index), with one warning naming the module.
:data:`MAX_CALLS` is the default. While what came before a mark may yet be
forgotten (``mark(apart=True)``: a forward nothing trained on yet), the calls
after it are held as if they were the step's first (at most ``max_calls`` of
them a module), so that forgetting the calls before leaves the step's first
calls held. Held are at most the step's first ``max_calls`` calls of a module,
the first ``max_calls`` since the last such mark, and the last call: memory
stays bounded when many forwards come before a backward (a rollout); where
the calls forgotten leave other kept calls to be saved unheld, a warning names
them (:meth:`Session.forget`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

from ..modes import Mode
from .core import Hook
from .writer import logger

MAX_CALLS = 8
"""Default number of calls of one module/layer per step saved in full (then the last one)."""

IsTensor = Callable[[Any], bool]
Snapshot = Callable[[Any], Any]


_PLAIN = (type(None), bool, int, float, complex, str, bytes)
"""Leaves that are no tensor and hold none (a ``None`` output, a flag): skipped without a word."""


def _is_dataclass(value: Any) -> bool:
    return dataclasses.is_dataclass(value) and not isinstance(value, type)


def _count(value: Any, is_tensor: IsTensor) -> int:
    if is_tensor(value):
        return 1
    return sum(_count(v, is_tensor) for _, v in _items(value))


def _items(value: Any) -> Iterator[tuple[Any, Any]]:
    if isinstance(value, (list, tuple)):
        return iter(enumerate(value))
    if isinstance(value, Mapping):
        return iter(value.items())
    if _is_dataclass(value):
        return ((f.name, getattr(value, f.name)) for f in dataclasses.fields(value))
    return iter(())


def unnamed(value: Any, is_tensor: IsTensor) -> set[str]:
    """The type names of the leaves of ``value`` that :func:`flatten` skips although they may hold
    tensors: neither tensors, nor lists, tuples, mappings, dataclasses, nor ``None``, numbers, strings.

    Examples
    --------
    ``(t, None, 3)`` -> ``set()``; ``(t, Categorical(logits=t))`` -> ``{"Categorical"}``.
    """
    if is_tensor(value) or isinstance(value, _PLAIN):
        return set()
    if not isinstance(value, (list, tuple, Mapping)) and not _is_dataclass(value):
        return {type(value).__name__}
    return set().union(*(unnamed(v, is_tensor) for _, v in _items(value)))


def leaves(value: Any, is_tensor: IsTensor) -> Iterator[Any]:
    """The tensors in a (nested) value, in the order :func:`flatten` names them."""
    if is_tensor(value):
        yield value
        return
    for _, v in _items(value):
        yield from leaves(v, is_tensor)


def _walk(prefix: str, value: Any, is_tensor: IsTensor) -> Iterator[tuple[str, Any]]:
    if _count(value, is_tensor) == 1:
        yield prefix, next(leaves(value, is_tensor))
        return
    for key, v in _items(value):
        yield from _walk(f"{prefix}/{key}", v, is_tensor)


def flatten(name: str, value: Any, is_tensor: IsTensor) -> list[tuple[str, Any]]:
    """The tensors in a (nested) value with their names, by the one naming rule.

    Parameters
    ----------
    name
        The name of the whole value (``outputs/fc1``).
    value
        A tensor, or lists, tuples, mappings and dataclasses (nested) of them; other leaves are
        ignored (:func:`unnamed` tells which of them might have held tensors).
    is_tensor
        Whether a leaf is a tensor of the adapter's framework.

    Examples
    --------
    ``t`` and ``(t,)`` -> ``name``; ``(a, b)`` -> ``name/0``, ``name/1``;
    ``{"h": a, "c": (b,)}`` -> ``name/h``, ``name/c``; ``(a, (b, c))`` -> ``name/0``,
    ``name/1/0``, ``name/1/1``; a dataclass is named by its fields, like a dict.
    """
    return list(_walk(name, value, is_tensor))


class _Calls:
    """The calls of one module/layer in the open step, held until it is recorded."""

    __slots__ = ("collections", "held", "last", "marks")

    def __init__(self, collections: tuple[str, ...]) -> None:
        self.marks: list[int] = []  # the mark of each call in the step (forgotten ones not kept)
        # (mark, named tensors) of calls 0 .. max_calls - 1, and of the last call beyond
        self.held: list[tuple[int, list[tuple[str, Any]]]] = []
        self.last: tuple[int, list[tuple[str, Any]]] | None = None
        self.collections = collections


class Session:
    """One adapter's step machinery over a core :class:`~tensortap.capture.Hook`.

    Parameters
    ----------
    hook
        The core the values go to (used through its public methods).
    is_tensor
        Whether a value is a tensor of the adapter's framework (for :func:`flatten`).
    snapshot
        A copy of a tensor that later in-place changes do not reach; used for values
        held until the step's end (the first call of a module, the last of many).
    max_calls
        Calls of one module/layer per step saved in full; beyond, only the last one.
    """

    def __init__(
        self,
        hook: Hook,
        is_tensor: IsTensor,
        snapshot: Snapshot = lambda v: v,
        max_calls: int = MAX_CALLS,
    ) -> None:
        if max_calls < 1:
            raise ValueError(f"max_calls: expected an integer >= 1, got {max_calls!r}")
        self.hook = hook
        self.is_tensor = is_tensor
        self.snapshot = snapshot
        self.max_calls = int(max_calls)
        self.is_open = False
        self.pending = False
        self._finishers: list[Callable[[], None]] = []
        self._calls: dict[str, _Calls] = {}
        self._warned_calls: set[str] = set()
        self._warned_unnamed: set[str] = set()  # bases whose values held something flatten() skips
        # values given while held (give()): by name, (mark, snapshot, collections) of each kept
        self._given: dict[str, list[tuple[int, Any, tuple[str, ...]]]] = {}
        self._marks = 0  # calls and held values offered so far (see mark())
        self._marked = 0  # the last mark handed out: what is offered after it shares its fate
        self._span = 0  # calls from this mark on have max_calls held places of their own (mark(apart=True))

    # ------------------------------------------------------------ collections
    def may_save(self, *collections: str) -> bool:
        """Whether tensors of one of ``collections`` may be saved at some step (a regex collection may match)."""
        hook = self.hook
        if hook.save_all or hook.regex_collections:
            return True
        return any(c in hook.included for c in collections)

    def saving(self, *collections: str) -> bool:
        """Whether tensors of one of ``collections`` are saved at the open step (a regex collection may match)."""
        hook = self.hook
        if not self.is_open or not hook.is_saving():
            return False
        return any(hook.is_saving(c) for c in collections) or any(
            hook.is_saving(c.name) for c in hook.regex_collections
        )

    # ------------------------------------------------------------------ steps
    def at_finish(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` when a saved step is recorded, just before (values read after the step)."""
        self._finishers.append(callback)

    def open(self, mode: Mode | str | None = None, step: int | None = None) -> bool:
        """Record the previous step if any, then open the next one; return whether it is saved."""
        if self.is_open:
            self.finish()
        saving = self.hook.begin_step(mode, step)
        self.is_open, self.pending = True, False
        return saving

    def end(self) -> None:
        """The open step is over; it is recorded when the next one opens, or at :meth:`finish`."""
        if self.is_open:
            self.pending = True

    def finish(self) -> None:
        """Record the open (or pending) step now: the adapter's step-end values, held calls, then the record."""
        if not self.is_open:
            return
        if self.hook.is_saving():
            for callback in self._finishers:
                self.guard(callback)
            self.guard(self._offer_held)
        self.is_open = self.pending = False
        self._clear()
        self.hook.end_step()

    def drop(self, why: BaseException | None, *, take_back: bool = False) -> None:
        """Drop the open (or pending) step, which ``why`` interrupted: nothing of it is recorded.

        See :meth:`tensortap.capture.Hook.drop_step`.
        """
        if not self.is_open:
            return
        self.is_open = self.pending = False
        self._clear()
        self.hook.drop_step(why, take_back=take_back)

    def _clear(self) -> None:
        """Forget what the step recorded or dropped held."""
        self._calls.clear()
        self._given.clear()
        self._span = self._marks

    def guard(self, fn: Callable[..., None], *args: Any) -> None:
        """Run capture work: an error of the capture path disables capture (raises if ``strict``), never training."""
        try:
            fn(*args)
        except Exception as exc:
            self.hook.fail(exc, f"capture failed at step {self.hook.step}")

    # ----------------------------------------------------------------- values
    def offer(self, name: str, value: Any, collections: Sequence[str]) -> None:
        """Offer one tensor at the open step; a later value of the same name in the step replaces it."""
        self.hook.offer(name, value, tuple(collections))

    def offer_many(self, items: Iterable[tuple[str, Any, tuple[str, ...]]]) -> None:
        """Offer ``(name, value, collections)`` tensors of the open step, as :meth:`offer` each would, at
        less cost (one hold of the writer's lock for all: :meth:`Hook.offer_many`)."""
        self.hook.offer_many(items)

    def offer_tree(self, name: str, value: Any, collections: Sequence[str]) -> None:
        """Offer every tensor of a nested value, named by :func:`flatten`."""
        colls = tuple(collections)
        for sub, t in flatten(name, value, self.is_tensor):
            self.hook.offer(sub, t, colls)

    def offer_call(
        self, base: str, value: Any, collections: Sequence[str], keywords: Mapping[str, Any] | None = None
    ) -> None:
        """Offer one call's value as ``base`` (one call in the step) or ``base:<i>`` (several).

        Calls are held (snapshotted) until the step is recorded, which names them (or
        :meth:`forget` drops some); calls beyond :attr:`max_calls` (since the step's start, or
        since the last ``mark(apart=True)``) replace a held last call.
        ``keywords`` (a call's keyword arguments) are named ``base/<key>`` (``base:<i>/<key>``),
        each by :func:`flatten`, without changing the names of ``value``'s tensors.
        """
        calls = self._calls.get(base)
        if calls is None:
            calls = self._calls[base] = _Calls(tuple(collections))
        tensors = flatten("", value, self.is_tensor)
        for key, v in (keywords or {}).items():
            tensors += flatten(f"/{key}", v, self.is_tensor)
        if base not in self._warned_unnamed:
            self._warn_unnamed(base, (value, keywords))
        held = (self._marks, [(sub, self.snapshot(t)) for sub, t in tensors])
        calls.marks.append(self._marks)
        self._marks += 1
        if sum(mark >= self._span for mark, _ in calls.held) < self.max_calls:
            # held: the step's first calls, and those since the last mark(apart=True); the others are let go
            calls.held = calls.held[: self.max_calls] + [c for c in calls.held[self.max_calls :] if c[0] >= self._span]
            calls.held.append(held)
        else:
            calls.last = held
        if len(calls.marks) > self.max_calls and base not in self._warned_calls:
            self._warned_calls.add(base)
            logger.warning(
                "tensortap: %s is called more than %d times in step %d; calls %d and later are not saved, "
                "except the last of each step (raise max_calls to save more)",
                base,
                self.max_calls,
                self.hook.step,
                self.max_calls,
            )

    def give(self, name: str, value: Any, collections: Sequence[str], *, held: bool) -> None:
        """A value the user gave (``save_tensor``, ``save_scalar``), saved at the open step whatever the
        collections; the last value of a name kept in the step wins.

        ``held``: the step may yet forget what is offered now (:meth:`forget`; a value given after a
        forward that no backward has used yet): the value is held (snapshotted) until the step is
        recorded, and dropped with the calls around it if they are forgotten. Of the values of a name
        given between two marks, only the last is held (they share their fate).
        """
        colls = tuple(collections)
        if not held:
            self._given.pop(name, None)  # given before it: this one is later
            self.hook.offer(name, value, colls, force=True)
            return
        kept = self._given.setdefault(name, [])
        if kept and kept[-1][0] >= self._marked:
            kept.pop()
        kept.append((self._marks, self.snapshot(value), colls))
        self._marks += 1

    def mark(self, apart: bool = False) -> int:
        """A mark between what was offered before now and what is offered after (for :meth:`forget`).

        ``apart``: what was offered before may yet be forgotten (a forward nothing trained on yet):
        the calls after the mark have :attr:`max_calls` held places of their own, so that if
        :meth:`forget` drops the calls before, those after are held as the step's first calls.
        """
        if apart:
            self._span = self._marks
        self._marked = self._marks
        return self._marks

    def forget(self, start: int, stop: int) -> bool:
        """Drop the calls and held values offered from mark ``start`` to mark ``stop`` (:meth:`mark`) in the
        open step; return whether anything was dropped.

        The calls kept are numbered again in their order (a module called in a forward that
        nothing trained on, then in the one trained on: ``base``, not ``base:1``). Kept calls to be
        saved that were not held (forgotten ones took their places, and no ``mark(apart=True)``
        gave them places of their own) are not saved: one warning names them.
        """
        dropped = False
        for base, calls in self._calls.items():
            kept = [m for m in calls.marks if not start <= m < stop]
            dropped |= len(kept) < len(calls.marks)
            calls.marks = kept
            calls.held = [call for call in calls.held if not start <= call[0] < stop]
            if calls.last is not None and start <= calls.last[0] < stop:
                calls.last = None
            unheld = self._unheld(calls)
            if unheld:
                logger.warning(
                    "tensortap: %s: calls %s of the step were not held (more than max_calls=%d calls, of a "
                    "forward then forgotten, came before them) and are not saved",
                    base,
                    ", ".join(map(str, unheld)),
                    self.max_calls,
                )
        for name, values in self._given.items():
            kept_values = [v for v in values if not start <= v[0] < stop]
            dropped |= len(kept_values) < len(values)
            self._given[name] = kept_values
        return dropped

    def _unheld(self, calls: _Calls) -> list[int]:
        """The calls to be saved (``0 .. max_calls - 1``, and the last) whose values are not held."""
        have = {mark for mark, _ in calls.held} | ({calls.last[0]} if calls.last is not None else set())
        n = len(calls.marks)
        wanted = [*range(min(n, self.max_calls)), *([n - 1] if n > self.max_calls else [])]
        return [i for i in wanted if calls.marks[i] not in have]

    def _warn_unnamed(self, base: str, value: Any) -> None:
        """Once per ``base``: what of a call's value cannot be captured (a distribution, an object of its own)."""
        types = unnamed(value, self.is_tensor)
        if types:
            self._warned_unnamed.add(base)
            logger.warning(
                "tensortap: %s holds %s, which is not captured (tensors are, and lists, tuples, dicts and "
                "dataclasses of them); the tensors beside it are",
                base,
                " and ".join(sorted(types)),
            )

    def _offer_held(self) -> None:
        """Offer the held calls to be saved (``0 .. max_calls - 1`` and the last, by their index among the
        step's calls kept) and the last held value of each name given."""
        self.hook.offer_many(
            (name + sub, t, collections) for name, tensors, collections in self._held_to_save() for sub, t in tensors
        )
        for name, values in self._given.items():
            if values:
                _, value, colls = values[-1]
                self.hook.offer(name, value, colls, force=True)

    def _held_to_save(self) -> Iterator[tuple[str, list[tuple[str, Any]], tuple[str, ...]]]:
        """``(name, tensors, collections)`` of each held call to be saved, in order: ``base`` alone, else
        ``base:<i>`` by its index among the step's calls kept."""
        for base, calls in self._calls.items():
            index = {mark: i for i, mark in enumerate(calls.marks)}
            last = len(calls.marks) - 1
            held = calls.held + ([calls.last] if calls.last is not None else [])
            named = [(i, tensors) for mark, tensors in held if (i := index[mark]) < self.max_calls or i == last]
            for i, tensors in sorted(named, key=lambda call: call[0]):
                yield (base if last == 0 else f"{base}:{i}"), tensors, calls.collections
