"""mha_client: a Python client for mha-serve (httpx and numpy; matplotlib only to draw heatmaps)."""

__version__ = "0.1.0"

from mha_client.client import (
    AsyncClient,
    AttendResult,
    Client,
    MhaClientError,
    MhaConnectionError,
    MhaError,
    MhaHTTPError,
    MhaOverloaded,
    MhaServerError,
    RetryPolicy,
)
from mha_client.plot import plot_weights, render_heatmaps

__all__ = [
    "AsyncClient",
    "AttendResult",
    "Client",
    "MhaClientError",
    "MhaConnectionError",
    "MhaError",
    "MhaHTTPError",
    "MhaOverloaded",
    "MhaServerError",
    "RetryPolicy",
    "__version__",
    "plot_weights",
    "render_heatmaps",
]
