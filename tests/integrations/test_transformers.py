"""tensortap.transformers with the real Hugging Face Trainer on a tiny BERT built from a config (no download)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers.docs import ROOT, python_blocks, run_block

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import tensortap  # noqa: E402
import tensortap.transformers as tth  # noqa: E402
from tensortap import Mode, SaveConfig  # noqa: E402

pytestmark = pytest.mark.torch
EVERY_STEP = SaveConfig(save_interval=1)


class Rows(torch.utils.data.Dataset):  # type: ignore[misc]
    """Random token ids with a label that depends on them."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, 50, (n, 8), generator=g)
        self.labels = (self.ids[:, 0] > 25).long()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(8, dtype=torch.long), "labels": self.labels[i]}


class Applied(transformers.TrainerCallback):  # type: ignore[misc]
    """Records the gradients optimizer.step() applied (read after it, before zero_grad)."""

    def __init__(self) -> None:
        self.grads: list[dict[str, np.ndarray]] = []

    def on_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
        self.grads.append(
            {n: p.grad.detach().numpy().copy() for n, p in model.named_parameters() if p.grad is not None}
        )


class StopAt(transformers.TrainerCallback):  # type: ignore[misc]
    """Request a stop of the training written to ``out`` at the end of the Trainer's step ``step``."""

    def __init__(self, out: Path, step: int) -> None:
        self.out, self.step = out, step

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if state.global_step == self.step:
            tensortap.create_trial(self.out).request_stop("enough")


def tiny_bert(hidden_size: int = 16) -> Any:
    config = transformers.BertConfig(
        vocab_size=50,
        hidden_size=hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=2,
    )
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config)


def arguments(tmp_path: Path, **kw: Any) -> Any:
    base = {
        "output_dir": str(tmp_path / "hf"),
        "per_device_train_batch_size": 8,
        "per_device_eval_batch_size": 8,
        "learning_rate": 1e-2,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        "use_cpu": True,
        "disable_tqdm": True,
        "seed": 0,
        "dataloader_num_workers": 0,
    }
    return transformers.TrainingArguments(**(base | kw))


def test_the_quickstart_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/quickstart-transformers.md's block, with this file's tiny BERT and data for the script's."""
    page = ROOT / "docs" / "quickstart-transformers.md"
    (block,) = python_blocks(page)
    monkeypatch.chdir(tmp_path)  # the block's TrainingArguments("out", ...)
    namespace = {"__name__": "docs", "model": tiny_bert(), "train": Rows(32, 0), "val": Rows(16, 1)}
    run_block(page, 0, block, namespace, tmp_path)


def test_train_captures_what_the_trainer_computed(tmp_path: Path) -> None:
    out = tmp_path / "trial"
    model = tiny_bert()
    applied = Applied()
    trainer = transformers.Trainer(
        model=model,
        args=arguments(tmp_path, num_train_epochs=2, eval_strategy="epoch", max_grad_norm=0.5),
        train_dataset=Rows(32, 0),
        eval_dataset=Rows(16, 1),
        callbacks=[tth.Callback(out, save_config=EVERY_STEP), applied],
    )
    trainer.train()

    trial = tensortap.create_trial(out)
    history = trainer.state.log_history
    train_logs = [h for h in history if "loss" in h]
    eval_logs = [h for h in history if "eval_loss" in h]
    assert len(trial.steps(mode=Mode.TRAIN)) == trainer.state.global_step == len(applied.grads) == 8
    assert len(trial.steps(mode=Mode.EVAL)) == len(eval_logs) == 2
    # gradients: what the optimizer applied, clipped to max_grad_norm (the logged grad_norm is before clipping)
    for i, grads in enumerate(applied.grads):
        for name, grad in grads.items():
            np.testing.assert_array_equal(trial.tensor(f"gradients/{name}").value(i, mode=Mode.TRAIN), grad)
        total = np.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for g in grads.values()))
        np.testing.assert_allclose(total, min(train_logs[i]["grad_norm"], 0.5), rtol=1e-4)
    # the parameters after the last step
    for name, p in model.named_parameters():
        np.testing.assert_array_equal(trial.tensor(name).value(7, mode=Mode.TRAIN), p.detach().numpy())
    assert "bert.embeddings.LayerNorm.bias" in trial.tensor_names(collection="biases")
    # the logs of each step in that step; evaluation metrics in EVAL steps
    for name, key in [
        ("losses/loss", "loss"),
        ("metrics/grad_norm", "grad_norm"),
        ("metrics/learning_rate", "learning_rate"),
    ]:
        got = trial.tensor(name).values(mode=Mode.TRAIN)
        np.testing.assert_allclose([got[i] for i in range(8)], [h[key] for h in train_logs], rtol=1e-6)
    got = trial.tensor("losses/eval_loss").values(mode=Mode.EVAL)
    np.testing.assert_allclose([got[0], got[1]], [h["eval_loss"] for h in eval_logs], rtol=1e-6)
    assert trial.tensor("metrics/eval_runtime").steps(mode=Mode.EVAL) == [0, 1]
    # the summary of the run: one GLOBAL step
    summary = next(h for h in history if "train_loss" in h)
    assert trial.steps(mode=Mode.GLOBAL) == [0]
    np.testing.assert_allclose(trial.tensor("losses/train_loss").value(0, mode=Mode.GLOBAL), summary["train_loss"])
    assert trial.end_reasons() == {"worker_0": "closed"}


def test_the_default_saves_every_value_the_trainer_logs_at_its_step(tmp_path: Path) -> None:
    """The Trainer logs after its step 10 (TRAIN step 9), never on the every-100th step the default saves."""
    out = tmp_path / "trial"
    trainer = transformers.Trainer(
        model=tiny_bert(),
        args=arguments(tmp_path, max_steps=20, logging_steps=10),
        train_dataset=Rows(32, 0),
        callbacks=[tth.Callback(out)],
    )
    trainer.train()
    trial = tensortap.create_trial(out)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    for name in ("losses/loss", "metrics/grad_norm", "metrics/learning_rate"):
        got = trial.tensor(name).values(mode=Mode.TRAIN)
        assert sorted(got) == [h["step"] - 1 for h in logs] == [9, 19], name
        np.testing.assert_allclose([got[9], got[19]], [h[name.split("/")[1]] for h in logs])
    assert trial.tensor("gradients/classifier.weight").steps(mode=Mode.TRAIN) == [0], "every 100th step"
    assert trial.tensor("classifier.weight").steps(mode=Mode.TRAIN) == [0]


def test_logs_a_save_config_of_ones_own_leaves_out_are_named_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``logging_steps=2`` and ``save_interval=5``: the Trainer logs after TRAIN steps 1, 3, 5, 7, 9 and the
    hook saves step 5 only; the four others were left out without a word (session 49's hunt 19, F3)."""
    out = tmp_path / "trial"
    trainer = transformers.Trainer(
        model=tiny_bert(),
        args=arguments(tmp_path, max_steps=10, logging_steps=2),
        train_dataset=Rows(32, 0),
        callbacks=[tth.Callback(out, save_config=SaveConfig(save_interval=5))],
    )
    trainer.train()
    logged = {h["step"] - 1: h["loss"] for h in trainer.state.log_history if "loss" in h}
    saved = tensortap.create_trial(out).tensor("losses/loss").values(mode=Mode.TRAIN)
    assert sorted(logged) == [1, 3, 5, 7, 9] and sorted(saved) == [5]
    np.testing.assert_allclose(saved[5], logged[5])
    warned = [r.getMessage() for r in caplog.records if "which the hook's save_config does not save" in r.getMessage()]
    assert len(warned) == 1 and "'loss'" in warned[0] and "TRAIN step 1," in warned[0], warned


def test_the_default_saves_every_predict_call(tmp_path: Path) -> None:
    """PREDICT steps had the every-100th default: the metrics of every predict() after the first were dropped."""
    out = tmp_path / "trial"
    trainer = transformers.Trainer(
        model=tiny_bert(),
        args=arguments(tmp_path, max_steps=2),
        train_dataset=Rows(16, 0),
        callbacks=[tth.Callback(out)],
    )
    trainer.train()
    losses = [trainer.predict(Rows(16, seed)).metrics["test_loss"] for seed in (1, 2)]
    trial = tensortap.create_trial(out)
    assert trial.steps(mode=Mode.PREDICT) == [0, 1]
    got = trial.tensor("losses/test_loss").values(mode=Mode.PREDICT)
    np.testing.assert_allclose([got[0], got[1]], losses)


def test_gradient_accumulation_and_stop_request(tmp_path: Path) -> None:
    out = tmp_path / "trial"
    callback = tth.Callback(out, save_config=EVERY_STEP, include_collections=["losses"], stop_poll_seconds=0)

    trainer = transformers.Trainer(
        model=tiny_bert(),
        args=arguments(tmp_path, num_train_epochs=5, gradient_accumulation_steps=2, per_device_train_batch_size=4),
        train_dataset=Rows(32, 0),
        callbacks=[StopAt(out, 3), callback],
    )
    trainer.train()
    assert trainer.state.global_step == 3, "stopped right after the step that saw the request (4 per epoch)"
    trial = tensortap.create_trial(out)
    assert len(trial.steps(mode=Mode.TRAIN)) == 3
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    got = trial.tensor("losses/loss").values(mode=Mode.TRAIN)
    np.testing.assert_allclose([got[i] for i in range(3)], losses, rtol=1e-6)
    assert trial.end_reasons() == {"worker_0": "stop_request"}
    assert trial.stop_request()["reason"] == "enough"


def test_a_stop_request_stays_the_end_reason_after_evaluate_and_predict(tmp_path: Path) -> None:
    """The example scripts evaluate after train(): that later call must not turn ``stop_request`` into ``closed``."""
    out = tmp_path / "trial"

    trainer = transformers.Trainer(
        model=tiny_bert(),
        args=arguments(tmp_path, num_train_epochs=3),
        train_dataset=Rows(32, 0),
        eval_dataset=Rows(16, 1),
        callbacks=[StopAt(out, 2), tth.Callback(out, include_collections=["losses"], stop_poll_seconds=0)],
    )
    trainer.train()
    assert trainer.state.global_step == 2
    assert tensortap.create_trial(out).end_reasons() == {"worker_0": "stop_request"}
    trainer.evaluate()
    trainer.predict(Rows(8, 2))
    trial = tensortap.create_trial(out)
    assert trial.steps(mode=Mode.EVAL) == [0] and trial.steps(mode=Mode.PREDICT) == [0]
    assert trial.end_reasons() == {"worker_0": "stop_request"}, "training ended by the request, not closed"


@pytest.mark.slow
def test_every_rank_of_a_distributed_training_stopped_by_a_request_ends_with_stop_request(tmp_path: Path) -> None:
    """Rank 1 stopped because rank 0 saw the request (the ranks agree); it recorded the end reason ``closed``."""
    worker = Path(__file__).with_name("hf_ddp_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(worker)]
    proc = subprocess.run([*cmd, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    trial = tensortap.create_trial(tmp_path / "trial")
    assert trial.workers() == ["worker_0", "worker_1"]
    for worker_name in trial.workers():
        assert sorted(trial.tensor("losses/loss").values(mode=Mode.TRAIN, worker=worker_name)) == [0, 1]
    assert trial.end_reasons() == {"worker_0": "stop_request", "worker_1": "stop_request"}


def test_a_nan_evaluation_metric_is_saved_in_its_eval_step_only(tmp_path: Path) -> None:
    """A NaN metric (``nan != nan``) made the evaluation's log unmatched: saved again in the TRAIN step."""
    out = tmp_path / "trial"

    def pearson(p: Any) -> dict[str, float]:  # constant predictions: NaN correlation
        return {"pearson": float("nan"), "accuracy": float((p.predictions.argmax(-1) == p.label_ids).mean())}

    trainer = transformers.Trainer(
        model=tiny_bert(),
        args=arguments(tmp_path, max_steps=4, eval_strategy="steps", eval_steps=2),
        train_dataset=Rows(32, 0),
        eval_dataset=Rows(16, 1),
        compute_metrics=pearson,
        callbacks=[tth.Callback(out, save_config=EVERY_STEP, include_collections=["losses", "metrics"])],
    )
    trainer.train()
    trial = tensortap.create_trial(out)
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    for name in ("losses/eval_loss", "metrics/eval_pearson", "metrics/eval_accuracy", "metrics/eval_runtime"):
        assert trial.tensor(name).steps(mode=Mode.TRAIN) == [], f"{name} in a TRAIN step"
        assert trial.tensor(name).steps(mode=Mode.EVAL) == [0, 1]
    got = trial.tensor("losses/eval_loss").values(mode=Mode.EVAL)
    np.testing.assert_allclose([got[0], got[1]], [h["eval_loss"] for h in evals])
    assert np.isnan(trial.tensor("metrics/eval_pearson").value(1, mode=Mode.EVAL))
    epochs = trial.tensor("metrics/epoch").values(mode=Mode.TRAIN)
    logged = [h["epoch"] for h in trainer.state.log_history if "loss" in h]
    np.testing.assert_allclose([epochs[s] for s in range(4)], logged)


def test_evaluate_alone(tmp_path: Path) -> None:
    out = tmp_path / "trial"
    trainer = transformers.Trainer(
        model=tiny_bert(), args=arguments(tmp_path), eval_dataset=Rows(16, 1), callbacks=[tth.Callback(out)]
    )
    metrics = trainer.evaluate()
    trial = tensortap.create_trial(out)
    assert trial.steps(mode=Mode.EVAL) == [0] and trial.steps(mode=Mode.GLOBAL) == []
    np.testing.assert_allclose(trial.tensor("losses/eval_loss").value(0, mode=Mode.EVAL), metrics["eval_loss"])
    assert trial.end_reasons() == {"worker_0": "closed"}, "closed after the evaluation"


def test_evaluate_and_predict_after_train_go_on_in_the_same_run(tmp_path: Path) -> None:
    out = tmp_path / "trial"
    trainer = transformers.Trainer(
        model=tiny_bert(),
        args=arguments(tmp_path, max_steps=2, eval_strategy="steps", eval_steps=2),
        train_dataset=Rows(16, 0),
        eval_dataset=Rows(16, 1),
        callbacks=[tth.Callback(out, save_config=EVERY_STEP)],
    )
    trainer.train()
    during = next(h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h)
    after = trainer.evaluate()
    predicted = trainer.predict(Rows(16, 2)).metrics

    trial = tensortap.create_trial(out)
    got = trial.tensor("losses/eval_loss").values(mode=Mode.EVAL)
    np.testing.assert_allclose([got[0], got[1]], [during, after["eval_loss"]])
    assert trial.steps(mode=Mode.PREDICT) == [0]
    np.testing.assert_allclose(trial.tensor("losses/test_loss").value(0, mode=Mode.PREDICT), predicted["test_loss"])
    assert trial.mode_step(trial.steps()[-1]) == (Mode.PREDICT, 0), "after the steps of train()"
    assert trial.end_reasons() == {"worker_0": "closed"}


def test_resumed_training_numbers_steps_on_from_the_checkpoint(tmp_path: Path) -> None:
    args = arguments(tmp_path, max_steps=4, save_strategy="steps", save_steps=2)
    transformers.Trainer(model=tiny_bert(), args=args, train_dataset=Rows(32, 0)).train()
    out = tmp_path / "trial"
    trainer = transformers.Trainer(
        model=tiny_bert(), args=args, train_dataset=Rows(32, 0), callbacks=[tth.Callback(out, save_config=EVERY_STEP)]
    )
    trainer.train(resume_from_checkpoint=str(tmp_path / "hf" / "checkpoint-2"))
    trial = tensortap.create_trial(out)
    assert trial.steps(mode=Mode.TRAIN) == [2, 3], "the Trainer's steps 3 and 4 (from 1), after the checkpoint's 2"
    logged = {h["step"] - 1: h["loss"] for h in trainer.state.log_history if "loss" in h}
    for step, loss in trial.tensor("losses/loss").values(mode=Mode.TRAIN).items():
        np.testing.assert_allclose(loss, logged[step])


class AfterStep(transformers.TrainerCallback):  # type: ignore[misc]
    """Records the parameters after each optimizer step (by the Trainer's 0-based step) and the gradients applied."""

    def __init__(self) -> None:
        self.params: dict[int, dict[str, np.ndarray]] = {}
        self.grads: dict[int, dict[str, np.ndarray]] = {}

    def on_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
        self.grads[state.global_step] = {n: p.grad.numpy().copy() for n, p in model.named_parameters()}

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
        self.params[state.global_step - 1] = {n: p.detach().numpy().copy() for n, p in model.named_parameters()}


def _matches_the_trainer(trial: tensortap.Trial, trainer: Any, after: AfterStep, n: int) -> None:
    """The trial's TRAIN steps are ``0 .. n-1``, each with the loss the Trainer logged and the weights and gradients
    ``after`` recorded of two parameters."""
    logged = {h["step"] - 1: h["loss"] for h in trainer.state.log_history if "loss" in h}
    got = trial.tensor("losses/loss").values(mode=Mode.TRAIN)
    assert sorted(got) == sorted(logged) == list(range(n))
    np.testing.assert_allclose([got[s] for s in range(n)], [logged[s] for s in range(n)], rtol=1e-6)
    for step in range(n):
        for name in ("classifier.weight", "bert.pooler.dense.bias"):
            np.testing.assert_array_equal(trial.tensor(name).value(step, mode=Mode.TRAIN), after.params[step][name])
            np.testing.assert_array_equal(
                trial.tensor(f"gradients/{name}").value(step, mode=Mode.TRAIN), after.grads[step][name]
            )


class CtrlCAt(transformers.TrainerCallback):  # type: ignore[misc]
    """A Ctrl-C once, in the Trainer's step ``step + 1`` (from 1), before its optimizer step (listed after tensortap's
    callback: the step is begun)."""

    def __init__(self, step: int) -> None:
        self.step, self.armed = step, True

    def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if self.armed and state.global_step == self.step:
            self.armed = False
            raise KeyboardInterrupt


class BrokenAccuracy:
    """A ``compute_metrics`` with a bug until it is fixed (``broken = False``)."""

    def __init__(self) -> None:
        self.broken = True

    def __call__(self, p: Any) -> dict[str, float]:
        if self.broken:
            raise RuntimeError("a bug in compute_metrics")
        return {"accuracy": float((p.predictions.argmax(-1) == p.label_ids).mean())}


def test_a_train_interrupted_by_ctrl_c_and_resumed_in_the_same_process(tmp_path: Path) -> None:
    """A notebook: Ctrl-C in step 4 of train(), then train(resume_from_checkpoint=True) with the same Trainer.

    The unfinished step was written as a TRAIN step (the weights of the step before, no loss) and the resumed
    steps were numbered one after the Trainer's; then the dropped step's global number stayed a gap.
    """
    out = tmp_path / "trial"
    after = AfterStep()
    trainer = transformers.Trainer(
        model=tiny_bert(),
        args=arguments(tmp_path, max_steps=6, save_strategy="steps", save_steps=3),
        train_dataset=Rows(64, 0),
        callbacks=[tth.Callback(out, save_config=EVERY_STEP), CtrlCAt(3), after],
    )
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    trainer.train(resume_from_checkpoint=True)
    trial = tensortap.create_trial(out)
    assert trial.steps(mode=Mode.TRAIN) == list(range(6)) and trainer.state.global_step == 6
    # the dropped step's global number goes to the next step, as in Keras
    assert [trial.global_step(s, mode=Mode.TRAIN) for s in range(6)] == list(range(6))
    _matches_the_trainer(trial, trainer, after, 6)
    assert trial.end_reasons() == {"worker_0": "closed"}


def test_the_weights_of_a_step_before_an_evaluation_that_raised_are_the_steps(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """compute_metrics raised in the evaluation after the Trainer's step 3; train() resumed from checkpoint-2.

    The step was finished: it is kept, with its loss and the weights it produced (they were read when the
    resumed train() had already loaded checkpoint-2's). The resumed Trainer does step 3 again: the run cannot
    hold it twice, so its steps are numbered on, with a warning.
    """
    out = tmp_path / "trial"
    accuracy = BrokenAccuracy()
    after = AfterStep()

    trainer = transformers.Trainer(
        model=tiny_bert(),
        args=arguments(tmp_path, max_steps=4, eval_strategy="steps", eval_steps=3, save_strategy="steps", save_steps=2),
        train_dataset=Rows(64, 0),
        eval_dataset=Rows(16, 1),
        compute_metrics=accuracy,
        callbacks=[tth.Callback(out, save_config=EVERY_STEP), after],
    )
    with pytest.raises(RuntimeError, match="compute_metrics"):
        trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    third = after.params[2]
    accuracy.broken = False
    with caplog.at_level("WARNING", logger="tensortap"):
        trainer.train(resume_from_checkpoint=True)
    assert "numbered on from 3, not as the Trainer counts" in caplog.text
    trial = tensortap.create_trial(out)
    assert trial.steps(mode=Mode.TRAIN) == list(range(5))
    got = trial.tensor("losses/loss").values(mode=Mode.TRAIN)
    np.testing.assert_allclose([got[0], got[1], got[2]], losses, rtol=1e-6)
    for name in ("classifier.weight", "bert.pooler.dense.bias"):
        np.testing.assert_array_equal(trial.tensor(name).value(2, mode=Mode.TRAIN), third[name])


def test_an_evaluate_after_a_train_interrupted_mid_step_drops_the_unfinished_step(tmp_path: Path) -> None:
    """hunt 46 F5: a notebook: Ctrl-C in the Trainer's step 3 (before its optimizer step), then ``evaluate()`` (a
    "where am I?" cell), then ``train(resume_from_checkpoint=True)``.

    The evaluate wrote the unfinished step as TRAIN step 2 (the weights of step 1, no gradients, no loss), the run
    stayed open, and the resumed steps were numbered one after the Trainer's (its step 2's loss in TRAIN step 3).
    """
    out = tmp_path / "trial"
    after = AfterStep()
    trainer = transformers.Trainer(
        model=tiny_bert(),
        args=arguments(tmp_path, max_steps=6, save_strategy="steps", save_steps=2),
        train_dataset=Rows(64, 0),
        eval_dataset=Rows(16, 1),
        callbacks=[tth.Callback(out, save_config=EVERY_STEP), CtrlCAt(2), after],
    )
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    evaluated = trainer.evaluate()
    trial = tensortap.create_trial(out)
    assert trial.steps(mode=Mode.TRAIN) == [0, 1] and trial.steps(mode=Mode.EVAL) == [0]
    np.testing.assert_allclose(trial.tensor("losses/eval_loss").value(0, mode=Mode.EVAL), evaluated["eval_loss"])
    assert trial.end_reasons() == {"worker_0": "exception"}, "the train() raised; closed after the evaluate"
    trainer.train(resume_from_checkpoint=True)
    trial = tensortap.create_trial(out)
    assert trial.steps(mode=Mode.TRAIN) == list(range(6)) and trainer.state.global_step == 6
    logged = {h["step"] - 1: h["loss"] for h in trainer.state.log_history if "loss" in h}
    got = trial.tensor("losses/loss").values(mode=Mode.TRAIN)
    assert sorted(got) == sorted(logged) == list(range(6))
    np.testing.assert_allclose([got[s] for s in range(6)], [logged[s] for s in range(6)], rtol=1e-6)
    for step in range(6):
        np.testing.assert_array_equal(
            trial.tensor("classifier.weight").value(step, mode=Mode.TRAIN), after.params[step]["classifier.weight"]
        )
    assert trial.end_reasons() == {"worker_0": "closed"}


class EvaluateIn(transformers.TrainerCallback):  # type: ignore[misc]
    """Runs ``trainer.evaluate()`` once, in the event ``event`` of the Trainer's step ``step + 1`` (from 1); listed
    before tensortap's callback. ``on_substep_end``: within the step's gradient accumulation window, before its
    optimizer step; ``on_optimizer_step``: after it, before the step's end. Then raises ``error``, if given, in
    the step's ``on_step_end`` (before tensortap's)."""

    def __init__(self, trainer: Any, event: str, step: int, error: Exception | None = None) -> None:
        self.trainer, self.event, self.step, self.error = trainer, event, step, error
        self.evaluated: list[dict[str, float]] = []
        setattr(self, event, self._evaluate)

    def _evaluate(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if state.global_step == self.step and not self.evaluated:
            self.evaluated.append(self.trainer.evaluate())

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if self.error is not None and self.evaluated and state.global_step == self.step + 1:
            raise self.error


@pytest.mark.parametrize("event", ["on_substep_end", "on_optimizer_step"])
def test_an_evaluate_a_callback_runs_within_a_train_step_leaves_the_step_open(tmp_path: Path, event: str) -> None:
    """hunt 46 F5 (leftover): a callback runs ``trainer.evaluate()`` within the Trainer's step 2 (GA=2): in
    ``on_substep_end`` (between the step's two batches) or ``on_optimizer_step``.

    The evaluation ended the open TRAIN step as a finished one: within the accumulation window, TRAIN step 1 was
    written with no gradients and the weights of step 0, and the step went on as TRAIN step 2 (4 TRAIN steps for 3
    optimizer steps, every loss one step off); after the optimizer step, the step's loss went to a GLOBAL step.
    Now the EVAL step comes before the step (the evaluation saw step 0's weights) or after it (step 1's), and the
    step keeps its gradients, weights and loss."""
    out = tmp_path / "trial"
    after = AfterStep()
    trainer = transformers.Trainer(
        model=tiny_bert(),
        args=arguments(tmp_path, max_steps=3, gradient_accumulation_steps=2),
        train_dataset=Rows(48, 0),
        eval_dataset=Rows(16, 1),
    )
    evaluate = EvaluateIn(trainer, event, 1)
    for callback in (evaluate, tth.Callback(out, save_config=EVERY_STEP), after):
        trainer.add_callback(callback)
    trainer.train()
    trial = tensortap.create_trial(out)
    assert trial.steps(mode=Mode.TRAIN) == [0, 1, 2] and trainer.state.global_step == 3
    assert trial.steps(mode=Mode.EVAL) == [0] and trial.steps(mode=Mode.GLOBAL) == [0], "and the summary of train()"
    np.testing.assert_allclose(
        trial.tensor("losses/eval_loss").value(0, mode=Mode.EVAL), evaluate.evaluated[0]["eval_loss"]
    )
    _matches_the_trainer(trial, trainer, after, 3)
    saw = 0 if event == "on_substep_end" else 1  # the weights the evaluation saw: of TRAIN step saw
    evaluated_at = trial.global_step(0, mode=Mode.EVAL)
    assert trial.global_step(saw, mode=Mode.TRAIN) < evaluated_at < trial.global_step(saw + 1, mode=Mode.TRAIN)


def test_an_evaluate_held_for_its_train_step_is_written_when_train_raises_before_the_steps_end(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """hunt 46 F5 (leftover): an evaluation a callback runs after the optimizer step is written after the step;
    where ``train()`` raises before the step ends, the step and the evaluation are written, before the next cell's
    ``evaluate()``. Review 58b R58b-2: the step, whose optimizer step had run, was dropped as interrupted (and
    at the script's exit, the evaluation with it)."""
    out = tmp_path / "trial"
    trainer = transformers.Trainer(
        model=tiny_bert(),
        args=arguments(tmp_path, max_steps=3),
        train_dataset=Rows(48, 0),
        eval_dataset=Rows(16, 1),
    )
    evaluate = EvaluateIn(trainer, "on_optimizer_step", 1, RuntimeError("a callback's bug"))
    for callback in (evaluate, tth.Callback(out, save_config=EVERY_STEP)):
        trainer.add_callback(callback)
    with pytest.raises(RuntimeError, match="a callback's bug"):
        trainer.train()
    with caplog.at_level(logging.WARNING, logger="tensortap"):
        again = trainer.evaluate()
    assert "interrupted" not in caplog.text
    trial = tensortap.create_trial(out)
    assert trial.steps(mode=Mode.TRAIN) == [0, 1] and trial.steps(mode=Mode.EVAL) == [0, 1]
    assert trial.global_step(1, mode=Mode.TRAIN) < trial.global_step(0, mode=Mode.EVAL)
    np.testing.assert_array_equal(
        trial.tensor("classifier.weight").value(1, mode=Mode.TRAIN), trainer.model.classifier.weight.detach().numpy()
    )
    got = trial.tensor("losses/eval_loss").values(mode=Mode.EVAL)
    np.testing.assert_allclose([got[0], got[1]], [evaluate.evaluated[0]["eval_loss"], again["eval_loss"]])


RAISES_AFTER_AN_EVALUATION_IN_ITS_STEP = """
import sys
from pathlib import Path

import numpy as np
import transformers

sys.path.insert(0, str(Path(sys.argv[1]).parent))  # the helpers test_transformers imports
sys.path.insert(0, sys.argv[1])
from test_transformers import EVERY_STEP, EvaluateIn, Rows, arguments, tiny_bert

import tensortap.transformers as tth

tmp = Path(sys.argv[2])
trainer = transformers.Trainer(
    model=tiny_bert(), args=arguments(tmp, max_steps=3), train_dataset=Rows(48, 0), eval_dataset=Rows(16, 1)
)
evaluate = EvaluateIn(trainer, "on_optimizer_step", 1, RuntimeError("a callback's bug"))
for callback in (evaluate, tth.Callback(tmp / "trial", save_config=EVERY_STEP)):
    trainer.add_callback(callback)
try:
    trainer.train()
finally:
    np.savez(tmp / "at_exit.npz", weight=trainer.model.classifier.weight.detach().numpy(), **evaluate.evaluated[0])
"""


class OutOfMemoryAt(transformers.TrainerCallback):  # type: ignore[misc]
    """Makes ``optimizer.step()`` raise ``torch.OutOfMemoryError`` once, at the Trainer's 0-based step ``step``."""

    def __init__(self, step: int) -> None:
        self.step, self.armed = step, True

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kw: Any) -> None:
        if self.armed and state.global_step == self.step:
            self.armed = False
            step = optimizer.step

            def out_of_memory(*a: Any, **k: Any) -> None:
                optimizer.step = step
                raise torch.OutOfMemoryError("CUDA out of memory (raised by the test)")

            optimizer.step = out_of_memory


def test_a_step_whose_optimizer_step_raised_is_dropped_and_a_resumed_train_numbers_as_the_trainer(
    tmp_path: Path,
) -> None:
    """review 58c R58c-1: since 96d0cfd a step counted as trained from ``on_pre_optimizer_step`` on, which runs
    before ``optimizer.step()``: one that raised (out of memory) was written as a TRAIN step, with no loss, the
    gradients of the failed step and the weights of the step before, and ``train(resume_from_checkpoint=True)``
    was then numbered one step off the Trainer (seven TRAIN steps for six, losses shifted). The step is trained
    once ``on_optimizer_step`` comes: before, it is dropped as interrupted."""
    out = tmp_path / "trial"
    after = AfterStep()
    trainer = transformers.Trainer(
        model=tiny_bert(),
        args=arguments(tmp_path, max_steps=6, save_strategy="steps", save_steps=3),
        train_dataset=Rows(64, 0),
        callbacks=[tth.Callback(out, save_config=EVERY_STEP), OutOfMemoryAt(3), after],
    )
    with pytest.raises(torch.OutOfMemoryError):
        trainer.train()
    trainer.train(resume_from_checkpoint=True)
    trial = tensortap.create_trial(out)
    assert [trial.global_step(s, mode=Mode.TRAIN) for s in trial.steps(mode=Mode.TRAIN)] == list(range(6))
    _matches_the_trainer(trial, trainer, after, 6)


def test_an_evaluate_held_for_its_train_step_is_written_with_it_when_the_script_dies_before_the_steps_end(
    tmp_path: Path,
) -> None:
    """review 58b R58b-2: a callback evaluates in ``on_optimizer_step`` of the Trainer's step 2, then raises in
    its ``on_step_end`` (before tensortap's), and the script dies of it. The trial held TRAIN step 0 alone: the
    step whose optimizer step ran and the evaluation held for after it were lost. Both are written at exit."""
    here = str(Path(__file__).parent)
    proc = subprocess.run(
        [sys.executable, "-c", RAISES_AFTER_AN_EVALUATION_IN_ITS_STEP, here, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1 and "a callback's bug" in proc.stderr, proc.stderr[-3000:]
    at_exit = np.load(tmp_path / "at_exit.npz")
    trial = tensortap.create_trial(tmp_path / "trial")
    assert trial.steps(mode=Mode.TRAIN) == [0, 1] and trial.steps(mode=Mode.EVAL) == [0]
    assert trial.global_step(1, mode=Mode.TRAIN) < trial.global_step(0, mode=Mode.EVAL)
    np.testing.assert_array_equal(trial.tensor("classifier.weight").value(1, mode=Mode.TRAIN), at_exit["weight"])
    assert trial.tensor("gradients/classifier.weight").steps(mode=Mode.TRAIN) == [0, 1]
    np.testing.assert_allclose(trial.tensor("losses/eval_loss").value(0, mode=Mode.EVAL), at_exit["eval_loss"])
    assert trial.end_reasons() == {"worker_0": "exception"}


def test_an_evaluate_after_the_optimizer_step_of_an_unsaved_step_is_written_after_it(tmp_path: Path) -> None:
    """review 58b R58b-1: an evaluation a callback runs in ``on_optimizer_step`` of TRAIN step 1, which the
    save_config does not save (``save_interval=2``), was written before the step (global step 1), as one before
    its optimizer step; at a saved step, after it. It is after it at both: the global steps are those of a
    run that saves every step."""
    out = tmp_path / "trial"
    trainer = transformers.Trainer(
        model=tiny_bert(),
        args=arguments(tmp_path, max_steps=4, gradient_accumulation_steps=2),
        train_dataset=Rows(64, 0),
        eval_dataset=Rows(16, 1),
    )
    trainer.add_callback(EvaluateIn(trainer, "on_optimizer_step", 1))
    trainer.add_callback(tth.Callback(out, save_config=SaveConfig(save_interval=2)))
    trainer.train()
    trial = tensortap.create_trial(out)
    assert trial.steps(mode=Mode.TRAIN) == [0, 2] and trial.steps(mode=Mode.EVAL) == [0]
    assert [trial.global_step(s, mode=Mode.TRAIN) for s in (0, 2)] == [0, 3]
    assert trial.global_step(0, mode=Mode.EVAL) == 2


def test_an_evaluate_and_predict_after_a_train_that_raised_close_the_run(tmp_path: Path) -> None:
    """hunt 46 F4: ``compute_metrics`` raised in the evaluation after the Trainer's step 2; the next cell runs
    ``evaluate()`` and ``predict()`` with it fixed.

    They were taken for calls inside ``train()``: the run stayed open (``end_reasons() == {}``, readers waited for
    more) until the interpreter exited, and their steps were published only by the writer's timer.
    """
    out = tmp_path / "trial"
    accuracy = BrokenAccuracy()

    trainer = transformers.Trainer(
        model=tiny_bert(),
        args=arguments(tmp_path, max_steps=4, eval_strategy="steps", eval_steps=2),
        train_dataset=Rows(64, 0),
        eval_dataset=Rows(16, 1),
        compute_metrics=accuracy,
        callbacks=[tth.Callback(out, save_config=EVERY_STEP)],
    )
    with pytest.raises(RuntimeError, match="compute_metrics"):
        trainer.train()
    accuracy.broken = False
    trainer.evaluate()
    trainer.predict(Rows(16, 2))
    trial = tensortap.create_trial(out)
    assert trial.steps(mode=Mode.TRAIN) == [0, 1], "the steps train() finished"
    assert trial.steps(mode=Mode.EVAL) == [0] and trial.steps(mode=Mode.PREDICT) == [0]
    assert trial.training_ended and trial.end_reasons() == {"worker_0": "exception"}


def test_gradients_are_saved_only_of_the_parameters_the_optimizer_updates(tmp_path: Path) -> None:
    """hunt 46 F1: ``optimizers=(opt, None)`` with an ``opt`` of every parameter but the classifier's (which
    still gets a gradient): ``gradients/classifier.*`` were saved at every step, though nothing applied them."""
    out = tmp_path / "trial"
    model = tiny_bert()
    applied = Applied()
    opt = torch.optim.SGD([p for n, p in model.named_parameters() if not n.startswith("classifier.")], lr=0.1)
    trainer = transformers.Trainer(
        model=model,
        args=arguments(tmp_path, max_steps=2),
        train_dataset=Rows(32, 0),
        optimizers=(opt, None),
        callbacks=[tth.Callback(out, save_config=EVERY_STEP), applied],
    )
    trainer.train()
    assert "classifier.weight" in applied.grads[0], "the classifier has a gradient"
    trial = tensortap.create_trial(out)
    gradients = set(trial.tensor_names(collection="gradients"))
    stepped = {f"gradients/{n}" for n, _ in model.named_parameters() if not n.startswith("classifier.")}
    assert gradients == stepped
    np.testing.assert_array_equal(
        trial.tensor("gradients/bert.pooler.dense.weight").value(1, mode=Mode.TRAIN),
        applied.grads[1]["bert.pooler.dense.weight"],
    )


def test_a_trainer_with_model_init_keeps_its_new_models_in_one_run(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Review of hunt 46 F2: a Trainer built with ``model_init`` (a hyperparameter search, a reproducible re-init)
    makes a new model at each ``train()``: its baseline ``evaluate()`` then ``train()`` went to two runs, the
    training to ``run-0`` with a warning to give each model a callback of its own. The same Trainer's calls go
    on in one run."""
    out = tmp_path / "trial"
    trainer = transformers.Trainer(
        model_init=lambda: tiny_bert(16),
        args=arguments(tmp_path, max_steps=2),
        train_dataset=Rows(32, 0),
        eval_dataset=Rows(16, 1),
        callbacks=[tth.Callback(out, save_config=EVERY_STEP)],
    )
    with caplog.at_level("WARNING", logger="tensortap"):
        trainer.evaluate()  # the baseline, of the model made at construction
        trainer.train()  # model_init again
        trainer.evaluate()
    assert "next run" not in caplog.text
    assert not list(out.glob("run-*"))
    trial = tensortap.create_trial(out)
    assert trial.steps(mode=Mode.TRAIN) == [0, 1] and trial.steps(mode=Mode.EVAL) == [0, 1]


def test_a_callback_given_to_the_trainers_of_two_models_writes_the_trials_next_run(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """hunt 46 F2: one callback given to the Trainers of a loop over configurations (hidden size 16, then 32).

    The second model's training went into the first one's run under the same names, numbered on
    (``classifier.weight`` of shape (2, 16) at TRAIN steps 0-1, (2, 32) at 2-3), with a warning that said nothing of
    another model. Now it is the trial's next run, with one warning naming both folders, as the Keras callback
    does; the same Trainer's later calls go on in its run.
    """
    out = tmp_path / "trial"
    callback = tth.Callback(out, save_config=EVERY_STEP)
    trainers = []
    with caplog.at_level("WARNING", logger="tensortap"):
        for hidden in (16, 32):
            trainer = transformers.Trainer(
                model=tiny_bert(hidden),
                args=arguments(tmp_path, max_steps=2),
                train_dataset=Rows(32, 0),
                eval_dataset=Rows(16, 1),
                callbacks=[callback],
            )
            trainer.train()
            trainer.evaluate()
            trainers.append(trainer)
        trainers[1].evaluate()
    run = str(out / "run-0")
    assert [r.getMessage() for r in caplog.records if r.name == "tensortap"] == [
        f"tensortap: this callback wrote the steps of model 'BertForSequenceClassification' to {out}, and a run "
        "holds one model's steps: those of another model 'BertForSequenceClassification' are written to "
        f"{run}, the trial's next run. Give each model a callback of its own"
    ]
    for path, hidden, evaluations in ((out, 16, [0]), (run, 32, [0, 1])):
        trial = tensortap.create_trial(path)
        assert trial.steps(mode=Mode.TRAIN) == [0, 1] and trial.steps(mode=Mode.EVAL) == evaluations, path
        assert trial.steps(mode=Mode.GLOBAL) == [0], "one training's summary"
        weights = trial.tensor("classifier.weight").values(mode=Mode.TRAIN)
        assert {w.shape for w in weights.values()} == {(2, hidden)}
        assert trial.end_reasons() == {"worker_0": "closed"}
    np.testing.assert_array_equal(weights[1], trainers[1].model.classifier.weight.detach().numpy())


DIES_AFTER_ITS_FOURTH_STEP = """
import json, sys
from pathlib import Path

import numpy as np
import transformers

sys.path.insert(0, str(Path(sys.argv[1]).parent))  # the helpers test_transformers imports
sys.path.insert(0, sys.argv[1])
from test_transformers import EVERY_STEP, AfterStep, Rows, arguments, tiny_bert

import tensortap.transformers as tth

tmp, where = Path(sys.argv[2]), sys.argv[3]
after = AfterStep()


def save_what_the_script_knew():
    (tmp / "history.json").write_text(json.dumps(trainer.state.log_history))
    np.savez(tmp / "after.npz", **{f"{s}:{n}": v for s, ps in after.params.items() for n, v in ps.items()})


class BrokenInItsSecondEvaluation(Rows):
    reads = 0

    def __getitem__(self, i):
        self.reads += 1
        if where == "first batch" and self.reads > len(self):  # the second evaluation's first row
            save_what_the_script_knew()
            raise RuntimeError("a bug in the evaluation data")
        return super().__getitem__(i)


evaluations = []


def accuracy(p):
    evaluations.append(p)
    if where == "compute_metrics" and len(evaluations) == 2:
        save_what_the_script_knew()
        raise RuntimeError("a bug in compute_metrics")
    return {"accuracy": float((p.predictions.argmax(-1) == p.label_ids).mean())}


if where == "checkpoint":
    args = arguments(tmp, max_steps=6, save_strategy="steps", save_steps=4)
    (tmp / "hf").mkdir()
    (tmp / "hf" / "checkpoint-4").write_text("in the way")  # the checkpoint's folder cannot be made

    class Know(transformers.TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if state.global_step == 4:  # the step's log, before its checkpoint
                save_what_the_script_knew()

    extra = [Know()]
else:
    args, extra = arguments(tmp, max_steps=6, eval_strategy="steps", eval_steps=2), []
trainer = transformers.Trainer(
    model=tiny_bert(),
    args=args,
    train_dataset=Rows(64, 0),
    eval_dataset=BrokenInItsSecondEvaluation(16, 1),
    compute_metrics=accuracy,
    callbacks=[tth.Callback(tmp / "trial", save_config=EVERY_STEP), after, *extra],
)
trainer.train()
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    ("where", "error"),
    [
        ("compute_metrics", "RuntimeError: a bug in compute_metrics"),
        ("first batch", "RuntimeError: a bug in the evaluation data"),
        ("checkpoint", "FileExistsError"),
    ],
)
def test_a_script_that_dies_after_a_step_keeps_it(tmp_path: Path, where: str, error: str) -> None:
    """The script died of an error after the Trainer's step 4: in the evaluation after it (in
    ``compute_metrics``, or reading its first batch) or in saving its checkpoint.

    The step was finished and its log was in (the Trainer logs a step before it evaluates or saves), but it
    was held for late logs: the process exited with it in progress and it was lost.
    """
    here = str(Path(__file__).parent)
    proc = subprocess.run(
        [sys.executable, "-c", DIES_AFTER_ITS_FOURTH_STEP, here, str(tmp_path), where],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1 and error in proc.stderr, proc.stderr[-3000:]
    history = json.loads((tmp_path / "history.json").read_text())
    after = np.load(tmp_path / "after.npz")
    trial = tensortap.create_trial(tmp_path / "trial")
    assert trial.steps(mode=Mode.TRAIN) == [0, 1, 2, 3], "every step finished before the error"
    logged = {h["step"] - 1: h for h in history if "loss" in h}
    assert sorted(logged) == [0, 1, 2, 3]
    for name in ("losses/loss", "metrics/grad_norm", "metrics/learning_rate"):
        got = trial.tensor(name).values(mode=Mode.TRAIN)
        np.testing.assert_allclose([got[s] for s in range(4)], [logged[s][name.split("/")[1]] for s in range(4)])
    for step in range(4):
        for name in ("classifier.weight", "bert.pooler.dense.bias"):
            np.testing.assert_array_equal(trial.tensor(name).value(step, mode=Mode.TRAIN), after[f"{step}:{name}"])
    evaluations = [h for h in history if "eval_loss" in h]
    assert len(evaluations) == (0 if where == "checkpoint" else 1)
    assert trial.steps(mode=Mode.EVAL) == list(range(len(evaluations))) and trial.steps(mode=Mode.GLOBAL) == []
    if evaluations:
        got = trial.tensor("losses/eval_loss").value(0, mode=Mode.EVAL)
        np.testing.assert_allclose(got, evaluations[0]["eval_loss"])
        assert trial.tensor("losses/eval_loss").steps(mode=Mode.TRAIN) == []
    assert trial.end_reasons() == {"worker_0": "exception"}


def test_a_predict_in_a_callbacks_on_evaluate_leaves_the_evaluations_log_to_it(tmp_path: Path) -> None:
    """A callback before tensortap's predicts at each evaluation (a test set beside the validation set).

    The evaluation had logged its metrics, not yet given them to ``on_evaluate``: the ``predict`` saved them
    again, in the ``TRAIN`` step before (or a ``GLOBAL`` step).
    """
    out = tmp_path / "trial"
    predicted: list[dict[str, float]] = []

    class PredictToo(transformers.TrainerCallback):  # type: ignore[misc]
        def on_evaluate(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            predicted.append(trainer.predict(Rows(8, 2)).metrics)

    trainer = transformers.Trainer(
        model=tiny_bert(),
        args=arguments(tmp_path, max_steps=4, eval_strategy="steps", eval_steps=2),
        train_dataset=Rows(32, 0),
        eval_dataset=Rows(16, 1),
        callbacks=[PredictToo(), tth.Callback(out, save_config=EVERY_STEP)],
    )
    trainer.train()
    trial = tensortap.create_trial(out)
    history = trainer.state.log_history
    assert trial.steps(mode=Mode.TRAIN) == [0, 1, 2, 3]
    logged = [h["loss"] for h in history if "loss" in h]
    got = trial.tensor("losses/loss").values(mode=Mode.TRAIN)
    np.testing.assert_allclose([got[s] for s in range(4)], logged)
    evals = [h["eval_loss"] for h in history if "eval_loss" in h]
    got = trial.tensor("losses/eval_loss").values(mode=Mode.EVAL)
    assert sorted(got) == [0, 1]
    np.testing.assert_allclose([got[0], got[1]], evals)
    got = trial.tensor("losses/test_loss").values(mode=Mode.PREDICT)
    assert sorted(got) == [0, 1]
    np.testing.assert_allclose([got[0], got[1]], [p["test_loss"] for p in predicted])
    for name in ("losses/eval_loss", "metrics/eval_runtime", "losses/test_loss"):
        assert trial.tensor(name).steps(mode=Mode.TRAIN) == [], name
        assert trial.tensor(name).steps(mode=Mode.GLOBAL) == [], name
    assert trial.steps(mode=Mode.GLOBAL) == [0], "the summary of train() alone"


def test_a_predict_in_a_callbacks_on_step_end_comes_after_the_step_and_its_log(tmp_path: Path) -> None:
    """A callback predicts on a test set at the end of step 2, before the Trainer logs the step: the step was
    written before its log came, which went into a ``GLOBAL`` step. The step has its log, and the ``PREDICT``
    step comes after it."""
    out = tmp_path / "trial"
    predicted: list[dict[str, float]] = []

    class PredictAtStep(transformers.TrainerCallback):  # type: ignore[misc]
        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if state.global_step == 2:
                predicted.append(trainer.predict(Rows(8, 2)).metrics)

    trainer = transformers.Trainer(
        model=tiny_bert(),
        args=arguments(tmp_path, max_steps=3),
        train_dataset=Rows(32, 0),
        callbacks=[tth.Callback(out, save_config=EVERY_STEP), PredictAtStep()],
    )
    trainer.train()
    trial = tensortap.create_trial(out)
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    got = trial.tensor("losses/loss").values(mode=Mode.TRAIN)
    assert sorted(got) == [0, 1, 2]
    np.testing.assert_allclose([got[s] for s in range(3)], logged)
    assert trial.tensor("losses/loss").steps(mode=Mode.GLOBAL) == []
    np.testing.assert_allclose(trial.tensor("losses/test_loss").value(0, mode=Mode.PREDICT), predicted[0]["test_loss"])
    assert trial.global_step(1, Mode.TRAIN) < trial.global_step(0, Mode.PREDICT) < trial.global_step(2, Mode.TRAIN)
    assert trial.steps(mode=Mode.GLOBAL) == [0], "the summary of train() alone"


def test_bad_configuration_fails_at_construction(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="include_collections"):
        tth.Callback(tmp_path, include_collections=["nope"])
    with pytest.raises(ValueError, match="stop_poll_seconds"):
        tth.Callback(tmp_path, stop_poll_seconds=-1)
    assert not list(tmp_path.iterdir())


def test_collections_the_callback_never_fills_are_named_in_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """hunt 45 M3 (shared with the Lightning callback): ``include_collections=["outputs"]`` stayed empty without
    a word; one warning at construction now names it and the PyTorch hook that fills it."""
    tth.Callback(tmp_path, include_collections=["outputs", "losses"])
    warned = [r.getMessage() for r in caplog.records if "stay empty" in r.getMessage()]
    assert len(warned) == 1 and "'outputs' (include_collections)" in warned[0], warned


def test_a_key_logged_twice_in_a_step_keeps_the_last_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A ``loss`` the user logs in ``compute_loss`` and the Trainer's ``loss`` after the step: one is saved."""

    class Logging(transformers.Trainer):  # type: ignore[misc]
        def compute_loss(self, model: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
            loss = super().compute_loss(model, inputs, *args, **kwargs)
            self.log({"loss": 123.0})
            return loss

    trainer = Logging(
        model=tiny_bert(),
        args=arguments(tmp_path, max_steps=3),
        train_dataset=Rows(32, 0),
        callbacks=[tth.Callback(tmp_path / "trial", save_config=EVERY_STEP)],
    )
    trainer.train()
    trial = tensortap.create_trial(tmp_path / "trial")
    trainer_losses = [e["loss"] for e in trainer.state.log_history if "loss" in e and e["loss"] != 123.0]
    saved = trial.tensor("losses/loss").values(mode=Mode.TRAIN)
    np.testing.assert_allclose([saved[s] for s in range(3)], trainer_losses, rtol=1e-6)
    assert caplog.text.count("'loss' was logged twice in one step (123.0, then ") == 1
    assert "'epoch' was logged" not in caplog.text, "the Trainer puts the epoch on each log, the user's too"
    np.testing.assert_allclose(
        list(trial.tensor("metrics/epoch").values(mode=Mode.TRAIN).values()), [1 / 4, 2 / 4, 3 / 4]
    )


def test_a_value_logged_in_compute_loss_during_an_evaluation_is_not_the_train_steps(tmp_path: Path) -> None:
    """``evaluate`` calls ``compute_loss`` too: its first batch's log replaced the ``TRAIN`` step's value before it."""

    class Logging(transformers.Trainer):  # type: ignore[misc]
        """The Trainer docs' custom loss (a weighted cross-entropy), logging a value of its own too."""

        def compute_loss(
            self, model: Any, inputs: Any, return_outputs: bool = False, num_items_in_batch: Any = None
        ) -> Any:
            labels = inputs.pop("labels")
            outputs = model(**inputs)
            loss = torch.nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0]))(outputs.logits, labels)
            aux = float(outputs.logits.detach().pow(2).mean())
            self.log({"aux_loss": aux})
            if model.training:
                self.train_aux.append(aux)
            return (loss, outputs) if return_outputs else loss

    trainer = Logging(
        model=tiny_bert(),
        args=arguments(tmp_path, max_steps=4, eval_strategy="steps", eval_steps=2),
        train_dataset=Rows(32, 0),
        eval_dataset=Rows(16, 1),
        callbacks=[tth.Callback(tmp_path / "trial", save_config=EVERY_STEP)],
    )
    trainer.train_aux = []
    trainer.train()
    trial = tensortap.create_trial(tmp_path / "trial")
    saved = trial.tensor("losses/aux_loss").values(mode=Mode.TRAIN)
    assert sorted(saved) == [0, 1, 2, 3]
    np.testing.assert_allclose([saved[s] for s in range(4)], trainer.train_aux, rtol=1e-6)
    evals = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
    np.testing.assert_allclose(list(trial.tensor("losses/eval_loss").values(mode=Mode.EVAL).values()), evals)


class LogAtEpochEnd(transformers.TrainerCallback):  # type: ignore[misc]
    """Asks the Trainer to log at each epoch's end too (after tensortap's callback saw the flag unset)."""

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        control.should_log = True


@pytest.mark.parametrize(
    ("kw", "rows", "extra"),
    [
        pytest.param({"logging_strategy": "epoch", "num_train_epochs": 3}, 24, [], id="epoch"),
        pytest.param(
            {"logging_strategy": "epoch", "num_train_epochs": 3, "eval_strategy": "epoch"}, 24, [], id="epoch-eval"
        ),
        pytest.param(
            {
                "logging_strategy": "epoch",
                "max_steps": 6,
                "gradient_accumulation_steps": 2,
                "per_device_train_batch_size": 4,
            },
            32,
            [],
            id="epoch-accumulation-max_steps-mid-epoch",
        ),
        pytest.param(
            {"logging_strategy": "epoch", "num_train_epochs": 2, "eval_strategy": "steps", "eval_steps": 2},
            32,
            [],
            id="epoch-after-an-evaluation-at-the-epochs-last-step",
        ),
        pytest.param(
            {
                "logging_strategy": "epoch",
                "num_train_epochs": 10,
                "eval_strategy": "steps",
                "eval_steps": 3,
                "save_strategy": "steps",
                "save_steps": 3,
                "load_best_model_at_end": True,
                "learning_rate": 0.2,
            },
            32,
            [transformers.EarlyStoppingCallback(early_stopping_patience=1)],
            id="epoch-after-an-evaluation-that-stops-training-mid-epoch",
        ),
        pytest.param(
            {"logging_strategy": "epoch", "logging_first_step": True, "num_train_epochs": 1},
            8,
            [],
            id="epoch-end-logs-nothing-after-first-step",
        ),
        pytest.param(
            {"logging_steps": 3, "num_train_epochs": 2, "eval_strategy": "epoch"}, 24, [], id="steps-log-at-epoch-end"
        ),
        pytest.param({"logging_steps": 2, "num_train_epochs": 2}, 24, [LogAtEpochEnd()], id="steps-and-a-callback"),
        pytest.param(
            {"logging_steps": 3, "num_train_epochs": 2, "eval_strategy": "steps", "eval_steps": 4},
            32,
            [LogAtEpochEnd()],
            id="a-callback-after-an-evaluation-at-the-epochs-last-step",
        ),
    ],
)
def test_a_log_at_an_epochs_end_is_saved_in_the_train_step_it_follows(
    tmp_path: Path, kw: dict[str, Any], rows: int, extra: list[Any]
) -> None:
    """``logging_strategy="epoch"`` logs the epoch's loss after ``on_epoch_end``: it was saved in a GLOBAL step.

    Every training log is in the ``TRAIN`` step ``log_history`` names (its ``step - 1``), every evaluation in
    its ``EVAL`` step, and the summary of ``train()`` alone in ``GLOBAL``, also when the epoch's end logs nothing.
    """
    out = tmp_path / "trial"
    trainer = transformers.Trainer(
        model=tiny_bert(),
        args=arguments(tmp_path, **kw),
        train_dataset=Rows(rows, 0),
        eval_dataset=Rows(16, 1),
        callbacks=[tth.Callback(out), *extra],
    )
    trainer.train()
    trial = tensortap.create_trial(out)
    history = trainer.state.log_history
    logged = {h["step"] - 1: h for h in history if "loss" in h}
    assert len(logged) == len([h for h in history if "loss" in h]), "one training log per step"
    for name in ("losses/loss", "metrics/grad_norm", "metrics/learning_rate", "metrics/epoch"):
        got = trial.tensor(name).values(mode=Mode.TRAIN)
        assert sorted(got) == sorted(logged), name
        np.testing.assert_allclose([got[s] for s in sorted(got)], [logged[s][name.split("/")[1]] for s in sorted(got)])
    evals = [h["eval_loss"] for h in history if "eval_loss" in h]
    assert trial.steps(mode=Mode.EVAL) == list(range(len(evals)))
    if evals:
        got = trial.tensor("losses/eval_loss").values(mode=Mode.EVAL)
        np.testing.assert_allclose([got[s] for s in range(len(evals))], evals)
    summary = next(h for h in history if "train_loss" in h)
    assert trial.steps(mode=Mode.GLOBAL) == [0]
    assert trial.tensor("losses/loss").steps(mode=Mode.GLOBAL) == []
    np.testing.assert_allclose(trial.tensor("losses/train_loss").value(0, mode=Mode.GLOBAL), summary["train_loss"])
    assert trial.tensor("metrics/train_runtime").steps(mode=Mode.TRAIN) == []


def test_a_value_logged_in_an_evaluation_at_a_step_without_a_training_log_goes_to_a_global_step(
    tmp_path: Path,
) -> None:
    """``eval_steps=2``, ``logging_steps=3``: the evaluations at steps 2 and 4 run at a step the Trainer logs
    nothing after (hunt 29, H1). What ``compute_loss`` logged in them went into the next ``TRAIN`` step, with
    their ``epoch``; it belongs in a ``GLOBAL`` step after each evaluation, as at step 6."""

    class Logging(transformers.Trainer):  # type: ignore[misc]
        def compute_loss(
            self, model: Any, inputs: Any, return_outputs: bool = False, num_items_in_batch: Any = None
        ) -> Any:
            outputs = model(**inputs)
            if not model.training:
                self.log({"val_batch_ce": float(outputs.loss)})
            return (outputs.loss, outputs) if return_outputs else outputs.loss

    out = tmp_path / "trial"
    trainer = Logging(
        model=tiny_bert(),
        args=arguments(tmp_path, max_steps=6, logging_steps=3, eval_strategy="steps", eval_steps=2),
        train_dataset=Rows(48, 0),
        eval_dataset=Rows(8, 1),
        callbacks=[tth.Callback(out, save_config=EVERY_STEP)],
    )
    trainer.train()
    trial = tensortap.create_trial(out)
    history = trainer.state.log_history
    logged = {h["step"] - 1: h for h in history if "loss" in h}
    assert sorted(logged) == [2, 5]
    epochs = trial.tensor("metrics/epoch").values(mode=Mode.TRAIN)
    assert sorted(epochs) == [2, 5], "the TRAIN steps the Trainer logged after, no other"
    np.testing.assert_allclose([epochs[2], epochs[5]], [logged[2]["epoch"], logged[5]["epoch"]])
    assert trial.tensor("metrics/val_batch_ce").steps(mode=Mode.TRAIN) == []
    in_evals = [h["val_batch_ce"] for h in history if "val_batch_ce" in h]
    got = trial.tensor("metrics/val_batch_ce").values(mode=Mode.GLOBAL)
    assert len(in_evals) == 3 and sorted(got) == [0, 1, 2]
    np.testing.assert_allclose([got[s] for s in range(3)], in_evals)
    for s in range(3):  # each right after its evaluation
        assert trial.global_step(s, Mode.GLOBAL) == trial.global_step(s, Mode.EVAL) + 1
    evals = [h["eval_loss"] for h in history if "eval_loss" in h]
    got = trial.tensor("losses/eval_loss").values(mode=Mode.EVAL)
    np.testing.assert_allclose([got[s] for s in range(3)], evals)


class PerplexityOnEvaluate(transformers.TrainerCallback):  # type: ignore[misc]
    """Adds ``eval_perplexity`` to the metrics ``on_evaluate`` gets (the dict ``evaluate`` returns)."""

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: Any = None, **kw: Any) -> None:
        metrics["eval_perplexity"] = float(np.exp(metrics["eval_loss"]))


class PerplexityOnLog(transformers.TrainerCallback):  # type: ignore[misc]
    """Adds ``eval_perplexity`` to an evaluation's log in ``on_log`` (the dict ``evaluate`` returns)."""

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
        if "eval_loss" in logs:
            logs["eval_perplexity"] = float(np.exp(logs["eval_loss"]))


@pytest.mark.parametrize("where", ["on_evaluate-before", "on_log-after"])
def test_an_evaluations_metrics_a_callback_adds_to_are_saved_once(tmp_path: Path, where: str) -> None:
    """A callback adds a perplexity to the dict ``evaluate`` logs and gives ``on_evaluate`` (hunt 29, H1): the
    evaluation's log no longer matched its metrics, and was saved again, in the ``TRAIN`` step after (an
    evaluation at a step without a training log) or a ``GLOBAL`` step."""
    out = tmp_path / "trial"
    capture = tth.Callback(out, save_config=EVERY_STEP)
    callbacks = [PerplexityOnEvaluate(), capture] if where == "on_evaluate-before" else [capture, PerplexityOnLog()]
    trainer = transformers.Trainer(
        model=tiny_bert(),
        args=arguments(tmp_path, max_steps=6, logging_steps=3, eval_strategy="steps", eval_steps=2),
        train_dataset=Rows(48, 0),
        eval_dataset=Rows(8, 1),
        callbacks=callbacks,
    )
    trainer.train()
    trial = tensortap.create_trial(out)
    history = trainer.state.log_history
    evals = [h["eval_loss"] for h in history if "eval_loss" in h]
    assert len(evals) == 3
    got = trial.tensor("losses/eval_loss").values(mode=Mode.EVAL)
    assert sorted(got) == [0, 1, 2]
    np.testing.assert_allclose([got[s] for s in range(3)], evals)
    got = trial.tensor("metrics/eval_perplexity").values(mode=Mode.EVAL)
    np.testing.assert_allclose([got[s] for s in range(3)], np.exp(evals), rtol=1e-6)
    assert [n for n in trial.tensor_names(mode=Mode.TRAIN) if "eval" in n] == []
    assert [n for n in trial.tensor_names(mode=Mode.GLOBAL) if "eval" in n] == []
    assert trial.steps(mode=Mode.GLOBAL) == [0], "the summary of train() alone"
    logged = {h["step"] - 1: h["loss"] for h in history if "loss" in h}
    got = trial.tensor("losses/loss").values(mode=Mode.TRAIN)
    assert sorted(got) == sorted(logged) == [2, 5]
    np.testing.assert_allclose([got[2], got[5]], [logged[2], logged[5]])


def test_logs_left_out_of_include_collections_on_purpose_are_not_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``include_collections=["gradients", "weights"]``: the Trainer's logs are left out on purpose; a warning
    suggested a ``save_config`` for them (hunt 29, L1)."""
    out = tmp_path / "trial"
    trainer = transformers.Trainer(
        model=tiny_bert(),
        args=arguments(tmp_path, max_steps=3),
        train_dataset=Rows(32, 0),
        callbacks=[tth.Callback(out, include_collections=["gradients", "weights"])],
    )
    trainer.train()
    assert len([h for h in trainer.state.log_history if "loss" in h]) == 3
    trial = tensortap.create_trial(out)
    assert [n for n in trial.tensor_names() if n.startswith(("losses/", "metrics/"))] == []
    assert "save_config does not save" not in caplog.text


def test_an_integer_metric_beyond_64_bits_is_skipped_with_a_warning_naming_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``compute_metrics`` returns ``2**64``: it was left out without a word (hunt 29, L2). Like the hook's
    ``save_scalar``, it is skipped with one warning naming it; the evaluation's other metrics are saved."""
    out = tmp_path / "trial"
    trainer = transformers.Trainer(
        model=tiny_bert(),
        args=arguments(tmp_path, max_steps=4, eval_strategy="steps", eval_steps=2),
        train_dataset=Rows(32, 0),
        eval_dataset=Rows(8, 1),
        compute_metrics=lambda p: {"acc": 0.5, "big": 2**64},
        callbacks=[tth.Callback(out, save_config=EVERY_STEP)],
    )
    trainer.train()
    history = [h for h in trainer.state.log_history if "eval_loss" in h]
    assert [h["eval_big"] for h in history] == [2**64, 2**64]
    trial = tensortap.create_trial(out)
    assert "metrics/eval_big" not in trial.tensor_names()
    np.testing.assert_allclose(list(trial.tensor("metrics/eval_acc").values(mode=Mode.EVAL).values()), [0.5, 0.5])
    assert caplog.text.count("metrics/eval_big cannot be captured and is skipped") == 1
