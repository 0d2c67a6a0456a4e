"""mha_core: the attention module served by mha-serve, and its checkpoints. No web code."""

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
from mha_core.config import MHAConfig

__all__ = [
    "DEFAULT_MAX_SEQ_LEN",
    "AttentionResult",
    "CheckpointError",
    "LoadedCheckpoint",
    "MHAConfig",
    "MultiHeadAttention",
    "checksum",
    "load_checkpoint",
    "read_checkpoint",
    "save_checkpoint",
]
