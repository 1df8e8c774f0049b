"""A model's per-prompt numbers as arrays, and the layers read off them (L*, the attention-sink
layer, the massive-activation layer), so that the summary and every bootstrap resample of prompts
compute them by the same functions; and the intrinsic-dimension peak, which is the model's own
(one TwoNN fit over all its prompts) and not recomputed per resample."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sheafscope.measures import intrinsic, lstar

SINK_THRESHOLD = 0.5
LAYER_DEFINITIONS = {
    "sink_layer": f"first layer whose first-token attention mass (mean over heads, query positions i >= 1 and prompts) "
                  f"reaches {SINK_THRESHOLD}; empty if none",
    "massive_activation_layer": "layer l (0-based) whose output has the largest jump of max|hidden| over its input: "
                                "argmax_l M[l+1] / M[l], M the prompt-mean max |hidden state| (M[0] = embeddings)",
    "intrinsic_dimension_peak_layer": intrinsic.DEFINITION,
    "transition": lstar.TRANSITION_RULE,
}

Arrays = Mapping[str, np.ndarray]


@dataclass(frozen=True)
class ModelSample:
    """One model of a run as the claims see it: identity, shape, and arrays with prompts on axis 0
    (``layer_trace``, ``lstar_per_prompt`` where the empirical definition is per prompt,
    ``first_token_mass`` as head means, ``max_abs_hidden``)."""

    name: str
    lab: str
    L: int
    H: int
    arrays: dict[str, np.ndarray]
    row: Mapping[str, Any] = field(default_factory=dict)


def arrays_of(model: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The per-prompt arrays of a results.json model entry; fields a run did not record are absent."""
    prompts = model.get("prompts") or []
    out: dict[str, np.ndarray] = {}
    if prompts and all("layer_trace" in p for p in prompts):
        traces = np.array([p["layer_trace"] for p in prompts], dtype=np.float64)
        out["layer_trace"] = traces
        emp = lstar.DEFINITIONS[lstar.EMPIRICAL]
        if emp.over == "prompts":
            out["lstar_per_prompt"] = np.array([_nan(emp.layer(t)) for t in traces])
    if prompts and all(p.get("first_token_mass") is not None for p in prompts):
        out["first_token_mass"] = np.array([np.asarray(p["first_token_mass"], dtype=np.float64).mean(axis=1)
                                            for p in prompts])
    if prompts and all(p.get("max_abs_hidden") is not None for p in prompts):
        out["max_abs_hidden"] = np.array([p["max_abs_hidden"] for p in prompts], dtype=np.float64)
    return out


def _nan(value: int | float | None) -> float:
    return math.nan if value is None else float(value)


def empirical_lstar(arrays: Arrays) -> float | None:
    """The empirical L* (``lstar.EMPIRICAL``) of these prompts."""
    emp = lstar.DEFINITIONS[lstar.EMPIRICAL]
    if emp.over == "prompts" and "lstar_per_prompt" in arrays:
        return float(np.mean(arrays["lstar_per_prompt"]))
    if "layer_trace" not in arrays:
        return None
    traces = np.asarray(arrays["layer_trace"])
    if emp.over == "prompts":
        return float(np.mean([_nan(emp.layer(t)) for t in traces]))
    value = emp.layer(traces.mean(axis=0))
    return None if value is None else float(value)


def sink_layer(arrays: Arrays) -> int | None:
    """First layer whose prompt-mean first-token mass reaches SINK_THRESHOLD; None if none does."""
    if "first_token_mass" not in arrays:
        return None
    mass = np.asarray(arrays["first_token_mass"]).mean(axis=0)
    hits = np.flatnonzero(mass >= SINK_THRESHOLD)
    return int(hits[0]) if hits.size else None


def massive_activation_layer(arrays: Arrays) -> int | None:
    """The layer whose output's prompt-mean max|hidden| jumps most over its input."""
    if "max_abs_hidden" not in arrays:
        return None
    m = np.asarray(arrays["max_abs_hidden"]).mean(axis=0)
    if m.size < 2:
        return None
    ratio = m[1:] / np.maximum(m[:-1], 1e-30)
    return int(np.argmax(ratio))


def intrinsic_dimension_peak(model: Mapping[str, Any]) -> int | None:
    """The layer (0-based) whose output has the largest TwoNN intrinsic dimension, from a
    results.json model entry; None where the run did not compute one (too few prompts, or
    results from before the ID profile)."""
    block = model.get("intrinsic_dimension")
    peak = block.get("peak_layer") if isinstance(block, Mapping) else None
    return None if peak is None else int(peak)
