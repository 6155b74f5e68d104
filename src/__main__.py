"""``python -m tensortap``: the ``tensortap`` command (see :mod:`tensortap.cli`)."""

from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
