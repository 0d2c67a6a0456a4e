"""The heatmap picture: a real PNG, one panel per head, colours that follow the weights."""

from __future__ import annotations

import io

import numpy as np
import pytest

pytest.importorskip("matplotlib")
import matplotlib.image as mpimg

from mha_client import AttendResult, plot_weights, render_heatmaps
from mha_client.plot import BOTTOM, DPI, GAP_X, LEFT, PANEL, TOP

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def decode(png: bytes) -> np.ndarray:
    return mpimg.imread(io.BytesIO(png), format="png")[..., :3]  # (height, width, RGB) floats in 0..1


def causal_weights(H: int, T: int, seed: int = 0) -> np.ndarray:
    w = np.tril(np.random.default_rng(seed).random((H, T, T)) + 0.1)
    return (w / w.sum(-1, keepdims=True)).astype(np.float32)


def test_png_with_one_panel_per_head_in_rows_of_four() -> None:
    one, four, eight = (decode(render_heatmaps(causal_weights(H, 8))) for H in (1, 4, 8))
    assert render_heatmaps(causal_weights(2, 8)).startswith(PNG_SIGNATURE)
    assert one.shape[1] < four.shape[1] == eight.shape[1]  # wider up to 4 heads ...
    assert one.shape[0] == four.shape[0] < eight.shape[0]  # ... then a second row
    assert four.shape[1] > four.shape[0]


def test_colours_follow_the_weights() -> None:
    """Head 0 attends only to key 0; sample the middle of cells (query 3, key 0) and (query 3, key 3)."""
    T = 4
    w = np.zeros((2, T, T), np.float32)
    w[0, :, 0] = 1.0
    w[1] = np.eye(T)
    img = decode(render_heatmaps(w, dpi=DPI))
    cell = PANEL * DPI / T

    def pixel(panel: int, query: int, key: int) -> np.ndarray:
        x = (LEFT + panel * (PANEL + GAP_X)) * DPI + (key + 0.5) * cell
        y = TOP * DPI + (query + 0.5) * cell
        return img[round(y), round(x)]

    one, zero = pixel(0, 3, 0), pixel(0, 3, 3)
    assert np.abs(one - zero).sum() > 0.5, (one, zero)
    np.testing.assert_allclose(pixel(1, 3, 3), one, atol=0.02)  # the diagonal of head 1 has the same colour
    np.testing.assert_allclose(pixel(1, 3, 0), zero, atol=0.02)
    assert img.shape[0] == round((TOP + PANEL + BOTTOM) * DPI)


def test_render_checks_its_input() -> None:
    with pytest.raises(ValueError, match=r"\[H, T, T\]"):
        render_heatmaps(np.zeros((2, 3, 4)))
    with pytest.raises(ValueError, match="head_ids names 1 heads, but weights has 2"):
        render_heatmaps(np.zeros((2, 3, 3)), head_ids=[0])
    with pytest.raises(ValueError, match="NaN"):
        render_heatmaps(np.full((1, 2, 2), np.nan))


def test_plot_weights_from_a_result(tmp_path) -> None:
    w = causal_weights(4, 6)[None]
    res = AttendResult(np.zeros((1, 6, 8)), w, 0.0, 0.0, 1, "r", {"name": "tiny", "num_heads": 4})
    path = plot_weights(res, tmp_path / "all.png")
    assert path.read_bytes().startswith(PNG_SIGNATURE)
    two = decode(plot_weights(w, tmp_path / "two.png", heads=[1, 3]).read_bytes())
    assert two.shape[1] < decode(path.read_bytes()).shape[1]
    with pytest.raises(ValueError, match="one sequence at a time"):
        plot_weights(np.zeros((2, 4, 6, 6)), tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"out of range 0\.\.3"):
        plot_weights(w, tmp_path / "x.png", heads=[4])
    with pytest.raises(ValueError, match="return_weights=True"):
        plot_weights(AttendResult(np.zeros((1, 6, 8)), None, 0, 0, 1, "r", {}), tmp_path / "x.png")
