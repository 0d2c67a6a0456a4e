"""MHA_WORKERS=2: the queue's promises kept by the model process, whichever front end takes a request:
priorities, and gRPC's cancel, deadline, overload and API keys (tests/e2e/test_grpc.py: one process)."""

from __future__ import annotations

import asyncio
import signal
import time

import grpc
import httpx
import numpy as np
import pytest
import torch

from service.frontend.triton_proto import grpc_service_pb2 as pb
from service.frontend.triton_proto import grpc_service_pb2_grpc as pb_grpc

from .conftest import builtin_model, start_server

WORKERS = {"MHA_WORKERS": "2", "MHA_FAULT_INJECTION": "true"}
X = [[[0.25] * 32] * 4]


# no oldest-first batch among these few (MHA_PRIORITY_OLDEST_EVERY): the order is the levels' alone
PRIORITIES = {**WORKERS, "MHA_PRIORITY_LEVELS": "3", "MHA_MAX_BATCH_SIZE": "1", "MHA_PRIORITY_OLDEST_EVERY": "100"}


def queued(r: httpx.Response) -> float:
    """The model process's queue depth, from the front end's /metrics (Prometheus' multiprocess merge)."""
    from prometheus_client.parser import text_string_to_metric_families

    return sum(
        s.value
        for f in text_string_to_metric_families(r.text)
        for s in f.samples
        if s.name == "mha_queue_depth_requests"
    )


def test_a_high_priority_request_overtakes_queued_low_ones_across_the_boundary(tmp_path):
    s = start_server(tmp_path, PRIORITIES)
    try:

        async def go():
            done: list[str] = []
            limits = httpx.Limits(max_keepalive_connections=0)  # a connection each: both front ends take some

            async with httpx.AsyncClient(base_url=s.url, timeout=30, limits=limits) as c:

                async def send(tag: str, body: dict, headers=None) -> httpx.Response:
                    r = await c.post("/attend", json=body, headers=headers)
                    done.append(tag)
                    return r

                stall = asyncio.create_task(send("stall", {"x": X}, {"x-mha-fault": "stall:4000"}))
                await asyncio.sleep(0.5)  # the model process computes it: what follows queues there
                # Each of the queued ones computes for 200 ms, one a batch: their answers leave the model process
                # 200 ms apart, so the order they arrive in is the order they were computed in. (Computed in a
                # fraction of a millisecond each, they arrived within one or two of each other, through two front
                # ends, in any order.)
                slow = {"x-mha-fault": "stall:200"}
                low = []
                for i in range(3):
                    low.append(asyncio.create_task(send(f"low{i}", {"x": X, "priority": 3}, slow)))
                    await asyncio.sleep(0.1)
                high = asyncio.create_task(send("high", {"x": X, "priority": 1}, slow))
                # all four wait in the model process's queue while the stall computes (on a busy machine a request
                # can take a while to cross: the order is only meaningful once they are all there)
                until = time.monotonic() + 3
                while queued(await c.get("/metrics")) < 4 and time.monotonic() < until:
                    await asyncio.sleep(0.05)
                assert queued(await c.get("/metrics")) == 4 and not stall.done(), "the requests did not queue in time"
                rs = await asyncio.gather(stall, *low, high)
            return done, rs

        done, rs = asyncio.run(go())
        assert [r.status_code for r in rs] == [200] * 5, [r.text for r in rs]
        assert done == ["stall", "high", "low0", "low1", "low2"], done  # queued last, computed first after the stall
        lows = [float(r.headers["x-queue-time-ms"]) for r in rs[1:4]]
        assert all(float(rs[4].headers["x-queue-time-ms"]) < q for q in lows), (rs[4].headers, lows)
    finally:
        s.stop(signal.SIGKILL)


def _request(x: np.ndarray) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name="mha")
    req.inputs.add(name="x", datatype="FP32", shape=list(x.shape))
    req.raw_input_contents.append(x.tobytes())
    return req


def _output(res: pb.ModelInferResponse) -> np.ndarray:
    (out,) = [o for o in res.outputs if o.name == "output"]
    i = list(res.outputs).index(out)
    return np.frombuffer(res.raw_output_contents[i], np.float32).reshape(tuple(out.shape))


def test_grpc_keys_deadline_overload_and_cancel_through_the_model_process(tmp_path):
    s = start_server(tmp_path, {**WORKERS, "MHA_MAX_QUEUE_REQUESTS": "1", "MHA_API_KEYS": "k1,k2"})
    key = [("authorization", "Bearer k2")]
    http_key = {"authorization": "Bearer k2"}

    def stats() -> dict:
        return httpx.get(s.url + "/v2/models/mha/stats", headers=http_key, timeout=10).json()["model_stats"][0]

    def dropped() -> float:
        text = httpx.get(s.url + "/metrics", headers=http_key, timeout=10).text
        from .test_procs_e2e import sample

        return sample(text, "mha_requests_dropped_total", 'reason="disconnect"')

    try:
        x = np.random.default_rng(0).standard_normal((1, 4, 32)).astype(np.float32)
        req = _request(x)
        with grpc.insecure_channel(s.grpc_url) as ch:
            stub = pb_grpc.GRPCInferenceServiceStub(ch)
            # API keys: checked by the front end, before the model process is asked
            for metadata in ([], [("authorization", "Bearer nope")]):
                with pytest.raises(grpc.RpcError) as e:
                    stub.ModelInfer(req, timeout=10, metadata=metadata)
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED, e.value
            want = builtin_model()(torch.from_numpy(x)).output.detach().numpy()
            np.testing.assert_allclose(_output(stub.ModelInfer(req, timeout=10, metadata=key)), want, atol=1e-5)

            # the RPC's deadline is kept by the model process: a stalled forward is not waited for
            t0 = time.monotonic()
            with pytest.raises(grpc.RpcError) as e:
                stub.ModelInfer(req, timeout=0.3, metadata=[*key, ("x-mha-fault", "stall:1500")])
            assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and time.monotonic() - t0 < 1.2
            time.sleep(1.5)  # let the stalled forward finish

            # overload: the model process's queue of 1 is full
            stall = [*key, ("x-mha-fault", "stall:1500")]
            running = stub.ModelInfer.future(req, timeout=10, metadata=stall)
            time.sleep(0.4)
            queued = stub.ModelInfer.future(req, timeout=10, metadata=key)
            time.sleep(0.3)
            with pytest.raises(grpc.RpcError) as e:
                stub.ModelInfer(req, timeout=10, metadata=key)
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue is full" in e.value.details()
            assert int(dict(e.value.trailing_metadata())["retry-after"]) >= 1
            for f in (running, queued):
                np.testing.assert_allclose(_output(f.result()), want, atol=1e-5)

            # cancel: a queued call the client cancels is never computed
            before, gone = stats(), dropped()
            running = stub.ModelInfer.future(req, timeout=10, metadata=stall)
            time.sleep(0.4)
            big = _request(np.ones((3, 4, 32), np.float32))
            cancelled = stub.ModelInfer.future(big, timeout=10, metadata=key)
            time.sleep(0.3)
            assert cancelled.cancel()
            np.testing.assert_allclose(_output(running.result()), want, atol=1e-5)
            time.sleep(0.5)
            after = stats()
            assert after["execution_count"] == before["execution_count"] + 1, (before, after)  # the stalled one
            assert after["inference_count"] == before["inference_count"] + 1  # never the 3 cancelled sequences
            assert dropped() == gone + 1
    finally:
        s.stop(signal.SIGKILL)
