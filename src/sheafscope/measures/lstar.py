"""Definitions of the transition layer L* (D9), each named, selectable, and recorded.

The notebooks use two different definitions and the author's published v3 run a third; they
give different numbers on the same traces, so results always say which one they are.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sheafscope.outputs import stats

FORMULA_TEXT = "L* = L * (0.11 + 0.012 L + 4.9 / H)"


@dataclass(frozen=True)
class LStarDefinition:
    name: str
    definition: str
    source: str


DEFINITIONS: dict[str, LStarDefinition] = {
    d.name: d
    for d in [
        LStarDefinition(
            "gradient",
            "argmax_l |np.gradient(T)[l]|, T the prompt-mean multi-head layer trace; 0-based layer index",
            "notebook 000 (H4 v2 extended)",
        ),
        LStarDefinition(
            "diff",
            "per prompt argmax_l |T[l+1] - T[l]| + 1 (np.diff, 1-based boundary), then mean and std over prompts",
            "notebook 001 (cross-heritage v2)",
        ),
        LStarDefinition(
            "sign_change",
            "first l >= 1 where np.gradient(T) changes sign from + (at l-1) to <= 0 (at l), T the prompt-mean "
            "layer trace; none if it never does",
            "the author's v3 run (l_star_sign_change_20260106_111315.json)",
        ),
    ]
}


def lstar_gradient(mean_layer_trace: np.ndarray) -> int:
    """Notebook 000: argmax |np.gradient| of the prompt-mean layer trace (0-based)."""
    t = np.asarray(mean_layer_trace, dtype=np.float64)
    if t.size < 2:
        return 0
    return int(np.argmax(np.abs(np.gradient(t))))


def lstar_diff(layer_trace: np.ndarray) -> int:
    """Notebook 001, one prompt: argmax |np.diff| + 1."""
    t = np.asarray(layer_trace, dtype=np.float64)
    if t.size < 2:
        return 0
    return int(np.argmax(np.abs(np.diff(t)))) + 1


def lstar_sign_change(mean_layer_trace: np.ndarray) -> int | None:
    """v3: first layer where d/dl Tr goes from positive to non-positive; None if never."""
    t = np.asarray(mean_layer_trace, dtype=np.float64)
    if t.size < 3:
        return None
    g = np.gradient(t)
    for layer in range(1, len(g)):
        if g[layer - 1] > 0 >= g[layer]:
            return layer
    return None


def predict_lstar(n_layers: int, n_heads: int) -> float:
    """The formula under test (notebook 001's predict_l_star_v3)."""
    return float(stats.predict_lstar(n_layers, n_heads))


def lstar_block(layer_traces: np.ndarray, n_layers: int, n_heads: int) -> dict:
    """All L* definitions and the formula on a (prompts, layers) array of multi-head traces."""
    traces = np.asarray(layer_traces, dtype=np.float64)
    mean = traces.mean(axis=0)
    per_prompt = [lstar_diff(t) for t in traces]
    diff_mean = float(np.mean(per_prompt))
    predicted = predict_lstar(n_layers, n_heads)
    return {
        "gradient": {"value": lstar_gradient(mean), "definition": DEFINITIONS["gradient"].definition},
        "diff": {
            "per_prompt": per_prompt,
            "mean": diff_mean,
            "std": float(np.std(per_prompt)),  # population std, as notebook 001 (np.std)
            "definition": DEFINITIONS["diff"].definition,
        },
        "sign_change": {"value": lstar_sign_change(mean), "definition": DEFINITIONS["sign_change"].definition},
        "formula": {
            "text": FORMULA_TEXT,
            "L": n_layers,
            "H": n_heads,
            "predicted": predicted,
            # D10: the formula can predict a layer past the last one; say so, never clip.
            "exceeds_L": bool(predicted > n_layers),
            "empirical": diff_mean,
            "error_pct": abs(predicted - diff_mean) / n_layers * 100.0,
            "error_definition": "|predicted - empirical| / L * 100, empirical = diff mean (notebook 001)",
        },
    }


