"""The model side: everything that touches the model, and the process split around it.

- ``batcher``: the dynamic batcher (queue, grouping, deadlines); ``runner`` and ``staging``: the model
  on its device (import torch).
- ``process``: the model process; owns the runner, the batcher and the device (imports torch).
- ``inproc`` and ``client``: the two engine clients (``service.engine_api.EngineClient``): ``InprocClient``
  runs the runner and the batcher in this process; ``MPClient`` (no torch) talks to the model process.
  Only ``service.app`` (the wiring) imports them, and the model process uses ``InprocClient``'s batcher.
- ``supervise``: the parent process: starts the model process, then uvicorn's own multi-worker
  supervisor over ``service.frontend.worker``; exits non-zero when the model process dies.
The messages between the sides are in ``service.messages``. Nothing here imports ``service.frontend``
or ``service.app`` (tests/unit/test_layout.py).
"""
