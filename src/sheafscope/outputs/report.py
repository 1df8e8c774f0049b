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
import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from sheafscope.errors import ResultsError
from sheafscope.measures import lstar

from .figures import FIGURE_STEMS, write_all_figures
from .htmlkit import CSS, IMAGE_CHECK_SCRIPT, NOT_AVAILABLE, definitions_html, esc, html_kv_table, na_cell, html_table
from .report_sections import sections

__all__ = ["write_report", "load_results", "main"]

_EMPIRICAL = lstar.DEFINITIONS[lstar.EMPIRICAL]

_FIGURE_CAPTIONS: dict[str, str] = {
    "extended_panels": (
        "Notebook 000 panels: (1) prompt-mean layer trace against l/L, (2) mean trace per model "
        "(log scale), (3) L*/L with the 0.5 line, (4) L* (gradient) against L with the formula's "
        "prediction at each model's (L, H)."
    ),
    "cross_heritage": (
        f"Notebook 001 panels: (1) predicted against empirical L* ({_EMPIRICAL.name} definition"
        f"{', mean ± std' if _EMPIRICAL.over == 'prompts' else ''}) with y = x; one colour per "
        "model, filled = trained, hollow = random-init twin (a control), × = no transition; red rings "
        "mark predictions beyond L. (2) Error % of L by lab over the trained models with a transition "
        "only: bars = lab mean, dots = models, dashed line = 10 % threshold."
    ),
    "layer_profiles": (
        "Per-model layer trace: grey = single prompts, bold = mean (dashed for a random-init twin); "
        "a flat profile is titled \"no transition\" and has no L* line; vertical lines mark L* "
        f"({', '.join(lstar.DEFINITIONS)}), attention-sink and massive-activation layers and the "
        "intrinsic-dimension peak (largest TwoNN ID of a layer's output) where known."
    ),
}

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
        prompt_items.append(f"<li><code>{esc(text)}</code></li>")
    prompt_html = (f"<ol>{''.join(prompt_items)}</ol>" if prompt_items else f"<p>{na_cell()}</p>")
    return (
        "<h2>Provenance</h2>"
        f"{html_kv_table(facts)}"
        "<h3>Environment</h3>"
        f"{html_kv_table(res.get('environment'))}"
        "<h3>Options</h3>"
        f"{html_kv_table(res.get('options'))}"
        "<details><summary>Definitions</summary>"
        f"{definitions_html(res.get('definitions'))}</details>"
        f"<details><summary>Prompts ({len(prompts)})</summary>{prompt_html}</details>"
    )


def _section_warnings(analysis: Any, results: Any, problems: Sequence[str]) -> str:
    items: list[str] = [f"report: {p}" for p in problems]
    if isinstance(analysis, Mapping) and isinstance(analysis.get("warnings"), list):
        items += [f"analysis: {w}" for w in analysis["warnings"]]
    for m in _models(results):
        for w in m.get("warnings") or []:
            items.append(f"{m.get('spec') or m.get('model_id')}: {w}")
    if not items:
        return "<h2>Warnings</h2><p>No warnings.</p>"
    lis = "".join(f"<li>{esc(w)}</li>" for w in items)
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
            + html_table(rows, ["spec", "model_id", "error type", "message"]))


def _section_figures(figures: Mapping[str, Path]) -> str:
    if not figures:
        return f"<h2>Figures</h2><p>{na_cell()}</p>"
    parts = ["<h2>Figures</h2>"]
    for stem, path in figures.items():
        if stem == "domain":  # shown in its own section
            continue
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        parts.append(
            f'<figure id="fig-{esc(stem)}"><img alt="{esc(stem)}" src="data:image/png;base64,{data}">'
            f"<figcaption><b>{esc(stem)}</b>: {esc(_FIGURE_CAPTIONS.get(stem, ''))}</figcaption></figure>"
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
        f"<h1>{esc(title)}</h1>",
        f'<p class="sub">Sheaf-Laplacian trace of attention per layer; test of '
        f"L* = L·(0.11 + 0.012·L + 4.9/H). {n_models} model(s), {n_failed} failed.</p>",
        *sections(results, analysis, summary, figures.get("domain")),
        _section_provenance(run_dir, results, _generator_version()),
        _section_warnings(analysis, results, problems),
        _section_failed(results, summary),
        _section_figures(figures),
    ])
    page = (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>{esc(title)}</title><style>{CSS}</style></head>"
        f"<body>{body}{IMAGE_CHECK_SCRIPT}</body></html>\n"
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
