"""The published transition-layer formula, its two error scales, notebook 001's verdict and its
MAPE-by-lab table.

The claim is that a model with ``L`` layers and ``H`` attention heads has its transition layer at
``L* = L * (0.11 + 0.012 L + 4.9 / H)``. Notebook 001 divides the error by ``L`` (which flatters
the formula on deep models); the usual MAPE divides by the empirical L*. Both are always reported.

Pure numpy / pandas: no torch, no I/O. Dict results hold plain Python values so they go to JSON as
is (missing values are ``float('nan')``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

#: Published coefficients (a, b, c) of ``L* = L * (a + b L + c / H)``.
FORMULA_COEFFICIENTS: tuple[float, float, float] = (0.11, 0.012, 4.9)

#: Notebook 001's verdict thresholds on the MAPE-of-L, in percent: below the first the formula
#: "generalizes", below the second it "partially" does.
VERDICT_THRESHOLDS: tuple[float, float] = (10.0, 15.0)

#: Fewer trained models than this give numbers but no verdict: two points say nothing about a
#: three-coefficient law.
MIN_MODELS_FOR_VERDICT = 3

NO_VERDICT = "NO VERDICT"
NO_DATA = "NO DATA"
#: What `verdict` returns when it cannot judge: the numbers, not a verdict.
NOT_VERDICTS = (NO_DATA, NO_VERDICT)

ArrayLike = float | int | Sequence[float] | np.ndarray

# ---------------------------------------------------------------------------
# The formula and its error scales
# ---------------------------------------------------------------------------


def _as_result(x: np.ndarray) -> float | np.ndarray:
    # Scalars in, plain float out: callers put these straight into JSON/f-strings.
    return float(x) if np.ndim(x) == 0 else x


def predict_lstar(
    L: ArrayLike,
    H: ArrayLike,
    coef: Sequence[float] = FORMULA_COEFFICIENTS,
) -> float | np.ndarray:
    """Predicted transition layer ``L * (a + b L + c / H)``.

    Args:
        L: number of layers (scalar or array).
        H: number of attention heads (scalar or array, broadcast against ``L``).
        coef: ``(a, b, c)``; defaults to the published :data:`FORMULA_COEFFICIENTS`.

    Returns:
        A float for scalar inputs, otherwise an array of the broadcast shape.
        The prediction is *not* clipped to ``[0, L]``: that it can exceed ``L``
        (e.g. L=30, H=9 gives 30.44) is itself a finding.

    Raises:
        ValueError: if ``coef`` does not have three entries or any ``H`` is 0.
    """
    a, b, c = _three(coef)
    L_arr = np.asarray(L, dtype=float)
    H_arr = np.asarray(H, dtype=float)
    if np.any(H_arr == 0):
        raise ValueError("predict_lstar: H (number of heads) must be non-zero")
    return _as_result(L_arr * (a + b * L_arr + c / H_arr))


def _three(coef: Sequence[float]) -> tuple[float, float, float]:
    values = np.asarray(coef, dtype=float).ravel()
    if values.size != len(FORMULA_COEFFICIENTS):
        raise ValueError(f"formula coefficients must be (a, b, c); got {values.size} values")
    return float(values[0]), float(values[1]), float(values[2])


def _safe_ratio_pct(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    # Division by zero has no meaningful percentage; NaN keeps it out of nanmeans
    # instead of poisoning them with inf.
    out = np.full(np.broadcast(num, den).shape, np.nan)
    np.divide(num, den, out=out, where=np.broadcast_to(den != 0, out.shape))
    return out * 100.0


def error_pct_of_L(
    predicted: ArrayLike, empirical: ArrayLike, L: ArrayLike
) -> float | np.ndarray:
    """Notebook 001's error: ``|predicted - empirical| / L * 100``.

    Dividing by the depth rather than by L* makes errors on deep models look
    small; read it next to :func:`error_pct_of_lstar`.  NaN where ``L == 0`` or
    an input is NaN.
    """
    diff = np.abs(np.asarray(predicted, dtype=float) - np.asarray(empirical, dtype=float))
    return _as_result(_safe_ratio_pct(diff, np.asarray(L, dtype=float)))


def error_pct_of_lstar(predicted: ArrayLike, empirical: ArrayLike) -> float | np.ndarray:
    """The usual absolute percentage error: ``|predicted - empirical| / empirical * 100``.

    NaN where ``empirical == 0`` (L* = 0 is a legal 0-based layer index, but
    has no relative error) or an input is NaN.
    """
    emp = np.asarray(empirical, dtype=float)
    diff = np.abs(np.asarray(predicted, dtype=float) - emp)
    return _as_result(_safe_ratio_pct(diff, np.abs(emp)))


FORMULA_VERDICTS = ("FORMULA GENERALIZES", "PARTIAL GENERALIZATION", "CALIBRATION NEEDED")


def verdict(mape_pct: float, n: int | None = None, labels: tuple[str, str, str] = FORMULA_VERDICTS) -> str:
    """Notebook 001's verdict on a MAPE-of-L (percent) over ``n`` trained models.

    ``< 10`` -> ``labels[0]`` (``"FORMULA GENERALIZES"``), ``< 15`` -> ``labels[1]``
    (``"PARTIAL GENERALIZATION"``), otherwise ``labels[2]`` (``"CALIBRATION NEEDED"``); NaN (no
    models) -> ``"NO DATA"``; ``n`` below :data:`MIN_MODELS_FOR_VERDICT` -> ``"NO VERDICT"``
    whatever the MAPE.
    """
    value = float(mape_pct)
    if math.isnan(value):
        return NO_DATA
    if n is not None and n < MIN_MODELS_FOR_VERDICT:
        return NO_VERDICT
    if value < VERDICT_THRESHOLDS[0]:
        return labels[0]
    if value < VERDICT_THRESHOLDS[1]:
        return labels[1]
    return labels[2]


# ---------------------------------------------------------------------------
# Summary by lab (notebook 001)
# ---------------------------------------------------------------------------


def require_columns(df: pd.DataFrame, columns: Sequence[str], where: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise KeyError(
            f"{where}: data frame lacks column(s) {missing}; it has {list(df.columns)}"
        )


def mape_summary(err_L: np.ndarray, err_lstar: np.ndarray) -> dict[str, Any]:
    # n counts the models that actually have an error (failed models with NaN
    # L* are not silently averaged in as if they were scored).
    valid_L = np.isfinite(err_L)
    valid_lstar = np.isfinite(err_lstar)
    return {
        "n": int(valid_L.sum()),
        "mape_of_L": float(err_L[valid_L].mean()) if valid_L.any() else math.nan,
        "mape_of_lstar": float(err_lstar[valid_lstar].mean()) if valid_lstar.any() else math.nan,
    }


def group_labels(df: pd.DataFrame, groups_col: str) -> np.ndarray:
    # A model with no lab still needs a fold of its own rather than vanishing
    # from the cross-validation.
    return np.array(["<unknown>" if pd.isna(g) else str(g) for g in df[groups_col].tolist()], dtype=str)


def mape_by_lab(
    df: pd.DataFrame,
    in_sample_labs: Sequence[str] = ("EleutherAI",),
) -> dict[str, Any]:
    """Error of the formula per lab, overall, in-sample and out-of-sample.

    Args:
        df: one row per model with columns ``lab``, ``L``, ``H``,
            ``lstar_empirical`` and optionally ``lstar_predicted`` (computed
            with :func:`predict_lstar` and the published coefficients when
            absent).  ``model`` is not needed here.
        in_sample_labs: labs whose models the formula was calibrated on
            (notebook 001: EleutherAI / Pythia).

    Returns:
        ``{"by_lab": {lab: S}, "overall": S, "in_sample": S, "out_of_sample": S,
        "verdict": str, "n_exceeds_L": int, "in_sample_labs": [str]}`` where each
        summary ``S`` is ``{"n", "mape_of_L", "mape_of_lstar"}``.  ``n`` counts the
        models with a finite error; an empty group has ``n = 0`` and NaN means.
        ``verdict`` is :func:`verdict` of the overall MAPE-of-L.
    """
    require_columns(df, ["lab", "L", "H", "lstar_empirical"], "mape_by_lab")
    L = df["L"].to_numpy(dtype=float)
    H = df["H"].to_numpy(dtype=float)
    emp = df["lstar_empirical"].to_numpy(dtype=float)
    if "lstar_predicted" in df.columns:
        pred = df["lstar_predicted"].to_numpy(dtype=float)
    else:
        pred = np.asarray(predict_lstar(L, H), dtype=float)
    err_L = np.asarray(error_pct_of_L(pred, emp, L), dtype=float)
    err_lstar = np.asarray(error_pct_of_lstar(pred, emp), dtype=float)

    labs = group_labels(df, "lab")
    in_sample = np.isin(labs, [str(x) for x in in_sample_labs])

    by_lab = {
        lab: mape_summary(err_L[labs == lab], err_lstar[labs == lab])
        for lab in sorted(set(labs.tolist()))
    }
    overall = mape_summary(err_L, err_lstar)
    return {
        "by_lab": by_lab,
        "overall": overall,
        "in_sample": mape_summary(err_L[in_sample], err_lstar[in_sample]),
        "out_of_sample": mape_summary(err_L[~in_sample], err_lstar[~in_sample]),
        "verdict": verdict(overall["mape_of_L"]),
        # A predicted transition layer beyond the last layer is impossible, so
        # count it separately from the error average, which hides it.
        "n_exceeds_L": int(np.sum(pred > L)),
        "in_sample_labs": [str(x) for x in in_sample_labs],
    }
