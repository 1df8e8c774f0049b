"""Refitting the formula's three coefficients and cross-validating it, leave one lab out, next to
predictors with zero or one parameter (``L / 2``, ``c L``), so that a "low error" is read in context.

A fold whose training set has no more models than the predictor has parameters is an
interpolation: the fit passes through every training point whatever the law, so its prediction is
marked (``interpolation``) and left out of the cross-validated error.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from sheafscope.outputs.formula import (
    ArrayLike,
    group_labels,
    mape_summary,
    require_columns,
    error_pct_of_L,
    error_pct_of_lstar,
    predict_lstar,
)

# The refit has three free coefficients; fewer training models (or a degenerate design) cannot
# determine them, and exactly three are matched exactly by any law.
_N_COEF = 3

PREDICTORS = ("formula_published", "formula_refit_cv", "half", "ratio_cv")

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


@dataclass(frozen=True, eq=False)
class _Columns:
    """What cross-validation reads of a frame, taken once: a bootstrap refits every predictor
    on every resample, and reading the frame per predictor cost more than the fits."""

    groups_col: str
    L: np.ndarray
    H: np.ndarray
    emp: np.ndarray
    groups: np.ndarray
    names: list[str]

    @classmethod
    def of(cls, df: pd.DataFrame, groups_col: str, where: str) -> _Columns:
        require_columns(df, [groups_col, "L", "H", "lstar_empirical"], where)
        names = df["model"].tolist() if "model" in df.columns else df.index.tolist()
        return cls(groups_col, df["L"].to_numpy(dtype=float), df["H"].to_numpy(dtype=float),
                   df["lstar_empirical"].to_numpy(dtype=float), group_labels(df, groups_col),
                   [str(m) for m in names])


def _cross_validate(
    cols: _Columns,
    fit_fold: Callable[[np.ndarray, np.ndarray, np.ndarray], _FoldFit],
    n_params: int,
) -> dict[str, Any]:
    L, H, emp, groups, names = cols.L, cols.H, cols.emp, cols.groups, cols.names
    usable = np.isfinite(L) & np.isfinite(H) & np.isfinite(emp)

    pred = np.full(len(L), np.nan)
    folds: list[dict[str, Any]] = []
    for group in sorted(set(groups.tolist())):
        test = groups == group
        # Models without an empirical L* cannot teach the fit anything.
        train = ~test & usable
        params, predict, reason = fit_fold(L[train], H[train], emp[train])
        n_train = int(train.sum())
        # As many parameters as training models: the fit matches them all whatever the law, so
        # its prediction of the held-out lab tests nothing and is kept out of the error.
        interpolation = n_params > 0 and n_train <= n_params
        if interpolation and reason is None:
            reason = (f"interpolation: {n_train} training model(s) for {n_params} parameter(s); "
                      "the fit matches its training models exactly, so it is not scored")
        if predict is not None and reason is None:
            pred[test] = predict(L[test], H[test])
        folds.append(
            {
                "group": group,
                "n_train": n_train,
                "n_test": int(test.sum()),
                "n_params": n_params,
                "ok": reason is None,
                "interpolation": bool(interpolation),
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
        for i in range(len(L))
    ]
    summary = mape_summary(err_L, err_lstar)
    return {
        "groups_col": cols.groups_col,
        "per_model": per_model,
        "folds": folds,
        **summary,
        "n_total": len(L),
        "n_failed_folds": int(sum(not f["ok"] for f in folds)),
        "n_interpolating_folds": int(sum(f["interpolation"] for f in folds)),
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
        Each fold has ``group, n_train, n_test, n_params, ok, interpolation,
        reason, coef, rank, residual_rms``.  A fold with fewer than 3 training
        models or a rank < 3 design has ``ok = False``, a ``reason``, NaN
        coefficients and NaN predictions for its models.  A fold with exactly 3
        training models keeps its (exact) coefficients but is an interpolation:
        ``interpolation = True``, ``ok = False`` and NaN predictions.  ``n``
        counts only models actually scored; ``n_interpolating_folds`` the folds
        left out as interpolations.
    """
    return _cross_validate(_Columns.of(df, groups_col, "leave_one_group_out"), _fit_formula_fold, _N_COEF)


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
    return _cross_validate(_Columns.of(df, groups_col, "baseline_half"), _fit_half_fold, 0)


def baseline_ratio(df: pd.DataFrame, groups_col: str = "lab") -> dict[str, Any]:
    """Baseline ``L* = c L``, cross-validated leave-one-group-out.

    ``c`` is the median of ``lstar / L`` over the training models of each fold;
    a fold with one training model is an interpolation and is not scored.
    Same return format as :func:`leave_one_group_out`.
    """
    return _cross_validate(_Columns.of(df, groups_col, "baseline_ratio"), _fit_ratio_fold, 1)


def compare_models(df: pd.DataFrame, groups_col: str = "lab") -> pd.DataFrame:
    """Out-of-sample error of the formula next to the baselines.

    Rows (index ``predictor``), in this order:

    * ``formula_published`` -- published coefficients, no fitting, so its
      error is already out of sample;
    * ``formula_refit_cv`` -- coefficients refit leave-one-group-out;
    * ``half`` -- ``L* = L / 2``;
    * ``ratio_cv`` -- ``L* = c L``, ``c`` refit leave-one-group-out.

    Columns ``mape_of_L``, ``mape_of_lstar`` (percent), ``n`` (models
    scored) and ``n_interpolating_folds`` (folds left out as interpolations).  A predictor whose folds failed is scored on fewer models: compare
    ``n`` before comparing errors.
    """
    cols = _Columns.of(df, groups_col, "compare_models")
    published = np.asarray(predict_lstar(cols.L, cols.H), dtype=float)
    rows = {
        "formula_published": mape_summary(
            np.asarray(error_pct_of_L(published, cols.emp, cols.L), dtype=float),
            np.asarray(error_pct_of_lstar(published, cols.emp), dtype=float),
        ),
        **_refits(cols),
    }
    table = pd.DataFrame(
        {
            "mape_of_L": [float(rows[p]["mape_of_L"]) for p in PREDICTORS],
            "mape_of_lstar": [float(rows[p]["mape_of_lstar"]) for p in PREDICTORS],
            "n": [int(rows[p]["n"]) for p in PREDICTORS],
            "n_interpolating_folds": [int(rows[p].get("n_interpolating_folds", 0)) for p in PREDICTORS],
        },
        index=pd.Index(list(PREDICTORS), name="predictor"),
    )
    return table


def predictions(df: pd.DataFrame, groups_col: str = "lab") -> dict[str, np.ndarray]:
    """Each predictor's out-of-sample L* per model (rows of ``df``), NaN where it is not scored
    (an interpolating or failed fold): the inputs of a bootstrap that refits on every resample."""
    cols = _Columns.of(df, groups_col, "predictions")
    out = {"formula_published": np.asarray(predict_lstar(cols.L, cols.H), dtype=float)}
    out.update({name: np.array([r["lstar_predicted"] for r in res["per_model"]], dtype=float)
                for name, res in _refits(cols).items()})
    return {name: out[name] for name in PREDICTORS}


def _refits(cols: _Columns) -> dict[str, dict[str, Any]]:
    """The cross-validated predictors, leave one group out: the refit formula and the baselines."""
    return {
        "formula_refit_cv": _cross_validate(cols, _fit_formula_fold, _N_COEF),
        "half": _cross_validate(cols, _fit_half_fold, 0),
        "ratio_cv": _cross_validate(cols, _fit_ratio_fold, 1),
    }
