"""bench/gpu.py (make bench-gpu): one command on a CUDA host, one table. Installs nothing; about 5 minutes
(under 8: a time budget skips what does not fit, and says so).

Rows, all measured in this one run:
  correctness   the device tests (pytest -m device, MHA_TEST_DEVICE = this device): passed/failed/skipped
  core          ours (mha_core, output path, causal) against the floor (bare SDPA plus the two projections,
                the same weights) and against nn.MultiheadAttention in its fastest configuration (native
                fast path with a bool mask, or fast path off with is_causal=True: the faster per shape), at
                [1,128], [32,128], [8,1024], [4,4096], bf16, E=512, 8 heads of 64. Target: within 10% of the floor.
  weights       ours with need_weights=True against the memory-write floor: B*H*T*T*2 bytes at the device's
                bandwidth, measured here as (read + write bytes) / time of a 1 GiB device copy. Target: <= 2x.
                Also the allocations of one (B,H,T,T) size during a forward (torch.profiler; runs on the CPU too).
  decode        one decode step (one new token a sequence) over a 4,096-token cache, bf16, batches of 1, 8, 32,
                through the service's StepRunner over a KVCache: bytes of cache read / time as a share of the
                bandwidth measured here (a 1 GiB device copy). Target: >= 50%. Beside it the floor (bare SDPA over
                contiguous K/V) and the step's time split into the gather (blocks into a padded copy), the
                attention, and the rest. --decode-only runs it alone; --quick at tiny sizes (--device cpu).
  ceiling       the runner alone (pack, upload, forward, download, unpack; depth batches in flight as the
                batcher keeps them) on [1,128,512] requests in batches of 64 and 256: the device's own ceiling
                for the service's work. And the forward alone.
  paths         each GPU path on against off, on the runner: pinned staging, the copy pipeline (side streams,
                two batches in flight), CUDA graphs (buckets 1x128, 64x128, 256x128) at batch 1 and 64.
                "pays" when on is >= 5% faster.
  service       a real mha-serve (bf16, batches up to 256) under load: v2 binary [1,128,512] BF16 at
                concurrency 64 and 256, with all paths on (graphs off: the default), and with each path
                flipped. Load: wrk when installed (-t = half the cores), else a Python raw-socket generator
                in several processes (printed; it saturates earlier). Target: >= 20,000 req/s on one
                H100/H200 host (needs the front-end process issue).

Without a CUDA device (or with MHA_DEVICE=cpu) every GPU row says "skipped: no CUDA device"; the
correctness row still runs pytest (all its cases skip) and the allocation rows still measure.

    .venv/bin/python bench/gpu.py [--device cuda:0] [--duration 8] [--budget-s 450] [--json PATH]
    .venv/bin/python bench/gpu.py --decode-only | --device cpu --quick
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import orjson
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.harness import COPY_SYMBOLS, PerfShare, Server, model_process, proc_cpu_s, run_wrk, wrk_errors  # noqa: E402
from bench.weights_memory import measure as weights_allocations  # noqa: E402
from mha_core import MHAConfig, MultiHeadAttention  # noqa: E402
from mha_core.incremental import attend_padded, project  # noqa: E402
from service.engine.kvcache import KVCache  # noqa: E402
from service.engine.runner import Runner  # noqa: E402
from service.engine.sequences import Step  # noqa: E402
from service.engine.steprunner import StepRunner  # noqa: E402
from service.frontend.codecs import bf16_to_f32, f32_to_bf16  # noqa: E402
from service.messages import AttendInput  # noqa: E402
from service.settings import Settings  # noqa: E402

E, H, D = 512, 8, 64
CORE_SHAPES = [(1, 128), (32, 128), (8, 1024), (4, 4096)]
NO_CUDA = "skipped: no CUDA device"
_NO_WRK = False
GRAPH_BUCKETS = "1x128,64x128,256x128"


class Table:
    def __init__(self) -> None:
        self.rows: list[dict] = []

    def add(self, section: str, case: str, ours="", ref="", ratio="", target="", verdict="", data=None) -> None:
        """``data``: the row's figures as numbers, for --json readers (the other columns are text)."""
        self.rows.append(
            {"section": section, "case": case, "ours": ours, "reference": ref, "ratio": ratio, "target": target}
            | {"verdict": verdict}
            | ({"data": data} if data is not None else {})
        )
        print(f"  [{section}] {case}: {ours} | {ref} | {ratio} | {verdict}", flush=True)

    def skip(self, section: str, case: str, why: str = NO_CUDA, target: str = "") -> None:
        self.add(section, case, target=target, verdict=why)

    def render(self) -> str:
        cols = ["section", "case", "ours", "reference", "ratio", "target", "verdict"]
        lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
        for r in self.rows:
            lines.append("| " + " | ".join(str(r[c]) for c in cols) + " |")
        return "\n".join(lines)


class Budget:
    def __init__(self, seconds: float) -> None:
        self.t0 = time.monotonic()
        self.seconds = seconds

    def left(self) -> float:
        return self.seconds - (time.monotonic() - self.t0)


# -- timing -------------------------------------------------------------------------------------------------


def device_ms(fn, inner: int, cuda: bool | None = None) -> float:
    """Milliseconds per call of fn over `inner` back-to-back calls: CUDA events on a GPU (the --selfcheck
    run on the CPU uses the wall clock). ``cuda``: which clock (None: CUDA events where CUDA is available),
    so that CPU work on a CUDA host is timed by the wall clock, not by events around an idle stream."""
    if not (torch.cuda.is_available() if cuda is None else cuda):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        return (time.perf_counter() - t0) * 1000 / inner
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(inner):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / inner


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def compare(fns: dict, rounds: int = 7, target_ms: float = 20.0, cuda: bool | None = None) -> dict[str, float]:
    """Median ms per call of each fn, measured round-robin so drift hits them alike."""
    for fn in fns.values():  # warm-up, and the inner count that makes one timing ~target_ms
        for _ in range(3):
            fn()
    sync()
    inner = {k: max(1, min(200, int(target_ms / max(device_ms(fn, 2, cuda), 1e-3)))) for k, fn in fns.items()}
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            times[k].append(device_ms(fn, inner[k], cuda))
    return {k: statistics.median(v) for k, v in times.items()}


def fmt_ms(ms: float) -> str:
    return f"{ms:.3f} ms" if ms < 10 else f"{ms:.1f} ms"


# -- correctness ----------------------------------------------------------------------------------------------


def correctness(table: Table, device: str, budget: Budget) -> None:
    env = {**os.environ, "MHA_TEST_DEVICE": device}
    argv = [sys.executable, "-m", "pytest", "-q", "-m", "device", "-p", "no:cacheprovider"]
    argv += ["tests/unit", "tests/integration"]
    t0 = time.monotonic()
    try:
        r = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=min(240, budget.left()))
        out = r.stdout + r.stderr
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        out += "\n(timed out)"
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error|errors|deselected)", out)}
    summary = ", ".join(f"{counts[k]} {k}" for k in ("passed", "failed", "errors", "error", "skipped") if k in counts)
    failed = counts.get("failed", 0) + counts.get("errors", 0) + counts.get("error", 0)
    if failed:
        for line in out.splitlines():
            if line.startswith(("FAILED", "ERROR")):
                print("   ", line, flush=True)
    if counts.get("passed", 0) == 0 and not failed:
        verdict = NO_CUDA if not device.startswith("cuda") else "no device test ran"
    else:
        verdict = "PASS" if failed == 0 else "FAIL"
    table.add(
        "correctness",
        f"pytest -m device on {device} ({time.monotonic() - t0:.0f} s)",
        summary or (out.strip().splitlines() or ["no output"])[-1],
        "fp32, bf16, fp16 vs float64 / CPU float32 references",
        "",
        "0 failed",
        verdict,
    )


# -- the core -------------------------------------------------------------------------------------------------


def core(table: Table, dev: torch.device, budget: Budget, shapes=CORE_SHAPES) -> None:
    dtype = torch.bfloat16
    cfg = MHAConfig(H, E, D, max(T for _, T in shapes))
    ours = MultiHeadAttention.from_seed(cfg, 0).eval().to(dev, dtype)
    w_qkv, b_qkv, w_o, b_o = ours.qkv.weight, ours.qkv.bias, ours.proj.weight, ours.proj.bias
    ref = nn.MultiheadAttention(E, H, batch_first=True).eval().to(dev, dtype)  # E=H*D, as ours here

    def floor(x):
        B, T, _ = x.shape
        q, k, v = F.linear(x, w_qkv, b_qkv).split(H * D, dim=-1)
        q, k, v = (t.view(B, T, H, D).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return F.linear(y.transpose(1, 2).reshape(B, T, H * D), w_o, b_o)

    for B, T in shapes:
        if budget.left() < 60:
            table.skip("core", f"[{B},{T}] bf16", "skipped: time budget")
            continue
        x = torch.randn(B, T, E, device=dev, dtype=dtype)
        bool_mask = torch.ones(T, T, dtype=torch.bool, device=dev).triu(1)  # True = masked out
        float_mask = nn.Transformer.generate_square_subsequent_mask(T, device=dev, dtype=dtype)

        def mha_fast(x=x, m=bool_mask):
            torch.backends.mha.set_fastpath_enabled(True)
            return ref(x, x, x, attn_mask=m, need_weights=False)

        def mha_causal(x=x, m=float_mask):
            torch.backends.mha.set_fastpath_enabled(False)
            try:
                return ref(x, x, x, attn_mask=m, is_causal=True, need_weights=False)
            finally:
                torch.backends.mha.set_fastpath_enabled(True)

        with torch.inference_mode():
            got, want = ours(x).output, floor(x)
            err = (got.float() - want.float()).abs().max().item()
            fns = {"ours": lambda x=x: ours(x), "floor": lambda x=x: floor(x)}
            for key, fn in (("fast path", mha_fast), ("is_causal", mha_causal)):
                try:  # a configuration this torch cannot run on this device is left out, and said so
                    fn()
                    fns[key] = fn
                except RuntimeError as e:
                    print(f"    nn.MHA {key} at [{B},{T}] bf16 failed: {str(e)[:120]}", flush=True)
            ms = compare(fns)
        mha = {k: v for k, v in ms.items() if k in ("fast path", "is_causal")}
        which = min(mha, key=mha.get) if mha else None
        best_mha = mha[which] if which else float("nan")
        r = ms["ours"] / ms["floor"]
        table.add(
            "core",
            f"[{B},{T}] bf16 vs floor (max abs diff {err:.2g})",
            fmt_ms(ms["ours"]),
            f"floor {fmt_ms(ms['floor'])}",
            f"{r:.2f}x",
            "<= 1.10x",
            "PASS" if r <= 1.10 else "FAIL",
        )
        table.add(
            "core",
            f"[{B},{T}] bf16 vs nn.MHA ({which})",
            fmt_ms(ms["ours"]),
            f"nn.MHA {fmt_ms(best_mha)}",
            f"{ms['ours'] / best_mha:.2f}x",
            "",
            "",
        )


def bandwidth_gbs(dev: torch.device, nbytes: int | None = None) -> float:
    """Device memory bandwidth: (read + write bytes) / time of a device-to-device copy (1 GiB on a GPU by default)."""
    n = nbytes or (1 << 30 if dev.type == "cuda" else 1 << 27)
    a = torch.empty(n, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    ms = min(device_ms(lambda: b.copy_(a), 5, dev.type == "cuda") for _ in range(3))
    return 2 * n / (ms / 1000) / 1e9


def weights(table: Table, dev: torch.device | None, budget: Budget, shapes=CORE_SHAPES) -> None:
    cuda = dev is not None and dev.type == "cuda"
    if dev is not None:
        bw = bandwidth_gbs(dev)
        table.add("weights", "device bandwidth (1 GiB copy, read + write)", f"{bw:.0f} GB/s", "", "", "", "measured")
        dtype = torch.bfloat16
        ours = MultiHeadAttention.from_seed(MHAConfig(H, E, D, 4096), 0).eval().to(dev, dtype)
        for B, T in shapes:
            if budget.left() < 45:
                table.skip("weights", f"[{B},{T}] bf16", "skipped: time budget")
                continue
            x = torch.randn(B, T, E, device=dev, dtype=dtype)
            nbytes = B * H * T * T * 2
            floor_ms = nbytes / (bw * 1e9) * 1000
            with torch.inference_mode():
                ms = compare({"w": lambda x=x: ours(x, need_weights=True), "o": lambda x=x: ours(x)}, rounds=5)
            r = ms["w"] / floor_ms
            table.add(
                "weights",
                f"[{B},{T}] bf16, {nbytes / 1e6:.0f} MB of weights (output path alone {fmt_ms(ms['o'])})",
                fmt_ms(ms["w"]),
                f"write floor {fmt_ms(floor_ms)}",
                f"{r:.1f}x",
                "<= 2x",
                "PASS" if r <= 2 else "FAIL",
            )
    else:
        table.skip("weights", "time against the memory-write floor", target="<= 2x")
    # allocations: measurable anywhere (torch.profiler), on the device when there is one
    where = str(dev) if cuda else "cpu"
    for dtype, B, T in ((torch.bfloat16, 2, 1024), (torch.float32, 2, 1024)):
        n, total, peak = weights_allocations(dtype, B, T, True, "cuda" if cuda else "cpu")
        table.add(
            "weights",
            f"allocations of one (B,H,T,T) size, [{B},{T}] padded {str(dtype)[6:]} on {where}",
            f"{n}",
            f"bytes allocated {total:.2f}x, peak held {peak:.2f}x the weights",
            "",
            "1",
            "PASS" if n == 1 else "FAIL",
        )


# -- decode: one step over a long cache, against the device's bandwidth ---------------------------------------

DECODE_TOKENS = 4096
DECODE_BATCHES = (1, 8, 32)
DECODE_TARGET = 0.5  # of the bandwidth measured in the same run (issue 21; FlashDecoding's range on an A100)
QUICK = {"tokens": 64, "batches": (1, 4), "copy_bytes": 16 << 20, "rounds": 3}  # --quick: seconds on a CPU


def rotate(fns: list):
    """One callable that calls each of ``fns`` in turn."""
    turn = itertools.cycle(fns)
    return lambda: next(turn)()


def decode(
    table: Table,
    dev: torch.device,
    budget: Budget,
    *,
    tokens: int = DECODE_TOKENS,
    batches: tuple[int, ...] = DECODE_BATCHES,
    copy_bytes: int = 1 << 30,
    rounds: int = 7,
    l2_bytes: int | None = None,
) -> None:
    """One decode step (one new token per sequence) through the service's own StepRunner over a KVCache.

    A decode step must read every cached key and value of its sequences, and does little else, so it is bound
    by memory: bytes of cache / step time, as a share of what a device-to-device copy moves in the same run,
    says how far it is from the device's limit. Bare SDPA over contiguous K/V is the floor: the same reads with
    nothing around them. The service's step first gathers the blocks into a padded copy (index_select), which
    SDPA then reads again; the gather, the attention over its result, and the rest (projections, host copies,
    the index) are timed apart, so a step below the target names its culprit.
    """
    dtype = torch.bfloat16
    bw = bandwidth_gbs(dev, copy_bytes)
    table.add(
        "decode",
        f"device bandwidth ({copy_bytes / 2**30:.3g} GiB copy, read + write)",
        f"{bw:.0f} GB/s",
        verdict="measured",
        data={"bandwidth_gbs": bw, "copy_bytes": copy_bytes},
    )
    block = Settings.model_fields["kv_block_size"].default  # the service's own block size
    module = MultiHeadAttention.from_seed(MHAConfig(H, E, D, tokens + block), 0)
    runner = Runner(module, device=dev, dtype=dtype, checksum="bench", graph_buckets=[])
    itemsize = torch.empty((), dtype=dtype).element_size()
    P = tokens + 1  # the cache and the step's own token
    new, total = [1] * max(batches), [P] * max(batches)
    if l2_bytes is None:  # a CPU's caches are left alone: its figures are not the point
        l2_bytes = torch.cuda.get_device_properties(dev).L2_cache_size if dev.type == "cuda" else 0
    rng = np.random.default_rng(0)
    for S in batches:
        case = f"[{S} x {tokens}] bf16"
        if budget.left() < 30:
            table.skip("decode", case, "skipped: time budget", target=f">= {DECODE_TARGET:.0%} of bandwidth")
            continue
        nbytes = S * tokens * 2 * H * D * itemsize
        # A cache that fits in the L2 would be read from it, not from memory: R groups of S sequences, a call
        # on each in turn, so that what one call reads has left the L2 by its next turn.
        R = max(1, -(-4 * l2_bytes // nbytes))
        per_seq = -(-P // block)
        cache = KVCache(
            num_heads=H,
            head_size=D,
            dtype=dtype,
            device=dev,
            max_bytes=R * S * per_seq * 2 * block * H * D * itemsize,
            block_size=block,
        )
        with torch.inference_mode():
            cache.keys.normal_()
            cache.values.normal_()
        for n in range(block, per_seq * block + 1, block):  # sequences that grew together: their blocks interleave
            for i in range(R * S):
                if not cache.reserve(i, min(n, P)):
                    raise RuntimeError(f"the bench's cache of {cache.num_blocks} blocks is too small for {S} x {P}")
        xs = rng.standard_normal((S, 1, 1, E), dtype=np.float32)
        groups = [
            [
                Step(AttendInput(xs[i]), id=g * S + i, past=tokens, slots=cache.slots(g * S + i, tokens))
                for i in range(S)
            ]
            for g in range(R)
        ]
        steps = StepRunner(runner, cache)

        def gather(items, cache=cache, S=S):
            """The step runner's gather, as _run_batched does it: the index, then index_select of keys and values."""
            index = torch.zeros(S, P, dtype=torch.int64, device=dev)
            for i, it in enumerate(items):
                index[i, :tokens] = it.slots
            return cache.gather(index)

        with torch.inference_mode():
            x = torch.from_numpy(xs.reshape(S, E)).to(dev, dtype)
            q, k, v = project(runner.module, x)  # (S, H, D) each
            gathered = [gather(items) for items in groups]  # (S, P, H, D) each
            for keys, values in gathered:
                keys[:, tokens], values[:, tokens] = k, v
            qc = q.view(S, 1, H, D).transpose(1, 2)  # (S, H, 1, D)
            floors = [tuple(t.transpose(1, 2).contiguous() for t in kv) for kv in gathered]  # (S, H, P, D) each
            # the last position sees every key: no mask, the fastest kernel the device has for it
            y = F.scaled_dot_product_attention(qc, *floors[0]).transpose(1, 2).reshape(S, H * D)
            want = runner.module.proj(y).float().cpu().numpy()
            results, _ = steps.run(groups[0])
            got = np.concatenate([r.output.reshape(1, E) for r in results])
            err = float(np.abs(got - want).max())
            ms = compare(
                {
                    "step": rotate([lambda items=items, steps=steps: steps.run(items) for items in groups]),
                    "gather": rotate([lambda items=items, gather=gather: gather(items) for items in groups]),
                    "attention": rotate(
                        [
                            lambda S=S, q=q, kv=kv: attend_padded(runner.module, q, *kv, new[:S], total[:S])
                            for kv in gathered
                        ]
                    ),
                    "floor": rotate([lambda qc=qc, kv=kv: F.scaled_dot_product_attention(qc, *kv) for kv in floors]),
                },
                rounds=rounds,
                cuda=dev.type == "cuda",
            )
        share = {k: nbytes / (t / 1000) / (bw * 1e9) for k, t in ms.items()}
        rest = ms["step"] - ms["gather"] - ms["attention"]
        stages = {"gather": ms["gather"], "attention": ms["attention"], "rest": rest}
        culprit = max(stages, key=stages.get)
        ok = share["step"] >= DECODE_TARGET
        table.add(
            "decode",
            f"{case} step, StepRunner over KVCache ({nbytes / 2**20:.3g} MiB of cache"
            + (f", {R} such in turn: past the L2" if R > 1 else "")
            + f", max abs diff {err:.2g})",
            fmt_ms(ms["step"]),
            f"floor (SDPA, contiguous K/V) {fmt_ms(ms['floor'])}, {share['floor']:.0%} of bandwidth",
            f"{share['step']:.0%} of bandwidth",
            f">= {DECODE_TARGET:.0%} of bandwidth",
            "PASS" if ok else "FAIL",
            data={"batch": S, "tokens": tokens, "cache_bytes": nbytes, "groups": R, "max_abs_diff": err}
            | {f"{k}_ms": t for k, t in ms.items()}
            | {f"{k}_share": v for k, v in share.items()},
        )
        table.add(
            "decode",
            f"{case} where the step's time goes (rest: projections, host copies, the index)",
            f"gather {fmt_ms(ms['gather'])}",
            f"attention {fmt_ms(ms['attention'])}, rest {fmt_ms(rest)}",
            f"gather {ms['gather'] / ms['step']:.0%} of the step",
            "",
            "" if ok else f"{culprit}-bound",
            data={"batch": S, "rest_ms": rest, "culprit": culprit},
        )
        del cache, groups, steps, gathered, floors
        if dev.type == "cuda":
            torch.cuda.empty_cache()


# -- the runner: the device's ceiling and the GPU paths ---------------------------------------------------------


def make_items(batch: int) -> list[AttendInput]:
    """What batch BF16 requests of [1,128,512] decode to: bfloat16 values held as float32."""
    x = np.random.default_rng(0).standard_normal((1, 128, E), dtype=np.float32)
    xf = bf16_to_f32(f32_to_bf16(x)).reshape(1, 128, E)
    return [AttendInput(xf) for _ in range(batch)]


def runner_rps(dev: torch.device, *, batch: int, seconds: float, pinned=True, pipeline=True, graphs: str = "") -> float:
    """Requests per second through Runner.run, `depth` batches in flight as the batcher keeps them."""
    from service.settings import parse_buckets

    module = MultiHeadAttention.from_seed(MHAConfig(H, E, D, 1024), 0)
    runner = Runner(
        module,
        device=dev,
        dtype=torch.bfloat16,
        checksum="bench",
        pinned=pinned,
        pipeline=pipeline,
        graph_buckets=parse_buckets(graphs),
    )
    runner.warmup()
    items = make_items(batch)
    for _ in range(3):
        runner.run(items)
    done = 0
    with ThreadPoolExecutor(runner.depth) as pool:
        inflight: deque = deque()
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            while len(inflight) < runner.depth:
                inflight.append(pool.submit(runner.run, items))
            inflight.popleft().result()
            done += batch
        while inflight:
            inflight.popleft().result()
            done += batch
        elapsed = time.perf_counter() - t0
    del runner
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return done / elapsed


def forward_rps(dev: torch.device, batch: int) -> float:
    m = MultiHeadAttention.from_seed(MHAConfig(H, E, D, 1024), 0).eval().to(dev, torch.bfloat16)
    x = torch.randn(batch, 128, E, device=dev, dtype=torch.bfloat16)
    with torch.inference_mode():
        ms = compare({"f": lambda: m(x)}, rounds=5)["f"]
    return batch / (ms / 1000)


def paths(
    table: Table, dev: torch.device | None, budget: Budget, secs: float = 3.0, batches: tuple = (64, 256)
) -> dict:
    ceilings: dict = {}
    if dev is None:
        for b in batches:
            table.skip("ceiling", f"runner, batches of {b} x [1,128,512] bf16")
        for name in ("pinned staging", "copy pipeline", "CUDA graphs"):
            table.skip("paths", name)
        return ceilings
    for b in batches:
        ceilings[b] = runner_rps(dev, batch=b, seconds=secs)
        fwd = forward_rps(dev, b)
        table.add(
            "ceiling",
            f"runner, batches of {b} x [1,128,512] bf16 (all paths on)",
            f"{ceilings[b]:,.0f} req/s",
            f"forward alone {fwd:,.0f} req/s",
            f"{ceilings[b] / fwd:.2f}x",
            "",
            "measured",
        )
    b0 = batches[0]
    cases = [
        (f"pinned staging, batch {b0}", b0, {"pinned": True}, {"pinned": False}),
        (f"copy pipeline (side streams, depth 2), batch {b0}", b0, {"pipeline": True}, {"pipeline": False}),
        ("CUDA graphs, batch 1", 1, {"graphs": GRAPH_BUCKETS}, {"graphs": ""}),
        (f"CUDA graphs, batch {b0}", b0, {"graphs": GRAPH_BUCKETS}, {"graphs": ""}),
    ]
    for name, b, on, off in cases:
        if budget.left() < 150:
            table.skip("paths", name, "skipped: time budget")
            continue
        r_on = runner_rps(dev, batch=b, seconds=secs, **on)
        r_off = runner_rps(dev, batch=b, seconds=secs, **off)
        gain = r_on / r_off
        table.add(
            "paths",
            f"{name}: runner req/s on vs off",
            f"{r_on:,.0f} req/s",
            f"off {r_off:,.0f} req/s",
            f"{gain:.2f}x",
            ">= 1.05x to keep",
            "pays" if gain >= 1.05 else "no gain",
        )
    return ceilings


# -- the service ----------------------------------------------------------------------------------------------


def v2_body() -> tuple[bytes, int]:
    x = np.random.default_rng(0).standard_normal((1, 128, E), dtype=np.float32)
    raw = f32_to_bf16(x).tobytes()
    header = orjson.dumps(
        {
            "inputs": [
                {"name": "x", "shape": [1, 128, E], "datatype": "BF16", "parameters": {"binary_data_size": len(raw)}}
            ],
            "outputs": [{"name": "output", "parameters": {"binary_data": True}}],
        }
    )
    return header + raw, len(header)


def start_server(device: str, env_extra: dict, log: Path) -> Server:
    """mha-serve sized for a GPU host: bf16, batches up to 256, deep queues, no access log."""
    env = {
        "MHA_DEVICE": device,
        "MHA_DTYPE": "bfloat16",
        "MHA_MAX_BATCH_SIZE": "256",
        "MHA_MAX_BATCH_TOKENS": str(256 * 128),
        "MHA_MAX_QUEUE_REQUESTS": "8192",
        "MHA_MAX_QUEUE_TOKENS": str(8192 * 128),
        "MHA_SHUTDOWN_GRACE_S": "2",
        **env_extra,
    }
    return Server(env, log, defaults={"MHA_ACCESS_LOG": "false", "MHA_LOG_LEVEL": "warning"})


def check_once(base: str, body: bytes, hlen: int) -> None:
    req = urllib.request.Request(
        base + "/v2/models/mha/infer",
        data=body,
        headers={"content-type": "application/octet-stream", "inference-header-content-length": str(hlen)},
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        data = r.read()
        n = int(r.headers["inference-header-content-length"])
    if len(data) - n != 128 * E * 2:
        raise RuntimeError(f"v2 answer has {len(data) - n} bytes of output, expected {128 * E * 2}")


def wrk_rps(url: str, body_path: Path, hlen: int, conc: int, seconds: float, threads: int) -> tuple[float, str]:
    headers = {"Inference-Header-Content-Length": str(hlen)}
    d = run_wrk(url, body_path, "application/octet-stream", headers, conc, seconds, threads=threads, core=None)
    errors = wrk_errors(d)
    detail = f"p50 {d['p50_us'] / 1000:.1f} ms, p99 {d['p99_us'] / 1000:.1f} ms, {errors} errors"
    return (d["requests"] - errors) / (d["duration_us"] / 1e6), detail


def py_rps(base: str, body_path: Path, hlen: int, conc: int, seconds: float, procs: int) -> tuple[float, str]:
    """The fallback load: bench/loadgen.py (standard library only) in `procs` processes started together."""
    port = int(base.rsplit(":", 1)[1])
    start_at = time.time() + 1.5  # all processes up before any starts sending
    per = [n for n in (conc // procs + (1 if i < conc % procs else 0) for i in range(procs)) if n]
    argv = [sys.executable, str(ROOT / "bench" / "loadgen.py"), "--port", str(port), "--path", "/v2/models/mha/infer"]
    argv += ["--body", str(body_path), "--header", "Content-Type: application/octet-stream"]
    argv += ["--header", f"Inference-Header-Content-Length: {hlen}", "--seconds", str(seconds)]
    argv += ["--start-at", str(start_at)]
    ps = [subprocess.Popen([*argv, "--connections", str(n)], stdout=subprocess.PIPE, text=True) for n in per]
    res = [json.loads(p.communicate(timeout=seconds + 60)[0].strip().splitlines()[-1]) for p in ps]
    ok = sum(r["ok"] for r in res)
    errors = sum(r["errors"] + r["failed_connections"] for r in res)
    elapsed = max(r["elapsed_s"] for r in res)
    mean_ms = 1000 * sum(r["latency_s"] for r in res) / max(1, ok + errors)
    return ok / elapsed, f"mean {mean_ms:.1f} ms, {errors} errors, {len(ps)} loadgen processes"


def service(
    table: Table, device: str, cuda: bool, ceilings: dict, seconds: float, budget: Budget, concs=(64, 256)
) -> None:
    configs = [
        ("all paths on (default)", {}),
        ("pinned staging off", {"MHA_PINNED_STAGING": "false"}),
        ("copy pipeline off", {"MHA_COPY_PIPELINE": "false"}),
        (f"CUDA graphs on ({GRAPH_BUCKETS})", {"MHA_CUDA_GRAPHS": GRAPH_BUCKETS}),
    ]
    if not cuda:
        for name, _ in configs:
            for c in concs:
                table.skip("service", f"v2 binary [1,128,512] bf16, c={c}, {name}", target=">= 20,000 req/s")
        return
    have_wrk = shutil.which("wrk") is not None and not _NO_WRK
    cores = os.cpu_count() or 2
    threads = max(1, min(8, cores // 2))
    gen = (
        f"wrk -t{threads}"
        if have_wrk
        else f"python raw sockets, {threads} processes (no wrk here: it saturates sooner)"
    )
    table.add("service", "load generator", gen, "", "", "", "")
    body, hlen = v2_body()
    tmp = Path(tempfile.mkdtemp(prefix="mha-bench-gpu-"))
    body_path = tmp / "v2.body"
    body_path.write_bytes(body)
    default_rps: dict[int, float] = {}
    for name, extra in configs:
        if budget.left() < 2 * seconds + 40:
            for c in concs:
                table.skip("service", f"c={c}, {name}", "skipped: time budget")
            continue
        server = start_server(device, extra, tmp / "server.log")
        base = server.url
        try:
            check_once(base, body, hlen)
            url = base + "/v2/models/mha/infer"
            model = model_process(server.pid) if not extra else None  # (None: one process serves, no model process)
            if not extra:
                refused = [line for line in (tmp / "server.log").read_text().splitlines() if "page-locking" in line]
                table.add(
                    "service",
                    "answer arenas page-locked: the runner downloads each answer where the front end reads it",
                    "no model process" if model is None else ("refused: " + refused[0][-120:] if refused else "yes"),
                    "",
                    "",
                    "",
                    "",
                )
            for c in concs:
                if have_wrk:
                    wrk_rps(url, body_path, hlen, c, 2, threads)  # warm-up: connections, batch shapes
                # the model process's host copies, sampled in place by perf where it may (its DMA leaves none)
                with PerfShare(model) as perf:
                    cpu0 = proc_cpu_s(model) if model is not None else 0.0
                    if have_wrk:
                        rps, detail = wrk_rps(url, body_path, hlen, c, seconds, threads)
                    else:
                        rps, detail = py_rps(base, body_path, hlen, c, seconds, threads)
                    cpu1 = proc_cpu_s(model) if model is not None else 0.0
                if model is not None and rps > 0:  # issue 20: what one model process spends a request, on a device
                    us = 1e6 * (cpu1 - cpu0) / (rps * seconds)
                    copies = perf.share(COPY_SYMBOLS)
                    table.add(
                        "service",
                        f"the model process's CPU a request, c={c} (from /proc over the run)",
                        f"{us:.1f} us"
                        + ("" if copies is None else f" (host copies {copies * us:.1f}: libc's memmove, perf)"),
                        "",
                        "",
                        "<= 15 us",
                        "PASS" if us <= 15 else "FAIL",
                    )
                if not extra:
                    default_rps[c] = rps
                    ceiling = ceilings[min(ceilings, key=lambda b, c=c: abs(b - c))] if ceilings else None
                    table.add(
                        "service",
                        f"v2 binary [1,128,512] bf16, c={c}, {name} ({detail})",
                        f"{rps:,.0f} req/s",
                        f"device ceiling {ceiling:,.0f} req/s" if ceiling else "",
                        f"{rps / ceiling:.2f}x" if ceiling else "",
                        ">= 20,000 req/s",
                        "PASS" if rps >= 20000 else "FAIL",
                    )
                else:
                    base_rps = default_rps.get(c)
                    table.add(
                        "service",
                        f"c={c}, {name} ({detail})",
                        f"{rps:,.0f} req/s",
                        f"default {base_rps:,.0f} req/s" if base_rps else "",
                        f"{rps / base_rps:.2f}x" if base_rps else "",
                        "",
                        "",
                    )
        finally:
            server.stop(15)
    shutil.rmtree(tmp, ignore_errors=True)


# -- main -----------------------------------------------------------------------------------------------------


def report(table: Table, title: str, json_path: Path | None) -> int:
    """Print ``table`` under its title, write its rows to ``json_path`` when given; the exit code (0)."""
    print()
    print(f"## {title}")
    print()
    print(table.render())
    if json_path:
        json_path.write_text(json.dumps(table.rows, indent=1))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default=os.environ.get("MHA_DEVICE", "auto"), help="auto, cpu, cuda, cuda:N")
    ap.add_argument("--duration", type=float, default=8.0, help="seconds of load per service cell")
    ap.add_argument("--budget-s", type=float, default=450.0, help="skip what would not fit in this many seconds")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    ap.add_argument(
        "--selfcheck",
        action="store_true",
        help="run every row on the CPU at small sizes, to check this script where there is no GPU (no verdicts)",
    )
    ap.add_argument("--wrk", default="auto", choices=["auto", "off"], help="off: use the Python load generator")
    ap.add_argument(
        "--decode-only",
        action="store_true",
        help="only the decode section (one step over a 4,096-token cache against the bandwidth): under 2 minutes",
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="the decode section alone at tiny sizes (--device cpu: checks it in seconds; no real verdicts)",
    )
    args = ap.parse_args()
    budget = Budget(args.budget_s)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = device.startswith("cuda") and torch.cuda.is_available()
    if device.startswith("cuda") and not cuda:
        print(f"bench/gpu.py: {device} asked for, but torch sees no CUDA device: GPU rows are skipped", flush=True)
    global _NO_WRK
    _NO_WRK = args.wrk == "off"
    if args.selfcheck:
        return selfcheck(args)
    if args.quick or args.decode_only:
        return decode_only(args, device if cuda else "cpu")
    dev = torch.device(device) if cuda else None
    name = torch.cuda.get_device_name(dev) if cuda else "no CUDA device"
    print(f"# bench/gpu.py on {device} ({name}), torch {torch.__version__} (CUDA {torch.version.cuda})", flush=True)
    table = Table()
    correctness(table, device if cuda else "cpu", budget)
    if cuda:
        torch.cuda.set_device(dev)
        core(table, dev, budget)
    else:
        for B, T in CORE_SHAPES:
            table.skip("core", f"[{B},{T}] bf16 vs floor and nn.MHA", target="<= 1.10x")
    weights(table, dev, budget)
    if cuda:
        decode(table, dev, budget)
    else:
        for S in DECODE_BATCHES:
            table.skip("decode", f"[{S} x {DECODE_TOKENS}] bf16 step", target=f">= {DECODE_TARGET:.0%} of bandwidth")
    ceilings = paths(table, dev, budget)
    service(table, device, cuda, ceilings, args.duration, budget)
    elapsed = time.monotonic() - budget.t0
    return report(table, f"mha-serve on {name}: {elapsed:.0f} s, {time.strftime('%Y-%m-%d %H:%M')}", args.json)


def decode_only(args, device: str) -> int:
    dev = torch.device(device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "the CPU"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    elif args.quick:  # tiny ops split over threads on a shared host wait on each other for a scheduler tick
        torch.set_num_threads(1)
    table = Table()
    # --quick on a CPU: as if its L2 held 64 KiB, so that the turns over several caches run here too
    sizes = (QUICK | ({"l2_bytes": 64 << 10} if dev.type == "cpu" else {})) if args.quick else {}
    decode(table, dev, Budget(args.budget_s), **sizes)
    note = " (--quick: tiny sizes; verdicts are meaningless here)" if args.quick else ""
    return report(table, f"decode on {name}{note}", args.json)


def selfcheck(args) -> int:
    """Every section on the CPU at small sizes: proves the script's own code where no GPU is at hand."""
    dev = torch.device("cpu")
    budget = Budget(600)
    table = Table()
    core(table, dev, budget, shapes=[(1, 64), (2, 256)])
    weights(table, dev, budget, shapes=[(1, 64), (2, 256)])
    decode(table, dev, budget, **QUICK)
    ceilings = paths(table, dev, budget, secs=0.5, batches=(2, 8))
    service(table, "cpu", True, ceilings, 2.0, budget, concs=(4, 16))
    return report(table, "selfcheck on the CPU (timings of a CPU; verdicts are meaningless here)", None)


if __name__ == "__main__":
    sys.exit(main())
