"""Figures of a sheafscope run: the panels of notebooks 000 and 001, per-model layer profiles, and
where the formula can hold over the (L, H) plane.

Every ``plot_*`` function writes one figure as PNG (dpi 120) and SVG into ``out_dir`` and returns
the written paths. Failed models are left out (the report lists them). Each model has its own
colour; a random-init twin takes its trained model's colour but is drawn hollow or dashed, and it
never enters an error panel: it is a control, not evidence.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.lines import Line2D

from sheafscope.measures import lstar
from sheafscope.outputs.figure_domain import plot_domain
from sheafscope.outputs.plotting import (
    THRESHOLD_PCT,
    LAB_COLOURS,
    as_float,
    clean_summary,
    empty_axes,
    nested_get,
    new_figure,
    ok_models,
    prompt_layer_traces,
    save_figure,
    short_name,
    wants_log,
    base_name,
    is_twin,
    lab_colour_map,
    mean_layer_trace,
    model_colour_map,
    place_labels,
    predicted_lstar,
    summary_from_results,
)

__all__ = [
    "FIGURE_STEMS",
    "LAB_COLOURS",
    "lab_colour_map",
    "model_colour_map",
    "mean_layer_trace",
    "predicted_lstar",
    "summary_from_results",
    "plot_extended_panels",
    "plot_cross_heritage",
    "plot_layer_profiles",
    "plot_domain",
    "write_all_figures",
]

#: Stems of the figures ``write_all_figures`` writes, in report order.
FIGURE_STEMS: tuple[str, ...] = ("domain", "cross_heritage", "extended_panels", "layer_profiles")

# Dash patterns of the L* lines in the layer profiles, one per definition in registry order:
# black because the model colours are taken by the mean lines, and none of them the sink's "--",
# the massive activation's ":" or the intrinsic-dimension peak's long dashes.
_LSTAR_DASHES: tuple[Any, ...] = ("-.", (0, (6, 1.5, 1, 1.5, 1, 1.5)), (0, (10, 3)), (0, (3, 1, 1, 1)), (0, (1, 1)))


def _model_name(model: Mapping[str, Any]) -> str:
    return short_name(model.get("spec") or model.get("model_id"))


def _model_legend(ax: Any, colours: Mapping[str, str], df: pd.DataFrame, **kw: Any) -> None:
    # One entry per model drawn; twins hollow, so the legend reads the same way as the points.
    seen: set[str] = set()
    handles = []
    for label, base, twin in zip(df["_label"], df["_base"], df["_twin"]):
        if label in seen:
            continue
        seen.add(label)
        handles.append(Line2D([], [], ls="none", marker="o", ms=6, markeredgecolor=colours[base],
                              markerfacecolor="none" if twin else colours[base], label=label))
    if handles:
        ax.legend(handles=handles, fontsize=6.5, **kw)


def _scatter_models(ax: Any, df: pd.DataFrame, x: str, y: str, colours: Mapping[str, str], s: float = 45) -> None:
    for _, r in df.iterrows():
        c = colours[r["_base"]]
        ax.scatter([r[x]], [r[y]], s=s, zorder=3, linewidths=1.3 if r["_twin"] else 0.5,
                   facecolors="none" if r["_twin"] else c, edgecolors=c if r["_twin"] else "black")


# --------------------------------------------------------------------------- figures


def plot_extended_panels(
    results: Mapping[str, Any], summary: pd.DataFrame | None, out_dir: Path | str
) -> list[Path]:
    """Notebook 000's four panels in one 2x2 figure (stem ``extended_panels``).

    (1) prompt-mean layer trace against l/L per model (twins dashed), (2) mean trace per model
    (log y), (3) L*/L per model with the 0.5 line, (4) L* (gradient) against L with the formula's
    prediction at each model's (L, H). Twins are hollow bars and points.
    """
    models = ok_models(results)
    df = clean_summary(summary if summary is not None else summary_from_results(results))
    colours = model_colour_map([_model_name(m) for m in models] + (list(df["_label"]) if len(df) else []))

    fig = new_figure(13, 10)
    ax1, ax2, ax3, ax4 = fig.subplots(2, 2).ravel()

    all_vals: list[float] = []
    for m in models:
        mean = mean_layer_trace(m)
        if mean.size == 0:
            continue
        twin = is_twin(m.get("init"), _model_name(m))
        ax1.plot(np.arange(len(mean)) / len(mean), mean, color=colours[base_name(_model_name(m))],
                 lw=1.0 if twin else 1.6, ls="--" if twin else "-", marker="o", ms=2.5,
                 mfc="none" if twin else None, label=_model_name(m))
        all_vals.extend(mean.tolist())
    if all_vals:
        if wants_log(all_vals):
            ax1.set_yscale("log")
        ax1.set_xlabel("normalised layer l / L  (l 0-based)")
        ax1.set_ylabel("multi-head layer trace (prompt mean)")
        ax1.legend(fontsize=6.5, ncols=2, loc="best")
    else:
        empty_axes(ax1, "no per-prompt traces available")
    ax1.set_title("(1) Layer trace vs depth (dashed: random-init twin)")

    def bars(ax: Any, d: pd.DataFrame, col: str) -> np.ndarray:
        pos = np.arange(len(d))
        for p, (_, r) in zip(pos, d.iterrows()):
            c = colours[r["_base"]]
            ax.bar([p], [r[col]], color="none" if r["_twin"] else c, edgecolor=c if r["_twin"] else "black",
                   hatch="///" if r["_twin"] else None, lw=0.8)
        ax.set_xticks(pos, list(d["_label"]), rotation=60, ha="right", fontsize=7)
        return pos

    if len(df) and "mean_trace" in df.columns and df["mean_trace"].notna().any():
        d2 = df[df["mean_trace"] > 0].sort_values("mean_trace")
        pos = bars(ax2, d2, "mean_trace")
        if {"mean_trace_ci_low", "mean_trace_ci_high"} <= set(d2.columns):
            h, lo, hi = (d2[c].to_numpy(dtype=float) for c in ("mean_trace", "mean_trace_ci_low", "mean_trace_ci_high"))
            ok = np.isfinite(lo) & np.isfinite(hi)
            if ok.any():
                err = np.vstack([np.clip(h - lo, 0, None), np.clip(hi - h, 0, None)])
                ax2.errorbar(pos[ok], h[ok], yerr=err[:, ok], fmt="none", ecolor="black", capsize=2, lw=0.8)
        ax2.set_yscale("log")
        ax2.set_ylabel("mean multi-head trace (log); hatched: twin")
    else:
        empty_axes(ax2, "mean trace not available")
    ax2.set_title("(2) Mean trace per model")

    ratio = _lstar_ratio(df)
    if ratio is not None and ratio.notna().any():
        d3 = df.assign(_ratio=ratio)
        d3 = d3[d3["_ratio"].notna()].sort_values("_ratio")
        bars(ax3, d3, "_ratio")
        ax3.axhline(0.5, color="black", ls="--", lw=1, label="L*/L = 0.5")
        ax3.set_ylabel("L* / L  (gradient definition); hatched: twin")
        ax3.set_ylim(0, max(1.05, float(d3["_ratio"].max()) * 1.1))
        ax3.legend(fontsize=7, loc="upper left")
    else:
        empty_axes(ax3, "L*/L not available")
    ax3.set_title("(3) Relative transition depth L*/L")

    if len(df) and {"n_layers", "lstar_gradient"} <= set(df.columns) and df["lstar_gradient"].notna().any():
        d4 = df[df["n_layers"].notna() & df["lstar_gradient"].notna()]
        _scatter_models(ax4, d4, "n_layers", "lstar_gradient", colours)
        if {"lstar_gradient_ci_low", "lstar_gradient_ci_high"} <= set(d4.columns):
            y, lo, hi = (d4[c].to_numpy(dtype=float) for c in ("lstar_gradient", "lstar_gradient_ci_low",
                                                                 "lstar_gradient_ci_high"))
            ok = np.isfinite(lo) & np.isfinite(hi)
            if ok.any():
                err = np.vstack([np.clip(y - lo, 0, None), np.clip(hi - y, 0, None)])
                ax4.errorbar(d4["n_layers"].to_numpy(dtype=float)[ok], y[ok], yerr=err[:, ok],
                             fmt="none", ecolor="grey", capsize=2, lw=0.8, zorder=2)
        l_grid = np.linspace(1, max(float(d4["n_layers"].max()) * 1.1, 2), 100)
        shapes = d4[["n_layers", "n_heads"]].dropna().drop_duplicates()
        shapes = shapes[shapes["n_heads"] > 0]
        ax4.scatter(shapes["n_layers"], [predicted_lstar(L, H) for L, H in shapes.to_numpy()], marker="x",
                    color="black", s=40, zorder=4, label="formula at the model's (L, H)")
        ax4.plot(l_grid, l_grid, color="#C0392B", lw=0.8, ls="--", label="L* = L (limit)")
        place_labels(ax4, d4["n_layers"].to_list(), d4["lstar_gradient"].to_list(), list(d4["_label"]))
        ax4.set_xlabel("number of layers L")
        ax4.set_ylabel("L* (gradient, 0-based layer); hollow: twin")
        ax4.legend(fontsize=7, loc="upper left")
    else:
        empty_axes(ax4, "L* (gradient) not available")
    ax4.set_title("(4) L* vs L with the formula's prediction")

    fig.suptitle("Sheaf-Laplacian trace across models (notebook 000 panels)", fontsize=12)
    return save_figure(fig, out_dir, "extended_panels")


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

    (1) predicted against empirical L* (definition ``lstar.EMPIRICAL``, ± its std over prompts
    where it has one) with y = x; trained models filled, twins hollow, models with no transition
    crossed out; red rings mark predictions beyond L. (2) error % of L by lab over the trained
    models with a transition only: bar = lab mean, dots = models in their colours, dashed line =
    the 10 % threshold.
    """
    df = clean_summary(summary)
    colours = model_colour_map(df["_label"] if len(df) else [])
    fig = new_figure(13, 6)
    ax1, ax2 = fig.subplots(1, 2)

    emp = lstar.DEFINITIONS[lstar.EMPIRICAL]
    emp_col = emp.columns[0]
    std_col = emp.columns[1] if emp.over == "prompts" else None
    d1 = df[df["lstar_predicted"].notna() & df[emp_col].notna()] if len(df) and {"lstar_predicted", emp_col} <= set(df.columns) else pd.DataFrame()
    if len(d1):
        x = d1[emp_col].to_numpy(dtype=float)
        y = d1["lstar_predicted"].to_numpy(dtype=float)
        xerr = d1[std_col].fillna(0).to_numpy(dtype=float) if std_col in d1.columns else None
        ax1.errorbar(x, y, xerr=xerr, fmt="none", ecolor="grey", capsize=2, lw=0.8, zorder=1)
        _scatter_models(ax1, d1, emp_col, "lstar_predicted", colours, s=55)
        flat = d1["no_transition"].to_numpy(dtype=bool)
        if flat.any():
            ax1.scatter(x[flat], y[flat], marker="x", s=90, color="black", zorder=5, label="no transition")
        exceeds = d1["exceeds_L"].to_numpy(dtype=bool) if "exceeds_L" in d1.columns else np.zeros(len(d1), bool)
        if exceeds.any():
            ax1.scatter(x[exceeds], y[exceeds], s=240, facecolors="none", edgecolors="red", lw=1.4, zorder=4,
                        label="prediction > L")
        lo = float(min(np.nanmin(x), np.nanmin(y), 0.0))
        hi = float(max(np.nanmax(x), np.nanmax(y))) * 1.08 + 0.5
        ax1.plot([lo, hi], [lo, hi], color="black", ls="--", lw=0.9, label="y = x")
        ax1.set_xlim(lo, hi)
        ax1.set_ylim(lo, hi)
        place_labels(ax1, x.tolist(), y.tolist(), list(d1["_label"]))
        ax1.set_xlabel(f"empirical L* ({emp.name} definition{', prompt mean ± std' if std_col else ''})")
        ax1.set_ylabel("predicted L* = L(0.11 + 0.012L + 4.9/H)")
        ax1.legend(fontsize=7, loc="upper left", title="filled: trained, hollow: random-init twin",
                   title_fontsize=7)
    else:
        empty_axes(ax1, "predicted / empirical L* not available")
    ax1.set_title("(1) Predicted vs empirical L*")

    evidence = df[~df["_twin"] & ~df["no_transition"]] if len(df) else df
    if len(evidence) and "error_pct" in evidence.columns and evidence["error_pct"].notna().any():
        d2 = evidence[evidence["error_pct"].notna()]
        labs = sorted(d2["_lab"].unique())
        means = [float(d2.loc[d2["_lab"] == lab, "error_pct"].mean()) for lab in labs]
        pos = np.arange(len(labs))
        ax2.bar(pos, means, color="#D5D8DC", edgecolor="black", lw=0.4, label="lab mean")
        for i, lab in enumerate(labs):
            grp = d2[d2["_lab"] == lab]
            offsets = np.linspace(-0.2, 0.2, len(grp)) if len(grp) > 1 else np.zeros(1)
            for off, (_, r) in zip(offsets, grp.iterrows()):
                ax2.scatter([i + off], [r["error_pct"]], color=colours[r["_base"]], edgecolor="black", lw=0.5,
                            s=40, zorder=3, label=r["_label"])
        ax2.axhline(THRESHOLD_PCT, color="orange", ls="--", lw=1.5, label="10 % threshold")
        ax2.set_xticks(pos, labs, rotation=30, ha="right", fontsize=8)
        ax2.set_ylabel("error % of L  (|pred − emp| / L · 100)")
        ax2.legend(fontsize=7, loc="upper right")
        n_out = int(len(df) - len(evidence))
        ax2.set_title(f"(2) Prediction error by lab, trained models only ({n_out} control(s) or flat left out)",
                      fontsize=10)
    else:
        empty_axes(ax2, "no trained model with a transition: no error to show")
        ax2.set_title("(2) Prediction error by lab")

    fig.suptitle("Cross-heritage test of the L* formula (notebook 001 panels)", fontsize=12)
    return save_figure(fig, out_dir, "cross_heritage")


def plot_layer_profiles(
    results: Mapping[str, Any], out_dir: Path | str, summary: pd.DataFrame | None = None
) -> list[Path]:
    """Small multiples of each model's layer trace (stem ``layer_profiles``).

    Thin grey lines are single prompts, the bold line their mean in the model's colour (dashed for
    a twin); vertical lines mark L* (one per definition), the attention-sink layer, the
    massive-activation layer and the intrinsic-dimension peak. A model with no transition says so in its title.
    """
    models = [m for m in ok_models(results) if prompt_layer_traces(m).size]
    colours = model_colour_map(_model_name(m) for m in models)
    extra = clean_summary(summary)
    by_spec: dict[str, Mapping[str, Any]] = {}
    if len(extra) and "spec" in extra.columns:
        by_spec = {str(r["spec"]): r for _, r in extra.iterrows()}

    n = max(len(models), 1)
    ncols = min(3, n)
    nrows = math.ceil(n / ncols)
    fig = new_figure(4.6 * ncols, 3.3 * nrows + 0.6)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    if not models:
        empty_axes(axes[0], "no successful model with per-prompt traces")

    definitions = list(lstar.DEFINITIONS.values())
    markers = (
        *((f"L* ({d.name})", "black", _LSTAR_DASHES[i % len(_LSTAR_DASHES)]) for i, d in enumerate(definitions)),
        ("attention sink", "#2C3E50", "--"),
        ("massive activation", "#7F8C8D", ":"),
        ("intrinsic-dimension peak", "#8E44AD", (0, (8, 2))),
    )
    used: set[str] = set()
    for ax, m in zip(axes, models):
        rows = prompt_layer_traces(m)
        layers = np.arange(rows.shape[1])
        for r in rows:
            ax.plot(layers, r, color="grey", lw=0.6, alpha=0.6)
        name = _model_name(m)
        twin = is_twin(m.get("init"), name)
        ax.plot(layers, rows.mean(axis=0), color=colours[base_name(name)], lw=2.2, ls="--" if twin else "-")
        if wants_log(rows.ravel()):
            ax.set_yscale("log")
        row = by_spec.get(str(m.get("spec")), {})
        flat = bool(row.get("no_transition")) if len(row) else bool(lstar.transition_test(rows)["flat"])
        positions = (
            *(_first_finite(nested_get(m, "lstar", d.name, d.value_key), row.get(d.columns[0])) for d in definitions),
            _first_finite(m.get("sink_layer"), nested_get(m, "diagnostics", "sink_layer"), row.get("sink_layer")),
            _first_finite(m.get("massive_activation_layer"), nested_get(m, "diagnostics", "massive_activation_layer"),
                          row.get("massive_activation_layer")),
            _first_finite(nested_get(m, "intrinsic_dimension", "peak_layer"), row.get("intrinsic_dimension_peak_layer")),
        )
        for i, ((label, colour, style), pos) in enumerate(zip(markers, positions)):
            if pos is not None and not (flat and i < len(definitions)):
                ax.axvline(pos, color=colour, ls=style, lw=1.5)
                used.add(label)
        tags = [t for t, on in (("random-init control", twin), ("no transition", flat)) if on]
        ax.set_title(f"{name}  (L={m.get('n_layers', len(layers))}, H={m.get('n_heads', '?')})"
                     + (f"\n{', '.join(tags)}" if tags else ""), fontsize=9)
        ax.set_xlabel("layer (0-based)", fontsize=8)
        ax.set_ylabel("layer trace", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in axes[len(models):] if models else axes[1:]:
        ax.set_visible(False)

    handles = [Line2D([], [], color="grey", lw=0.6, label="single prompt"),
               Line2D([], [], color="black", lw=2.2, label="prompt mean (model colour)"),
               Line2D([], [], color="black", lw=2.2, ls="--", label="prompt mean, random-init twin")]
    handles += [Line2D([], [], color=c, ls=s, lw=1.5, label=lbl) for lbl, c, s in markers if lbl in used]
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 4), fontsize=8)
    fig.suptitle("Per-model layer trace profiles", fontsize=12)
    return save_figure(fig, out_dir, "layer_profiles")


def _first_finite(*values: Any) -> float | None:
    for v in values:
        f = as_float(v)
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
    paths += plot_domain(results, fig_dir)
    paths += plot_cross_heritage(summary, fig_dir)
    paths += plot_extended_panels(results, summary, fig_dir)
    paths += plot_layer_profiles(results, fig_dir, summary=summary)
    return paths
