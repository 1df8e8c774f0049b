"""Figures of a sheafscope run: the panels of notebooks 000 and 001 plus per-model layer profiles.

Every ``plot_*`` function writes one figure as PNG (dpi 120) and SVG into ``out_dir`` and returns
the written paths. Models whose ``status`` is ``"failed"`` are left out of the plots; the report
lists them separately.

Figures are built on ``matplotlib.figure.Figure`` with an explicit Agg canvas rather than through
``pyplot``: that needs no display, keeps no global figure registry that could leak memory over a
long run, and does not switch the backend of a notebook that imports this module.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from sheafscope.measures import lstar
from sheafscope.outputs import stats

__all__ = [
    "FIGURE_STEMS",
    "LAB_COLOURS",
    "lab_colour_map",
    "mean_layer_trace",
    "predicted_lstar",
    "summary_from_results",
    "plot_extended_panels",
    "plot_cross_heritage",
    "plot_layer_profiles",
    "write_all_figures",
]

#: Stems of the figures ``write_all_figures`` writes, in report order.
FIGURE_STEMS: tuple[str, ...] = ("extended_panels", "cross_heritage", "layer_profiles")

#: Colours of the notebooks' labs, kept identical so figures compare with the notebooks'.
LAB_COLOURS: dict[str, str] = {
    "EleutherAI": "#E74C3C",
    "Meta": "#3498DB",
    "OpenAI": "#8E44AD",
    "Mistral": "#27AE60",
    "Google": "#F39C12",
    "BigScience": "#1ABC9C",
}

# Labs the notebooks never saw; chosen to stay distinguishable from LAB_COLOURS.
_FALLBACK_PALETTE: tuple[str, ...] = (
    "#34495E", "#D35400", "#7F8C8D", "#C0392B", "#2C3E50", "#16A085",
    "#8E6E53", "#2980B9", "#B03A7A", "#6C7A0F",
)
_UNKNOWN_LAB = "unknown"
_DPI = 120
_THRESHOLD_PCT = 10.0
# Dash patterns of the L* lines in the layer profiles, one per definition in registry order:
# black because the lab colours are taken by the mean lines, and none of them the sink's "--"
# or the massive activation's ":".
_LSTAR_DASHES: tuple[Any, ...] = ("-.", (0, (6, 1.5, 1, 1.5, 1, 1.5)), (0, (10, 3)), (0, (3, 1, 1, 1)), (0, (1, 1)))


# --------------------------------------------------------------------------- helpers


def predicted_lstar(n_layers: float, n_heads: float) -> float:
    """The formula under test: ``L* = L * (0.11 + 0.012 L + 4.9 / H)``."""
    return float(stats.predict_lstar(float(n_layers), float(n_heads)))


def lab_colour_map(labs: Iterable[Any]) -> dict[str, str]:
    """Map each lab to a colour: the notebooks' fixed colours, then the fallback palette.

    Unknown labs get fallback colours in sorted order so that a lab keeps its colour between
    figures of the same run.
    """
    names = sorted({_lab_name(lab) for lab in labs})
    colours: dict[str, str] = {}
    extra = 0
    for name in names:
        if name in LAB_COLOURS:
            colours[name] = LAB_COLOURS[name]
        else:
            colours[name] = _FALLBACK_PALETTE[extra % len(_FALLBACK_PALETTE)]
            extra += 1
    return colours


def _lab_name(lab: Any) -> str:
    if lab is None or (isinstance(lab, float) and math.isnan(lab)):
        return _UNKNOWN_LAB
    text = str(lab).strip()
    return text or _UNKNOWN_LAB


def _is_failed(status: Any) -> bool:
    return str(status).strip().lower() == "failed"


def _ok_models(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [m for m in results.get("models") or [] if not _is_failed(m.get("status"))]


def _model_lab(model: Mapping[str, Any]) -> str:
    return _lab_name((model.get("metadata") or {}).get("lab"))


def _short_name(name: Any) -> str:
    # Hub ids ("EleutherAI/pythia-160m") are too long for point labels; the org is the lab anyway.
    text = "" if name is None or (isinstance(name, float) and math.isnan(name)) else str(name)
    return text.rstrip("/").rsplit("/", 1)[-1]


def _as_float(value: Any) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return math.nan
    return out


def _as_bool(value: Any) -> bool:
    # summary.csv round-trips booleans as text; NaN/empty means "unknown", treated as False.
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, float, np.integer, np.floating)):
        return bool(value) and not math.isnan(float(value))
    return str(value).strip().lower() in {"true", "1", "yes", "y", "t"}


def _get(mapping: Any, *keys: str) -> Any:
    cur = mapping
    for key in keys:
        if not isinstance(cur, Mapping):
            return None
        cur = cur.get(key)
    return cur


def mean_layer_trace(model: Mapping[str, Any]) -> np.ndarray:
    """Prompt-mean multi-head layer trace of one model (empty array when it has no prompts)."""
    rows = _prompt_layer_traces(model)
    if rows.size == 0:
        return rows
    return rows.mean(axis=0)


def _prompt_layer_traces(model: Mapping[str, Any]) -> np.ndarray:
    rows: list[np.ndarray] = []
    for prompt in model.get("prompts") or []:
        layer = prompt.get("layer_trace")
        if layer is None and prompt.get("trace") is not None:
            # Older or partial files may lack layer_trace; it is defined as the head sum.
            layer = np.asarray(prompt["trace"], dtype=float).sum(axis=1)
        if layer is not None:
            rows.append(np.asarray(layer, dtype=float))
    if not rows:
        return np.empty((0, 0))
    width = min(len(r) for r in rows)
    return np.vstack([r[:width] for r in rows])


def _clean_summary(summary: pd.DataFrame | None) -> pd.DataFrame:
    """Summary rows of non-failed models with numeric and boolean columns coerced."""
    if summary is None or len(summary) == 0:
        return pd.DataFrame()
    df = summary.copy()
    if "status" in df.columns:
        df = df[~df["status"].map(_is_failed)]
    numeric = [
        "n_layers", "n_heads", "mean_trace", "mean_trace_ci_low", "mean_trace_ci_high",
        *(c for d in lstar.DEFINITIONS.values() for c in d.columns),
        "lstar_ratio", "lstar_predicted", "error_pct", "sink_layer", "massive_activation_layer", "gain",
    ]
    for col in numeric:
        if col in df.columns:
            df[col] = pd.to_numeric(df[col], errors="coerce")
    if "exceeds_L" in df.columns:
        df["exceeds_L"] = df["exceeds_L"].map(_as_bool)
    df["_lab"] = [_lab_name(v) for v in df["lab"]] if "lab" in df.columns else _UNKNOWN_LAB
    names = df["model"] if "model" in df.columns else pd.Series([None] * len(df), index=df.index)
    specs = df["spec"] if "spec" in df.columns else pd.Series([None] * len(df), index=df.index)
    df["_label"] = [_short_name(n) or _short_name(s) for n, s in zip(names, specs)]
    return df.reset_index(drop=True)


def summary_from_results(results: Mapping[str, Any]) -> pd.DataFrame:
    """The summary table rebuilt from results.json, for runs whose summary.csv is missing."""
    from sheafscope.outputs.summarize import summary_frame

    return summary_frame(list(results.get("models") or []))


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, out_dir: Path | str, stem: str) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    png = out / f"{stem}.png"
    svg = out / f"{stem}.svg"
    fig.savefig(png, dpi=_DPI, format="png")
    # No date in the SVG so reruns of the same data give identical files.
    fig.savefig(svg, format="svg", metadata={"Date": None})
    return [png, svg]


def _empty_axes(ax: Any, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes,
            fontsize=10, color="#777777", wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])


def _wants_log(values: Sequence[float] | np.ndarray) -> bool:
    # Log scale only helps (and only works) when everything is positive and spans > 2 decades.
    arr = np.asarray(values, dtype=float)
    arr = arr[np.isfinite(arr)]
    if arr.size == 0 or np.any(arr <= 0):
        return False
    return float(arr.max() / arr.min()) > 100.0


def _lab_legend(ax: Any, colours: Mapping[str, str], labs_present: Iterable[str], **kw: Any) -> None:
    labs = sorted(set(labs_present))
    if not labs:
        return
    handles = [Patch(color=colours[lab], label=lab) for lab in labs]
    ax.legend(handles=handles, fontsize=7, **kw)


# --------------------------------------------------------------------------- figures


def plot_extended_panels(
    results: Mapping[str, Any], summary: pd.DataFrame | None, out_dir: Path | str
) -> list[Path]:
    """Notebook 000's four panels in one 2x2 figure (stem ``extended_panels``).

    (1) prompt-mean layer trace against l/L per model, (2) mean trace per model (log y),
    (3) L*/L per model with the 0.5 line, (4) L* (gradient) against L with the formula's
    predictions for each model's H.
    """
    models = _ok_models(results)
    df = _clean_summary(summary if summary is not None else summary_from_results(results))
    labs = [_model_lab(m) for m in models] + (list(df["_lab"]) if len(df) else [])
    colours = lab_colour_map(labs)

    fig = _new_figure(13, 9.5)
    axes = fig.subplots(2, 2)
    ax1, ax2, ax3, ax4 = axes.ravel()

    # (1) layer profiles on a common depth axis so models of different L overlay.
    all_vals: list[float] = []
    drawn_labs: list[str] = []
    for m in models:
        mean = mean_layer_trace(m)
        if mean.size == 0:
            continue
        n_layers = len(mean)
        x = np.arange(n_layers) / n_layers
        lab = _model_lab(m)
        ax1.plot(x, mean, color=colours[lab], lw=1.4, alpha=0.85, marker="o", ms=2.5)
        all_vals.extend(mean.tolist())
        drawn_labs.append(lab)
    if drawn_labs:
        if _wants_log(all_vals):
            ax1.set_yscale("log")
        ax1.set_xlabel("normalised layer l / L  (l 0-based)")
        ax1.set_ylabel("multi-head layer trace (prompt mean)")
        _lab_legend(ax1, colours, drawn_labs, loc="best")
    else:
        _empty_axes(ax1, "no per-prompt traces available")
    ax1.set_title("(1) Layer trace vs depth")

    # (2) mean trace per model; values span orders of magnitude across sizes, hence log y.
    if len(df) and "mean_trace" in df.columns and df["mean_trace"].notna().any():
        d2 = df[df["mean_trace"].notna()].sort_values("mean_trace")
        heights = d2["mean_trace"].to_numpy(dtype=float)
        pos = np.arange(len(d2))
        ax2.bar(pos, np.where(heights > 0, heights, np.nan),
                color=[colours[lab] for lab in d2["_lab"]], edgecolor="black", lw=0.4)
        if {"mean_trace_ci_low", "mean_trace_ci_high"} <= set(d2.columns):
            lo = d2["mean_trace_ci_low"].to_numpy(dtype=float)
            hi = d2["mean_trace_ci_high"].to_numpy(dtype=float)
            ok = np.isfinite(lo) & np.isfinite(hi) & (heights > 0)
            if ok.any():
                err = np.vstack([np.clip(heights - lo, 0, None), np.clip(hi - heights, 0, None)])
                ax2.errorbar(pos[ok], heights[ok], yerr=err[:, ok], fmt="none",
                             ecolor="black", capsize=2, lw=0.8)
        if np.any(heights > 0):
            ax2.set_yscale("log")
        ax2.set_xticks(pos, list(d2["_label"]), rotation=60, ha="right", fontsize=7)
        ax2.set_ylabel("mean multi-head trace (log)")
        _lab_legend(ax2, colours, d2["_lab"], loc="upper left")
    else:
        _empty_axes(ax2, "mean trace not available")
    ax2.set_title("(2) Mean trace per model")

    # (3) L*/L: the notebooks read < 0.5 as "transition in the first half".
    ratio = _lstar_ratio(df)
    if ratio is not None and ratio.notna().any():
        d3 = df.assign(_ratio=ratio)
        d3 = d3[d3["_ratio"].notna()].sort_values("_ratio")
        pos = np.arange(len(d3))
        ax3.bar(pos, d3["_ratio"], color=[colours[lab] for lab in d3["_lab"]],
                edgecolor="black", lw=0.4)
        ax3.axhline(0.5, color="black", ls="--", lw=1, label="L*/L = 0.5")
        ax3.set_xticks(pos, list(d3["_label"]), rotation=60, ha="right", fontsize=7)
        ax3.set_ylabel("L* / L  (gradient definition)")
        ax3.set_ylim(0, max(1.05, float(d3["_ratio"].max()) * 1.1))
        ax3.legend(fontsize=7, loc="upper left")
    else:
        _empty_axes(ax3, "L*/L not available")
    ax3.set_title("(3) Relative transition depth L*/L")

    # (4) empirical L* vs L, with the formula evaluated at each model's own (L, H).
    if len(df) and {"n_layers", "lstar_gradient"} <= set(df.columns) and df["lstar_gradient"].notna().any():
        d4 = df[df["n_layers"].notna() & df["lstar_gradient"].notna()]
        for lab, grp in d4.groupby("_lab"):
            ax4.scatter(grp["n_layers"], grp["lstar_gradient"], color=colours[lab], s=40,
                        edgecolor="black", lw=0.5, zorder=3, label=f"{lab} (measured)")
        if {"lstar_gradient_ci_low", "lstar_gradient_ci_high"} <= set(d4.columns):
            y = d4["lstar_gradient"].to_numpy(dtype=float)
            lo = d4["lstar_gradient_ci_low"].to_numpy(dtype=float)
            hi = d4["lstar_gradient_ci_high"].to_numpy(dtype=float)
            ok = np.isfinite(lo) & np.isfinite(hi)
            if ok.any():
                err = np.vstack([np.clip(y - lo, 0, None), np.clip(hi - y, 0, None)])
                ax4.errorbar(d4["n_layers"].to_numpy(dtype=float)[ok], y[ok], yerr=err[:, ok],
                             fmt="none", ecolor="grey", capsize=2, lw=0.8, zorder=2)
        l_max = float(d4["n_layers"].max())
        l_grid = np.linspace(1, max(l_max * 1.1, 2), 100)
        if "n_heads" in d4.columns and d4["n_heads"].notna().any():
            pred = [predicted_lstar(L, H) for L, H in zip(d4["n_layers"], d4["n_heads"])
                    if np.isfinite(L) and np.isfinite(H) and H > 0]
            xs = [L for L, H in zip(d4["n_layers"], d4["n_heads"])
                  if np.isfinite(L) and np.isfinite(H) and H > 0]
            ax4.scatter(xs, pred, marker="x", color="black", s=40, zorder=4,
                        label="formula at model's (L, H)")
            # Faint curves per distinct H show how the prediction moves with depth;
            # capped so many H values do not clutter the panel.
            for H in sorted(d4["n_heads"].dropna().unique())[:6]:
                if H > 0:
                    ax4.plot(l_grid, [predicted_lstar(L, H) for L in l_grid], color="grey",
                             lw=0.7, ls=":", alpha=0.8)
                    ax4.annotate(f"H={int(H)}", (l_grid[-1], predicted_lstar(l_grid[-1], H)),
                                 fontsize=6, color="grey", ha="right", va="bottom")
        ax4.plot(l_grid, l_grid, color="#C0392B", lw=0.8, ls="--", label="L* = L (limit)")
        ax4.set_xlabel("number of layers L")
        ax4.set_ylabel("L* (gradient, 0-based layer)")
        ax4.legend(fontsize=7, loc="upper left")
    else:
        _empty_axes(ax4, "L* (gradient) not available")
    ax4.set_title("(4) L* vs L with formula prediction")

    fig.suptitle("Sheaf-Laplacian trace across models (notebook 000 panels)", fontsize=12)
    return _save(fig, out_dir, "extended_panels")


def _lstar_ratio(df: pd.DataFrame) -> pd.Series | None:
    if not len(df):
        return None
    if "lstar_ratio" in df.columns and df["lstar_ratio"].notna().any():
        return df["lstar_ratio"]
    if {"lstar_gradient", "n_layers"} <= set(df.columns):
        return df["lstar_gradient"] / df["n_layers"].where(df["n_layers"] > 0)
    return None


def plot_cross_heritage(summary: pd.DataFrame | None, out_dir: Path | str) -> list[Path]:
    """Notebook 001's two panels (stem ``cross_heritage``).

    (1) predicted L* against empirical L* (definition ``lstar.EMPIRICAL``, ± its std over prompts
    where it has one) with the y = x diagonal; models whose prediction exceeds L get a hollow red
    ring. (2) error % by lab: bar = lab mean, black dots = models, orange dashed 10 % threshold.
    """
    df = _clean_summary(summary)
    colours = lab_colour_map(df["_lab"] if len(df) else [])
    fig = _new_figure(13, 5.5)
    ax1, ax2 = fig.subplots(1, 2)

    emp = lstar.DEFINITIONS[lstar.EMPIRICAL]
    emp_col = emp.columns[0]
    # Only a definition taken over prompts has a std column (the one after its L*).
    std_col = emp.columns[1] if emp.over == "prompts" else None
    if len(df) and {"lstar_predicted", emp_col} <= set(df.columns):
        d1 = df[df["lstar_predicted"].notna() & df[emp_col].notna()]
    else:
        d1 = pd.DataFrame()
    if len(d1):
        x = d1[emp_col].to_numpy(dtype=float)
        y = d1["lstar_predicted"].to_numpy(dtype=float)
        xerr = d1[std_col].fillna(0).to_numpy(dtype=float) if std_col in d1.columns else None
        ax1.errorbar(x, y, xerr=xerr, fmt="none", ecolor="grey", capsize=2, lw=0.8, zorder=1)
        for lab, grp in d1.groupby("_lab"):
            ax1.scatter(grp[emp_col], grp["lstar_predicted"], color=colours[lab],
                        s=50, edgecolor="black", lw=0.5, zorder=3, label=lab)
        for xi, yi, name in zip(x, y, d1["_label"]):
            ax1.annotate(name, (xi, yi), textcoords="offset points", xytext=(5, 4), fontsize=7)
        exceeds = d1["exceeds_L"].to_numpy(dtype=bool) if "exceeds_L" in d1.columns else np.zeros(len(d1), bool)
        if exceeds.any():
            ax1.scatter(x[exceeds], y[exceeds], s=220, facecolors="none", edgecolors="red",
                        lw=1.6, zorder=4, label="prediction > L")
        lo = float(min(np.nanmin(x), np.nanmin(y), 0.0))
        hi = float(max(np.nanmax(x), np.nanmax(y))) * 1.08 + 0.5
        ax1.plot([lo, hi], [lo, hi], color="black", ls="--", lw=0.9, label="y = x")
        ax1.set_xlim(lo, hi)
        ax1.set_ylim(lo, hi)
        ax1.set_xlabel(f"empirical L* ({emp.name} definition{', prompt mean ± std' if std_col else ''})")
        ax1.set_ylabel("predicted L* = L(0.11 + 0.012L + 4.9/H)")
        ax1.legend(fontsize=7, loc="upper left")
    else:
        _empty_axes(ax1, "predicted / empirical L* not available")
    ax1.set_title("(1) Predicted vs empirical L*")

    if len(df) and "error_pct" in df.columns and df["error_pct"].notna().any():
        d2 = df[df["error_pct"].notna()]
        labs = sorted(d2["_lab"].unique())
        means = [float(d2.loc[d2["_lab"] == lab, "error_pct"].mean()) for lab in labs]
        pos = np.arange(len(labs))
        ax2.bar(pos, means, color=[colours[lab] for lab in labs], alpha=0.75,
                edgecolor="black", lw=0.4, label="lab mean")
        # Deterministic jitter so overlapping models stay visible and SVGs stay reproducible.
        rng = np.random.default_rng(0)
        for i, lab in enumerate(labs):
            vals = d2.loc[d2["_lab"] == lab, "error_pct"].to_numpy(dtype=float)
            jitter = rng.uniform(-0.15, 0.15, size=len(vals)) if len(vals) > 1 else np.zeros(1)
            ax2.scatter(i + jitter, vals, color="black", s=16, zorder=3,
                        label="models" if i == 0 else None)
        ax2.axhline(_THRESHOLD_PCT, color="orange", ls="--", lw=1.5, label="10% threshold")
        ax2.set_xticks(pos, labs, rotation=30, ha="right", fontsize=8)
        ax2.set_ylabel("error % of L  (|pred − emp| / L · 100)")
        ax2.legend(fontsize=7, loc="upper right")
    else:
        _empty_axes(ax2, "error % not available")
    ax2.set_title("(2) Prediction error by lab")

    fig.suptitle("Cross-heritage test of the L* formula (notebook 001 panels)", fontsize=12)
    return _save(fig, out_dir, "cross_heritage")


def plot_layer_profiles(
    results: Mapping[str, Any], out_dir: Path | str, summary: pd.DataFrame | None = None
) -> list[Path]:
    """Small multiples of each model's layer trace (stem ``layer_profiles``).

    Thin grey lines are single prompts, the bold line their mean; vertical lines mark L* (one
    per definition), the attention-sink layer and the massive-activation layer where the model's
    result or the optional ``summary`` row provides them.
    """
    models = [m for m in _ok_models(results) if _prompt_layer_traces(m).size]
    colours = lab_colour_map(_model_lab(m) for m in models)
    extra = _clean_summary(summary)
    by_spec: dict[str, Mapping[str, Any]] = {}
    if len(extra) and "spec" in extra.columns:
        by_spec = {str(r["spec"]): r for _, r in extra.iterrows()}

    n = max(len(models), 1)
    ncols = min(3, n)
    nrows = math.ceil(n / ncols)
    fig = _new_figure(4.6 * ncols, 3.3 * nrows + 0.6)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    if not models:
        _empty_axes(axes[0], "no successful model with per-prompt traces")

    # Neutral colours + distinct line styles: lab colours are already used by the mean lines.
    definitions = list(lstar.DEFINITIONS.values())
    markers = (
        *((f"L* ({d.name})", "black", _LSTAR_DASHES[i % len(_LSTAR_DASHES)]) for i, d in enumerate(definitions)),
        ("attention sink", "#2C3E50", "--"),
        ("massive activation", "#7F8C8D", ":"),
    )
    used: set[str] = set()
    for ax, m in zip(axes, models):
        rows = _prompt_layer_traces(m)
        layers = np.arange(rows.shape[1])
        for row in rows:
            ax.plot(layers, row, color="grey", lw=0.6, alpha=0.6)
        lab = _model_lab(m)
        ax.plot(layers, rows.mean(axis=0), color=colours[lab], lw=2.2)
        if _wants_log(rows.ravel()):
            ax.set_yscale("log")
        row = by_spec.get(str(m.get("spec")), {})
        positions = (
            *(_first_finite(_get(m, "lstar", d.name, d.value_key), row.get(d.columns[0])) for d in definitions),
            _first_finite(m.get("sink_layer"), _get(m, "diagnostics", "sink_layer"), row.get("sink_layer")),
            _first_finite(m.get("massive_activation_layer"),
                          _get(m, "diagnostics", "massive_activation_layer"),
                          row.get("massive_activation_layer")),
        )
        for (label, colour, style), pos in zip(markers, positions):
            if pos is not None:
                ax.axvline(pos, color=colour, ls=style, lw=1.5)
                used.add(label)
        title = _short_name(m.get("spec") or m.get("model_id"))
        ax.set_title(f"{title}  (L={m.get('n_layers', len(layers))}, H={m.get('n_heads', '?')})",
                     fontsize=9)
        ax.set_xlabel("layer (0-based)", fontsize=8)
        ax.set_ylabel("layer trace", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in axes[len(models):] if models else axes[1:]:
        ax.set_visible(False)

    handles = [Line2D([], [], color="grey", lw=0.6, label="single prompt"),
               Line2D([], [], color="black", lw=2.2, label="prompt mean (lab colour)")]
    handles += [Line2D([], [], color=c, ls=s, lw=1.5, label=lbl) for lbl, c, s in markers if lbl in used]
    # Rows of at most four: one L* entry per definition would run past a narrow figure.
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 4), fontsize=8)
    fig.suptitle("Per-model layer trace profiles", fontsize=12)
    return _save(fig, out_dir, "layer_profiles")


def _first_finite(*values: Any) -> float | None:
    for v in values:
        f = _as_float(v)
        if math.isfinite(f):
            return f
    return None


def write_all_figures(out_dir: Path) -> list[Path]:
    """Read ``DIR/results.json`` and ``DIR/summary.csv`` and write all figures into ``DIR/figures/``.

    A missing summary.csv is rebuilt from results.json so a partially written run still plots.
    Returns the written PNG and SVG paths.
    """
    run_dir = Path(out_dir)
    results = json.loads((run_dir / "results.json").read_text(encoding="utf-8"))
    summary_path = run_dir / "summary.csv"
    summary = pd.read_csv(summary_path) if summary_path.exists() else summary_from_results(results)
    fig_dir = run_dir / "figures"
    paths: list[Path] = []
    paths += plot_extended_panels(results, summary, fig_dir)
    paths += plot_cross_heritage(summary, fig_dir)
    paths += plot_layer_profiles(results, fig_dir, summary=summary)
    return paths
