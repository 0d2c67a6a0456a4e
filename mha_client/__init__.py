"""mha_client: a Python client for mha-serve (httpx and numpy; matplotlib only to draw heatmaps)."""

__version__ = "0.1.0"

from mha_client.client import (
    AsyncClient,
    AsyncSequence,
    AttendResult,
    Client,
    MhaClientError,
    MhaConnectionError,
    MhaError,
    MhaHTTPError,
    MhaOverloaded,
    MhaSequenceLost,
    MhaServerError,
    RetryPolicy,
    Sequence,
)
from mha_client.plot import plot_weights, render_heatmaps

__all__ = [
    "AsyncClient",
    "AsyncSequence",
    "AttendResult",
    "Client",
    "MhaClientError",
    "MhaConnectionError",
    "MhaError",
    "MhaHTTPError",
    "MhaOverloaded",
    "MhaSequenceLost",
    "MhaServerError",
    "RetryPolicy",
    "Sequence",
    "__version__",
    "plot_weights",
    "render_heatmaps",
]
