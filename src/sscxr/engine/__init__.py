"""The one training engine: `fit` trains any `sscxr.tasks.base.Task`.

Public names are imported lazily so that `sscxr.engine.config` stays importable from the config
module without pulling in the trainer (and the tasks) at import time.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "OptimConfig": "sscxr.engine.config",
    "TrainConfig": "sscxr.engine.config",
    "DistInfo": "sscxr.engine.distributed",
    "init_distributed": "sscxr.engine.distributed",
    "cleanup": "sscxr.engine.distributed",
    "FitResult": "sscxr.engine.trainer",
    "TrainState": "sscxr.engine.trainer",
    "NonFiniteLossError": "sscxr.engine.trainer",
    "fit": "sscxr.engine.trainer",
    "load_checkpoint": "sscxr.engine.checkpoint",
    "save_checkpoint": "sscxr.engine.checkpoint",
    "ShardedSampler": "sscxr.engine.sampler",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'sscxr.engine' has no attribute {name!r}")
