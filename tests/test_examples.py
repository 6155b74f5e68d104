"""examples/demo.py, the README's first command: what it may remove, and its usage."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

DEMO = Path(__file__).resolve().parent.parent / "examples" / "demo.py"


def demo(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(DEMO), *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_the_demo_never_removes_a_folder_that_is_not_its_own_trial(tmp_path: Path) -> None:
    """The demo replaced its out_dir whole (``shutil.rmtree``): ``demo.py ~`` would have emptied a home folder."""
    mine = tmp_path / "pytorch_mnist_like" / "notes.txt"
    mine.parent.mkdir()
    mine.write_text("mine")
    other = tmp_path / "other.txt"
    other.write_text("other")
    done = demo(str(tmp_path), cwd=tmp_path)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "pytorch_mnist_like exists and is not a trial" in done.stderr
    assert mine.read_text() == "mine" and other.read_text() == "other"


def test_the_demo_answers_help_without_training(tmp_path: Path) -> None:
    done = demo("--help", cwd=tmp_path)
    assert done.returncode == 0 and "out_dir" in done.stdout
    assert list(tmp_path.iterdir()) == []
