"""What the PyTorch ``Trainer`` callbacks share (Lightning and Hugging Face Transformers).

Both callbacks drive the public capture core (:class:`tensortap.capture.Hook`,
with :class:`tensortap.torch.TorchOps` reducing on the device) through a
:class:`StepCapture`, which knows what a trainer step holds:

- a ``TRAIN`` step is one optimizer step: the gradients the optimizer applied,
  the parameters that step produced, the loss and what was logged at it;
- an ``EVAL`` step is one evaluation run: what the trainer computed over it
  (``eval_loss``, ``val_acc``, ...);
- a ``GLOBAL`` step (Lightning only) holds the epoch aggregates of values
  logged during training.

Naming (SPEC section 2): parameters by ``named_parameters()`` (``fc1.weight`` in
``weights``, ``fc1.bias`` in ``biases``; those of a submodule compiled with
``torch.compile`` without ``_orig_mod.``, as :func:`tensortap.capture.torch.events.saved_parameters` gives them),
``gradients/<param>``, the training loss ``losses/loss`` (``losses/loss:<i>`` for
each batch of a step, at every step, where the trainer accumulates gradients:
:attr:`StepCapture.indexed_losses`), a logged value whose key contains ``loss`` is
``losses/<key>``, every other logged number ``metrics/<key>``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import torch

from ..config import BUILTIN_COLLECTIONS, SaveConfig
from ..modes import Mode
from . import core
from .torch import TorchOps
from .torch.events import parameter_collection
from .writer import logger


def logged_name(key: str) -> tuple[str, str]:
    """``(tensor name, collection)`` of a value a trainer logged under ``key``."""
    return (f"losses/{key}", "losses") if "loss" in key.lower() else (f"metrics/{key}", "metrics")


class Hook(core.Hook):
    """The capture core for a PyTorch trainer: reductions on the device, every evaluation run saved.

    Parameters
    ----------
    out_dir
        Local directory or fsspec URL of the trial.
    save_config
        As :class:`tensortap.capture.Hook`. Default: every 100th ``TRAIN`` step
        and every ``EVAL`` and ``GLOBAL`` step (one per evaluation run or epoch).
    **kwargs
        As :class:`tensortap.capture.Hook`.
    """

    framework = "pytorch"
    ops = TorchOps()

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        save_config: Any = None,
        stop_poll_seconds: float | None = None,
        **kwargs: Any,
    ) -> None:
        if save_config is None:  # the defaults, collection_defaults included: decided before save_config is set
            kwargs["collection_configs"] = self._collection_configs(None, kwargs.get("collection_configs") or {})
            every = SaveConfig(save_interval=1)
            save_config = {Mode.EVAL: every, Mode.GLOBAL: every}
        if stop_poll_seconds is not None:
            if (
                isinstance(stop_poll_seconds, bool)
                or not isinstance(stop_poll_seconds, (int, float))
                or stop_poll_seconds < 0
            ):
                raise ValueError(f"stop_poll_seconds: expected a number >= 0, got {stop_poll_seconds!r}")
            self.stop_poll_seconds = float(stop_poll_seconds)
        super().__init__(out_dir, save_config=save_config, **kwargs)


def open_run(build: Callable[..., Hook], previous: Hook | None, **kwargs: Any) -> Hook:
    """A hook from ``build(**kwargs)``, continuing the run of ``previous`` (closed) when there is one.

    A trainer's later call (``trainer.test`` after ``fit``, ``evaluate`` after ``train``)
    goes on with the run of the same callback: same worker record (``run_id``), steps
    numbered on from the last ones, so the trial holds all of it. A stop request that
    ``previous`` saw is kept: the run still ends with the reason ``stop_request``.

    Parameters
    ----------
    build
        Makes the hook (``Hook`` or ``Hook.from_json`` with its path bound).
    previous
        The closed hook of this callback's earlier call, or None.
    **kwargs
        Passed to ``build``.

    Returns
    -------
    Hook
        The open hook.
    """
    if previous is not None and previous.run_id is not None:
        kwargs["run_id"] = previous.run_id
    hook = build(**kwargs)
    if previous is not None:
        hook.step = previous.step
        hook.mode_steps = dict(previous.mode_steps)
        if previous.stop_channel.requested:
            hook.stop_channel = previous.stop_channel
    return hook


def check_stop_sync_steps(value: object) -> int:
    """``value`` if it is an integer >= 1 (how often the ranks agree on a stop request), else ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"stop_sync_steps: expected an integer >= 1, got {value!r}")
    return value


def check_hook_kwargs(out_dir: str, hook_kwargs: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` now for a configuration the training process would reject later (``rules`` too);
    warn about collections it asks for that the callback never fills (:func:`warn_unfilled`).

    A hook of rank 1 with ``include_workers="one"`` opens no writer, so this writes nothing.
    """
    core.check_rules(hook_kwargs.get("rules"))
    probe = {**hook_kwargs, "rank": 1, "rules": None, "include_workers": "one"}
    warn_unfilled(Hook(out_dir, **probe))


FILLED = ("weights", "biases", "gradients", "losses", "metrics")
"""The built-in collections a trainer callback fills (:class:`StepCapture`)."""


def warn_unfilled(hook: core.Hook) -> None:
    """Warn, naming them, about built-in collections ``hook`` includes that a trainer callback never fills.

    With ``save_all``, the layers' ``outputs`` and ``inputs``, which a user asking for everything expects.
    """
    asked = ("outputs", "inputs") if hook.save_all else hook.included
    unfilled = [c for c in asked if c in BUILTIN_COLLECTIONS and c not in FILLED]
    if unfilled:
        logger.warning(
            "tensortap: %s (%s) stay empty: a trainer callback saves only %s; for the layers' outputs and inputs, "
            "register a tensortap.torch Hook on the model (hook.register_module(model)), in a trial of its own",
            ", ".join(map(repr, unfilled)),
            "save_all" if hook.save_all else "include_collections",
            ", ".join(FILLED),
        )


class StepCapture:
    """One trainer's steps on a :class:`Hook`; a callback calls it at the trainer's events.

    A ``TRAIN`` step opens with :meth:`open_train` and ends with
    :meth:`end_train`; values can be added between (:meth:`offer_gradients`,
    :meth:`add_loss`, :meth:`offer_logged`). ``EVAL`` and ``GLOBAL`` steps are
    written whole by :meth:`write_step`.

    Attributes
    ----------
    indexed_losses
        Whether the training accumulates gradients over several batches per step: then each
        step's losses are ``losses/loss:0``, ``losses/loss:1``, ..., also in a step of one batch
        (an epoch's last window, when its batches do not divide evenly), so that one name holds
        the same batch of every step. Otherwise a step of one loss saves it as ``losses/loss``
        (several, as a manual optimization stepping every few batches gives: ``:<i>`` too).
    """

    def __init__(self, hook: Hook) -> None:
        self.hook = hook
        self.train_open = False
        self.indexed_losses = False
        self._losses: list[Any] = []
        self._names: set[str] = set()
        self._warned: set[str] = set()

    def open_train(self) -> bool:
        """Start a ``TRAIN`` step unless one is open (with the losses of a :meth:`suspend_train`); return whether
        it is saved."""
        if not self.train_open:
            self.train_open = True
            self._names.clear()
            self.hook.begin_step(Mode.TRAIN)
        return self.hook.is_saving()

    def suspend_train(self) -> None:
        """Take back the open ``TRAIN`` step, in which no optimizer stepped yet, for a step of another mode.

        A validation or an epoch's end inside an accumulation window (``val_check_interval`` within
        ``accumulate_grad_batches``, a manual optimization stepping every few batches): the window goes on
        in the step :meth:`open_train` opens next, with the same numbers and the losses kept so far, and
        ends at its optimizer step. Nothing of an open step is offered before its optimizer stepped.
        """
        if self.train_open:
            self.train_open = False
            self.hook.drop_step(None, take_back=True)

    def discard_unstepped(self) -> None:
        """The training ended: batches after the last optimizer step are no ``TRAIN`` step; one warning if their
        losses were to be saved."""
        self.suspend_train()
        if self._losses:
            logger.warning(
                "tensortap: the last %d training batch(es) had no optimizer step after them; their losses are "
                "not captured (a TRAIN step is one optimizer step)",
                len(self._losses),
            )
            self._losses.clear()

    def offer(self, name: str, value: Any, collection: str) -> None:
        """Offer one value at the current step; a second value of one name in a step is dropped with a warning."""
        if self._first(name):
            self.hook.offer(name, value, (collection,))

    def offer_many(self, items: Iterable[tuple[str, Any, str]]) -> None:
        """Offer ``(name, value, collection)`` values together, as :meth:`offer` each would
        (:meth:`tensortap.capture.Hook.offer_many`)."""
        self.hook.offer_many((name, value, (collection,)) for name, value, collection in items if self._first(name))

    def _first(self, name: str) -> bool:
        """Whether ``name`` is offered for the first time in the step (a second time: one warning per name)."""
        if name in self._names:
            if name not in self._warned:
                self._warned.add(name)
                logger.warning(
                    "tensortap: two values named %r at step %d; the first is kept (this warning is not repeated)",
                    name,
                    self.hook.step,
                )
            return False
        self._names.add(name)
        return True

    def offer_gradients(self, named: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Offer ``p.grad`` of each ``(name, p)`` that has a gradient, as ``gradients/<name>`` (``name`` as saved:
        :func:`~tensortap.capture.torch.events.saved_parameters`)."""
        if self.hook.is_saving("gradients"):
            self.offer_many((f"gradients/{name}", p.grad, "gradients") for name, p in named if p.grad is not None)

    def add_loss(self, loss: Any) -> None:
        """Keep one training-step loss of the open step (several with gradient accumulation)."""
        if self.hook.is_saving("losses") and isinstance(loss, torch.Tensor):
            self._losses.append(loss.detach())

    def offer_logged(self, values: Mapping[str, Any]) -> None:
        """Offer each numeric logged value under :func:`logged_name`; non-numbers are skipped."""
        for key, value in values.items():
            array = _number(value)
            if array is not None:
                name, collection = logged_name(key)
                self.offer(name, array, collection)

    def end_train(self, parameters: Iterable[tuple[str, torch.Tensor]]) -> None:
        """End the open ``TRAIN`` step: its losses and the parameters as they are now."""
        if not self.train_open:
            return
        self.train_open = False
        hook = self.hook
        if hook.is_saving("losses"):
            if len(self._losses) == 1 and not self.indexed_losses:
                self.offer("losses/loss", self._losses[0], "losses")
            else:
                for i, loss in enumerate(self._losses):
                    self.offer(f"losses/loss:{i}", loss, "losses")
        self._losses.clear()
        self.offer_parameters(parameters)
        hook.end_step()

    def offer_parameters(self, named: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Offer each ``(name, p)`` in ``weights`` or ``biases`` (:func:`parameter_collection`), as it is now
        (``name`` as saved: :func:`~tensortap.capture.torch.events.saved_parameters`)."""
        if self.hook.is_saving("weights") or self.hook.is_saving("biases"):
            self.offer_many((name, p, parameter_collection(name)) for name, p in named)

    def drop_train(self, why: BaseException) -> None:
        """Drop the open ``TRAIN`` step, which ``why`` interrupted; the next ``TRAIN`` step takes its numbers.

        For a trainer that counts its steps itself: the step it never finished is not counted.
        """
        if not self.train_open:
            return
        self.train_open = False
        self._losses.clear()
        self.hook.drop_step(why, take_back=True)

    def write_step(self, mode: Mode, values: Mapping[str, Any]) -> None:
        """Write one whole ``EVAL`` or ``GLOBAL`` step of logged values (nothing if there are none)."""
        if not values:
            return
        self._names.clear()
        if self.hook.begin_step(mode):
            self.offer_logged(values)
        self.hook.end_step()


def same_logged(a: Any, b: Any) -> bool:
    """Whether two logged values are the same: one object (a NaN matches itself), equal tensors of one
    shape (Lightning may store a value again as a new tensor), or equal numbers or strings."""
    if a is b:
        return True
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and bool(torch.equal(a.detach().cpu(), b.detach().cpu()))
    plain = (int, float, str)
    return isinstance(a, plain) and isinstance(b, plain) and a == b


def _number(value: Any) -> np.ndarray | None:
    """A logged value as a NumPy scalar or array; None for what is not numeric (strings, None).

    An integer beyond 64 bits (``2**64``) is one of dtype object: the hook skips it with one
    warning naming it, as :meth:`tensortap.capture.Hook.save_scalar` does.
    """
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if value is None:
        return None
    try:
        array = np.asarray(value)
    except (TypeError, ValueError):
        return None
    if array.dtype.kind in "biuf" or (isinstance(value, int) and array.dtype.kind == "O"):
        return array
    return None
