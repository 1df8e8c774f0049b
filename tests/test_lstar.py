"""L* definitions on traces with a known answer, computed by hand in each test (D9)."""

from __future__ import annotations

import numpy as np
import pytest

from sheafscope.measures.lstar import lstar_block, lstar_diff, lstar_gradient, lstar_sign_change


def test_gradient_definition_is_zero_based_argmax_of_abs_gradient():
    t = np.array([1.0, 1.0, 1.0, 10.0, 10.0, 10.0])
    # np.gradient: central differences -> [0, 0, 4.5, 4.5, 0, 0]; first max at index 2
    assert lstar_gradient(t) == 2


def test_diff_definition_is_one_based_boundary():
    t = np.array([5.0, 4.0, 20.0, 21.0])  # diffs -1, 16, 1 -> argmax 1 -> L* = 2
    assert lstar_diff(t) == 2


def test_sign_change_definition():
    t = np.array([1.0, 2.0, 4.0, 3.0, 1.0])  # gradient 1, 1.5, 0.5, -1.5, -2 -> + to - at 3
    assert lstar_sign_change(t) == 3
    assert lstar_sign_change(np.arange(6.0)) is None


def test_definitions_disagree_on_the_same_traces_and_are_all_recorded():
    traces = np.array([[1.0, 2.0, 8.0, 9.0, 3.0], [1.0, 5.0, 6.0, 7.0, 2.0]])
    block = lstar_block(traces, n_layers=5, n_heads=4)
    # diffs: (1, 6, 1, -6) -> first max at 1 -> 2;  (4, 1, 1, -5) -> 3 -> 4
    assert block["diff"]["per_prompt"] == [lstar_diff(traces[0]), lstar_diff(traces[1])] == [2, 4]
    assert block["diff"]["mean"] == 3.0 and block["diff"]["std"] == 1.0
    # prompt mean (1, 3.5, 7, 8, 2.5): gradient (2.5, 3, 2.25, -2.25, -5.5) -> 4; sign change at 3
    assert block["gradient"]["value"] == lstar_gradient(traces.mean(axis=0)) == 4
    assert block["sign_change"]["value"] == 3
    assert {"gradient", "diff", "sign_change", "formula"} <= set(block)
    for k in ("gradient", "diff", "sign_change"):
        assert block[k]["definition"]


def test_formula_prediction_flags_exceeding_L_without_clipping():
    # D10: SmolLM2 (L=30, H=9) and gemma-3-270m (L=18, H=4)
    traces = np.tile(np.arange(30.0), (2, 1))
    f = lstar_block(traces, 30, 9)["formula"]
    assert f["predicted"] == pytest.approx(30 * (0.11 + 0.012 * 30 + 4.9 / 9))
    assert f["predicted"] > 30 and f["exceeds_L"]
    f = lstar_block(np.tile(np.arange(18.0), (2, 1)), 18, 4)["formula"]
    assert f["predicted"] == pytest.approx(18 * (0.11 + 0.012 * 18 + 4.9 / 4)) and f["exceeds_L"]
    f = lstar_block(np.tile(np.arange(12.0), (2, 1)), 12, 12)["formula"]
    assert not f["exceeds_L"]
    assert f["error_pct"] == pytest.approx(abs(f["predicted"] - f["empirical"]) / 12 * 100)
