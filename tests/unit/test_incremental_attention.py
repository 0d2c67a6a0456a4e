"""mha_core.incremental against the float64 reference: a step's rows are the causal forward's over the whole
sequence so far (recomputed by the naive reference), whatever the split into steps."""

from __future__ import annotations

import pytest
import torch

from mha_core import attend_padded, load_checkpoint, project, step
from tests.devices import tol
from tests.reference import naive_attention, seed_checkpoint

F32 = tol(torch.float32)


def make_pair(cfg, tmp_path):
    seed = seed_checkpoint(tmp_path / "seed.pt", *cfg)
    return seed, load_checkpoint(tmp_path / "seed.pt").eval()


@pytest.mark.parametrize("cfg", [(4, 32, 8, 24), (3, 20, 7, 24)], ids=["H4-E32-D8", "H3-E20-D7"])
@pytest.mark.parametrize("splits", [[1] * 6, [5, 1, 1, 3, 1], [12]], ids=["tokens", "prompt-then-mixed", "one"])
def test_steps_equal_causal_forward_over_the_whole_sequence(cfg, splits, tmp_path, rng_seed):
    seed, mha = make_pair(cfg, tmp_path)
    T = sum(splits)
    x = torch.randn(1, T, cfg[1])
    ref_out, ref_w = naive_attention(seed, x)
    K = V = None
    pos = 0
    for t in splits:
        res = step(mha, x[:, pos : pos + t], K, V, need_weights=True)
        assert res.output.shape == (1, t, cfg[1])
        assert res.weights.shape == (1, cfg[0], t, pos + t)
        torch.testing.assert_close(res.output.double(), ref_out[:, pos : pos + t], **F32)
        torch.testing.assert_close(res.weights.double(), ref_w[:, :, pos : pos + t, : pos + t], **F32)
        plain = step(mha, x[:, pos : pos + t], K, V)  # the SDPA path, no weights
        assert plain.weights is None
        torch.testing.assert_close(plain.output.double(), ref_out[:, pos : pos + t], **F32)
        K = res.k if K is None else torch.cat([K, res.k])
        V = res.v if V is None else torch.cat([V, res.v])
        pos += t
    assert K.shape == (T, cfg[0], cfg[2])


def test_weights_of_some_heads(tmp_path, rng_seed):
    seed, mha = make_pair((4, 32, 8, 16), tmp_path)
    x = torch.randn(1, 7, 32)
    _, ref_w = naive_attention(seed, x)
    first = step(mha, x[:, :4])
    res = step(mha, x[:, 4:], first.k, first.v, need_weights=True, heads=[2, 0])
    torch.testing.assert_close(res.weights.double(), ref_w[:, [2, 0], 4:7, :7], **F32)


def test_batched_steps_of_interleaved_sequences(tmp_path, rng_seed):
    """Three sequences with their own cache lengths and step lengths in one packed forward."""
    seed, mha = make_pair((4, 32, 8, 32), tmp_path)
    xs = [torch.randn(1, T, 32) for T in (9, 3, 14)]
    past = [6, 0, 13]  # cached tokens of each before this step
    refs = [naive_attention(seed, x)[0] for x in xs]
    caches = []
    for x, L in zip(xs, past, strict=True):
        caches.append(step(mha, x[:, :L]) if L else None)
    new = [x.shape[1] - L for x, L in zip(xs, past, strict=True)]  # 3, 3, 1
    with torch.inference_mode():
        rows = torch.cat([x[0, L:] for x, L in zip(xs, past, strict=True)])
        q, k, v = project(mha, rows)
        P = max(x.shape[1] for x in xs)
        keys = torch.full((3, P, 4, 8), 1e3)  # padding that would show if it were attended to
        values = torch.full((3, P, 4, 8), 1e3)
        row = 0
        for i, (c, L, t) in enumerate(zip(caches, past, new, strict=True)):
            if c is not None:
                keys[i, :L], values[i, :L] = c.k, c.v
            keys[i, L : L + t], values[i, L : L + t] = k[row : row + t], v[row : row + t]
            row += t
        out = attend_padded(mha, q, keys, values, new, [L + t for L, t in zip(past, new, strict=True)])
    row = 0
    for ref, L, t in zip(refs, past, new, strict=True):
        torch.testing.assert_close(out[row : row + t].double(), ref[0, L : L + t], **F32)
        row += t


def test_too_long_names_both_lengths(tmp_path):
    _, mha = make_pair((4, 32, 8, 8), tmp_path)
    first = step(mha, torch.randn(1, 6, 32))
    with pytest.raises(ValueError, match=r"9 tokens long \(6 cached \+ 3 in this step\), more than max_seq_len 8"):
        step(mha, torch.randn(1, 3, 32), first.k, first.v)
    with pytest.raises(ValueError, match=r"\[1, t, 32\]"):
        step(mha, torch.randn(2, 1, 32))
