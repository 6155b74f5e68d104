"""The Python blocks of the project's Markdown pages, run as a reader would run them."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

ROOT = Path(__file__).parents[2]


def python_blocks(page: Path) -> list[str]:
    """The fenced ``python`` blocks of ``page``, in order."""
    return re.findall(r"^```python\n(.*?)^```$", page.read_text(encoding="utf-8"), flags=re.MULTILINE | re.DOTALL)


def run_block(page: Path, index: int, block: str, namespace: dict[str, Any], tmp: Path) -> None:
    """Run ``block`` (block ``index`` of ``page``) in ``namespace``, its ``/tmp/...`` paths moved under ``tmp``.

    ``tmp`` must be empty of what the block writes: a block writing a trial where one already is
    fails, as it would for a reader who ran the page's blocks in order.
    """
    code = block.replace('"/tmp/', f'"{tmp.as_posix()}/')
    exec(compile(code, f"{page.relative_to(ROOT)} block {index}", "exec"), namespace)  # the page's own code


def commands(page: Path, program: str) -> list[list[str]]:
    """The lines of ``page``'s ``bash`` blocks that run ``program``, split as a shell would, comments left out."""
    lines = []
    for block in re.findall(r"^```bash\n(.*?)^```$", page.read_text(encoding="utf-8"), flags=re.MULTILINE | re.DOTALL):
        lines += block.replace("\\\n", " ").splitlines()
    return [words[1:] for line in lines if (words := shlex.split(line, comments=True))[:1] == [program]]
