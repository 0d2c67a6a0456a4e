"""Checks that docker/ci.sh runs against the containers, from the host (loopback only).

    ci_check.py make-checkpoint PATH
    ci_check.py wait URL [--timeout S]
    ci_check.py single URL --checkpoint PATH --replica ID
    ci_check.py compose URL --checkpoint PATH --replicas N --stop CONTAINER_ID

The expected answers come from the same checkpoint through mha_core on the host, so a pass means
the image serves exactly the model the file holds.
"""

from __future__ import annotations

import argparse
import base64
import collections
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import torch

import mha_core
from mha_core import MHAConfig, MultiHeadAttention

# Small enough that a 2-core CI machine answers hundreds of requests in seconds.
CONFIG = MHAConfig(num_heads=4, emb_size=64, head_size=16, max_seq_len=128)
SEED = 20261126
ATOL, RTOL = 1e-5, 1e-4


def fail(msg: str) -> None:
    print(f"FAIL: {msg}", file=sys.stderr, flush=True)
    sys.exit(1)


def make_checkpoint(path: str) -> None:
    module = MultiHeadAttention.from_seed(CONFIG, SEED)
    print(f"checkpoint {path}: {mha_core.save_checkpoint(module, path)}")


def wait(url: str, timeout: float) -> None:
    deadline, last = time.monotonic() + timeout, "no answer"
    t0 = time.monotonic()
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"{url}/readyz", timeout=2)
            if r.status_code == 200:
                print(f"ready after {time.monotonic() - t0:.1f}s: {url}/readyz -> 200")
                return
            last = f"{r.status_code} {r.text[:200]}"
        except httpx.HTTPError as e:
            last = repr(e)
        time.sleep(0.5)
    fail(f"{url}/readyz not ready within {timeout:.0f}s (last: {last})")


class Cases:
    """Inputs with the outputs the checkpoint gives locally."""

    def __init__(self, checkpoint: str, n: int = 16) -> None:
        self.module = mha_core.load_checkpoint(checkpoint)
        self.checksum = mha_core.checksum(self.module)
        rng = np.random.default_rng(7)
        self.inputs, self.expected = [], []
        for i in range(n):
            B, T = 1 + i % 3, 4 + (5 * i) % 29
            x = rng.standard_normal((B, T, CONFIG.emb_size), dtype=np.float32)
            with torch.no_grad():
                y = self.module(torch.from_numpy(x)).output.numpy()
            self.inputs.append(x)
            self.expected.append(y)

    def body(self, i: int, encoding: str = "lists") -> dict:
        x = self.inputs[i % len(self.inputs)]
        if encoding == "lists":
            return {"x": x.tolist()}
        return {"x": {"dtype": "float32", "shape": list(x.shape), "b64": base64.b64encode(x.tobytes()).decode()}}

    def check(self, i: int, response: httpx.Response) -> str | None:
        """None when the answer is right, else what is wrong."""
        if response.status_code != 200:
            return f"HTTP {response.status_code}: {response.text[:200]}"
        out = response.json()["output"]
        if isinstance(out, dict):
            got = np.frombuffer(base64.b64decode(out["b64"]), dtype="<f4").reshape(out["shape"])
        else:
            got = np.asarray(out, dtype=np.float32)
        want = self.expected[i % len(self.expected)]
        if got.shape != want.shape:
            return f"shape {got.shape} != {want.shape}"
        if not np.allclose(got, want, atol=ATOL, rtol=RTOL):
            return f"max |diff| {np.abs(got - want).max():.3g} over atol {ATOL}"
        return None


def single(url: str, checkpoint: str, replica: str) -> None:
    cases = Cases(checkpoint)
    with httpx.Client(base_url=url, timeout=30) as c:
        for path in ("/healthz", "/readyz"):
            r = c.get(path)
            if r.status_code != 200:
                fail(f"GET {path} -> {r.status_code}")
        info = c.get("/v1/model").json()
        if info["checksum"] != cases.checksum:
            fail(f"/v1/model checksum {info['checksum']} != local {cases.checksum}")
        for key in ("num_heads", "emb_size", "head_size", "max_seq_len"):
            if info[key] != getattr(CONFIG, key):
                fail(f"/v1/model {key}={info[key]}, checkpoint has {getattr(CONFIG, key)}")
        served = set()
        n = 0
        for encoding in ("lists", "base64"):
            for i in range(len(cases.inputs)):
                r = c.post("/attend", json=cases.body(i, encoding))
                err = cases.check(i, r)
                if err:
                    fail(f"/attend case {i} ({encoding}): {err}")
                served.add(r.headers.get("x-served-by"))
                n += 1
        if served != {replica}:
            fail(f"x-served-by {served} != {{{replica!r}}}")
    print(
        f"single: /healthz /readyz 200; /v1/model checksum = local {cases.checksum[:19]}...; "
        f"/attend {n}/{n} equal to mha_core on the same checkpoint (lists and base64, atol {ATOL}); "
        f"x-served-by={replica}"
    )


def _load(
    c: httpx.Client, cases: Cases, n: int, workers: int, deadline: float, on_progress=None, enough=None
) -> tuple[list[tuple[int, str | None, str | None, str, float]], int]:
    """Up to n requests, until the deadline or enough(results) -> ([(i, replica, error, upstreams,
    t_done)], how many of the n were not sent)."""
    results, lock, counter = [], threading.Lock(), iter(range(n))

    def worker() -> None:
        while True:
            with lock:
                i = next(counter, None)
                stop = enough is not None and enough(results)
            if i is None or stop or time.monotonic() > deadline:
                return
            try:
                r = c.post("/attend", json=cases.body(i))
                row = (i, r.headers.get("x-served-by"), cases.check(i, r), r.headers.get("x-upstream-addr", ""))
            except httpx.HTTPError as e:
                row = (i, None, repr(e), "")
            with lock:
                results.append((*row, time.monotonic()))
                done = len(results)
            if on_progress:
                on_progress(done)

    with ThreadPoolExecutor(workers) as pool:
        for _ in range(workers):
            pool.submit(worker)
    return results, (n - len(results)) if enough is None else 0


def compose(url: str, checkpoint: str, replicas: int, stop: str, n1: int, n2: int, workers: int) -> None:
    cases = Cases(checkpoint)
    limits = httpx.Limits(max_connections=workers, max_keepalive_connections=workers)
    with httpx.Client(base_url=url, timeout=60, limits=limits) as c:
        # 1. spread: every replica answers, and answers right
        t0 = time.monotonic()
        res, unsent = _load(c, cases, n1, workers, deadline=t0 + 120)
        by_replica = collections.Counter(r[1] for r in res if r[2] is None)
        errors = [r for r in res if r[2] is not None]
        print(
            f"compose phase 1 (spread): {len(res)} requests in {time.monotonic() - t0:.1f}s, "
            f"{len(by_replica)} replicas: "
            + ", ".join(f"{k}={v}" for k, v in sorted(by_replica.items()))
            + f"; failures={len(errors)}"
        )
        if errors or unsent:
            fail(f"phase 1: {len(errors)} failed, {unsent} not sent; first: {errors[:3]}")
        if len(by_replica) != replicas:
            fail(f"phase 1: requests reached {len(by_replica)} replicas, expected {replicas}")

        # 2. a replica stops (docker stop: SIGTERM, graceful) while requests flow
        stop_state: dict[str, float | str] = {}

        def stopper() -> None:
            stop_state["t_start"] = time.monotonic()
            p = subprocess.run(["docker", "stop", "-t", "30", stop], capture_output=True, text=True)
            stop_state["t_end"] = time.monotonic()
            stop_state["rc"] = p.returncode
            p = subprocess.run(
                ["docker", "inspect", "-f", "{{.State.ExitCode}} {{.Config.Hostname}}", stop],
                capture_output=True,
                text=True,
            )
            stop_state["exit"], stop_state["hostname"] = p.stdout.split()

        stop_thread = threading.Thread(target=stopper)
        trigger, min_after = 100, 100

        def progress(done: int) -> None:
            if done == trigger and not stop_thread.is_alive() and "t_start" not in stop_state:
                stop_thread.start()

        def enough(results: list) -> bool:
            # the stop is over and the survivor has answered plenty on its own since
            t_end = stop_state.get("t_end")
            if t_end is None:
                return False
            n = 0
            for r in reversed(results):  # appended in completion order
                if r[4] <= t_end:
                    break
                n += 1
            return n >= min_after

        t0 = time.monotonic()
        res, unsent = _load(c, cases, n2, workers, deadline=t0 + 150, on_progress=progress, enough=enough)
        if stop_thread.is_alive() or "t_start" in stop_state:
            stop_thread.join()
        if "t_end" not in stop_state:
            fail("phase 2: the replica was never stopped")
        stopped = stop_state["hostname"]
        errors = [r for r in res if r[2] is not None]
        before = collections.Counter(r[1] for r in res if r[2] is None and r[4] < stop_state["t_start"])
        during = collections.Counter(
            r[1] for r in res if r[2] is None and stop_state["t_start"] <= r[4] <= stop_state["t_end"]
        )
        after = collections.Counter(r[1] for r in res if r[2] is None and r[4] > stop_state["t_end"])
        retried = sum(1 for r in res if "," in r[3])
        http_errors = sum(1 for r in errors if r[2].startswith("HTTP"))
        transport_errors = sum(1 for r in errors if r[1] is None)

        def fmt(counter: collections.Counter) -> str:
            return ", ".join(f"{k}={v}" for k, v in sorted(counter.items())) or "none"

        print(
            f"compose phase 2 (docker stop {stopped} mid-stream): {len(res)} requests in "
            f"{time.monotonic() - t0:.1f}s; stop took {stop_state['t_end'] - stop_state['t_start']:.1f}s, "
            f"exit code {stop_state['exit']}\n"
            f"  before stop: {fmt(before)}\n  during stop: {fmt(during)}\n  after stop:  {fmt(after)}\n"
            f"  retried by the balancer: {retried}; failures={len(errors)} (HTTP errors {http_errors}, "
            f"transport errors {transport_errors}, wrong answers {len(errors) - http_errors - transport_errors})"
        )
        if errors or unsent:
            fail(f"phase 2: {len(errors)} failed, {unsent} not sent; first: {errors[:3]}")
        if stopped in after:
            fail(f"phase 2: the stopped replica {stopped} still answered after it exited")
        if sum(after.values()) < min_after:
            fail(f"phase 2: {sum(after.values())} requests completed after the stop, wanted {min_after}")
        if stop_state["rc"] != 0 or stop_state["exit"] != "0":
            fail(f"phase 2: docker stop rc={stop_state['rc']}, container exit code {stop_state['exit']} (want 0)")
    print("compose: OK")


def main() -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("make-checkpoint")
    s.add_argument("path")
    s = sub.add_parser("wait")
    s.add_argument("url")
    s.add_argument("--timeout", type=float, default=180)
    s = sub.add_parser("single")
    s.add_argument("url")
    s.add_argument("--checkpoint", required=True)
    s.add_argument("--replica", required=True)
    s = sub.add_parser("compose")
    s.add_argument("url")
    s.add_argument("--checkpoint", required=True)
    s.add_argument("--replicas", type=int, default=2)
    s.add_argument("--stop", required=True, help="id of the replica container to docker stop mid-stream")
    s.add_argument("--requests", type=int, default=200, help="phase 1 requests")
    s.add_argument("--stream", type=int, default=5000, help="most phase 2 requests")
    s.add_argument("--workers", type=int, default=8)
    a = p.parse_args()
    if a.cmd == "make-checkpoint":
        make_checkpoint(a.path)
    elif a.cmd == "wait":
        wait(a.url, a.timeout)
    elif a.cmd == "single":
        single(a.url, a.checkpoint, a.replica)
    else:
        compose(a.url, a.checkpoint, a.replicas, a.stop, a.requests, a.stream, a.workers)


if __name__ == "__main__":
    main()
