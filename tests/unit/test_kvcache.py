"""The block pool: sizing, all-or-nothing reservation, shrink and release, slots and writes."""

from __future__ import annotations

import pytest
import torch

from service.engine.kvcache import KVCache


def cache(blocks=4, block_size=4, H=2, D=3) -> KVCache:
    per_block = 2 * block_size * H * D * 4
    return KVCache(
        num_heads=H,
        head_size=D,
        dtype=torch.float32,
        device=torch.device("cpu"),
        max_bytes=blocks * per_block + 7,
        block_size=block_size,
    )


def test_pool_is_sized_by_bytes_and_refuses_less_than_a_block():
    c = cache(blocks=4)
    assert c.num_blocks == 4 and c.capacity_tokens == 16 and c.keys.shape == (16, 2, 3)
    with pytest.raises(ValueError, match="less than one block"):
        KVCache(num_heads=2, head_size=3, dtype=torch.float32, device=torch.device("cpu"), max_bytes=10)


def test_reserve_is_all_or_nothing_and_usage_follows():
    c = cache(blocks=4)
    assert c.reserve("a", 5)  # 2 blocks
    assert c.usage == 0.5
    assert not c.reserve("b", 9)  # 3 blocks: only 2 free, nothing taken
    assert c.free_blocks == 2 and c.held_blocks("b") == 0
    assert c.reserve("b", 8)
    assert c.usage == 1.0
    c.shrink("a", 3)  # back to one block
    assert c.held_blocks("a") == 1 and c.free_blocks == 1
    c.release("b")
    assert c.free_blocks == 3


def test_write_then_gather_returns_the_rows_at_their_positions():
    c = cache(blocks=4, block_size=2)
    assert c.reserve("a", 3) and c.reserve("b", 2) and c.reserve("a", 5)  # a's blocks are not contiguous
    k = torch.randn(5, 2, 3)
    v = torch.randn(5, 2, 3)
    c.write("a", 0, k[:3], v[:3])
    c.write("b", 0, -k[:2], -v[:2])
    c.write("a", 3, k[3:], v[3:])
    gk, gv = c.gather(c.slots("a", 5)[None])
    torch.testing.assert_close(gk[0], k)
    torch.testing.assert_close(gv[0], v)
    gk, _ = c.gather(c.slots("b", 2))
    torch.testing.assert_close(gk, -k[:2])
