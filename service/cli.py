"""``mha-serve``: start uvicorn on the app, with settings from MHA_* and --host/--port."""

from __future__ import annotations

import argparse
import signal
import sys

import uvicorn
from pydantic import ValidationError

from service.app import create_app
from service.observability import configure_logging
from service.settings import Settings


class _Server(uvicorn.Server):
    """On SIGTERM/SIGINT, turn not-ready and refuse new work at once; uvicorn then finishes
    the requests in flight (up to the grace period) and runs the lifespan shutdown."""

    def __init__(self, config: uvicorn.Config, app) -> None:
        super().__init__(config)
        self._mha_state = app.state.mha

    def handle_exit(self, sig, frame) -> None:
        self._mha_state.draining = True
        super().handle_exit(sig, frame)
        if sig == signal.SIGTERM and sig in self._captured_signals:
            # A SIGTERM shutdown that drained cleanly is a success: exit 0, not -15.
            self._captured_signals.remove(sig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mha-serve", description="Serve multi-head attention over HTTP.")
    parser.add_argument("--host", help="address to bind (MHA_HOST, default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to bind (MHA_PORT, default 8000)")
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as e:
        lines = [
            f"  {'MHA_' + '_'.join(str(p) for p in err['loc']).upper() if err['loc'] else 'settings'}: {err['msg']}"
            for err in e.errors()
        ]
        print("mha-serve: invalid settings:\n" + "\n".join(lines), file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    app = create_app(settings=settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        log_config=None,  # keep our JSON handler
        timeout_graceful_shutdown=max(1, int(settings.shutdown_grace_s)),
        access_log=False,
    )
    server = _Server(config, app)
    server.run()
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
