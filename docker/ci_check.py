"""Checks that docker/ci.sh runs against the containers, from the host (loopback only).

    ci_check.py make-checkpoint PATH
    ci_check.py wait URL [--timeout S]
    ci_check.py single URL --checkpoint PATH --replica ID
    ci_check.py compose URL --checkpoint PATH --replicas N --stop CONTAINER_ID [--sequences N --steps K]

The expected answers come from the same checkpoint through mha_core on the host, so a pass means
the image serves exactly the model the file holds. A sequence's expected rows are those of the causal
forward over the whole sequence so far, recomputed in float64: the replicas' KV caches must agree
with recomputing from scratch.
"""

from __future__ import annotations

import argparse
import base64
import collections
import copy
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
        return output_differs(response, self.expected[i % len(self.expected)])


def output_differs(response: httpx.Response, want: np.ndarray) -> str | None:
    """None when the 200 answer's output (base64 or lists) equals ``want`` within ATOL/RTOL, else how it differs."""
    out = response.json()["output"]
    if isinstance(out, dict):
        got = np.frombuffer(base64.b64decode(out["b64"]), dtype="<f4").reshape(out["shape"])
    else:
        got = np.asarray(out, dtype=np.float32)
    if got.shape != want.shape:
        return f"shape {got.shape} != {want.shape}"
    if not np.allclose(got, want, atol=ATOL, rtol=RTOL):
        return f"max |diff| {np.abs(got - want).max():.3g} over atol {ATOL}"
    return None


SEQUENCE_ERROR = "sequence_start_required"


class Sequences:
    """Sequences of steps, each with the rows the checkpoint gives for it: the causal forward over the
    whole sequence up to that step, in float64, its last t rows. The first step is a prompt of a few
    rows, later ones of one to three, all inside max_seq_len."""

    def __init__(self, module: MultiHeadAttention, n: int, steps: int, seed: int = 11) -> None:
        reference = copy.deepcopy(module).double()
        rng = np.random.default_rng(seed)
        # distinct ids: random uint64 (never 0), as mha_client draws them
        self.ids = [int(v) for v in rng.choice(2**62, size=n, replace=False) + 1]
        self.xs: list[list[np.ndarray]] = []
        self.ys: list[np.ndarray] = []  # the whole sequence's rows [1, T_total, E], float64
        for _ in range(n):
            ts = [int(rng.integers(1, 7))] + [int(t) for t in rng.integers(1, 4, size=steps - 1)]
            assert sum(ts) <= CONFIG.max_seq_len, ts
            xs = [rng.standard_normal((1, t, CONFIG.emb_size), dtype=np.float32) for t in ts]
            with torch.no_grad():
                y = reference(torch.from_numpy(np.concatenate(xs, axis=1)).double()).output.numpy()
            self.xs.append(xs)
            self.ys.append(y)

    def rows(self, s: int, k: int) -> tuple[int, int]:
        """[start, end) of step k of sequence s in the whole sequence."""
        start = sum(x.shape[1] for x in self.xs[s][:k])
        return start, start + self.xs[s][k].shape[1]

    def post(self, c: httpx.Client, s: int, k: int, *, start: bool, end: bool = False, replay: bool = False):
        """Step k of sequence s (replay: rows 0..k in one step, as a client does for a lost sequence)
        -> (response, the expected rows)."""
        x = np.concatenate(self.xs[s][: k + 1], axis=1) if replay else self.xs[s][k]
        lo, hi = self.rows(s, k)
        want = self.ys[s][:, 0 if replay else lo : hi]
        encoding = "base64" if k % 2 else "lists"  # both codecs, alternately
        body = {
            "x": x.tolist()
            if encoding == "lists"
            else {"dtype": "float32", "shape": list(x.shape), "b64": base64.b64encode(x.tobytes()).decode()},
            "sequence": {"id": self.ids[s], "start": start, "end": end},
        }
        r = c.post("/attend", json=body, headers={"x-mha-sequence-id": str(self.ids[s])})
        return r, want

    @staticmethod
    def check(r: httpx.Response, want: np.ndarray, sid: int) -> str | None:
        """None when the step's answer is right, else what is wrong."""
        if r.status_code != 200:
            return f"HTTP {r.status_code}: {r.text[:200]}"
        if r.headers.get("x-mha-sequence-id") != str(sid):
            return f"x-mha-sequence-id {r.headers.get('x-mha-sequence-id')!r} != {sid}"
        return output_differs(r, want)

    @staticmethod
    def error_type(r: httpx.Response) -> str | None:
        try:
            return r.json()["error"]["type"]
        except (ValueError, KeyError, TypeError):
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


def _sequences(c: httpx.Client, seqs: Sequences, steps: int, workers: int, deadline: float) -> dict[int, str]:
    """Every sequence's first `steps` steps in order, sequences side by side (so replicas batch steps of
    several) -> the replica that held each. Fails on any step that is not 200 and right, or a sequence
    whose steps reached two replicas."""
    t0 = time.monotonic()

    def run(s: int) -> tuple[set[str | None], str | None]:
        served: set[str | None] = set()
        for k in range(steps):
            if time.monotonic() > deadline:
                return served, f"step {k}: not sent before the deadline"
            try:
                r, want = seqs.post(c, s, k, start=k == 0)
            except httpx.HTTPError as e:
                return served, f"step {k}: {e!r}"
            served.add(r.headers.get("x-served-by"))
            err = seqs.check(r, want, seqs.ids[s])
            if err:
                return served, f"step {k}: {err}"
        return served, None

    with ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(run, range(len(seqs.ids))))
    failed = [(seqs.ids[s], err) for s, (_, err) in enumerate(results) if err]
    split = [(seqs.ids[s], served) for s, (served, _) in enumerate(results) if len(served) != 1]
    held = {s: next(iter(served)) for s, (served, _) in enumerate(results) if len(served) == 1}
    per_replica = collections.Counter(held.values())
    n = len(seqs.ids)
    print(
        f"compose sequences: {n} x {steps} steps in {time.monotonic() - t0:.1f}s; failed sequences={len(failed)}, "
        f"on two replicas={len(split)}; sequences per replica: "
        + ", ".join(f"{k}={v}" for k, v in sorted(per_replica.items(), key=str))
    )
    if failed:
        fail(f"sequences: {len(failed)} of {n} failed; first: {failed[:3]}")
    if split:
        fail(f"sequences: {len(split)} sequences reached several replicas (x-served-by); first: {split[:3]}")
    print(f"  every step 200 and equal to the float64 reference (atol {ATOL}); each sequence on one replica")
    return held


def _sequences_after_stop(
    c: httpx.Client, seqs: Sequences, step: int, held: dict[int, str], stopped: str, workers: int
) -> None:
    """The next step of every sequence, without start: the survivor's sequences go on (200, right, same
    replica); the stopped replica's get the start-required 400 from the survivor, never an answer, and
    a replay of their prefix with start is right again."""

    def run(s: int) -> str | None:
        sid, survivor_held = seqs.ids[s], held[s] != stopped
        try:
            r, want = seqs.post(c, s, step, start=False, end=True)
            by = r.headers.get("x-served-by")
            if survivor_held:
                err = seqs.check(r, want, sid)
                if err or by != held[s]:
                    return f"kept {sid}: {err or f'served by {by}, held by {held[s]}'}"
                return None
            if r.status_code != 400 or Sequences.error_type(r) != SEQUENCE_ERROR:
                return f"lost {sid}: HTTP {r.status_code} {r.text[:200]} (want 400 {SEQUENCE_ERROR})"
            if by == stopped:
                return f"lost {sid}: answered by the stopped replica {stopped}"
            r, want = seqs.post(c, s, step, start=True, end=True, replay=True)
            err = seqs.check(r, want, sid)
            by = r.headers.get("x-served-by")
            if err or by == stopped:
                return f"replayed {sid}: {err or f'served by the stopped replica {by}'}"
        except httpx.HTTPError as e:
            return f"{sid}: {e!r}"
        return None

    t0 = time.monotonic()
    with ThreadPoolExecutor(workers) as pool:
        errors = [e for e in pool.map(run, range(len(seqs.ids))) if e]
    lost = sum(1 for r in held.values() if r == stopped)
    print(
        f"compose sequences after the stop ({time.monotonic() - t0:.1f}s): {len(held) - lost} kept on the survivor "
        f"(next step 200 and right), {lost} lost with {stopped} (400 {SEQUENCE_ERROR}, then replayed with start "
        f"and right); failures={len(errors)}"
    )
    if errors:
        fail(f"sequences after the stop: {len(errors)} failed; first: {errors[:3]}")
    if lost == 0 or lost == len(held):
        fail(f"sequences after the stop: the stopped replica held {lost} of {len(held)} sequences (want some, not all)")


def compose(
    url: str, checkpoint: str, replicas: int, stop: str, n1: int, n2: int, workers: int, n_seq: int, steps: int
) -> None:
    cases = Cases(checkpoint)
    # one step more than the run: the step each sequence sends after the stop
    seqs = Sequences(cases.module, n_seq, steps + 1)
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

        # 1b. sequences: each stays on one replica (nginx hashes x-mha-sequence-id), every step right
        held = _sequences(c, seqs, steps, workers, deadline=time.monotonic() + 180)
        if len(set(held.values())) != replicas:
            fail(f"sequences: held by {len(set(held.values()))} replicas, expected {replicas}")

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

        # 3. the sequences the stopped replica held are lost, visibly; the others go on
        _sequences_after_stop(c, seqs, steps, held, stopped, workers)
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
    s.add_argument("--sequences", type=int, default=50, help="sequences stepped through the balancer")
    s.add_argument("--steps", type=int, default=20, help="steps of each sequence before the stop")
    a = p.parse_args()
    if a.cmd == "make-checkpoint":
        make_checkpoint(a.path)
    elif a.cmd == "wait":
        wait(a.url, a.timeout)
    elif a.cmd == "single":
        single(a.url, a.checkpoint, a.replica)
    else:
        compose(a.url, a.checkpoint, a.replicas, a.stop, a.requests, a.stream, a.workers, a.sequences, a.steps)


if __name__ == "__main__":
    main()
