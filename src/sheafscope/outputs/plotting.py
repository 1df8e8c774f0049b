"""What every figure of a run shares: colours (one per model, twins in their trained model's colour
but hollow), the summary rows as numbers, label placement without overlaps, and saving.

Figures are built on ``matplotlib.figure.Figure`` with an explicit Agg canvas rather than through
``pyplot``: that needs no display, keeps no global figure registry that could leak memory over a
long run, and does not switch the backend of a notebook that imports this module.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from adjustText import adjust_text
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from sheafscope.measures import lstar
from sheafscope.outputs.formula import predict_lstar

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
THRESHOLD_PCT = 10.0
# Dash patterns of the L* lines in the layer profiles, one per definition in registry order:
# black because the lab colours are taken by the mean lines, and none of them the sink's "--"
TWIN_PREFIX = "random:"


def predicted_lstar(n_layers: float, n_heads: float) -> float:
    """The formula under test: ``L* = L * (0.11 + 0.012 L + 4.9 / H)``."""
    return float(predict_lstar(float(n_layers), float(n_heads)))


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


def ok_models(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [m for m in results.get("models") or [] if not _is_failed(m.get("status"))]


def _model_lab(model: Mapping[str, Any]) -> str:
    return _lab_name((model.get("metadata") or {}).get("lab"))


def short_name(name: Any) -> str:
    # Hub ids ("EleutherAI/pythia-160m") are too long for point labels; the org is the lab anyway.
    text = "" if name is None or (isinstance(name, float) and math.isnan(name)) else str(name)
    return text.rstrip("/").rsplit("/", 1)[-1]


def as_float(value: Any) -> float:
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


def nested_get(mapping: Any, *keys: str) -> Any:
    cur = mapping
    for key in keys:
        if not isinstance(cur, Mapping):
            return None
        cur = cur.get(key)
    return cur


def mean_layer_trace(model: Mapping[str, Any]) -> np.ndarray:
    """Prompt-mean multi-head layer trace of one model (empty array when it has no prompts)."""
    rows = prompt_layer_traces(model)
    if rows.size == 0:
        return rows
    return rows.mean(axis=0)


def prompt_layer_traces(model: Mapping[str, Any]) -> np.ndarray:
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


def clean_summary(summary: pd.DataFrame | None) -> pd.DataFrame:
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
        "transition_z",
    ]
    for col in numeric:
        if col in df.columns:
            df[col] = pd.to_numeric(df[col], errors="coerce")
    for col in ("exceeds_L", "no_transition"):
        if col in df.columns:
            df[col] = df[col].map(_as_bool)
    df["_lab"] = [_lab_name(v) for v in df["lab"]] if "lab" in df.columns else _UNKNOWN_LAB
    names = df["model"] if "model" in df.columns else pd.Series([None] * len(df), index=df.index)
    specs = df["spec"] if "spec" in df.columns else pd.Series([None] * len(df), index=df.index)
    df["_label"] = [short_name(s) or short_name(n) for n, s in zip(names, specs)]
    inits = df["init"] if "init" in df.columns else pd.Series([None] * len(df), index=df.index)
    df["_twin"] = [is_twin(i, label) for i, label in zip(inits, df["_label"])]
    df["_base"] = [base_name(label) for label in df["_label"]]
    if "no_transition" not in df.columns:
        df["no_transition"] = False
    return df.reset_index(drop=True)


def summary_from_results(results: Mapping[str, Any]) -> pd.DataFrame:
    """The summary table rebuilt from results.json, for runs whose summary.csv is missing."""
    from sheafscope.outputs.summarize import summary_frame

    return summary_frame(list(results.get("models") or []))


def new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, out_dir: Path | str, stem: str) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    png = out / f"{stem}.png"
    svg = out / f"{stem}.svg"
    fig.savefig(png, dpi=_DPI, format="png")
    # No date in the SVG so reruns of the same data give identical files.
    fig.savefig(svg, format="svg", metadata={"Date": None})
    return [png, svg]


def empty_axes(ax: Any, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes,
            fontsize=10, color="#777777", wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])


def wants_log(values: Sequence[float] | np.ndarray) -> bool:
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


def base_name(name: Any) -> str:
    """A twin's name without its ``random:`` prefix: the trained model it mirrors."""
    text = short_name(name)
    return text[len(TWIN_PREFIX):] if text.startswith(TWIN_PREFIX) else text


def model_colour_map(names: Iterable[Any]) -> dict[str, str]:
    """One colour per model, keyed by :func:`base_name` so a twin shares its trained model's colour
    (and is told apart by a hollow marker or a dashed line). Sorted, so colours hold across figures."""
    bases = sorted({base_name(n) for n in names})
    cmap = colormaps["tab10" if len(bases) <= 10 else "tab20"]
    return {b: _hex(cmap(i % cmap.N)) for i, b in enumerate(bases)}


def _hex(rgba: Sequence[float]) -> str:
    return "#" + "".join(f"{round(c * 255):02x}" for c in rgba[:3])


def is_twin(init: Any, name: Any = None) -> bool:
    """A random-init twin: a control, never evidence."""
    return str(init).strip().lower() == "random" or short_name(name).startswith(TWIN_PREFIX)


def place_labels(ax: Any, xs: Sequence[float], ys: Sequence[float], labels: Sequence[str], **text_kw: Any) -> list[Any]:
    """Point labels moved apart by adjustText, each tied to its point by a thin line when moved."""
    # Points on one spot share one label: two labels tied to one point cannot be pulled apart.
    merged: dict[tuple[float, float], list[str]] = {}
    for x, y, label in zip(xs, ys, labels):
        if np.isfinite(x) and np.isfinite(y):
            merged.setdefault((float(x), float(y)), []).append(str(label))
    fontsize = text_kw.pop("fontsize", 7)
    texts = [ax.text(x, y, "\n".join(names), fontsize=fontsize, **text_kw) for (x, y), names in merged.items()]
    xs, ys = [k[0] for k in merged], [k[1] for k in merged]
    if len(texts) > 1:
        # The layout is settled first: adjustText works in display coordinates.
        ax.figure.draw_without_rendering()
        adjust_text(texts, x=list(xs), y=list(ys), ax=ax, time_lim=2, force_text=(0.3, 0.5), expand=(1.2, 1.4),
                    arrowprops={"arrowstyle": "-", "color": "grey", "lw": 0.5})
    return texts
