"""docs/example.ipynb runs from top to bottom (real training, trial queries, plots, rules).

The notebooks write their trials into ``tempfile.mkdtemp()`` folders, which they leave for the
reader to explore: the kernel is given ``TMPDIR`` inside the test's ``tmp_path``, so that a test
run leaves nothing in the machine's temporary folder.
"""

from __future__ import annotations

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("torch")

NOTEBOOK = Path(__file__).resolve().parent.parent / "docs" / "example.ipynb"


@pytest.mark.slow
@pytest.mark.torch
def test_example_notebook_executes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the kernel's tempfile.mkdtemp()
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=180, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "workers: ['worker_0']" in text
    assert "steps: [0, 5, 10, 15, 20, 25, 30, 35]" in text
    assert "vanishing gradient fired at: []" in text
    images = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.get("data", {})]
    assert len(images) == 1  # the loss and the gradient norms: drawn with the non-interactive backend, none showed
    assert list(tmp_path.glob("tensortap-notebook-*"))  # its trial went into tmp_path, not /tmp


ANALYSIS = Path(__file__).resolve().parent.parent / "docs" / "examples" / "analysis.ipynb"


@pytest.mark.slow
@pytest.mark.torch
def test_analysis_notebook_executes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/examples/analysis.ipynb: rich repr, curves, histograms over steps, rules and TensorBoard, with no error."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the kernel's tempfile.mkdtemp()
    pytest.importorskip("matplotlib")
    pytest.importorskip("tensorboardX")
    nb = nbformat.read(ANALYSIS, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    rich = [o for o in outputs if o.output_type == "execute_result"]
    html = "".join(o["data"].get("text/html", "") for o in rich)
    assert "tensortap trial" in html and "pytorch" in html  # the trial's _repr_html_
    assert "<polyline" in html  # the loss tensor's sparkline
    images = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.get("data", {})]
    assert len(images) >= 5  # loss curves, gradient norms, a histogram and two heat maps
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "train loss steps: [0, 2, 4, 6, 8]" in text  # every 2nd step saved
    assert "bins: 32 values counted: 640" in text
    assert "exploding_tensor fired at: []" in text
    assert "tensorboard: {'scalars':" in text
    assert list(tmp_path.glob("tensortap-analysis-*"))  # its trial went into tmp_path, not /tmp


def test_long_work_shows_a_progress_bar_in_a_notebook(tmp_path: Path) -> None:
    """A Jupyter kernel's standard error is no terminal: long work shows its bar there too, quick work none."""
    pytest.importorskip("tqdm")
    code = (
        "import time\n"
        "from tensortap.trial.progress import progress\n"
        "for _ in progress(range(4), desc='long work'): time.sleep(0.3)\n"
        "for _ in progress(range(4), desc='quick work'): pass\n"
        "for _ in progress(['one'], desc='one item'): time.sleep(0.8)\n"
    )
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(code)])
    nbclient.NotebookClient(
        nb, timeout=60, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    errors = "".join(o.get("text", "") for o in nb.cells[0].outputs if o.get("name") == "stderr")
    assert "long work: " in errors
    assert "quick work" not in errors  # under SHOW_AFTER_SECONDS: nothing shown
    assert "one item" not in errors  # a bar of one item tells nothing
    assert "4/4" in errors.split("\r")[-1]  # the bar stays: taken back, it left an empty error output
