"""Checkpoints: our safetensors format, the seed layouts, nn.MultiheadAttention, the CLI."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from mha_core import (
    DEFAULT_MAX_SEQ_LEN,
    CheckpointError,
    MHAConfig,
    MultiHeadAttention,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from mha_core.cli import main as cli
from tests.reference import naive_attention, random_seed_mha, seed_gpt_checkpoint

F32 = {"atol": 2e-5, "rtol": 1e-4}


def test_safetensors_round_trip(tmp_path, rng_seed):
    mha = MultiHeadAttention.from_seed(MHAConfig(3, 20, 7, 12, causal=False), seed=3).eval()
    path = tmp_path / "m.safetensors"
    digest = save_checkpoint(mha, path)
    loaded = read_checkpoint(path)
    assert loaded.format == "mha-serve"
    assert loaded.checksum == digest
    assert loaded.module.config == mha.config  # causal=False survives
    assert not loaded.module.training
    x = torch.randn(2, 12, 20)
    torch.testing.assert_close(loaded.module(x).output, mha(x).output, atol=0, rtol=0)


def test_seed_state_dict_import(tmp_path, rng_seed):
    seed = random_seed_mha(4, 32, 8, 16)
    path = tmp_path / "seed.pt"
    torch.save(seed.state_dict(), path)
    loaded = read_checkpoint(path)
    assert loaded.format == "seed-mha"
    assert loaded.module.config == MHAConfig(4, 32, 8, 16, True)
    x = torch.randn(2, 16, 32)
    torch.testing.assert_close(loaded.module(x).output.double(), naive_attention(seed, x)[0], **F32)
    # the same state dict as safetensors is recognised too, and has the same checksum
    st = tmp_path / "seed.safetensors"
    save_file({k: v.contiguous() for k, v in seed.state_dict().items()}, st)
    assert read_checkpoint(st).checksum == loaded.checksum


def test_seed_gpt_import_chooses_layer(tmp_path, rng_seed):
    layers = [random_seed_mha(2, 16, 8, 10) for _ in range(3)]
    path = tmp_path / "gpt.pt"
    torch.save(seed_gpt_checkpoint(layers), path)
    x = torch.randn(1, 10, 16)
    for L in range(3):
        mha = load_checkpoint(path, layer=L)
        torch.testing.assert_close(mha(x).output.double(), naive_attention(layers[L], x)[0], **F32)
    with pytest.raises(CheckpointError, match=r"has 3 decoder layers \(0..2\): choose one with layer="):
        load_checkpoint(path)
    with pytest.raises(
        CheckpointError, match=r"layer 5 is not in the checkpoint, which has decoder layers \[0, 1, 2\]"
    ):
        load_checkpoint(path, layer=5)


def test_seed_gpt_hyperparameters_must_agree(tmp_path):
    path = tmp_path / "gpt.pt"
    torch.save(seed_gpt_checkpoint([random_seed_mha(2, 16, 8, 10)], num_heads=4), path)
    with pytest.raises(CheckpointError, match=r"num_heads=4 disagrees with the tensors of layer 0, which give 2"):
        load_checkpoint(path)


@pytest.mark.parametrize("bias", [True, False])
def test_torch_mha_import(tmp_path, bias, rng_seed):
    ref = torch.nn.MultiheadAttention(32, 4, batch_first=True, bias=bias).eval()
    path = tmp_path / "torch_mha.pt"
    torch.save(ref.state_dict(), path)
    with pytest.raises(CheckpointError, match="does not record the number of heads: pass num_heads="):
        load_checkpoint(path)
    mha = load_checkpoint(path, num_heads=4)
    assert mha.config == MHAConfig(4, 32, 8, DEFAULT_MAX_SEQ_LEN, True)
    assert load_checkpoint(path, num_heads=4, max_seq_len=64).config.max_seq_len == 64
    x = torch.randn(2, 12, 32)
    # nn.MultiheadAttention's bool mask is True = NOT allowed: the opposite of ours
    blocked = torch.ones(12, 12, dtype=torch.bool).triu(1)
    with torch.no_grad():
        want, want_w = ref(x, x, x, attn_mask=blocked, need_weights=True, average_attn_weights=False)
    got = mha(x, need_weights=True)
    torch.testing.assert_close(got.output, want, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got.weights, want_w, atol=1e-5, rtol=1e-4)
    with pytest.raises(CheckpointError, match="embed_dim 32 is not divisible by num_heads 5"):
        load_checkpoint(path, num_heads=5)


def test_keywords_must_agree_with_file(tmp_path):
    path = tmp_path / "seed.pt"
    torch.save(random_seed_mha(4, 32, 8, 16).state_dict(), path)
    with pytest.raises(CheckpointError, match="num_heads=3 was given, but the seed tensors say"):
        load_checkpoint(path, num_heads=3)
    with pytest.raises(CheckpointError, match="max_seq_len=20 was given"):
        load_checkpoint(path, max_seq_len=20)
    assert load_checkpoint(path, num_heads=4, max_seq_len=16).config.num_heads == 4


def test_seed_without_tril_buffer_needs_max_seq_len(tmp_path):
    sd = {k: v for k, v in random_seed_mha(2, 16, 8, 10).state_dict().items() if "_tril_mask" not in k}
    path = tmp_path / "seed.pt"
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match="do\\(es\\) not record max_seq_len"):
        load_checkpoint(path)
    assert load_checkpoint(path, max_seq_len=10).config.max_seq_len == 10


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda sd: sd.pop("_heads.1._k.bias"), "checkpoint lacks _heads.1._k.bias"),
        (
            lambda sd: sd.__setitem__("_heads.1._v.weight", torch.zeros(8, 31)),
            r"_heads.1._v.weight has shape \[8, 31\], expected \[8, 32\]",
        ),
        (
            lambda sd: sd.__setitem__("_layer.weight", torch.zeros(32, 31)),
            r"_layer.weight has shape \[32, 31\], expected \[32, 32\]",
        ),
        (
            lambda sd: sd.__setitem__("_heads.5._q.weight", torch.zeros(8, 32)),
            r"numbered 0..N-1, found \[0, 1, 2, 3, 5\]",
        ),
    ],
)
def test_malformed_seed_checkpoint_names_the_key(tmp_path, mutate, message):
    sd = dict(random_seed_mha(4, 32, 8, 16).state_dict())
    mutate(sd)
    path = tmp_path / "bad.pt"
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)


def test_unreadable_and_unknown_files(tmp_path):
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match=r"torch.load\(weights_only=True\) failed"):
        load_checkpoint(junk)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    other = tmp_path / "other.pt"
    torch.save({"fc.weight": torch.zeros(2, 2)}, other)
    with pytest.raises(CheckpointError, match=r"unrecognised state dict.*\['fc.weight'\]"):
        load_checkpoint(other)


def test_pickles_are_loaded_weights_only(tmp_path):
    class Evil:
        def __reduce__(self):
            return (exec, ("raise SystemExit('code ran')",))

    path = tmp_path / "evil.pt"
    torch.save({"x": Evil()}, path)
    with pytest.raises(CheckpointError, match="weights_only"):
        load_checkpoint(path)


def test_ours_with_bad_metadata(tmp_path):
    mha = MultiHeadAttention.from_seed(MHAConfig(2, 16, 8, 8), seed=0)
    path = tmp_path / "m.safetensors"
    tensors = {k: v.detach().contiguous() for k, v in mha.state_dict().items()}
    save_file(
        tensors,
        path,
        metadata={
            "format": "mha-serve",
            "num_heads": "4",
            "emb_size": "16",
            "head_size": "8",
            "max_seq_len": "8",
            "causal": "true",
        },
    )
    with pytest.raises(CheckpointError, match=r"qkv.weight has shape \[48, 16\], but the config"):
        load_checkpoint(path)


def test_cli_convert_and_info(tmp_path, capsys, rng_seed):
    seed = random_seed_mha(4, 32, 8, 16)
    src, dst = tmp_path / "seed.pt", tmp_path / "ours.safetensors"
    torch.save(seed_gpt_checkpoint([random_seed_mha(4, 32, 8, 16), seed]), src)
    assert cli(["convert", str(src), str(dst), "--layer", "1"]) == 0
    capsys.readouterr()
    assert cli(["info", str(dst)]) == 0
    lines = dict(line.split(": ", 1) for line in capsys.readouterr().out.strip().splitlines())
    assert lines["format"] == "mha-serve"
    assert (lines["num_heads"], lines["emb_size"], lines["head_size"], lines["max_seq_len"]) == ("4", "32", "8", "16")
    assert lines["causal"] == "true"
    assert lines["checksum"] == read_checkpoint(src, layer=1).checksum
    x = torch.randn(1, 16, 32)
    torch.testing.assert_close(load_checkpoint(dst)(x).output.double(), naive_attention(seed, x)[0], **F32)
    assert cli(["info", str(src)]) == 2
    assert "choose one with layer=" in capsys.readouterr().err
