"""One self-contained HTML report of a sheafscope run directory.

The page has no external references at all (no CDN, no fonts, no scripts from elsewhere):
CSS is inline and figures are embedded as base64 PNG data URIs, so the file can be mailed,
archived or opened offline and shows exactly what the run produced. Every piece of text that
comes from the run files is passed through ``html.escape``, because prompts, model ids and
error messages are arbitrary strings.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import math
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sheafscope.errors import ResultsError
from sheafscope.measures import lstar

from .figures import FIGURE_STEMS, write_all_figures

__all__ = ["write_report", "load_results", "main"]

NOT_AVAILABLE = "not available"
_EMPIRICAL = lstar.DEFINITIONS[lstar.EMPIRICAL]

_FIGURE_CAPTIONS: dict[str, str] = {
    "extended_panels": (
        "Notebook 000 panels: (1) prompt-mean layer trace against l/L, (2) mean trace per model "
        "(log scale), (3) L*/L with the 0.5 line, (4) L* (gradient) against L with the formula's "
        "prediction at each model's (L, H)."
    ),
    "cross_heritage": (
        f"Notebook 001 panels: (1) predicted against empirical L* ({_EMPIRICAL.name} definition"
        f"{', mean ± std' if _EMPIRICAL.over == 'prompts' else ''}) with y = x; red rings mark "
        "predictions beyond L. (2) Error % of L by lab, bars = lab mean, dots = models, dashed "
        "line = 10 % threshold."
    ),
    "layer_profiles": (
        "Per-model layer trace: grey = single prompts, bold = mean; vertical lines mark L* "
        f"({', '.join(lstar.DEFINITIONS)}), attention-sink and massive-activation layers where known."
    ),
}

_PCT_KEYS = {"error_pct", "mape_of_L", "mape_of_lstar", "mape"}

# Minimal CSS: readable tables, wide tables scroll instead of breaking the layout.
_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;
 margin:0 auto;max-width:1240px;padding:1.2rem 1.6rem 3rem;color:#222;line-height:1.45;
 background:#fff}
h1{font-size:1.6rem;margin:.2rem 0 .3rem}
h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #ddd;padding-bottom:.2rem}
h3{font-size:1rem;margin:1.1rem 0 .4rem}
.sub{color:#666;margin:0 0 1rem}
table{border-collapse:collapse;font-size:.82rem;margin:.4rem 0 1rem}
th,td{border:1px solid #d5d5d5;padding:.25rem .5rem;vertical-align:top;text-align:left}
th{background:#f3f4f6;font-weight:600}
tbody tr:nth-child(even){background:#fafafa}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tr.failed td{background:#fdecea}
.scroll{overflow-x:auto}
.verdict{border:2px solid #888;border-radius:6px;padding:.8rem 1rem;margin:1rem 0;
 background:#f7f7f7}
.verdict.good{border-color:#27AE60;background:#eef9f1}
.verdict.bad{border-color:#C0392B;background:#fdf0ee}
.verdict.warn{border-color:#F39C12;background:#fef7ec}
.verdict .text{font-size:1.1rem;font-weight:600;margin:0 0 .5rem}
.na{color:#888;font-style:italic}
ul.warnings li{margin:.15rem 0}
pre,code{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:.8rem}
pre{background:#f6f8fa;padding:.5rem;overflow-x:auto;white-space:pre-wrap}
details{margin:.5rem 0}
summary{cursor:pointer;font-weight:600}
dl.defs dt{font-weight:600;margin-top:.4rem}
dl.defs dd{margin-left:1.2rem}
figure{margin:1rem 0 2rem}
figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{color:#555;font-size:.85rem;margin-top:.3rem}
"""

# The only script on the page: lets a headless browser test confirm the embedded images decoded.
_IMAGE_CHECK_SCRIPT = """<script>
window.addEventListener("load", function () {
  var imgs = document.querySelectorAll("img"), n = 0;
  for (var i = 0; i < imgs.length; i++) {
    if (imgs[i].complete && imgs[i].naturalWidth > 0) { n++; }
  }
  document.body.dataset.imagesLoaded = String(n);
  document.body.dataset.imagesTotal = String(imgs.length);
});
</script>"""


# --------------------------------------------------------------------------- formatting


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _na() -> str:
    return f'<span class="na">{NOT_AVAILABLE}</span>'


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    try:
        return bool(pd.isna(value)) if not isinstance(value, (list, dict, tuple)) else False
    except (TypeError, ValueError):
        return False


def _fmt_number(value: float, key: str = "") -> str:
    """Human-sized number: integers plain, large/small in scientific notation, else 4 digits."""
    if math.isinf(value):
        return "∞" if value > 0 else "−∞"
    if key in _PCT_KEYS:
        return f"{value:.1f} %"
    if float(value).is_integer() and abs(value) < 1e6:
        return str(int(value))
    mag = abs(value)
    if mag >= 1e6 or (0 < mag < 1e-3):
        return f"{value:.3e}"
    if mag >= 100:
        return f"{value:,.1f}"
    return f"{value:.4g}"


def _cell(value: Any, key: str = "") -> tuple[str, bool]:
    """HTML for one table cell and whether it is numeric (right-aligned)."""
    if isinstance(value, (bool, np.bool_)):
        return ("yes" if value else "no"), False
    if _is_missing(value):
        return "—", False
    if isinstance(value, (int, float)) or hasattr(value, "dtype"):
        try:
            return _e(_fmt_number(float(value), key)), True
        except (TypeError, ValueError):
            pass
    if isinstance(value, (dict, list, tuple)):
        return f"<code>{_e(json.dumps(value, default=str))}</code>", False
    if key == "exceeds_L" and str(value).strip().lower() in {"true", "false"}:
        return ("yes" if str(value).strip().lower() == "true" else "no"), False
    return _e(value), False


def _table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None,
           row_class: Any = None) -> str:
    """An HTML table of ``rows`` (dicts); columns default to the union of keys, in order."""
    if not rows:
        return f"<p>{_na()}</p>"
    if columns is None:
        columns = []
        for row in rows:
            for key in row:
                if key not in columns:
                    columns.append(key)
    head = "".join(f"<th>{_e(c)}</th>" for c in columns)
    body = []
    for row in rows:
        cls = row_class(row) if row_class else ""
        cells = []
        for col in columns:
            text, numeric = _cell(row.get(col), col)
            cells.append(f'<td class="num">{text}</td>' if numeric else f"<td>{text}</td>")
        attr = f' class="{_e(cls)}"' if cls else ""
        body.append(f"<tr{attr}>{''.join(cells)}</tr>")
    return (f'<div class="scroll"><table><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table></div>")


def _kv_table(mapping: Any) -> str:
    if not isinstance(mapping, Mapping) or not mapping:
        return f"<p>{_na()}</p>"
    rows = []
    for key, value in mapping.items():
        text, numeric = _cell(value, str(key))
        cls = ' class="num"' if numeric else ""
        rows.append(f"<tr><th>{_e(key)}</th><td{cls}>{text}</td></tr>")
    return f'<div class="scroll"><table><tbody>{"".join(rows)}</tbody></table></div>'


def _definitions(defs: Any) -> str:
    if not isinstance(defs, Mapping) or not defs:
        return f"<p>{_na()}</p>"
    items = []
    for key, value in defs.items():
        inner = _definitions(value) if isinstance(value, Mapping) else f"<code>{_e(value)}</code>"
        items.append(f"<dt>{_e(key)}</dt><dd>{inner}</dd>")
    return f'<dl class="defs">{"".join(items)}</dl>'


# --------------------------------------------------------------------------- loading


def _load_json(path: Path, problems: list[str]) -> Any:
    if not path.exists():
        problems.append(f"{path.name} is missing")
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        problems.append(f"{path.name} could not be read: {exc}")
        return None


def load_results(run_dir: Path) -> dict[str, Any]:
    """``run_dir/results.json``, checked: raises ResultsError (naming the cause and the fix) when
    it is missing, not readable, truncated or otherwise not JSON, or not a sheafscope results
    object (a JSON object with a ``models`` list)."""
    run_dir = Path(run_dir)
    path = run_dir / "results.json"
    rerun = (f"rerun the same `sheafscope run ... --out {run_dir}` command: complete models in "
             f"{run_dir / 'models'} are kept and results.json is written again")
    if not path.is_file():
        raise ResultsError(f"{path} not found: run `sheafscope run --out {run_dir}` first")
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise ResultsError(f"{path} cannot be read ({exc.strerror or type(exc).__name__}); check its permissions") from None
    except UnicodeDecodeError as exc:
        raise ResultsError(f"{path} is not UTF-8 (byte offset {exc.start}): the file is damaged; {rerun}") from None
    try:
        results = json.loads(text)
    except ValueError as exc:
        raise ResultsError(f"{path} is truncated or not valid JSON ({exc}); {rerun}") from None
    if not isinstance(results, dict) or not isinstance(results.get("models"), list):
        raise ResultsError(f"{path} is not a sheafscope results file (no 'models' list); {rerun}")
    return results


def _load_summary(path: Path, problems: list[str]) -> pd.DataFrame | None:
    if not path.exists():
        problems.append(f"{path.name} is missing")
        return None
    try:
        return pd.read_csv(path)
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        problems.append(f"{path.name} could not be read: {exc}")
        return None


def _generator_version() -> str:
    try:
        from importlib.metadata import PackageNotFoundError, version
        try:
            return version("sheafscope")
        except PackageNotFoundError:
            pass
    except ImportError:  # pragma: no cover - stdlib on 3.8+
        pass
    try:
        from . import __version__  # type: ignore[attr-defined]
        return str(__version__)
    except ImportError:
        return "unknown"


def _ensure_figures(run_dir: Path, problems: list[str]) -> dict[str, Path]:
    fig_dir = run_dir / "figures"
    wanted = {stem: fig_dir / f"{stem}.png" for stem in FIGURE_STEMS}
    if not all(p.exists() for p in wanted.values()):
        if (run_dir / "results.json").exists():
            try:
                write_all_figures(run_dir)
            except Exception as exc:  # a broken figure must not cost the whole report
                problems.append(f"figures could not be generated: {type(exc).__name__}: {exc}")
        else:
            problems.append("figures not generated: results.json is missing")
    return {stem: p for stem, p in wanted.items() if p.exists()}


# --------------------------------------------------------------------------- sections


def _section_provenance(run_dir: Path, results: Any, generator: str) -> str:
    res = results if isinstance(results, Mapping) else {}
    facts = {
        "run directory": str(run_dir),
        "results schema": res.get("schema"),
        "sheafscope version (run)": res.get("sheafscope_version"),
        "sheafscope version (report)": generator,
        "created": res.get("created"),
        "report generated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    prompts = res.get("prompts") or []
    prompt_items = []
    for p in prompts:
        text = p.get("text") if isinstance(p, Mapping) else p
        prompt_items.append(f"<li><code>{_e(text)}</code></li>")
    prompt_html = (f"<ol>{''.join(prompt_items)}</ol>" if prompt_items else f"<p>{_na()}</p>")
    return (
        "<h2>Provenance</h2>"
        f"{_kv_table(facts)}"
        "<h3>Environment</h3>"
        f"{_kv_table(res.get('environment'))}"
        "<h3>Options</h3>"
        f"{_kv_table(res.get('options'))}"
        "<details><summary>Definitions</summary>"
        f"{_definitions(res.get('definitions'))}</details>"
        f"<details><summary>Prompts ({len(prompts)})</summary>{prompt_html}</details>"
    )


def _mape_line(block: Any) -> str:
    if not isinstance(block, Mapping) or not block:
        return _na()
    parts = []
    for key in ("mape_of_L", "mape_of_lstar", "n"):
        if key in block and not _is_missing(block[key]):
            text, _ = _cell(block[key], key)
            parts.append(f"{_e(key)} = {text}")
    return ", ".join(parts) if parts else _na()


def _verdict_class(text: str) -> str:
    # Colours the box for notebook 001's verdicts (sheafscope.outputs.stats.verdict): "FORMULA
    # GENERALIZES", "PARTIAL GENERALIZATION", "CALIBRATION NEEDED", "NO DATA".
    low = text.lower()
    if "partial" in low:
        return "warn"
    if any(w in low for w in ("calibration needed", "fail", "reject")):
        return "bad"
    if any(w in low for w in ("generaliz", "pass")):
        return "good"
    return ""


def _section_verdict(analysis: Any) -> str:
    mape = analysis.get("mape") if isinstance(analysis, Mapping) else None
    mape = mape if isinstance(mape, Mapping) else {}
    verdict = mape.get("verdict")
    if verdict is None and isinstance(analysis, Mapping):
        verdict = analysis.get("verdict")
    verdict_html = _e(verdict) if verdict else NOT_AVAILABLE
    cls = _verdict_class(str(verdict)) if verdict else ""
    n_exceeds = mape.get("n_exceeds_L")
    labs = mape.get("in_sample_labs")
    labs_html = _e(", ".join(map(str, labs))) if isinstance(labs, list) and labs else _na()
    split_rows = []
    for name in ("in_sample", "out_of_sample"):
        block = mape.get(name)
        if isinstance(block, Mapping) and block:
            split_rows.append({"split": name.replace("_", "-"), **block})
        else:
            split_rows.append({"split": name.replace("_", "-"), "mape_of_L": NOT_AVAILABLE})
    return (
        f'<div class="verdict {cls}"><p class="text">Verdict: {verdict_html}</p>'
        f"<p>Overall MAPE: {_mape_line(mape.get('overall'))}</p>"
        f"<p>In-sample labs (formula calibrated on): {labs_html}</p>"
        f"<p>Models whose prediction exceeds L: "
        f"{_cell(n_exceeds, 'n_exceeds_L')[0] if not _is_missing(n_exceeds) else _na()}</p>"
        "<h3>In-sample vs out-of-sample</h3>"
        f"{_table(split_rows)}</div>"
    )


def _section_summary(summary: pd.DataFrame | None) -> str:
    if summary is None or len(summary) == 0:
        return f"<h2>Summary</h2><p>{_na()}</p>"
    rows = summary.to_dict(orient="records")
    return ("<h2>Summary</h2>"
            + _table(rows, list(summary.columns),
                     row_class=lambda r: "failed" if str(r.get("status")).lower() == "failed" else ""))


def _section_analysis_tables(analysis: Any) -> str:
    an = analysis if isinstance(analysis, Mapping) else {}
    mape = an.get("mape") if isinstance(an.get("mape"), Mapping) else {}
    by_lab = mape.get("by_lab")
    lab_rows = ([{"lab": lab, **(v if isinstance(v, Mapping) else {"value": v})}
                 for lab, v in by_lab.items()] if isinstance(by_lab, Mapping) else [])
    compare = an.get("compare")
    compare_rows = [r for r in compare if isinstance(r, Mapping)] if isinstance(compare, list) else []
    ref = an.get("reference_comparison")
    ref_rows = [r for r in ref if isinstance(r, Mapping)] if isinstance(ref, list) else []
    return (
        "<h2>MAPE by lab</h2>"
        + _table(lab_rows, _ordered(lab_rows, ["lab", "n", "mape_of_L", "mape_of_lstar"]))
        + "<h2>Predictor comparison (formula vs baselines)</h2>"
        + _table(compare_rows, _ordered(compare_rows, ["predictor", "mape_of_L", "mape_of_lstar", "n"]))
        + "<h2>Reference comparison</h2>"
        + _table(ref_rows, _ordered(ref_rows, ["model", "reference_trace", "measured_trace", "note"]))
    )


def _ordered(rows: Iterable[Mapping[str, Any]], preferred: Sequence[str]) -> list[str]:
    # Known columns first in their documented order, anything extra the analysis added after.
    rows = list(rows)
    present = {k for r in rows for k in r}
    cols = [c for c in preferred if c in present]
    for r in rows:
        for k in r:
            if k not in cols:
                cols.append(k)
    return cols


def _section_warnings(analysis: Any, results: Any, problems: Sequence[str]) -> str:
    items: list[str] = [f"report: {p}" for p in problems]
    if isinstance(analysis, Mapping) and isinstance(analysis.get("warnings"), list):
        items += [f"analysis: {w}" for w in analysis["warnings"]]
    for m in _models(results):
        for w in m.get("warnings") or []:
            items.append(f"{m.get('spec') or m.get('model_id')}: {w}")
    if not items:
        return "<h2>Warnings</h2><p>No warnings.</p>"
    lis = "".join(f"<li>{_e(w)}</li>" for w in items)
    return f'<h2>Warnings ({len(items)})</h2><ul class="warnings">{lis}</ul>'


def _models(results: Any) -> list[Mapping[str, Any]]:
    if not isinstance(results, Mapping) or not isinstance(results.get("models"), list):
        return []
    return [m for m in results["models"] if isinstance(m, Mapping)]


def _section_failed(results: Any, summary: pd.DataFrame | None) -> str:
    rows = []
    seen: set[str] = set()
    for m in _models(results):
        if str(m.get("status")).lower() != "failed":
            continue
        err = m.get("error") if isinstance(m.get("error"), Mapping) else {}
        rows.append({"spec": m.get("spec"), "model_id": m.get("model_id"),
                     "error type": err.get("type"),
                     "message": err.get("message") if err else m.get("error")})
        seen.add(str(m.get("spec")))
    # A model can be in summary.csv but missing from results.json when a run was interrupted.
    if summary is not None and {"status", "spec"} <= set(summary.columns):
        for r in summary.to_dict(orient="records"):
            if str(r.get("status")).lower() == "failed" and str(r.get("spec")) not in seen:
                rows.append({"spec": r.get("spec"), "model_id": r.get("model"),
                             "error type": None, "message": NOT_AVAILABLE})
    if not rows:
        return "<h2>Failed models</h2><p>None.</p>"
    return (f"<h2>Failed models ({len(rows)})</h2>"
            + _table(rows, ["spec", "model_id", "error type", "message"]))


def _section_figures(figures: Mapping[str, Path]) -> str:
    if not figures:
        return f"<h2>Figures</h2><p>{_na()}</p>"
    parts = ["<h2>Figures</h2>"]
    for stem, path in figures.items():
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        parts.append(
            f'<figure id="fig-{_e(stem)}"><img alt="{_e(stem)}" src="data:image/png;base64,{data}">'
            f"<figcaption><b>{_e(stem)}</b>: {_e(_FIGURE_CAPTIONS.get(stem, ''))}</figcaption></figure>"
        )
    return "".join(parts)


# --------------------------------------------------------------------------- entry points


def write_report(run_dir: Path) -> Path:
    """Write ``run_dir/report.html``: one self-contained page describing the run.

    Reads results.json, summary.csv and analysis.json (each may be missing; the page then says
    "not available"; a results.json that is present but truncated or not results raises
    ResultsError), generates the figures with ``write_all_figures`` if any PNG is missing,
    and embeds them as base64 PNG. Returns the path of the written report.
    """
    run_dir = Path(run_dir)
    problems: list[str] = []
    # A missing results.json is reported on the page; a damaged one is refused (ResultsError),
    # since a page of "0 model(s)" would misstate the run.
    results = load_results(run_dir) if (run_dir / "results.json").exists() else _load_json(run_dir / "results.json", problems)
    summary = _load_summary(run_dir / "summary.csv", problems)
    analysis = _load_json(run_dir / "analysis.json", problems)
    figures = _ensure_figures(run_dir, problems)

    n_models = len(_models(results))
    n_failed = sum(1 for m in _models(results) if str(m.get("status")).lower() == "failed")
    title = f"sheafscope report: {run_dir.name}"
    body = "".join([
        f"<h1>{_e(title)}</h1>",
        f'<p class="sub">Sheaf-Laplacian trace of attention per layer; test of '
        f"L* = L·(0.11 + 0.012·L + 4.9/H). {n_models} model(s), {n_failed} failed.</p>",
        _section_verdict(analysis),
        _section_provenance(run_dir, results, _generator_version()),
        _section_summary(summary),
        _section_analysis_tables(analysis),
        _section_warnings(analysis, results, problems),
        _section_failed(results, summary),
        _section_figures(figures),
    ])
    page = (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>{_e(title)}</title><style>{_CSS}</style></head>"
        f"<body>{body}{_IMAGE_CHECK_SCRIPT}</body></html>\n"
    )
    out = run_dir / "report.html"
    # Write-then-rename so a viewer never sees a half-written page.
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, out)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m sheafscope.outputs.report DIR``: write DIR/report.html and print its path."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m sheafscope.outputs.report RUN_DIR", file=sys.stderr)
        return 2
    try:
        print(write_report(Path(args[0])))
    except ResultsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
