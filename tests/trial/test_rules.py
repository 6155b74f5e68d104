"""Built-in rules on synthetic trials written with the NumPy Writer: each fires exactly where its formula says."""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import tensortap
from tensortap import Mode, ReductionConfig, RuleInputsMissing, SaveConfig
from tensortap.capture import ShardPolicy, Writer
from tensortap.rules import (
    BUILTIN_RULES,
    AllZero,
    ClassImbalance,
    Confusion,
    DeadRelu,
    ExplodingTensor,
    FeatureImportanceOverweight,
    LossNotDecreasing,
    Overfit,
    Overtraining,
    PoorWeightInitialization,
    Rule,
    RuleConditionMet,
    RuleFailure,
    RuleRunner,
    SaturatedActivation,
    SimilarAcrossRuns,
    StalledTraining,
    StopTraining,
    TensorVariance,
    TreeDepth,
    UnchangedTensor,
    VanishingGradient,
    WeightUpdateRatio,
    invoke_rule,
    parameters,
)
from tensortap.trial.rules.loss_rules import metric_key
from tensortap.trial.rules.runner import rule_status

Values = dict[str, tuple[Any, tuple[str, ...]]]


def make_trial(
    path: Path, n: int, values: Callable[[int], Values], mode: Callable[[int], str] = lambda s: "TRAIN", **kw: Any
) -> tensortap.Trial:
    """Write ``n`` steps (``values(step)`` gives ``{name: (value, collections)}``), close, open the trial."""
    with Writer(path, **kw) as w:
        for s in range(n):
            with w.stepping(mode=mode(s)):
                for name, (v, colls) in values(s).items():
                    w.save(name, np.asarray(v), colls)
    return tensortap.create_trial(path)


def scalars(name: str, collection: str, by_step: dict[int, float]) -> Callable[[int], Values]:
    return lambda s: {name: (np.float32(by_step[s]), (collection,))} if s in by_step else {}


def each_step(rule: Rule, n: int) -> list[int]:
    """Firing steps found by invoking the rule at every integer step 0..n-1 (saved or not)."""
    return [s for s in range(n) if rule.invoke(s).fired]


# ----------------------------------------------------------------- gradients
def test_vanishing_gradient_fires_where_mean_abs_is_below_threshold(tmp_path: Path) -> None:
    scale = [1e-3, 1e-5, 1e-8, 1e-6, 0.0]
    trial = make_trial(
        tmp_path, 5, lambda s: {"gradients/fc.weight": (scale[s] * np.array([1.0, -1.0, 1.0, -1.0]), ("gradients",))}
    )
    rule = VanishingGradient(trial)
    assert invoke_rule(rule) == [2, 4]
    v = VanishingGradient(trial).invoke(2)
    assert v.reason == "gradients/fc.weight: mean |g| = 1e-08 < threshold 1e-07 at step 2"
    assert v.tensors == ("gradients/fc.weight",)
    assert invoke_rule(VanishingGradient(trial, threshold=1e-5)) == [2, 3, 4]


def test_vanishing_gradient_uses_saved_reduction_and_says_what_is_missing(tmp_path: Path) -> None:
    g = lambda s: {"gradients/w": (np.full(3, 10.0 ** -(s + 5)), ("gradients",))}  # noqa: E731
    trial = make_trial(tmp_path / "red", 4, g, reduction_config=ReductionConfig(abs_reductions=["mean"]))
    assert not trial.tensor("gradients/w").has_raw(0)
    assert invoke_rule(VanishingGradient(trial)) == [3]  # 1e-8 at step 3
    bare = make_trial(tmp_path / "bare", 4, g, reduction_config=ReductionConfig(reductions=["max"]))
    rule = VanishingGradient(bare)
    with pytest.raises(RuleInputsMissing, match="VanishingGradient found none of its inputs") as info:
        invoke_rule(rule)
    (message,) = rule.missing_inputs
    assert "'gradients'" in message and "abs_mean" in message
    assert info.value.missing == {"VanishingGradient": [message]} and info.value.fired == {"VanishingGradient": []}


def test_a_rule_that_judged_nothing_lacks_inputs_though_the_trial_has_an_eval_step(tmp_path: Path) -> None:
    """Hunt 33 H1: at an EVAL step, where no gradient (no update) was saved, a rule of gradients (or weight
    updates) looked at nothing, and that step counted as usable: one EVAL step turned "found none of its inputs"
    into a pass. A step that reads nothing and lacks nothing now judges nothing for a rule that tells its reads."""

    def values(s: int) -> Values:
        if s == 2:  # an evaluation: a loss, no gradient, no weight
            return {"losses/loss": (np.float32(1.0), ("losses",))}
        return {
            "gradients/fc.weight": (np.full(3, 1e-9), ("gradients",)),
            "fc.weight": (np.full(3, 1.0 + s), ("weights",)),
        }

    means_only = ReductionConfig(reductions=["mean"], norms=["l2"])  # no abs_mean, no raw tensor
    trial = make_trial(tmp_path, 5, values, lambda s: "EVAL" if s == 2 else "TRAIN", reduction_config=means_only)
    for rule in (VanishingGradient(trial), WeightUpdateRatio(trial)):
        with pytest.raises(RuleInputsMissing, match=f"^{rule.name} found none of its inputs"):
            invoke_rule(rule)
        assert rule.lacks_inputs and rule.evaluated_steps == 5 and rule.fired_steps == []
        restored = type(rule)(trial)
        restored.load_state_dict(rule.state_dict())
        assert restored.lacks_inputs
    raw = make_trial(tmp_path / "raw", 5, values, lambda s: "EVAL" if s == 2 else "TRAIN")
    rule = VanishingGradient(raw)
    assert invoke_rule(rule) == [0, 1, 3, 4] and not rule.lacks_inputs  # with its inputs it judges


def test_a_missing_input_names_the_collection_of_the_tensor(tmp_path: Path) -> None:
    """Hunt 33 L7: a rule over every tensor named the first collection it could read (``weights``) in what
    ``outputs/fc1`` or ``gradients/fc1.weight`` lacked; it names each tensor's own collection now."""
    v = lambda s: {  # noqa: E731
        "fc1.weight": (np.ones(3), ("weights",)),
        "gradients/fc1.weight": (np.ones(3), ("gradients",)),
        "outputs/fc1": (np.ones(3), ("outputs",)),
    }
    trial = make_trial(tmp_path, 2, v, reduction_config=ReductionConfig(reductions=["nan_count"]))
    rule = ExplodingTensor(trial)
    assert invoke_rule(rule) == [] and not rule.lacks_inputs  # the NaN counts were saved: judged with those
    lacked = {m.split(": ")[1].split("'")[1]: m.split(" with ")[0] for m in rule.missing_inputs}
    assert lacked == {
        "fc1.weight": "ExplodingTensor needs collection 'weights'",
        "gradients/fc1.weight": "ExplodingTensor needs collection 'gradients'",
        "outputs/fc1": "ExplodingTensor needs collection 'outputs'",
    }
    assert all(m.endswith("has neither reduction 'inf_count' nor its raw value") for m in rule.missing_inputs)


def test_rule_with_no_input_tensor_says_what_to_capture(tmp_path: Path) -> None:
    trial = make_trial(tmp_path, 3, scalars("losses/loss", "losses", {0: 1.0, 1: 1.0, 2: 1.0}))
    rule = VanishingGradient(trial)
    with pytest.raises(RuleInputsMissing, match="needs collection 'gradients'"):
        invoke_rule(rule)
    assert rule.lacks_inputs and any("collection 'gradients'" in m for m in rule.missing_inputs)


def test_a_rule_missing_only_some_inputs_still_judges_the_others(tmp_path: Path) -> None:
    v = lambda s: {  # noqa: E731
        "raw": (np.array([1.0, np.nan]), ("weights",)),
        "bare": (np.full(3, 1.0), ("stats",)),
    }
    configs = {"stats": {"reduction_config": ReductionConfig(reductions=["max"])}}
    trial = make_trial(tmp_path, 2, v, collection_configs=configs, include_collections=["weights", "stats"])
    assert not trial.tensor("bare").has_raw(0)
    rule = ExplodingTensor(trial, collection_names="weights,stats")
    assert invoke_rule(rule) == [0, 1]
    assert not rule.lacks_inputs and any("'bare'" in m for m in rule.missing_inputs)
    state = rule.state_dict()
    assert state["usable_steps"] == 2


def test_a_misspelled_collection_among_valid_ones_is_a_missing_input(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """hunt 48 F2: a collection named among others that is no collection of the trial was dropped without a
    word: ``ExplodingTensor(collection_names=["losses", "gradiants"])`` judged the losses alone and passed
    (``missing_inputs`` empty, exit 0) on NaN gradients; a single such name was reported. It is a missing input
    now (partial: the others are judged), logged once, naming the closest collection."""
    v = lambda s: {  # noqa: E731
        "losses/loss": (np.float32(0.875), ("losses",)),
        "gradients/fc.weight": (np.array([np.nan, 1.0]), ("gradients",)),
    }
    trial = make_trial(tmp_path, 2, v)
    assert invoke_rule(ExplodingTensor(trial, collection_names=["losses", "gradients"])) == [0, 1]
    rule = ExplodingTensor(trial, collection_names=["losses", "gradiants"])
    with caplog.at_level(logging.WARNING, logger="tensortap"):
        assert invoke_rule(rule) == []
    [message] = rule.missing_inputs  # then the valid collections: those the Writer configures
    assert message.startswith(
        "ExplodingTensor needs collection 'gradiants' with reductions nan_count, inf_count (or raw tensors): "
        f"no collection 'gradiants' in {trial.path}; did you mean 'gradients'? (valid: "
    )
    assert rule_status(rule) == "passed" and not rule.lacks_inputs  # the losses were judged
    logged = [r.getMessage() for r in caplog.records if "gradiants" in r.getMessage()]
    assert logged == [f"tensortap: {message} (first at step 0)"]
    loss = LossNotDecreasing(trial, collection_names="losss", num_steps=1)  # beside collection losses
    invoke_rule(loss)
    [message] = loss.missing_inputs
    assert f": no collection 'losss' in {trial.path}; did you mean 'losses'? (valid: " in message


def test_exploding_tensor_nan_and_inf(tmp_path: Path) -> None:
    def w(s: int) -> Values:
        v = np.ones(4, dtype=np.float32)
        if s == 3:
            v[1] = np.nan
        if s == 5:
            v[2] = -np.inf
        return {"fc.weight": (v, ("weights",)), "losses/loss": (np.float32(1.0), ("losses",))}

    trial = make_trial(tmp_path / "raw", 7, w)
    assert invoke_rule(ExplodingTensor(trial)) == [3, 5]
    assert invoke_rule(ExplodingTensor(trial, only_nan=True)) == [3]
    v = ExplodingTensor(trial).invoke(3)
    assert v.reason == "fc.weight: 1 NaN and 0 infinite value(s) at step 3" and v.tensors == ("fc.weight",)
    assert invoke_rule(ExplodingTensor(trial, collection_names=["losses"])) == []
    counts = make_trial(
        tmp_path / "counts", 7, w, reduction_config=ReductionConfig(reductions=["nan_count", "inf_count"])
    )
    assert invoke_rule(ExplodingTensor(counts, tensor_regex=r"\.weight$")) == [3, 5]


def test_exploding_tensor_does_not_count_the_infinities_of_an_attention_mask(tmp_path: Path) -> None:
    """An additive attention mask holds -inf where attention is masked: an encoding; its NaNs still count."""
    causal = np.triu(np.full((3, 3), -np.inf, dtype=np.float32), 1)

    def w(s: int) -> Values:
        mask = causal.copy()
        if s == 2:
            mask[0, 0] = np.nan
        return {
            "inputs/block.self_attn/attn_mask": (mask, ("inputs",)),
            "inputs/block/src_key_padding_mask": (causal[0], ("inputs",)),
            "inputs/masked_head/0": (np.full(2, np.inf if s == 3 else 1.0, dtype=np.float32), ("inputs",)),
        }

    trial = make_trial(tmp_path, 4, w)
    assert invoke_rule(ExplodingTensor(trial)) == [2, 3]
    assert (
        ExplodingTensor(trial)
        .invoke(2)
        .reason.startswith(
            "inputs/block.self_attn/attn_mask: 1 NaN (its infinite values encode masked positions and are not counted)"
        )
    )
    assert invoke_rule(ExplodingTensor(trial, inf_encoded_regex=None)) == [0, 1, 2, 3]


def test_poor_weight_initialization(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    good = lambda s: {  # noqa: E731
        "a.weight": (rng.normal(0, 1.0, (10, 10)), ("weights",)),  # (out, in): fan-in 10
        "b.weight": (rng.normal(0, 1.2, (10, 10)), ("weights",)),
        "norm.weight": (np.ones(10), ("weights",)),  # a 1-d scale (variance 0): not compared
        "gradients/a.weight": (rng.normal(0, 0.1, (10, 10)), ("gradients",)),
        "losses/loss": (np.float32(1.0 - 0.05 * s), ("losses",)),
    }
    assert invoke_rule(PoorWeightInitialization(make_trial(tmp_path / "good", 12, good))) == []

    def bad_variance(s: int) -> Values:
        return {**good(s), "b.weight": (rng.normal(0, 10.0, (10, 10)), ("weights",))}

    trial = make_trial(tmp_path / "var", 12, bad_variance)
    fired = invoke_rule(PoorWeightInitialization(trial))
    assert fired == list(range(10)), "every analysed step (< steps=10), none after"
    assert "no standard initialization gives layers so different" in PoorWeightInitialization(trial).invoke(0).reason
    named = PoorWeightInitialization(trial, activation_inputs_regex=r"^[ab]\.weight$")  # compared as they are
    assert "variance ratio" in named.invoke(0).reason

    def flat_loss(s: int) -> Values:
        return {**good(s), "losses/loss": (np.float32(1.0), ("losses",))}

    assert invoke_rule(PoorWeightInitialization(make_trial(tmp_path / "flat", 12, flat_loss))) == [5, 6, 7, 8, 9]

    def narrow_grad(s: int) -> Values:
        return {**good(s), "gradients/a.weight": (rng.normal(0, 1e-5, (10, 10)), ("gradients",))}

    assert invoke_rule(PoorWeightInitialization(make_trial(tmp_path / "grad", 3, narrow_grad))) == [0, 1, 2]


def test_poor_weight_initialization_that_read_nothing_lacks_inputs(tmp_path: Path) -> None:
    """hunt 48 F1: PoorWeightInitialization passed (status ``passed``, ``tensortap rules`` exit 0) where it read
    nothing: a trial without weights, gradients and losses; one that saved them from step 15 on only
    (``SaveConfig(start_step=15)``, a resumed training), ``steps`` being 10; and ``activation_inputs_regex``
    matching nothing was skipped without a word. It lacks inputs now and says what it needs (a regex matching
    nothing: a missing input beside the checks it made)."""
    rng = np.random.default_rng(0)

    def model(s: int) -> Values:
        return {
            "a.weight": (rng.normal(0, 1.0, (10, 10)), ("weights",)),
            "gradients/a.weight": (rng.normal(0, 0.1, (10, 10)), ("gradients",)),
            "losses/loss": (np.float32(1.0 - 0.05 * s), ("losses",)),
        }

    outputs = lambda s: {"outputs/fc": (np.ones(3), ("outputs",))}  # noqa: E731
    absent = PoorWeightInitialization(make_trial(tmp_path / "absent", 12, outputs))
    with pytest.raises(RuleInputsMissing):
        invoke_rule(absent)
    assert rule_status(absent) == "inputs_missing"
    for needed in ("collection 'weights' with raw tensors", "collection 'gradients' with raw", "collection 'losses'"):
        assert any(m.startswith(f"PoorWeightInitialization needs {needed}") for m in absent.missing_inputs), needed
    late = make_trial(tmp_path / "late", 30, lambda s: {**outputs(s), **(model(s) if s >= 15 else {})})
    rule = PoorWeightInitialization(late)
    with pytest.raises(RuleInputsMissing):
        invoke_rule(rule)
    assert list(rule.missing_inputs) == [
        "PoorWeightInitialization needs weights, gradients or losses saved at a step below steps=10 to judge "
        "(parameter steps): it read none there (it judges the first steps of a training only)"
    ]
    rule = PoorWeightInitialization(late, steps=20)  # steps 15-19 judged
    assert invoke_rule(rule) == [] and rule_status(rule) == "passed" and rule.missing_inputs == {}
    rule = PoorWeightInitialization(make_trial(tmp_path / "good", 12, model), activation_inputs_regex="zzz")
    assert invoke_rule(rule) == [] and rule_status(rule) == "passed"
    assert rule.missing_inputs == {"PoorWeightInitialization needs a tensor of regex(es) zzz: none in the trial": 0}


# ------------------------------------------------------- reads across shards
def two_workers_one_shard_damaged(path: Path) -> Path:
    """Steps 0-11 of ``gradients/fc.weight`` from two workers: worker 0 (three steps a shard) tiny at steps
    1, 4, 7 and 10 and with a NaN at step 5, its shard of steps 6-8 damaged; worker 1 (four steps a shard)
    tiny at every step."""
    for rank, max_steps in ((0, 3), (1, 4)):
        with Writer(path, rank=rank, shard_policy=ShardPolicy(max_steps=max_steps)) as w:
            for s in range(12):
                with w.stepping():
                    g = np.full(4, 1e-9 if rank == 1 or s % 3 == 1 else 1.0, dtype=np.float32)
                    if rank == 0 and s == 5:
                        g[0] = np.nan
                    w.save("gradients/fc.weight", g, ["gradients"])
    damaged = sorted((path / "shards" / "worker_0").glob("*.h5"))[2]
    damaged.write_bytes(b"\x89HDF junk" * 100)
    return path


def test_every_rule_of_a_run_skips_the_steps_of_a_shard_found_damaged(tmp_path: Path) -> None:
    """Two rules on one worker's trial whose second shard (steps 3-5) is damaged: the first rule's read of step 3
    found it so and the shard was dropped; the second rule, asked next at step 3, counted it as evaluated (it
    skipped 4-5 only). Both skip 3-5 now (session 50, seen by the CLI fixer)."""
    path = tmp_path / "run"
    with Writer(path, shard_policy=ShardPolicy(max_steps=3)) as w:
        for step in range(9):
            with w.stepping():
                w.save("w", np.arange(4.0) + step, ["weights"])
    damaged = sorted((path / "shards" / "worker_0").glob("*.h5"))[1]
    damaged.write_bytes(damaged.read_bytes()[:1000])
    trial = tensortap.create_trial(path)
    rules = [AllZero(trial), ExplodingTensor(trial)]
    RuleRunner(trial, rules).run(wait=False)
    assert [(r.skipped_steps, r.evaluated_steps) for r in rules] == [([3, 4, 5], 6)] * 2


@pytest.mark.parametrize(
    ("rule_class", "fired", "reasons"),
    [
        # worker 1's gradient is tiny at every step; worker 0's at 1, 4, 7, 10, and its steps 7 and 8 are gone
        # once its shard is found damaged at step 6
        (
            VanishingGradient,
            [0, 1, 2, 3, 4, 5, 7, 8, 9, 10, 11],
            {0: "at step 0 on worker_1", 1: "at step 1 on worker_0 (also on worker_1)", 7: "at step 7 on worker_1"},
        ),
        (ExplodingTensor, [5], {5: "gradients/fc.weight: 1 NaN and 0 infinite value(s) at step 5 on worker_0"}),
    ],
)
def test_rules_read_each_workers_steps_across_shards_and_skip_a_damaged_one(
    tmp_path: Path, rule_class: type[Rule], fired: list[int], reasons: dict[int, str]
) -> None:
    """Rules read a shard's steps at once (Tensor._window): each step is judged on the value of every worker that
    saved it, each in its own shards (three steps a shard on worker 0, four on worker 1), and the step where a
    shard is found damaged is skipped. Before hunt 44 F2, only the first worker's value was judged."""
    path = two_workers_one_shard_damaged(tmp_path / "run")
    rule = rule_class(tensortap.create_trial(path))
    assert invoke_rule(rule, wait=False) == fired
    assert rule.skipped_steps == [6] and rule.evaluated_steps == 11
    trial = tensortap.create_trial(path)
    assert [s for s in range(12) if rule_class(trial).invoke(s).fired] == fired, "a new rule at each step"
    for step, reason in reasons.items():
        assert rule_class(trial).invoke(step).reason.endswith(reason)


def test_class_rules_pool_the_labels_and_predictions_of_every_worker(tmp_path: Path) -> None:
    """hunt 44 F2: each rank saves the labels of its own share of the samples; ClassImbalance counted worker_0's
    alone (here 450 of 915 labels: fewer than its 500 samples, so it judged nothing) and Confusion judged
    worker_0's predictions alone (all correct). Both pool every worker's now."""
    labels = {(0, 0): [0] * 200 + [1] * 40, (0, 1): [0] * 250 + [1] * 10, (1, 0): [0] * 200 + [1] * 10}
    labels[(1, 1)] = [0] * 200 + [1] * 5  # {(step, rank): labels}
    for rank in (0, 1):
        with Writer(tmp_path / "imbalance", rank=rank, world_size=2) as w:
            for s in range(2):
                with w.stepping():
                    w.save("labels", np.array(labels[(s, rank)]), ["labels"])
    trial = tensortap.create_trial(tmp_path / "imbalance")
    zeros, ones = (sum(v.count(c) for v in labels.values()) for c in (0, 1))
    assert (zeros, ones) == (850, 65)
    assert invoke_rule(ClassImbalance(trial)) == [1]  # after step 0: 450 against 50, a ratio of 9
    rule = ClassImbalance(trial)
    assert not rule.invoke(0).fired
    assert rule.invoke(1).reason == (
        f"labels: class 0 has {zeros} samples, class 1 {ones}: ratio {zeros / ones:.3g} > threshold_imbalance 10 "
        f"(over {zeros + ones} labels) at step 1"
    )

    pairs = {0: ([0, 0, 1, 1], [0, 0, 1, 1]), 1: ([0, 1], [1, 1])}  # {rank: (labels, predictions)}
    for rank, (y, p) in pairs.items():
        with Writer(tmp_path / "confusion", rank=rank, world_size=2) as w, w.stepping():
            w.save("labels", np.array(y), ["labels"])
            w.save("predictions", np.array(p), ["predictions"])
    verdict = Confusion(tensortap.create_trial(tmp_path / "confusion")).invoke(0)
    assert verdict.reason == "predicted class 1: 0.75 correct < min_diag 0.9 at step 0"  # 3 of its 4 samples


def test_class_rules_judge_the_workers_that_saved_labels_and_predictions(tmp_path: Path) -> None:
    """hunt 56 F5: both workers save labels, worker_0 alone its predictions (all wrong). The worker sets
    differed, so Confusion and ClassImbalance judged no prediction and passed without a word. They judge
    worker_0's pairs now and name worker_1 as missing; with no worker saving both, the run lacks inputs."""
    for rank in (0, 1):
        with Writer(tmp_path / "some", rank=rank, world_size=2) as w:
            for _ in range(3):
                with w.stepping():
                    w.save("labels", np.array([0, 1] * 300), ["labels"])
                    if rank == 0:
                        w.save("predictions", np.array([1, 0] * 300), ["predictions"])
    trial = tensortap.create_trial(tmp_path / "some")
    for rule in (Confusion(trial), ClassImbalance(trial)):
        assert invoke_rule(rule) == [0, 1, 2]
        assert list(rule.missing_inputs) == [
            f"{rule.name} needs collection 'predictions' with raw tensors (no ReductionConfig, or "
            "ReductionConfig(save_raw_tensor=True)): 'labels' and 'predictions' of as many samples on worker_1"
        ]
    for rank in (0, 1):
        with Writer(tmp_path / "none", rank=rank, world_size=2) as w, w.stepping():
            name = "labels" if rank else "predictions"
            w.save(name, np.array([0, 1]), [name])
    with pytest.raises(RuleInputsMissing, match="of as many samples on worker_1, worker_0"):
        invoke_rule(Confusion(tensortap.create_trial(tmp_path / "none")))


def test_overfit_compares_each_workers_validation_with_its_own_training_loss(tmp_path: Path) -> None:
    """hunt 44 F2: worker_1's validation loss is twice its training loss, worker_0's 5% above. Only worker_0's
    losses were read: Overfit did not fire. Each worker's validation is compared with its own training loss
    now, never another worker's."""
    for rank, val in ((0, 1.05), (1, 2.0)):
        with Writer(tmp_path, rank=rank, world_size=2) as w:
            for _ in range(3):
                with w.stepping():
                    w.save("losses/loss", np.float32(1.0), ["losses"])
                    w.save("losses/val_loss", np.float32(val), ["losses"])
    trial = tensortap.create_trial(tmp_path)
    assert invoke_rule(Overfit(trial)) == [0, 1, 2]
    verdict = Overfit(trial).invoke(0)
    assert verdict.reason == (
        "losses/val_loss on worker_1: validation loss 2 is 1 x above training loss 1 of losses/loss on worker_1 "
        "(> ratio_threshold 0.1 for 1 evaluation(s)) at step 0"
    )
    assert verdict.tensors == ("losses/val_loss", "losses/loss")


def test_each_worker_is_judged_on_the_steps_it_saved(tmp_path: Path) -> None:
    """hunt 56 F1: worker_1 saves the loss and a weight at even steps only, worker_0 at every step; both flat.
    The series of a tensor was built from every worker's steps, so worker_1 was read at odd steps it never
    saved: the read failed and the whole step went unjudged, worker_0's verdict too (LossNotDecreasing never
    fired; UnchangedTensor and WeightUpdateRatio lost every step worker_1 saved). Each worker's series holds
    its own steps now."""
    for rank in (0, 1):
        with Writer(tmp_path, rank=rank, world_size=2) as w:
            for s in range(12):
                with w.stepping("TRAIN"):
                    if rank == 0 or s % 2 == 0:
                        w.save("losses/loss", np.float32(1.0), ["losses"])
                        w.save("fc.weight", np.full(4, 1.0, np.float32), ["weights"])
    trial = tensortap.create_trial(tmp_path)
    loss = LossNotDecreasing(trial, num_steps=4)
    assert invoke_rule(loss) == [4, 8] and not loss.lacks_inputs
    assert "losses/loss on worker_1: loss 1 at TRAIN step 4 (mean of 2 saved steps) did not change" in (
        LossNotDecreasing(trial, num_steps=4).invoke(4).reason or ""
    )
    assert invoke_rule(UnchangedTensor(trial, num_steps=3)) == list(range(2, 12))
    assert invoke_rule(WeightUpdateRatio(trial)) == list(range(1, 12))
    assert UnchangedTensor(trial, num_steps=3).invoke(4).reason == (
        "fc.weight: unchanged over its last 3 saved steps (2, 3, 4; rtol=1e-05, atol=1e-08) at step 4 on worker_0 "
        "(also on worker_1)"
    )


def test_overfit_keeps_no_training_loss_of_a_worker_that_never_validates(tmp_path: Path) -> None:
    """hunt 56 F2: two workers train 20 epochs of 10 TRAIN steps; rank 0 alone saves a validation loss at its
    EVAL step (the usual DDP pattern). Overfit and Overtraining kept every training loss of worker_1 (200, growing
    with the training) in their state: a validation consumed the training losses of its own worker only. It
    consumes those of every worker not evaluating now, so at most one epoch's are kept."""
    for rank in (0, 1):
        with Writer(tmp_path, rank=rank, world_size=2) as w:
            for _ in range(20):
                for _ in range(10):
                    with w.stepping("TRAIN"):
                        w.save("losses/loss", np.float32(1.0), ["losses"])
                with w.stepping("EVAL"):
                    if rank == 0:
                        w.save("losses/val_loss", np.float32(1.5), ["losses"])
    trial = tensortap.create_trial(tmp_path)
    for rule in (Overfit(trial), Overtraining(trial)):
        kept = []
        for s in trial.steps():
            rule.invoke(s)
            kept.append(sum(len(vs) for vs in rule.train_values.values()))
        assert max(kept) == 20, "one epoch of each worker's training losses at most"
    # each validation of worker_0 is judged at the next step, which ends its run, the last at the training's end
    assert invoke_rule(Overfit(trial)) == [*range(11, 220, 11), 219]


def test_a_live_runner_judges_a_step_of_several_workers_once_every_worker_wrote_it(tmp_path: Path) -> None:
    """hunt 44 F2, live (``tensortap rules --follow``): worker_0 has written steps 0-5, worker_1 steps 0-2 so far.
    The runner judges steps 0-2 only (a step is complete when every worker wrote it), then worker_1's NaN at
    step 3 once it is written, naming worker_1."""
    path = tmp_path / "run"
    with Writer(path, rank=0, world_size=2) as w:
        run_steps_of(w, range(6))
    late = Writer(path, rank=1, world_size=2, shard_policy=ShardPolicy(max_steps=1))
    run_steps_of(late, range(3))
    late.flush()
    trial = tensortap.create_trial(path)
    rule = ExplodingTensor(trial)
    runner = RuleRunner(trial, [rule])
    assert runner.run(wait=False) == {rule: []} and rule.last_step == 2
    run_steps_of(late, range(3, 6), nan_at=3)
    late.close()
    assert runner.run(wait=False) == {rule: [3, 4, 5]}
    assert ExplodingTensor(trial).invoke(3).reason == "w: 4 NaN and 0 infinite value(s) at step 3 on worker_1"


def run_steps_of(w: Writer, steps: range, nan_at: int | None = None) -> None:
    """Save weight ``w`` at ``steps``, NaN from step ``nan_at`` on."""
    for s in steps:
        with w.stepping():
            v = np.full(4, np.nan if nan_at is not None and s >= nan_at else float(s), dtype=np.float32)
            w.save("w", v, ["weights"])


# --------------------------------------------------------------- activations
def test_saturated_activation(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)

    def x(s: int) -> Values:
        t = rng.normal(0, 1, (32, 8))
        if s == 1:
            t[:, :6] = 20.0  # 6 of 8 tanh units beyond 9.4999 for every sample: 75% > 50%
        if s == 2:
            t[:, :4] = -20.0  # 50%: not more than threshold_layer
        sig = rng.normal(0, 1, (32, 4))
        if s == 3:
            sig[:, :3] = -30.0  # below -23 for sigmoid
        return {
            "inputs/tanh1": (t, ("inputs",)),
            "inputs/sigmoid_out": (sig, ("inputs",)),
            "inputs/fc": (np.full((32, 8), 50.0), ("inputs",)),
        }

    trial = make_trial(tmp_path, 4, x)
    assert invoke_rule(SaturatedActivation(trial)) == [1, 3]
    assert "inputs/tanh1: 75% of its 8 tanh units are saturated" in SaturatedActivation(trial).invoke(1).reason


def test_dead_relu(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)

    def y(s: int) -> Values:
        out = np.maximum(rng.normal(0, 1, (64, 10)), 0)
        if s == 1:
            out[:, :6] = 0.0
        if s == 2:
            out[:, :5] = 0.0
        return {"outputs/relu1": (out, ("outputs",))}

    trial = make_trial(tmp_path, 3, y)
    assert invoke_rule(DeadRelu(trial)) == [1]
    assert DeadRelu(trial).invoke(1).reason.startswith("outputs/relu1: 60% of its 10 units are dead")
    assert invoke_rule(DeadRelu(trial, threshold_layer=40.0)) == [1, 2]


# ------------------------------------------------------------ weight updates
def test_weight_update_ratio(tmp_path: Path) -> None:
    w = [np.ones(10), np.ones(10) + 0.01, np.ones(10) + 0.01, (np.ones(10) + 0.01) * 100]
    trial = make_trial(tmp_path, 4, lambda s: {"fc.weight": (w[s], ("weights",))})
    assert invoke_rule(WeightUpdateRatio(trial)) == [2, 3]
    assert "< small_threshold" in WeightUpdateRatio(trial).invoke(2).reason


def test_weight_update_ratio_ignores_eval_steps(tmp_path: Path) -> None:
    w = [np.ones(4), np.ones(4), np.ones(4) * 1.5, np.ones(4) * 1.5]
    modes = ["TRAIN", "EVAL", "TRAIN", "EVAL"]
    trial = make_trial(tmp_path, 4, lambda s: {"fc.weight": (w[s], ("weights",))}, mode=lambda s: modes[s])
    assert invoke_rule(WeightUpdateRatio(trial)) == []


def test_weight_update_ratio_norms_wake_no_blas(tmp_path: Path) -> None:
    """hunt 44 F4: the ratio's norms were ``np.linalg.norm``, a BLAS ``dot`` on float64 arrays, which woke
    OpenBLAS's thread pool on the training thread (in-process: a training 6x slower on a busy 2-core host).
    They are the ``l2`` reduction now (a sum of squares): no dot, matmul or linalg call, the same value."""
    import cProfile
    import pstats

    rng = np.random.default_rng(0)
    w = [rng.normal(size=(64, 64)) * (1 + 0.1 * s) for s in range(3)]
    trial = make_trial(tmp_path, 3, lambda s: {"fc.weight": (w[s], ("weights",))})
    rule = WeightUpdateRatio(trial, large_threshold=0.05)
    profile = cProfile.Profile()
    fired = profile.runcall(invoke_rule, rule)
    called = [f"{file}:{fn}" for file, _, fn in pstats.Stats(profile).stats]  # type: ignore[attr-defined]
    assert [c for c in called if "dot" in c or "matmul" in c or "linalg" in c] == []
    assert fired == [1, 2]
    expected = np.linalg.norm(w[1] - w[0]) / (np.linalg.norm(w[0]) + 1e-9)
    assert (
        f"update/weight ratio {expected:.3g} (steps 0->1)"
        in WeightUpdateRatio(trial, large_threshold=0.05).invoke(1).reason
    )


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: DeadRelu(threshold_layer=150), "threshold_layer: expected a finite number in [0, 100], got 150"),
        (lambda: DeadRelu(threshold_inactivity=101), "threshold_inactivity: expected a finite number in [0, 100]"),
        (lambda: SaturatedActivation(threshold_layer=-1), "threshold_layer: expected a finite number in [0, 100]"),
        (lambda: SaturatedActivation(threshold_inactivity=200), "threshold_inactivity: expected a finite number in"),
        (lambda: AllZero(threshold=150), "threshold: expected a finite number in [0, 100], got 150"),
        (
            lambda: ClassImbalance(threshold_misprediction=5),
            "threshold_misprediction: expected a finite number in [0, 1]",
        ),
        (lambda: Confusion(min_diag=3), "min_diag: expected a finite number in [0, 1], got 3"),
        (lambda: Confusion(max_off_diag=2), "max_off_diag: expected a finite number in [0, 1], got 2"),
        (lambda: FeatureImportanceOverweight(threshold=1.5), "threshold: expected a finite number in [0, 1], got 1.5"),
        (lambda: WeightUpdateRatio(small_threshold=20), "small_threshold 20 >= large_threshold 10: the band"),
        (lambda: WeightUpdateRatio(large_threshold=1e-3, small_threshold=1e-2), "small_threshold 0.01 >= large_thr"),
    ],
)
def test_a_parameter_out_of_its_range_is_refused(make: Callable[[], Rule], message: str) -> None:
    """hunt 44 F3: percentages above 100, fractions above 1 and a WeightUpdateRatio band with
    ``small_threshold >= large_threshold`` were taken: a rule that could never fire passed (``dead_relu``
    with ``threshold_layer=150`` on a layer 100% dead), one with an empty band fired at every step, and
    ``AllZero(threshold=150)`` fired or not depending on whether reductions or raw tensors were saved."""
    with pytest.raises(ValueError) as info:
        make()
    assert message in str(info.value)


BOOLEAN_PARAMETERS = [
    (cls, p.name) for cls in BUILTIN_RULES.values() for p in parameters(cls) if p.annotation == "bool"
]


@pytest.mark.parametrize(("cls", "name"), BOOLEAN_PARAMETERS, ids=[f"{c.__name__}.{n}" for c, n in BOOLEAN_PARAMETERS])
def test_a_boolean_parameter_takes_a_bool_alone(cls: type[Rule], name: str) -> None:
    """hunt 48 F3: a boolean parameter given as a string from Python (a configuration read as text) was taken
    as True: ``UnchangedTensor(equal_nan="False")`` fired at 16 steps where ``equal_nan=False`` fired at none,
    ``ExplodingTensor(only_nan="false")`` left the infinities out. A string is refused now, naming the
    parameter; a bool and a ``numpy.bool_`` are taken (as bools)."""
    assert len(BOOLEAN_PARAMETERS) == 5  # only_nan, equal_nan, argmax, use_losses_collection, stop_training_on_fire
    for text in ("False", "false", "no"):
        with pytest.raises(ValueError, match=f"^{name}: expected a bool, got '{text}'$"):
            cls(**{name: text})
    with pytest.raises(ValueError, match=f"^{name}: expected a bool, got 0$"):
        cls(**{name: 0})
    for value in (True, np.bool_(True)):
        rule = cls(**{name: value})
        assert getattr(rule, name, True) is True  # kept as a Python bool where the rule keeps it


def test_numpy_scalars_are_numbers(tmp_path: Path) -> None:
    """hunt 48 F4: NumPy scalars (a threshold computed with NumPy) were refused with a message saying they were
    no number: ``LossNotDecreasing(num_steps=np.int64(5))``: "expected an integer >= 1, got np.int64(5)". They are
    taken now, as Python numbers (a rule's state holds JSON values); bools and float integers are still refused."""
    trial = losses_trial(tmp_path)
    rule = LossNotDecreasing(trial, num_steps=np.int64(3), diff_percent=np.float32(0.0))
    assert type(rule.num_steps) is int and type(rule.diff_percent) is float
    assert invoke_rule(rule) == [3, 6, 9, 12, 15, 18]
    json.dumps(rule.state_dict())
    assert TensorVariance(max_threshold=np.float32(10)).max_threshold == 10.0
    assert DeadRelu(threshold_layer=np.float32(40), min_samples=np.uint8(4)).threshold_layer == 40.0
    for bad in (True, np.bool_(True), np.float64(5.0), "5"):
        with pytest.raises(ValueError, match=r"^num_steps: expected an integer >= 1, got "):
            LossNotDecreasing(num_steps=bad)
    with pytest.raises(ValueError, match=r"^threshold_layer: expected a finite number in \[0, 100\], got "):
        DeadRelu(threshold_layer=np.float32(140))


def test_a_rule_that_could_judge_no_step_lacks_inputs(tmp_path: Path) -> None:
    """hunt 44 F5: a rule that could not judge a single step passed (``tensortap rules`` exit 0):
    WeightUpdateRatio with ``num_steps`` below the save interval, and with one saved step; UnchangedTensor with
    fewer than ``num_steps`` saved steps; LossNotDecreasing with no saved step ``num_steps`` back. Each now lacks
    inputs once the training has ended and says what it needed; one that judged a step passes or fires as
    before, and while the training runs a rule that has not judged yet is not said to lack anything."""
    values = lambda s: {  # noqa: E731
        "fc.weight": (np.ones(4), ("weights",)),
        "losses/loss": (np.float32(1.0), ("losses",)),
    }
    sparse = make_trial(tmp_path / "sparse", 41, values, save_config=SaveConfig(save_interval=10))
    one = make_trial(tmp_path / "one", 1, values)
    cases = [
        (
            lambda t: WeightUpdateRatio(t, num_steps=5),
            "WeightUpdateRatio needs weights saved at most num_steps=5 steps apart (parameter num_steps): saved 10 "
            "steps apart at the closest",
        ),
        (
            lambda t: UnchangedTensor(t, num_steps=6),
            "UnchangedTensor needs a tensor saved at 6 TRAIN (or GLOBAL) steps to judge (parameter num_steps): 5 "
            "at most",
        ),
        (
            lambda t: LossNotDecreasing(t, num_steps=50),
            "LossNotDecreasing needs a loss saved at two steps of one mode at least num_steps=50 steps apart to judge "
            "(parameter num_steps): its saved steps span 40 step(s) at most",
        ),
    ]
    for make, message in cases:
        rule = make(sparse)
        with pytest.raises(RuleInputsMissing, match=f"^{rule.name} found none of its inputs"):
            invoke_rule(rule)
        assert rule.lacks_inputs and rule.fired_steps == [] and rule.evaluated_steps == 5
        assert [m.split(";")[0] for m in rule.missing_inputs] == [message]
        restored = make(sparse)
        restored.load_state_dict(rule.state_dict())
        assert restored.lacks_inputs
    for rule, message in (
        (WeightUpdateRatio(one), "a weight saved at two TRAIN (or GLOBAL) steps to compare: each was saved at one"),
        (UnchangedTensor(one), "a tensor saved at 3 TRAIN (or GLOBAL) steps to judge (parameter num_steps): 1 at"),
        (LossNotDecreasing(one), "apart to judge (parameter num_steps): its saved steps span 0 step(s) at most"),
    ):
        with pytest.raises(RuleInputsMissing, match=re.escape(message)):
            invoke_rule(rule)
    # a step judged: as before (the weights never change, the loss does not fall)
    assert invoke_rule(WeightUpdateRatio(sparse)) == invoke_rule(WeightUpdateRatio(sparse, num_steps=10))
    assert invoke_rule(WeightUpdateRatio(sparse)) == [10, 20, 30, 40]
    assert invoke_rule(UnchangedTensor(sparse, num_steps=5)) == [40]
    assert invoke_rule(LossNotDecreasing(sparse, num_steps=40)) == [40]
    # while the training runs, a rule may not have judged yet
    w = Writer(tmp_path / "running", shard_policy=ShardPolicy(max_steps=1))
    with w.stepping():
        w.save("fc.weight", np.ones(4), ["weights"])
    running = tensortap.create_trial(tmp_path / "running")
    rule = WeightUpdateRatio(running)
    assert invoke_rule(rule, wait=False) == [] and not rule.lacks_inputs
    w.close()
    with pytest.raises(RuleInputsMissing, match="each was saved at one at most"):
        invoke_rule(rule)


def test_tensor_variance(tmp_path: Path) -> None:
    base = np.array([-1.0, 1.0])  # variance 1
    vals = [base, base * 10, base * 0.01]
    trial = make_trial(tmp_path, 3, lambda s: {"fc.weight": (vals[s], ("weights",))})
    assert invoke_rule(TensorVariance(trial, max_threshold=10, min_threshold=0.01)) == [1, 2]
    assert invoke_rule(TensorVariance(trial, max_threshold=10)) == [1]
    with pytest.raises(ValueError, match="max_threshold and/or min_threshold"):
        TensorVariance(trial)


def test_all_zero(tmp_path: Path) -> None:
    vals = [np.ones(4), np.zeros(4), np.array([0.0, 0.0, 1.0, 2.0])]
    trial = make_trial(tmp_path / "raw", 3, lambda s: {"fc.weight": (vals[s], ("weights",))})
    assert invoke_rule(AllZero(trial)) == [1]
    assert invoke_rule(AllZero(trial, threshold=50)) == [1, 2]
    reduced = make_trial(
        tmp_path / "red",
        3,
        lambda s: {"fc.weight": (vals[s], ("weights",))},
        reduction_config=ReductionConfig(abs_reductions=["max"]),
    )
    assert invoke_rule(AllZero(reduced)) == [1]


def test_unchanged_tensor(tmp_path: Path) -> None:
    a, b = np.arange(4.0), np.arange(4.0) + 1
    vals = [a, a, a + 1e-9, b, b, b]
    trial = make_trial(tmp_path, 6, lambda s: {"fc.weight": (vals[s], ("weights",))})
    rule = UnchangedTensor(trial, num_steps=3)
    assert each_step(rule, 6) == [2, 5]
    assert "unchanged over its last 3 saved steps (0, 1, 2" in UnchangedTensor(trial).invoke(2).reason
    assert invoke_rule(UnchangedTensor(trial, num_steps=4)) == []


def test_unchanged_tensor_judges_train_steps(tmp_path: Path) -> None:
    modes = ["TRAIN", "EVAL", "EVAL", "EVAL", "TRAIN", "TRAIN", "TRAIN"]
    vals = [0.0, 1.0, 1.0, 1.0, 1.0, 2.0, 2.0]  # weights do not change while evaluating (steps 1-3)
    trial = make_trial(
        tmp_path, 7, lambda s: {"fc.weight": (np.full(3, vals[s]), ("weights",))}, mode=lambda s: modes[s]
    )
    assert invoke_rule(UnchangedTensor(trial)) == []
    assert invoke_rule(UnchangedTensor(trial, num_steps=2)) == [6]


# -------------------------------------------------------------------- losses
def test_loss_not_decreasing_example_from_the_docstring(tmp_path: Path) -> None:
    loss = {0: 0.30, 4: 0.33, 8: 0.31, 12: 0.30, 16: 0.28}
    trial = make_trial(
        tmp_path,
        17,
        lambda s: {"losses/loss": (np.float32(loss.get(s, 9.0)), ("losses",))},
        save_config=SaveConfig(save_interval=4),
    )
    assert trial.steps() == [0, 4, 8, 12, 16]
    rule = LossNotDecreasing(trial, num_steps=10, window=1)
    assert each_step(rule, 17) == [12]
    v = LossNotDecreasing(trial, num_steps=10, window=1)
    assert invoke_rule(v) == [12]
    assert invoke_rule(LossNotDecreasing(trial, num_steps=4)) == [4]  # 0.33 vs 0.30; later checks decrease
    # the default window (num_steps): the loss at 12 is the mean of 4, 8, 12 (0.3133), 4.4% above 0.30
    assert invoke_rule(LossNotDecreasing(trial, num_steps=10)) == [12]
    with pytest.raises(RuleConditionMet) as info:
        invoke_rule(LossNotDecreasing(trial, num_steps=10), raise_eval_cond=True)
    assert info.value.reason == (
        "losses/loss: loss 0.3133 at TRAIN step 12 (mean of 3 saved steps) rose 4.4% from 0.3 at TRAIN step 0 "
        "(num_steps 10; needs a decrease > 0%)"
    )


def test_loss_not_decreasing_diff_percent_and_increase_between_checks(tmp_path: Path) -> None:
    loss = [1.0, 0.99, 0.985, 1.2, 0.9, 0.89]
    trial = make_trial(tmp_path, 6, lambda s: {"losses/loss": (np.float32(loss[s]), ("losses",))})
    # checks at 2 (vs 0: -1.5%), 4 (vs 2: -8.6%); step 3 is 21.8% above the check at 2
    assert invoke_rule(LossNotDecreasing(trial, num_steps=2, window=1)) == [3]
    assert invoke_rule(LossNotDecreasing(trial, num_steps=2, window=1, increase_threshold_percent=50)) == []
    assert invoke_rule(
        LossNotDecreasing(trial, num_steps=2, window=1, diff_percent=2.0, increase_threshold_percent=50)
    ) == [2]
    # means of two steps: 0.995 at 1, 0.9875 at 2 (vs 1.0 at 0: -1.25%), 1.0925 at 3 (10.6% above the check
    # at 2, but its window holds step 2: not judged), 1.05 at 4 (vs 0.9875 at 2: +6.3%, fires), 0.895 at 5
    assert invoke_rule(LossNotDecreasing(trial, num_steps=2)) == [4]
    # between checks, a window that holds no step of the last check's is judged: at 3 (vs the check at 1)
    assert invoke_rule(LossNotDecreasing(trial, num_steps=3, window=2)) == [3]


def test_loss_not_decreasing_judges_evaluations_apart_from_training(tmp_path: Path) -> None:
    modes = ["TRAIN", "TRAIN", "EVAL", "TRAIN", "TRAIN", "EVAL", "TRAIN", "TRAIN", "EVAL"]
    loss = [1.0, 0.9, 2.0, 0.8, 0.7, 2.0, 0.6, 0.5, 2.0]  # training decreases, evaluation stays at 2.0
    trial = make_trial(
        tmp_path, 9, lambda s: {"losses/loss": (np.float32(loss[s]), ("losses",))}, mode=lambda s: modes[s]
    )
    # an evaluation (here one EVAL step) is judged at the next step, which shows it is over, or at the trial's end
    assert invoke_rule(LossNotDecreasing(trial, num_steps=1)) == [6, 8]
    assert invoke_rule(LossNotDecreasing(trial, num_steps=1, mode="TRAIN")) == []


def test_loss_not_decreasing_judges_each_mode_on_its_own_live_as_offline(tmp_path: Path) -> None:
    """hunt 44 F1: the rule judged a loss in the first of EVAL, TRAIN, GLOBAL in which it had steps *so far*: a
    live runner judged the flat training loss until the first evaluation (fired at step 3), then the
    evaluations alone; offline it judged the evaluations alone and passed. Each mode is now a series of its own,
    judged whenever the rule runs: the training loss fires at TRAIN steps 3 and 6, live and offline."""
    modes = ["TRAIN"] * 6 + ["EVAL", "TRAIN", "TRAIN", "EVAL", "TRAIN"]
    loss = [1.0] * 6 + [2.0, 1.0, 1.0, 1.5, 1.0]  # training flat; the evaluation falls
    w = Writer(tmp_path, shard_policy=ShardPolicy(max_steps=1))
    live = LossNotDecreasing(None, num_steps=3, window=1)
    fired: list[int] = []
    for s, (mode, value) in enumerate(zip(modes, loss, strict=True)):
        with w.stepping(mode=mode):
            w.save("losses/loss", np.float32(value), ["losses"])
        if s == 0:
            live.base_trial = tensortap.create_trial(tmp_path)
            runner = RuleRunner(live.base_trial, [live])
        fired += runner.run(wait=False)[live]
    w.close()
    fired += runner.run()[live]
    trial = tensortap.create_trial(tmp_path)
    assert fired == invoke_rule(LossNotDecreasing(trial, num_steps=3, window=1)) == [3, 7]
    reason = LossNotDecreasing(trial, num_steps=3, window=1).invoke(7).reason
    assert "at TRAIN step 6 did not change from 1 at TRAIN step 3" in reason
    assert invoke_rule(LossNotDecreasing(trial, num_steps=1, window=1, mode="EVAL")) == []


def test_overfit(tmp_path: Path) -> None:
    val = {1: 1.05, 3: 1.2, 5: 1.0, 7: 1.3, 9: 1.3}

    def v(s: int) -> Values:
        out: Values = {"losses/loss": (np.float32(1.0), ("losses",))}
        if s in val:
            out["losses/val_loss"] = (np.float32(val[s]), ("losses",))
        return out

    trial = make_trial(tmp_path, 10, v)
    assert invoke_rule(Overfit(trial)) == [3, 7, 9]
    assert invoke_rule(Overfit(trial, patience=2)) == [9]
    assert invoke_rule(Overfit(trial, start_step=4)) == [7, 9]
    assert "validation loss 1.2 is 0.2 x above training loss 1" in Overfit(trial).invoke(3).reason


def test_overtraining(tmp_path: Path) -> None:
    """A training loss and a validation loss per round (XGBoost): each round's training loss is judged."""
    train = [1.0, 0.9, 0.8, 0.8, 0.8, 0.8, 0.75]

    def v(s: int) -> Values:
        return {n: (np.float32(x), ("losses",)) for n, x in (("losses/loss", train[s]), ("losses/val_loss", 2 - s))}

    trial = make_trial(tmp_path, 7, v)
    assert invoke_rule(Overtraining(trial, patience_train=3)) == [5]
    assert invoke_rule(Overtraining(trial)) == []
    only_training = make_trial(tmp_path / "train", 7, scalars("losses/loss", "losses", dict(enumerate(train))))
    with pytest.raises(RuleInputsMissing, match="no validation loss"):
        invoke_rule(Overtraining(only_training))


def test_stalled_training_fires_while_waiting(tmp_path: Path) -> None:
    w = Writer(tmp_path, shard_policy=ShardPolicy(max_steps=1))
    for _ in range(3):
        with w.stepping():
            w.save("losses/loss", np.float32(1.0), ["losses"])
    w.flush()

    def finish() -> None:
        time.sleep(2.0)
        with w.stepping():
            w.save("losses/loss", np.float32(1.0), ["losses"])
        w.close()

    t = threading.Thread(target=finish)
    t.start()
    rule = StalledTraining(tensortap.create_trial(tmp_path), threshold=0.8)
    assert invoke_rule(rule) == [2]
    t.join()
    assert rule.last_step == 3
    assert invoke_rule(StalledTraining(tensortap.create_trial(tmp_path), threshold=0.0)) == []


# ----------------------------------------------------------- other runs
def test_similar_across_runs(tmp_path: Path) -> None:
    vals = lambda s: {"fc.weight": (np.arange(3.0) + s, ("weights",))}  # noqa: E731
    other = make_trial(tmp_path / "other", 5, vals)
    changed = {"fc.weight": (np.zeros(3), ("weights",))}
    trial = make_trial(tmp_path / "base", 5, lambda s: vals(s) if s != 3 else changed)
    assert invoke_rule(SimilarAcrossRuns(trial, other_trials=other)) == [3]
    assert invoke_rule(SimilarAcrossRuns(trial, other_trials=str(tmp_path / "other"))) == [3]
    # hunt 48 F7: a TrialNotFound that read as the error of the trial judged, naming no parameter
    with pytest.raises(ValueError, match=f"^other_trials: no tensortap trial at {tmp_path / 'none'}: nothing exists"):
        SimilarAcrossRuns(trial, other_trials=str(tmp_path / "none"))


# ----------------------------------------------------------- classification
def test_class_imbalance(tmp_path: Path) -> None:
    labels = np.array([0] * 990 + [1] * 10, dtype=np.float32)
    trial = make_trial(tmp_path / "imb", 1, lambda s: {"labels": (labels, ("labels",))})
    rule = ClassImbalance(trial)
    assert invoke_rule(rule) == [0]
    assert "ratio 99 > threshold_imbalance 10" in ClassImbalance(trial).invoke(0).reason

    balanced = np.array([0, 1] * 200, dtype=np.float32)
    good = make_trial(
        tmp_path / "bal", 3, lambda s: {"labels": (balanced, ("labels",)), "predictions": (balanced, ("predictions",))}
    )
    assert invoke_rule(ClassImbalance(good)) == []  # 400 labels, then 800 >= 500: balanced, predicted right
    wrong = make_trial(
        tmp_path / "wrong",
        2,
        lambda s: {"labels": (balanced, ("labels",)), "predictions": (np.zeros(400), ("predictions",))},
    )
    assert invoke_rule(ClassImbalance(wrong)) == [1]  # judged once 800 >= 500 labels are seen
    assert invoke_rule(ClassImbalance(wrong, samples=100)) == [0, 1]
    # the fraction 1 read as a count: "class 1: 1 of its 400 samples mispredicted"
    assert ClassImbalance(wrong, samples=100).invoke(0).reason == (
        "labels, predictions: class 1: 100% (200 of 200) of its samples mispredicted > threshold_misprediction "
        "0.7 at step 0"
    )


def test_confusion(tmp_path: Path) -> None:
    y = np.array([0, 1, 2] * 30, dtype=np.float32)
    bad = y.copy()
    bad[:30] = 0  # labels 1 and 2 among the first 30 predicted as 0
    trial = make_trial(
        tmp_path, 2, lambda s: {"labels": (y, ("labels",)), "predictions": (y if s == 0 else bad, ("predictions",))}
    )
    assert invoke_rule(Confusion(trial)) == [1]
    assert invoke_rule(Confusion(trial, min_diag=0.5, max_off_diag=0.5)) == []


# ---------------------------------------------------------------- trees
@pytest.mark.parametrize("num_feature", [np.nan, np.inf, -3.0, 1e30, np.array([[2.0, 3.0]])])
def test_feature_importance_overweight_takes_no_strangers_number_of_features(
    tmp_path: Path, num_feature: object
) -> None:
    """A trial's ``hyperparameters/num_feature`` that is no count (NaN raised ValueError in the rule) is not
    taken: the features saved are counted."""

    def v(s: int) -> Values:
        out: Values = {
            f"feature_importance/weight/f{i}": (np.float64(x), ("feature_importance",))
            for i, x in enumerate([10, 5, 5, 1, 1])
        }
        out["hyperparameters/num_feature"] = (np.asarray(num_feature, dtype=np.float64), ("hyperparameters",))
        return out

    trial = make_trial(tmp_path, 1, v)
    verdict = FeatureImportanceOverweight(trial).invoke(0)
    assert verdict.fired and "the 3 most important of 5 features (" in verdict.reason, verdict.reason


def test_feature_importance_overweight(tmp_path: Path) -> None:
    imp = [[1, 1, 1, 1, 1], [10, 5, 5, 1, 1]]

    def v(s: int) -> Values:
        out: Values = {
            f"feature_importance/weight/f{i}": (np.float64(x), ("feature_importance",)) for i, x in enumerate(imp[s])
        }
        out["feature_importance/gain/f0"] = (np.float64(100.0), ("feature_importance",))
        return out

    trial = make_trial(tmp_path, 2, v)
    assert invoke_rule(FeatureImportanceOverweight(trial)) == [1]
    assert "hold 0.909 of the importance" in FeatureImportanceOverweight(trial).invoke(1).reason


def test_tree_depth(tmp_path: Path) -> None:
    nan = np.nan
    shallow = {"Tree": [0, 0, 0], "Node": [0, 1, 2], "Yes": [1, nan, nan], "No": [2, nan, nan]}
    deep = {
        "Tree": [0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1],
        "Node": [0, 1, 2, 0, 1, 2, 3, 4, 5, 6, 7, 8],
        "Yes": [1, nan, nan, 1, 3, nan, 5, nan, 7, nan, nan, nan],
        "No": [2, nan, nan, 2, 4, nan, 6, nan, 8, nan, nan, nan],
    }
    trees = [shallow, deep]
    trial = make_trial(
        tmp_path,
        2,
        lambda s: {f"trees/{c}": (np.asarray(v, dtype=np.float64), ("trees",)) for c, v in trees[s].items()},
    )
    assert invoke_rule(TreeDepth(trial)) == [0]
    assert "depth 1 < depth 4" in TreeDepth(trial).invoke(0).reason
    assert invoke_rule(TreeDepth(trial, depth=5)) == [0, 1]


@pytest.mark.parametrize(("max_depth", "fired"), [(1, []), (0, [0, 1, 2]), (2, [1, 2]), (None, [0, 1, 2])])
def test_tree_depth_expects_no_tree_deeper_than_max_depth(
    tmp_path: Path, max_depth: int | None, fired: list[int]
) -> None:
    """Trees of depth 1 fired at every step of a model whose max_depth was 1: they cannot be deeper. max_depth
    0 is no limit; the value saved last before the step counts (max_depth 1, then 2 from step 1)."""
    nan = np.nan
    stump = {"Tree": [0, 0, 0], "Node": [0, 1, 2], "Yes": [1, nan, nan], "No": [2, nan, nan]}

    def values(s: int) -> Values:
        out: Values = {f"trees/{c}": (np.asarray(v, dtype=np.float64), ("trees",)) for c, v in stump.items()}
        if max_depth is not None and (s == 0 or (max_depth == 2 and s == 1)):
            out["hyperparameters/max_depth"] = (
                np.float32(1 if s == 0 and max_depth == 2 else max_depth),
                ("hyperparameters",),
            )
        return out

    trial = make_trial(tmp_path, 3, values)
    assert invoke_rule(TreeDepth(trial)) == fired
    if max_depth == 2:
        reason = TreeDepth(trial).invoke(1).reason
        assert "depth 1 < 2 (depth 4, capped by hyperparameters/max_depth 2) at step 1" in reason, reason


def test_tree_depth_says_when_max_depth_is_not_in_the_trial(tmp_path: Path) -> None:
    """A healthy max_depth=3 model captured without hyperparameters fires against the default depth 4: the
    reason says max_depth was unknown (hunt 31 L4); with max_depth saved, it does not fire."""
    nan = np.nan
    depth3 = {  # one tree: 0 -> 1 -> 3 -> 5
        "Tree": [0] * 7,
        "Node": [0, 1, 2, 3, 4, 5, 6],
        "Yes": [1, 3, nan, 5, nan, nan, nan],
        "No": [2, 4, nan, 6, nan, nan, nan],
    }

    def values(max_depth: bool) -> Values:
        out: Values = {f"trees/{c}": (np.asarray(v, dtype=np.float64), ("trees",)) for c, v in depth3.items()}
        if max_depth:
            out["hyperparameters/max_depth"] = (np.int64(3), ("hyperparameters",))
        return out

    unknown = make_trial(tmp_path / "unknown", 1, lambda s: values(False))
    assert invoke_rule(TreeDepth(unknown)) == [0]
    reason = TreeDepth(unknown).invoke(0).reason
    assert "depth 3 < depth 4" in reason, reason
    assert "hyperparameters/max_depth is not in the trial" in reason, reason
    assert invoke_rule(TreeDepth(make_trial(tmp_path / "known", 1, lambda s: values(True)))) == []


# ------------------------------------------------------------- invoke_rule
def losses_trial(path: Path) -> tensortap.Trial:
    return make_trial(path, 20, lambda s: {"losses/loss": (np.float32(1.0), ("losses",))})


def test_invoke_rule_on_ended_trial_returns_and_raise_eval_cond(tmp_path: Path) -> None:
    trial = losses_trial(tmp_path)
    assert trial.training_ended
    assert invoke_rule(LossNotDecreasing(trial, num_steps=5)) == [5, 10, 15]
    with pytest.raises(RuleConditionMet) as info:
        invoke_rule(LossNotDecreasing(trial, num_steps=5), raise_eval_cond=True)
    err = info.value
    assert (err.rule_name, err.step) == ("LossNotDecreasing", 5)
    assert err.reason.startswith("losses/loss: loss 1 at TRAIN step 5 (mean of 5 saved steps) did not change from 1")
    assert invoke_rule(LossNotDecreasing(trial, num_steps=5), start_step=6, end_step=15) == [6, 11]


def test_invoke_rule_waits_for_steps_written_while_it_runs(tmp_path: Path) -> None:
    w = Writer(tmp_path, shard_policy=ShardPolicy(max_steps=1))
    written_after_start: list[int] = []
    started = threading.Event()

    def train() -> None:
        started.wait(10)
        for s in range(12):
            time.sleep(0.05)
            with w.stepping():
                w.save("losses/loss", np.float32(1.0 if s < 8 else float("nan")), ["losses"])
            written_after_start.append(s)
        w.close()

    t = threading.Thread(target=train)
    t.start()
    rule = ExplodingTensor(tensortap.create_trial(tmp_path))
    started.set()
    assert invoke_rule(rule) == [8, 9, 10, 11]
    t.join()
    assert written_after_start == list(range(12))
    assert rule.last_step == 11


def test_state_dict_resumes(tmp_path: Path) -> None:
    trial = losses_trial(tmp_path)
    whole = invoke_rule(LossNotDecreasing(trial, num_steps=3))
    first = LossNotDecreasing(trial, num_steps=3)
    part = invoke_rule(first, end_step=8)
    state = json.loads(json.dumps(first.state_dict()))
    second = LossNotDecreasing(trial, num_steps=3)
    second.load_state_dict(state)
    assert part + invoke_rule(second) == whole == [3, 6, 9, 12, 15, 18]
    assert second.fired_steps == whole
    with pytest.raises(ValueError, match="cannot load into Overfit"):
        Overfit(trial).load_state_dict(state)
    # a state of the form Overfit kept before its counts were per metric (no state_version): refused, named
    older = {**Overfit(trial).state_dict(), "attrs": {"train_values": {}, "exceeded": 2, "open_runs": {}}}
    del older["state_version"]
    with pytest.raises(ValueError, match=r"another form of Overfit \(state_version 1; this tensortap's is 3\)"):
        Overfit(trial).load_state_dict(older)


@pytest.mark.parametrize(
    ("make", "version"),
    [
        (PoorWeightInitialization, 1),
        (UnchangedTensor, 1),
        (WeightUpdateRatio, 1),
        (Overfit, 2),
        (Overtraining, 2),
    ],
)
def test_a_state_saved_before_rules_judged_each_worker_is_refused(
    tmp_path: Path, make: Callable[[Any], Rule], version: int
) -> None:
    """hunt 56 F9: UnchangedTensor and WeightUpdateRatio kept no state before (state_version 1, no attrs),
    Overfit and Overtraining kept their losses by name (state_version 2). Such a state loaded without a word and
    resumed wrongly (UnchangedTensor lacked inputs on a trial it had judged; Overfit's counts restarted). It is
    refused now, saying to run the rule from the start."""
    trial = losses_trial(tmp_path)
    older = {**make(trial).state_dict(), "state_version": version}
    with pytest.raises(ValueError, match=rf"state_version {version}; this tensortap's is {version + 1}\): run the"):
        make(trial).load_state_dict(older)


def test_stop_training_action_writes_the_request(tmp_path: Path) -> None:
    trial = losses_trial(tmp_path)
    assert invoke_rule(LossNotDecreasing(trial, num_steps=5), actions=[StopTraining()]) == [5, 10, 15]
    req = trial.stop_request()
    assert req["rule"] == "LossNotDecreasing" and req["step"] == 5 and req["tensors"] == ["losses/loss"]
    assert req["reason"].startswith("losses/loss: loss 1 at TRAIN step 5")


# --------------------------------------------------------------- in-process
def test_in_process_rule_stops_the_hook_at_once(tmp_path: Path) -> None:
    rule = ExplodingTensor().add_action(StopTraining())
    w = Writer(tmp_path, rules=[rule])
    stopped_at = None
    for s in range(10):
        with w.stepping():
            w.save("losses/loss", np.float32(1.0 if s < 4 else float("inf")), ["losses"])
        if w.should_stop:
            stopped_at = s
            break
    w.close()
    assert stopped_at == 4 and rule.fired_steps == [4]
    trial = tensortap.create_trial(tmp_path)
    assert trial.end_reasons() == {"worker_0": "stop_request"}
    req = trial.stop_request()
    assert req["rule"] == "ExplodingTensor" and req["step"] == 4
    assert req["reason"] == "losses/loss: 0 NaN and 1 infinite value(s) at step 4"


class Flaky(Rule):
    """A rule whose own code fails at step 3 (a network call), and would fire at step 20."""

    fails_at: int | None = 3

    def invoke_at_step(self, step: int) -> bool:
        if step == self.fails_at:
            raise ConnectionError("webhook down")
        return step == 20


class FailsAtTheEnd(Rule):
    def invoke_at_step(self, step: int) -> bool:
        return False

    def on_training_end(self, last_step: int) -> bool:
        raise KeyError("summary")


def test_an_in_process_rule_switched_off_says_so(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """hunt 48 F5: an in-process rule that raised was switched off (one ERROR line), then read as ``passed``
    (``rule_status``): nothing on the rule told it, though it judged 3 steps of 30 and would have fired at step
    20. It keeps where and what it raised (``rule.switched_off``), and its status is ``switched_off``."""
    flaky, at_end, healthy = Flaky(), FailsAtTheEnd(), ExplodingTensor()
    with caplog.at_level(logging.ERROR, logger="tensortap"), Writer(tmp_path, rules=[flaky, at_end, healthy]) as w:
        for _ in range(30):
            with w.stepping():
                w.save("losses/loss", np.float32(1.0), ["losses"])
    failure = flaky.switched_off
    assert isinstance(failure, RuleFailure) and failure.step == 3 and isinstance(failure.error, ConnectionError)
    assert rule_status(flaky) == "switched_off" and flaky.evaluated_steps == 3 and flaky.fired_steps == []
    assert at_end.switched_off is not None and at_end.switched_off.step is None
    assert rule_status(at_end) == "switched_off" and at_end.evaluated_steps == 30
    assert healthy.switched_off is None and rule_status(healthy) == "passed"
    switched = [r.getMessage() for r in caplog.records if "switched off" in r.getMessage()]
    assert switched == [
        "tensortap: rule Flaky failed at step 3 and is switched off: webhook down",
        "tensortap: rule FailsAtTheEnd failed at the end of the training and is switched off: 'summary'",
    ]


def test_in_process_firings_after_the_first_are_logged_at_debug_and_summed_up(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """hunt 48 F6: an in-process rule logged a WARNING at every firing step: a training diverged at step 12 of
    200 logged 374 lines for two rules. The first firing of each rule is a WARNING, the later ones DEBUG, and
    the hook's close sums each rule that fired up in one WARNING, as ``tensortap rules --follow`` prints the
    first firing of each rule."""
    rules = [ExplodingTensor(), AllZero(collection_names="losses")]  # AllZero never fires
    with caplog.at_level(logging.DEBUG, logger="tensortap"), Writer(tmp_path, rules=rules) as w:
        for s in range(50):
            with w.stepping():
                w.save("losses/loss", np.float32(np.nan if s >= 12 else 1.0), ["losses"])
    fired = [(r.levelno, r.getMessage()) for r in caplog.records if " fired at " in r.getMessage()]
    assert [m for level, m in fired if level == logging.WARNING] == [
        "tensortap: rule ExplodingTensor fired at step 12: losses/loss: 1 NaN and 0 infinite value(s) at step 12",
        "tensortap: rule ExplodingTensor fired at 38 step(s) of this training, first at step 12, last at step 49",
    ]
    later = [m for level, m in fired if level == logging.DEBUG]
    assert len(later) == 37 and later[-1].startswith("tensortap: rule ExplodingTensor fired at step 49: ")


def test_a_rule_given_to_a_second_hook_is_logged_and_judged_afresh(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Review of hunt 48 F5/F6: the same rule objects given to a second hook (a second training): its first
    firing there was logged at DEBUG, its summary counted the first training's firings (``fired at 6 step(s) of
    this training, first at step 2``), and a rule switched off in the first training was never judged again."""
    flaky, exploding = Flaky(), ExplodingTensor()
    for run, nan_from in (("a", 2), ("b", 0)):
        caplog.clear()
        with (
            caplog.at_level(logging.WARNING, logger="tensortap"),
            Writer(tmp_path / run, rules=[flaky, exploding]) as w,
        ):
            for s in range(4):
                with w.stepping():
                    w.save("losses/loss", np.float32(np.nan if s >= nan_from else 1.0), ["losses"])
        flaky.fails_at = None
    warned = [r.getMessage() for r in caplog.records if " fired at " in r.getMessage()]
    assert warned == [
        "tensortap: rule ExplodingTensor fired at step 0: losses/loss: 1 NaN and 0 infinite value(s) at step 0",
        "tensortap: rule ExplodingTensor fired at 4 step(s) of this training, first at step 0, last at step 3",
    ]
    assert flaky.switched_off is None and flaky.evaluated_steps > 4  # judged again in the second training


def test_in_process_rule_configures_capture(tmp_path: Path) -> None:
    rule = VanishingGradient()
    w = Writer(
        tmp_path, include_collections=["losses"], reduction_config=ReductionConfig(reductions=["max"]), rules=[rule]
    )
    assert "gradients" in w.included
    for s in range(3):
        with w.stepping():
            w.offer("gradients/w", np.full(4, 1e-9 if s == 2 else 1.0), ["gradients"])
    w.close()
    assert rule.fired_steps == [2] and rule.missing_inputs == {}
    t = tensortap.create_trial(tmp_path).tensor("gradients/w")
    assert set(t.available_reductions(0)) == {"max", "abs_mean"} and not t.has_raw(0)
    assert "gradients" in tensortap.create_trial(tmp_path).collections()


def test_in_process_keeps_history_for_unchanged_tensor(tmp_path: Path) -> None:
    rule = UnchangedTensor(num_steps=3)
    with Writer(tmp_path, rules=[rule]) as w:
        for s in range(8):
            with w.stepping(mode=Mode.TRAIN):
                w.save("fc.weight", np.arange(50.0) + (s if s < 4 else 4), ["weights"])
    assert rule.fired_steps == [6, 7]


def test_overfit_and_overtraining_judge_each_metric_against_its_own(tmp_path: Path) -> None:
    """Two metrics of different scales: an rmse in hundreds that improves and overfits, an error rate that
    neither overfits nor improves. Averaged together, the rmse decided both rules alone."""
    rmse = {"train": [300.0, 200.0, 100.0, 50.0], "validation": [310.0, 210.0, 150.0, 100.0]}
    error = {"train": [0.2, 0.2, 0.2, 0.2], "validation": [0.21, 0.21, 0.21, 0.21]}

    def v(s: int) -> Values:
        return {
            f"losses/{data}-{metric}": (np.float32(values[data][s]), ("losses",))
            for metric, values in (("rmse", rmse), ("error", error))
            for data in ("train", "validation")
        }

    trial = make_trial(tmp_path, 4, v)
    assert invoke_rule(Overfit(trial)) == [2, 3]  # rmse: 0.05, 0.05, 0.5, 1.0; error: 0.05
    reason = Overfit(trial).invoke(2).reason
    assert reason.startswith("losses/validation-rmse: validation loss 150 is 0.5 x above training loss 100 of ")
    assert "error" not in reason
    fired = Overtraining(trial, patience_train=3, patience_validation=3)
    assert invoke_rule(fired) == [3]
    reason = fired.invoke(3).reason
    assert (
        "losses/train-error: training loss 0.2" in reason and "losses/validation-error: validation loss 0.21" in reason
    )
    assert "rmse" not in reason


def test_overfit_pairs_a_validation_loss_with_the_training_loss_of_its_metric() -> None:
    same = [
        ("losses/loss", "losses/val_loss"),
        ("losses/train-logloss", "losses/validation-logloss"),
        ("losses/validation_0-logloss", "losses/validation_1-logloss"),
        ("losses/dtrain-rmse", "losses/dtest-rmse"),
        ("losses/train-logloss-mean", "losses/test-logloss-mean"),
        ("losses/out_a_loss", "losses/val_out_a_loss"),
    ]
    for training, validation in same:
        assert metric_key(training) == metric_key(validation), (training, validation)
    assert metric_key("losses/train-logloss") != metric_key("losses/validation-error")
    assert metric_key("losses/out_a_loss") != metric_key("losses/val_out_b_loss")
