"""Lightning adapter: ``import tensortap.lightning as ttl``, then ``Trainer(callbacks=[ttl.Callback(out_dir)])``.

Importing this module imports Lightning and PyTorch; see :mod:`tensortap.capture.lightning`.
"""

from __future__ import annotations

from .capture.lightning import Callback, Hook, callbacks_from_env

__all__ = ["Callback", "Hook", "callbacks_from_env"]
