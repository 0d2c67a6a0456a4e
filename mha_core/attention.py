"""Causal multi-head self-attention with the semantics of simple-llm's MultiHeadAttention."""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import nullcontext
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mha_core.config import MHAConfig


class AttentionResult(NamedTuple):
    """What :meth:`MultiHeadAttention.forward` returns."""

    output: Tensor  # (B, T, E)
    weights: Tensor | None  # (B, len(heads), T, T) when asked for, else None


class MultiHeadAttention(nn.Module):
    r"""Multi-head self-attention as in *Attention Is All You Need* (Vaswani et al., 2017),
    with the semantics of simple-llm's ``MultiHeadAttention``.

    .. math::
        \text{MHA}(x) = \text{Dropout}(\text{Concat}(head_1, \dots, head_H) W^O + b^O),\quad
        head_i = \text{softmax}\Big(\frac{(x W_i^Q + b_i^Q)(x W_i^K + b_i^K)^T}{\sqrt{d_h}}
        + M\Big)(x W_i^V + b_i^V)

    where :math:`M` is :math:`-\infty` wherever attention is not allowed (future positions
    when causal, padding keys, entries of ``attn_mask`` that are False) and 0 elsewhere.

    The seed keeps one small ``nn.Linear`` per head for q, k and v; here they are fused into
    one ``qkv`` projection (q of all heads, then k, then v, head-major within each) and the
    output path runs on ``torch.nn.functional.scaled_dot_product_attention``. Seed checkpoints
    are converted on import by :mod:`mha_core.checkpoint`.

    Args:
        num_heads: number of attention heads H.
        emb_size: size E of the input and output embeddings.
        head_size: size of each head. Need not be ``emb_size // num_heads``: the output
            projection maps ``num_heads * head_size`` back to ``emb_size``.
        max_seq_len: longest sequence accepted; a longer input raises ``ValueError``.
        dropout: dropout probability after the output projection, in training mode only.
            Default: ``0.1``.
        causal: whether a position may attend only to itself and earlier positions, when
            ``forward`` is not told otherwise. Default: ``True``.

    Shapes:
        - x: :math:`(B, T, E)`, with :math:`1 \le T \le` ``max_seq_len``.
        - lengths: :math:`(B)` integers in :math:`[1, T]`; positions ``>= lengths[b]`` are padding.
        - attn_mask: bool :math:`(T, T)` or :math:`(B, T, T)`, True = may attend.
        - output: :math:`(B, T, E)`; rows of padding positions are exactly zero.
        - weights: :math:`(B, H', T, T)` with :math:`H'` = ``len(heads)`` (all heads by
          default); masked entries and padding rows are exactly zero.

    Examples::

        >>> mha = MultiHeadAttention(num_heads=8, emb_size=512, head_size=64, max_seq_len=1024)
        >>> mha.eval()
        >>> x = torch.randn(2, 50, 512)
        >>> out, weights = mha(x, lengths=torch.tensor([50, 30]), need_weights=True)
        >>> out.shape, weights.shape
        (torch.Size([2, 50, 512]), torch.Size([2, 8, 50, 50]))
    """

    def __init__(
        self,
        num_heads: int,
        emb_size: int,
        head_size: int,
        max_seq_len: int,
        dropout: float = 0.1,
        causal: bool = True,
    ) -> None:
        super().__init__()
        self.config = MHAConfig(num_heads, emb_size, head_size, max_seq_len, causal)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        inner = self.config.inner_size
        self.qkv = nn.Linear(emb_size, 3 * inner)
        self.proj = nn.Linear(inner, emb_size)
        self.dropout = nn.Dropout(dropout)

    @classmethod
    def from_config(cls, config: MHAConfig, dropout: float = 0.1) -> MultiHeadAttention:
        return cls(
            config.num_heads,
            config.emb_size,
            config.head_size,
            config.max_seq_len,
            dropout=dropout,
            causal=config.causal,
        )

    @classmethod
    def from_seed(cls, config: MHAConfig, seed: int, dropout: float = 0.1) -> MultiHeadAttention:
        """A module whose weights depend only on ``config`` and ``seed``.

        Uses nn.Linear's default initialisation, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), drawn from
        a private generator, so two replicas with the same seed compute the same function.
        """
        module = cls.from_config(config, dropout=dropout)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for lin in (module.qkv, module.proj):
                bound = 1.0 / math.sqrt(lin.in_features)
                for p in (lin.weight, lin.bias):
                    p.copy_(torch.rand(p.shape, generator=gen, dtype=torch.float64) * 2 * bound - bound)
        return module

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"num_heads={c.num_heads}, emb_size={c.emb_size}, head_size={c.head_size}, "
            f"max_seq_len={c.max_seq_len}, causal={c.causal}"
        )

    def forward(
        self,
        x: Tensor,
        *,
        lengths: Tensor | Sequence[int] | None = None,
        attn_mask: Tensor | None = None,
        causal: bool | None = None,
        need_weights: bool = False,
        heads: Sequence[int] | None = None,
    ) -> AttentionResult:
        ctx = nullcontext() if self.training else torch.inference_mode()
        with ctx:
            return self._forward(x, lengths, attn_mask, causal, need_weights, heads)

    def _forward(
        self,
        x: Tensor,
        lengths: Tensor | Sequence[int] | None,
        attn_mask: Tensor | None,
        causal: bool | None,
        need_weights: bool,
        heads: Sequence[int] | None,
    ) -> AttentionResult:
        cfg = self.config
        causal = cfg.causal if causal is None else bool(causal)
        B, T = self._check_input(x)
        lengths = self._check_lengths(lengths, B, T)
        heads = self._check_heads(heads) if need_weights else None
        attn_mask = self._check_mask(attn_mask, B, T)

        H, D = cfg.num_heads, cfg.head_size
        q, k, v = self.qkv(x).split(cfg.inner_size, dim=-1)
        q = q.view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        v = v.view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)

        allowed = self._allowed(B, T, x.device, lengths, attn_mask, causal)  # (B|1, 1, T, T) | None
        empty_rows = None
        if attn_mask is not None:
            # A query row that may attend to nothing gets a zero result, not NaN: open the
            # row up so softmax stays finite, then zero it afterwards.
            row_ok = allowed.any(dim=-1, keepdim=True)  # (B|1, 1, T, 1)
            if not bool(row_ok.all()):
                empty_rows = ~row_ok
                allowed = allowed | empty_rows

        weights = None
        all_heads = need_weights and set(heads) == set(range(H))
        if all_heads:
            # One explicit softmax serves both the weights and the output.
            weights, y = self._weights(q, k, allowed, causal, v)  # (B, H, T, T), (B, H, T, D)
            if heads != list(range(H)):
                weights = weights.index_select(1, torch.tensor(heads, device=x.device))
        else:
            if allowed is None:
                y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
            else:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
            if need_weights:
                idx = torch.tensor(heads, device=x.device)
                weights, _ = self._weights(q.index_select(1, idx), k.index_select(1, idx), allowed, causal)

        # weights is this call's own buffer: zero in place at inference (autograd needs the softmax's output intact)
        inplace = not torch.is_grad_enabled()
        if empty_rows is not None:
            y = y.masked_fill(empty_rows, 0.0)
            if weights is not None:
                weights = weights.masked_fill_(empty_rows, 0.0) if inplace else weights.masked_fill(empty_rows, 0.0)

        y = y.transpose(1, 2).reshape(B, T, cfg.inner_size)  # (B, T, H*D)
        out = self.dropout(self.proj(y))  # (B, T, E)

        if lengths is not None:
            pad_q = torch.arange(T, device=x.device) >= lengths.to(x.device)[:, None]  # (B, T)
            out = out.masked_fill(pad_q[:, :, None], 0.0)
            if weights is not None:
                pad = pad_q[:, None, :, None]
                weights = weights.masked_fill_(pad, 0.0) if inplace else weights.masked_fill(pad, 0.0)
        return AttentionResult(out, weights)

    def _weights(
        self, q: Tensor, k: Tensor, allowed: Tensor | None, causal: bool, v: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """Explicit softmax(q k^T / sqrt(d) + M), computed in float32 at least, and its product with v if given.

        At inference it runs in blocks of query rows, and writes the (B, h, T, T) weights once, in q's dtype:
        each block's scores and softmax are float32 temporaries of (B*h, 256, T) at most. Plain causal rows
        [a, b) only need keys [0, b), so the scores, the softmax and weights @ v skip the all-masked upper-right
        blocks (about 40% of the work at T=1024), whose weights are written as zeros. The causal mask is an
        additive 0/-inf bias folded into the scores GEMM (baddbmm) instead of a separate masked_fill pass, and
        the softmax runs in place.
        """
        B, h, T, D = q.shape
        compute = torch.promote_types(q.dtype, torch.float32)
        scale = 1.0 / math.sqrt(self.config.head_size)
        if torch.is_grad_enabled():  # training: out= and in-place ops below don't support autograd
            scores = (q.to(compute) * scale) @ k.to(compute).transpose(-2, -1)  # (B, h, T, T)
            if allowed is None and causal:
                allowed = _causal(T, q.device)[None, None]
            if allowed is not None:
                scores = scores.masked_fill(~allowed, float("-inf"))
            weights = torch.softmax(scores, dim=-1).to(q.dtype)
            return weights, None if v is None else weights @ v
        q3 = q.to(compute).reshape(B * h, T, D)  # the scale goes into the GEMMs' alpha: no scaled copy
        k3t = k.to(compute).reshape(B * h, T, D).transpose(1, 2)  # (B*h, D, T)
        v3 = None if v is None else v.reshape(B * h, T, D)
        plain_causal = allowed is None and causal
        bias = self._causal_bias(T, q.device, compute) if plain_causal else None  # (T, T): 0 / -inf above
        # The one (B*h, T, T) buffer, in the output dtype. Scores and softmax run in float32 blocks of
        # query rows that are written into it once (cast on the way), and weights @ v reads them back
        # from it: no second full-size copy, whatever the dtype, mask or padding.
        weights = torch.empty(B * h, T, T, dtype=q.dtype, device=q.device)
        y = None if v3 is None else torch.empty(B * h, T, D, dtype=v3.dtype, device=q.device)
        for a in range(0, T, _BLOCK):
            b = min(a + _BLOCK, T)
            n = b if plain_causal else T  # keys this block may see: causal rows [a, b) need keys [0, b)
            direct = T <= _BLOCK and weights.dtype == compute  # one block already in place: compute into it
            if bias is not None:
                block = torch.baddbmm(
                    bias[a:b, :n], q3[:, a:b], k3t[:, :, :n], alpha=scale, out=weights if direct else None
                )  # (B*h, b-a, n)
            else:
                block = torch.bmm(q3[:, a:b], k3t, out=weights if direct else None).mul_(scale)
                if allowed is not None:
                    block.view(B, h, b - a, n).masked_fill_(~allowed[..., a:b, :], float("-inf"))
            torch.softmax(block, dim=-1, out=block)
            if not direct:
                weights[:, a:b, :n] = block
                if n < T:
                    weights[:, a:b, n:] = 0.0
            if y is not None:
                torch.bmm(weights[:, a:b, :n], v3[:, :n], out=y[:, a:b])
        return weights.view(B, h, T, T), None if y is None else y.view(B, h, T, D)

    def _causal_bias(self, T: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        """The (T, T) additive causal mask, sliced from one cached square tensor as long as the longest T
        seen so far (its weights took T x T per head anyway)."""
        cached = self.__dict__.get("_causal_bias_cache")
        if cached is None or cached.device != device or cached.dtype != dtype or cached.shape[0] < T:
            n = T
            with torch.inference_mode(False):  # a normal tensor, usable whatever mode a later call runs in
                cached = torch.zeros(n, n, dtype=dtype, device=device)
                cached.masked_fill_(~_causal(n, device), float("-inf"))
            self.__dict__["_causal_bias_cache"] = cached
        return cached[:T, :T]

    def _allowed(
        self,
        B: int,
        T: int,
        device: torch.device,
        lengths: Tensor | None,
        attn_mask: Tensor | None,
        causal: bool,
    ) -> Tensor | None:
        """The boolean (B|1, 1, T, T) 'may attend' mask, or None when plain causal/full will do."""
        mask = None
        if attn_mask is not None:
            mask = attn_mask.to(device)
            mask = mask[None, None] if mask.dim() == 2 else mask[:, None]
        if causal and mask is not None:
            mask = mask & _causal(T, device)
        if lengths is not None:
            key_ok = torch.arange(T, device=device) < lengths.to(device)[:, None]  # (B, T)
            key_ok = key_ok[:, None, None, :]  # (B, 1, 1, T)
            if mask is not None:
                mask = mask & key_ok
            elif causal:
                mask = _causal(T, device) & key_ok
            else:
                mask = key_ok.expand(B, 1, T, T)
        return mask  # None: plain causal (SDPA's is_causal) or no mask at all

    def _check_input(self, x: Tensor) -> tuple[int, int]:
        cfg = self.config
        if not isinstance(x, Tensor):
            raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 3:
            raise ValueError(f"x must have shape [B, T, E], got {x.dim()} dims {list(x.shape)}")
        B, T, E = x.shape
        if cfg.emb_size != E:
            raise ValueError(f"x has emb_size {E}, but the model expects {cfg.emb_size}")
        if T < 1 or B < 1:
            raise ValueError(f"x must have B >= 1 and T >= 1, got shape {list(x.shape)}")
        if cfg.max_seq_len < T:
            raise ValueError(f"sequence length {T} exceeds max_seq_len {cfg.max_seq_len}")
        if not x.is_floating_point():
            raise ValueError(f"x must be a floating-point tensor, got {x.dtype}")
        return B, T

    def _check_lengths(self, lengths: Tensor | Sequence[int] | None, B: int, T: int) -> Tensor | None:
        if lengths is None:
            return None
        lengths = torch.as_tensor(lengths)
        if lengths.dtype.is_floating_point or lengths.dtype == torch.bool or lengths.is_complex():
            raise ValueError(f"lengths must be integers, got {lengths.dtype}")
        if lengths.shape != (B,):
            raise ValueError(f"lengths must have shape [{B}] (one per sequence), got {list(lengths.shape)}")
        cpu = lengths.to("cpu", torch.int64)
        lo, hi = int(cpu.min()), int(cpu.max())
        if lo < 1 or hi > T:
            bad = int(((cpu < 1) | (cpu > T)).nonzero()[0, 0])
            raise ValueError(f"lengths[{bad}] = {int(cpu[bad])} is out of range 1..{T}")
        if lo == T:
            return None  # no padding at all: take the unpadded fast path
        return cpu

    def _check_heads(self, heads: Sequence[int] | None) -> list[int]:
        H = self.config.num_heads
        if heads is None:
            return list(range(H))
        heads = [int(h) for h in heads]
        if not heads:
            raise ValueError("heads must name at least one head")
        for h in heads:
            if not 0 <= h < H:
                raise ValueError(f"head index {h} is out of range 0..{H - 1}")
        return heads

    def _check_mask(self, attn_mask: Tensor | None, B: int, T: int) -> Tensor | None:
        if attn_mask is None:
            return None
        if not isinstance(attn_mask, Tensor) or attn_mask.dtype != torch.bool:
            got = attn_mask.dtype if isinstance(attn_mask, Tensor) else type(attn_mask).__name__
            raise ValueError(f"attn_mask must be a bool tensor (True = may attend), got {got}")
        shape = list(attn_mask.shape)
        if shape not in ([T, T], [B, T, T]):
            raise ValueError(f"attn_mask must have shape [{T}, {T}] or [{B}, {T}, {T}], got {shape}")
        return attn_mask


_BLOCK = 256  # query rows per block of the explicit causal softmax


def _causal(T: int, device: torch.device) -> Tensor:
    """Lower-triangular (T, T) bool mask, True = may attend (the seed's tril)."""
    return torch.ones(T, T, dtype=torch.bool, device=device).tril()
