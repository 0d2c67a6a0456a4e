"""Settings from MHA_* variables, validated at start-up with messages that state the rule."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from service.settings import Settings


def test_defaults_and_environment(monkeypatch):
    s = Settings()  # the defaults are consistent: a request at every per-request limit fits one batch
    assert s.max_request_batch * 1024 <= s.max_batch_tokens <= s.max_queue_tokens
    assert s.max_weights_elements <= s.max_batch_weights_elements
    assert s.max_body_bytes <= s.max_inflight_bytes
    assert (s.host, s.port, s.model_name, s.device, s.max_wait_ms) == ("127.0.0.1", 8000, "mha", "auto", 0.0)
    assert s.model_overrides(with_defaults=True) == {
        "num_heads": 8,
        "emb_size": 512,
        "head_size": 64,
        "max_seq_len": 1024,
        "causal": True,
    }
    monkeypatch.setenv("MHA_NUM_HEADS", "4")
    monkeypatch.setenv("MHA_CAUSAL", "false")
    monkeypatch.setenv("MHA_EMB_SIZE", "")  # empty = unset
    s = Settings()
    assert s.model_overrides() == {"num_heads": 4, "causal": False}


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"max_batch_size": 0}, "greater than or equal to 1"),
        ({"device": "tpu"}, "device must be auto, cpu, cuda, cuda:N or mps, got 'tpu'"),
        ({"checkpoint": "/nonexistent/file.pt"}, "checkpoint file '/nonexistent/file.pt' does not exist"),
        (
            {"default_timeout_ms": 5000, "max_timeout_ms": 100},
            "default_timeout_ms (5000.0) must be <= max_timeout_ms (100.0)",
        ),
        ({"max_batch_tokens": 100}, "max_batch_tokens (100) must be >= max_seq_len (1024)"),
        ({"dtype": "float64"}, "Input should be 'auto', 'float32', 'float16' or 'bfloat16'"),
        (
            {"max_request_batch": 64},
            "max_request_batch x max_seq_len (64 x 1024 = 65536) must be <= max_batch_tokens (32768)",
        ),
        (
            {"max_seq_len": 64, "max_request_batch": 8, "max_batch_tokens": 256},
            "max_request_batch x max_seq_len (8 x 64 = 512) must be <= max_batch_tokens (256)",
        ),
        (
            {"max_weights_elements": 2_000_000, "max_batch_weights_elements": 1_000_000},
            "max_weights_elements (2000000) must be <= max_batch_weights_elements (1000000)",
        ),
        ({"max_queue_tokens": 4096}, "max_batch_tokens (32768) must be <= max_queue_tokens (4096)"),
        ({"max_inflight_bytes": 1 << 20}, "max_body_bytes (67108864) must be <= max_inflight_bytes (1048576)"),
        ({"engine_hang_s": 0.1}, "Input should be greater than or equal to 0.5"),
    ],
)
def test_invalid_settings(kw, message):
    with pytest.raises(ValidationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Settings(**kw)
