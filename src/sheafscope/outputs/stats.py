"""Cross-model statistics for the transition-layer formula.

The published claim is that a model with ``L`` layers and ``H`` attention heads
has its transition layer at ``L* = L * (0.11 + 0.012 L + 4.9 / H)``.  This module
scores that claim against empirical L*'s and, just as important, against trivial
baselines, so that a "low error" can be read in context:

* :func:`predict_lstar` -- the formula itself.
* :func:`error_pct_of_L`, :func:`error_pct_of_lstar` -- the two error scales.
  Notebook 001 divides by ``L`` (which flatters the formula on deep models);
  the usual MAPE divides by the empirical L*.  Both are always reported.
* :func:`mape_by_lab`, :func:`verdict` -- notebook 001's summary table.
* :func:`fit_formula`, :func:`leave_one_group_out` -- refit the three
  coefficients and measure the honest, out-of-sample (leave-one-lab-out) error.
* :func:`baseline_half`, :func:`baseline_ratio`, :func:`compare_models` --
  predictors with zero or one parameter, cross-validated the same way.
* :func:`bootstrap_ci` -- percentile bootstrap over prompts.

Pure numpy / scipy / pandas: no torch, no I/O.  Dict results hold plain Python
``int`` / ``float`` / ``str`` / ``list`` values so they can go to JSON as is
(missing values are ``float('nan')``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

__all__ = [
    "FORMULA_COEFFICIENTS",
    "VERDICT_THRESHOLDS",
    "predict_lstar",
    "error_pct_of_L",
    "error_pct_of_lstar",
    "verdict",
    "mape_by_lab",
    "FormulaFit",
    "fit_formula",
    "leave_one_group_out",
    "baseline_half",
    "baseline_ratio",
    "compare_models",
    "bootstrap_ci",
]

#: Published coefficients (a, b, c) of ``L* = L * (a + b L + c / H)``.
FORMULA_COEFFICIENTS: tuple[float, float, float] = (0.11, 0.012, 4.9)

#: Notebook 001's verdict thresholds on the MAPE-of-L, in percent.
VERDICT_THRESHOLDS: tuple[float, float] = (10.0, 15.0)

# The refit has three free coefficients; fewer training models (or a degenerate
# design) cannot determine them, and a CV fold built on that would report an
# arbitrary minimum-norm answer as if it were a prediction.
_N_COEF = 3

_PREDICTORS = ("formula_published", "formula_refit_cv", "half", "ratio_cv")

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
    if values.size != _N_COEF:
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


def verdict(mape_pct: float) -> str:
    """Notebook 001's verdict on a MAPE-of-L (percent).

    ``< 10`` -> ``"FORMULA GENERALIZES"``, ``< 15`` -> ``"PARTIAL GENERALIZATION"``,
    otherwise ``"CALIBRATION NEEDED"``; NaN (no models) -> ``"NO DATA"``.
    """
    value = float(mape_pct)
    if math.isnan(value):
        return "NO DATA"
    if value < VERDICT_THRESHOLDS[0]:
        return "FORMULA GENERALIZES"
    if value < VERDICT_THRESHOLDS[1]:
        return "PARTIAL GENERALIZATION"
    return "CALIBRATION NEEDED"


# ---------------------------------------------------------------------------
# Summary by lab (notebook 001)
# ---------------------------------------------------------------------------


def _require(df: pd.DataFrame, columns: Sequence[str], where: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise KeyError(
            f"{where}: data frame lacks column(s) {missing}; it has {list(df.columns)}"
        )


def _mape_summary(err_L: np.ndarray, err_lstar: np.ndarray) -> dict[str, Any]:
    # n counts the models that actually have an error (failed models with NaN
    # L* are not silently averaged in as if they were scored).
    valid_L = np.isfinite(err_L)
    valid_lstar = np.isfinite(err_lstar)
    return {
        "n": int(valid_L.sum()),
        "mape_of_L": float(err_L[valid_L].mean()) if valid_L.any() else math.nan,
        "mape_of_lstar": float(err_lstar[valid_lstar].mean()) if valid_lstar.any() else math.nan,
    }


def _group_labels(df: pd.DataFrame, groups_col: str) -> np.ndarray:
    # A model with no lab still needs a fold of its own rather than vanishing
    # from the cross-validation.
    return df[groups_col].astype(object).where(df[groups_col].notna(), "<unknown>").astype(str).to_numpy()


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
    _require(df, ["lab", "L", "H", "lstar_empirical"], "mape_by_lab")
    L = df["L"].to_numpy(dtype=float)
    H = df["H"].to_numpy(dtype=float)
    emp = df["lstar_empirical"].to_numpy(dtype=float)
    if "lstar_predicted" in df.columns:
        pred = df["lstar_predicted"].to_numpy(dtype=float)
    else:
        pred = np.asarray(predict_lstar(L, H), dtype=float)
    err_L = np.asarray(error_pct_of_L(pred, emp, L), dtype=float)
    err_lstar = np.asarray(error_pct_of_lstar(pred, emp), dtype=float)

    labs = _group_labels(df, "lab")
    in_sample = np.isin(labs, [str(x) for x in in_sample_labs])

    by_lab = {
        lab: _mape_summary(err_L[labs == lab], err_lstar[labs == lab])
        for lab in sorted(set(labs.tolist()))
    }
    overall = _mape_summary(err_L, err_lstar)
    return {
        "by_lab": by_lab,
        "overall": overall,
        "in_sample": _mape_summary(err_L[in_sample], err_lstar[in_sample]),
        "out_of_sample": _mape_summary(err_L[~in_sample], err_lstar[~in_sample]),
        "verdict": verdict(overall["mape_of_L"]),
        # A predicted transition layer beyond the last layer is impossible, so
        # count it separately from the error average, which hides it.
        "n_exceeds_L": int(np.sum(pred > L)),
        "in_sample_labs": [str(x) for x in in_sample_labs],
    }


# ---------------------------------------------------------------------------
# Refitting the coefficients
# ---------------------------------------------------------------------------


# eq=False: the generated __eq__ would compare arrays and raise on truthiness.
@dataclass(frozen=True, eq=False)
class FormulaFit:
    """Least-squares fit of ``L* ~ L * (a + b L + c / H)``.

    Attributes:
        coef: ``(a, b, c)`` as a length-3 array.  When ``rank < 3`` this is the
            minimum-norm solution and the individual coefficients are not
            identified by the data.
        rank: numerical rank of the (column-scaled) design ``[L, L^2, L/H]``.
        n: number of models used (rows with finite L, H and L*).
        residual_rms: root-mean-square in-sample residual, in layers (NaN if n == 0).
    """

    coef: np.ndarray
    rank: int
    n: int
    residual_rms: float

    @property
    def full_rank(self) -> bool:
        """True when all three coefficients are determined by the data."""
        return self.rank == _N_COEF

    def predict(self, L: ArrayLike, H: ArrayLike) -> float | np.ndarray:
        """Predicted L* with the fitted coefficients."""
        return predict_lstar(L, H, self.coef)


def _design(L: np.ndarray, H: np.ndarray) -> np.ndarray:
    return np.column_stack([L, L * L, L / H])


def fit_formula(L: ArrayLike, H: ArrayLike, lstar: ArrayLike) -> FormulaFit:
    """Fit ``(a, b, c)`` by linear least squares in L* units.

    Solves ``min ||X coef - lstar||^2`` with design columns ``[L, L^2, L/H]``
    (``np.linalg.lstsq``).  Rows with a non-finite L, H or L* are dropped.

    With fewer than 3 models or a degenerate design (e.g. every model has the
    same H, making ``L/H`` proportional to ``L``) the coefficients are not
    identified: the minimum-norm solution is returned and ``rank < 3`` says so.
    Callers that need a real fit must check :attr:`FormulaFit.full_rank`.

    Raises:
        ValueError: if the inputs have different lengths or an H is 0.
    """
    L_arr = np.atleast_1d(np.asarray(L, dtype=float)).ravel()
    H_arr = np.atleast_1d(np.asarray(H, dtype=float)).ravel()
    y = np.atleast_1d(np.asarray(lstar, dtype=float)).ravel()
    if not (L_arr.size == H_arr.size == y.size):
        raise ValueError(
            f"fit_formula: L, H and lstar must have equal lengths; got {L_arr.size}, {H_arr.size}, {y.size}"
        )
    if np.any(H_arr == 0):
        raise ValueError("fit_formula: H (number of heads) must be non-zero")
    keep = np.isfinite(L_arr) & np.isfinite(H_arr) & np.isfinite(y)
    L_arr, H_arr, y = L_arr[keep], H_arr[keep], y[keep]
    n = int(y.size)
    if n == 0:
        return FormulaFit(coef=np.zeros(_N_COEF), rank=0, n=0, residual_rms=math.nan)

    X = _design(L_arr, H_arr)
    # The columns differ in scale by ~L (L^2 vs L/H: a factor of thousands), so
    # the rank is judged and the full-rank system solved on unit-norm columns;
    # otherwise an eps-relative rank tolerance depends on the units of L.
    scales = np.linalg.norm(X, axis=0)
    scales[scales == 0] = 1.0
    Xs = X / scales
    rank = int(np.linalg.matrix_rank(Xs))
    if rank == _N_COEF:
        coef = np.linalg.lstsq(Xs, y, rcond=None)[0] / scales
    else:
        # Minimum-norm solution in the coefficients' own units, truncated to
        # the rank found above so the two stay consistent.
        u, s, vt = np.linalg.svd(X, full_matrices=False)
        coef = vt[:rank].T @ ((u[:, :rank].T @ y) / s[:rank]) if rank else np.zeros(_N_COEF)
    resid = X @ coef - y
    return FormulaFit(
        coef=np.asarray(coef, dtype=float),
        rank=rank,
        n=n,
        residual_rms=float(np.sqrt(np.mean(resid**2))),
    )


# ---------------------------------------------------------------------------
# Leave-one-group-out cross-validation
# ---------------------------------------------------------------------------

# A fold fitter gets the training rows and returns (parameters for the report,
# a predict function, a reason string when it cannot predict).
_FoldFit = tuple[dict[str, Any], Callable[[np.ndarray, np.ndarray], np.ndarray] | None, str | None]


def _model_names(df: pd.DataFrame) -> list[str]:
    if "model" in df.columns:
        return [str(m) for m in df["model"].tolist()]
    return [str(i) for i in df.index.tolist()]


def _cross_validate(
    df: pd.DataFrame,
    groups_col: str,
    fit_fold: Callable[[np.ndarray, np.ndarray, np.ndarray], _FoldFit],
    where: str,
) -> dict[str, Any]:
    _require(df, [groups_col, "L", "H", "lstar_empirical"], where)
    L = df["L"].to_numpy(dtype=float)
    H = df["H"].to_numpy(dtype=float)
    emp = df["lstar_empirical"].to_numpy(dtype=float)
    groups = _group_labels(df, groups_col)
    names = _model_names(df)
    usable = np.isfinite(L) & np.isfinite(H) & np.isfinite(emp)

    pred = np.full(len(df), np.nan)
    folds: list[dict[str, Any]] = []
    for group in sorted(set(groups.tolist())):
        test = groups == group
        # Models without an empirical L* cannot teach the fit anything.
        train = ~test & usable
        params, predict, reason = fit_fold(L[train], H[train], emp[train])
        if predict is not None and reason is None:
            pred[test] = predict(L[test], H[test])
        folds.append(
            {
                "group": group,
                "n_train": int(train.sum()),
                "n_test": int(test.sum()),
                "ok": reason is None,
                "reason": reason,
                **params,
            }
        )

    err_L = np.asarray(error_pct_of_L(pred, emp, L), dtype=float)
    err_lstar = np.asarray(error_pct_of_lstar(pred, emp), dtype=float)
    per_model = [
        {
            "model": names[i],
            "group": str(groups[i]),
            "L": float(L[i]),
            "H": float(H[i]),
            "lstar_empirical": float(emp[i]),
            "lstar_predicted": float(pred[i]),
            "error_pct_of_L": float(err_L[i]),
            "error_pct_of_lstar": float(err_lstar[i]),
        }
        for i in range(len(df))
    ]
    summary = _mape_summary(err_L, err_lstar)
    return {
        "groups_col": groups_col,
        "per_model": per_model,
        "folds": folds,
        **summary,
        "n_total": int(len(df)),
        "n_failed_folds": int(sum(not f["ok"] for f in folds)),
    }


def _fit_formula_fold(L: np.ndarray, H: np.ndarray, y: np.ndarray) -> _FoldFit:
    fit = fit_formula(L, H, y)
    params: dict[str, Any] = {
        "coef": [float(c) for c in fit.coef],
        "rank": fit.rank,
        "residual_rms": fit.residual_rms,
    }
    if fit.n < _N_COEF:
        params["coef"] = [math.nan] * _N_COEF
        return params, None, f"training set has {fit.n} model(s) with an L*; the 3-coefficient refit needs >= 3"
    if not fit.full_rank:
        params["coef"] = [math.nan] * _N_COEF
        return params, None, f"training design [L, L^2, L/H] has rank {fit.rank} < 3; coefficients not identified"
    return params, fit.predict, None


def leave_one_group_out(df: pd.DataFrame, groups_col: str = "lab") -> dict[str, Any]:
    """Leave-one-lab-out cross-validation of the refitted formula.

    For each group (lab) the three coefficients are refit (:func:`fit_formula`)
    on the models of all other groups and used to predict the held-out group,
    so every prediction is out of sample.

    Args:
        df: one row per model with columns ``L``, ``H``, ``lstar_empirical``,
            ``groups_col`` and optionally ``model`` (used as the model's name).
        groups_col: the column defining the folds.

    Returns:
        ``{"per_model": [...], "folds": [...], "n": int, "mape_of_L": float,
        "mape_of_lstar": float, "n_total": int, "n_failed_folds": int,
        "groups_col": str}``.  Each ``per_model`` entry has ``model, group, L, H,
        lstar_empirical, lstar_predicted, error_pct_of_L, error_pct_of_lstar``.
        Each fold has ``group, n_train, n_test, ok, reason, coef, rank,
        residual_rms``.  A fold with fewer than 3 training models or a rank < 3
        design has ``ok = False``, a ``reason``, NaN coefficients and NaN
        predictions for its models; ``n`` counts only models actually scored.
    """
    return _cross_validate(df, groups_col, _fit_formula_fold, "leave_one_group_out")


def _fit_half_fold(L: np.ndarray, H: np.ndarray, y: np.ndarray) -> _FoldFit:
    return {"coef": [0.5]}, lambda L_, H_: 0.5 * L_, None


def _fit_ratio_fold(L: np.ndarray, H: np.ndarray, y: np.ndarray) -> _FoldFit:
    ratio = y / L
    ratio = ratio[np.isfinite(ratio)]
    if ratio.size == 0:
        return {"coef": [math.nan]}, None, "training set has no model with an L*; the ratio needs >= 1"
    # The median, not the mean: one lab's odd model should not drag the ratio.
    c = float(np.median(ratio))
    return {"coef": [c]}, lambda L_, H_: c * L_, None


def baseline_half(df: pd.DataFrame, groups_col: str = "lab") -> dict[str, Any]:
    """Baseline ``L* = L / 2`` (no parameters), in the same format as
    :func:`leave_one_group_out` so the numbers compare directly."""
    return _cross_validate(df, groups_col, _fit_half_fold, "baseline_half")


def baseline_ratio(df: pd.DataFrame, groups_col: str = "lab") -> dict[str, Any]:
    """Baseline ``L* = c L``, cross-validated leave-one-group-out.

    ``c`` is the median of ``lstar / L`` over the training models of each fold.
    Same return format as :func:`leave_one_group_out`.
    """
    return _cross_validate(df, groups_col, _fit_ratio_fold, "baseline_ratio")


def compare_models(df: pd.DataFrame, groups_col: str = "lab") -> pd.DataFrame:
    """Out-of-sample error of the formula next to the baselines.

    Rows (index ``predictor``), in this order:

    * ``formula_published`` -- published coefficients, no fitting, so its
      error is already out of sample;
    * ``formula_refit_cv`` -- coefficients refit leave-one-group-out;
    * ``half`` -- ``L* = L / 2``;
    * ``ratio_cv`` -- ``L* = c L``, ``c`` refit leave-one-group-out.

    Columns ``mape_of_L``, ``mape_of_lstar`` (percent) and ``n`` (models
    scored).  A predictor whose folds failed is scored on fewer models: compare
    ``n`` before comparing errors.
    """
    _require(df, [groups_col, "L", "H", "lstar_empirical"], "compare_models")
    L = df["L"].to_numpy(dtype=float)
    H = df["H"].to_numpy(dtype=float)
    emp = df["lstar_empirical"].to_numpy(dtype=float)
    published = np.asarray(predict_lstar(L, H), dtype=float)
    rows = {
        "formula_published": _mape_summary(
            np.asarray(error_pct_of_L(published, emp, L), dtype=float),
            np.asarray(error_pct_of_lstar(published, emp), dtype=float),
        ),
        "formula_refit_cv": leave_one_group_out(df, groups_col),
        "half": baseline_half(df, groups_col),
        "ratio_cv": baseline_ratio(df, groups_col),
    }
    table = pd.DataFrame(
        {
            "mape_of_L": [float(rows[p]["mape_of_L"]) for p in _PREDICTORS],
            "mape_of_lstar": [float(rows[p]["mape_of_lstar"]) for p in _PREDICTORS],
            "n": [int(rows[p]["n"]) for p in _PREDICTORS],
        },
        index=pd.Index(list(_PREDICTORS), name="predictor"),
    )
    return table


# ---------------------------------------------------------------------------
# Bootstrap
# ---------------------------------------------------------------------------


def bootstrap_ci(
    samples: np.ndarray,
    statistic: Callable[[np.ndarray], float],
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Percentile bootstrap confidence interval.

    Resamples ``samples`` along axis 0 (e.g. prompts, with any trailing axes
    such as layers kept intact) with replacement, ``n_boot`` times, and
    evaluates ``statistic`` on each resample.

    Args:
        samples: array whose first axis indexes the independent units.
        statistic: maps an array shaped like ``samples`` to a number.
        n_boot: number of resamples.
        level: coverage of the interval, in (0, 1).
        seed: seed for ``np.random.default_rng``; equal seeds give equal results.

    Returns:
        ``(estimate, low, high)``: ``statistic(samples)`` and the
        ``(1-level)/2`` and ``(1+level)/2`` percentiles of the resampled
        statistic.  Resamples whose statistic is not finite are ignored; if none
        is finite the bounds are NaN.  With a single sample there is nothing to
        resample and ``(estimate, estimate, estimate)`` is returned.

    Raises:
        ValueError: on zero samples, a 0-d input, ``n_boot < 1`` or ``level``
            outside (0, 1).
    """
    data = np.asarray(samples)
    if data.ndim == 0:
        raise ValueError("bootstrap_ci: samples must be an array with the units along axis 0, got a scalar")
    n = data.shape[0]
    if n == 0:
        raise ValueError("bootstrap_ci: no samples to bootstrap (axis 0 has length 0)")
    if n_boot < 1:
        raise ValueError(f"bootstrap_ci: n_boot must be >= 1, got {n_boot}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"bootstrap_ci: level must be in (0, 1), got {level}")

    estimate = float(statistic(data))
    if n == 1:
        return estimate, estimate, estimate

    rng = np.random.default_rng(seed)
    # All indices drawn up front so the resamples depend only on the seed, not
    # on what the statistic does with the generator state.
    indices = rng.integers(0, n, size=(n_boot, n))
    boot = np.array([float(statistic(data[idx])) for idx in indices])
    boot = boot[np.isfinite(boot)]
    if boot.size == 0:
        return estimate, math.nan, math.nan
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(boot, [alpha, 1.0 - alpha])
    return estimate, float(low), float(high)
