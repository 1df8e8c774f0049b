"""Cross-model statistics for the transition-layer formula, in one import.

* :mod:`.formula` -- the formula, its two error scales, notebook 001's verdict and MAPE by lab;
* :mod:`.crossval` -- the refit and leave-one-lab-out cross-validation beside the baselines
  ``L / 2`` and ``c L`` (interpolating folds marked and left out);
* :mod:`.bootstrap` -- percentile intervals over prompts, and over models and their prompts.
"""

from __future__ import annotations

from sheafscope.outputs.bootstrap import bootstrap_ci, nested_bootstrap
from sheafscope.outputs.crossval import (
    PREDICTORS,
    FormulaFit,
    baseline_half,
    baseline_ratio,
    compare_models,
    fit_formula,
    leave_one_group_out,
    predictions,
)
from sheafscope.outputs.formula import (
    FORMULA_COEFFICIENTS,
    MIN_MODELS_FOR_VERDICT,
    NO_VERDICT,
    VERDICT_THRESHOLDS,
    error_pct_of_L,
    error_pct_of_lstar,
    mape_by_lab,
    predict_lstar,
    verdict,
)

__all__ = [
    "FORMULA_COEFFICIENTS",
    "VERDICT_THRESHOLDS",
    "MIN_MODELS_FOR_VERDICT",
    "NO_VERDICT",
    "PREDICTORS",
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
    "predictions",
    "bootstrap_ci",
    "nested_bootstrap",
]
