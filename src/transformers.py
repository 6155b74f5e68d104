"""Hugging Face adapter: ``import tensortap.transformers as tth``, then ``Trainer(callbacks=[tth.Callback(out_dir)])``.

Importing this module imports Transformers and PyTorch; see :mod:`tensortap.capture.transformers`.
"""

from __future__ import annotations

from .capture.transformers import Callback, Hook

__all__ = ["Callback", "Hook"]
