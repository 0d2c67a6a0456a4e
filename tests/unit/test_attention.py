"""mha_core.MultiHeadAttention against the naive float64 reference in tests/reference.py."""

from __future__ import annotations

import pytest
import torch

from mha_core import MHAConfig, MultiHeadAttention, load_checkpoint
from tests.devices import tol
from tests.reference import SeedMHA, naive_attention

# float32 against the float64 reference: values are O(1), so 1e-5 absolute is float32 rounding.
F32 = tol(torch.float32)

CONFIGS = [
    pytest.param((4, 32, 8, 16), id="H4-E32-D8"),  # H*D == E
    pytest.param((3, 20, 7, 12), id="H3-E20-D7"),  # H*D != E
    pytest.param((2, 16, 12, 9), id="H2-E16-D12"),  # H*D > E
]


def make_pair(cfg, tmp_path, device_dtype=None) -> tuple[SeedMHA, MultiHeadAttention]:
    """A random seed-layout module, and ours imported from its state dict (on the test's device/dtype)."""
    seed = SeedMHA(*cfg)
    for p in seed.parameters():  # biases too, so a dropped bias shows
        torch.nn.init.uniform_(p, -0.5, 0.5)
    path = tmp_path / "seed.pt"
    torch.save(seed.state_dict(), path)
    mha = load_checkpoint(path)
    if device_dtype is not None:
        mha = mha.to(*device_dtype)
    return seed, mha


class On:
    """Inputs made on the CPU in float32, moved to the test's (device, dtype); results back as float64, and
    the reference computed on the inputs as the device saw them (rounded to its dtype)."""

    def __init__(self, device_dtype) -> None:
        self.device, self.dtype = device_dtype
        self.out = tol(self.dtype)
        # weights are probabilities (<= 1): a quarter of the output's bound in the reduced dtypes
        self.w = self.out if self.dtype == torch.float32 else tol(self.dtype, 0.25)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.device, self.dtype)

    def seen(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.dtype).float()

    def back(self, t: torch.Tensor) -> torch.Tensor:
        return t.cpu().double()


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("causal", [True, False])
def test_matches_reference_all_lengths(cfg, causal, tmp_path, rng_seed, device_dtype):
    seed, mha = make_pair(cfg, tmp_path, device_dtype)
    on = On(device_dtype)
    H, E, _, max_len = cfg
    for T in (1, 5, max_len):
        x = torch.randn(3, T, E)
        res = mha(on(x), causal=causal, need_weights=True)
        ref_out, ref_w = naive_attention(seed, on.seen(x), causal=causal)
        assert res.output.dtype == on.dtype and res.output.device.type == on.device.type
        torch.testing.assert_close(on.back(res.output), ref_out, **on.out)
        torch.testing.assert_close(on.back(res.weights), ref_w, **on.w)
        # the output path without weights (SDPA) agrees too
        torch.testing.assert_close(on.back(mha(on(x), causal=causal).output), ref_out, **on.out)
        assert res.weights.shape == (3, H, T, T)


@pytest.mark.parametrize("cfg", CONFIGS)
def test_lengths_padding_is_zero_and_never_attended(cfg, tmp_path, rng_seed, device_dtype):
    seed, mha = make_pair(cfg, tmp_path, device_dtype)
    on = On(device_dtype)
    _, E, _, T = cfg
    lengths = [T, 1, T // 2]
    x = torch.randn(3, T, E)
    res = mha(on(x), lengths=torch.tensor(lengths), need_weights=True)
    ref_out, ref_w = naive_attention(seed, on.seen(x), lengths=lengths)
    torch.testing.assert_close(on.back(res.output), ref_out, **on.out)
    torch.testing.assert_close(on.back(res.weights), ref_w, **on.w)
    for b, n in enumerate(lengths):
        assert torch.all(res.output[b, n:] == 0)
        assert torch.all(res.weights[b, :, :, n:] == 0)  # padding keys get no weight
        assert torch.all(res.weights[b, :, n:] == 0)  # padding query rows are zero
    # garbage in the padding must not change anything
    x2 = x.clone()
    x2[1, 1:] = 1e3 * torch.randn_like(x2[1, 1:])
    # (float32: exactly what it was, to rounding; the reduced dtypes: a GEMM may block its rows differently)
    same = {"atol": 1e-5, "rtol": 0} if on.dtype == torch.float32 else on.out
    torch.testing.assert_close(on.back(mha(on(x2), lengths=lengths).output), on.back(res.output), **same)


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("batched_mask", [False, True])
def test_custom_mask_and_with_lengths(cfg, causal, batched_mask, tmp_path, rng_seed, device_dtype):
    seed, mha = make_pair(cfg, tmp_path, device_dtype)
    on = On(device_dtype)
    _, E, _, T = cfg
    B = 2
    mask = torch.rand(B, T, T) > 0.4 if batched_mask else torch.rand(T, T) > 0.4
    mask[..., 0] = True  # (the empty-row case has its own test)
    x = torch.randn(B, T, E)
    lengths = [T, max(1, T - 3)]
    res = mha(on(x), attn_mask=mask.to(on.device), causal=causal, lengths=lengths, need_weights=True)
    ref_out, ref_w = naive_attention(seed, on.seen(x), attn_mask=mask, causal=causal, lengths=lengths)
    torch.testing.assert_close(on.back(res.output), ref_out, **on.out)
    torch.testing.assert_close(on.back(res.weights), ref_w, **on.w)
    again = mha(on(x), attn_mask=mask.to(on.device), causal=causal, lengths=lengths).output
    torch.testing.assert_close(on.back(again), ref_out, **on.out)
    assert torch.all(res.weights.cpu()[~(mask.expand(B, T, T))[:, None].expand_as(res.weights)] == 0)


@pytest.mark.parametrize("need_weights", [False, True])
def test_row_that_may_attend_to_nothing_is_bias_not_nan(need_weights, tmp_path, rng_seed):
    seed, mha = make_pair((4, 32, 8, 16), tmp_path)
    T = 6
    mask = torch.ones(T, T, dtype=torch.bool)
    mask[2] = False  # query 2 may attend to nothing
    x = torch.randn(2, T, 32)
    res = mha(x, attn_mask=mask, causal=False, need_weights=need_weights)
    assert not torch.isnan(res.output).any()
    torch.testing.assert_close(res.output[:, 2], mha.proj.bias.expand(2, -1), atol=0, rtol=0)
    ref_out, ref_w = naive_attention(seed, x, attn_mask=mask, causal=False)
    torch.testing.assert_close(res.output.double(), ref_out, **F32)
    if need_weights:
        assert torch.all(res.weights[:, :, 2] == 0)
        torch.testing.assert_close(res.weights.double(), ref_w, **F32)


@pytest.mark.parametrize("heads", [[0], [3, 1], [2, 0, 1, 3], [1, 1]])
def test_heads_subset(heads, tmp_path, rng_seed):
    seed, mha = make_pair((4, 32, 8, 16), tmp_path)
    x = torch.randn(2, 9, 32)
    res = mha(x, need_weights=True, heads=heads, lengths=[9, 4])
    ref_out, ref_w = naive_attention(seed, x, lengths=[9, 4])
    torch.testing.assert_close(res.weights.double(), ref_w[:, heads], **F32)
    torch.testing.assert_close(res.output.double(), ref_out, **F32)
    # asking for weights does not change the output beyond float32 rounding
    torch.testing.assert_close(res.output, mha(x, lengths=[9, 4]).output, atol=1e-6, rtol=1e-5)


def test_batch_invariance_padded_batch_equals_each_alone(rng_seed):
    mha = MultiHeadAttention.from_seed(MHAConfig(8, 64, 8, 40), seed=1).eval()
    lengths = [40, 1, 17, 33, 8]
    x = torch.randn(len(lengths), 40, 64)
    for causal in (True, False):
        for need_weights in (False, True):
            batch = mha(x, lengths=lengths, causal=causal, need_weights=need_weights)
            for b, n in enumerate(lengths):
                alone = mha(x[b : b + 1, :n], causal=causal, need_weights=need_weights)
                torch.testing.assert_close(batch.output[b, :n], alone.output[0], atol=1e-5, rtol=0)
                if need_weights:
                    torch.testing.assert_close(batch.weights[b, :, :n, :n], alone.weights[0], atol=1e-5, rtol=0)


# Reduced precision on the CPU, against the float64 reference. Weights are rounded to the
# dtype before use, so the bound is the dtype's epsilon times the O(1) magnitudes:
# bfloat16 (8 bits of mantissa) 6e-2 absolute, float16 (11 bits) 8e-3 absolute.
@pytest.mark.parametrize(("dtype", "atol"), [(torch.bfloat16, 6e-2), (torch.float16, 8e-3)])
@pytest.mark.parametrize("need_weights", [False, True])
def test_reduced_precision(dtype, atol, need_weights, tmp_path, rng_seed):
    seed, mha = make_pair((4, 32, 8, 16), tmp_path)
    x = torch.randn(2, 16, 32)
    ref_out, ref_w = naive_attention(seed, x.to(dtype), lengths=[16, 9])
    res = mha.to(dtype)(x.to(dtype), lengths=[16, 9], need_weights=need_weights)
    assert res.output.dtype == dtype
    torch.testing.assert_close(res.output.double(), ref_out, atol=atol, rtol=0.05)
    if need_weights:
        torch.testing.assert_close(res.weights.double(), ref_w, atol=atol / 4, rtol=0.05)


def test_dropout_only_in_training(rng_seed):
    mha = MultiHeadAttention.from_seed(MHAConfig(2, 16, 8, 8), seed=0, dropout=0.5)
    x = torch.randn(4, 8, 16)
    mha.eval()
    a, b = mha(x).output, mha(x).output
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    mha.train()
    t1 = mha(x).output
    assert (t1 == 0).float().mean() > 0.3  # about half the elements dropped
    assert t1.requires_grad  # training runs outside inference_mode
    assert mha.eval()(x).output.is_inference()


def test_from_seed_is_deterministic():
    cfg = MHAConfig(4, 32, 8, 16)
    a, b = MultiHeadAttention.from_seed(cfg, 7), MultiHeadAttention.from_seed(cfg, 7)
    c = MultiHeadAttention.from_seed(cfg, 8)
    for pa, pb, pc in zip(a.parameters(), b.parameters(), c.parameters(), strict=True):
        assert torch.equal(pa, pb)
        assert not torch.equal(pa, pc)
    assert a.qkv.weight.abs().max() <= 1 / 32**0.5  # nn.Linear's default bound


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda m: m(torch.randn(1, 17, 32)), "sequence length 17 exceeds max_seq_len 16"),
        (lambda m: m(torch.randn(1, 4, 31)), "emb_size 31, but the model expects 32"),
        (lambda m: m(torch.randn(4, 32)), "shape [B, T, E], got 2 dims"),
        (lambda m: m(torch.randn(2, 4, 32), lengths=[4, 5]), "lengths[1] = 5 is out of range 1..4"),
        (lambda m: m(torch.randn(2, 4, 32), lengths=[0, 4]), "lengths[0] = 0 is out of range 1..4"),
        (lambda m: m(torch.randn(2, 4, 32), lengths=[4]), "lengths must have shape [2]"),
        (lambda m: m(torch.randn(2, 4, 32), lengths=torch.tensor([1.0, 2.0])), "lengths must be integers"),
        (lambda m: m(torch.randn(2, 4, 32), attn_mask=torch.ones(3, 3, dtype=torch.bool)), "[4, 4] or [2, 4, 4]"),
        (lambda m: m(torch.randn(2, 4, 32), attn_mask=torch.ones(4, 4)), "must be a bool tensor"),
        (lambda m: m(torch.randn(1, 4, 32), need_weights=True, heads=[4]), "head index 4 is out of range 0..3"),
        (lambda m: m(torch.randn(1, 4, 32), need_weights=True, heads=[]), "at least one head"),
        (lambda m: m(torch.ones(1, 4, 32, dtype=torch.int64)), "floating-point"),
    ],
)
def test_bad_input_raises_value_error_naming_numbers(call, message):
    mha = MultiHeadAttention.from_seed(MHAConfig(4, 32, 8, 16), seed=0).eval()
    with pytest.raises(ValueError) as e:
        call(mha)
    assert message in str(e.value)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((0, 32, 8, 16), "num_heads must be an integer >= 1, got 0"),
        ((4, 32, 8, -1), "max_seq_len must be an integer >= 1, got -1"),
    ],
)
def test_bad_config(args, message):
    with pytest.raises(ValueError, match=message):
        MultiHeadAttention(*args)


@pytest.mark.parametrize("T", [257, 513])
def test_long_causal_weights_path_in_blocks_matches_reference(T, tmp_path, rng_seed, device_dtype):
    """T > 256 takes the blocked causal weights path (mha_core.attention._BLOCK)."""
    seed, mha = make_pair((2, 16, 8, 520), tmp_path, device_dtype)
    on = On(device_dtype)
    x = torch.randn(2, T, 16)
    xs = on.seen(x)
    lengths = [T, T // 3]
    res = mha(on(x), need_weights=True, lengths=lengths)
    ref_out, ref_w = naive_attention(seed, xs, lengths=lengths)
    torch.testing.assert_close(on.back(res.output), ref_out, **on.out)
    torch.testing.assert_close(on.back(res.weights), ref_w, **on.w)
    sub = mha(on(x[:1]), need_weights=True, heads=[1])  # plain causal, no lengths: the blocked path proper
    torch.testing.assert_close(on.back(sub.weights), naive_attention(seed, xs[:1])[1][:, [1]], **on.w)
    torch.testing.assert_close(on.back(sub.output), on.back(mha(on(x[:1])).output), **on.out)
    full = mha(on(x[:1]), need_weights=True)
    torch.testing.assert_close(on.back(full.output), naive_attention(seed, xs[:1])[0], **on.out)
    assert torch.all(full.weights[0].triu(1) == 0)
