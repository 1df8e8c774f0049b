"""The claims a run tests, each one entry of CLAIMS, and the numbers that judge them.

Every claim is judged the same way: the mean error of the predictor under test, in % of L, over
the trained models that show a transition; a bootstrap interval over models and over prompts
within models; notebook 001's thresholds; and the same numbers for each baseline, with the paired
difference claim - baseline. Random-init twins are controls and never enter; a model whose
profile is flat (``lstar.TRANSITION_RULE``) has no L* to test and is listed instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from sheafscope.measures import lstar
from sheafscope.outputs import crossval, samples
from sheafscope.outputs.bootstrap import nested_bootstrap
from sheafscope.outputs.formula import (
    MIN_MODELS_FOR_VERDICT,
    VERDICT_THRESHOLDS,
    error_pct_of_L,
    error_pct_of_lstar,
    verdict,
)
from sheafscope.outputs.samples import Arrays, ModelSample

LEVEL = 0.95
N_BOOT = 1000
_EMP = lstar.DEFINITIONS[lstar.EMPIRICAL]
EMPIRICAL_LABEL = f"empirical L* ({_EMP.name} definition, {_EMP.source})"


@dataclass(frozen=True)
class Claim:
    """One claim: a predictor of a layer (``target_of``) and the baselines it has to beat.

    ``predictors`` maps a frame of the scored models (``model, lab, L, H``, the measured ``lstar``
    and ``lstar_empirical``, which holds the target layer) to each predictor's per-model layer;
    ``claimed`` names the one under test, ``labels`` describe them all.
    """

    key: str
    claim: str
    target: str
    target_of: Callable[[Arrays, Mapping[str, Any]], float | None]
    predictors: Callable[[pd.DataFrame], Mapping[str, np.ndarray]]
    claimed: str
    labels: Mapping[str, str]
    verdict_of: Callable[[float, int], str]
    also_pct_of_target: bool = False
    interval_note: str = ""  # how the interval treats this claim's target, where it differs


def _layer_verdict(value: float, n: int) -> str:
    # The formula's thresholds, in words for a claim about a layer.
    return verdict(value, n, labels=("HOLDS", "PARTLY HOLDS", "DOES NOT HOLD"))


def _layer_predictors(df: pd.DataFrame) -> dict[str, np.ndarray]:
    # The same trivial predictors as for the formula: a fixed fraction of depth, fitted on other labs.
    L = df["L"].to_numpy(dtype=float)
    ratio = crossval.baseline_ratio(df)
    return {
        "lstar": df["lstar"].to_numpy(dtype=float),
        "half": 0.5 * L,
        "ratio_cv": np.array([r["lstar_predicted"] for r in ratio["per_model"]], dtype=float),
    }


_LAYER_LABELS = {
    "half": "L / 2",
    "ratio_cv": "c · L, c the median ratio of the other labs (leave one lab out)",
}


def layer_claim(key: str, layer: str, target_of: Callable[[Arrays, Mapping[str, Any]], float | None],
                interval_note: str = "") -> Claim:
    """The claim "L* is the <layer>" (e.g. the attention-sink layer): L* as its predictor."""
    return Claim(
        key=key,
        claim=f"L* is the {layer}",
        target=layer,
        target_of=target_of,
        predictors=_layer_predictors,
        claimed="lstar",
        labels={"lstar": f"{EMPIRICAL_LABEL}", **_LAYER_LABELS},
        verdict_of=_layer_verdict,
        interval_note=interval_note,
    )


def _empirical(arrays: Arrays, row: Mapping[str, Any]) -> float | None:
    return samples.empirical_lstar(arrays)


def _id_peak(arrays: Arrays, row: Mapping[str, Any]) -> float | None:
    # The summary row's point estimate: a TwoNN fit per resample would be slow, and resampled
    # prompts repeat points, which TwoNN cannot use (a zero nearest-neighbour distance).
    value = row.get("intrinsic_dimension_peak_layer")
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


CLAIMS: list[Claim] = [
    Claim(
        key="formula",
        claim="L* = L·(0.11 + 0.012·L + 4.9/H) predicts the transition layer",
        target=EMPIRICAL_LABEL,
        target_of=_empirical,
        predictors=crossval.predictions,
        claimed="formula_published",
        labels={
            "formula_published": "the published formula",
            "formula_refit_cv": "the formula's 3 coefficients refit on the other labs (leave one lab out)",
            "half": "L / 2",
            "ratio_cv": "c · L, c the median L*/L of the other labs (leave one lab out)",
        },
        verdict_of=verdict,
        also_pct_of_target=True,
    ),
    layer_claim("sink", "attention-sink layer", lambda a, row: samples.sink_layer(a)),
    layer_claim("massive_activation", "massive-activation layer", lambda a, row: samples.massive_activation_layer(a)),
    layer_claim("intrinsic_dimension", "intrinsic-dimension peak", _id_peak,
                interval_note="; the intrinsic-dimension peak is each model's point estimate (one TwoNN fit over all "
                              "its prompts) in every resample, not refit: resampled prompts repeat points, which "
                              "TwoNN cannot use, so only L* and the models carry the interval's variation"),
]


# --------------------------------------------------------------------------- which models count


def select(models: Sequence[Mapping[str, Any]], summary: pd.DataFrame) -> tuple[list[ModelSample], dict[str, list[str]]]:
    """The trained models that can be evidence, and the others by the reason they are not."""
    rows = {str(r["spec"]): r for r in summary.to_dict(orient="records")} if "spec" in summary else {}
    kept: list[ModelSample] = []
    excluded: dict[str, list[str]] = {"random-init controls": [], "no transition": [], "failed": []}
    for m in models:
        name = str(m.get("spec") or m.get("model_id"))
        if m.get("status") != "ok":
            excluded["failed"].append(name)
            continue
        if m.get("init") == "random":
            excluded["random-init controls"].append(name)
            continue
        row = rows.get(name, {})
        if bool(row.get("no_transition")):
            excluded["no transition"].append(name)
            continue
        arrays = samples.arrays_of(m)
        if "layer_trace" not in arrays:
            excluded["failed"].append(name)
            continue
        lab = (m.get("metadata") or {}).get("lab") or "unknown"
        kept.append(ModelSample(name, str(lab), int(m["n_layers"]), int(m["n_heads"]), arrays, row))
    return kept, {k: v for k, v in excluded.items() if v}


# --------------------------------------------------------------------------- judging one claim


def evaluate(claim: Claim, models: Sequence[ModelSample], excluded: Mapping[str, list[str]],
             n_boot: int = N_BOOT, level: float = LEVEL, seed: int = 0) -> dict[str, Any]:
    """The claim's verdict, its interval, n, thresholds and baselines, as plain JSON values."""
    baselines = [p for p in claim.labels if p != claim.claimed]
    base = pd.DataFrame({"model": [m.name for m in models], "lab": [m.lab for m in models],
                         "L": [m.L for m in models], "H": [m.H for m in models]})
    L = base["L"].to_numpy(dtype=float)

    def measure(j: int, arrays: Arrays) -> dict[str, float | None]:
        return {"lstar": samples.empirical_lstar(arrays), "target": claim.target_of(arrays, models[j].row)}

    def errors_of(q: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        target = q["target"]
        preds = claim.predictors(base.assign(lstar=q["lstar"], lstar_empirical=target))
        out = {p: np.asarray(error_pct_of_L(preds[p], target, L), dtype=float) for p in claim.labels}
        if claim.also_pct_of_target:
            out.update({f"{p} (% of target)": np.asarray(error_pct_of_lstar(preds[p], target), dtype=float)
                        for p in claim.labels})
        return out

    # Below the verdict's minimum there is nothing to judge: the numbers alone, no interval (its
    # refits per resample are the slow part of a run's analysis).
    judged = len(models) >= MIN_MODELS_FOR_VERDICT
    n_boot = n_boot if judged else 0
    if models:
        boot = nested_bootstrap([m.arrays for m in models], measure, errors_of,
                                pairs=[(claim.claimed, b) for b in baselines], n_boot=max(n_boot, 1), level=level, seed=seed)
        if not judged:
            nan2 = [math.nan, math.nan]
            boot = {k: {**v, "ci": nan2, "ci_models": nan2, "ci_prompts": nan2} for k, v in boot.items()}
    else:
        boot = {}
    main = boot.get(claim.claimed) or _empty()
    n = int(main["n"])
    result_verdict = claim.verdict_of(main["estimate"], n)
    scored = _scored_names(models, measure, claim)
    missing = [m.name for m in models if m.name not in scored]
    excluded = {**excluded, **({f"no {claim.target}": missing} if missing else {})}
    out: dict[str, Any] = {
        "key": claim.key,
        "claim": claim.claim,
        "predicts": claim.target,
        "statistic": "mean |predicted - measured| / L x 100 over the trained models that show a transition",
        "claimed": claim.claimed,
        "claimed_label": claim.labels[claim.claimed],
        **main,
        "level": level,
        "n_boot": n_boot,
        "interval_note": claim.interval_note.removeprefix("; ") or None,
        "interval_method": ("percentile bootstrap; ci: models resampled, and each model's prompts resampled "
                            "with every L*, layer and refit recomputed; ci_models, ci_prompts: one level alone"
                            + claim.interval_note
                            if judged else f"none: fewer than {MIN_MODELS_FOR_VERDICT} trained models, numbers only"),
        "thresholds": {"validated_below_pct": VERDICT_THRESHOLDS[0], "partial_below_pct": VERDICT_THRESHOLDS[1],
                       "source": "notebook 001"},
        "verdict": result_verdict,
        "settled": _settled(main["ci"]) if n >= MIN_MODELS_FOR_VERDICT else False,
        "models": scored,
        "excluded": {k: list(v) for k, v in excluded.items()},
        "baselines": [_baseline(claim, b, boot) for b in baselines],
    }
    if claim.also_pct_of_target:
        out["pct_of_target"] = {p: boot.get(f"{p} (% of target)") or _empty() for p in claim.labels}
    out["baseline_to_beat"] = _best_baseline(out["baselines"])
    out["verdict_reason"] = _reason(out)
    return out


def _empty() -> dict[str, Any]:
    nan2 = [math.nan, math.nan]
    return {"estimate": math.nan, "n": 0, "ci": nan2, "ci_models": nan2, "ci_prompts": nan2}


def _scored_names(models: Sequence[ModelSample], measure: Callable[[int, Arrays], Mapping[str, Any]],
                  claim: Claim) -> list[str]:
    names = []
    for j, m in enumerate(models):
        q = measure(j, m.arrays)
        if q["lstar"] is not None and q["target"] is not None and math.isfinite(float(q["target"])):
            names.append(m.name)
    return names


def _settled(ci: Sequence[float]) -> bool:
    # Settled when the whole interval falls in one band of the thresholds.
    lo, hi = ci
    if math.isnan(lo) or math.isnan(hi):
        return False
    bands = [-math.inf, *VERDICT_THRESHOLDS, math.inf]
    return any(a <= lo and hi < b for a, b in zip(bands, bands[1:]))


def _baseline(claim: Claim, name: str, boot: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    own = boot.get(name) or _empty()
    diff = boot.get(f"{claim.claimed} - {name}") or _empty()
    lo, hi = diff["ci"]
    if diff["n"] == 0:
        beaten = "not scored"
    elif hi < 0:
        beaten = "yes"
    elif lo > 0:
        beaten = "no: the baseline is better"
    else:
        beaten = "not distinguishable"
    return {"name": name, "label": claim.labels[name], **own, "difference": diff, "beaten": beaten}


def _best_baseline(baselines: Sequence[Mapping[str, Any]]) -> str | None:
    scored = [b for b in baselines if b["n"] > 0 and math.isfinite(b["estimate"])]
    return min(scored, key=lambda b: b["estimate"])["name"] if scored else None


def _reason(out: Mapping[str, Any]) -> str:
    n, est, (lo, hi) = out["n"], out["estimate"], out["ci"]
    excl = out["excluded"]
    left_out = (" (left out: " + "; ".join(f"{len(models)} {why}" for why, models in excl.items() if models) + ")"
                if any(excl.values()) else "")
    if n < MIN_MODELS_FOR_VERDICT:
        return (f"no verdict: {n} trained model(s) could be scored{left_out}; a verdict needs at least "
                f"{MIN_MODELS_FOR_VERDICT}, so only the numbers are shown")
    t1, t2 = VERDICT_THRESHOLDS
    where = ("the interval lies within one band, so the verdict stands for these data" if out["settled"]
             else "the interval crosses a threshold, so these data do not settle the verdict")
    text = (f"{est:.1f} % of L over {n} trained model(s){left_out}, {int(out['level'] * 100)} % interval "
            f"[{lo:.1f}, {hi:.1f}], against < {t1:g} % validated and < {t2:g} % partial (notebook 001); {where}")
    best = next((b for b in out["baselines"] if b["name"] == out["baseline_to_beat"]), None)
    if best is not None:
        text += (f"; against the best baseline ({best['label']}, {best['estimate']:.1f} %) the claim's error is "
                 f"{best['difference']['estimate']:+.1f} points (positive: the baseline does better), "
                 f"beaten: {best['beaten']}")
    return text


def evaluate_all(models: Sequence[Mapping[str, Any]], summary: pd.DataFrame, n_boot: int = N_BOOT,
                 claims: Sequence[Claim] | None = None) -> list[dict[str, Any]]:
    """Every claim of ``claims`` (default CLAIMS) on a run's models."""
    kept, excluded = select(models, summary)
    return [evaluate(c, kept, excluded, n_boot=n_boot) for c in (CLAIMS if claims is None else claims)]
