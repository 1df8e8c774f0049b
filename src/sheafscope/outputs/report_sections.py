"""The report's verdict sections: the claims tested (first on the page), the formula's verdict box
with its interval and baselines, where the formula can hold, the summary and the analysis tables.

Every section reads analysis.json as written and says "not available" for what it lacks, so an
older run still renders (without the claims until it is analysed again).
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from sheafscope.measures import lstar
from sheafscope.outputs.domain import domain_table
from sheafscope.outputs.formula import MIN_MODELS_FOR_VERDICT, VERDICT_THRESHOLDS
from sheafscope.outputs.htmlkit import (
    NOT_AVAILABLE,
    definitions_html,
    esc,
    interval_text,
    is_missing,
    na_cell,
    ordered,
    html_table,
)

_NO_CLAIMS = ("analysis.json has no claims (it was written before they existed); rerun the same "
              "`sheafscope run ... --out DIR` to analyse the run again")


def _verdict_class(text: str) -> str:
    # Colours a verdict: notebook 001's words for the formula, HOLDS / PARTLY / DOES NOT for the others.
    low = text.lower()
    if "partial" in low or "partly" in low:
        return "warn"
    if any(w in low for w in ("calibration needed", "does not", "fail", "reject")):
        return "bad"
    if any(w in low for w in ("generaliz", "holds", "pass")):
        return "good"
    return ""


def _claims(analysis: Any) -> list[Mapping[str, Any]]:
    claims = analysis.get("claims") if isinstance(analysis, Mapping) else None
    return [c for c in claims if isinstance(c, Mapping)] if isinstance(claims, list) else []


def _best(claim: Mapping[str, Any]) -> Mapping[str, Any] | None:
    return next((b for b in claim.get("baselines") or [] if b.get("name") == claim.get("baseline_to_beat")), None)


def section_claims(analysis: Any) -> str:
    """The claims tested, each with its verdict, interval, n and the baseline it had to beat."""
    claims = _claims(analysis)
    t1, t2 = VERDICT_THRESHOLDS
    head = ('<h2 id="claims">Claims tested</h2>'
            f'<p class="sub">Error = mean |predicted − measured| / L × 100 over the trained models with a '
            f"transition, with a 95 % percentile bootstrap interval over models and over prompts within "
            f"models. Thresholds (notebook 001): &lt; {t1:g} % validated, &lt; {t2:g} % partial. Fewer than "
            f"{MIN_MODELS_FOR_VERDICT} trained models give no verdict. Random-init twins are controls and "
            "never count.</p>")
    if not claims:
        return head + f"<p>{na_cell()}: {esc(_NO_CLAIMS)}</p>"
    rows = []
    for c in claims:
        best = _best(c)
        rows.append({
            "claim": c.get("claim"),
            "verdict": c.get("verdict"),
            "error, % of L [95 % CI]": interval_text(c.get("estimate"), c.get("ci")),
            "n": c.get("n"),
            "baseline to beat [95 % CI]": (f"{best.get('label')}: {interval_text(best.get('estimate'), best.get('ci'))}"
                                           if best else "—"),
            "beats it": best.get("beaten") if best else "—",
        })
    items = "".join(f"<li><b>{esc(c.get('claim'))}</b>: {esc(c.get('verdict_reason'))}"
                    + (f" (interval: {esc(c['interval_note'])})" if c.get("interval_note") else "") + "</li>"
                    for c in claims)
    return (head + '<div id="claims-list">' + html_table(rows, list(rows[0]), cell_class=_claim_cell_class)
            + f'<ul class="reasons">{items}</ul></div>')


def _claim_cell_class(column: str, value: Any) -> str:
    return f"verdict-cell {_verdict_class(str(value))}" if column == "verdict" else ""


def section_verdict(analysis: Any) -> str:
    """The formula's verdict box: verdict, interval, n, thresholds and every baseline beside it."""
    formula = next((c for c in _claims(analysis) if c.get("key") == "formula"), None)
    mape = analysis.get("mape") if isinstance(analysis, Mapping) and isinstance(analysis.get("mape"), Mapping) else {}
    verdict = (formula or {}).get("verdict") or mape.get("verdict")
    cls = _verdict_class(str(verdict)) if verdict else ""
    parts = [f'<div class="verdict {cls}"><p class="text">Verdict: {esc(verdict) if verdict else NOT_AVAILABLE}</p>']
    if formula is None:
        parts.append(f"<p>{na_cell()}: {esc(_NO_CLAIMS)}</p></div>")
        return "".join(parts)
    parts.append(f"<p>{esc(formula.get('verdict_reason'))}</p>")
    rows = [{"predictor": formula.get("claimed_label"), "MAPE of L [95 % CI]": interval_text(formula.get("estimate"), formula.get("ci")),
             "over models": interval_text(formula.get("estimate"), formula.get("ci_models")),
             "over prompts": interval_text(formula.get("estimate"), formula.get("ci_prompts")),
             "n": formula.get("n"), "formula − predictor [95 % CI]": "—", "beaten by the formula": "—"}]
    for b in formula.get("baselines") or []:
        d = b.get("difference") or {}
        rows.append({"predictor": b.get("label"), "MAPE of L [95 % CI]": interval_text(b.get("estimate"), b.get("ci")),
                     "over models": interval_text(b.get("estimate"), b.get("ci_models")),
                     "over prompts": interval_text(b.get("estimate"), b.get("ci_prompts")),
                     "n": b.get("n"), "formula − predictor [95 % CI]": interval_text(d.get("estimate"), d.get("ci"), " pts"),
                     "beaten by the formula": b.get("beaten")})
    parts.append("<h3>The formula and the baselines it has to beat</h3>" + html_table(rows, list(rows[0])))
    excluded = formula.get("excluded") or {}
    if excluded:
        parts.append("<p>Left out: " + "; ".join(f"{esc(k)}: {esc(', '.join(v))}" for k, v in excluded.items()) + "</p>")
    labs = mape.get("in_sample_labs")
    if isinstance(labs, list) and labs:
        parts.append(f"<p>In-sample labs (formula calibrated on): {esc(', '.join(map(str, labs)))}; models whose "
                     f"prediction exceeds L: {esc(mape.get('n_exceeds_L'))}</p>")
    parts.append("</div>")
    return "".join(parts)


def section_domain(results: Any, figure: Path | None) -> str:
    """Where the formula can hold: the (L, H) table from configs alone, and its figure."""
    models = results.get("models") if isinstance(results, Mapping) and isinstance(results.get("models"), list) else []
    rows = domain_table([m for m in models if isinstance(m, Mapping)])
    table = [{"model": r["model"], "lab": r["lab"], "L": r["L"], "H": r["H"],
              "predicted L*": f"{r['predicted_lstar']:.1f}", "predicted L*/L": f"{r['predicted_ratio']:.2f}",
              "inside the model": "no: beyond the last layer" if r["exceeds_L"] else "yes",
              "deepest L for this H": "none" if r["max_L_for_H"] is None else f"{r['max_L_for_H']:.1f}",
              "from": r["source"]} for r in rows]
    n_out = sum(r["exceeds_L"] for r in rows)
    fig = ""
    if figure is not None and figure.exists():
        data = base64.b64encode(figure.read_bytes()).decode("ascii")
        fig = (f'<figure id="fig-domain"><img alt="domain" src="data:image/png;base64,{data}">'
               "<figcaption><b>domain</b>: predicted L*/L over (L, H); the black line is L*/L = 1, beyond "
               "which (lower right) the formula puts the transition past the last layer.</figcaption></figure>")
    return ('<h2 id="domain">Where the formula can hold</h2>'
            "<p>Predicted L*/L = 0.11 + 0.012·L + 4.9/H depends on the configuration alone. For H heads the "
            "prediction stays inside the model only up to L = (0.89 − 4.9/H) / 0.012 layers, and for no depth "
            f"below H = 5.5. {n_out} of {len(rows)} architectures here lie beyond that line.</p>"
            + fig + '<div id="domain-table">' + html_table(table, list(table[0]) if table else None) + "</div>")


def _lstar_cell(row: Mapping[str, Any], d: lstar.LStarDefinition) -> str:
    if bool(row.get("no_transition")) and str(row.get("no_transition")).lower() not in {"false", "nan"}:
        return "no transition"
    value = row.get(d.columns[0])
    if is_missing(value):
        return "—"
    lo, hi = row.get(d.columns[-2]), row.get(d.columns[-1])
    text = f"{float(value):.3g}"
    if not is_missing(lo) and not is_missing(hi):
        text += f" [{float(lo):.3g}, {float(hi):.3g}]"
    return text


def section_summary(summary: pd.DataFrame | None) -> str:
    """A narrow summary (one column per question a reader asks), the full table folded below it."""
    if summary is None or len(summary) == 0:
        return f"<h2>Summary</h2><p>{na_cell()}</p>"
    records = summary.to_dict(orient="records")
    compact = []
    for r in records:
        failed = str(r.get("status")).lower() == "failed"
        row: dict[str, Any] = {
            "model": r.get("model"),
            "lab": r.get("lab"),
            "role": "random-init control" if str(r.get("init")) == "random" else "trained",
            "L": r.get("n_layers"), "H": r.get("n_heads"),
        }
        for d in lstar.DEFINITIONS.values():
            row[f"L* {d.name} [CI]"] = "failed" if failed else _lstar_cell(r, d)
        pred = r.get("lstar_predicted")
        row["predicted"] = "—" if is_missing(pred) else f"{float(pred):.1f}" + (" > L" if str(r.get("exceeds_L")).lower() == "true" else "")
        row["error % of L"] = r.get("error_pct")
        row["sink"] = r.get("sink_layer")
        row["massive act."] = r.get("massive_activation_layer")
        row["ID peak"] = r.get("intrinsic_dimension_peak_layer")
        row["step z"] = r.get("transition_z")
        row["status"] = r.get("status")
        compact.append(row)
    return ('<h2 id="summary">Summary</h2>'
            '<p class="sub">L* with its 95 % bootstrap interval over prompts; "no transition" where the layer '
            "profile is flat within prompt-to-prompt noise (step z: largest step of the mean trace over its "
            "standard error; rule in the definitions below). sink, massive act. and ID peak (the layer whose "
            "output has the largest TwoNN intrinsic dimension) are 0-based layers, as L* is.</p>"
            + '<div id="summary-table" class="fit">'
            + html_table(compact, list(compact[0]), row_class=lambda r: "failed" if str(r.get("status")).lower() == "failed" else "")
            + "</div><details><summary>Every column of summary.csv</summary>"
            + html_table(records, list(summary.columns)) + "</details>")


def section_definitions(analysis: Any) -> str:
    defs = analysis.get("layer_definitions") if isinstance(analysis, Mapping) else None
    return '<h3 id="definitions">Definitions used by the verdicts</h3>' + definitions_html(defs)


def section_analysis_tables(analysis: Any) -> str:
    an = analysis if isinstance(analysis, Mapping) else {}
    mape = an.get("mape") if isinstance(an.get("mape"), Mapping) else {}
    by_lab = mape.get("by_lab")
    lab_rows = ([{"lab": lab, **(v if isinstance(v, Mapping) else {"value": v})}
                 for lab, v in by_lab.items()] if isinstance(by_lab, Mapping) else [])
    compare = an.get("compare")
    compare_rows = [r for r in compare if isinstance(r, Mapping)] if isinstance(compare, list) else []
    ref = an.get("reference_comparison")
    ref_rows = [r for r in ref if isinstance(r, Mapping)] if isinstance(ref, list) else []
    folds = (an.get("cross_validation") or {}).get("folds") if isinstance(an.get("cross_validation"), Mapping) else None
    fold_rows = [{k: f.get(k) for k in ("group", "n_train", "n_params", "ok", "interpolation", "reason")}
                 for f in folds if isinstance(f, Mapping)] if isinstance(folds, list) else []
    return (
        "<h2>MAPE by lab (trained models with a transition)</h2>"
        + html_table(lab_rows, ordered(lab_rows, ["lab", "n", "mape_of_L", "mape_of_lstar"]))
        + "<h2>Predictor comparison (formula vs baselines)</h2>"
        + html_table(compare_rows, ordered(compare_rows, ["predictor", "mape_of_L", "mape_of_L_ci_low", "mape_of_L_ci_high",
                                                       "mape_of_lstar", "n", "n_interpolating_folds"]))
        + "<h3>Refit folds (leave one lab out)</h3>"
        + "<p>A fold with no more training models than the refit has coefficients is an interpolation: "
          "marked, and left out of the cross-validated error.</p>"
        + html_table(fold_rows)
        + "<h2>Reference comparison</h2>"
        + html_table(ref_rows, ordered(ref_rows, ["model", "reference_trace", "measured_trace", "note"]))
    )


def sections(results: Any, analysis: Any, summary: pd.DataFrame | None, domain_figure: Path | None) -> Sequence[str]:
    """The verdict sections in page order."""
    return [section_claims(analysis), section_verdict(analysis), section_definitions(analysis),
            section_domain(results, domain_figure), section_summary(summary), section_analysis_tables(analysis)]
