"""The model side: everything that touches the model, and the process split around it.

- ``batcher``: the dynamic batcher (queue, grouping, deadlines); ``runner`` and ``staging``: the model
  on its device (import torch).
- ``process``: the model process; owns the runner, the batcher and the device (imports torch).
- ``client``: the front end's ``EngineClient``, with the batcher's ``infer`` interface (no torch); only
  ``service.app`` (the wiring) imports it.
- ``supervise``: the parent process: starts the model process, then uvicorn's own multi-worker
  supervisor over ``service.frontend.worker``; exits non-zero when the model process dies.
The messages between the sides are in ``service.messages``. Nothing here imports ``service.frontend``
or ``service.app`` (tests/unit/test_layout.py).
"""
