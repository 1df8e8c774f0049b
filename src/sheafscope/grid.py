"""A suite over a grid of conditions (precisions, quantizations, prompt sets): one ordinary run
per condition in DIR/<condition>/, then how each model's L* and the verdicts vary across them
(DIR/robustness.json, robustness.csv and figures/robustness.png).

A suite file declares its grid in a [grid] table whose keys are run options (dtype, quantize,
...) or `prompts`, each a list; the conditions are every combination. A condition this machine
cannot run (8-bit or 4-bit without bitsandbytes and a GPU) is left out and listed with why.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sheafscope.errors import ConfigError
from sheafscope.measures.lstar import DEFINITIONS
from sheafscope.outputs.formula import NOT_VERDICTS
from sheafscope.outputs.io import atomic_write_json, atomic_write_text

GRID_KEYS = {"dtype", "quantize", "prompts", "restriction_map", "max_tokens", "seed"}


@dataclass(frozen=True)
class Condition:
    """One cell of the grid: the options it sets (and the prompt set, under "prompts")."""

    name: str
    settings: dict[str, Any]


def conditions(grid: dict[str, list[Any]]) -> tuple[list[Condition], list[dict[str, str]]]:
    """Every combination of the grid's values, and those left out on this machine with why."""
    unknown = set(grid) - GRID_KEYS
    if unknown or not all(isinstance(v, list) and v for v in grid.values()):
        raise ConfigError(f"a suite's [grid] takes non-empty lists of {', '.join(sorted(GRID_KEYS))}"
                          + (f"; unknown: {', '.join(sorted(unknown))}" if unknown else ""))
    keys = sorted(grid)
    cells, skipped = [], []
    for values in itertools.product(*(grid[k] for k in keys)):
        # TOML has no null: "none" stands for an option left unset (e.g. quantize = ["none", "4bit"]).
        settings = {k: (None if v == "none" else v) for k, v in zip(keys, values)}
        name = "_".join(str(v) for v in values)
        why = _cannot_run(settings)
        if why:
            skipped.append({"condition": name, "why": why})
        else:
            cells.append(Condition(name, settings))
    return cells, skipped


def _cannot_run(settings: dict[str, Any]) -> str | None:
    if not settings.get("quantize"):
        return None
    import importlib.util

    import torch

    if importlib.util.find_spec("bitsandbytes") is None:
        return "bitsandbytes is not installed"
    if not torch.cuda.is_available():
        return "bitsandbytes quantization needs a CUDA GPU"
    return None


def _lstar_of(model: dict[str, Any]) -> dict[str, float | None]:
    block = model.get("lstar") or {}
    out = {}
    for name, d in DEFINITIONS.items():
        v = (block.get(name) or {}).get(d.value_key)
        out[name] = None if v is None else float(v)
    return out


def compare(out_dir: Path, cells: list[Condition], skipped: list[dict[str, str]]) -> dict[str, Any]:
    """Each model's L* (every definition) per condition, its spread (max - min over the
    conditions where it ran), and the verdict of each claim per condition with whether it flips.
    NO DATA and NO VERDICT are not verdicts: a claim judged in one condition and not in another
    has not flipped; it is listed under not_judged with the reason."""
    rows, verdicts, claims_of = [], {}, {}
    for cell in cells:
        d = out_dir / cell.name
        results = json.loads((d / "results.json").read_text(encoding="utf-8"))
        analysis = json.loads((d / "analysis.json").read_text(encoding="utf-8"))
        claims_of[cell.name] = {c["key"]: c for c in analysis.get("claims", [])}
        verdicts[cell.name] = {k: c.get("verdict") for k, c in claims_of[cell.name].items()}
        for m in results["models"]:
            rows.append({"model": m["spec"], "condition": cell.name, **cell.settings, "status": m["status"],
                         "n_layers": m.get("n_layers"), **{f"lstar_{k}": v for k, v in _lstar_of(m).items()}})
    spread: dict[str, dict[str, Any]] = {}
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model and r["status"] == "ok"]
        spread[model] = {"conditions_ok": len(mine), "conditions_failed": [r["condition"] for r in rows
                                                                           if r["model"] == model and r["status"] != "ok"]}
        for name in DEFINITIONS:
            values = [r[f"lstar_{name}"] for r in mine if r[f"lstar_{name}"] is not None]
            spread[model][name] = {"min": min(values), "max": max(values), "spread": max(values) - min(values)} if values else None
    judged: dict[str, dict[str, dict]] = {}
    not_judged: dict[str, dict[str, str]] = {}
    for cond, claims in claims_of.items():
        for key, c in claims.items():
            if c.get("verdict") in NOT_VERDICTS:
                not_judged.setdefault(key, {})[cond] = f"{c.get('verdict')}: {c.get('verdict_reason') or 'no reason recorded'}"
            elif c.get("verdict") is not None:
                judged.setdefault(key, {})[cond] = c
    flips, settled_flips = {}, {}
    for key, by_cond in sorted(judged.items()):
        seen = sorted({c["verdict"] for c in by_cond.values()})
        if len(seen) > 1:
            flips[key] = seen
            settled = sorted({c["verdict"] for c in by_cond.values() if c.get("settled")})
            if len(settled) > 1:
                settled_flips[key] = settled
    return {
        "conditions": [{"name": c.name, **c.settings} for c in cells],
        "skipped": skipped,
        "lstar": rows,
        "spread": spread,
        "verdicts": verdicts,
        "verdict_flips": flips,
        "settled_flips": settled_flips,
        "not_judged": not_judged,
        "definitions": {
            "spread": "max - min of a model's L* over the conditions in which it ran",
            "verdict_flips": "claims whose verdict differs between the conditions that judged them, with the verdicts "
                             "seen (NO DATA and NO VERDICT are not verdicts)",
            "settled_flips": "claims with two different verdicts each settled (its 95 % interval within one band): a "
                             "flip the data support, not one within the intervals' noise",
            "not_judged": "per claim, the conditions that gave no verdict, and why",
        },
    }


def write(out_dir: Path, table: dict[str, Any]) -> None:
    import pandas as pd

    atomic_write_json(out_dir / "robustness.json", table)
    atomic_write_text(out_dir / "robustness.csv", pd.DataFrame(table["lstar"]).to_csv(index=False))
    try:  # a derived view: a plotting problem must not lose the table
        plot(out_dir, table)
    except Exception as e:  # noqa: BLE001
        import logging

        logging.getLogger(__name__).error("figures/robustness could not be written (%s); the numbers are in robustness.json", e)


def plot(out_dir: Path, table: dict[str, Any]) -> None:
    """L*/L (the empirical definition) of every model across the conditions."""
    from sheafscope.measures.lstar import EMPIRICAL
    from sheafscope.outputs.plotting import new_figure, save_figure

    names = [c["name"] for c in table["conditions"]]
    fig = new_figure(max(6.0, 1.2 * len(names) + 3), 5)
    ax = fig.subplots()
    for model in table["spread"]:
        ys = []
        for name in names:
            r = next((r for r in table["lstar"] if r["model"] == model and r["condition"] == name), None)
            ok = r is not None and r["status"] == "ok" and r[f"lstar_{EMPIRICAL}"] is not None and r["n_layers"]
            ys.append(r[f"lstar_{EMPIRICAL}"] / r["n_layers"] if ok else np.nan)
        ax.plot(range(len(names)), ys, marker="o", label=model)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_ylabel(f"L* / L ({EMPIRICAL} definition)")
    ax.set_title("L* per model across conditions (a gap: the model failed there)")
    ax.legend(fontsize=7)
    save_figure(fig, out_dir / "figures", "robustness")
