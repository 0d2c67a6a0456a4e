"""The attention module's configuration: the numbers a checkpoint must agree on."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class MHAConfig:
    num_heads: int
    emb_size: int
    head_size: int
    max_seq_len: int
    causal: bool = True

    def __post_init__(self) -> None:
        for name in ("num_heads", "emb_size", "head_size", "max_seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not isinstance(self.causal, bool):
            raise ValueError(f"causal must be a bool, got {self.causal!r}")

    @property
    def inner_size(self) -> int:
        """Width of the concatenated heads, num_heads * head_size."""
        return self.num_heads * self.head_size

    def to_dict(self) -> dict[str, int | bool]:
        return asdict(self)
