"""The front end: HTTP (/attend, the v2 protocol, the heatmap page) and gRPC, decoding and encoding.

Front-end modules reach the model only through ``state.engine``, an engine client
(``service.engine_api.EngineClient``, wired by ``service.app``) with the types of ``service.messages``; none imports
``service.engine`` (tests/unit/test_layout.py). ``worker`` is a front-end worker process's entry
(``MHA_WORKERS`` >= 2); it imports no torch.
"""
