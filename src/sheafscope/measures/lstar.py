"""Definitions of the transition layer L* (D9), each named, selectable, and recorded.

The notebooks use two different definitions and the author's published v3 run a third; they
give different numbers on the same traces, so results always say which one they are.

Adding a definition is one function (a layer trace -> a layer) and one entry in DEFINITIONS:
results.json, summary.csv, the report, the figures and the CLI table take it from there.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from sheafscope.outputs.bootstrap import bootstrap_ci
from sheafscope.outputs.formula import predict_lstar

FORMULA_TEXT = "L* = L * (0.11 + 0.012 L + 4.9 / H)"

# The definition the formula is tested against: notebook 001 fitted and scored it on its own.
EMPIRICAL = "diff"


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


@dataclass(frozen=True)
class LStarDefinition:
    """One L* definition: `layer` picks a layer from one layer trace, `over` says which traces.

    over="mean_trace": L* = layer(prompt-mean trace), stored as {"value"}, None where there is none.
    over="prompts": layer(trace) of every prompt, stored as {"per_prompt", "mean", "std"}; here
    `layer` must give a layer for every trace.
    """

    name: str
    definition: str
    source: str
    layer: Callable[[np.ndarray], int | None]
    over: Literal["mean_trace", "prompts"] = "mean_trace"

    @property
    def value_key(self) -> str:
        """Key of this definition's L* in its results.json block."""
        return "mean" if self.over == "prompts" else "value"

    @property
    def columns(self) -> tuple[str, ...]:
        """Its summary.csv columns: L* (then its std over prompts), then the bootstrap CI."""
        p = f"lstar_{self.name}"
        value = (f"{p}_mean", f"{p}_std") if self.over == "prompts" else (p,)
        return (*value, f"{p}_ci_low", f"{p}_ci_high")

    def block(self, layer_traces: np.ndarray) -> dict[str, Any]:
        """lstar[name] of results.json from a (prompts, layers) array of multi-head traces."""
        traces = np.asarray(layer_traces, dtype=np.float64)
        if self.over == "prompts":
            per_prompt = [self.layer(t) for t in traces]
            return {
                "per_prompt": per_prompt,
                "mean": float(np.mean(per_prompt)),
                "std": float(np.std(per_prompt)),  # population std, as notebook 001 (np.std)
                "definition": self.definition,
            }
        return {"value": self.layer(traces.mean(axis=0)), "definition": self.definition}

    def summary(self, block: dict[str, Any], layer_traces: np.ndarray, n_boot: int) -> dict[str, Any]:
        """Its summary.csv columns of one model, the CI a percentile bootstrap over prompts."""
        if self.over == "prompts":
            values = [block["mean"], block["std"]]
            samples = np.asarray(block["per_prompt"], dtype=float)
            _, lo, hi = bootstrap_ci(samples, lambda x: float(x.mean()), n_boot=n_boot)
        else:
            values = [block["value"]]
            # Resamples with no L* (None) are left out of the interval by bootstrap_ci (NaN).
            _, lo, hi = bootstrap_ci(np.asarray(layer_traces, dtype=np.float64),
                                     lambda t: _number(self.layer(t.mean(axis=0))), n_boot=n_boot)
        return dict(zip(self.columns, [*values, lo, hi]))


#: How many standard errors the largest step of the prompt-mean trace must exceed to count as a
#: transition rather than prompt-to-prompt noise.
FLAT_K = 3.0

TRANSITION_RULE = (
    "no transition when the largest layer-to-layer step of the prompt-mean trace, |m[l+1] - m[l]| at "
    f"l = argmax, is at most {FLAT_K:g} standard errors of that step over prompts (SE = sample std, "
    "ddof 1, of the per-prompt steps T_p[l+1] - T_p[l], divided by sqrt(P)); undecided with fewer "
    "than 2 prompts. Every L* of such a model is an argmax of noise: it is shown as \"no transition\" "
    "and left out of the verdicts."
)


def transition_test(layer_traces: np.ndarray, k: float = FLAT_K) -> dict[str, Any]:
    """Whether a (prompts, layers) array of traces has a layer step beyond prompt-to-prompt noise.

    Returns ``{"step_layer", "step", "step_se", "step_z", "flat"}``: the largest step of the mean
    trace (between ``step_layer`` and ``step_layer + 1``), its standard error over prompts and their
    ratio; ``flat`` is True when ``step <= k * step_se`` (a constant profile is flat), None when it
    cannot be judged (fewer than 2 prompts or 2 layers).
    """
    traces = np.atleast_2d(np.asarray(layer_traces, dtype=np.float64))
    n_prompts, n_layers = traces.shape
    if n_layers < 2:
        return {"step_layer": None, "step": None, "step_se": None, "step_z": None, "flat": None}
    steps = np.diff(traces, axis=1)
    mean_steps = steps.mean(axis=0)
    layer = int(np.argmax(np.abs(mean_steps)))
    step = float(abs(mean_steps[layer]))
    if n_prompts < 2:
        return {"step_layer": layer, "step": step, "step_se": None, "step_z": None, "flat": None}
    se = float(steps[:, layer].std(ddof=1) / np.sqrt(n_prompts))
    z = step / se if se > 0 else (math.inf if step > 0 else 0.0)
    return {"step_layer": layer, "step": step, "step_se": se, "step_z": float(z), "flat": bool(step <= k * se)}


def _number(layer: int | None) -> float:
    return np.nan if layer is None else float(layer)


DEFINITIONS: dict[str, LStarDefinition] = {
    d.name: d
    for d in [
        LStarDefinition(
            "gradient",
            "argmax_l |np.gradient(T)[l]|, T the prompt-mean multi-head layer trace; 0-based layer index",
            "notebook 000 (H4 v2 extended)",
            lstar_gradient,
        ),
        LStarDefinition(
            "diff",
            "per prompt argmax_l |T[l+1] - T[l]| + 1 (np.diff, 1-based boundary), then mean and std over prompts",
            "notebook 001 (cross-heritage v2)",
            lstar_diff,
            over="prompts",
        ),
        LStarDefinition(
            "sign_change",
            "first l >= 1 where np.gradient(T) changes sign from + (at l-1) to <= 0 (at l), T the prompt-mean "
            "layer trace; none if it never does",
            "the author's v3 run (l_star_sign_change_20260106_111315.json)",
            lstar_sign_change,
        ),
    ]
}


def lstar_block(layer_traces: np.ndarray, n_layers: int, n_heads: int) -> dict:
    """All L* definitions and the formula on a (prompts, layers) array of multi-head traces."""
    out: dict[str, Any] = {d.name: d.block(layer_traces) for d in DEFINITIONS.values()}
    emp = DEFINITIONS[EMPIRICAL]
    empirical = out[emp.name][emp.value_key]
    predicted = float(predict_lstar(n_layers, n_heads))
    out["formula"] = {
        "text": FORMULA_TEXT,
        "L": n_layers,
        "H": n_heads,
        "predicted": predicted,
        # D10: the formula can predict a layer past the last one; say so, never clip.
        "exceeds_L": bool(predicted > n_layers),
        "empirical": empirical,
        "error_pct": abs(predicted - empirical) / n_layers * 100.0,
        "error_definition": f"|predicted - empirical| / L * 100, empirical = {emp.name} {emp.value_key} ({emp.source})",
    }
    return out
