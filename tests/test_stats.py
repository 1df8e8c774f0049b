"""Tests for the cross-model statistics (outputs/formula, crossval, bootstrap).

Expected values are computed here by plain arithmetic (or by an independent
numpy routine such as ``np.linalg.pinv``), never copied from the module's output.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pandas as pd
import pytest

pytestmark = pytest.mark.unit

from sheafscope.outputs.bootstrap import bootstrap_ci, nested_bootstrap
from sheafscope.outputs.crossval import (
    FormulaFit,
    baseline_half,
    baseline_ratio,
    compare_models,
    fit_formula,
    leave_one_group_out,
)
from sheafscope.outputs.formula import (
    FORMULA_COEFFICIENTS,
    error_pct_of_L,
    error_pct_of_lstar,
    mape_by_lab,
    predict_lstar,
    verdict,
)

# 12 models from 4 labs; L and H vary within every lab so that each
# leave-one-lab-out training set (9 models) determines all three coefficients.
MODELS = [
    ("a1", "LabA", 6, 8),
    ("a2", "LabA", 12, 12),
    ("a3", "LabA", 24, 16),
    ("b1", "LabB", 16, 8),
    ("b2", "LabB", 32, 32),
    ("b3", "LabB", 28, 14),
    ("c1", "LabC", 30, 9),
    ("c2", "LabC", 22, 6),
    ("c3", "LabC", 40, 20),
    ("d1", "LabD", 12, 4),
    ("d2", "LabD", 48, 24),
    ("d3", "LabD", 36, 12),
]
TRUE_COEF = (0.2, 0.005, 2.0)


def frame(lstar_of: Callable[[int, int], float]) -> pd.DataFrame:
    """The 12 synthetic models with lstar_empirical = lstar_of(L, H)."""
    return pd.DataFrame(
        [
            {"model": m, "lab": lab, "L": L, "H": H, "lstar_empirical": float(lstar_of(L, H))}
            for m, lab, L, H in MODELS
        ]
    )


def exact_lstar(L: int, H: int) -> float:
    a, b, c = TRUE_COEF
    return L * (a + b * L + c / H)


def published_by_hand(L: float, H: float) -> float:
    return L * (0.11 + 0.012 * L + 4.9 / H)


# ---------------------------------------------------------------------------
# predict_lstar
# ---------------------------------------------------------------------------


def test_coefficients_are_the_published_ones() -> None:
    assert FORMULA_COEFFICIENTS == (0.11, 0.012, 4.9)


def test_predict_lstar_hand_values() -> None:
    assert predict_lstar(12, 12) == pytest.approx(12 * (0.11 + 0.144 + 4.9 / 12), rel=1e-14)
    assert isinstance(predict_lstar(12, 12), float)
    # Pythia-410m shape.
    assert predict_lstar(24, 16) == pytest.approx(24 * (0.11 + 0.288 + 0.30625), rel=1e-14)
    # Custom coefficients.
    assert predict_lstar(10, 5, coef=(1.0, 0.0, 0.0)) == pytest.approx(10.0)
    assert predict_lstar(10, 5, coef=(0.0, 0.1, 5.0)) == pytest.approx(10 * (1.0 + 1.0))


def test_predict_lstar_vectorised_matches_scalar() -> None:
    L = np.array([6, 12, 24, 30])
    H = np.array([8, 12, 16, 9])
    out = predict_lstar(L, H)
    assert isinstance(out, np.ndarray) and out.shape == (4,)
    np.testing.assert_allclose(out, [published_by_hand(l, h) for l, h in zip(L, H)], rtol=1e-14)
    # Broadcasting a scalar H.
    np.testing.assert_allclose(predict_lstar(L, 8), [published_by_hand(l, 8) for l in L], rtol=1e-14)


def test_predict_lstar_exceeds_L_for_deep_or_few_head_models() -> None:
    # D10: SmolLM2-135M (L=30, H=9): 30 * (0.47 + 4.9/9) = 30.433... > 30.
    smol = predict_lstar(30, 9)
    assert smol == pytest.approx(30 * (0.11 + 0.36 + 4.9 / 9))
    assert smol > 30
    # gemma-3-270m (L=18, H=4): 27.9 > 18.
    assert predict_lstar(18, 4) == pytest.approx(18 * (0.11 + 0.216 + 1.225))
    assert predict_lstar(18, 4) > 18
    # At H = 32 the prediction crosses L where 0.11 + 0.012 L + 4.9/32 = 1,
    # i.e. L = (0.89 - 0.153125) / 0.012 = 61.40...; L = 60 stays just below
    # (58.99), from L = 62 on it exceeds L.
    crossing = (1 - 0.11 - 4.9 / 32) / 0.012
    assert 61 < crossing < 62
    assert predict_lstar(60, 32) == pytest.approx(60 * (0.11 + 0.72 + 4.9 / 32))
    assert predict_lstar(60, 32) < 60
    L = np.arange(40, 100)
    exceeds = np.asarray(predict_lstar(L, 32)) > L
    np.testing.assert_array_equal(exceeds, L > crossing)


def test_predict_lstar_rejects_zero_heads_and_bad_coef() -> None:
    with pytest.raises(ValueError):
        predict_lstar(12, 0)
    with pytest.raises(ValueError):
        predict_lstar(12, 12, coef=(0.1, 0.2))


# ---------------------------------------------------------------------------
# Error scales and verdict
# ---------------------------------------------------------------------------


def test_error_scales_by_hand() -> None:
    assert error_pct_of_L(6.0, 5.0, 10) == pytest.approx(10.0)
    assert error_pct_of_L(4.0, 5.0, 10) == pytest.approx(10.0)
    assert error_pct_of_lstar(6.0, 5.0) == pytest.approx(20.0)
    assert error_pct_of_lstar(4.0, 5.0) == pytest.approx(20.0)
    out = error_pct_of_L(np.array([6.0, 20.0]), np.array([5.0, 10.0]), np.array([10, 40]))
    np.testing.assert_allclose(out, [10.0, 25.0])
    out = error_pct_of_lstar(np.array([6.0, 20.0]), np.array([5.0, 10.0]))
    np.testing.assert_allclose(out, [20.0, 100.0])


def test_error_pct_of_lstar_nan_where_empirical_is_zero() -> None:
    assert math.isnan(error_pct_of_lstar(3.0, 0.0))
    out = error_pct_of_lstar(np.array([3.0, 3.0]), np.array([0.0, 2.0]))
    assert math.isnan(out[0])
    assert out[1] == pytest.approx(50.0)
    assert math.isnan(error_pct_of_L(1.0, 2.0, 0))


@pytest.mark.parametrize(
    ("mape", "expected"),
    [
        (0.0, "FORMULA GENERALIZES"),
        (9.999, "FORMULA GENERALIZES"),
        (10.0, "PARTIAL GENERALIZATION"),
        (14.999, "PARTIAL GENERALIZATION"),
        (15.0, "CALIBRATION NEEDED"),
        (55.7, "CALIBRATION NEEDED"),
        (float("nan"), "NO DATA"),
    ],
)
def test_verdict_thresholds(mape: float, expected: str) -> None:
    assert verdict(mape) == expected


# ---------------------------------------------------------------------------
# mape_by_lab
# ---------------------------------------------------------------------------


def tiny_frame() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "model": ["p1", "p2", "m1", "o1"],
            "lab": ["EleutherAI", "EleutherAI", "Meta", "OpenAI"],
            "L": [10, 20, 40, 12],
            "H": [10, 10, 20, 12],
            "lstar_empirical": [5.0, 8.0, 10.0, 0.0],
            "lstar_predicted": [6.0, 7.0, 20.0, 13.0],
        }
    )


def test_mape_by_lab_split_and_values() -> None:
    out = mape_by_lab(tiny_frame())
    # errors of L:     p1 1/10, p2 1/20, m1 10/40, o1 13/12  (x 100)
    # errors of L*:    p1 1/5,  p2 1/8,  m1 10/10, o1 undefined (L* = 0)
    eL = [10.0, 5.0, 25.0, 1300.0 / 12]
    eS = [20.0, 12.5, 100.0]
    assert out["in_sample"]["n"] == 2
    assert out["in_sample"]["mape_of_L"] == pytest.approx((eL[0] + eL[1]) / 2)
    assert out["in_sample"]["mape_of_lstar"] == pytest.approx((eS[0] + eS[1]) / 2)
    assert out["out_of_sample"]["n"] == 2
    assert out["out_of_sample"]["mape_of_L"] == pytest.approx((eL[2] + eL[3]) / 2)
    assert out["out_of_sample"]["mape_of_lstar"] == pytest.approx(eS[2])
    assert out["overall"]["n"] == 4
    assert out["overall"]["mape_of_L"] == pytest.approx(sum(eL) / 4)
    assert out["overall"]["mape_of_lstar"] == pytest.approx(sum(eS) / 3)
    assert set(out["by_lab"]) == {"EleutherAI", "Meta", "OpenAI"}
    assert out["by_lab"]["Meta"] == {"n": 1, "mape_of_L": pytest.approx(25.0), "mape_of_lstar": pytest.approx(100.0)}
    assert out["by_lab"]["OpenAI"]["n"] == 1
    assert math.isnan(out["by_lab"]["OpenAI"]["mape_of_lstar"])
    # Only o1 (13 > 12) is predicted beyond its last layer.
    assert out["n_exceeds_L"] == 1
    assert out["verdict"] == "CALIBRATION NEEDED"  # overall 37.1 %


def test_mape_by_lab_custom_in_sample_and_empty_group() -> None:
    out = mape_by_lab(tiny_frame(), in_sample_labs=("Meta", "OpenAI"))
    assert out["in_sample"]["n"] == 2
    assert out["in_sample"]["mape_of_L"] == pytest.approx((25.0 + 1300.0 / 12) / 2)
    assert out["out_of_sample"]["mape_of_L"] == pytest.approx(7.5)
    none = mape_by_lab(tiny_frame(), in_sample_labs=("Nobody",))
    assert none["in_sample"]["n"] == 0
    assert math.isnan(none["in_sample"]["mape_of_L"])
    assert math.isnan(none["in_sample"]["mape_of_lstar"])
    assert none["out_of_sample"]["n"] == 4


def test_mape_by_lab_computes_prediction_when_absent() -> None:
    df = tiny_frame().drop(columns="lstar_predicted")
    out = mape_by_lab(df)
    expected = [
        abs(published_by_hand(L, H) - e) / L * 100
        for L, H, e in zip(df["L"], df["H"], df["lstar_empirical"])
    ]
    assert out["overall"]["mape_of_L"] == pytest.approx(sum(expected) / 4)
    n_exceeds = sum(published_by_hand(L, H) > L for L, H in zip(df["L"], df["H"]))
    assert out["n_exceeds_L"] == n_exceeds


def test_mape_by_lab_counts_strict_exceedance() -> None:
    df = pd.DataFrame(
        {
            "lab": ["X", "X", "X"],
            "L": [30, 30, 30],
            "H": [9, 9, 9],
            "lstar_empirical": [20.0, 20.0, 20.0],
            "lstar_predicted": [29.5, 30.0, 30.5],  # only the last is beyond L
        }
    )
    assert mape_by_lab(df)["n_exceeds_L"] == 1
    # With the published formula: SmolLM2 and gemma-3-270m shapes exceed, L=60/H=32 does not.
    shapes = pd.DataFrame(
        {"lab": ["X"] * 4, "L": [30, 18, 60, 12], "H": [9, 4, 32, 12], "lstar_empirical": [10.0] * 4}
    )
    assert mape_by_lab(shapes)["n_exceeds_L"] == 2


def test_mape_by_lab_empty_frame() -> None:
    df = tiny_frame().iloc[:0]
    out = mape_by_lab(df)
    assert out["overall"]["n"] == 0
    assert math.isnan(out["overall"]["mape_of_L"])
    assert out["verdict"] == "NO DATA"
    assert out["by_lab"] == {}


def test_mape_by_lab_missing_column_is_a_clear_error() -> None:
    with pytest.raises(KeyError, match="lstar_empirical"):
        mape_by_lab(tiny_frame().drop(columns="lstar_empirical"))


# ---------------------------------------------------------------------------
# Formula exactly true: recovery and zero CV error
# ---------------------------------------------------------------------------


def test_fit_formula_recovers_known_coefficients() -> None:
    df = frame(exact_lstar)
    fit = fit_formula(df["L"], df["H"], df["lstar_empirical"])
    assert isinstance(fit, FormulaFit)
    assert fit.rank == 3 and fit.full_rank and fit.n == 12
    np.testing.assert_allclose(fit.coef, TRUE_COEF, rtol=0, atol=1e-8)
    assert fit.residual_rms < 1e-9
    assert fit.predict(30, 9) == pytest.approx(exact_lstar(30, 9), rel=1e-9)


def test_fit_formula_recovers_published_coefficients() -> None:
    df = frame(published_by_hand)
    fit = fit_formula(df["L"].to_numpy(), df["H"].to_numpy(), df["lstar_empirical"].to_numpy())
    np.testing.assert_allclose(fit.coef, FORMULA_COEFFICIENTS, rtol=0, atol=1e-8)


def test_cv_on_exact_formula_is_zero_and_generalizes() -> None:
    df = frame(exact_lstar)
    cv = leave_one_group_out(df)
    assert cv["n"] == 12 and cv["n_failed_folds"] == 0
    assert cv["mape_of_L"] < 1e-8
    assert cv["mape_of_lstar"] < 1e-8
    assert verdict(cv["mape_of_L"]) == "FORMULA GENERALIZES"
    assert len(cv["folds"]) == 4
    for fold in cv["folds"]:
        assert fold["ok"] and fold["reason"] is None
        assert fold["n_train"] == 9 and fold["n_test"] == 3
        np.testing.assert_allclose(fold["coef"], TRUE_COEF, atol=1e-8)
    # Each model's prediction came from the fold that held its lab out.
    per_model = pd.DataFrame(cv["per_model"])
    assert list(per_model["model"]) == [m for m, *_ in MODELS]
    np.testing.assert_allclose(per_model["lstar_predicted"], df["lstar_empirical"], rtol=1e-9)


def test_published_formula_error_on_exact_data() -> None:
    df = frame(exact_lstar)
    eL, eS = [], []
    for _, _, L, H in MODELS:
        pub, emp = published_by_hand(L, H), exact_lstar(L, H)
        eL.append(abs(pub - emp) / L * 100)
        eS.append(abs(pub - emp) / emp * 100)
    table = compare_models(df)
    assert list(table.index) == ["formula_published", "formula_refit_cv", "half", "ratio_cv"]
    assert list(table.columns) == ["mape_of_L", "mape_of_lstar", "n", "n_interpolating_folds"]
    assert table.loc["formula_published", "mape_of_L"] == pytest.approx(sum(eL) / len(eL))
    assert table.loc["formula_published", "mape_of_lstar"] == pytest.approx(sum(eS) / len(eS))
    assert mape_by_lab(df)["overall"]["mape_of_L"] == pytest.approx(sum(eL) / len(eL))
    # The refit learns the true law; every other predictor is wrong somewhere.
    assert table.loc["formula_refit_cv", "mape_of_L"] < 1e-8
    assert table["mape_of_L"].idxmin() == "formula_refit_cv"
    assert (table["n"] == 12).all()


# ---------------------------------------------------------------------------
# Formula false
# ---------------------------------------------------------------------------


def test_half_data_published_formula_needs_calibration() -> None:
    df = frame(lambda L, H: L / 2)
    by_hand = sum(abs(published_by_hand(L, H) - L / 2) / L * 100 for _, _, L, H in MODELS) / 12
    assert by_hand > 15  # the arithmetic itself says the formula is off by > 15 % of L
    out = mape_by_lab(df)
    assert out["overall"]["mape_of_L"] == pytest.approx(by_hand)
    assert out["verdict"] == "CALIBRATION NEEDED"


def test_half_data_compare_models_ranks_half_best() -> None:
    df = frame(lambda L, H: L / 2)
    table = compare_models(df)
    assert table.loc["half", "mape_of_L"] == 0.0
    assert table.loc["half", "mape_of_lstar"] == 0.0
    assert table.loc["half", "mape_of_L"] <= table["mape_of_L"].min()
    # ratio_cv (median of 0.5's) and the refit (a=0.5, b=c=0) can tie with
    # half; the published formula cannot.
    assert table.loc["ratio_cv", "mape_of_L"] == pytest.approx(0.0, abs=1e-12)
    assert table.loc["formula_published", "mape_of_L"] > 15
    half = baseline_half(df)
    np.testing.assert_array_equal([r["lstar_predicted"] for r in half["per_model"]], [L / 2 for *_, L, _ in MODELS])


def test_random_data_published_formula_needs_calibration() -> None:
    rng = np.random.default_rng(1)
    df = frame(lambda L, H: rng.uniform(0, L))
    by_hand = np.mean(
        [abs(published_by_hand(L, H) - e) / L * 100 for L, H, e in zip(df["L"], df["H"], df["lstar_empirical"])]
    )
    out = mape_by_lab(df)
    assert out["overall"]["mape_of_L"] == pytest.approx(by_hand)
    assert by_hand >= 15 and out["verdict"] == "CALIBRATION NEEDED"


def test_baseline_ratio_uses_training_median_only() -> None:
    # L*/L is 0.3 in lab X (2 models), 0.5 in Y (1), 0.9 in Z (3): skewed, so
    # the median of each training fold differs from its mean.
    df = pd.DataFrame(
        {
            "model": list("abcdef"),
            "lab": ["X", "X", "Y", "Z", "Z", "Z"],
            "L": [10, 20, 10, 10, 20, 30],
            "H": [4, 8, 4, 4, 8, 8],
            "lstar_empirical": [3.0, 6.0, 5.0, 9.0, 18.0, 27.0],
        }
    )
    out = baseline_ratio(df)
    coef = {f["group"]: f["coef"][0] for f in out["folds"]}
    # Held-out X: median(0.5, 0.9, 0.9, 0.9) = 0.9; Y: median(0.3, 0.3, 0.9, 0.9, 0.9) = 0.9;
    # Z: median(0.3, 0.3, 0.5) = 0.3.
    assert coef == {"X": pytest.approx(0.9), "Y": pytest.approx(0.9), "Z": pytest.approx(0.3)}
    pred = {r["model"]: r["lstar_predicted"] for r in out["per_model"]}
    assert pred["a"] == pytest.approx(9.0) and pred["f"] == pytest.approx(9.0)
    errs_of_L = [60.0, 60.0, 40.0, 60.0, 60.0, 60.0]  # |c - true ratio| * 100
    assert out["mape_of_L"] == pytest.approx(np.mean(errs_of_L))
    errs_of_lstar = [0.6 / 0.3 * 100] * 2 + [0.4 / 0.5 * 100] + [0.6 / 0.9 * 100] * 3
    assert out["mape_of_lstar"] == pytest.approx(np.mean(errs_of_lstar))


# ---------------------------------------------------------------------------
# Noisy data: the out-of-sample penalty
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_noisy_data_cv_error_exceeds_in_sample(seed: int) -> None:
    rng = np.random.default_rng(seed)
    df = frame(lambda L, H: exact_lstar(L, H) + rng.normal(0.0, 1.5))
    L, H, y = df["L"].to_numpy(float), df["H"].to_numpy(float), df["lstar_empirical"].to_numpy()
    full = fit_formula(L, H, y)
    fitted = full.coef[0] * L + full.coef[1] * L**2 + full.coef[2] * L / H
    in_sample_mape = np.mean(np.abs(fitted - y) / L * 100)
    cv = leave_one_group_out(df)
    pred = np.array([r["lstar_predicted"] for r in cv["per_model"]])
    cv_rms = np.sqrt(np.mean((pred - y) ** 2))
    assert cv["n"] == 12
    assert cv["mape_of_L"] > in_sample_mape
    assert cv_rms > full.residual_rms
    assert full.residual_rms == pytest.approx(np.sqrt(np.mean((fitted - y) ** 2)))


# ---------------------------------------------------------------------------
# Degenerate fits and folds
# ---------------------------------------------------------------------------


def test_fit_formula_underdetermined_is_minimum_norm() -> None:
    L, H, y = np.array([12.0, 24.0]), np.array([12.0, 16.0]), np.array([5.0, 9.0])
    fit = fit_formula(L, H, y)
    assert fit.n == 2 and fit.rank == 2 and not fit.full_rank
    X = np.column_stack([L, L**2, L / H])
    np.testing.assert_allclose(fit.coef, np.linalg.pinv(X) @ y, rtol=1e-8)
    np.testing.assert_allclose(X @ fit.coef, y, rtol=1e-10)  # interpolates
    assert fit.residual_rms < 1e-9


def test_fit_formula_constant_heads_is_rank_two() -> None:
    L = np.array([6.0, 12.0, 24.0, 36.0, 48.0])
    H = np.full(5, 12.0)  # L/H is then proportional to L
    y = 0.4 * L + 0.001 * L**2
    fit = fit_formula(L, H, y)
    assert fit.rank == 2 and not fit.full_rank and fit.n == 5
    X = np.column_stack([L, L**2, L / H])
    np.testing.assert_allclose(fit.coef, np.linalg.pinv(X, rcond=1e-10) @ y, rtol=1e-8)
    np.testing.assert_allclose(X @ fit.coef, y, rtol=1e-9)


def test_fit_formula_empty_and_nan_rows() -> None:
    empty = fit_formula([], [], [])
    assert empty.n == 0 and empty.rank == 0 and math.isnan(empty.residual_rms)
    df = frame(exact_lstar)
    y = df["lstar_empirical"].to_numpy().copy()
    y[0] = np.nan  # a failed model
    fit = fit_formula(df["L"], df["H"], y)
    assert fit.n == 11 and fit.rank == 3
    np.testing.assert_allclose(fit.coef, TRUE_COEF, atol=1e-8)
    with pytest.raises(ValueError):
        fit_formula([1.0, 2.0], [1.0], [1.0, 2.0])


def test_too_small_and_rank_deficient_folds_report_nan_with_reason() -> None:
    df = pd.DataFrame(
        {
            "model": ["a1", "a2", "a3", "b1", "b2"],
            # Lab A: three models, all H = 12 (rank 2). Lab B: two models.
            "lab": ["A", "A", "A", "B", "B"],
            "L": [12, 24, 36, 6, 16],
            "H": [12, 12, 12, 8, 8],
            "lstar_empirical": [5.0, 10.0, 15.0, 3.0, 8.0],
        }
    )
    cv = leave_one_group_out(df)
    folds = {f["group"]: f for f in cv["folds"]}
    assert not folds["A"]["ok"] and folds["A"]["n_train"] == 2
    assert "3" in folds["A"]["reason"]
    assert not folds["B"]["ok"] and folds["B"]["rank"] == 2
    assert "rank" in folds["B"]["reason"]
    for fold in folds.values():
        assert all(math.isnan(c) for c in fold["coef"])
    assert all(math.isnan(r["lstar_predicted"]) for r in cv["per_model"])
    assert cv["n"] == 0 and cv["n_total"] == 5 and cv["n_failed_folds"] == 2
    assert math.isnan(cv["mape_of_L"]) and math.isnan(cv["mape_of_lstar"])
    table = compare_models(df)
    assert table.loc["formula_refit_cv", "n"] == 0
    assert math.isnan(table.loc["formula_refit_cv", "mape_of_L"])
    assert table.loc["half", "n"] == 5


def test_single_lab_folds_have_no_training_data() -> None:
    df = frame(exact_lstar).assign(lab="OnlyLab")
    cv = leave_one_group_out(df)
    assert len(cv["folds"]) == 1
    assert cv["folds"][0]["n_train"] == 0 and cv["folds"][0]["reason"]
    assert cv["n"] == 0
    ratio = baseline_ratio(df)
    assert ratio["folds"][0]["reason"] and ratio["n"] == 0


def test_failed_model_is_predicted_but_not_scored() -> None:
    df = frame(exact_lstar)
    df.loc[0, "lstar_empirical"] = np.nan
    cv = leave_one_group_out(df)
    first = cv["per_model"][0]
    assert first["lstar_predicted"] == pytest.approx(exact_lstar(6, 8), rel=1e-8)
    assert math.isnan(first["error_pct_of_L"])
    assert cv["n"] == 11 and cv["n_total"] == 12


# ---------------------------------------------------------------------------
# bootstrap_ci
# ---------------------------------------------------------------------------


def test_bootstrap_normal_mean() -> None:
    x = np.random.default_rng(42).normal(5.0, 1.0, size=400)
    est, lo, hi = bootstrap_ci(x, np.mean, n_boot=2000, level=0.95, seed=0)
    assert est == pytest.approx(float(np.mean(x)))
    assert lo <= est <= hi
    assert lo < 5.0 < hi
    expected_width = 2 * 1.96 / math.sqrt(400)
    assert abs((hi - lo) - expected_width) < 0.25 * expected_width
    # Tighter, against the normal approximation with the sample's own SD: this
    # is what tells a 95 % interval from a 90 % one (width ratio 1.96 / 1.645).
    normal_width = 2 * 1.96 * float(np.std(x, ddof=1)) / math.sqrt(400)
    assert abs((hi - lo) - normal_width) < 0.08 * normal_width


def test_bootstrap_is_deterministic_given_seed() -> None:
    x = np.random.default_rng(7).exponential(size=50)
    assert bootstrap_ci(x, np.median, seed=3) == bootstrap_ci(x, np.median, seed=3)
    assert bootstrap_ci(x, np.median, seed=3) != bootstrap_ci(x, np.median, seed=4)


def test_bootstrap_wider_at_higher_level() -> None:
    x = np.random.default_rng(8).normal(size=100)
    _, lo90, hi90 = bootstrap_ci(x, np.mean, level=0.90)
    _, lo99, hi99 = bootstrap_ci(x, np.mean, level=0.99)
    assert lo99 <= lo90 and hi90 <= hi99 and (hi99 - lo99) > (hi90 - lo90)


def test_bootstrap_resamples_rows_of_2d_samples() -> None:
    # prompts x layers: a resample must keep whole rows (prompts) together.
    traces = np.array([[0.0, 1.0, 5.0, 2.0], [0.0, 1.0, 4.0, 3.0], [0.0, 2.0, 6.0, 1.0]])
    seen: list[np.ndarray] = []

    def peak_layer(t: np.ndarray) -> float:
        seen.append(t)
        return float(np.argmax(t.mean(axis=0)))

    est, lo, hi = bootstrap_ci(traces, peak_layer, n_boot=50, seed=0)
    assert (est, lo, hi) == (2.0, 2.0, 2.0)  # layer 2 peaks in every prompt
    assert all(t.shape == (3, 4) for t in seen)
    rows = {tuple(r) for r in traces}
    assert all(tuple(r) in rows for t in seen for r in t)


def test_bootstrap_single_and_empty() -> None:
    assert bootstrap_ci(np.array([3.5]), np.mean) == (3.5, 3.5, 3.5)
    with pytest.raises(ValueError, match="no samples"):
        bootstrap_ci(np.array([]), np.mean)
    with pytest.raises(ValueError):
        bootstrap_ci(np.empty((0, 5)), np.mean)
    with pytest.raises(ValueError):
        bootstrap_ci(np.arange(5.0), np.mean, level=1.5)


# ---------------------------------------------------------------------------
# Verdicts with too few models, interpolating folds, nested bootstrap
# ---------------------------------------------------------------------------


def test_fewer_than_three_models_give_no_verdict() -> None:
    # 5 % would "generalize", but two models cannot judge a three-coefficient law.
    assert verdict(5.0, n=2) == "NO VERDICT"
    assert verdict(5.0, n=3) == "FORMULA GENERALIZES"
    assert verdict(float("nan"), n=1) == "NO DATA"


def test_fold_with_as_many_models_as_coefficients_is_an_interpolation() -> None:
    # Four labs of one model each: every fold trains on 3 models for 3 coefficients, which any
    # law matches exactly (residual 0), so no fold is scored.
    df = pd.DataFrame({"model": ["a", "b", "c", "d"], "lab": ["A", "B", "C", "D"],
                       "L": [12, 24, 30, 18], "H": [12, 16, 9, 4], "lstar_empirical": [3.0, 20.0, 28.0, 15.0]})
    cv = leave_one_group_out(df)
    for fold in cv["folds"]:
        assert fold["n_train"] == 3 and fold["interpolation"] and not fold["ok"]
        assert "interpolation" in fold["reason"]
        assert fold["residual_rms"] < 1e-9  # the exact fit, kept for inspection
    assert cv["n"] == 0 and cv["n_interpolating_folds"] == 4 and math.isnan(cv["mape_of_L"])
    # The one-parameter ratio trains on 3 models: not an interpolation, all four scored.
    ratio = baseline_ratio(df)
    assert ratio["n"] == 4 and ratio["n_interpolating_folds"] == 0
    # With four training models the refit is a fit again.
    five = pd.concat([df, pd.DataFrame([{"model": "e", "lab": "E", "L": 32, "H": 32, "lstar_empirical": 10.0}])])
    assert all(not f["interpolation"] for f in leave_one_group_out(five)["folds"])


def test_ratio_fold_with_one_training_model_is_an_interpolation() -> None:
    df = pd.DataFrame({"model": ["a", "b"], "lab": ["A", "B"], "L": [10, 20], "H": [4, 8],
                       "lstar_empirical": [5.0, 8.0]})
    ratio = baseline_ratio(df)
    assert all(f["interpolation"] for f in ratio["folds"]) and ratio["n"] == 0


def _errors_are_values(q: dict) -> dict:
    return {"e": q["x"]}


def test_nested_bootstrap_interval_of_a_known_sample() -> None:
    # Two models whose every prompt gives the same error (0 and 10): a resample of models has mean
    # 0 (p = 1/4), 5 (1/2) or 10 (1/4), so the 95 % interval is [0, 10]; prompts change nothing.
    units = [{"x": np.zeros(4)}, {"x": np.full(3, 10.0)}]
    out = nested_bootstrap(units, lambda j, a: {"x": float(a["x"].mean())}, _errors_are_values, n_boot=4000)
    e = out["e"]
    assert e["estimate"] == 5.0 and e["n"] == 2
    assert e["ci_models"] == [0.0, 10.0]
    assert e["ci_prompts"] == [5.0, 5.0]
    assert e["ci"] == [0.0, 10.0]


def test_nested_bootstrap_over_prompts_of_one_model() -> None:
    # One model, two prompts with values 0 and 4: a prompt resample's mean is 0, 2 or 4 with
    # probabilities 1/4, 1/2, 1/4, so the prompt interval is [0, 4] and the model interval a point.
    units = [{"x": np.array([0.0, 4.0])}]
    out = nested_bootstrap(units, lambda j, a: {"x": float(a["x"].mean())}, _errors_are_values, n_boot=4000)
    e = out["e"]
    assert e["estimate"] == 2.0 and e["ci_models"] == [2.0, 2.0] and e["ci_prompts"] == [0.0, 4.0]


def test_nested_bootstrap_paired_difference_and_unscored_models() -> None:
    # b is a everywhere plus 3, so the paired difference is exactly 3 in every resample; the NaN
    # model is not scored (n = 2) and never drawn.
    units = [{"x": np.array([1.0, 2.0])}, {"x": np.array([5.0, 9.0])}, {"x": np.array([0.0, 0.0])}]

    def errors(q: dict) -> dict:
        a = q["x"].copy()
        a[2] = np.nan
        return {"a": a, "b": a + 3.0}

    out = nested_bootstrap(units, lambda j, arr: {"x": float(arr["x"].mean())}, errors, pairs=[("b", "a")], n_boot=500)
    assert out["a"]["n"] == 2 and out["a"]["estimate"] == pytest.approx((1.5 + 7.0) / 2)
    d = out["b - a"]
    assert d["estimate"] == pytest.approx(3.0) and d["ci"] == pytest.approx([3.0, 3.0])


# ---------------------------------------------------------------------------
# Where the formula can hold
# ---------------------------------------------------------------------------


def test_domain_places_every_catalog_architecture_from_its_config() -> None:
    from sheafscope.models.catalog import catalog
    from sheafscope.outputs.domain import domain_table, max_depth

    rows = {r["model"]: r for r in domain_table()}
    assert set(rows) == set(catalog())  # read from the catalog, never a fixed list
    gpt2 = rows["gpt2"]  # n_layer = 12, n_head = 12 (GPT-2's own key names)
    assert (gpt2["L"], gpt2["H"]) == (12, 12)
    assert gpt2["predicted_lstar"] == pytest.approx(12 * (0.11 + 0.144 + 4.9 / 12))
    assert gpt2["predicted_ratio"] == pytest.approx(0.11 + 0.144 + 4.9 / 12) and not gpt2["exceeds_L"]
    gemma = rows["gemma3-270m"]  # L = 18, H = 4: 1.551 of the depth, and no depth fits 4 heads
    assert gemma["exceeds_L"] and gemma["predicted_ratio"] == pytest.approx(0.11 + 0.216 + 1.225)
    assert gemma["max_L_for_H"] is None
    # The deepest L for 32 heads: 0.11 + 0.012 L + 4.9/32 = 1.
    assert max_depth(32) == pytest.approx((1 - 0.11 - 4.9 / 32) / 0.012)
    # Llama-3.1-70B's shape (L = 80, H = 64) predicts 91.7 of 80 layers.
    from sheafscope.outputs.domain import row
    assert row("x", "lab", 80, 64, "run")["predicted_lstar"] == pytest.approx(80 * (0.11 + 0.96 + 4.9 / 64))


def test_domain_adds_run_models_the_catalog_lacks_and_never_twins() -> None:
    from sheafscope.outputs.domain import domain_table

    run = [{"spec": "local-model", "status": "ok", "init": "pretrained", "n_layers": 40, "n_heads": 20,
            "metadata": {"lab": "Elsewhere"}},
           {"spec": "random:gpt2", "status": "ok", "init": "random", "n_layers": 7, "n_heads": 7,
            "metadata": {"lab": "OpenAI"}}]
    rows = {r["model"]: r for r in domain_table(run)}
    assert rows["local-model"]["source"] == "run" and "random:gpt2" not in rows
