"""Heatmaps of attention weights: one panel per head, key positions across, query positions down.

matplotlib is optional for the client and imported only when a picture is drawn. No pyplot: a
``Figure`` with its own Agg canvas holds no global state, so pictures can be drawn in threads.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

MAX_COLUMNS = 4
DPI = 100
# Layout, in inches: each panel is PANEL square; margins leave room for labels, titles and the bar.
PANEL, GAP_X, GAP_Y = 2.4, 0.45, 0.6
LEFT, RIGHT, TOP, BOTTOM = 0.75, 1.1, 0.75, 0.55


def render_heatmaps(
    weights: np.ndarray, *, head_ids: Sequence[int] | None = None, title: str | None = None, dpi: int = DPI
) -> bytes:
    """PNG bytes of weights [H, T, T]: panels in rows of up to 4, one shared colour scale and bar."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    w = np.asarray(weights, dtype=np.float32)
    if w.ndim != 3 or w.shape[1] != w.shape[2] or w.shape[0] < 1 or w.shape[1] < 1:
        raise ValueError(f"weights must have shape [H, T, T] with H, T >= 1, got {list(w.shape)}")
    H, T, _ = w.shape
    ids = list(range(H)) if head_ids is None else [int(h) for h in head_ids]
    if len(ids) != H:
        raise ValueError(f"head_ids names {len(ids)} heads, but weights has {H}")
    if not np.isfinite(w).all():
        raise ValueError("weights contain NaN or Inf")

    ncols = min(H, MAX_COLUMNS)
    nrows = math.ceil(H / ncols)
    # A fixed layout in inches (constrained layout measured every label: half the drawing time).
    width = LEFT + ncols * PANEL + (ncols - 1) * GAP_X + RIGHT
    height = TOP + nrows * PANEL + (nrows - 1) * GAP_Y + BOTTOM
    fig = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(fig)
    vmax = max(float(w.max()), 1e-12)
    image = None
    for i, h in enumerate(ids):
        row, col = divmod(i, ncols)
        left = LEFT + col * (PANEL + GAP_X)
        bottom = height - TOP - (row + 1) * PANEL - row * GAP_Y
        ax = fig.add_axes((left / width, bottom / height, PANEL / width, PANEL / height))
        image = ax.imshow(w[i], cmap="viridis", vmin=0.0, vmax=vmax, interpolation="nearest", origin="upper")
        ax.set_title(f"head {h}", fontsize=10, pad=4)
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_locator(MaxNLocator(nbins=5, integer=True))
        ax.tick_params(labelsize=8, length=2)
        if i + ncols >= H:  # nothing below this panel
            ax.set_xlabel("key position", fontsize=9)
        if col == 0:
            ax.set_ylabel("query position", fontsize=9)
    grid_top = height - TOP
    grid_bottom = BOTTOM
    cax = fig.add_axes(
        ((width - RIGHT + 0.25) / width, grid_bottom / height, 0.15 / width, (grid_top - grid_bottom) / height)
    )
    fig.colorbar(image, cax=cax, label="attention weight")
    cax.tick_params(labelsize=8)
    fig.suptitle(title if title is not None else f"attention weights, T = {T}", fontsize=11, y=1 - 0.12 / height)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def plot_weights(
    weights: Any,
    path: str | Path,
    *,
    heads: Sequence[int] | None = None,
    head_ids: Sequence[int] | None = None,
    title: str | None = None,
) -> Path:
    """Write the heatmap PNG of one sequence's weights to ``path``; returns the path.

    Args:
        weights: [H, T, T] or [1, H, T, T] (numpy or torch), or an ``AttendResult`` asked with
            ``return_weights=True``.
        heads: which of those H heads to draw (indices into the H axis). Default: all.
        head_ids: the labels of the H heads, when the response carries a subset (say you asked
            for ``heads=[1, 3]``: pass ``head_ids=[1, 3]``). Default: 0..H-1.
        title: the figure's title. Default: the model's name (from a result) and T.
    """
    from mha_client._wire import to_numpy

    model = getattr(weights, "model", None)
    if hasattr(weights, "output") and hasattr(weights, "weights"):
        if weights.weights is None:
            raise ValueError("this result has no weights: ask with return_weights=True")
        weights = weights.weights
    w = to_numpy(weights, "weights").astype(np.float32, copy=False)
    if w.ndim == 4:
        if w.shape[0] != 1:
            raise ValueError(f"plot one sequence at a time: weights has B = {w.shape[0]} (shape {list(w.shape)})")
        w = w[0]
    if w.ndim != 3:
        raise ValueError(f"weights must have shape [H, T, T] or [1, H, T, T], got {list(w.shape)}")
    ids = list(range(w.shape[0])) if head_ids is None else [int(h) for h in head_ids]
    if len(ids) != w.shape[0]:
        raise ValueError(f"head_ids names {len(ids)} heads, but weights has {w.shape[0]}")
    if heads is not None:
        pick = [int(h) for h in heads]
        for h in pick:
            if not 0 <= h < w.shape[0]:
                raise ValueError(f"head {h} is out of range 0..{w.shape[0] - 1}")
        w, ids = w[pick], [ids[h] for h in pick]
    if title is None and model:
        title = f"{model.get('name', 'model')} ({model.get('num_heads', '?')} heads), T = {w.shape[-1]}"
    out = Path(path)
    out.write_bytes(render_heatmaps(w, head_ids=ids, title=title))
    return out
