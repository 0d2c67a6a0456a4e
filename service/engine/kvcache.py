"""The sequences' key/value cache: fixed-size blocks from one pool, allocated once on the model's device.

vLLM's ``kv_cache_manager`` is the model: the pool is allocated at start-up, at most ``MHA_KV_CACHE_BYTES``,
so the cache can never run the process out of memory, whatever the sequences do; each sequence holds a table
of blocks (``block_size`` token rows each) that grows as it does, and gives them back when it ends, is
reaped or evicted. Rows are ``(H, D)`` per token for keys and values apart (mha_core.incremental's layout),
and a sequence's token at position p lives in slot ``table[p // block_size] * block_size + p % block_size``.

What happens when the pool is full is the bookkeeping's choice (service/engine/sequences.py); this module
only says whether blocks are free. Its default size:

- on a GPU, ``GPU_SHARE`` of the device memory free once the model is loaded (measured at start-up);
- on a CPU, ``CPU_DEFAULT_BYTES`` (256 MiB: 64 sequences of 1,024 tokens of the default model, whose
  token takes 2 x 8 heads x 64 x 4 bytes = 4 KiB).

The pool is only written from the event loop, by :meth:`KVCache.write` when a step is answered (so a
cancelled step never touched it); forwards only read it (:meth:`gather`).
"""

from __future__ import annotations

import torch
from torch import Tensor

GPU_SHARE = 0.5  # of the free device memory at start-up, when MHA_KV_CACHE_BYTES is unset
CPU_DEFAULT_BYTES = 256 << 20


def default_cache_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free * GPU_SHARE)
    return CPU_DEFAULT_BYTES


class KVCache:
    def __init__(
        self,
        *,
        num_heads: int,
        head_size: int,
        dtype: torch.dtype,
        device: torch.device,
        max_bytes: int,
        block_size: int = 16,
    ) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        itemsize = torch.empty((), dtype=dtype).element_size()
        self.block_size = block_size
        self.block_bytes = 2 * block_size * num_heads * head_size * itemsize  # keys and values
        self.num_blocks = max_bytes // self.block_bytes
        if self.num_blocks < 1:
            raise ValueError(
                f"kv_cache_bytes {max_bytes} is less than one block ({self.block_bytes} bytes: {block_size} tokens "
                f"x 2 x {num_heads} heads x {head_size} x {itemsize} bytes)"
            )
        slots = self.num_blocks * block_size
        with torch.inference_mode():  # written and read only in inference mode
            # Reserved, not written: on a CPU the pages cost memory only once a step writes them (a replica that
            # serves no sequence stays small). Only slot 0 is ever read unwritten (the padding of a gather, behind
            # the mask), and a masked NaN would still poison the sum (0 x NaN): it starts at zero.
            self.keys = torch.empty(slots, num_heads, head_size, dtype=dtype, device=device)
            self.values = torch.empty_like(self.keys)
            self.keys[0].zero_()
            self.values[0].zero_()
        self.device = device
        self._free = list(range(self.num_blocks - 1, -1, -1))  # a stack: the lowest block first
        self._tables: dict[object, list[int]] = {}
        self._slots: dict[object, Tensor] = {}  # each table expanded to its slots, grown with it
        self._offsets = torch.arange(block_size, device=device)

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Blocks held by sequences / all blocks."""
        return 1.0 - len(self._free) / self.num_blocks

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def held_blocks(self, key: object) -> int:
        return len(self._tables.get(key, ()))

    def missing_blocks(self, key: object, tokens: int) -> int:
        """Blocks ``key`` still needs to hold ``tokens`` tokens."""
        return max(0, self.blocks_for(tokens) - len(self._tables.get(key, ())))

    def reserve(self, key: object, tokens: int) -> bool:
        """Grow ``key``'s table to hold ``tokens`` tokens: all the blocks it needs, or none (False)."""
        need = self.missing_blocks(key, tokens)
        if need > len(self._free):
            return False
        if need:
            new = [self._free.pop() for _ in range(need)]
            self._tables.setdefault(key, []).extend(new)
            added = (torch.tensor(new, device=self.device)[:, None] * self.block_size + self._offsets).flatten()
            old = self._slots.get(key)
            self._slots[key] = added if old is None else torch.cat([old, added])
        elif key not in self._tables:
            self._tables[key] = []
            self._slots[key] = torch.empty(0, dtype=torch.int64, device=self.device)
        return True

    def shrink(self, key: object, tokens: int) -> None:
        """Give back the blocks of ``key`` past its first ``tokens`` tokens (a step that was not answered)."""
        table = self._tables.get(key)
        if table is None:
            return
        keep = self.blocks_for(tokens)
        if len(table) > keep:
            self._free.extend(reversed(table[keep:]))
            del table[keep:]
            self._slots[key] = self._slots[key][: keep * self.block_size]

    def release(self, key: object) -> None:
        table = self._tables.pop(key, None)
        self._slots.pop(key, None)
        if table:
            self._free.extend(reversed(table))

    def slots(self, key: object, tokens: int) -> Tensor:
        """The slots of ``key``'s first ``tokens`` positions (a view: the table may grow later, not shrink under it)."""
        return self._slots[key][:tokens]

    def write(self, key: object, start: int, k: Tensor, v: Tensor) -> None:
        """Store a step's k/v (t, H, D) at positions [start, start + t) of ``key`` (blocks reserved before)."""
        idx = self._slots[key][start : start + k.shape[0]]
        with torch.inference_mode():
            self.keys.index_copy_(0, idx, k)
            self.values.index_copy_(0, idx, v)

    def gather(self, index: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values at the slots of ``index`` (any shape): (*index.shape, H, D) each, new tensors."""
        flat = index.reshape(-1)
        k = self.keys.index_select(0, flat)
        v = self.values.index_select(0, flat)
        return k.view(*index.shape, *k.shape[1:]), v.view(*index.shape, *v.shape[1:])
