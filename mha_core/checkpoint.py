"""Checkpoints: our safetensors format, and imports from the layouts users already have.

Formats, detected from the file:

- ``mha-serve``: safetensors with ``qkv.weight``, ``qkv.bias``, ``proj.weight``, ``proj.bias``
  and the config in its metadata. Written by :func:`save_checkpoint`.
- ``seed-mha``: a state dict of simple-llm's standalone MultiHeadAttention
  (``_heads.{i}._q.weight``, ..., ``_layer.weight``), pickled or safetensors.
- ``seed-gpt``: simple-llm's GPT ``save()`` file, a dict with ``model_state_dict`` and the
  hyperparameters; one decoder layer ``L`` is taken from ``_decoders.{L}._heads.``.
- ``torch-mha``: a ``torch.nn.MultiheadAttention`` state dict (``in_proj_weight``,
  ``in_proj_bias``, ``out_proj.weight``, ``out_proj.bias``). It records neither the number of
  heads nor a maximum length: ``num_heads`` must be given, ``max_seq_len`` defaults to
  :data:`DEFAULT_MAX_SEQ_LEN`, ``causal`` to True.

Pickled files are read with ``torch.load(weights_only=True)`` only.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from mha_core.attention import MultiHeadAttention
from mha_core.config import MHAConfig

FORMAT_NAME = "mha-serve"
FORMAT_VERSION = "1"
DEFAULT_MAX_SEQ_LEN = 1024
"""max_seq_len given to a torch.nn.MultiheadAttention import when the caller names none."""

_TENSORS = ("qkv.weight", "qkv.bias", "proj.weight", "proj.bias")
_SAFETENSORS_MAX_HEADER = 100 * 1024 * 1024


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or that disagrees with itself or with the caller."""


@dataclass(frozen=True)
class LoadedCheckpoint:
    module: MultiHeadAttention
    format: str
    checksum: str


def save_checkpoint(module: MultiHeadAttention, path: str | os.PathLike) -> str:
    """Write ``module`` in our safetensors format; returns the content checksum."""
    from safetensors.torch import save_file

    tensors = _fused_state(module)
    metadata = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION}
    metadata.update({k: json.dumps(v) for k, v in module.config.to_dict().items()})
    save_file(tensors, os.fspath(path), metadata=metadata)
    return checksum(module)


def load_checkpoint(
    path: str | os.PathLike,
    *,
    layer: int | None = None,
    num_heads: int | None = None,
    max_seq_len: int | None = None,
    causal: bool | None = None,
) -> MultiHeadAttention:
    """A ready (eval-mode) MultiHeadAttention from any supported checkpoint format.

    Keywords supply what the file lacks and must agree with what it has.
    """
    return read_checkpoint(path, layer=layer, num_heads=num_heads, max_seq_len=max_seq_len, causal=causal).module


def read_checkpoint(
    path: str | os.PathLike,
    *,
    layer: int | None = None,
    num_heads: int | None = None,
    max_seq_len: int | None = None,
    causal: bool | None = None,
) -> LoadedCheckpoint:
    """Like :func:`load_checkpoint`, also telling the detected format and the checksum."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist or is not a file")
    given = {"num_heads": num_heads, "max_seq_len": max_seq_len, "causal": causal}
    if _is_safetensors(path):
        tensors, metadata = _read_safetensors(path)
        if metadata.get("format") == FORMAT_NAME:
            fmt, module = FORMAT_NAME, _from_ours(tensors, metadata, given)
        else:
            fmt, module = _from_state_dict(tensors, layer, given)
    else:
        obj = _read_pickle(path)
        fmt, module = _from_state_dict(obj, layer, given)
    module.eval()
    return LoadedCheckpoint(module, fmt, checksum(module))


def checksum(module: MultiHeadAttention) -> str:
    """sha256 over the config and the fused tensors: the same function gives the same sum,
    whichever format it was loaded from."""
    h = hashlib.sha256()
    h.update(json.dumps(module.config.to_dict(), sort_keys=True).encode())
    for name, t in _fused_state(module).items():
        t = t.contiguous()
        h.update(f"{name}:{t.dtype}:{list(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return "sha256:" + h.hexdigest()


# -- reading files ------------------------------------------------------------------------


def _is_safetensors(path: Path) -> bool:
    with path.open("rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return 0 < n <= _SAFETENSORS_MAX_HEADER and head[8:9] == b"{"


def _read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{path}: not a readable safetensors file: {e}") from e
    return tensors, metadata


def _read_pickle(path: Path) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: not a safetensors file, and torch.load(weights_only=True) failed: {e}") from e


# -- formats ------------------------------------------------------------------------------


def _from_ours(tensors: dict[str, Tensor], metadata: dict[str, str], given: dict) -> MultiHeadAttention:
    try:
        cfg = {k: json.loads(metadata[k]) for k in ("num_heads", "emb_size", "head_size", "max_seq_len", "causal")}
    except KeyError as e:
        raise CheckpointError(f"mha-serve checkpoint metadata lacks {e.args[0]!r}") from e
    except json.JSONDecodeError as e:
        raise CheckpointError(f"mha-serve checkpoint metadata is not valid JSON: {e}") from e
    config = _config(cfg, given, "mha-serve metadata")
    missing = [k for k in _TENSORS if k not in tensors]
    if missing:
        raise CheckpointError(f"mha-serve checkpoint lacks tensor(s) {missing}")
    extra = sorted(set(tensors) - set(_TENSORS))
    if extra:
        raise CheckpointError(f"mha-serve checkpoint has unexpected tensor(s) {extra}")
    return _build(config, tensors)


def _from_state_dict(obj: object, layer: int | None, given: dict) -> tuple[str, MultiHeadAttention]:
    if isinstance(obj, dict) and "model_state_dict" in obj:
        return "seed-gpt", _from_seed_gpt(obj, layer, given)
    if not isinstance(obj, dict) or not all(isinstance(k, str) for k in obj):
        raise CheckpointError(
            f"unrecognised checkpoint: expected a state dict or a seed GPT file, got {type(obj).__name__}"
        )
    if layer is not None:
        raise CheckpointError("layer= applies only to a seed GPT checkpoint (with model_state_dict)")
    if "_heads.0._q.weight" in obj:
        return "seed-mha", _from_seed_mha(obj, "", given)
    if "in_proj_weight" in obj or "q_proj_weight" in obj:
        return "torch-mha", _from_torch_mha(obj, given)
    if "qkv.weight" in obj:
        raise CheckpointError("checkpoint has mha-serve tensors but no mha-serve metadata with its config")
    sample = sorted(obj)[:5]
    raise CheckpointError(
        "unrecognised state dict: expected seed keys (_heads.0._q.weight, ...) or "
        f"nn.MultiheadAttention keys (in_proj_weight, ...); first keys are {sample}"
    )


def _from_seed_gpt(obj: dict, layer: int | None, given: dict) -> MultiHeadAttention:
    sd = obj["model_state_dict"]
    if not isinstance(sd, dict):
        raise CheckpointError(f"model_state_dict must be a dict, got {type(sd).__name__}")
    layers = sorted({int(m.group(1)) for k in sd if (m := re.match(r"_decoders\.(\d+)\._heads\.", k))})
    if not layers:
        raise CheckpointError("seed GPT checkpoint has no keys under _decoders.{L}._heads.")
    if layer is None:
        if len(layers) > 1:
            raise CheckpointError(
                f"seed GPT checkpoint has {len(layers)} decoder layers ({layers[0]}..{layers[-1]}): "
                "choose one with layer= (--layer, MHA_CHECKPOINT_LAYER)"
            )
        layer = layers[0]
    if layer not in layers:
        raise CheckpointError(f"layer {layer} is not in the checkpoint, which has decoder layers {layers}")
    declared = {k: obj[k] for k in ("num_heads", "emb_size", "head_size", "max_seq_len") if k in obj}
    prefix = f"_decoders.{layer}._heads."
    sub = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    module = _from_seed_mha(sub, prefix, given)
    cfg = module.config.to_dict()
    for k, v in declared.items():
        if int(v) != cfg[k]:
            raise CheckpointError(
                f"seed GPT hyperparameter {k}={v} disagrees with the tensors of layer {layer}, which give {cfg[k]}"
            )
    return module


def _from_seed_mha(sd: dict[str, Tensor], prefix: str, given: dict) -> MultiHeadAttention:
    heads = sorted({int(m.group(1)) for k in sd if (m := re.match(r"_heads\.(\d+)\.", k))})
    if heads != list(range(len(heads))):
        raise CheckpointError(f"seed heads must be numbered 0..N-1, found {heads}")
    H = len(heads)
    w0 = _get(sd, prefix, "_heads.0._q.weight", dims=2)
    D, E = w0.shape
    parts: dict[str, list[Tensor]] = {"w": [], "b": []}
    for proj in ("_q", "_k", "_v"):
        for i in range(H):
            parts["w"].append(_get(sd, prefix, f"_heads.{i}.{proj}.weight", shape=(D, E)))
            parts["b"].append(_get(sd, prefix, f"_heads.{i}.{proj}.bias", shape=(D,)))
    proj_w = _get(sd, prefix, "_layer.weight", shape=(E, H * D))
    proj_b = _get(sd, prefix, "_layer.bias", shape=(E,))
    seq_lens = {tuple(t.shape) for k, t in sd.items() if k.endswith("._tril_mask")}
    inferred: dict[str, object] = {"num_heads": H, "emb_size": E, "head_size": D}
    if len(seq_lens) > 1:
        raise CheckpointError(f"seed heads disagree on _tril_mask shape: {sorted(seq_lens)}")
    if seq_lens:
        (shape,) = seq_lens
        if len(shape) != 2 or shape[0] != shape[1]:
            raise CheckpointError(f"{prefix}_heads.0._tril_mask must be square, got {list(shape)}")
        inferred["max_seq_len"] = shape[0]
    config = _config(inferred, given, "the seed tensors")
    tensors = {
        "qkv.weight": torch.cat(parts["w"], 0),
        "qkv.bias": torch.cat(parts["b"], 0),
        "proj.weight": proj_w,
        "proj.bias": proj_b,
    }
    return _build(config, tensors)


def _from_torch_mha(sd: dict[str, Tensor], given: dict) -> MultiHeadAttention:
    if "q_proj_weight" in sd:
        raise CheckpointError(
            "nn.MultiheadAttention with kdim/vdim != embed_dim (q_proj_weight, ...) is cross-attention "
            "and cannot be served as self-attention"
        )
    for k in ("bias_k", "bias_v"):
        if k in sd:
            raise CheckpointError(f"nn.MultiheadAttention with add_bias_kv ({k}) is not supported")
    if given["num_heads"] is None:
        raise CheckpointError(
            "an nn.MultiheadAttention state dict does not record the number of heads: "
            "pass num_heads= (--num-heads, MHA_NUM_HEADS)"
        )
    w = _get(sd, "", "in_proj_weight", dims=2)
    E3, E = w.shape
    if E3 != 3 * E:
        raise CheckpointError(f"in_proj_weight must have shape [3*E, E], got {list(w.shape)}")
    H = given["num_heads"]
    if E % H:
        raise CheckpointError(f"embed_dim {E} is not divisible by num_heads {H}")
    bias = sd.get("in_proj_bias")
    bias = torch.zeros(3 * E, dtype=w.dtype) if bias is None else _get(sd, "", "in_proj_bias", shape=(3 * E,))
    out_w = _get(sd, "", "out_proj.weight", shape=(E, E))
    out_b = sd.get("out_proj.bias")
    out_b = torch.zeros(E, dtype=w.dtype) if out_b is None else _get(sd, "", "out_proj.bias", shape=(E,))
    inferred = {"emb_size": E, "head_size": E // H}
    given = dict(given)
    if given.get("max_seq_len") is None:
        given["max_seq_len"] = DEFAULT_MAX_SEQ_LEN
    config = _config(inferred, given, "in_proj_weight")
    tensors = {"qkv.weight": w, "qkv.bias": bias, "proj.weight": out_w, "proj.bias": out_b}
    return _build(config, tensors)


# -- helpers ------------------------------------------------------------------------------


def _get(sd: dict, prefix: str, key: str, *, shape: tuple[int, ...] | None = None, dims: int | None = None) -> Tensor:
    if key not in sd:
        raise CheckpointError(f"checkpoint lacks {prefix}{key}")
    t = sd[key]
    if not isinstance(t, Tensor):
        raise CheckpointError(f"{prefix}{key} must be a tensor, got {type(t).__name__}")
    if shape is not None and tuple(t.shape) != shape:
        raise CheckpointError(f"{prefix}{key} has shape {list(t.shape)}, expected {list(shape)}")
    if dims is not None and t.dim() != dims:
        raise CheckpointError(f"{prefix}{key} must have {dims} dims, got shape {list(t.shape)}")
    if not t.is_floating_point():
        raise CheckpointError(f"{prefix}{key} must be floating point, got {t.dtype}")
    return t


def _config(inferred: dict, given: dict, source: str) -> MHAConfig:
    values = dict(inferred)
    for k, v in given.items():
        if v is None:
            continue
        if k in values and values[k] != v:
            raise CheckpointError(f"{k}={v} was given, but {source} say(s) {k}={values[k]}")
        values[k] = v
    values.setdefault("causal", True)
    if "max_seq_len" not in values:
        raise CheckpointError(f"{source} do(es) not record max_seq_len: pass max_seq_len=")
    try:
        return MHAConfig(**values)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"invalid config from {source}: {e}") from e


def _build(config: MHAConfig, tensors: dict[str, Tensor]) -> MultiHeadAttention:
    module = MultiHeadAttention.from_config(config)
    expected = {k: tuple(v.shape) for k, v in _fused_state(module).items()}
    for k, shape in expected.items():
        if tuple(tensors[k].shape) != shape:
            raise CheckpointError(
                f"{k} has shape {list(tensors[k].shape)}, but the config {config.to_dict()} needs {list(shape)}"
            )
    dtypes = {t.dtype for t in tensors.values()}
    if len(dtypes) != 1:
        raise CheckpointError(f"checkpoint tensors mix dtypes {sorted(map(str, dtypes))}")
    module.to(dtype=dtypes.pop())
    with torch.no_grad():
        module.qkv.weight.copy_(tensors["qkv.weight"])
        module.qkv.bias.copy_(tensors["qkv.bias"])
        module.proj.weight.copy_(tensors["proj.weight"])
        module.proj.bias.copy_(tensors["proj.bias"])
    return module


def _fused_state(module: MultiHeadAttention) -> dict[str, Tensor]:
    return {
        "qkv.weight": module.qkv.weight.detach().cpu().contiguous(),
        "qkv.bias": module.qkv.bias.detach().cpu().contiguous(),
        "proj.weight": module.proj.weight.detach().cpu().contiguous(),
        "proj.bias": module.proj.bias.detach().cpu().contiguous(),
    }
