"""Draw the heatmap pictures of docs/client.md with mha_client's own plot code, from a running server.

    mha-serve &                                    # the built-in model (MHA_SEED=0)
    python docs/scripts/heatmaps.py http://127.0.0.1:8000

The input is seeded, so a server on the built-in model draws the same pictures each time.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from mha_client import Client, plot_weights

IMAGES = Path(__file__).resolve().parents[1] / "images"


def main(url: str) -> None:
    x = np.random.default_rng(0).standard_normal((1, 16, 512)).astype(np.float32)
    with Client(url) as mha:
        mha.wait_ready()
        every = mha.attend(x, return_weights=True)
        print(plot_weights(every, IMAGES / "heads-all.png"))
        two = mha.attend(x, heads=[0, 3])  # the response carries heads 0 and 3 only: label them so
        print(plot_weights(two, IMAGES / "heads-0-3.png", head_ids=[0, 3]))
        padded = mha.attend(x, lengths=[9], heads=[0], causal=False)
        w = padded.weights[0, :, :9, :9]  # positions past lengths[0] are padding: crop them, as the server does
        print(plot_weights(w, IMAGES / "head-0-noncausal-9.png", head_ids=[0], title="head 0, not causal, T = 9"))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8000")
