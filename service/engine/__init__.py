"""The process split: one model process per device (``process``) fed by front-end processes.

- ``process``: the model process; owns the runner, the batcher and the device (imports torch).
- ``client``: the front end's ``EngineClient``, with the batcher's ``infer`` interface (no torch).
- ``frontend``: the uvicorn app factory of a front-end worker (``MHA_WORKERS`` >= 2).
- ``supervise``: the parent process: starts the model process, then uvicorn's own multi-worker
  supervisor; exits non-zero when the model process dies.
The messages between them are in ``service.messages``.
"""
