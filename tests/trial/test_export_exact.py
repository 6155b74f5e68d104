"""Exports and ``show`` keep integers exact and special values visible, and say what TensorBoard changes.

Real trials written by the Writer; expected values are the saved NumPy values themselves (exact ints)."""

from __future__ import annotations

import decimal
import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
from helpers.cli import cli, strict_json
from helpers.trials import logged_warnings

import tensortap
from tensortap.capture import Writer
from tensortap.trial.export import export_table, export_tensorboard

if TYPE_CHECKING:
    import pandas

pd = pytest.importorskip("pandas")

BIG = 2**53 + 1  # the first integer float64 rounds
SCALARS = {
    "metrics/big": np.int64(BIG),
    "metrics/most_negative": np.int64(-(2**63)),
    "metrics/small": np.int64(7),
    "metrics/loss": np.float64(0.1 + 0.2),
    "metrics/missing": np.float64(np.nan),
    "metrics/tiny": np.float64(5e-324),
}
INTS = np.array([BIG, -(2**63), 5], dtype=np.int64)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two steps of integer and float scalars, and arrays whose summaries or histograms were wrong."""
    out = tmp_path_factory.mktemp("exact") / "run"
    with Writer(out) as w:
        for step in range(2):
            with w.stepping():
                for name, value in SCALARS.items():
                    w.save(name, np.asarray(value), ["metrics"])
                w.save("act/ints", INTS + step)
                w.save("act/huge_constant", np.full(4, 1.7e308))
                w.save("act/specials", np.array([1.0, np.nan, np.inf, 2.0]))
                w.save("act/cplx", np.array([3 + 4j, complex(np.nan, 0), complex(0, np.inf)], dtype=np.complex64))
                w.save("act/near_max", np.array([1e308, 1.7e308, 1.7e308]))
    return out


def _values(df: pandas.DataFrame, name: str) -> list[object]:
    return df[(df["name"] == name) & (df["reduction"] == "value")].sort_values("step")["value"].tolist()


def test_to_pandas_keeps_integer_scalars_beyond_2_53_exact_when_asked(run: Path) -> None:
    """By default float64 (one such integer, a time.time_ns() saved, turned the whole column into objects:
    numpy's log and isfinite raised on every row, describe() lost mean and std); the exports ask."""
    rounded = tensortap.create_trial(run).to_pandas(collection="metrics")
    assert rounded["value"].dtype == np.float64 and _values(rounded, "metrics/big") == [float(BIG)] * 2
    assert np.isfinite(rounded["value"]).sum() == 10  # metrics/missing is NaN
    df = tensortap.create_trial(run).to_pandas(collection="metrics", exact_ints=True)
    assert _values(df, "metrics/big") == [BIG, BIG] and all(type(v) is int for v in _values(df, "metrics/big"))
    assert _values(df, "metrics/most_negative") == [-(2**63)] * 2
    assert _values(df, "metrics/loss") == [0.1 + 0.2] * 2
    small = tensortap.create_trial(run).to_pandas("metrics/small", exact_ints=True)  # ints float64 holds: float64
    assert small["value"].dtype == np.float64 and small["value"].tolist() == [7.0, 7.0]


def test_csv_export_writes_exact_integers_and_nan_as_text(run: Path, tmp_path: Path) -> None:
    out = tmp_path / "t.csv"
    export_table(tensortap.create_trial(run), out, collection="metrics")
    text = out.read_text()
    assert f"metrics/big,value,{BIG}\n" in text and f"metrics/most_negative,value,{-(2**63)}\n" in text
    assert "metrics/missing,value,nan\n" in text  # not an empty cell, which reads as a missing value
    assert "metrics/tiny,value,5e-324\n" in text
    back = pd.read_csv(out, dtype={"value": str})
    assert set(back[back["name"] == "metrics/big"]["value"]) == {str(BIG)}
    assert math.isnan(pd.read_csv(out).query("name == 'metrics/missing'")["value"].iloc[0])


def test_parquet_export_adds_the_exact_integers(run: Path, tmp_path: Path) -> None:
    out = tmp_path / "t.parquet"
    export_table(tensortap.create_trial(run), out, collection="metrics")
    df = pd.read_parquet(out)
    assert df["value"].dtype == np.float64 and str(df["value_int"].dtype) == "Int64"
    assert _rows_of(df, "metrics/big", "value_int") == [BIG, BIG]
    assert _rows_of(df, "metrics/most_negative", "value_int") == [-(2**63)] * 2
    assert _rows_of(df, "metrics/loss", "value") == [0.1 + 0.2] * 2
    assert df["value_int"][df["name"] == "metrics/loss"].isna().all()
    assert _rows_of(df, "metrics/tiny", "value") == [5e-324] * 2


def test_parquet_export_of_a_uint64_beyond_int64_uses_decimals(tmp_path: Path) -> None:
    with Writer(tmp_path / "run") as w, w.stepping():
        w.save("u", np.asarray(np.uint64(2**64 - 1)))
        w.save("i", np.asarray(np.int64(-5)))
    export_table(tensortap.create_trial(tmp_path / "run"), tmp_path / "t.parquet")
    df = pd.read_parquet(tmp_path / "t.parquet")
    assert _rows_of(df, "u", "value_int") == [decimal.Decimal(2**64 - 1)]
    assert _rows_of(df, "i", "value_int") == [decimal.Decimal(-5)]


def _rows_of(df: pandas.DataFrame, name: str, column: str) -> list[object]:
    return df[df["name"] == name].sort_values("step")[column].tolist()


def test_export_json_keeps_integers_exact(run: Path) -> None:
    result = cli("export", str(run), "--collection", "metrics", "--json")
    assert result.returncode == 0, result.stderr
    rows = strict_json(result.stdout)["rows"]
    assert [r["value"] for r in rows if r["name"] == "metrics/big"] == [BIG, BIG]
    assert [r["value"] for r in rows if r["name"] == "metrics/missing"] == ["NaN", "NaN"]


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning:tensorboard")  # its reader, on sums of inf
def test_tensorboard_export_warns_of_what_float32_and_histograms_change(run: Path, tmp_path: Path) -> None:
    ea_mod = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    import warnings

    with logged_warnings() as messages, warnings.catch_warnings():
        warnings.simplefilter("error")  # no NumPy warning leaks (a constant near the largest float64)
        export_tensorboard(tensortap.create_trial(run), tmp_path / "tb")
    changed = {m.split("'")[1] for m in messages if "which are float32" in m}
    # -2**63 is a power of two (float32 holds it); act/ints' reductions are floats, rounded as floats are
    assert changed == {"metrics/big", "metrics/tiny", "act/huge_constant", "act/near_max"}
    assert any("'metrics/big'" in m and f"{BIG} is written as" in m for m in messages)
    assert any("'act/specials' holds NaN or infinite values" in m for m in messages)
    assert not any("'act/ints' holds" in m for m in messages)
    events = ea_mod.EventAccumulator(str(tmp_path / "tb" / "train"), size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()
    hist = events.Histograms("act/huge_constant")[0].histogram_value
    assert hist.sum == math.inf and hist.num == 4 and len(set(hist.bucket_limit)) == len(hist.bucket_limit)  # not NaN
    assert hist.min < 1.7e308 < hist.max


def _show(run: Path, name: str) -> tuple[dict[str, object], str]:
    """``show --json``'s step 0 and ``show``'s text (both exit 0 and write nothing on standard error)."""
    text, answer = cli("show", str(run), name, "--step", "0"), cli("show", str(run), name, "--step", "0", "--json")
    for result in (text, answer):
        assert result.returncode == 0 and result.stderr == "", result.stderr
    return strict_json(answer.stdout)["steps"][0], text.stdout


def test_show_gives_integer_arrays_exact_min_and_max(run: Path) -> None:
    entry, text = _show(run, "act/ints")
    assert entry["min"] == -(2**63) and entry["max"] == BIG and entry["nan_count"] == 0
    assert f"min {-(2**63)} " in text and f"max {BIG} " in text


def test_show_summarises_complex_arrays_by_magnitude(run: Path) -> None:
    entry, text = _show(run, "act/cplx")
    assert (entry["min"], entry["max"], entry["nan_count"], entry["inf_count"]) == (5.0, 5.0, 1, 1)
    assert text.strip().endswith("complex64 (3,) |z| min 5 mean 5 max 5 nan 1 inf 1")


def test_show_of_finite_values_near_the_max_gives_their_mean_without_a_warning(run: Path) -> None:
    entry, text = _show(run, "act/near_max")
    assert entry["mean"] == pytest.approx(math.fsum(v / 3 for v in (1e308, 1.7e308, 1.7e308)), rel=1e-15)
    assert "mean 1.467e+308 " in text


def test_show_names_the_dtype_a_tensor_was_converted_from(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    import tensortap.torch as ttt

    model = torch.nn.Linear(2, 1)
    hook = ttt.Hook(tmp_path / "run", save_config=tensortap.SaveConfig(save_interval=1), include_collections=["custom"])
    hook.register_module(model)
    model(torch.ones(1, 2))
    hook.save_tensor("act/bf16", torch.tensor([1.0078125, -2.0, float("nan")], dtype=torch.bfloat16), ["custom"])
    model(torch.ones(1, 2))
    hook.close()
    entry, text = _show(tmp_path / "run", "act/bf16")
    assert (entry["dtype"], entry["orig_dtype"], entry["min"], entry["nan_count"]) == ("float32", "bfloat16", -2.0, 1)
    assert "float32 (from bfloat16) (3,) min -2 " in text
