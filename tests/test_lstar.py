"""L* definitions on traces with a known answer, computed by hand in each test (D9), and the
registry: a definition added to it reaches results.json, summary.csv and the CLI table."""

from __future__ import annotations

import math

import numpy as np
import pytest

pytestmark = pytest.mark.unit

from sheafscope.outputs import console
from sheafscope.measures import lstar
from sheafscope.measures.lstar import DEFINITIONS, LStarDefinition, lstar_block
from sheafscope.outputs.summarize import analysis_block, summary_frame

# A step between layers 2 and 3. np.gradient (central differences): [0, 0, 4.5, 4.5, 0, 0];
# np.diff: [0, 0, 9, 0, 0].
STEP = np.array([1.0, 1.0, 1.0, 10.0, 10.0, 10.0])


def _model(traces: np.ndarray, spec: str = "toy-model", init: str = "pretrained") -> dict:
    """A results.json model entry with the fields summary_frame reads."""
    n_prompts, n_layers = traces.shape
    return {
        "spec": spec, "model_id": spec, "status": "ok", "init": init, "metadata": {"lab": "Lab"},
        "n_layers": n_layers, "n_heads": 4, "n_kv_heads": 4, "mean_trace": float(traces.mean()),
        "family": "toy", "warnings": [],
        "prompts": [{"layer_trace": t.tolist(), "first_token_mass": np.zeros((n_layers, 4)).tolist(),
                     "max_abs_hidden": np.ones(n_layers + 1).tolist()} for t in traces],
        "lstar": lstar_block(traces, n_layers, 4),
    }


def test_each_definition_finds_its_layer_of_a_step():
    block = lstar_block(np.tile(STEP, (3, 1)), n_layers=6, n_heads=4)
    assert block["gradient"]["value"] == 2  # first max of |gradient|, 0-based
    assert block["diff"]["per_prompt"] == [3, 3, 3]  # argmax |diff| = 2, + 1
    assert block["sign_change"]["value"] == 4  # gradient 4.5 at 3, 0 at 4


def test_diff_definition_is_one_based_boundary_per_prompt():
    # diffs (-1, 16, 1) -> argmax 1 -> 2;  (3, 0, 0) -> argmax 0 -> 1
    block = DEFINITIONS["diff"].block(np.array([[5.0, 4.0, 20.0, 21.0], [0.0, 3.0, 3.0, 3.0]]))
    assert block["per_prompt"] == [2, 1]
    assert block["mean"] == 1.5 and block["std"] == 0.5  # population std, as np.std


def test_sign_change_definition_and_its_absence():
    # gradient (1, 1.5, 0.5, -1.5, -2): + at 2 to - at 3
    assert DEFINITIONS["sign_change"].block(np.array([[1.0, 2.0, 4.0, 3.0, 1.0]]))["value"] == 3
    # a rising trace never turns: None, which results.json stores as null
    assert DEFINITIONS["sign_change"].block(np.arange(6.0)[None, :])["value"] is None


def test_results_blocks_keep_their_shapes_and_definitions_disagree():
    traces = np.array([[1.0, 2.0, 8.0, 9.0, 3.0], [1.0, 5.0, 6.0, 7.0, 2.0]])
    block = lstar_block(traces, n_layers=5, n_heads=4)
    assert list(block) == ["gradient", "diff", "sign_change", "formula"]
    assert list(block["gradient"]) == ["value", "definition"]
    assert list(block["diff"]) == ["per_prompt", "mean", "std", "definition"]
    assert list(block["sign_change"]) == ["value", "definition"]
    # diffs: (1, 6, 1, -6) -> first max at 1 -> 2;  (4, 1, 1, -5) -> 3 -> 4
    assert block["diff"]["per_prompt"] == [2, 4]
    assert block["diff"]["mean"] == 3.0 and block["diff"]["std"] == 1.0
    # prompt mean (1, 3.5, 7, 8, 2.5): gradient (2.5, 3, 2.25, -2.25, -5.5) -> 4; sign change at 3
    assert block["gradient"]["value"] == 4
    assert block["sign_change"]["value"] == 3
    for name, d in DEFINITIONS.items():
        assert block[name]["definition"] == d.definition and d.source


def test_formula_prediction_flags_exceeding_L_without_clipping():
    # D10: SmolLM2 (L=30, H=9) and gemma-3-270m (L=18, H=4)
    traces = np.tile(np.arange(30.0), (2, 1))
    f = lstar_block(traces, 30, 9)["formula"]
    assert f["predicted"] == pytest.approx(30 * (0.11 + 0.012 * 30 + 4.9 / 9))
    assert f["predicted"] > 30 and f["exceeds_L"]
    f = lstar_block(np.tile(np.arange(18.0), (2, 1)), 18, 4)["formula"]
    assert f["predicted"] == pytest.approx(18 * (0.11 + 0.012 * 18 + 4.9 / 4)) and f["exceeds_L"]
    # Step of STEP in every prompt: diff mean 3, prediction 12 * (0.11 + 0.144 + 4.9 / 12).
    f = lstar_block(np.tile(np.repeat(STEP, 2), (2, 1)), 12, 12)["formula"]
    assert not f["exceeds_L"]
    assert f["empirical"] == 6.0  # diffs of the doubled step: jump between layers 5 and 6
    assert f["error_pct"] == pytest.approx(abs(12 * (0.11 + 0.144 + 4.9 / 12) - 6.0) / 12 * 100)


def test_summary_columns_of_each_definition():
    # Identical prompts: every bootstrap resample is the same, so each CI is the value itself.
    row = summary_frame([_model(np.tile(STEP, (3, 1)))]).iloc[0]
    expected = {
        "lstar_gradient": 2, "lstar_gradient_ci_low": 2, "lstar_gradient_ci_high": 2,
        "lstar_diff_mean": 3, "lstar_diff_std": 0, "lstar_diff_ci_low": 3, "lstar_diff_ci_high": 3,
        "lstar_sign_change": 4, "lstar_sign_change_ci_low": 4, "lstar_sign_change_ci_high": 4,
    }
    for col, value in expected.items():
        assert row[col] == value, col
    assert row["lstar_ratio"] == 2 / 6


def test_summary_ci_of_a_definition_with_no_layer_is_nan():
    row = summary_frame([_model(np.tile(np.arange(6.0), (3, 1)))]).iloc[0]
    assert row["lstar_sign_change"] is None or math.isnan(row["lstar_sign_change"])
    assert math.isnan(row["lstar_sign_change_ci_low"]) and math.isnan(row["lstar_sign_change_ci_high"])


def test_a_registered_definition_reaches_results_summary_analysis_and_cli(monkeypatch, capsys):
    last = LStarDefinition("last", "the last layer", "a test", lambda t: len(t) - 1)
    # first layer above the trace's midpoint, per prompt
    half = LStarDefinition("half", "first l with T[l] > (min T + max T) / 2", "a test",
                           lambda t: int(np.argmax(t > (t.min() + t.max()) / 2)), over="prompts")
    monkeypatch.setattr(lstar, "DEFINITIONS", {**DEFINITIONS, "last": last, "half": half})
    traces = np.array([STEP, [0.0, 0.0, 0.0, 0.0, 0.0, 6.0]])
    trained, twin = _model(traces), _model(traces[::-1].copy(), init="random")
    assert trained["lstar"]["last"] == {"value": 5, "definition": "the last layer"}
    assert trained["lstar"]["half"]["per_prompt"] == [3, 5]

    summary = summary_frame([trained, twin])
    cols = list(summary.columns)
    assert cols[cols.index("lstar_sign_change_ci_high") + 1:cols.index("lstar_ratio")] == [
        "lstar_last", "lstar_last_ci_low", "lstar_last_ci_high",
        "lstar_half_mean", "lstar_half_std", "lstar_half_ci_low", "lstar_half_ci_high",
    ]
    row = summary.iloc[0]
    assert row["lstar_last"] == 5 and row["lstar_half_mean"] == 4.0 and row["lstar_half_std"] == 1.0
    assert 3 <= row["lstar_half_ci_low"] <= row["lstar_half_ci_high"] <= 5

    (pair,) = analysis_block([trained, twin], summary)["twin_vs_trained"]
    assert pair["trained_lstar_last"] == pair["twin_lstar_last"] == 5
    assert pair["trained_lstar_half"] == pair["twin_lstar_half"] == 4.0
    assert pair["trained_lstar_diff"] == 4.0  # the existing keys stay: diffs argmax 2 -> 3, 4 -> 5

    console.print_summary([trained], out_dir=".")
    out = capsys.readouterr().out
    header, _, line = out.strip("\n").splitlines()[:3]
    assert "L*last" in header and "L*half" in header and "L*gradient" in header
    assert " 4.0±1.0 " in line  # half over prompts: mean ± std
    assert "L*last: the last layer (a test)" in out


# --------------------------------------------------------------------------- the flat-profile rule


def test_transition_test_by_hand():
    # Steps per prompt between layers: prompt 1 (1, 10), prompt 2 (1, 6). Mean steps (1, 8): the
    # largest is 8 at l = 1; its per-prompt values 10 and 6 have sd 2*sqrt(2) (ddof 1), SE 2, z 4.
    traces = np.array([[0.0, 1.0, 11.0], [0.0, 1.0, 7.0]])
    t = lstar.transition_test(traces)
    assert t["step_layer"] == 1 and t["step"] == 8.0
    assert t["step_se"] == pytest.approx(2.0) and t["step_z"] == pytest.approx(4.0)
    assert t["flat"] is False  # 8 > 3 * 2
    assert lstar.transition_test(traces, k=5.0)["flat"] is True  # 8 <= 5 * 2


def test_flat_profile_is_marked_no_transition():
    # Prompt-to-prompt noise around a constant: the largest mean step (0.5) is within 3 SEs.
    noisy = np.array([[10.0, 11.0, 10.0, 11.0], [11.0, 10.0, 11.0, 10.0], [10.0, 10.0, 10.0, 10.0]])
    t = lstar.transition_test(noisy)
    # steps: (1, -1, 1), (-1, 1, -1), (0, 0, 0): every mean step is 0, so 0 <= 3 * SE.
    assert t["step"] == 0.0 and t["flat"] is True
    assert lstar.transition_test(np.ones((4, 6)))["flat"] is True  # constant: no step at all
    assert lstar.transition_test(np.tile(STEP, (3, 1)))["flat"] is False  # identical steps: SE 0, step 9
    assert lstar.transition_test(STEP[None, :])["flat"] is None  # one prompt cannot be judged
    row = summary_frame([_model(noisy)]).iloc[0]
    assert bool(row["no_transition"]) and row["transition_z"] == 0.0
    assert "no transition" in lstar.TRANSITION_RULE and "standard error" in lstar.TRANSITION_RULE


def test_twins_and_flat_models_stay_out_of_the_mape_and_verdicts():
    # Three trained models with a clean step at boundary 3 (diff L* = 3), one flat trained model and
    # one twin whose L* (5) would change the MAPE if it counted. L = 6, H = 4 for all.
    step = np.tile(STEP, (3, 1))
    noisy = np.array([[10.0, 11.0, 10.0, 11.0, 10.0, 11.0], [11.0, 10.0, 11.0, 10.0, 11.0, 10.0]])
    late = np.tile([0.0, 0.0, 0.0, 0.0, 0.0, 6.0], (3, 1))
    models = [_model(step, spec=f"m{i}") for i in range(3)] + [_model(noisy, spec="flat"),
                                                                _model(late, spec="twin", init="random")]
    for i, m in enumerate(models):
        m["metadata"] = {"lab": f"Lab{i}"}
    analysis = analysis_block(models, summary_frame(models), n_boot=50)
    predicted = 6 * (0.11 + 0.012 * 6 + 4.9 / 4)
    by_hand = abs(predicted - 3.0) / 6 * 100  # the same error for the three trained models
    assert analysis["mape"]["overall"]["n"] == 3
    assert analysis["mape"]["overall"]["mape_of_L"] == pytest.approx(by_hand)
    formula = next(c for c in analysis["claims"] if c["key"] == "formula")
    assert formula["n"] == 3 and formula["estimate"] == pytest.approx(by_hand)
    assert formula["ci"] == pytest.approx([by_hand, by_hand])  # equal errors: every resample agrees
    assert formula["models"] == ["m0", "m1", "m2"]
    assert formula["excluded"]["random-init controls"] == ["twin"]
    assert formula["excluded"]["no transition"] == ["flat"]
    assert formula["verdict"] == "CALIBRATION NEEDED"  # by_hand is about 77 %
    assert formula["thresholds"]["validated_below_pct"] == 10 and formula["thresholds"]["partial_below_pct"] == 15
    assert {b["name"] for b in formula["baselines"]} == {"half", "ratio_cv", "formula_refit_cv"}
    assert analysis["controls"] == ["twin"] and analysis["no_transition"] == ["flat"]
    assert {c["key"] for c in analysis["claims"]} >= {"formula", "sink", "massive_activation"}


def test_two_trained_models_give_numbers_but_no_verdict():
    models = [_model(np.tile(STEP, (3, 1)), spec=f"m{i}") for i in range(2)]
    for i, m in enumerate(models):
        m["metadata"] = {"lab": f"Lab{i}"}
    analysis = analysis_block(models, summary_frame(models), n_boot=20)
    formula = next(c for c in analysis["claims"] if c["key"] == "formula")
    assert formula["verdict"] == "NO VERDICT" and formula["n"] == 2
    assert "at least 3" in formula["verdict_reason"] and math.isfinite(formula["estimate"])
    assert analysis["mape"]["verdict"] == "NO VERDICT"
