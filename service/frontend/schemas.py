"""The wire contract: pydantic models of requests and responses, nothing else.

The tensors inside a request are not validated number by number here (that is the slow path
the project avoids): the envelope is validated by pydantic, the numbers by numpy in codecs.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, WithJsonSchema

from service.errors import status_descriptions

_NUMBER_LISTS = {
    "type": "array",
    "description": "nested lists of numbers, row-major",
    "items": {"type": "array", "items": {"type": "array", "items": {"type": "number"}}},
}
_BOOL_LISTS = {
    "type": "array",
    "description": "nested lists of true/false, row-major",
    "items": {
        "type": "array",
        "items": {"anyOf": [{"type": "boolean"}, {"type": "array", "items": {"type": "boolean"}}]},
    },
}


class TensorB64(BaseModel):
    """A tensor as base64 of its little-endian, row-major bytes."""

    model_config = ConfigDict(extra="forbid")

    dtype: str = Field(description='"float32", "float16" or "bfloat16" (masks: "bool", one byte per element)')
    shape: list[StrictInt] = Field(description="dimensions, e.g. [B, T, E]")
    b64: str = Field(description="base64 (standard alphabet, padded) of the raw bytes")


def _tensor_schema(lists: dict) -> dict:
    return {"anyOf": [lists, TensorB64.model_json_schema()]}


FloatTensor = Annotated[Any, WithJsonSchema(_tensor_schema(_NUMBER_LISTS))]
BoolTensor = Annotated[Any, WithJsonSchema(_tensor_schema(_BOOL_LISTS))]


class SequenceParams(BaseModel):
    """``/attend``'s ``sequence``: this request is one step of a sequence (Triton's sequence extension). x holds
    the step's new rows [1, t, E]; the server keeps the keys and values of the rows before, and answers the causal
    forward's rows for these. Steps take no lengths, no attn_mask and no ``causal: false``."""

    model_config = ConfigDict(extra="forbid")

    id: StrictInt | StrictStr = Field(
        description="the sequence's id: an unsigned 64-bit integer other than 0, or a non-empty string"
    )
    start: StrictBool = Field(False, description="the first step: the server starts the sequence (afresh if live)")
    end: StrictBool = Field(
        False,
        description="the last step: the server answers it, then forgets the sequence. With x of shape [1, 0, E] "
        "the step only ends the sequence",
    )


class AttendRequest(BaseModel):
    """Body of ``POST /attend``."""

    model_config = ConfigDict(extra="forbid")

    x: FloatTensor = Field(description="input [B, T, E]: nested lists or a TensorB64")
    lengths: list[StrictInt] | None = Field(
        None, description="B ints; sequence b uses positions 0..lengths[b]-1, the rest is padding"
    )
    causal: StrictBool | None = Field(None, description="causal self-attention; default: the model's (true)")
    attn_mask: BoolTensor | None = Field(
        None, description="bool [T, T] or [B, T, T], true = may attend; combined (AND) with causal and lengths"
    )
    return_weights: StrictBool = Field(False, description="also return per-head attention weights [B, H, T, T]")
    heads: list[StrictInt] | None = Field(None, description="head indices whose weights to return (default all)")
    timeout_ms: StrictFloat | None = Field(
        None, description="this request's deadline in ms (a number > 0), capped by the server's maximum"
    )
    response_encoding: Literal["lists", "base64"] | None = Field(
        None, description="encoding of the response tensors; default: the encoding of x"
    )
    priority: StrictInt | None = Field(
        None,
        description="priority level 1..MHA_PRIORITY_LEVELS, 1 the highest (Triton's convention); 0 or absent: "
        "the server's default level",
    )
    sequence: SequenceParams | None = Field(
        None,
        description="a step of a sequence: x holds only its new rows, the server keeps the rest (see Sequences in "
        "the docs); the response carries its id in the x-mha-sequence-id header",
    )


class ModelInfo(BaseModel):
    name: str
    num_heads: int
    emb_size: int
    head_size: int
    max_seq_len: int
    causal: bool
    dtype: str
    device: str
    checksum: str


class AttendResponse(BaseModel):
    output: FloatTensor = Field(description="[B, T, E]; rows of padding positions are zero")
    weights: FloatTensor | None = Field(description="[B, H, T, T] when return_weights, else null")
    model: ModelInfo


class ErrorDetail(BaseModel):
    type: str = Field(description="error type, e.g. validation_error")
    message: str = Field(description="what is wrong, with the numbers")


class ErrorBody(BaseModel):
    error: ErrorDetail


def error_responses(*types: str) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses=`` for a route, built from the same table the handlers use (service.errors)."""
    return {status: {"model": ErrorBody, "description": d} for status, d in status_descriptions(*types).items()}


class BatchingInfo(BaseModel):
    max_batch_size: int
    max_batch_tokens: int
    max_wait_ms: float
    max_padding_ratio: float
    max_queue_requests: int
    max_queue_tokens: int
    oom_cooldown_s: float
    max_batch_weights_elements: int
    priority_levels: int
    default_priority_level: int | None
    priority_oldest_every: int


class LimitsInfo(BaseModel):
    max_body_bytes: int
    max_request_batch: int
    max_weights_elements: int
    default_timeout_ms: float
    max_timeout_ms: float
    max_inflight_requests: int
    max_inflight_bytes: int
    body_read_timeout_s: float


class ModelDescription(ModelInfo):
    """``GET /v1/model``."""

    replica_id: str
    batching: BatchingInfo
    limits: LimitsInfo
