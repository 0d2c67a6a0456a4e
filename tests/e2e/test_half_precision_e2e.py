"""A real uvicorn serving MHA_DTYPE=float16 and bfloat16, against the float64 reference (tests/reference.py).

Tolerances, from the dtype's unit roundoff u (float16: 10 stored mantissa bits, u = 2**-11;
bfloat16: 7 bits, u = 2**-8). The reference runs in float64 on exactly the values the server
holds (the checkpoint's weights and x rounded to the dtype), so what remains is the server's own
rounding: matmuls accumulate in float32, and each stored intermediate (q/k/v, the attention
result, the output) is rounded to the dtype once, a relative error of at most u/2, carried by the
next projection whose gain (row sums of |W| for weights in [-0.5, 0.5]) is a few units, with
random signs. That bounds the output's error at a small multiple of u times its largest
magnitude (measured: 0.8 to 1.6 u x max|ref| over seeds); we allow 8 u x max|ref|. The attention
weights lie in [0, 1] and come from a float32 softmax of scores built from rounded q and k, then
are rounded once: measured up to 2.4 u; we allow 8 u. A float32 server would pass with
u = 2**-24; a wrong head order, bias or mask fails by orders of magnitude more.
"""

from __future__ import annotations

import base64
import copy

import httpx
import numpy as np
import orjson
import pytest
import torch

from service.frontend.codecs import bf16_to_f32, f32_to_bf16
from tests.reference import naive_attention, seed_checkpoint

from .conftest import start_server

UNIT_ROUNDOFF = {"float16": 2.0**-11, "bfloat16": 2.0**-8}
TORCH = {"float16": torch.float16, "bfloat16": torch.bfloat16}
H, E, D, MAX_T = 4, 32, 8, 64
B, T, LENGTHS = 2, 16, [16, 9]


def b64(x: np.ndarray, dtype: str) -> dict:
    raw = f32_to_bf16(x).tobytes() if dtype == "bfloat16" else x.astype(dtype).tobytes()
    return {"dtype": dtype, "shape": list(x.shape), "b64": base64.b64encode(raw).decode()}


def from_b64(obj: dict) -> np.ndarray:
    raw = base64.b64decode(obj["b64"])
    if obj["dtype"] == "bfloat16":
        return bf16_to_f32(np.frombuffer(raw, "<u2")).reshape(obj["shape"])
    return np.frombuffer(raw, obj["dtype"]).reshape(obj["shape"]).astype(np.float32)


def v2_binary(c: httpx.Client, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x as FP32 binary, lengths as INT64 JSON; output and weights back as FP32 binary."""
    header = orjson.dumps(
        {
            "inputs": [
                {"name": "x", "datatype": "FP32", "shape": list(x.shape), "parameters": {"binary_data_size": x.nbytes}},
                {"name": "lengths", "datatype": "INT64", "shape": [B], "data": LENGTHS},
            ],
            "outputs": [{"name": n, "parameters": {"binary_data": True}} for n in ("output", "weights")],
        }
    )
    r = c.post(
        "/v2/models/mha/infer",
        content=header + x.tobytes(),
        headers={"inference-header-content-length": str(len(header))},
    )
    assert r.status_code == 200, r.text
    hl = int(r.headers["inference-header-content-length"])
    outs, offset, arrays = orjson.loads(r.content[:hl])["outputs"], hl, []
    for o in outs:
        n = o["parameters"]["binary_data_size"]
        arrays.append(np.frombuffer(r.content[offset : offset + n], "<f4").reshape(o["shape"]))
        offset += n
    return arrays[0], arrays[1]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_server_matches_the_float64_reference(tmp_path, dtype):
    torch.manual_seed(int.from_bytes(np.random.bytes(4), "little"))
    seed = seed_checkpoint(tmp_path / "seed.pt", H, E, D, MAX_T)
    env = {"MHA_CHECKPOINT": str(tmp_path / "seed.pt"), "MHA_DTYPE": dtype, "MHA_DEVICE": "cpu"}
    env.update({k: "" for k in ("MHA_NUM_HEADS", "MHA_EMB_SIZE", "MHA_HEAD_SIZE", "MHA_MAX_SEQ_LEN")})

    # the reference, on the values the server holds: weights and x rounded to the dtype
    held = copy.deepcopy(seed)
    with torch.no_grad():
        for p in held.parameters():
            p.copy_(p.to(TORCH[dtype]).float())
    x = torch.randn(B, T, E)
    x_held = x.to(TORCH[dtype]).float()
    with torch.no_grad():
        ref_out, ref_w = (t.numpy() for t in naive_attention(held, x_held, lengths=LENGTHS))
    u = UNIT_ROUNDOFF[dtype]
    out_tol, w_tol = 8 * u * np.abs(ref_out).max(), 8 * u

    server = start_server(tmp_path, env)
    try:
        with httpx.Client(base_url=server.url, timeout=60) as c:
            assert c.get("/v1/model").json()["dtype"] == dtype
            answers = {}
            body = {"lengths": LENGTHS, "return_weights": True}
            r = c.post("/attend", json={"x": x.numpy().tolist(), **body})
            assert r.status_code == 200, r.text
            answers["lists"] = tuple(np.array(r.json()[k], np.float32) for k in ("output", "weights"))
            r = c.post("/attend", json={"x": b64(x.numpy(), dtype), **body})
            assert r.status_code == 200, r.text
            assert r.json()["output"]["dtype"] == dtype and r.json()["weights"]["dtype"] == dtype
            answers[f"base64 {dtype}"] = (from_b64(r.json()["output"]), from_b64(r.json()["weights"]))
            answers["v2 binary FP32"] = v2_binary(c, x.numpy())
    finally:
        server.stop()

    for how, (out, w) in answers.items():
        assert out.shape == (B, T, E) and w.shape == (B, H, T, T), how
        err_out, err_w = np.abs(out - ref_out).max(), np.abs(w - ref_w).max()
        rel = err_out / (u * np.abs(ref_out).max())
        print(f"{dtype} {how}: output error {rel:.2f} u x max|ref|, weights {err_w / u:.2f} u")
        assert err_out <= out_tol, (how, err_out, out_tol)
        assert err_w <= w_tol, (how, err_w, w_tol)
        assert np.all(out[1, 9:] == 0) and np.all(w[1, :, 9:] == 0), how  # padding rows stay exactly zero
    # every encoding carried the same half-precision numbers
    np.testing.assert_array_equal(answers["lists"][0], answers["v2 binary FP32"][0])
    np.testing.assert_array_equal(answers["lists"][0], answers[f"base64 {dtype}"][0])


def _v2_half(c: httpx.Client, x: np.ndarray, datatype: str) -> bytes:
    """x as FP16/BF16 binary; the output back binary, in x's datatype."""
    raw = f32_to_bf16(x).tobytes() if datatype == "BF16" else x.astype(np.float16).tobytes()
    header = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "datatype": datatype,
                    "shape": list(x.shape),
                    "parameters": {"binary_data_size": len(raw)},
                }
            ],
            "outputs": [{"name": "output", "parameters": {"binary_data": True}}],
        }
    )
    r = c.post(
        "/v2/models/mha/infer", content=header + raw, headers={"inference-header-content-length": str(len(header))}
    )
    assert r.status_code == 200, r.text
    hl = int(r.headers["inference-header-content-length"])
    assert orjson.loads(r.content[:hl])["outputs"][0]["datatype"] == datatype
    return r.content[hl:]


def test_half_requests_through_the_model_process_equal_the_in_process_answer_bit_for_bit(tmp_path):
    """Issue 20: a float16/bfloat16 x crosses as it came (bfloat16 as its bits, tagged) and the answer comes
    back in its dtype, rounded in the model process: the split server answers exactly what one process does, and
    that is the float32 model's result on x's half values, rounded once to the half (as torch rounds)."""
    from .conftest import builtin_model

    x = np.random.default_rng().standard_normal((2, 16, E)).astype(np.float32)
    answers = {}
    for engine in ("inprocess", "process"):
        server = start_server(tmp_path, {"MHA_ENGINE": engine, "MHA_WORKERS": "1", "MHA_DTYPE": "float32"})
        try:
            with httpx.Client(base_url=server.url, timeout=60) as c:
                got = {}
                for dtype in ("float16", "bfloat16"):
                    r = c.post("/attend", json={"x": b64(x, dtype)})
                    assert r.status_code == 200, r.text
                    assert r.json()["output"]["dtype"] == dtype
                    got[f"attend {dtype}"] = base64.b64decode(r.json()["output"]["b64"])
                    got[f"v2 {dtype}"] = _v2_half(c, x, "BF16" if dtype == "bfloat16" else "FP16")
                answers[engine] = got
        finally:
            server.stop()
    assert answers["process"] == answers["inprocess"]  # every byte
    model = builtin_model()
    for dtype in ("float16", "bfloat16"):
        held = torch.from_numpy(x).to(TORCH[dtype]).float()
        with torch.inference_mode():
            want = model(held).output.to(TORCH[dtype])
        want_bytes = (want.view(torch.uint16) if dtype == "bfloat16" else want).numpy().tobytes()
        got = answers["process"][f"attend {dtype}"]
        assert got == answers["process"][f"v2 {dtype}"]
        got_f, want_f = (
            from_b64({"dtype": dtype, "shape": list(x.shape), "b64": base64.b64encode(b)}) for b in (got, want_bytes)
        )
        # a server's float32 kernels may round its last bits apart from this call's: one unit of the half at most
        np.testing.assert_allclose(got_f, want_f, rtol=0, atol=UNIT_ROUNDOFF[dtype] * 2 * np.abs(want_f).max())
