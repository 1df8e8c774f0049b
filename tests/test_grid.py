"""How a grid suite compares its conditions' verdicts: a flip is two different verdicts among the
conditions that gave one; NO DATA and NO VERDICT are reasons, not verdicts; a flip counts as
real only where both verdicts are settled by their intervals."""

from __future__ import annotations

import json
from pathlib import Path

from sheafscope import grid


def _condition(root: Path, name: str, claims: list[dict]) -> grid.Condition:
    d = root / name
    d.mkdir()
    (d / "results.json").write_text(json.dumps({"models": [{"spec": "m", "status": "ok", "n_layers": 10,
                                                            "lstar": {"diff": {"mean": 5.0}}}]}))
    (d / "analysis.json").write_text(json.dumps({"claims": claims}))
    return grid.Condition(name, {"dtype": name})


def _claim(key: str, verdict: str, settled: bool, reason: str = "") -> dict:
    return {"key": key, "verdict": verdict, "settled": settled, "verdict_reason": reason}


def test_flips_are_between_verdicts_given_and_settled_flips_need_both_intervals_within_one_band(tmp_path):
    cells = [
        _condition(tmp_path, "a", [_claim("formula", "CALIBRATION NEEDED", True), _claim("sink", "HOLDS", True)]),
        _condition(tmp_path, "b", [_claim("formula", "PARTIAL GENERALIZATION", True),
                                   _claim("sink", "DOES NOT HOLD", False)]),
        _condition(tmp_path, "c", [_claim("formula", "NO VERDICT", False, "2 trained models"),
                                   _claim("sink", "NO DATA", False, "no sink layer")]),
    ]
    table = grid.compare(tmp_path, cells, [])
    assert table["verdict_flips"] == {"formula": ["CALIBRATION NEEDED", "PARTIAL GENERALIZATION"],
                                      "sink": ["DOES NOT HOLD", "HOLDS"]}
    assert table["settled_flips"] == {"formula": ["CALIBRATION NEEDED", "PARTIAL GENERALIZATION"]}
    assert table["not_judged"] == {"formula": {"c": "NO VERDICT: 2 trained models"},
                                   "sink": {"c": "NO DATA: no sink layer"}}
    assert table["verdicts"]["c"] == {"formula": "NO VERDICT", "sink": "NO DATA"}


def test_a_claim_judged_alike_wherever_it_is_judged_does_not_flip(tmp_path):
    cells = [_condition(tmp_path, "a", [_claim("formula", "CALIBRATION NEEDED", False)]),
             _condition(tmp_path, "b", [_claim("formula", "NO DATA", False, "no model")]),
             _condition(tmp_path, "c", [_claim("formula", "CALIBRATION NEEDED", True)])]
    table = grid.compare(tmp_path, cells, [])
    assert table["verdict_flips"] == {} and table["settled_flips"] == {}
    assert list(table["not_judged"]["formula"]) == ["b"]
