"""Incremental (cached) causal attention: the rows of a sequence's new tokens, computed against the keys and
values of its earlier tokens instead of recomputing the whole prefix.

A generating caller attends once per new token. Without a cache each step recomputes the q/k/v projections
of every earlier token; here a step projects only its own t rows, appends their k/v to what the caller keeps,
and its cost is those projections plus one pass over the cache. The results are exactly the rows of
:meth:`MultiHeadAttention.forward` (causal) over the whole sequence so far.

Layout of a cache: one row per token, ``(L, H, D)`` (tokens, heads, head size), so that a block pool can hold
it as fixed-size runs of rows (service/engine/kvcache.py) and a step appends without moving anything.

The batched form (:func:`attend_padded`) serves continuous batching: the steps of several sequences, each its
own t and cache length, in one forward; one projection matmul for all new rows (:func:`project`), then SDPA of
each step's rows against its own keys, gathered right-padded to the longest, under a mask that hides the
padding and the future.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from mha_core.attention import MultiHeadAttention


class StepResult(NamedTuple):
    """What :func:`step` returns."""

    output: Tensor  # (1, t, E): the causal forward's rows for the step's tokens
    weights: Tensor | None  # (1, H', t, L + t) when asked for, else None
    k: Tensor  # (t, H, D): the step's keys, to append to the cache
    v: Tensor  # (t, H, D)


def project(module: MultiHeadAttention, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v of rows ``x`` (N, E), each (N, H, D): one matmul whatever the number of sequences they belong to."""
    cfg = module.config
    N = x.shape[0]
    q, k, v = module.qkv(x).split(cfg.inner_size, dim=-1)
    shape = (N, cfg.num_heads, cfg.head_size)
    return q.view(shape), k.view(shape), v.view(shape)


def attend_padded(
    module: MultiHeadAttention,
    q: Tensor,
    keys: Tensor,
    values: Tensor,
    new_lens: Sequence[int],
    total_lens: Sequence[int],
) -> Tensor:
    """Outputs (N, E) of the packed rows ``q`` (N, H, D) of S steps, step i's ``new_lens[i]`` rows after step i-1's.

    ``keys``/``values`` (S, P, H, D): step i's keys at positions [0, total_lens[i]), its own new rows last;
    positions past that are padding (any finite value). Row r of step i sits at position
    ``total_lens[i] - new_lens[i] + r`` and sees the keys up to it: the causal forward's row there.
    """
    S, P, H, D = keys.shape
    N = q.shape[0]
    device = q.device
    tmax = max(new_lens)
    if tmax == 1:  # decode steps: one row each, nothing to pad
        qp = q.view(S, 1, H, D)
    else:
        step_of_row = torch.repeat_interleave(torch.arange(S), torch.tensor(new_lens)).to(device)
        starts = torch.tensor([0, *new_lens[:-1]]).cumsum(0).to(device)
        pos_of_row = torch.arange(N, device=device) - starts[step_of_row]
        qp = q.new_zeros(S, tmax, H, D)
        qp[step_of_row, pos_of_row] = q
    total = torch.tensor(total_lens, device=device)
    new = torch.tensor(new_lens, device=device)
    qpos = (total - new)[:, None] + torch.arange(tmax, device=device)[None]  # (S, tmax): each row's position
    # A padding row (r >= new_lens[i]) sees real keys too, so its softmax stays finite; it is dropped below.
    allowed = torch.arange(P, device=device)[None, None, :] <= qpos[:, :, None]  # (S, tmax, P)
    y = F.scaled_dot_product_attention(
        qp.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2), attn_mask=allowed[:, None]
    )  # (S, H, tmax, D)
    y = y.transpose(1, 2)  # (S, tmax, H, D)
    rows = y.reshape(S, H * D) if tmax == 1 else y[step_of_row, pos_of_row].reshape(N, H * D)
    return module.dropout(module.proj(rows))  # (N, E)


def step(
    module: MultiHeadAttention,
    x: Tensor,
    past_k: Tensor | None = None,
    past_v: Tensor | None = None,
    *,
    need_weights: bool = False,
    heads: Sequence[int] | None = None,
) -> StepResult:
    """One step of one sequence: x (1, t, E) after ``past_k``/``past_v`` (L, H, D) (None: the first step).

    Raises ValueError when x is malformed or the sequence would exceed ``max_seq_len``, naming both lengths.
    """
    with torch.inference_mode():
        return _step(module, x, past_k, past_v, need_weights, heads)


def _step(
    module: MultiHeadAttention,
    x: Tensor,
    past_k: Tensor | None,
    past_v: Tensor | None,
    need_weights: bool,
    heads: Sequence[int] | None,
) -> StepResult:
    cfg = module.config
    if x.dim() != 3 or x.shape[0] != 1 or x.shape[2] != cfg.emb_size or x.shape[1] < 1:
        raise ValueError(f"a step's x must have shape [1, t, {cfg.emb_size}] with t >= 1, got {list(x.shape)}")
    t = x.shape[1]
    L = 0 if past_k is None else past_k.shape[0]
    check_length(cfg.max_seq_len, L, t)
    q, k, v = project(module, x[0])  # (t, H, D) each
    K = k if past_k is None else torch.cat([past_k, k])  # (L + t, H, D)
    V = v if past_v is None else torch.cat([past_v, v])
    if not need_weights:
        out = attend_padded(module, q, K[None], V[None], [t], [L + t])
        return StepResult(out[None], None, k, v)
    heads = module._check_heads(heads)
    # Explicit softmax, in float32 at least, as the module's own weights path: (H, t, L + t)
    compute = torch.promote_types(q.dtype, torch.float32)
    scores = torch.einsum("thd,shd->hts", q.to(compute), K.to(compute)) / math.sqrt(cfg.head_size)
    qpos = L + torch.arange(t, device=x.device)
    future = torch.arange(L + t, device=x.device)[None, :] > qpos[:, None]  # (t, L + t)
    weights = torch.softmax(scores.masked_fill_(future, float("-inf")), dim=-1)
    y = torch.einsum("hts,shd->thd", weights, V.to(compute)).to(q.dtype).reshape(t, cfg.inner_size)
    out = module.dropout(module.proj(y))
    w = weights.to(q.dtype)
    if heads != list(range(cfg.num_heads)):
        w = w.index_select(0, torch.tensor(heads, device=x.device))
    return StepResult(out[None], w[None], k, v)


def check_length(max_seq_len: int, past: int, new: int) -> None:
    """The ValueError of a step that would take its sequence past ``max_seq_len``, naming both lengths."""
    if past + new > max_seq_len:
        raise ValueError(
            f"the sequence would be {past + new} tokens long ({past} cached + {new} in this step), "
            f"more than max_seq_len {max_seq_len}"
        )
