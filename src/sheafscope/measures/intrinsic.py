"""The intrinsic-dimension (ID) profile: per residual stream, the TwoNN intrinsic dimension of the
prompts' hidden states, and the layer where it peaks.

The estimator is scikit-dimension's TwoNN (Facco et al. 2017), not one of our own. Each prompt is
one point per stream: the mean of that stream over its positions 1..n-1 (``PromptCapture.pooled``).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np

ESTIMATOR = "skdim TwoNN"
# TwoNN reads the ratio of each point's two nearest-neighbour distances and discards the largest
# tenth; with fewer points the fitted slope is too noisy to rank layers by.
MIN_POINTS = 20

DEFINITION = (
    "TwoNN intrinsic dimension (scikit-dimension, skdim.id.TwoNN with its defaults) of the prompts' hidden "
    "states per residual stream (embeddings, then after each layer): one point per prompt, the float32 mean of "
    "that stream over positions 1..n-1 (position 0, the attention sink, carries massive activations that would "
    "dominate the mean). peak_layer: the 0-based layer l whose output (stream l + 1) has the largest ID, over "
    f"streams 1..L (the embeddings are not a layer), the same indexing as L* gradient; null with fewer than "
    f"{MIN_POINTS} measured prompts, and why_none says so."
)


def twonn(points: np.ndarray) -> float | None:
    """TwoNN ID of `points` (P, d); None where the estimate is not a finite number (e.g. every
    point a duplicate)."""
    import skdim

    with warnings.catch_warnings():
        # duplicate prompts give duplicate points: skdim drops them with a warning
        warnings.simplefilter("ignore")
        try:
            value = float(skdim.id.TwoNN().fit(np.asarray(points, dtype=np.float64)).dimension_)
        except ValueError:  # too few distinct points left to fit
            return None
    return value if math.isfinite(value) else None


def id_profile(pooled: np.ndarray) -> dict[str, Any]:
    """The ID profile of pooled hidden states (P prompts, L + 1 streams, d): per stream, the peak
    layer (0-based, see DEFINITION), the number of points, the estimator, and why there is none."""
    pooled = np.asarray(pooled)
    if pooled.ndim != 3:
        raise ValueError(f"pooled hidden states must be (prompts, streams, d), not shape {pooled.shape}")
    n_points, n_streams = pooled.shape[0], pooled.shape[1]
    out: dict[str, Any] = {"per_stream": [None] * n_streams, "peak_layer": None, "n_points": int(n_points),
                           "estimator": ESTIMATOR, "why_none": None}
    if n_points < MIN_POINTS:
        out["why_none"] = (f"{n_points} measured prompt(s): TwoNN needs at least {MIN_POINTS} points "
                           "(one per prompt) to estimate a dimension")
        return out
    per_stream = [twonn(pooled[:, s]) for s in range(n_streams)]
    out["per_stream"] = per_stream
    layers = [(v, s - 1) for s, v in enumerate(per_stream) if s >= 1 and v is not None]
    if not layers:
        out["why_none"] = "TwoNN gave no finite estimate for any layer's output (duplicate points?)"
        return out
    out["peak_layer"] = max(layers, key=lambda t: t[0])[1]
    return out


def unavailable(why: str, n_points: int = 0) -> dict[str, Any]:
    """An ID profile that could not be computed, and why."""
    return {"per_stream": [], "peak_layer": None, "n_points": int(n_points), "estimator": ESTIMATOR, "why_none": why}
