"""Strict input: /attend (lists and base64) and /v2 (JSON data) accept and refuse the same things.

Each row of the table is one bad value, sent through every transport it can travel in; each must
answer 422 with a message that names what is wrong. None of these answered 422 on the code
before this test (strings and booleans in x were converted, a mask was checked by its first
element only, timeout_ms: true became a 1 ms deadline and a 504, a huge shape was a 500).
"""

from __future__ import annotations

import base64
import copy
from typing import Any

import numpy as np
import pytest

INFER = "/v2/models/mha/infer"
T, E = 2, 32
X = np.random.default_rng(7).standard_normal((1, T, E)).astype(np.float32).round(3)
GOOD_MASK = [[True, False], [True, True]]


def x_with(value: Any, at: tuple[int, int, int] = (0, 1, 5)) -> list:
    """X as nested lists with one element replaced by ``value``."""
    rows = X.tolist()
    b, t, e = at
    rows[b][t][e] = value
    return rows


def x_b64() -> dict:
    return {"dtype": "float32", "shape": list(X.shape), "b64": base64.b64encode(X.tobytes()).decode()}


# One bad value per row: (id, where it goes, the value, what the message must say).
#   where: "x" (an element of x), "mask" (the mask's lists), "timeout_ms", "lengths", "heads", "causal"
ROWS = [
    ("x-string", "x", "1.5", 'x must contain only numbers, got string "1.5" at x[0][1][5]'),
    ("x-bool", "x", True, "x must contain only numbers, got boolean true at x[0][1][5]"),
    ("x-false-among-zeros", "x", False, "x must contain only numbers, got boolean false at x[0][1][5]"),
    ("x-null", "x", None, "x must contain only numbers, got null at x[0][1][5]"),
    ("x-object", "x", {"v": 1}, "x must contain only numbers"),
    ("x-all-bools", "x-all", [[[True] * E] * T], "x must contain only numbers, got boolean true at x[0][0][0]"),
    ("mask-number", "mask", [[True, 7], [True, 0.5]], "attn_mask must contain only true/false values, got number 7"),
    ("mask-late-number", "mask", [[True, False], [True, 1]], "got number 1 at attn_mask[1][1]"),
    ("mask-string", "mask", [[True, "true"], [True, True]], 'got string "true" at attn_mask[0][1]'),
    ("timeout-true", "timeout_ms", True, "timeout_ms"),
    ("timeout-string", "timeout_ms", "5", "timeout_ms"),
    ("lengths-bool", "lengths", [True], "lengths"),
    ("lengths-float", "lengths", [1.0], "lengths"),
    ("lengths-string", "lengths", ["2"], "lengths"),
    ("heads-bool", "heads", [True], "heads"),
    ("heads-float", "heads", [0.0], "heads"),
    ("causal-string", "causal", "true", "causal"),
    ("causal-number", "causal", 1, "causal"),
]


def attend_body(where: str, value: Any, encoding: str) -> dict | None:
    """The /attend body carrying the bad value, or None when this transport cannot carry it."""
    if where.startswith("x"):
        if encoding == "base64":
            return None  # a base64 x holds bytes: no strings or booleans to refuse
        return {"x": value if where == "x-all" else x_with(value)}
    body: dict[str, Any] = {"x": X.tolist() if encoding == "lists" else x_b64()}
    if where == "mask":
        body["attn_mask"] = value
    elif where == "heads":
        body["heads"], body["return_weights"] = value, True
    else:
        body[where] = value
    return body


def v2_body(where: str, value: Any) -> dict:
    """The same bad value in the Open Inference Protocol's JSON form."""
    data = value if where == "x-all" else (x_with(value) if where == "x" else X.tolist())
    inputs: list[dict[str, Any]] = [{"name": "x", "datatype": "FP32", "shape": list(X.shape), "data": data}]
    params: dict[str, Any] = {}
    outputs = None
    if where == "mask":
        inputs.append({"name": "attn_mask", "datatype": "BOOL", "shape": [T, T], "data": value})
    elif where == "lengths":
        inputs.append({"name": "lengths", "datatype": "INT64", "shape": [1], "data": value})
    elif where == "heads":
        params["heads"] = value
        outputs = [{"name": "output"}, {"name": "weights"}]
    elif where in ("timeout_ms", "causal"):
        params[where] = value
    body: dict[str, Any] = {"inputs": inputs, "parameters": params}
    if outputs:
        body["outputs"] = outputs
    return body


@pytest.mark.parametrize(("where", "value", "message"), [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
async def test_attend_and_v2_refuse_the_same_bad_values(client, where, value, message):
    answers = {}
    for encoding in ("lists", "base64"):
        body = attend_body(where, copy.deepcopy(value), encoding)
        if body is not None:
            r = await client.post("/attend", json=body)
            answers[f"/attend {encoding}"] = (r.status_code, r.json()["error"]["message"])
    r = await client.post(INFER, json=v2_body(where, copy.deepcopy(value)))
    answers["/v2 json"] = (r.status_code, r.json()["error"])
    for route, (status, text) in answers.items():
        assert status == 422, (route, status, text)
        assert message in text, (route, text)


async def test_the_good_values_of_the_table_are_accepted_by_both(client):
    """The table's rows are refused for their one bad value, not for the rest of the body."""
    r = await client.post(
        "/attend",
        json={"x": X.tolist(), "attn_mask": GOOD_MASK, "lengths": [2], "timeout_ms": 5000, "causal": False},
    )
    assert r.status_code == 200, r.text
    body = v2_body("mask", GOOD_MASK)
    body["parameters"] = {"timeout_ms": 5000, "causal": False}
    body["inputs"].append({"name": "lengths", "datatype": "INT64", "shape": [1], "data": [2]})
    r2 = await client.post(INFER, json=body)
    assert r2.status_code == 200, r2.text
    np.testing.assert_allclose(
        np.array(r2.json()["outputs"][0]["data"]).reshape(X.shape), np.array(r.json()["output"]), atol=1e-6
    )
    # integers are numbers: x = [[[1, 0, ...]]] is fine, and so are zeros and ones (they are not booleans)
    ints = np.zeros((1, T, E), dtype=np.int64)
    ints[0, 0, :3] = [1, 0, 2]
    r = await client.post("/attend", json={"x": ints.tolist(), "timeout_ms": 5000.5})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("shape", [[2**32, 2**32, 1], [2**40, 2**40, 2**40], [2**62, 4, 1]])
async def test_a_shape_whose_size_overflows_is_a_422_naming_it(client, shape):
    r = await client.post("/attend", json={"x": {"dtype": "float32", "shape": shape, "b64": ""}})
    assert r.status_code == 422, r.text
    msg = r.json()["error"]["message"]
    size = shape[0] * shape[1] * shape[2]  # Python ints: 2**64 and more
    assert msg == f"x.b64 holds 0 bytes, but shape {shape} of float32 needs {size} x 4 = {size * 4}"
    # /v2: binary and JSON
    header = {"inputs": [{"name": "x", "datatype": "FP32", "shape": shape, "parameters": {"binary_data_size": 0}}]}
    r = await client.post(INFER, json=header)
    assert r.status_code == 422 and f"shape {shape} of FP32 needs {size} x 4 = {size * 4} bytes" in r.json()["error"]
    r = await client.post(INFER, json={"inputs": [{"name": "x", "datatype": "FP32", "shape": shape, "data": [1.0]}]})
    assert r.status_code == 422 and f"but shape {shape} needs {size}" in r.json()["error"]


async def test_a_dimension_beyond_json_integers_is_a_422(client):
    r = await client.post(
        "/attend", content=b'{"x": {"dtype": "float32", "shape": [18446744073709551616, 1, 32], "b64": ""}}'
    )
    assert r.status_code == 422 and "x.shape.0: Input should be a valid integer" in r.json()["error"]["message"]
