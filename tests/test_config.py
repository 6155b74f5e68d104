"""SPEC section 3: when steps are saved, per-mode and per-collection configs, validation, JSON configs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from helpers.trials import default_value, run_steps, write_trial

import tensortap
from tensortap import Collection, Mode, ReductionConfig, SaveConfig
from tensortap.capture import Hook, Writer
from tensortap.capture.core import from_config_file
from tensortap.config import BUILTIN_COLLECTIONS
from tensortap.exceptions import TrialExistsError


def test_every_3_steps_over_10_saves_0_3_6_9(tmp_path: Path) -> None:
    assert [s for s in range(10) if SaveConfig(save_interval=3).should_save(s)] == [0, 3, 6, 9]
    write_trial(tmp_path, 10, save_config=SaveConfig(save_interval=3))
    trial = tensortap.create_trial(tmp_path)
    assert trial.steps() == [0, 3, 6, 9]
    assert trial.tensor("a").steps() == [0, 3, 6, 9]
    for s in (0, 3, 6, 9):
        np.testing.assert_array_equal(trial.tensor("a").value(s), default_value("a", s))


def test_start_end_and_save_steps(tmp_path: Path) -> None:
    cfg = SaveConfig(save_interval=2, start_step=3, end_step=9, save_steps=[1, 12])
    expected = [1, 3, 5, 7, 12]
    assert [s for s in range(15) if cfg.should_save(s)] == expected
    write_trial(tmp_path, 15, save_config=cfg)
    assert tensortap.create_trial(tmp_path).steps() == expected


def test_next_saved_is_the_first_saved_step_from_a_step_on() -> None:
    configs = [
        SaveConfig(save_interval=interval, start_step=start, end_step=end, save_steps=steps)
        for interval in (1, 2, 3, 7)
        for start in (0, 1, 4)
        for end in (None, start + 1, start + 5, start + 9)
        for steps in ((), (2,), (0, 6, 30))
    ]
    for cfg in configs:
        for step in range(40):
            saved = [s for s in range(step, 120) if cfg.should_save(s)]
            assert cfg.next_saved(step) == (saved[0] if saved else None), (cfg, step)


def test_a_step_is_saved_as_its_collections_say_after_steps_that_saved_nothing(tmp_path: Path) -> None:
    """A hook skips deciding collection by collection until the next step one of them may save:
    the steps it saves are still exactly those its configurations give, mode by mode, and a
    collection added on the way (a rule's) is saved from its own next step on."""
    losses = SaveConfig(save_interval=10, start_step=2, end_step=25, save_steps=[7])
    weights = {Mode.TRAIN: SaveConfig(save_interval=12), Mode.EVAL: SaveConfig(save_interval=4, end_step=9)}
    hook_config = SaveConfig(save_interval=3, start_step=1, save_steps=[5])
    w = Writer(
        tmp_path,
        save_config=hook_config,
        include_collections=["losses", "weights"],
        collection_configs={"losses": {"save_config": losses}, "weights": {"save_config": weights}},
    )
    modes = [Mode.EVAL if i % 5 == 4 else Mode.PREDICT if i % 11 == 10 else Mode.TRAIN for i in range(120)]
    added_at = 40  # gradients join (with the hook's config) at this global step
    got, expected, for_gradients_only = [], [], []
    for i, mode in enumerate(modes):
        if i == added_at:
            w.require_capture("gradients")
        got.append(w.begin_step(mode))
        w.end_step()
        first = [c.should_save(w.mode_step) for c in (losses, weights.get(mode, hook_config))]
        gradients = i >= added_at and hook_config.should_save(w.mode_step)
        expected.append(any(first) or gradients)
        for_gradients_only.append(gradients and not any(first))
    w.close()
    assert got == expected
    assert any(for_gradients_only)  # steps the added collection alone saves


def test_default_intervals() -> None:
    assert SaveConfig().save_interval == 100
    assert Hook.default_interval == 100
    assert Writer.default_interval == 1


def test_per_mode_configs_count_mode_steps(tmp_path: Path) -> None:
    cfg = {Mode.TRAIN: SaveConfig(save_interval=3), "eval": SaveConfig(save_interval=2)}
    with Writer(tmp_path, save_config=cfg) as w:
        run_steps(w, 10, mode="train")  # global 0..9
        run_steps(w, 5, mode=Mode.EVAL)  # global 10..14, eval steps 0..4
        run_steps(w, 2, mode="train")  # global 15, 16 = train steps 10, 11
        assert (w.step, w.mode_step) == (16, 11)
    trial = tensortap.create_trial(tmp_path)
    assert trial.steps(mode=Mode.TRAIN) == [0, 3, 6, 9]
    assert trial.steps(mode="EVAL") == [0, 2, 4]
    assert trial.steps() == [0, 3, 6, 9, 10, 12, 14]
    assert trial.modes() == [Mode.TRAIN, Mode.EVAL]
    assert trial.global_step(2, mode=Mode.EVAL) == 12
    t = trial.tensor("a")
    assert t.steps(mode=Mode.EVAL) == [0, 2, 4]
    np.testing.assert_array_equal(t.value(2, mode=Mode.EVAL), default_value("a", 12))
    np.testing.assert_array_equal(t.value(12), default_value("a", 12))
    assert set(t.values(mode=Mode.EVAL)) == {0, 2, 4}
    assert trial.tensor_names(mode=Mode.PREDICT) == []
    assert trial.tensor_names(mode=Mode.EVAL, step=2) == ["a"]


def test_collection_save_config_and_include_regex(tmp_path: Path) -> None:
    with Writer(
        tmp_path,
        save_config=SaveConfig(save_interval=2),
        include_collections=["losses", "weights"],
        include_regex=["^keep"],
        collection_configs={"losses": {"save_config": SaveConfig(save_interval=5)}},
    ) as w:
        for _ in range(10):
            with w.stepping():
                w.save("losses/loss", np.float32(w.step), ["losses"])
                w.save("w", np.ones(2), ["weights"])
                w.save("keep/out", np.zeros(2), ["outputs"])
                w.save("drop/out", np.zeros(2), ["outputs"])
    trial = tensortap.create_trial(tmp_path)
    assert trial.tensor("losses/loss").steps() == [0, 5]
    assert trial.tensor("w").steps() == [0, 2, 4, 6, 8]
    assert trial.tensor_names() == ["keep/out", "losses/loss", "w"]
    assert trial.tensor("keep/out").collections == ["custom", "outputs"]
    assert trial.tensor_names(collection="weights") == ["w"]
    assert trial.collection("losses").tensor_names == {"losses/loss"}
    with pytest.raises(KeyError, match="gradients"):
        trial.collection("gradients")


def test_save_tensor_and_save_scalar_ignore_include_collections(tmp_path: Path) -> None:
    with Writer(tmp_path, include_collections=["weights"]) as w, w.stepping():
        w.save("ignored", np.ones(2), ["outputs"])
        w.save_tensor("forced", np.ones(2), ["outputs"])
        w.save_scalar("acc", 0.5)
        w.save_scalar("ce", 1.5, collections=["losses"])
    trial = tensortap.create_trial(tmp_path)
    assert trial.tensor_names() == ["forced", "losses/ce", "metrics/acc"]
    assert trial.tensor("metrics/acc").value(0) == 0.5
    assert trial.tensor_names(collection="losses") == ["losses/ce"]


def test_include_workers_one_writes_rank_0_only(tmp_path: Path) -> None:
    write_trial(tmp_path, 2, include_workers="one", rank=1)
    write_trial(tmp_path, 2, include_workers="one", rank=0)
    trial = tensortap.create_trial(tmp_path)
    assert trial.workers() == ["worker_0"]
    assert trial.tensor("a").workers(1) == ["worker_0"]


BAD_CONFIGS = [
    (lambda: SaveConfig(save_interval=0), ["save_interval", "0", ">= 1"]),
    (lambda: SaveConfig(save_interval=-3), ["save_interval", "-3", ">= 1"]),
    (lambda: SaveConfig(save_interval=2.5), ["save_interval", "2.5", "integer"]),
    (lambda: SaveConfig(start_step=4, end_step=4), ["end_step", "4", "start_step=4"]),
    (lambda: SaveConfig(start_step=4, end_step=2), ["end_step", "2", "greater than start_step=4"]),
    (lambda: SaveConfig(save_steps=[1, -1]), ["save_steps", "-1", ">= 0"]),
    (lambda: ReductionConfig(reductions=["median"]), ["reductions", "'median'", "mean", "nan_count"]),
    (lambda: ReductionConfig(reductions="mean"), ["reductions", "'mean'", "list"]),
    (lambda: ReductionConfig(norms=["l3"]), ["norms", "'l3'", "l1, l2"]),
    (lambda: ReductionConfig(abs_reductions=["nan_count"]), ["abs_reductions", "'nan_count'", "min"]),
    (lambda: Collection("c", include_regex=["("]), ["include_regex", "'('", "regular expression"]),
    (lambda: Collection(""), ["name", "''"]),
    (lambda: Mode.parse("training"), ["mode", "'training'", "TRAIN, EVAL, PREDICT, GLOBAL"]),
]


@pytest.mark.parametrize(("make", "words"), BAD_CONFIGS)
def test_invalid_config_values_raise_naming_field_value_choices(make, words: list[str]) -> None:
    with pytest.raises(ValueError) as info:
        make()
    for word in words:
        assert word in str(info.value)


BAD_HOOK_ARGS = [
    (
        {"include_collections": ["weights", "nope"]},
        ["include_collections", "'nope'", "gradients", "collection_configs"],
    ),
    ({"include_collections": "weights"}, ["include_collections", "'weights'", "list"]),
    ({"include_regex": ["[a-"]}, ["include_regex", "'[a-'", "regular expression"]),
    ({"include_workers": "some"}, ["include_workers", "'some'", "'all', 'one'"]),
    ({"save_config": {"TRAIN": 3}}, ["save_config", "3", "SaveConfig"]),
    ({"save_config": {"bogus": SaveConfig()}}, ["mode", "'bogus'", "TRAIN"]),
    ({"reduction_config": ["mean"]}, ["reduction_config", "['mean']", "ReductionConfig"]),
    ({"collection_configs": {"c": 3}}, ["collection_configs['c']", "3", "Collection"]),
]


@pytest.mark.parametrize(("kwargs", "words"), BAD_HOOK_ARGS)
def test_invalid_hook_arguments_raise_before_writing(tmp_path: Path, kwargs: dict, words: list[str]) -> None:
    out = tmp_path / "trial"
    with pytest.raises(ValueError) as info:
        Writer(out, **kwargs)
    for word in words:
        assert word in str(info.value)
    assert not out.exists()


def _config_file(tmp_path: Path, config: dict) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config), encoding="utf-8")
    return path


JSON_CONFIG = {
    "save_config": {"default": {"save_interval": 4}, "EVAL": {"save_interval": 1, "end_step": 2}},
    "reduction_config": {"reductions": ["mean", "nan_count"], "save_raw_tensor": True},
    "include_collections": ["weights", "losses"],
    "collection_configs": {"losses": {"save_config": {"save_interval": 3}, "reduction_config": {"norms": ["l2"]}}},
    "shard_policy": {"max_steps": 2},
}


def _check_json_trial(out: Path) -> None:
    trial = tensortap.create_trial(out)
    w = trial.tensor("w")
    assert w.steps(mode=Mode.TRAIN) == [0, 4, 8]
    assert w.steps(mode=Mode.EVAL) == [0, 1]
    assert w.available_reductions(0) == ["mean", "nan_count"]
    np.testing.assert_array_equal(w.value(4), default_value("w", 4))
    loss = trial.tensor("losses/loss")
    assert loss.steps(mode=Mode.TRAIN) == [0, 3, 6, 9]
    assert loss.available_reductions(3) == ["l2"]
    assert not loss.has_raw(3)
    assert len(list((out / "index" / "worker_0").glob("*.json"))) >= 2  # shard_policy max_steps=2


def _run_json_writer(w: Writer) -> None:
    with w:
        for _ in range(10):
            with w.stepping(mode="train"):
                w.save("w", default_value("w", w.step), ["weights"])
                w.save("losses/loss", default_value("l", w.step), ["losses"])
        run_steps(w, 3, names=["w"], mode="eval", collections=["weights"])


def test_hook_from_json(tmp_path: Path) -> None:
    out = tmp_path / "trial"
    path = _config_file(tmp_path, {"out_dir": str(out), **JSON_CONFIG})
    w = Writer.from_json(path)
    assert isinstance(w, Writer)
    _run_json_writer(w)
    _check_json_trial(out)


def test_hook_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "trial"
    monkeypatch.delenv("TENSORTAP_CONFIG", raising=False)
    assert Writer.from_env() is None
    monkeypatch.setenv("TENSORTAP_CONFIG", str(_config_file(tmp_path, JSON_CONFIG)))
    w = Writer.from_env(out_dir=out)  # keyword arguments override the file
    assert w.out_dir == str(out)
    _run_json_writer(w)
    _check_json_trial(out)


def test_an_smdebug_configuration_is_named_as_such(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """smdebug's JSON (``LocalPath``, ``HookParameters``, ``CollectionConfigurations``) was refused with a list of
    tensortap's keys and no word of what it was; a job moved from smdebug with only ``SMDEBUG_CONFIG_FILE_PATH``
    set got ``from_env() -> None``: no capture, without a word."""
    smdebug = _config_file(
        tmp_path,
        {
            "LocalPath": str(tmp_path / "out"),
            "HookParameters": {"save_interval": "2"},
            "CollectionConfigurations": [{"CollectionName": "weights"}],
        },
    )
    with pytest.raises(ValueError, match=r"an smdebug \(SageMaker Debugger\) configuration \(CollectionConfig"):
        Writer.from_json(smdebug)
    monkeypatch.delenv("TENSORTAP_CONFIG", raising=False)
    monkeypatch.setenv("SMDEBUG_CONFIG_FILE_PATH", str(smdebug))
    with caplog.at_level("WARNING", logger="tensortap"):
        assert Writer.from_env() is None
    assert [r.getMessage() for r in caplog.records if "SMDEBUG_CONFIG_FILE_PATH" in r.getMessage()] == [
        "tensortap: SMDEBUG_CONFIG_FILE_PATH is set but TENSORTAP_CONFIG is not: tensortap reads its configuration "
        "from TENSORTAP_CONFIG (a JSON file of the hook's arguments; see docs/migrating-from-smdebug.md); no hook "
        "is made from the environment"
    ]


BAD_JSON = [
    ({"bogus": 1}, ["config", "bogus", "save_config", "include_collections"]),
    ({"save_config": {"save_intervall": 3}}, ["save_config", "save_intervall", "save_interval"]),
    ({"save_config": {"TRAIN": {"save_interval": 0}}}, ["save_interval", "0"]),
    ({"save_config": {"TRAIN": {}, "warmup": {}}}, ["mode", "'warmup'", "TRAIN"]),
    ({"save_config": 5}, ["save_config", "5", "object"]),
    ({"save_config": {"EVAL": 5}}, ["save_config", "5", "object"]),
    ({"include_workers": "any"}, ["include_workers", "'any'", "'one'"]),
    ({"collection_configs": ["losses"]}, ["collection_configs", "['losses']", "object"]),
    ({"reduction_config": {"reductions": ["median"]}}, ["reductions", "'median'", "mean"]),
    ({"reduction_config": {"reduction": ["mean"]}}, ["reduction_config", "reduction", "reductions"]),
    ({"collection_configs": {"c": {"regex": ["x"]}}}, ["collection", "regex", "include_regex"]),
    ({"collection_configs": {"c": ["x"]}}, ["collection", "['x']", "object"]),
    ({"shard_policy": {"max_stepz": 2}}, ["shard_policy", "max_stepz", "max_steps"]),
    ({"shard_policy": {"max_steps": 0}}, ["max_steps", "0", ">= 1"]),
    ({"include_collections": ["nope"]}, ["include_collections", "'nope'", "weights"]),
    ([1, 2], ["config", "object", "list"]),
    # a mode name misspelt was refused as a SaveConfig key, listing those alone
    ({"save_config": {"trian": {"save_interval": 1}}}, ["save_config", "trian", "save_interval", "default, TRAIN"]),
    ({"save_config": {"TRAIN": {}, "save_interval": 3}}, ["'save_interval' beside the mode name(s) TRAIN", "not both"]),
    ({"save_config": {"default": {"save_intervall": 3}}}, ["save_config['default']: unknown key(s) save_intervall"]),
]


@pytest.mark.parametrize(("config", "words"), BAD_JSON)
def test_bad_json_config_raises_value_error(tmp_path: Path, config: dict, words: list[str]) -> None:
    out = tmp_path / "trial"
    if isinstance(config, dict):
        config = {"out_dir": str(out), **config}
    with pytest.raises(ValueError) as info:
        Writer.from_json(_config_file(tmp_path, config))
    for word in words:
        assert word in str(info.value)
    assert not out.exists()


def test_json_that_does_not_parse(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text("{'out_dir': 'x'}", encoding="utf-8")
    with pytest.raises(ValueError, match="not valid JSON"):
        Writer.from_json(path)


def test_errors_of_a_configuration_file_name_the_file(tmp_path: Path) -> None:
    """A config file's errors named neither the file nor, for a missing out_dir, anything but Hook.__init__'s
    positional argument (a TypeError)."""

    path = _config_file(tmp_path, {"save_config": {"save_interval": 2}})
    with pytest.raises(ValueError) as info:
        from_config_file(path, Writer._kwargs_from_json, Writer, {})
    assert str(info.value) == (
        f"configuration file {str(path)!r}: out_dir: missing: the trial's folder or URL; give it in the file or "
        "as out_dir=..."
    )
    with from_config_file(path, Writer._kwargs_from_json, Writer, {"out_dir": tmp_path / "given"}) as w:
        assert w.save_config.default.save_interval == 2
    for config, message in [
        ({"save_config": {"trian": {}}}, "save_config: unknown key(s) trian; valid: either"),  # read
        ({"include_regex": ["("]}, "include_regex: '(' is not a valid regular expression"),  # built
        ({"out_dir": 5}, "out_dir: expected"),  # a TypeError of the hook's
    ]:
        path = _config_file(tmp_path, {"out_dir": str(tmp_path / "trial"), **config})
        with pytest.raises(ValueError, match=re.escape(f"configuration file {str(path)!r}: {message}")):
            from_config_file(path, Writer._kwargs_from_json, Writer, {})
    assert not (tmp_path / "trial").exists()
    Writer(tmp_path / "taken").close()
    with pytest.raises(TrialExistsError) as exists:  # names the trial: passes unchanged
        from_config_file(
            _config_file(tmp_path, {"out_dir": str(tmp_path / "taken"), "if_exists": "error"}),
            Writer._kwargs_from_json,
            Writer,
            {},
        )
    assert "configuration file" not in str(exists.value)


def test_config_json_round_trip() -> None:
    cfg = SaveConfig(save_interval=7, start_step=2, end_step=30, save_steps=[1])
    assert SaveConfig.from_json(json.loads(json.dumps(cfg.to_json()))) == cfg
    rc = ReductionConfig(reductions=["max", "zero_count"], abs_reductions=["mean"], norms=["l1"], save_raw_tensor=True)
    assert ReductionConfig.from_json(json.loads(json.dumps(rc.to_json()))) == rc
    assert rc.keys == ("max", "zero_count", "l1", "abs_mean")
    c = Collection("c", include_regex=["^a"], save_config={Mode.EVAL: cfg}, reduction_config=rc)
    back = Collection.from_json(json.loads(json.dumps(c.to_json())))
    assert back.to_json() == c.to_json()
    assert set(BUILTIN_COLLECTIONS) >= {"weights", "gradients", "full_shap", "feature_importance"}


def test_the_repr_of_a_large_collection_is_bounded() -> None:
    """A collection of a large model (3,000 names) printed every name, unsorted (60 KB in a notebook cell)."""
    many = Collection("weights", tensor_names={f"layer{i}.weight" for i in range(3000)})
    assert len(repr(many)) < 500
    assert repr(many).endswith(
        "tensor_names={'layer0.weight', 'layer1.weight', 'layer10.weight', 'layer100.weight', "
        "'layer1000.weight', 'layer1001.weight', 'layer1002.weight', 'layer1003.weight', "
        "'layer1004.weight', 'layer1005.weight', ... (3000 in all)})"
    )
    assert repr(Collection("b", tensor_names={"y", "x"})) == (
        "Collection(name='b', include_regex=(), save_config=None, reduction_config=None, tensor_names={'x', 'y'})"
    )
