"""PyTorch Lightning adapter: a ``lightning.pytorch.Callback`` that captures a ``Trainer``'s training.

Use it through :mod:`tensortap.lightning`::

    import tensortap.lightning as ttl
    trainer = L.Trainer(max_epochs=3, callbacks=[ttl.Callback(out_dir)])
    trainer.fit(model, train_loader, val_loader)

Steps (see :mod:`tensortap.capture.trainers` for the names):

- ``TRAIN``: one optimizer step (with ``accumulate_grad_batches=N``, the N
  batches whose gradients it applied). Gradients are read when the torch
  optimizer's ``step()`` returns (a step post-hook), so they are exactly what the
  optimizer applied: after AMP unscaling and after Lightning's gradient clipping
  (Lightning's own ``on_before_optimizer_step`` runs before clipping, and a step
  pre-hook would run before the closure that computes them). Weights and
  biases are read after the step. ``losses/loss`` is the loss
  ``training_step`` returned (with gradient accumulation, ``losses/loss:<i>``
  for each batch of every step, a step of one batch too; a manual optimization's
  ``training_step`` that returns none: the losses given to ``manual_backward``,
  ``losses/loss:<i>`` for several); everything logged
  with ``self.log`` during the step is saved under the name Lightning's
  loggers get (``train_loss_step`` when it is also aggregated per epoch).
  Lightning calls the module's own ``on_train_batch_end`` after the
  callbacks': where the module has one (or a callback of one's own listed
  after this one), the step ends after them (at the next batch, validation
  or the epoch's end), so what they log is saved with its step.
- ``EVAL``: one validation (or test) run: the values logged in it, as
  Lightning aggregated them (``val_loss``, ``val_acc``; a name that training
  logs too has its training values in ``TRAIN`` steps). The sanity check run
  before training is not captured. A ``trainer.validate``/``test`` after
  ``fit`` goes on in the same run.
- ``GLOBAL``: one per training epoch: the epoch aggregates of values logged in
  training (``train_loss_epoch``, values logged with ``on_step=False``, values
  the module logs in ``on_train_epoch_end``).

Under DDP each rank writes ``worker_<global rank>``. A stop request (``tensortap
rules --stop-training``, ``Trial.request_stop``, an in-process rule) sets ``trainer.should_stop``:
``fit`` ends gracefully after the current step (across DDP ranks, which agree
every :attr:`Callback.stop_sync_steps` steps).
"""

from __future__ import annotations

import functools
import operator
import os
import re
import uuid
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar, cast

try:
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.callbacks import GradientAccumulationScheduler, StochasticWeightAveraging
    from lightning.pytorch.utilities.model_helpers import is_overridden
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError('tensortap.lightning needs PyTorch Lightning: pip install "tensortap[lightning]"') from exc

from ..modes import Mode
from . import core
from .stop import agreed, log_stop
from .torch.events import optimized_parameters, saved_parameters
from .trainers import Hook, StepCapture, check_hook_kwargs, check_stop_sync_steps, open_run, same_logged, warn_unfilled
from .writer import exception_text, logger

__all__ = ["Callback", "Hook", "callbacks_from_env"]


_DATALOADER_SUFFIX = re.compile(r"/dataloader_idx_\d+$")
"""What Lightning appends to a name logged in the evaluation of one of several dataloaders."""


def _all_logged(trainer: pl.Trainer) -> dict[str, Any]:
    """Every value Lightning holds of what the module logged with ``self.log``, aliases included."""
    return {**trainer.callback_metrics, **trainer.logged_metrics}


def _logged(trainer: pl.Trainer, since: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What the module logged with ``self.log`` so far, under the names Lightning's loggers get.

    A value logged both per step and per epoch appears in ``callback_metrics`` under
    its plain name too (``train_loss`` beside ``train_loss_step``; ``vl/dataloader_idx_0``
    beside ``vl_step/dataloader_idx_0`` with several evaluation dataloaders); that alias is left out.
    With ``since`` (:func:`_all_logged` at an evaluation run's start), only where that ``_step`` or
    ``_epoch`` name changed since: a plain name the evaluation logs, which training logs per step and
    per epoch, is the evaluation's own value (it was dropped as the alias of the training's names).
    """
    out = _all_logged(trainer)

    def alias(key: str) -> bool:
        match = _DATALOADER_SUFFIX.search(key)
        base, suffix = (key[: match.start()], match.group()) if match else (key, "")
        forks = (f"{base}_step{suffix}", f"{base}_epoch{suffix}")
        return any(f in out and (since is None or out[f] is not since.get(f)) for f in forks)

    return {k: v for k, v in out.items() if not alias(k)}


def _epoch_names(trainer: pl.Trainer) -> set[str]:
    """The names of the epoch aggregates of what training logged (``train_loss_epoch``, a value logged with
    ``on_step=False``, and its plain alias), once the epoch's end is reached: a ``TRAIN`` step takes none."""
    results = getattr(trainer, "_results", None)  # the running loop's logged values
    if results is None:
        return set()
    epoch = results.metrics(False)  # what Lightning's own reads return after the epoch's end
    return {*epoch["callback"], *epoch["log"]}


_C = TypeVar("_C", bound=pl.Callback)


def _callbacks(trainer: pl.Trainer, kind: type[_C]) -> list[_C]:
    """The trainer's callbacks of type ``kind``, in their order."""
    return [c for c in getattr(trainer, "callbacks", ()) if isinstance(c, kind)]  # a property mypy does not see


def _accumulates(trainer: pl.Trainer) -> bool:
    """Whether ``fit`` accumulates gradients over several batches in some epoch: ``accumulate_grad_batches``,
    or a ``GradientAccumulationScheduler``, which sets it at each epoch's start."""
    schedulers = _callbacks(trainer, GradientAccumulationScheduler)
    return trainer.accumulate_grad_batches > 1 or any(s.going_to_accumulate_grad_batches() for s in schedulers)


class Callback(pl.Callback):
    """Capture a Lightning ``Trainer``'s ``fit``, ``validate`` and ``test`` into a tensortap trial.

    The hook that writes is created when training, validation or test starts, in
    each process the strategy runs (so the callback may be pickled, e.g. by
    ``ddp_spawn``), and closed in :meth:`teardown`: a tuner's probe fit, which
    runs no step of this callback, opens no run. A later ``validate``/``test``/``fit`` of the
    same trainer goes on with the same run (its id is chosen here, so also in the
    processes ``ddp_spawn`` starts anew for it): its steps are numbered on from the
    ones before, in the same trial.

    Parameters
    ----------
    out_dir
        Local directory or fsspec URL of the trial.
    stop_sync_steps
        Under DDP, ranks agree on a stop request every this many ``TRAIN`` steps (one all-reduce).
    **hook_kwargs
        ``save_config``, ``include_collections``, ``reduction_config``, ``rules``, ...
        as :class:`tensortap.capture.Hook`, and ``stop_poll_seconds`` (minimum seconds
        between two looks for a stop request, default 1); checked here, at construction. The
        default saves every 100th ``TRAIN`` step and every ``EVAL`` and ``GLOBAL`` step.
    """

    def __init__(self, out_dir: str | os.PathLike[str], *, stop_sync_steps: int = 10, **hook_kwargs: Any) -> None:
        super().__init__()
        self.stop_sync_steps = check_stop_sync_steps(stop_sync_steps)
        self.out_dir = os.fspath(out_dir)
        self.hook_kwargs = hook_kwargs
        check_hook_kwargs(self.out_dir, hook_kwargs)
        self.config_path: str | None = None  # set by from_json: the hook is built from that file
        # the run of every call: pickled with the callback, so the processes that ddp_spawn or ddp_fork starts for a
        # later call (whose callback never saw the earlier call's hook) go on with it
        self._run_id = uuid.uuid4().hex
        self.hook: Hook | None = None  # after teardown, the closed hook: a later call continues its run
        self._steps: StepCapture | None = None
        self._handles: list[Any] = []
        self._module: pl.LightningModule | None = None
        self._seen: dict[Mode, dict[str, Any]] = {}  # the last value of each name taken at a step of each mode
        self._owner: dict[str, Mode] = {}  # TRAIN or GLOBAL: where a name logged in training goes
        self._run_start: dict[str, Any] = {}  # the values logged before the evaluation run now going on
        self._stepped = False
        self._defer = False  # whether a TRAIN step ends after the batch end hooks that run after this callback's
        self._pending = False  # a TRAIN step that stepped, waiting for those hooks
        self._epoch_ended = False
        self._backward_losses: list[torch.Tensor] = []  # the losses given to manual_backward in this batch
        self._warned_no_loss = False
        self._number_train = False  # number the TRAIN steps on from Lightning's count at the next batch start

    @classmethod
    def from_json(cls, path: str | os.PathLike[str], **overrides: Any) -> Callback:
        """Build a callback from a JSON hook configuration (see :meth:`tensortap.capture.Hook.from_json`).

        The file must name ``out_dir``; keyword arguments override it (``stop_sync_steps`` too).
        """
        data = core.read_json_config(path)
        out_dir = data.get("out_dir") if isinstance(data, dict) else None
        if not isinstance(out_dir, str):
            raise ValueError(f"{path}: expected a JSON object with an 'out_dir' string")
        callback = cls(out_dir, **overrides)
        probe = {**callback.hook_kwargs, "rank": 1, "include_workers": "one", "rules": None}
        # checks the file now: a rank-1 probe of include_workers="one" writes nothing
        warn_unfilled(Hook.from_json(path, **probe))
        callback.config_path = os.fspath(path)
        return callback

    def __getstate__(self) -> dict[str, Any]:
        dropped: dict[str, Any] = {"hook": None, "_steps": None, "_handles": [], "_module": None}
        dropped |= {"_seen": {}, "_run_start": {}, "_backward_losses": []}
        return {**self.__dict__, **dropped}

    # ------------------------------------------------------------- lifetime
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Note the module; the hook opens when training, validation or test starts (:meth:`_open`)."""
        self._module = pl_module

    def _open(self, trainer: pl.Trainer) -> StepCapture:
        """The steps of this process's hook, opened (rank, world size: the trainer's) at the first start of training,
        validation or test of a call of the trainer; after an earlier call, its run goes on.

        Not at :meth:`setup`: a tuner's probe fit (``Tuner.lr_find``, ``scale_batch_size``) runs this callback's
        ``setup`` and ``teardown`` around steps it runs without it; that call opens no run and ends none.
        """
        if self._steps is not None:
            return self._steps
        kwargs = {"rank": trainer.global_rank, "world_size": trainer.world_size, "run_id": self._run_id}
        kwargs |= self.hook_kwargs
        if self.config_path is None:
            self.hook = open_run(Hook, self.hook, out_dir=self.out_dir, **kwargs)
        else:
            build = cast(Callable[..., Hook], functools.partial(Hook.from_json, self.config_path))
            self.hook = open_run(build, self.hook, **kwargs)
        self._steps = StepCapture(self.hook)
        return self._steps

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Remove the optimizer hooks, publish what is left and mark this worker's run as ended (if this call
        opened it)."""
        self.close()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """Drop the step the exception interrupted, publish the others, record the end reason ``exception``."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self.hook is not None and self._steps is not None:  # else no run of this call to end
            self.hook.close_for_exit("exception", exception_text(exception))
        self._steps = None
        self._module = None

    def close(self, reason: str = "closed") -> None:
        """Publish what is left and mark this worker's run as ended. Idempotent."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        pending, self._pending = self._pending, False
        if self.hook is not None:
            self.hook.end_at_exit = None  # it holds the trainer
        if self._steps is not None:
            if pending:
                self._steps.end_train(self._parameters())
            else:
                self._steps.discard_unstepped()
        self._warn_unsaved()
        if self.hook is not None and self._steps is not None:  # else this call opened no run (or it ended)
            self.hook.close(reason)
        self._steps = None
        self._module = None

    def _warn_unsaved(self) -> None:
        """Warn once, naming them, about values logged after the last step of their mode: no step holds them."""
        module = self._module
        if module is None or self._steps is None:
            return
        try:
            now = _logged(module.trainer)
        except RuntimeError:  # the module is no longer attached to a trainer
            return
        unsaved = sorted(k for k, v in now.items() if not self._taken(k, v, same_logged))
        if unsaved:
            logger.warning(
                "tensortap: %s logged after the last step that could hold it; not captured: log it in training_step",
                ", ".join(map(repr, unsaved)),
            )

    def _taken(self, key: str, value: Any, same: Callable[[Any, Any], bool] = operator.is_) -> bool:
        """Whether ``value`` of ``key`` is the last one taken at a step of some mode (by ``same``)."""
        return any(key in seen and same(value, seen[key]) for seen in self._seen.values())

    def _new_values(self, trainer: pl.Trainer, mode: Mode, exclude: set[str] | None = None) -> dict[str, Any]:
        """The values logged at this ``mode`` step since the last look.

        Lightning stores each newly logged value as a new tensor, and keeps the last value of every
        name, whichever loop logged it: after a validation, the training loop's last value of a name
        both log comes back. So a value already taken at a step of any mode is not new. An ``EVAL``
        step takes what changed during its run (a value logged in training before it, at a batch
        whose optimizer has not stepped yet, waits for its ``TRAIN`` step); a name logged in training
        belongs to the mode (``TRAIN`` or ``GLOBAL``) of the first step it was new at. The names in
        ``exclude`` are not looked at (the epoch aggregates, for a ``TRAIN`` step ended at the epoch's end).
        """
        now = _logged(trainer, self._run_start if mode == Mode.EVAL else None)
        now = {k: v for k, v in now.items() if k not in (exclude or ())}
        if mode == Mode.EVAL:
            new = {k: v for k, v in now.items() if v is not self._run_start.get(k)}
        else:
            fresh = {k: v for k, v in now.items() if not self._taken(k, v)}
            new = {k: v for k, v in fresh.items() if self._owner.setdefault(k, mode) == mode}
        self._seen.setdefault(mode, {}).update(new)  # a value of the other mode waits for that mode's next step
        return new

    def _parameters(self) -> Iterator[tuple[str, torch.Tensor]]:
        if self._module is not None:
            yield from saved_parameters(self._module)

    # ------------------------------------------------------------- training
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Hook each optimizer's ``step()``: gradients are read when it returns, as it applied them."""
        steps = self._open(trainer)
        names = {id(p): n for n, p in saved_parameters(pl_module)}

        def after_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            self._stepped = True
            if steps.open_train():
                steps.offer_gradients((names[id(p)], p) for p in optimized_parameters(optimizer) if id(p) in names)

        for optimizer in trainer.optimizers:
            self._handles.append(optimizer.register_step_post_hook(after_step))
        self._seen = {Mode.TRAIN: _logged(trainer)}
        steps.indexed_losses = pl_module.automatic_optimization and _accumulates(trainer)
        self._defer = self._logs_after_me(trainer, pl_module)
        # resumed from a checkpoint (ckpt_path=): number on from where it was, as Lightning does; the TRAIN
        # steps at the first batch, for Lightning counts the step saved in a mid-epoch checkpoint (one taken at
        # a batch end) only as that epoch's loop starts, after on_train_start
        self._number_train = True
        steps.hook.number_on(Mode.GLOBAL, trainer.current_epoch)
        if _callbacks(trainer, StochasticWeightAveraging):
            logger.warning(
                "tensortap: StochasticWeightAveraging copies its averaged weights into the module when fit ends, "
                "after the last TRAIN step: the trial holds the weights of the optimizer steps, not the averaged "
                "ones (with BatchNorm layers, its last epoch, which only refreshes their statistics, is a TRAIN "
                "step without gradients)"
            )

    def _logs_after_me(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
        """Whether a batch end hook that Lightning runs after this callback's may log: the module's own
        ``on_train_batch_end`` (Lightning calls it after the callbacks'), or one of a callback listed after
        this one that is not Lightning's (its own callbacks do not ``log``)."""
        if is_overridden("on_train_batch_end", pl_module):
            return True
        callbacks = _callbacks(trainer, pl.Callback)
        later = callbacks[callbacks.index(self) + 1 :] if self in callbacks else []
        return any(
            is_overridden("on_train_batch_end", c)
            and not type(c).__module__.startswith(("lightning.", "pytorch_lightning."))
            for c in later
        )

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._steps is not None:
            self._end_pending(trainer)
            self._backward_losses.clear()
            if self._number_train:
                self._number_train = False
                epoch_loop = trainer.fit_loop.epoch_loop
                done = getattr(epoch_loop, "_batches_that_stepped", trainer.global_step)
                self._steps.hook.number_on(Mode.TRAIN, done)
            self._steps.open_train()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Keep the batch's loss; end the ``TRAIN`` step when the optimizer stepped; act on a stop request."""
        steps = self._steps
        if steps is None or self.hook is None:
            return
        backward, self._backward_losses = self._backward_losses, []
        if steps.hook.is_saving("losses"):
            loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
            if isinstance(loss, torch.Tensor) and pl_module.automatic_optimization:
                # Lightning divides the returned loss by accumulate_grad_batches before backward
                loss = loss * trainer.accumulate_grad_batches if trainer.accumulate_grad_batches != 1 else loss
            if isinstance(loss, torch.Tensor) or pl_module.automatic_optimization:
                steps.add_loss(loss)
            else:  # manual optimization's training_step, which need not return its loss
                self._add_backward_losses(steps, backward)
        if not self._stepped:
            return
        self._stepped = False
        if self._defer:
            self._pending = True  # what is logged after this callback at this batch end belongs to this step
            # an exception before the next batch starts (in reading it): on_exception writes this step whole
            steps.hook.end_at_exit = functools.partial(self._end_pending, trainer)
        else:
            self._end_train(trainer)
        if self._stop_agreed(trainer):
            log_stop(self.hook.stop_reason, "fit")
            trainer.should_stop = True

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        """Keep a loss given to ``manual_backward`` (unscaled, under 16-bit AMP): the loss of a manual
        optimization's batch whose ``training_step`` returns none."""
        if self._steps is None or pl_module.automatic_optimization or not isinstance(loss, torch.Tensor):
            return
        scaler = getattr(trainer.precision_plugin, "scaler", None)  # AMP's: it scales the loss before this hook
        loss = loss.detach()
        self._backward_losses.append(loss / scaler.get_scale() if scaler is not None else loss)

    def _add_backward_losses(self, steps: StepCapture, losses: list[torch.Tensor]) -> None:
        """Add the losses given to ``manual_backward`` in a batch to its ``steps``; warn once if there were none."""
        for loss in losses:
            steps.add_loss(loss)
        if not losses and not self._warned_no_loss:
            self._warned_no_loss = True
            logger.warning(
                "tensortap: training_step returned no loss and gave none to self.manual_backward: "
                "no losses/loss is saved; call self.manual_backward(loss) or return the loss"
            )

    def _end_train(self, trainer: pl.Trainer, exclude: set[str] | None = None) -> None:
        """End the ``TRAIN`` step whose optimizer stepped: the values logged in it (not the names in
        ``exclude``), the parameters now."""
        steps = self._steps
        if steps is None:
            return
        self._pending = False
        steps.hook.end_at_exit = None
        logged = self._new_values(trainer, Mode.TRAIN, exclude)
        if steps.hook.is_saving():
            steps.offer_logged(logged)
        steps.end_train(self._parameters())

    def _end_pending(self, trainer: pl.Trainer) -> None:
        """End the step left open for the batch end hooks that run after this callback's, if one is."""
        if self._pending:
            self._end_train(trainer)

    def _stop_agreed(self, trainer: pl.Trainer) -> bool:
        hook = self.hook
        if hook is None:
            return False

        def any_rank(flag: int) -> int:  # Lightning's all-reduce, of any strategy
            return int(trainer.strategy.reduce_boolean_decision(bool(flag), all=False))

        reduce = any_rank if trainer.world_size > 1 else None
        return agreed(hook.mode_step, self.stop_sync_steps, hook.stop_channel, hook.stop_poll_seconds, reduce)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The epoch is over; its ``GLOBAL`` step is written once Lightning aggregated it.

        That is after the module's own ``on_train_epoch_end`` (which runs after this
        callback's and often logs epoch values): at the next epoch's start or the end of training.
        A ``TRAIN`` step left open for later batch end hooks ends now, with none of the epoch
        aggregates Lightning's reads return from now on (they belong to the ``GLOBAL`` step).
        """
        if self._pending:
            self._end_train(trainer, _epoch_names(trainer))
        self._epoch_ended = True

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._write_epoch(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._end_pending(trainer)
        self._write_epoch(trainer)

    def _write_epoch(self, trainer: pl.Trainer) -> None:
        """Write the epoch aggregates of the values logged in training as a ``GLOBAL`` step."""
        if self._epoch_ended:
            self._epoch_ended = False
            self._write_run(trainer, Mode.GLOBAL)

    # ----------------------------------------------------------- evaluation
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """End a ``TRAIN`` step left open for later batch end hooks: validation logs ``EVAL`` values."""
        self._open(trainer)
        self._end_pending(trainer)
        self._run_start = _all_logged(trainer)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Note what was logged before the test run: its ``EVAL`` step holds what it logs."""
        self._open(trainer)
        self._run_start = _all_logged(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Write the validation run's aggregated values as one ``EVAL`` step."""
        if not trainer.sanity_checking:
            self._write_run(trainer, Mode.EVAL)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Write the test run's aggregated values as one ``EVAL`` step."""
        self._write_run(trainer, Mode.EVAL)

    def _write_run(self, trainer: pl.Trainer, mode: Mode) -> None:
        if self._steps is None:
            return
        self._steps.suspend_train()  # started inside an accumulation window: it goes on after this step
        self._steps.write_step(mode, self._new_values(trainer, mode))


def callbacks_from_env() -> list[Callback]:
    """Lightning's ``lightning.pytorch.callbacks_factory`` entry point: every ``Trainer`` gets a
    :class:`Callback` built from the JSON file named by ``TENSORTAP_CONFIG`` (none when it is unset).

    Capture without changing the training code::

        TENSORTAP_CONFIG=tensortap.json python train.py
    """
    path = core.config_path()
    return [Callback.from_json(path)] if path else []
