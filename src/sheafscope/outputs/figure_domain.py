"""The figure "where the formula can hold": predicted L*/L over the (L, H) plane, with every
catalog architecture and every model of the run placed on it (stem ``domain``)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.colors import TwoSlopeNorm
from matplotlib.lines import Line2D

from sheafscope.outputs.domain import domain_table
from sheafscope.outputs.formula import predict_lstar
from sheafscope.outputs.plotting import new_figure, save_figure, place_labels


def plot_domain(results: Mapping[str, Any] | None, out_dir: Path | str) -> list[Path]:
    """Predicted L*/L as a colour map over L (x) and H (y, log), the line L*/L = 1 beyond which the
    formula puts the transition past the last layer, and the architectures as labelled points
    (filled: in the catalog, square: a run model the catalog lacks)."""
    rows = domain_table((results or {}).get("models") or [])
    L_max = max([100, *(r["L"] * 1.1 for r in rows)])
    H_max = max([128, *(r["H"] * 1.3 for r in rows)])
    L = np.linspace(1, L_max, 120)  # a smooth surface: a finer grid only slows the figure
    H = np.geomspace(1, H_max, 120)
    LL, HH = np.meshgrid(L, H)
    ratio = np.asarray(predict_lstar(LL, HH)) / LL

    fig = new_figure(11, 7)
    ax = fig.subplots()
    # Diverging at 1: blue where the predicted transition lies inside the model, red beyond it.
    norm = TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=2.0)
    mesh = ax.pcolormesh(LL, HH, np.clip(ratio, 0, 2), cmap="RdBu_r", norm=norm, shading="auto", alpha=0.75,
                         rasterized=True)  # a mesh as vector paths makes a slow, heavy SVG
    fig.colorbar(mesh, ax=ax, label="predicted L* / L  (clipped at 2)")
    contours = ax.contour(LL, HH, ratio, levels=[0.5, 0.75, 1.0], colors=["grey", "grey", "black"],
                          linewidths=[0.7, 0.7, 2.0])
    ax.clabel(contours, fmt=lambda v: f"L*/L = {v:g}", fontsize=7)
    ax.set_yscale("log")
    ax.set_xlim(1, L_max)
    ax.set_ylim(1, H_max)

    # Architectures of one shape share a point and one label, so no two labels sit on one spot.
    shapes: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for r in rows:
        shapes.setdefault((r["L"], r["H"]), []).append(r)
    for (L_, H_), group in shapes.items():
        run_only = all(r["source"] == "run" for r in group)
        ax.scatter([L_], [H_], s=50, zorder=3, marker="s" if run_only else "o",
                   color="#F7DC6F" if group[0]["exceeds_L"] else "#FFFFFF", edgecolor="black", lw=0.9)
    labels = ["\n".join(r["model"] for r in g) + f" ({g[0]['predicted_ratio']:.2f})" for g in shapes.values()]
    place_labels(ax, [k[0] for k in shapes], [k[1] for k in shapes], labels)

    ax.set_xlabel("number of layers L")
    ax.set_ylabel("number of attention heads H (log)")
    ax.legend(handles=[
        Line2D([], [], color="black", lw=2, label="L*/L = 1: above-left of it the transition lies inside the model"),
        Line2D([], [], ls="none", marker="o", color="white", markeredgecolor="black", label="catalog architecture (L*/L in brackets)"),
        Line2D([], [], ls="none", marker="o", color="#F7DC6F", markeredgecolor="black", label="predicted L* beyond the last layer"),
        Line2D([], [], ls="none", marker="s", color="white", markeredgecolor="black", label="run model not in the catalog"),
    ], fontsize=7, loc="upper right")
    ax.set_title("Where the formula can hold: predicted L*/L = 0.11 + 0.012·L + 4.9/H (from configs alone)",
                 fontsize=11)
    return save_figure(fig, out_dir, "domain")
