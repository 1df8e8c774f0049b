"""The offline suite end to end (what `make run` runs), with every table checked against the
traces in results.json rather than against typed numbers."""

from __future__ import annotations

import contextlib
import io
import json
import re
from importlib.resources import files
from pathlib import Path

import jsonschema

import numpy as np
import pandas as pd
import pytest

pytestmark = pytest.mark.integration

from sheafscope.outputs.formula import verdict
from sheafscope.cli import main
from sheafscope.measures.lstar import lstar_diff, lstar_gradient
from sheafscope.suites import list_suites, load_suite


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("offline")
    prompts = out / "p.txt"
    prompts.write_text("The capital of France is Paris.\nOnce upon a time in a land far away\n"
                       "def fibonacci(n): return n if n < 2 else\n")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        rc = main(["run", "--no-progress", "--suite", "offline", "--prompts", str(prompts), "--out", str(out)])
    assert rc == 0
    (out / "stdout.txt").write_text(stdout.getvalue())
    return out


def test_builtin_suites_are_listed_and_carry_the_notebooks_models():
    names = {s.name for s in list_suites()}
    assert {"offline", "cross-heritage", "extended"} <= names
    ch = load_suite("cross-heritage")
    assert len(ch.models) == 6 and {m.metadata["lab"] for m in ch.models} == {"EleutherAI", "Meta", "BigScience", "OpenAI"}
    ext = load_suite("extended")
    assert ext.options["quantize"] == "4bit"
    offline = load_suite("offline")
    specs = [m.spec for m in offline.models]
    assert {"smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b", "minilm-l6"} <= set(specs)
    assert any(s.startswith("random:") for s in specs)


def test_offline_suite_leaves_every_output(offline_run):
    for name in ("results.json", "summary.csv", "analysis.json", "report.html"):
        assert (offline_run / name).stat().st_size > 0, name
    for stem in ("extended_panels", "cross_heritage", "layer_profiles"):
        for ext in ("png", "svg"):
            assert (offline_run / "figures" / f"{stem}.{ext}").stat().st_size > 1000
    html = (offline_run / "report.html").read_text()
    results = json.loads((offline_run / "results.json").read_text())
    for m in results["models"]:
        assert m["spec"] in html
    assert re.search(r"\d+\.\d % \[\d+\.\d, \d+\.\d\]", html)  # four trained models: claims with intervals
    mape = json.loads((offline_run / "analysis.json").read_text())["mape"]
    lo, hi = mape["overall"]["ci"]
    assert (offline_run / "stdout.txt").read_text().splitlines()[-2] == (
        f"Verdict: {mape['verdict']}, MAPE {mape['overall']['mape_of_L']:.1f} % of L [{lo:.1f}, {hi:.1f}] "
        f"(95 % interval), n = {mape['overall']['n']}")
    jsonschema.validate(results, json.loads(files("sheafscope").joinpath("data/results.schema.json").read_text()))


def test_summary_is_computed_from_the_traces(offline_run):
    res = json.loads((offline_run / "results.json").read_text())
    summary = pd.read_csv(offline_run / "summary.csv").set_index("model")
    assert res["sheafscope_version"] and res["environment"]["torch"] and res["definitions"]["lstar"]
    for m in res["models"]:
        assert m["status"] == "ok", m.get("error")
        row = summary.loc[m["spec"]]
        traces = np.array([p["layer_trace"] for p in m["prompts"]])
        assert row["mean_trace"] == pytest.approx(traces.mean(), rel=1e-9)
        assert row["mean_trace_ci_low"] <= row["mean_trace"] <= row["mean_trace_ci_high"]
        assert row["lstar_gradient"] == lstar_gradient(traces.mean(axis=0))
        per_prompt = [lstar_diff(t) for t in traces]
        assert row["lstar_diff_mean"] == pytest.approx(np.mean(per_prompt))
        L, H = m["n_layers"], m["n_heads"]
        pred = L * (0.11 + 0.012 * L + 4.9 / H)
        assert row["lstar_predicted"] == pytest.approx(pred)
        assert bool(row["exceeds_L"]) == (pred > L)
        assert row["error_pct"] == pytest.approx(abs(pred - np.mean(per_prompt)) / L * 100)


def test_analysis_statistics_match_the_summary(offline_run):
    analysis = json.loads((offline_run / "analysis.json").read_text())
    summary = pd.read_csv(offline_run / "summary.csv")
    trained = summary[summary["init"] != "random"]
    errors = np.abs(trained["lstar_predicted"] - trained["lstar_diff_mean"]) / trained["n_layers"] * 100
    assert analysis["mape"]["overall"]["mape_of_L"] == pytest.approx(errors.mean())
    assert analysis["mape"]["overall"]["n"] == len(trained) == 4
    assert analysis["mape"]["verdict"] == verdict(errors.mean())
    assert analysis["mape"]["n_exceeds_L"] == int((trained["lstar_predicted"] > trained["n_layers"]).sum())
    predictors = {r["predictor"] for r in analysis["compare"]}
    assert {"formula_published", "formula_refit_cv", "half", "ratio_cv"} <= predictors
    twins = {t["model_id"] for t in analysis["twin_vs_trained"]}
    assert {"HuggingFaceTB/SmolLM2-135M-Instruct", "google/gemma-3-270m"} <= twins
    assert any("D10" in w for w in analysis["warnings"])  # smollm2 and gemma3: prediction > L


def test_the_offline_report_renders_its_claims_with_intervals_in_headless_chromium(offline_run, tmp_path):
    """The real run's page, as a browser renders it: the claims list with each judged claim's
    interval, and the domain figure (four trained models, so the claims are judged)."""
    import tempfile

    from test_report import CHROMIUM, _chromium

    if not CHROMIUM.exists():
        pytest.fail("/usr/bin/chromium is missing: run `apt-get install -y chromium` (CI's script installs it)")
    with tempfile.TemporaryDirectory(prefix="sheafscope-chromium-") as tmp:
        dom = _chromium("--dump-dom", "--virtual-time-budget=5000", "--window-size=1280,2000",
                        (offline_run / "report.html").resolve().as_uri(), user_dir=Path(tmp))
    assert dom.returncode == 0, dom.stderr[-2000:]
    claims = dom.stdout[dom.stdout.index('id="claims-list"'):]
    claims = claims[:claims.index("</table>")]
    judged = [c for c in json.loads((offline_run / "analysis.json").read_text())["claims"] if c["n"] >= 3]
    assert judged and len(re.findall(r"\d+\.\d % \[\d+\.\d, \d+\.\d\]", claims)) >= len(judged)
    assert 'id="fig-domain"' in dom.stdout
