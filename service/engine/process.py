"""The model process: one per device. Owns the runner, the batcher and the device; serves its front ends over a
Unix socket (service/channel.py).

It listens on a Unix socket; each front-end process connects once. Requests arrive in batches
(``service.messages``), each goes to the batcher's callback path (``Batcher.submit``: no task, future
or timer per request) with its absolute deadline; a ``cancel`` message cancels it (its client left: a
request still queued is dropped before compute, one computing goes unanswered). Its outcome, a result
or a typed error, goes back to its front end; the outcomes ready in the same turn of the event loop
share one message. Every ``ping`` is answered with a heartbeat that
carries readiness and the queue depth.

A watchdog thread (service/engine/liveness.py) ends it when a forward pass or its event loop hangs, and
stamps a shared ``beat`` while it is well, so that the parent can tell a frozen process from a busy one.

Signals are ignored: the parent tells it to stop (an Event) once the front ends have drained, and
it exits 0; if the parent dies, it is killed (PR_SET_PDEATHSIG; elsewhere it sees it and stops).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import multiprocessing
import os
import signal
import threading
from functools import partial
from typing import Any

from service import channel, heap, shm
from service.engine_api import SequenceFlags
from service.logs import request_id_var
from service.messages import (
    Bye,
    Cancel,
    EngineError,
    ErrorKind,
    Heartbeat,
    Hello,
    Info,
    OutcomesWriter,
    Ping,
    Requests,
    Result,
    decode,
    decode_requests,
    encode,
    kind_of,
)
from service.settings import Settings

log = logging.getLogger("mha_serve.engine")

UNREAD_GRACE_S = 1.0  # at shutdown, how long answers not yet read by their front end may wait for it


def _failure_of(writer: OutcomesWriter, rid: int, exc: BaseException) -> None:
    """A failure as it crosses to the front end: its kind's value, its message and its retry-after."""
    kind = kind_of(exc)
    message = str(exc) if kind is not ErrorKind.INTERNAL else f"{type(exc).__name__}: {exc}"
    writer.failure(rid, kind.value, message, getattr(exc, "retry_after_s", 0.0))


class Engine:
    def __init__(self, settings: Settings, address: str) -> None:
        self.settings = settings
        self.address = address
        self.engine: Any = None  # the InprocClient whose batcher this process feeds
        self.batcher: Any = None
        self.tracing: Any = None  # service.tracing.Tracing when OTEL_TRACES_EXPORTER turns it on
        self.info: dict[str, Any] = {}
        self._listener: Any = None  # the bound, listening socket (bind), served by serve
        self._server: asyncio.AbstractServer | None = None
        self._peers: dict[int, channel.Connection] = {}  # front end (its connection's number) -> its connection
        self._next_peer = 0
        self._pending: dict[tuple[int, int], Any] = {}  # (front end, id) -> the batcher's handle, until answered
        self._replies: dict[int, OutcomesWriter] = {}  # front end -> its next message, built as answers come
        self._flush_scheduled = False
        self._stop = asyncio.Event()
        # per front end: its arena, mapped (its requests' large arrays), and this process's arena for its answers
        self._inputs: dict[int, shm.Mapped] = {}
        self._answers: dict[int, shm.Arena] = {}
        self.metrics: Any = None  # service.metrics.EngineMetrics (load), flushed before each heartbeat
        # On a GPU, each front end's answer arena is page-locked as it is made (staging.page_lock), and its requests
        # name it (AttendInput.answer_to): the runner downloads each answer into its slot, and nothing copies it there
        self._gpu = False
        self._fallback: Any = None  # counts answers an arena had no room for (mha_shm_fallbacks{sender="model"})

    async def load(self, beat: Any = None) -> None:
        """Load and warm the model and start the batcher: the one-process mode's engine (InprocClient), whose
        batcher this process feeds through its callback path (``submit``/``cancel``)."""
        from service import __version__, tracing
        from service.engine.inproc import InprocClient
        from service.metrics import EngineMetrics

        s = self.settings
        # the metrics are written to PROMETHEUS_MULTIPROC_DIR: the front ends' /metrics reads them
        self.tracing = tracing.from_env(service_version=__version__, replica_id=s.replica_id)
        # A hung forward or event loop ends this process at once (no probe here to wait for): the front ends see its
        # socket close and answer 503, and the parent exits 1. Its watchdog stamps ``beat`` for the parent's watch.
        observer = self.metrics = EngineMetrics()  # written at each ping (its flush), read by every front end
        self._fallback = observer.shm_fallbacks.labels("model")
        engine = InprocClient(s, metrics=observer, tracing=self.tracing, beat=beat, exit_after_s=0.0, stats=False)
        model = await engine.start()
        self.engine, self.batcher = engine, engine.batcher
        self.info = {"model_info": model.info, "config": model.config.to_dict()}
        self._gpu = str(model.device).startswith("cuda")
        self.bind()
        heap.settle()
        log.info("model process ready: %s on %s (%s)", s.model_name, model.device, model.info["checksum"])

    def bind(self) -> None:
        """Listen on ``address`` (``load`` does, once the batcher runs; tests that feed a batcher of their own call
        it themselves): front ends may connect from now on, and are served once ``serve`` runs."""
        self._listener = channel.listen(self.address)

    def _status(self) -> tuple[bool, tuple[int, int]]:
        """Readiness and the queue (requests, tokens), as heartbeats and the info carry them."""
        return bool(self.batcher.running), tuple(self.batcher.queue_depth())

    async def serve(self) -> None:
        """Serve the front ends' connections until told to stop. Each message is handled as it is read
        (``Connection.data_received``: every whole message in what one read brought, in order)."""
        self._server = await asyncio.get_running_loop().create_unix_server(self._connected, sock=self._listener)
        try:
            await self._stop.wait()
        finally:
            self._server.close()

    def _connected(self) -> channel.Connection:
        """A front end connected: its connection, numbered, is its identity here."""
        peer = self._next_peer
        self._next_peer += 1
        conn = self._peers[peer] = channel.Connection(partial(self._handle, peer), partial(self._lost, peer))
        return conn

    def _lost(self, peer: int, exc: BaseException | None) -> None:
        if exc is not None:
            log.warning("the connection of a front end broke: %s", exc)
        self._peer_gone(peer)

    # Nothing is dropped in silence. A message to a front end whose loop is busy (not reading) waits in its
    # connection's buffer, in order, until it reads; a front end that is gone is known at once (its connection
    # ends: ``_lost``), and its requests still pending are cancelled in the batcher, as its cancels would have done.

    def _send(self, peer: int, frames: list) -> None:
        conn = self._peers.get(peer)
        if conn is not None:
            conn.send(frames)

    def _peer_gone(self, peer: int) -> None:
        """A front end that went away: nobody reads its answers, and its requests still queued are not computed."""
        conn = self._peers.pop(peer, None)
        if conn is not None:
            conn.close()
        self._replies.pop(peer, None)
        self._close_arenas(peer)
        mine = [key for key in self._pending if key[0] == peer]
        if mine:
            log.warning("a front end went away with %d request(s) pending: cancelled", len(mine))
        for key in mine:
            self._cancel(self._pending.pop(key))

    def _handle(self, peer: int, frames: list) -> None:
        msg = decode(frames[0])
        kind = type(msg)
        if kind is not Hello and kind is not Bye and msg.freed:
            answers = self._answers.get(peer)
            if answers is not None:
                for offset in msg.freed:
                    answers.free(offset)
        if kind is Requests:
            submit, pending = self.batcher.submit, self._pending
            inputs = self._inputs.get(peer)
            try:
                if inputs is not None:
                    inputs.grow(msg.segments, msg.shrinks)  # what the front end's arena grew by, mapped before reading
                tail = None if inputs is None else inputs.tail
                if self._gpu:  # (answers downloaded into their arena's slots; x's uploaded from where they lie)
                    locked = inputs is not None and inputs.page_locked
                    items = decode_requests(msg, frames[1:], tail, self._answers.get(peer), locked)
                else:
                    items = decode_requests(msg, frames[1:], tail)
            except Exception as e:  # (a segment that cannot be mapped, an array that is not where it says)
                self._unreadable(peer, msg, e)
                return
            for rid, inp, deadline, request_id, priority in items:
                if inp.trace is not None:  # the front end's request span: the forward span's parent
                    remote = self.tracing.remote_span_context(inp.trace) if self.tracing is not None else None
                    inp = dataclasses.replace(inp, trace=remote)
                done = partial(self._answer, peer, rid, request_id)
                if inp.sequence is not None:  # a sequence's step: in its sequence's turn (the engine's ``step``)
                    if inputs is not None and inp.x.base is not None:  # its own x: a step keeps state past a cancel
                        inp = dataclasses.replace(inp, x=inp.x.copy(), x_page_locked=False)
                    pending[(peer, rid)] = self._step(inp, deadline, priority, done)
                    continue
                try:
                    pending[(peer, rid)] = submit(inp, deadline=deadline, priority=priority, done=done)
                except Exception as e:  # refused at submit (overloaded, too large, shutting down): answered now
                    done(e)
        elif kind is Cancel:
            for rid in msg.ids:
                handle = self._pending.pop((peer, rid), None)
                if handle is not None:  # still unanswered: its client left
                    self._cancel(handle)
        elif kind is Ping:
            # The metrics observed so far are written before the heartbeat goes: a front end that waits for the
            # answer to its ping reads every batch answered before it asked (MPClient.flush_statistics).
            if self.metrics is not None:
                self.metrics.flush()
            answers = self._answers.get(peer)
            if answers is not None:  # a segment a burst of answers grew it by, empty long enough, goes back
                answers.trim()
            self._send(peer, encode(Heartbeat(*self._status())))
        elif kind is Hello:
            log.info("front end %s connected", msg.pid)
            self._send(peer, encode(Info(*self._status(), **self.info, **self._open_arenas(peer, msg))))
        elif kind is Bye:
            self._peer_gone(peer)

    def _unreadable(self, peer: int, msg: Requests, exc: Exception) -> None:
        """A message whose arrays cannot be read: each of its requests is answered with the error now, not left
        to its deadline."""
        log.error("a message of %d request(s) from front end %d could not be read: %r", len(msg.items), peer, exc)
        for r in msg.items:
            self._answer(peer, r.id, r.request_id, EngineError(f"the request's arrays could not be read: {exc!r}"))

    def _open_arenas(self, peer: int, hello: Hello) -> dict[str, Any]:
        """Map the front end's arena and make one for its answers; ``Info``'s fields that say so. Either may fail
        (no /dev/shm, no room in it): its arrays then cross as frames."""
        self._close_arenas(peer)  # (a second Hello on one socket: a fresh start)
        fields: dict[str, Any] = {"arena": None, "mapped": False}
        if not shm.ARENA_BYTES:
            return fields
        try:
            if hello.arena is not None:
                self._inputs[peer] = shm.Mapped(hello.arena, self._page_lock(read_only=True), self._retire)
                fields["mapped"] = True
            arena = self._answers[peer] = shm.Arena(on_segment=self._page_lock(), threaded=self._gpu)
            fields["arena"] = arena.name
        except OSError as e:
            log.warning("no shared memory with front end %s (%s): its arrays cross as frames", hello.pid, e)
        return fields

    def _page_lock(self, read_only: bool = False) -> Any:
        """What the segments of an answer arena (as they are made) and of a front end's arena (as they are mapped,
        ``read_only``) are given to: on a GPU, page-locking (staging.page_lock), so that the runner's download into an
        answer's slot and its upload from a request's x are the device's DMA."""
        if not self._gpu:
            return None
        from service.engine import staging

        return partial(staging.page_lock, read_only=read_only)

    def _retire(self, undo: Any, maps: list) -> None:
        """Undo the page-locking of mapped segments a front end's arena let go, once no batch is in flight (one may
        be uploading from them): in a thread that waits for the runner's slots, holding the mappings until then."""
        runner = getattr(self.engine, "runner", None)

        def then() -> None:
            undo()
            maps.clear()  # (now the mappings may go)

        if runner is None:  # (a test's batcher: no runner, nothing in flight)
            then()
            return
        threading.Thread(target=runner.staging.quiesced, args=(then,), name="mha-unlock", daemon=True).start()

    def _close_arenas(self, peer: int) -> None:
        mapped, arena = self._inputs.pop(peer, None), self._answers.pop(peer, None)
        if mapped is not None:
            mapped.close()
        if arena is not None:
            arena.close()

    def _step(self, inp: Any, deadline: float, priority: int, done: Any) -> asyncio.Task:
        """A step waits for its sequence's turn (service/engine/sequences.py), so it is a task, not the batcher's
        callback path; its handle for a cancel is the task."""
        seq = SequenceFlags(*inp.sequence)
        inp = dataclasses.replace(inp, sequence=None)
        task = asyncio.ensure_future(self.engine.step(inp, seq, deadline=deadline, priority=priority))

        def settled(t: asyncio.Task) -> None:
            if not t.cancelled():  # (cancelled: its front end left, nobody waits for the answer)
                done(t.exception() or t.result())

        task.add_done_callback(settled)
        return task

    def _cancel(self, handle: Any) -> None:
        """A request whose front end left: dropped before compute (a step: its task cancelled, its sequence as
        it was before the step)."""
        if isinstance(handle, asyncio.Task):
            handle.cancel()
        else:
            self.batcher.cancel(handle, "disconnect")

    def _answer(self, peer: int, rid: int, request_id: str | None, res: Result | BaseException) -> None:
        """A request's ``done``: its outcome joins its front end's next message (one per turn of the loop); its large
        arrays go into the answer arena now."""
        self._pending.pop((peer, rid), None)
        writer = self._replies.get(peer)
        if writer is None:
            writer = self._replies[peer] = OutcomesWriter(self._answers.get(peer))
        if isinstance(res, Result):
            writer.answer(rid, res.output, res.queue_s, res.compute_s, res.batch_requests, res.batch_sequences)
        else:  # typed back to the front end, which maps it to the error table
            if kind_of(res) is ErrorKind.INTERNAL:
                token = request_id_var.set(request_id)  # the log line carries the front end's request id
                try:
                    log.warning("request failed in the model process: %r", res)
                finally:
                    request_id_var.reset(token)
            _failure_of(writer, rid, res)
        if not self._flush_scheduled:  # the outcomes of one batch go back in one message per front end
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        replies, self._replies = self._replies, {}
        answers = self._answers
        for peer, writer in replies.items():
            self._send(peer, writer.frames())
            arena = answers.get(peer)
            if arena is not None and arena.misses and self._fallback is not None:
                self._fallback.inc(arena.take_misses())

    async def shutdown(self, grace_s: float) -> None:
        """Finish what is queued within ``grace_s`` (its answers still go out), then close."""
        engine = self.engine or self.batcher  # (tests feed a batcher of their own)
        if engine is not None:
            await engine.stop(grace_s=grace_s)  # answers (ShuttingDown) whatever it could not finish
        if self.metrics is not None:
            self.metrics.flush()
        self._flush()
        give_up = asyncio.get_running_loop().time() + UNREAD_GRACE_S
        while asyncio.get_running_loop().time() < give_up and any(c.buffered() for c in self._peers.values()):
            await asyncio.sleep(0.01)  # answers a front end has not read yet
        self._stop.set()

    def close(self) -> None:
        for peer in list(self._inputs.keys() | self._answers.keys()):
            self._close_arenas(peer)
        for conn in self._peers.values():
            conn.close()  # (what is buffered is still written)
        self._peers.clear()
        if self._server is not None:
            self._server.close()
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self.tracing is not None:
            self.tracing.shutdown()  # exports the spans still buffered


async def _amain(settings: Settings, address: str, ready: Any, stop: Any, beat: Any = None) -> int:
    from service import proc

    engine = Engine(settings, address)
    await engine.load(beat)
    ready.set()
    parent = multiprocessing.parent_process()
    # The kernel kills this process with its parent; where it cannot be told to, it looks (as it does once for a
    # parent that died before it was told).
    watch_parent = not proc.die_with_parent()

    async def until_told() -> None:
        first = True
        while not stop.is_set():
            if (first or watch_parent) and parent is not None and os.getppid() != parent.pid:
                log.error("the parent process is gone: stopping the model process")
                break
            first = False
            await asyncio.sleep(0.1)
        # The front ends have drained (or are gone): whatever is left has nobody waiting for it.
        await engine.shutdown(0.0)

    stopper = asyncio.create_task(until_told())
    await engine.serve()
    await stopper
    engine.close()
    log.info("model process stopped")
    return -1 if engine.batcher.forward_running else 0


def _run(coro: Any) -> Any:
    """uvloop's event loop where it is installed, as uvicorn's ``loop="auto"`` picks for the front ends (the model
    process's loop turns for every message, batch and answer: bench/front.py's split set-up measured its CPU a
    request lower on uvloop); asyncio's otherwise."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def main(address: str, ready: Any, stop: Any, beat: Any = None) -> None:
    """The model process's entry point (a multiprocessing "spawn" target): settings from MHA_*.

    ``beat`` (a shared double) is stamped by its watchdog (service/engine/liveness.py) while the process is
    well: the parent's watch for a process frozen whole.
    It stops when the parent sets ``stop`` (after the front ends drained) or dies, not on signals:
    a Ctrl-C or a SIGTERM sent to the whole process group must not cut off the front ends' drain.
    """
    from service.proc import set_title, tune_malloc

    set_title("mha-serve: model")  # ps tells the processes apart
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    settings = Settings()
    tune_malloc(settings.malloc_mmap_threshold_mib)
    from service.logs import configure_logging

    configure_logging(settings.log_level, settings.log_format)
    code = _run(_amain(settings, address, ready, stop, beat))
    logging.shutdown()
    if code == -1:  # a forward ran past the grace: leave without finalising under a running torch op
        os._exit(0)
    raise SystemExit(code)
