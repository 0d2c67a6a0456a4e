"""MHA_WORKERS=2: front-end processes feed one model process (service/engine/); promises across the boundary."""

from __future__ import annotations

import asyncio
import contextlib
import glob
import json
import os
import re
import signal
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from .conftest import builtin_model, start_server

WORKERS = {"MHA_WORKERS": "2", "MHA_FAULT_INJECTION": "true"}
X = [[[0.25] * 32] * 4]  # one sequence of 4 tokens


def pids(server) -> tuple[int, list[int]]:
    """(model process, live front ends) from the server's log and /proc."""
    log = server.log()
    engine = int(re.search(r"model process (\d+) starting", log).group(1))
    fronts = [int(p) for p in re.findall(r"front end (\d+) connected", log)]
    return engine, [p for p in fronts if os.path.exists(f"/proc/{p}") and _alive(p)]


def all_connected(server, n: int = int(WORKERS["MHA_WORKERS"])) -> None:
    """Wait until ``n`` front ends have connected to the model process: /readyz is 200 as soon as the first one
    has, and a test that looks at all of them must not race the others' start."""
    until = time.monotonic() + 30
    while len(pids(server)[1]) < n:
        assert time.monotonic() < until, server.log()[-3000:]
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(") ")[1][0] != "Z"


def children(pid: int) -> list[int]:
    out = []
    for t in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{t}/children") as f:
            out += [int(k) for k in f.read().split()]
    return out


def metric(text: str, name: str) -> float:
    """The sum of the samples named exactly ``name`` over all their labels (not a longer name that starts so)."""
    from prometheus_client.parser import text_string_to_metric_families

    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples if s.name == name)


def sample(text: str, name: str, labels: str) -> float:
    m = re.search(rf"^{re.escape(name)}\{{{re.escape(labels)}\}} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


@pytest.fixture
def procs(tmp_path):
    """The service with 2 front ends, both connected to the model process."""
    s = start_server(tmp_path, WORKERS)
    try:
        all_connected(s)
        yield s
    finally:
        s.stop(signal.SIGKILL)


def test_front_ends_import_no_torch_and_answer_the_module(procs):
    engine, fronts = pids(procs)
    assert len(fronts) == 2, procs.log()
    mha = builtin_model()
    xs = [np.random.default_rng(i).standard_normal((1, 3 + i, 32)).astype(np.float32) for i in range(16)]

    async def go():
        async with httpx.AsyncClient(base_url=procs.url, timeout=30) as c:
            return await asyncio.gather(*(c.post("/attend", json={"x": x.tolist()}) for x in xs))

    for x, r in zip(xs, asyncio.run(go()), strict=True):
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(np.array(r.json()["output"]), mha(torch.from_numpy(x)).output.numpy(), atol=1e-5)
    rss = {}
    for pid in [engine, *fronts]:
        with open(f"/proc/{pid}/maps") as f:
            maps = f.read()
        with open(f"/proc/{pid}/status") as f:
            rss[pid] = int(re.search(r"VmRSS:\s+(\d+) kB", f.read()).group(1)) // 1024
        assert ("libtorch" in maps) == (pid == engine), f"process {pid} (model process {engine})"
    print(f"resident MiB: model process {rss[engine]}, front ends {[rss[p] for p in fronts]}")


def test_v2_and_grpc_go_through_the_model_process(procs):
    import tritonclient.grpc as grpcclient

    x = np.random.default_rng(0).standard_normal((1, 5, 32)).astype(np.float32)
    mha = builtin_model()
    want = mha(torch.from_numpy(x)).output.numpy()
    body = {"inputs": [{"name": "x", "shape": [1, 5, 32], "datatype": "FP32", "data": x.ravel().tolist()}]}
    r = httpx.post(procs.url + "/v2/models/mha/infer", json=body, timeout=30)
    assert r.status_code == 200, r.text
    out = next(o for o in r.json()["outputs"] if o["name"] == "output")
    np.testing.assert_allclose(np.array(out["data"]).reshape(1, 5, 32), want, atol=1e-5)
    import tritonclient.http as httpclient

    hc = httpclient.InferenceServerClient(procs.url.removeprefix("http://"))
    hin = httpclient.InferInput("x", [1, 5, 32], "FP32")
    hin.set_data_from_numpy(x, binary_data=True)  # the v2 binary extension: raw bytes after the JSON header
    res = hc.infer("mha", [hin], outputs=[httpclient.InferRequestedOutput("output", binary_data=True)])
    np.testing.assert_allclose(res.as_numpy("output"), want, atol=1e-5)
    hc.close()
    for _ in range(4):  # each connection may land on either front end: both serve gRPC on the one port
        client = grpcclient.InferenceServerClient(procs.grpc_url)
        inp = grpcclient.InferInput("x", [1, 5, 32], "FP32")
        inp.set_data_from_numpy(x)
        res = client.infer("mha", [inp], outputs=[grpcclient.InferRequestedOutput("output")])
        np.testing.assert_allclose(res.as_numpy("output"), want, atol=1e-5)
        client.close()


def test_overload_deadline_fault_and_request_ids_cross_the_boundary(tmp_path):
    s = start_server(tmp_path, {**WORKERS, "MHA_MAX_QUEUE_REQUESTS": "2", "MHA_MAX_BATCH_SIZE": "1"})
    try:

        async def go():
            async with httpx.AsyncClient(base_url=s.url, timeout=30) as c:
                stall = {"x-mha-fault": "stall:800"}
                busy = [asyncio.create_task(c.post("/attend", json={"x": X}, headers=stall)) for _ in range(6)]
                await asyncio.sleep(0.3)  # all six submitted: one computing, two queued, three refused
                late = await c.post("/attend", json={"x": X, "timeout_ms": 200})
                rs = await asyncio.gather(*busy)
                fault = await c.post("/attend", json={"x": X}, headers={"x-mha-fault": "raise", "x-request-id": "r-42"})
                ok = await c.post("/attend", json={"x": X})
                return rs, late, fault, ok

        rs, late, fault, ok = asyncio.run(go())
        statuses = sorted(r.status_code for r in rs)
        assert 429 in statuses and 200 in statuses, statuses  # the model process's queue bound (1 running + 2)
        for r in rs:
            if r.status_code == 429:
                assert int(r.headers["retry-after"]) >= 1 and r.json()["error"]["type"] == "overloaded"
        assert late.status_code in (429, 504), late.text
        if late.status_code == 504:
            assert late.json()["error"]["type"] == "deadline_exceeded"
        assert fault.status_code == 500 and fault.json()["error"]["type"] == "internal_error", fault.text
        assert fault.headers["x-request-id"] == "r-42"
        assert ok.status_code == 200
        log = s.log()
        # the model process logged the failure with the front end's request id
        lines = [json.loads(ln) for ln in log.splitlines() if ln.startswith("{")]
        assert any(ln["logger"] == "mha_serve.engine" and ln.get("request_id") == "r-42" for ln in lines), log[-3000:]
    finally:
        s.stop(signal.SIGKILL)


def test_deadline_is_kept_by_the_model_process(procs):
    t0 = time.monotonic()
    r = httpx.post(
        procs.url + "/attend", json={"x": X, "timeout_ms": 300}, headers={"x-mha-fault": "stall:1500"}, timeout=30
    )
    assert r.status_code == 504 and r.json()["error"]["type"] == "deadline_exceeded", r.text
    assert time.monotonic() - t0 < 1.2


def test_a_client_that_leaves_is_never_computed_and_metrics_add_up(procs):
    async def go():
        async with httpx.AsyncClient(base_url=procs.url, timeout=30) as c:
            hold = asyncio.create_task(c.post("/attend", json={"x": X}, headers={"x-mha-fault": "stall:1200"}))
            await asyncio.sleep(0.3)
            async with httpx.AsyncClient(base_url=procs.url, timeout=0.3) as quick:
                with pytest.raises(httpx.ReadTimeout):  # leaves while queued behind the stalled batch
                    await quick.post("/attend", json={"x": [[[0.5] * 32] * 7]})
            await hold
            n = 40
            rs = await asyncio.gather(*(c.post("/attend", json={"x": X}) for _ in range(n)))  # across both workers
            assert all(r.status_code == 200 for r in rs)
            await asyncio.sleep(0.5)
            return n, (await c.get("/metrics")).text

    n, text = asyncio.run(go())
    assert sample(text, "mha_requests_total", 'route="/attend",status="200"') == n + 1, text
    assert sample(text, "mha_requests_dropped_total", 'reason="disconnect"') == 1, text
    # computed: the held request and the n others, 4 tokens each; never the 7 tokens of the one that left
    assert sample(text, "mha_tokens_total", 'kind="real"') == 4 * (n + 1), text
    assert metric(text, "mha_requests_in_flight") == 0  # summed over the live front ends (a scrape is not one)


def test_readyz_and_503_at_once_when_the_model_process_dies_and_the_service_exits_1(procs):
    engine, _ = pids(procs)

    async def go():
        async with httpx.AsyncClient(base_url=procs.url, timeout=30) as c:
            stall = {"x-mha-fault": "stall:3000"}
            tasks = [asyncio.create_task(c.post("/attend", json={"x": X}, headers=stall)) for _ in range(12)]
            await asyncio.sleep(0.5)
            t0 = time.monotonic()
            os.kill(engine, signal.SIGKILL)
            rs = await asyncio.gather(*tasks, return_exceptions=True)
            answered = time.monotonic() - t0
            try:
                ready = (await c.get("/readyz")).status_code
            except httpx.TransportError:  # the front ends are already stopping
                ready = "closed"
            return rs, answered, ready

    rs, answered, ready = asyncio.run(go())
    statuses = [r.status_code if isinstance(r, httpx.Response) else repr(r) for r in rs]
    assert statuses == [503] * 12, statuses  # every request accounted for: all answered 503
    assert answered < 1.0, answered  # at once, not after the stall or a timeout
    assert all(r.json()["error"]["type"] == "unavailable" for r in rs)
    assert ready in (503, "closed"), ready
    assert procs.proc.wait(20) == 1, procs.log()[-3000:]


def test_a_dead_front_end_is_replaced_and_the_other_keeps_serving(procs):
    _, fronts = pids(procs)
    victim = fronts[0]
    kids = children(victim)

    async def go():
        results = []
        limits = httpx.Limits(max_keepalive_connections=0)  # a fresh connection each: both workers get some
        async with httpx.AsyncClient(base_url=procs.url, timeout=10, limits=limits) as c:

            async def one():
                try:
                    r = await c.post("/attend", json={"x": X}, headers={"x-mha-fault": "stall:20"})
                    results.append(r.status_code)
                except httpx.TransportError as e:
                    results.append(type(e).__name__)

            async def kill_soon():
                await asyncio.sleep(0.7)
                os.kill(victim, signal.SIGKILL)  # while requests are in flight on both workers

            killer = asyncio.create_task(kill_soon())
            t0 = time.monotonic()
            while time.monotonic() - t0 < 4:
                await asyncio.gather(*(one() for _ in range(8)))
            await killer
            return results

    results = asyncio.run(go())
    ok = results.count(200)
    lost = [r for r in results if r != 200]
    print(f"{len(results)} requests: {ok} answered 200, {len(lost)} cut off with the killed front end: {set(lost)}")
    assert all(r in ("RemoteProtocolError", "ReadError", "ConnectError") for r in lost), lost
    assert len(lost) <= 8, lost  # at most those on the killed worker's connections at that moment
    assert ok >= len(results) - 8
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # uvicorn's supervisor starts a replacement
        _, now = pids(procs)
        if len(now) == 2 and victim not in now:
            break
        time.sleep(0.2)
    assert len(now) == 2 and victim not in now, procs.log()[-3000:]
    assert httpx.post(procs.url + "/attend", json={"x": X}, timeout=10).status_code == 200
    assert kids and not any(os.path.exists(f"/proc/{k}") and _alive(k) for k in kids), kids  # its decode process


def test_sigterm_drains_every_process_and_exits_0(tmp_path):
    grace = 3.0
    s = start_server(tmp_path, {**WORKERS, "MHA_SHUTDOWN_GRACE_S": str(grace)})
    all_connected(s)
    engine, fronts = pids(s)
    trackers = [k for k in children(s.proc.pid) if b"resource_tracker" in Path(f"/proc/{k}/cmdline").read_bytes()]
    assert trackers  # multiprocessing's resource tracker, shared by every spawned process (the decode pools too)

    async def go():
        async with httpx.AsyncClient(base_url=s.url, timeout=30) as c:
            tasks = [
                asyncio.create_task(c.post("/attend", json={"x": X}, headers={"x-mha-fault": "stall:400"}))
                for _ in range(3)
            ]
            await asyncio.sleep(0.3)
            t0 = time.monotonic()
            s.proc.send_signal(signal.SIGTERM)
            rs = await asyncio.gather(*tasks, return_exceptions=True)
            code = await asyncio.to_thread(s.proc.wait, 30)
            return rs, code, time.monotonic() - t0

    rs, code, took = asyncio.run(go())
    assert [getattr(r, "status_code", r) for r in rs] == [200] * 3  # accepted work finished during the grace
    assert code == 0, s.log()[-3000:]
    assert took <= grace + 2.0, took
    for pid in [engine, *fronts]:
        assert not os.path.exists(f"/proc/{pid}") or not _alive(pid), pid
    assert "model process stopped" in s.log()
    until = time.monotonic() + 10  # the tracker ends once the last process that shares it has: then it reports
    while time.monotonic() < until and any(os.path.exists(f"/proc/{k}") and _alive(k) for k in trackers):
        time.sleep(0.05)
    assert "leaked" not in s.log(), s.log()[-2000:]  # every semaphore a front end made was unlinked as it drained


def test_engine_process_with_one_worker_keeps_torch_out_of_the_front_end(tmp_path):
    s = start_server(tmp_path, {"MHA_WORKERS": "1", "MHA_ENGINE": "process", "MHA_GRPC_PORT": "0"})
    try:
        _, fronts = pids(s)
        assert len(fronts) == 1
        with open(f"/proc/{fronts[0]}/maps") as f:
            assert "libtorch" not in f.read()
        r = httpx.post(s.url + "/attend", json={"x": X}, timeout=30)
        assert r.status_code == 200 and np.array(r.json()["output"]).shape == (1, 4, 32)
    finally:
        assert s.stop() == 0


def _served_by(front: int, status: str | None = None) -> float:
    """/attend requests this front end answered (with ``status``, or any), from its own file of Prometheus'
    multiprocess values: which front end answered is not in a response."""
    from prometheus_client.mmap_dict import MmapedDict

    # (not from /proc/PID/environ: setproctitle writes the title over the environment's memory)
    found = glob.glob(os.path.join(tempfile.gettempdir(), "mha-serve-*", "metrics", f"counter_{front}.db"))
    path = found[0] if found else ""
    if not os.path.exists(path):
        return 0.0
    total = 0.0
    for key, value, *_ in MmapedDict.read_all_values_from_file(path):
        _, name, labels, _ = json.loads(key)
        if name == "mha_requests_total" and labels.get("route") == "/attend" and status in (None, labels["status"]):
            total += value
    return total


def test_triton_statistics_are_the_services_totals_whichever_front_end_answers(procs):
    import tritonclient.grpc as grpcclient

    _, fronts = pids(procs)
    assert len(fronts) == 2
    x2 = [[[0.25] * 32] * 4] * 2  # two sequences a request
    sent = 0

    async def burst():
        async def one():  # a new connection each: either front end may accept it
            async with httpx.AsyncClient(base_url=procs.url, timeout=30) as c:
                return await c.post("/attend", json={"x": x2})

        return await asyncio.gather(*(one() for _ in range(6)))

    for _ in range(20):  # until both front ends answered some
        rs = asyncio.run(burst())
        assert all(r.status_code == 200 for r in rs), [r.text for r in rs]
        sent += len(rs)
        if all(_served_by(f) > 0 for f in fronts):
            break
    served = [_served_by(f) for f in fronts]
    assert all(n > 0 for n in served) and sum(served) == sent, served
    bad = httpx.post(procs.url + "/attend", json={"x": [[[0.25] * 31]]}, timeout=30)  # wrong E: one failure
    assert bad.status_code == 422

    text = httpx.get(procs.url + "/metrics", timeout=10).text
    batches = metric(text, "mha_batch_size_sequences_count")
    sequences = metric(text, "mha_batch_size_sequences_sum")
    assert "mha_triton_stats" not in text  # the shared statistics are not metrics
    assert sequences == 2 * sent and 1 <= batches <= sent, (sequences, batches)
    for _ in range(4):  # a new connection each: both front ends answer the same totals
        got = httpx.get(procs.url + "/v2/models/mha/stats", timeout=10).json()["model_stats"][0]
        inf = got["inference_stats"]
        assert inf["success"]["count"] == sent and inf["fail"]["count"] == 1, (served, got)
        assert got["inference_count"] == 2 * sent and got["execution_count"] == batches, (served, got)
        for phase in ("queue", "compute_input", "compute_infer", "compute_output"):
            assert inf[phase]["count"] == sent and inf[phase]["ns"] > 0, phase
        assert inf["success"]["ns"] > inf["compute_infer"]["ns"] // sent
        sizes = {b["batch_size"]: b["compute_infer"]["count"] for b in got["batch_stats"]}
        assert sum(sizes.values()) == batches and sum(k * v for k, v in sizes.items()) == sequences, sizes
        assert got["last_inference"] > 1_700_000_000_000
    for _ in range(2):  # gRPC's ModelStatistics: the same totals
        client = grpcclient.InferenceServerClient(procs.grpc_url)
        g = client.get_inference_statistics("mha", as_json=True)["model_stats"][0]
        client.close()
        assert int(g["inference_count"]) == 2 * sent and int(g["execution_count"]) == batches, g


def test_a_hung_model_process_is_killed_and_the_service_exits_1(tmp_path):
    hang_s, grace = 2.0, 2.0
    s = start_server(tmp_path, {**WORKERS, "MHA_ENGINE_HANG_S": str(hang_s), "MHA_SHUTDOWN_GRACE_S": str(grace)})
    engine, _ = pids(s)
    try:

        async def go():
            async with httpx.AsyncClient(base_url=s.url, timeout=30) as c:
                assert (await c.post("/attend", json={"x": X})).status_code == 200
                os.kill(engine, signal.SIGSTOP)  # alive, but silent: a hang, not a crash
                t0 = time.monotonic()
                rs = await asyncio.gather(*(c.post("/attend", json={"x": X}) for _ in range(4)), return_exceptions=True)
                answered = time.monotonic() - t0
                code = await asyncio.to_thread(s.proc.wait, 30)
                return rs, answered, code, time.monotonic() - t0

        rs, answered, code, exited = asyncio.run(go())
        print(f"hung model process: 503s after {answered:.2f} s, the service exited {code} after {exited:.2f} s")
        statuses = [r.status_code if isinstance(r, httpx.Response) else repr(r) for r in rs]
        assert statuses == [503] * 4, statuses  # pending requests: 503, never a hang
        assert all(r.json()["error"]["type"] == "unavailable" for r in rs)
        assert answered < hang_s + 1.0, answered  # at the latest once the parent killed it
        assert code == 1, s.log()[-3000:]
        assert exited < hang_s + grace + 3.0, exited
        assert "has not answered for" in s.log()
        assert not os.path.exists(f"/proc/{engine}") or not _alive(engine)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(engine, signal.SIGCONT)
        s.stop(signal.SIGKILL)


def test_a_stall_shorter_than_the_hang_bound_answers_503_then_serves_again(tmp_path):
    """The model process silent past the front ends' LOST_AFTER_S but back before MHA_ENGINE_HANG_S: 503 while it
    is silent, then every front end serves again (not 503 for ever beside a model process that is fine)."""
    from service.engine.client import LOST_AFTER_S

    s = start_server(tmp_path, {**WORKERS, "MHA_ENGINE_HANG_S": str(LOST_AFTER_S + 6)})
    engine, _ = pids(s)
    try:
        assert httpx.post(s.url + "/attend", json={"x": X}, timeout=10).status_code == 200
        os.kill(engine, signal.SIGSTOP)
        try:
            time.sleep(LOST_AFTER_S + 1.0)
            during = [httpx.post(s.url + "/attend", json={"x": X}, timeout=10) for _ in range(4)]
        finally:
            os.kill(engine, signal.SIGCONT)
        assert [r.status_code for r in during] == [503] * 4, [r.text for r in during]
        assert all(r.json()["error"]["type"] == "unavailable" for r in during)
        _, fronts = pids(s)
        assert len(fronts) == 2, s.log()[-3000:]
        before = {f: _served_by(f, "200") for f in fronts}

        async def burst():  # a new connection each: either front end may accept it
            async def one():
                async with httpx.AsyncClient(base_url=s.url, timeout=10) as c:
                    return (await c.post("/attend", json={"x": X})).status_code

            return await asyncio.gather(*(one() for _ in range(6)))

        seen: list[int] = []
        deadline = time.monotonic() + 15
        while not all(_served_by(f, "200") > before[f] for f in fronts):  # until EACH front end answered a 200
            assert time.monotonic() < deadline, (seen, {f: _served_by(f, "200") - before[f] for f in fronts})
            seen += asyncio.run(burst())
            assert set(seen) <= {200, 503}, seen  # a front end that has not heard it again yet: 503
            time.sleep(0.05)
        after = [httpx.post(s.url + "/attend", json={"x": X}, timeout=10) for _ in range(6)]  # a connection each
        assert [r.status_code for r in after] == [200] * 6, [r.text for r in after]
        want = after[0].json()["output"]
        assert all(r.json()["output"] == want for r in after)  # the same answer from either front end
        assert s.proc.poll() is None and "answers again" in s.log()
    finally:
        assert s.stop() == 0


@pytest.mark.parametrize("workers", ["1", "2"], ids=["one_process", "split"])
def test_a_forward_past_the_hang_bound_turns_readyz_503_and_exits_non_zero(tmp_path, workers):
    """A forward shorter than MHA_FORWARD_HANG_S (longer than the front ends' LOST_AFTER_S too) is answered and
    trips nothing; one longer is a hang: /readyz 503 at once, then the service exits non-zero, in both modes."""
    from service.engine.client import LOST_AFTER_S
    from service.engine.liveness import HUNG_EXIT

    hang_s = LOST_AFTER_S + 2.0
    s = start_server(tmp_path, {**WORKERS, "MHA_WORKERS": workers, "MHA_FORWARD_HANG_S": str(hang_s)})
    try:
        short = {"x-mha-fault": f"stall:{int((LOST_AFTER_S + 0.5) * 1000)}"}
        r = httpx.post(s.url + "/attend", json={"x": X}, headers=short, timeout=30)
        assert r.status_code == 200, r.text
        assert httpx.get(s.url + "/readyz", timeout=5).status_code == 200
        assert s.proc.poll() is None and "hung" not in s.log()
        with open(f"/proc/{s.proc.pid}/cmdline", "rb") as f:  # ps tells the server from its helpers
            assert f.read().split(b"\0")[0] == (b"mha-serve" if workers == "1" else b"mha-serve: supervisor")

        async def go():
            async with httpx.AsyncClient(base_url=s.url, timeout=30) as c:
                stall = {"x-mha-fault": f"stall:{int((hang_s + 10) * 1000)}"}
                stuck = asyncio.create_task(c.post("/attend", json={"x": X}, headers=stall))
                t0 = time.monotonic()
                ready = None
                while ready is None and time.monotonic() - t0 < hang_s + 5:
                    try:
                        if (await c.get("/readyz", timeout=2)).status_code == 503:
                            ready = 503
                    except httpx.TransportError:  # (split: the front ends may already be stopping)
                        ready = "closed"
                    await asyncio.sleep(0.05)
                seen = time.monotonic() - t0
                code = await asyncio.to_thread(s.proc.wait, 20)
                (answer,) = await asyncio.gather(stuck, return_exceptions=True)
                return ready, seen, code, time.monotonic() - t0, answer

        ready, seen, code, exited, answer = asyncio.run(go())
        print(f"workers={workers}: /readyz {ready} after {seen:.2f} s, exit {code} after {exited:.2f} s")
        assert ready == 503 if workers == "1" else ready in (503, "closed"), ready
        assert hang_s - 0.2 <= seen < hang_s + 2.0, seen  # once the bound passed, at once
        assert code == (HUNG_EXIT if workers == "1" else 1), s.log()[-3000:]  # the orchestrator restarts it
        assert exited < hang_s + 8.0, exited  # not after the stall
        if isinstance(answer, httpx.Response):  # (one process: cut off by the exit)
            assert answer.status_code == 503 and answer.json()["error"]["type"] == "unavailable", answer.text
        assert "hung: a forward pass has run for" in s.log()
    finally:
        s.stop(signal.SIGKILL)


def test_each_process_is_titled(procs):
    engine, fronts = pids(procs)

    def cmdline(pid: int) -> list[bytes]:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().split(b"\0")

    def title(pid: int) -> str:
        return cmdline(pid)[0].decode()

    def decode() -> list[int]:  # (multiprocessing's resource tracker, a child too, is not ours to title)
        return [k for f in fronts for k in children(f) if not any(b"resource_tracker" in a for a in cmdline(k))]

    # a decode process takes its title in the pool's initializer, a moment after it is spawned
    until = time.monotonic() + 10
    while time.monotonic() < until and not (decode() and all(title(k) == "mha-serve: decode" for k in decode())):
        time.sleep(0.05)

    assert title(procs.proc.pid) == "mha-serve: supervisor"
    assert title(engine) == "mha-serve: model"
    assert sorted(title(f) for f in fronts) == ["mha-serve: front 1", "mha-serve: front 2"]
    assert decode() and all(title(k) == "mha-serve: decode" for k in decode()), [title(k) for k in decode()]

    def threads(pid: int) -> list[str]:  # the OS names of its threads (top -H, ps -L)
        names = []
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(FileNotFoundError), open(f"/proc/{pid}/task/{tid}/comm") as f:
                names.append(f.read().strip())
        return names

    # the model process's own threads carry their names (and no transport thread is among them: service/channel.py)
    assert {"mha-forward-0", "mha-watchdog", "mha-log-flush"} <= set(threads(engine)), threads(engine)
    assert not any(n.startswith("ZMQ") for n in threads(engine)), threads(engine)
    assert "mha-supervise" in threads(procs.proc.pid), threads(procs.proc.pid)


def test_sequences_step_through_the_model_process_and_its_cache(procs):
    """Sequences over the split server (front ends -> the model process's KV cache): interleaved sequences, a
    prompt then one token at a time, each step equal to the rows of the module's causal forward over the whole
    sequence so far; a step of an id the model process does not hold is refused as lost; every sequence ended
    leaves none active in the model process."""
    from concurrent.futures import ThreadPoolExecutor

    from mha_client import Client, MhaSequenceLost

    module = builtin_model()
    rng = np.random.default_rng(11)
    xs = [rng.standard_normal((1, 9, 32)).astype(np.float32) for _ in range(4)]

    def generate(x: np.ndarray) -> float:
        with torch.no_grad():
            want = module(torch.from_numpy(x)).output.numpy()
        worst = 0.0
        with Client(procs.url) as mha, mha.sequence() as s:
            pos = 0
            for t in (3, 1, 1, 1, 1, 1, 1):
                got = s.step(x[:, pos : pos + t]).output
                worst = max(worst, float(np.abs(got - want[:, pos : pos + t]).max()))
                pos += t
        return worst

    with ThreadPoolExecutor(4) as pool:
        errors = list(pool.map(generate, xs))
    assert max(errors) < 1e-4, errors
    body = {"x": xs[0][:, :1].tolist(), "sequence": {"id": 987654321}}  # never started: no start flag
    r = httpx.post(procs.url + "/attend", json=body, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["type"] == "sequence_start_required", r.text
    assert "start" in r.json()["error"]["message"]
    with Client(procs.url) as mha:  # the client's own view of it: a lost sequence, to replay
        s = mha.sequence(id=987654321)
        s.started = True  # as after a first step that the server has since lost
        with pytest.raises(MhaSequenceLost):
            s.step(xs[0][:, :1])
    with Client(procs.url) as mha, mha.sequence() as s:  # one open sequence is counted, and none once it ends
        s.step(xs[1][:, :2])
        assert metric(httpx.get(procs.url + "/metrics").text, "mha_sequences_active") == 1.0
    assert metric(httpx.get(procs.url + "/metrics").text, "mha_sequences_active") == 0.0


def test_a_crash_leaves_no_shared_memory_behind_once_the_supervisor_exits(procs):
    """Each front end and the model process own arenas in /dev/shm (service/shm.py); a process killed cannot
    unlink its own, and the resource tracker that the supervisor's spawned processes share does it once the last
    of them has exited."""
    engine, fronts = pids(procs)

    def arenas(pid: int) -> list[str]:
        return glob.glob(f"/dev/shm/mha-serve-*-{pid}-*")

    x = np.linspace(-1, 1, 8 * 64 * 32).reshape(8, 64, 32)  # 64 KiB as float32: through the arenas
    r = httpx.post(procs.url + "/attend", json={"x": x.tolist()}, timeout=30)
    assert r.status_code == 200 and np.asarray(r.json()["output"]).shape == (8, 64, 32), r.text[:300]
    assert len(arenas(engine)) == 2 and all(len(arenas(f)) == 1 for f in fronts), os.listdir("/dev/shm")
    run = os.path.basename(arenas(engine)[0]).rsplit(f"-{engine}-", 1)[0]  # the supervisor's run directory's name
    os.kill(fronts[0], signal.SIGKILL)
    os.kill(engine, signal.SIGKILL)
    assert procs.proc.wait(20) == 1, procs.log()[-3000:]
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and glob.glob(f"/dev/shm/{run}-*"):
        time.sleep(0.05)
    assert not glob.glob(f"/dev/shm/{run}-*"), os.listdir("/dev/shm")


@pytest.mark.parametrize("grow", [False, True], ids=["fixed", "growing"])
def test_arrays_the_arenas_have_no_room_for_cross_as_frames_right_and_are_counted(tmp_path, grow):
    """With 1 MiB arenas (8 arrays of 128 KiB), 24 requests at once. Arenas that may not grow: what does not fit
    crosses as frames on either side, and /metrics counts them by sender (mha_shm_fallbacks). Arenas that may
    (MHA_SHM_ARENA_MAX_MIB's default): they add segments, and nothing crosses as a frame. Every answer equals the
    module's."""
    import base64

    fixed = {} if grow else {"MHA_SHM_ARENA_MAX_MIB": "1"}
    s = start_server(tmp_path, {**WORKERS, "MHA_SHM_ARENA_MIB": "1", **fixed})
    try:
        mha = builtin_model()
        rng = np.random.default_rng(21)
        xs = [rng.standard_normal((16, 64, 32)).astype(np.float32) for _ in range(24)]  # 128 KiB each

        async def go():
            async with httpx.AsyncClient(base_url=s.url, timeout=60) as c:
                return await asyncio.gather(
                    *(
                        c.post(
                            "/attend",
                            json={
                                "x": {"dtype": "float32", "shape": list(x.shape), "b64": base64.b64encode(x).decode()}
                            },
                        )
                        for x in xs
                    )
                )

        for x, r in zip(xs, asyncio.run(go()), strict=True):
            assert r.status_code == 200, r.text
            got = np.frombuffer(base64.b64decode(r.json()["output"]["b64"]), np.float32).reshape(x.shape)
            np.testing.assert_allclose(got, mha(torch.from_numpy(x)).output.numpy(), atol=1e-5)
        text = httpx.get(s.url + "/metrics", timeout=10).text
        fallbacks = [sample(text, "mha_shm_fallbacks_total", f'sender="{who}"') for who in ("front_end", "model")]
        if grow:
            assert fallbacks == [0.0, 0.0], text
            engine, fronts = pids(s)
            grown = [p for pid in (engine, *fronts) for p in glob.glob(f"/dev/shm/mha-serve-*-{pid}-*.1")]
            assert grown, os.listdir("/dev/shm")  # a second segment: they grew
        else:
            assert all(n > 0 for n in fallbacks), text
    finally:
        s.stop(signal.SIGKILL)


def test_metrics_and_statistics_read_right_after_an_answer_count_its_batch(procs):
    """The model process writes its batches' metrics and Triton statistics when a front end pings
    (service.metrics.EngineMetrics), not at each batch: /metrics and the stats route ping first and wait for the
    heartbeat, so a read right after an answer counts its batch (pings come every 0.25 s: without that wait a
    read a few milliseconds after the answer misses it)."""
    with httpx.Client(base_url=procs.url, timeout=30) as c:

        def counts() -> tuple[float, float, int]:
            text = c.get("/metrics").text
            stats = c.get("/v2/models/mha/stats").json()["model_stats"][0]
            return (
                metric(text, "mha_batch_size_requests_count"),
                metric(text, "mha_queue_wait_seconds_count"),
                stats["execution_count"],
            )

        before = counts()
        for i in range(1, 6):  # one at a time: each its own batch
            r = c.post("/attend", json={"x": X})
            assert r.status_code == 200, r.text
            assert counts() == (before[0] + i, before[1] + i, before[2] + i)


def _minor_faults(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[7])


def test_front_ends_serve_128_kib_bodies_without_faulting_their_pages_in_again(tmp_path):
    """service/proc.py:tune_malloc in the front ends: a v2 binary body of 128 KiB (and its answer) reuses the heap,
    so that serving one faults no fresh pages in (left to glibc, the no-op GPU case's front ends took 1.3-7.4 page
    faults a request, and the test's loop 81 an iteration); the answers are the module's."""
    s = start_server(tmp_path, WORKERS)  # (MHA_MALLOC_MMAP_THRESHOLD_MIB=0: 2-10 a request)
    try:
        all_connected(s)
        _, fronts = pids(s)
        x = np.random.default_rng(5).standard_normal((16, 64, 32)).astype(np.float32)  # 128 KiB
        with torch.no_grad():
            want = builtin_model()(torch.from_numpy(x)).output.numpy()
        given = {"name": "x", "datatype": "FP32", "shape": list(x.shape), "parameters": {"binary_data_size": x.nbytes}}
        asked = {"name": "output", "parameters": {"binary_data": True}}
        head = json.dumps({"inputs": [given], "outputs": [asked]}).encode()
        headers = {"inference-header-content-length": str(len(head))}

        async def serve(n: int) -> None:
            limits = httpx.Limits(max_connections=8)
            async with httpx.AsyncClient(base_url=s.url, timeout=30, limits=limits) as c:

                async def one() -> None:
                    r = await c.post("/v2/models/mha/infer", content=head + x.tobytes(), headers=headers)
                    assert r.status_code == 200, r.text
                    hl = int(r.headers["inference-header-content-length"])
                    np.testing.assert_allclose(np.frombuffer(r.content[hl:], "<f4").reshape(x.shape), want, atol=1e-5)

                await asyncio.gather(*(one() for _ in range(n)))

        for _ in range(2):  # warm: each front end's heap grows to what the requests it takes at once hold
            asyncio.run(serve(150))
        rounds = []  # faults a request, in rounds of 300 (each on new connections: either front end may take them)
        for _ in range(3):
            before = sum(_minor_faults(p) for p in fronts)
            asyncio.run(serve(300))
            rounds.append((sum(_minor_faults(p) for p in fronts) - before) / 300)
        # one round may still grow a heap that warming left short; glibc's defaults fault pages in every round
        assert sorted(rounds)[1] < 1, f"page faults a request in the front ends, by round: {rounds}"
    finally:
        s.stop(signal.SIGKILL)
