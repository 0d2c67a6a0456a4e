"""The parent process with MHA_WORKERS >= 2: the model process, then uvicorn's worker supervisor.

- A temporary directory holds the model process's socket (ipc) and PROMETHEUS_MULTIPROC_DIR; it
  is removed at exit.
- The model process starts first; the port opens once it is ready (as with one process, where
  uvicorn listens after the lifespan's start-up).
- uvicorn's ``Multiprocess`` runs the front ends on the one socket bound here, and restarts a
  front end that dies (its health-check pings every 0.5 s).
- If the model process dies, the front ends answer 503 at once (their socket to it closes), and
  this process stops them and exits 1, so that the orchestrator restarts the whole service with
  a fresh model process (a restart in place would hide a crash loop and lose the device state).
- If a forward pass or its event loop hangs, its watchdog (service/engine/liveness.py) ends it, and
  the same follows. If it is frozen whole (its watchdog has not stamped the shared ``beat`` for
  MHA_ENGINE_HANG_S: SIGSTOP), this process kills it, and the same follows.
- SIGTERM: uvicorn's supervisor passes it to the front ends, which drain within one
  MHA_SHUTDOWN_GRACE_S; then the model process, idle by then, is told to stop (it ignores signals,
  so that one sent to the whole process group cannot cut the front ends' drain short). Exit 0 when
  every process exited 0.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import signal
import tempfile
import threading
import time

import uvicorn
from uvicorn.supervisors import Multiprocess

from service import shm
from service.engine.liveness import HUNG_EXIT
from service.messages import ADDRESS_ENV
from service.proc import title_thread
from service.settings import Settings

log = logging.getLogger("mha_serve")


def serve(settings: Settings, workers: int) -> int:
    from service.proc import set_title
    from service.settings import RUN_DIR_ENV

    set_title("mha-serve: supervisor")  # ps tells the processes apart
    tmp = tempfile.mkdtemp(prefix="mha-serve-")
    metrics_dir = os.path.join(tmp, "metrics")
    os.mkdir(metrics_dir)
    address = f"ipc://{tmp}/engine.sock"
    env = {
        "PROMETHEUS_MULTIPROC_DIR": metrics_dir,
        ADDRESS_ENV: address,
        "MHA_HOST": settings.host,
        "MHA_PORT": str(settings.port),
        RUN_DIR_ENV: tmp,  # where the front ends claim their numbers
    }
    os.environ.update(env)  # the spawned processes read their settings from the environment
    try:
        return _run(settings, workers, address)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if shm.unlink_run(tmp):  # arenas of processes killed together with their resource tracker
            log.warning("removed shared-memory arenas left by killed processes")


def _run(settings: Settings, workers: int, address: str) -> int:
    from service.engine import process

    ctx = multiprocessing.get_context("spawn")
    ready, stop = ctx.Event(), ctx.Event()
    beat = ctx.Value("d", 0.0, lock=False)  # the model process's watchdog stamps it (time.monotonic())
    engine = ctx.Process(target=process.main, args=(address, ready, stop, beat), name="mha-model")
    early: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):  # a signal while the model loads: stop it, exit 0
        signal.signal(sig, lambda s, f: early.append(s))
    engine.start()
    log.info("model process %d starting", engine.pid)
    while not ready.wait(0.1):
        if early or not engine.is_alive():
            break
    if early or not engine.is_alive():
        failed = not engine.is_alive()
        _stop_engine(engine, stop)
        if failed:
            log.error("the model process failed to start (exit code %s)", engine.exitcode)
        return 1 if failed else 0

    config = uvicorn.Config(
        "service.frontend.worker:create_front_app",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=workers,
        log_level=settings.log_level,
        log_config=None,
        timeout_graceful_shutdown=max(0.05, settings.shutdown_grace_s),
        access_log=False,
    )
    sock = config.bind_socket()
    supervisor = Multiprocess(config, sockets=[sock])  # its handlers queue the signals from here on
    if early:  # one came after the model was ready, before the supervisor's handlers: stop as while it loads
        sock.close()
        _stop_engine(engine, stop)
        return 0
    crashed = threading.Event()
    done = threading.Event()
    hang = (beat, settings.engine_hang_s)
    watcher = threading.Thread(
        target=_watch, args=(engine, supervisor, crashed, done, hang), name="mha-supervise", daemon=True
    )
    watcher.start()
    log.info("serving on http://%s:%d with %d front-end processes", settings.host, sock.getsockname()[1], workers)
    supervisor.run()  # returns after SIGTERM/SIGINT, once every front end has exited
    done.set()
    sock.close()
    codes = [p.exitcode for p in supervisor.processes]
    _stop_engine(engine, stop)
    if crashed.is_set():
        how = "hung" if engine.exitcode == HUNG_EXIT else "died"  # (it logged why)
        log.error("the model process %s (exit code %s): exiting 1", how, engine.exitcode)
        return 1
    # A front end ends by the SIGTERM it drained on (uvicorn raises it again once its server is done).
    if engine.exitcode != 0 or any(c not in (0, -signal.SIGTERM) for c in codes):
        log.error("exit codes: model process %s, front ends %s", engine.exitcode, codes)
        return 1
    return 0


def _watch(
    engine, supervisor: Multiprocess, crashed: threading.Event, done: threading.Event, hang: tuple | None = None
) -> None:
    """The model process's death, or hang, stops the service; a dead front end's live gauges leave the merge."""
    title_thread()
    from prometheus_client import multiprocess

    seen: dict[int, object] = {}
    while not done.is_set():
        if hang is not None and engine.is_alive():
            beat, hang_s = hang
            silent = time.monotonic() - beat.value
            if silent > hang_s and not done.is_set():
                log.error(
                    "the model process %d has not answered for %.1f s (MHA_ENGINE_HANG_S=%g): killing it",
                    engine.pid,
                    silent,
                    hang_s,
                )
                engine.kill()  # SIGKILL ends a stopped process too; its socket closes: the front ends answer 503
                engine.join(5)
        if not engine.is_alive():
            if not done.is_set():
                crashed.set()
                supervisor.should_exit.set()  # the supervisor's loop wakes, stops the front ends and returns
            return
        for p in list(supervisor.processes):
            if p.pid is not None:
                seen[p.pid] = p
        for pid, p in list(seen.items()):
            if p.exitcode is not None:
                multiprocess.mark_process_dead(pid)
                del seen[pid]
        time.sleep(0.1)


def _stop_engine(engine, stop) -> None:
    if engine.is_alive():
        stop.set()  # it fails what is left (nobody waits for it any more) and exits
        engine.join(10)
    if engine.is_alive():
        log.error("the model process did not stop in time: killing it")
        engine.kill()
        engine.join()
