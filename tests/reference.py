"""An independent, deliberately naive reference for the attention module.

Written from the seed's description (shared/seed/SEED_NOTES.md), not from mha_core: one small
nn.Linear per head for q, k and v, a Python loop over heads, an explicit masked softmax, all
in float64. Also builds the seed's checkpoint layouts for the import tests.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class SeedHead(nn.Module):
    def __init__(self, emb_size: int, head_size: int, max_seq_len: int) -> None:
        super().__init__()
        self._q = nn.Linear(emb_size, head_size)
        self._k = nn.Linear(emb_size, head_size)
        self._v = nn.Linear(emb_size, head_size)
        self.register_buffer("_tril_mask", torch.tril(torch.ones(max_seq_len, max_seq_len, dtype=torch.bool)))


class SeedMHA(nn.Module):
    """The seed's parameter layout (its state dict is the 'seed-mha' checkpoint format)."""

    def __init__(self, num_heads: int, emb_size: int, head_size: int, max_seq_len: int) -> None:
        super().__init__()
        self._heads = nn.ModuleList(SeedHead(emb_size, head_size, max_seq_len) for _ in range(num_heads))
        self._layer = nn.Linear(num_heads * head_size, emb_size)
        self.max_seq_len = max_seq_len


def random_seed_mha(num_heads: int, emb_size: int, head_size: int, max_seq_len: int) -> SeedMHA:
    """A seed-layout module with weights uniform in [-0.5, 0.5] (torch's global generator): attention that is
    far from uniform, so that a wrong mask or a wrong key shows."""
    seed = SeedMHA(num_heads, emb_size, head_size, max_seq_len)
    for p in seed.parameters():
        torch.nn.init.uniform_(p, -0.5, 0.5)
    return seed


def seed_checkpoint(path, *cfg: int) -> SeedMHA:
    """``random_seed_mha(*cfg)``, saved at ``path`` as a seed-mha checkpoint (what MHA_CHECKPOINT loads)."""
    seed = random_seed_mha(*cfg)
    torch.save(seed.state_dict(), path)
    return seed


def naive_attention(
    seed: SeedMHA,
    x: torch.Tensor,
    *,
    lengths: list[int] | None = None,
    attn_mask: torch.Tensor | None = None,
    causal: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(output [B, T, E], weights [B, H, T, T]) in float64, the slow obvious way."""
    x = x.double()
    B, T, _ = x.shape
    allowed = torch.ones(B, T, T, dtype=torch.bool)
    if causal:
        allowed &= torch.tril(torch.ones(T, T, dtype=torch.bool))
    if attn_mask is not None:
        allowed &= attn_mask if attn_mask.dim() == 3 else attn_mask[None]
    if lengths is not None:
        for b, n in enumerate(lengths):
            allowed[b, :, n:] = False
    outs, weights = [], []
    for head in seed._heads:
        q = x @ head._q.weight.double().T + head._q.bias.double()
        k = x @ head._k.weight.double().T + head._k.bias.double()
        v = x @ head._v.weight.double().T + head._v.bias.double()
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        w = torch.zeros_like(scores)
        for b in range(B):
            for t in range(T):
                ok = allowed[b, t]
                if ok.any():
                    s = scores[b, t][ok]
                    e = torch.exp(s - s.max())
                    w[b, t][ok] = e / e.sum()
        outs.append(w @ v)
        weights.append(w)
    out = torch.cat(outs, dim=-1) @ seed._layer.weight.double().T + seed._layer.bias.double()
    w = torch.stack(weights, dim=1)
    if lengths is not None:
        for b, n in enumerate(lengths):
            out[b, n:] = 0
            w[b, :, n:] = 0
    return out, w


def seed_gpt_checkpoint(layers: list[SeedMHA], **extra: int) -> dict:
    """What the seed GPT's save() writes: model_state_dict plus hyperparameters."""
    sd: dict[str, torch.Tensor] = {
        "_token_embeddings._embedding.weight": torch.randn(11, layers[0]._layer.out_features)
    }
    for i, mha in enumerate(layers):
        for k, v in mha.state_dict().items():
            sd[f"_decoders.{i}._heads.{k}"] = v
        sd[f"_decoders.{i}._ff._layer1.weight"] = torch.randn(4, 4)
    h0 = layers[0]._heads[0]
    hp = {
        "vocab_size": 11,
        "max_seq_len": h0._tril_mask.shape[0],
        "emb_size": h0._q.in_features,
        "num_heads": len(layers[0]._heads),
        "head_size": h0._q.out_features,
        "num_layers": len(layers),
    }
    hp.update(extra)
    return {"model_state_dict": sd, **hp}
