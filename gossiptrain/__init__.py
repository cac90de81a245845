"""gossiptrain: decentralized training of PyTorch models with dynamic groups and asynchronous averaging.

The names below are imported on first use, so that ``import gossiptrain.<light module>`` (the CLI's
argument parsing) does not import torch and hivemind.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {  # public name -> the module that defines it
    "Attachment": "gossiptrain.attachment",
    "attach": "gossiptrain.attachment",
    "GossipOptimizer": "gossiptrain.optimizer",
    "InitialPeersError": "gossiptrain.errors",
    "ModelMismatchError": "gossiptrain.errors",
    "Peer": "gossiptrain.peer",
    "RoundRecord": "gossiptrain.metrics",
    "RoundResult": "gossiptrain.exchange",
    "StateDownloadError": "gossiptrain.state",
    "Task": "gossiptrain.tasks.base",
    "Timeouts": "gossiptrain.exchange",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'gossiptrain' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # the next access is an ordinary attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
