"""Settings from the environment (prefix ``MHA_``), validated at start-up."""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.proc import MALLOC_MIB_DEFAULT, MALLOC_MIB_MAX
from service.shm import ARENA_MAX_MIB_DEFAULT, ARENA_MIB_DEFAULT

# The built-in default model, used when no checkpoint is given.
RUN_DIR_ENV = "MHA_RUN_DIR"  # the supervisor's temporary directory, where front ends claim their numbers (titles)
DEFAULT_MODEL = {"num_heads": 8, "emb_size": 512, "head_size": 64, "max_seq_len": 1024, "causal": True}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MHA_", extra="ignore", validate_default=True, env_ignore_empty=True)

    # -- server ---------------------------------------------------------------------------
    host: str = Field("127.0.0.1", description="Address to bind. Use 0.0.0.0 in a container.")
    port: int = Field(8000, ge=0, le=65535, description="Port to bind.")
    grpc_port: int = Field(
        8001,
        ge=0,
        le=65535,
        description="Port of the gRPC server (the v2 protocol's inference.GRPCInferenceService and grpc.health.v1), "
        "on the same host and batcher as HTTP. 0 disables it.",
    )
    model_name: str = Field("mha", description="Name of the served model (/v1/model, /v2/models/{name}).")
    replica_id: str = Field(
        default_factory=socket.gethostname,
        description="Sent as x-served-by on every response, so a load balancer's spread is visible.",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log level.")
    log_format: Literal["json", "text"] = Field("json", description="json: one object a line, with request ids.")
    access_log: bool = Field(True, description="One log line per request (method, path, status, duration).")
    api_keys: str | None = Field(
        None,
        description="Comma-separated API keys. When set, every route but the health checks, /docs and the page "
        "needs Authorization: Bearer <key>.",
    )
    protect_metrics: bool = Field(False, description="With api_keys set, require a key for /metrics too.")
    cors_origins: str = Field("", description="Comma-separated origins allowed by CORS (* for any). Empty: CORS off.")

    # -- model ----------------------------------------------------------------------------
    checkpoint: Path | None = Field(
        None,
        description="Checkpoint file in any format mha_core imports (ours, seed MHA, seed GPT, "
        "nn.MultiheadAttention). Unset: the built-in default model, initialised from `seed`.",
    )
    checkpoint_layer: int | None = Field(None, ge=0, description="Decoder layer to take from a seed GPT checkpoint.")
    num_heads: int | None = Field(
        None, ge=1, description="Heads. Default 8; with a checkpoint, must agree with it (required for nn.MHA files)."
    )
    emb_size: int | None = Field(None, ge=1, description="Embedding size. Default 512; must agree with a checkpoint.")
    head_size: int | None = Field(None, ge=1, description="Head size. Default 64; must agree with a checkpoint.")
    max_seq_len: int | None = Field(
        None, ge=1, description="Longest sequence. Default 1024; must agree with a checkpoint that records it."
    )
    causal: bool | None = Field(None, description="Default causal flag for requests that do not say. Default true.")
    seed: int = Field(0, description="Seed of the built-in model's weights: replicas with the same seed agree.")
    device: str = Field("auto", description="auto (cuda if available, else cpu), cpu, cuda or cuda:N.")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto",
        description="Compute dtype. auto: bfloat16 on a GPU (tensor cores, float32's range), float32 on the CPU. "
        "Set float32 on a GPU for answers within float32 rounding of the CPU's.",
    )
    torch_threads: int | None = Field(
        None,
        ge=1,
        description="torch intra-op threads. Set it to the cores this process owns; unset = torch's default.",
    )
    warmup: bool = Field(True, description="Run warm-up forwards before reporting ready.")
    pinned_staging: bool = Field(
        True,
        description="GPU: pack batches into reused page-locked host buffers (fast asynchronous copies, no "
        "allocation per batch). Turn off only to measure it (make bench-gpu).",
    )
    copy_pipeline: bool = Field(
        True,
        description="GPU: copies on their own streams with two batches in flight, so the next batch is packed and "
        "uploaded while the current one computes. Turn off only to measure it (make bench-gpu).",
    )
    cuda_graphs: str = Field(
        "",
        description="GPU: comma-separated BATCHxLENGTH buckets (e.g. 32x128,128x128) whose plain causal forward is "
        "captured as a CUDA graph during warm-up (keep MHA_WARMUP on); a batch runs in the smallest bucket that holds "
        "it. Empty: off. "
        "Turn it on when make bench-gpu shows it pays at your shapes.",
    )

    # -- batching -------------------------------------------------------------------------
    max_batch_size: int = Field(
        32, ge=1, description="Most sequences in one forward pass. 1 disables batching. Raise it on a GPU."
    )
    max_batch_tokens: int = Field(
        32768,
        ge=1,
        description="Most padded tokens (sequences x longest T) in one forward pass; bounds memory. A request "
        "over it alone gets 422. Must be >= max_request_batch x max_seq_len.",
    )
    max_batch_weights_elements: int = Field(
        64 * 1024 * 1024,
        ge=1,
        description="Most attention-weight elements one forward pass computes, summed over its requests (4 bytes "
        "each in float32); a request that would push a batch past it waits for the next one. Bounds the weights' "
        "memory per batch. Must be >= max_weights_elements.",
    )
    max_wait_ms: float = Field(
        0.0,
        ge=0,
        description="Extra time a batch formed under load may wait to fill. 0 = greedy (best on a CPU): a batch "
        "starts as soon as the model is free. A request that finds the model idle never waits.",
    )
    max_padding_ratio: float = Field(
        2.0,
        ge=1.0,
        description="Most padded/real tokens in a batch; a request that would push the batch past it waits for the "
        "next batch. Lower it when sequence lengths vary a lot.",
    )
    oom_cooldown_s: float = Field(
        60.0, ge=0, description="After an out-of-memory error, batch limits stay halved this long."
    )
    max_queue_requests: int = Field(256, ge=1, description="Queued requests beyond which new ones get 429.")
    max_queue_tokens: int = Field(262144, ge=1, description="Queued tokens beyond which new requests get 429.")
    priority_levels: int = Field(
        1,
        ge=1,
        description="Priority levels (Triton's: 1 is the highest). 1 = one FIFO queue. With N >= 2, requests name "
        "a priority 1..N (0 or none: the default level); a higher level is batched first, and each level has its own "
        "queue bounds (max_queue_requests and max_queue_tokens apply per level) and its own 429 Retry-After.",
    )
    default_priority_level: int | None = Field(
        None,
        ge=1,
        description="Level of a request that names no priority (or 0): 1..priority_levels. Unset: the lowest level, "
        "so unmarked traffic is the bulk and callers opt in to a higher one.",
    )
    priority_oldest_every: int = Field(
        8,
        ge=1,
        description="Starvation bound (K): at least every K-th batch takes the oldest queued request of any level, "
        "so a request with n requests queued before it runs within (n + 1) x K batches, and the higher levels keep "
        "(K - 1)/K of the batches under a flood below them. Lower it for fairer service of low levels; 1 = FIFO "
        "across levels.",
    )

    # -- requests -------------------------------------------------------------------------
    max_body_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="Largest request body (413 beyond).")
    max_request_batch: int = Field(
        32,
        ge=1,
        description="Most sequences (B) in one request. max_request_batch x max_seq_len must fit max_batch_tokens.",
    )
    max_weights_elements: int = Field(
        16 * 1024 * 1024,
        ge=1,
        description="Most attention-weight elements (B x heads x T x T) one request may ask for.",
    )
    max_inflight_requests: int = Field(
        512,
        ge=1,
        description="Inference requests admitted at once, from before their body is read until they are answered; "
        "past it, 429 at once. Keep it above max_queue_requests + max_batch_size.",
    )
    max_inflight_bytes: int = Field(
        256 * 1024 * 1024,
        ge=1024,
        description="Request body bytes admitted at once (Content-Length, or counted as a body streams in); past "
        "it, 429 at once. Bounds the memory that bodies being read and decoded take. Must be >= max_body_bytes.",
    )
    body_read_timeout_s: float = Field(
        30.0,
        gt=0,
        description="The whole body must arrive within this many seconds of the request's start, or 408 and the "
        "connection is closed (a client trickling its body holds memory and a slot). Raise it for slow links.",
    )
    decode_processes: int = Field(
        1,
        ge=0,
        description="Worker processes that parse and encode large JSON-list payloads off the event loop, so a "
        "50 MB request does not stall /healthz and small requests. 0 = always inline.",
    )
    offload_min_bytes: int = Field(
        1024 * 1024,
        ge=0,
        description="JSON-list bodies (and list responses) from this size on go to the decode processes; smaller "
        "ones stay inline, where they are cheaper than a trip to another process.",
    )
    default_timeout_ms: float = Field(30000, gt=0, description="Deadline of a request that names none.")
    max_timeout_ms: float = Field(60000, gt=0, description="Cap on a request's timeout_ms.")
    fault_injection: bool = Field(
        False,
        description="Tests only: honour the x-mha-fault request header (raise, or stall:<ms>) to exercise "
        "fault isolation and deadlines. Never enable in production.",
    )
    workers: int | None = Field(
        None,
        ge=1,
        le=64,
        description="Front-end processes (HTTP and gRPC; they read, check, decode and encode) that feed one model "
        "process (the module, the batcher, the device). 1: one process does everything, as before. Unset: 1 on a "
        "CPU device (the forward pass needs the cores; measured in bench/procs.py), min(cores - 1, 8) on a GPU.",
    )
    engine: Literal["auto", "inprocess", "process"] = Field(
        "auto",
        description="auto: the model runs in the server process with one worker, in its own process with more. "
        "process: its own process even with MHA_WORKERS=1 (the front end then imports no torch).",
    )
    shutdown_grace_s: float = Field(
        20.0, ge=0, description="On SIGTERM, how long accepted work may take to finish before it is failed."
    )
    engine_hang_s: float = Field(
        10.0,
        ge=0.5,
        description="If the event loop of the process that runs the model (the server with one process, else the "
        "model process) does not turn for this long, it is hung: /readyz turns 503 and the process exits 70, so that "
        "the orchestrator restarts it (with a model process the service exits 1). A model process frozen whole "
        "(SIGSTOP) is killed by its parent after this long too. A forward pass runs in its own thread: "
        "MHA_FORWARD_HANG_S bounds it.",
    )
    forward_hang_s: float = Field(
        60.0,
        ge=0.5,
        description="A forward pass running longer than this is hung (a CUDA hang, a deadlock): /readyz turns 503 "
        "at once and the process that runs the model exits 70, so that the orchestrator restarts the replica (with "
        "a model process the service exits 1). Chosen from the longest legitimate forward: the default model's "
        "largest batch (MHA_MAX_BATCH_TOKENS tokens at max_seq_len, every head's weights) on one CPU thread, timed "
        "as bench/forward_time.py does, times 25 for slower CPUs and noisy neighbours. Raise it if you raise the "
        "batch limits or max_seq_len, or run on a slower device: keep it well above bench/forward_time.py's figure.",
    )
    forward_inline_us: float = Field(
        100.0,
        ge=0,
        description="A forward pass expected to take less than this (microseconds; from the forward passes timed so "
        "far, per token) runs on the event loop of the process that runs the model, not in its forward thread: the "
        "hand-off to the thread and back costs two thread wake-ups a batch (~90 us of CPU on a 2-vCPU VM, measured "
        "with bench/procs.py --noop), more than such a forward. Only while no other batch computes, never for a "
        "batch with an injected fault; the first forwards always run in the thread. 0: every forward does. A "
        "forward on the loop holds the loop for its duration: keep it well under MHA_ENGINE_HANG_S.",
    )
    shm_arena_mib: int = Field(
        ARENA_MIB_DEFAULT,
        ge=0,
        description="With front-end processes: the shared-memory arena (MiB) each side owns per peer for the large "
        "arrays it sends (service/shm.py); an array that does not fit crosses over the socket, as with 0, which turns "
        "the arenas off. Each front end makes two arenas in /dev/shm: a container's is 64 MB unless given more "
        "(docker --shm-size, compose shm_size, a Kubernetes emptyDir of medium Memory at /dev/shm). Raise it for "
        "large batches of large tensors on a GPU host.",
    )
    shm_arena_max_mib: int = Field(
        ARENA_MAX_MIB_DEFAULT,
        ge=0,
        description="How large each of those arenas may grow (MiB): one that is full adds a segment of "
        "MHA_SHM_ARENA_MIB at a time up to this, while /dev/shm has room for it (its pages are reserved when it is "
        "made), and gives a segment back once it has held nothing for 30 s. At or below MHA_SHM_ARENA_MIB it never "
        "grows. mha_shm_fallbacks_total counts the arrays that still crossed over the socket.",
    )
    malloc_mmap_threshold_mib: int = Field(
        MALLOC_MIB_DEFAULT,
        ge=0,
        le=MALLOC_MIB_MAX,
        description="glibc: blocks under this size (MiB) come from the heap, which keeps up to twice it free, instead "
        "of being mapped afresh and unmapped each time. The front ends and the model process (or the one process) "
        "set it at start (service/proc.py:tune_malloc), so that serving bodies of 128 KiB and more does not fault "
        "their pages in again request after request. 0, or any MALLOC_*_ or GLIBC_TUNABLES variable, leaves "
        "glibc's defaults.",
    )
    runner: str | None = Field(
        None,
        pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$",
        description="For benchmarks only: a factory ``module:function`` that builds the runner from the Settings "
        "instead of the model (bench/noop_runner.py:runner answers every request with its input, so that a benchmark "
        "measures the service without the forward pass, as on a GPU host where the device is not the limit). Read "
        "once at start-up. Leave it unset in production.",
    )

    kv_cache_bytes: int | None = Field(
        None,
        ge=1,
        description="Bytes of the sequences' key/value cache, allocated once at start-up on the model's device, so "
        "that sequences can never run the process out of memory. Unset: half the GPU memory free once the model is "
        "loaded, or 256 MiB on a CPU (64 sequences of 1,024 tokens of the default model: a token takes "
        "2 x heads x head_size x the dtype's bytes). Raise it when sequences are evicted for memory "
        '(mha_sequences_evicted_total{reason="memory"}) or steps get 429 with a full cache.',
    )
    sequence_idle_s: float = Field(
        30.0,
        gt=0,
        description="A sequence with no step for this long is reaped (its cache freed; its next step without start "
        "gets the start-required error). Triton's max_sequence_idle_microseconds. Raise it for clients that pause "
        "between steps (a person typing); lower it to free the cache of abandoned sequences sooner.",
    )
    kv_block_size: int = Field(
        16,
        ge=1,
        le=1024,
        description="Tokens per block of the KV cache. A sequence wastes under one block; larger blocks make the "
        "block tables shorter. Rarely worth changing.",
    )

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda|cuda:\d+|mps", v):
            raise ValueError(f"device must be auto, cpu, cuda, cuda:N or mps, got {v!r}")
        return v

    @field_validator("cuda_graphs")
    @classmethod
    def _cuda_graphs(cls, v: str) -> str:
        parse_buckets(v)
        return v

    @field_validator("checkpoint")
    @classmethod
    def _checkpoint(cls, v: Path | None) -> Path | None:
        if v is not None and not v.is_file():
            raise ValueError(f"checkpoint file {str(v)!r} does not exist")
        return v

    @field_validator("api_keys")
    @classmethod
    def _api_keys(cls, v: str | None) -> str | None:
        if v is not None and any(not k.strip() for k in v.split(",")):
            raise ValueError("api_keys must be comma-separated non-empty keys")
        return v

    @property
    def api_key_list(self) -> list[str]:
        return [k.strip() for k in self.api_keys.split(",")] if self.api_keys else []

    @property
    def cors_origin_list(self) -> list[str]:
        return [o.strip() for o in self.cors_origins.split(",") if o.strip()]

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.default_priority_level is not None and self.default_priority_level > self.priority_levels:
            raise ValueError(
                f"default_priority_level ({self.default_priority_level}) must be in 1..priority_levels "
                f"({self.priority_levels})"
            )
        if self.default_timeout_ms > self.max_timeout_ms:
            raise ValueError(
                f"default_timeout_ms ({self.default_timeout_ms}) must be <= max_timeout_ms ({self.max_timeout_ms})"
            )
        if self.max_weights_elements > self.max_batch_weights_elements:
            raise ValueError(
                f"max_weights_elements ({self.max_weights_elements}) must be <= max_batch_weights_elements "
                f"({self.max_batch_weights_elements}), or a request at the per-request limit could never run"
            )
        if self.max_batch_tokens > self.max_queue_tokens:
            raise ValueError(
                f"max_batch_tokens ({self.max_batch_tokens}) must be <= max_queue_tokens ({self.max_queue_tokens}), "
                "or a request at the batch limit could never be queued"
            )
        if self.max_body_bytes > self.max_inflight_bytes:
            raise ValueError(
                f"max_body_bytes ({self.max_body_bytes}) must be <= max_inflight_bytes ({self.max_inflight_bytes}), "
                "or a body at the size limit could never be admitted"
            )
        if self.cuda_graphs.strip() and not self.warmup:
            raise ValueError(
                f"cuda_graphs ({self.cuda_graphs!r}) needs warmup: the graphs are captured during warm-up, so with "
                "MHA_WARMUP=false none would be; set MHA_WARMUP=true or unset MHA_CUDA_GRAPHS"
            )
        if self.checkpoint is None:
            cfg = self.model_overrides(with_defaults=True)
            if cfg["max_seq_len"] > self.max_batch_tokens:
                raise ValueError(
                    f"max_batch_tokens ({self.max_batch_tokens}) must be >= max_seq_len ({cfg['max_seq_len']}), "
                    "or a longest request could never run"
                )
            if self.max_request_batch * cfg["max_seq_len"] > self.max_batch_tokens:
                raise ValueError(
                    f"max_request_batch x max_seq_len ({self.max_request_batch} x {cfg['max_seq_len']} = "
                    f"{self.max_request_batch * cfg['max_seq_len']}) must be <= max_batch_tokens "
                    f"({self.max_batch_tokens}), or a request within the per-request limits could exceed one batch; "
                    "lower MHA_MAX_REQUEST_BATCH or raise MHA_MAX_BATCH_TOKENS"
                )
        return self

    def model_overrides(self, *, with_defaults: bool = False) -> dict:
        """The model fields that were set (plus the built-in defaults when asked)."""
        given = {k: getattr(self, k) for k in DEFAULT_MODEL if getattr(self, k) is not None}
        return {**DEFAULT_MODEL, **given} if with_defaults else given


def parse_buckets(spec: str) -> list[tuple[int, int]]:
    """``"32x128, 128x128"`` -> [(32, 128), (128, 128)]: (sequences, padded length) pairs, sorted."""
    out = set()
    for part in spec.replace(";", ",").split(","):
        part = part.strip()
        if not part:
            continue
        m = re.fullmatch(r"(\d+)\s*[xX]\s*(\d+)", part)
        if m is None or int(m.group(1)) < 1 or int(m.group(2)) < 1:
            raise ValueError(f"a CUDA graph bucket is BATCHxLENGTH with both >= 1, e.g. 32x128; got {part!r}")
        out.add((int(m.group(1)), int(m.group(2))))
    return sorted(out, key=lambda b: (b[0] * b[1], b))


def default_workers(device: str, cores: int | None = None) -> int:
    """MHA_WORKERS when unset: 1 on a CPU device, min(cores - 1, 8) on a GPU (read without importing torch).

    On a CPU the forward pass uses every core, and a second front end takes them from it (bench/procs.py
    measures it: on 2 cores a second process gained nothing worth its memory). On a GPU the
    device waits on the front end: a front end per free core, up to 8, keeps it fed; the model process
    keeps one core.
    """
    cores = cores or len(os.sched_getaffinity(0)) or 1  # the cores this process may run on (taskset, cpuset)
    gpu = device.startswith("cuda") or (device == "auto" and _gpu_visible())
    return max(1, min(cores - 1, 8)) if gpu else 1


def _gpu_visible() -> bool:
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return Path("/dev/nvidiactl").exists() or any(Path("/dev").glob("nvidia[0-9]*"))
