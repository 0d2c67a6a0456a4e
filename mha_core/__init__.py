"""mha_core: the attention module served by mha-serve, and its checkpoints. No web code.

The torch-using names are imported on first use (PEP 562), so that ``from mha_core import MHAConfig``
stays torch-free: mha-serve's front-end processes use the config and never import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from mha_core.config import MHAConfig

if TYPE_CHECKING:
    from mha_core.attention import AttentionResult, MultiHeadAttention
    from mha_core.checkpoint import (
        DEFAULT_MAX_SEQ_LEN,
        CheckpointError,
        LoadedCheckpoint,
        checksum,
        load_checkpoint,
        read_checkpoint,
        save_checkpoint,
    )
    from mha_core.incremental import StepResult, attend_padded, project, step

_LAZY = {
    "AttentionResult": "mha_core.attention",
    "MultiHeadAttention": "mha_core.attention",
    "DEFAULT_MAX_SEQ_LEN": "mha_core.checkpoint",
    "CheckpointError": "mha_core.checkpoint",
    "LoadedCheckpoint": "mha_core.checkpoint",
    "checksum": "mha_core.checkpoint",
    "load_checkpoint": "mha_core.checkpoint",
    "read_checkpoint": "mha_core.checkpoint",
    "save_checkpoint": "mha_core.checkpoint",
    "StepResult": "mha_core.incremental",
    "attend_padded": "mha_core.incremental",
    "project": "mha_core.incremental",
    "step": "mha_core.incremental",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mha_core' has no attribute {name!r}")


__all__ = [
    "DEFAULT_MAX_SEQ_LEN",
    "AttentionResult",
    "CheckpointError",
    "LoadedCheckpoint",
    "MHAConfig",
    "MultiHeadAttention",
    "StepResult",
    "attend_padded",
    "checksum",
    "load_checkpoint",
    "project",
    "read_checkpoint",
    "save_checkpoint",
    "step",
]
