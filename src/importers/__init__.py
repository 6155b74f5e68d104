"""Importers: trials written by other tools, rewritten as tensortap trials with :class:`tensortap.capture.Writer`.

:mod:`tensortap.importers.smdebug` reads smdebug (SageMaker Debugger) trials.
"""

from __future__ import annotations
