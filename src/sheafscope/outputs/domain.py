"""Where the formula can hold: its predicted L*/L over the (L, H) plane, from configs alone.

``L*/L = 0.11 + 0.012 L + 4.9 / H`` does not depend on any measurement, so every architecture
of the catalog (and every model of a run) can be placed on it before anything is loaded. A
transition layer lies inside the model only where the ratio is at most 1, i.e. for
``L <= (0.89 - 4.9 / H) / 0.012``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sheafscope.models.catalog import CatalogEntry, catalog
from sheafscope.outputs.formula import FORMULA_COEFFICIENTS, predict_lstar

# Config keys that hold the depth and the number of attention heads, across config classes.
_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
_HEAD_KEYS = ("num_attention_heads", "n_head", "num_heads", "n_heads")


def shape_of(entry: CatalogEntry) -> tuple[int, int] | None:
    """(L, H) of a catalog entry, read from its config keys, else from its transformers config."""
    L = next((entry.config[k] for k in _LAYER_KEYS if k in entry.config), None)
    H = next((entry.config[k] for k in _HEAD_KEYS if k in entry.config), None)
    if L is None or H is None:
        try:
            config = entry.build_config()
        except Exception:  # an unknown config class cannot be placed, but must not cost the report
            return None
        L, H = getattr(config, "num_hidden_layers", None), getattr(config, "num_attention_heads", None)
    if not L or not H:
        return None
    return int(L), int(H)


def max_depth(H: float) -> float | None:
    """The deepest L whose predicted L* stays within the model for H heads (None when none does)."""
    a, b, c = FORMULA_COEFFICIENTS
    room = 1.0 - a - c / H
    return room / b if room > 0 else None


def row(name: str, lab: str, L: int, H: int, source: str) -> dict[str, Any]:
    predicted = float(predict_lstar(L, H))
    return {
        "model": name,
        "lab": lab,
        "L": L,
        "H": H,
        "predicted_lstar": predicted,
        "predicted_ratio": predicted / L,
        "exceeds_L": bool(predicted > L),
        "max_L_for_H": max_depth(H),
        "source": source,
    }


def domain_table(run_models: Sequence[Mapping[str, Any]] = ()) -> list[dict[str, Any]]:
    """One row per catalog architecture, then per run model of a shape the catalog lacks.

    Each row: ``model, lab, L, H, predicted_lstar, predicted_ratio (= L*/L), exceeds_L,
    max_L_for_H, source`` (``"catalog"`` or ``"run"``), sorted by predicted ratio.
    """
    rows = []
    for entry in catalog().values():
        shape = shape_of(entry)
        if shape is not None:
            rows.append(row(entry.name, entry.lab, *shape, "catalog"))
    known = {(r["L"], r["H"], r["lab"]) for r in rows}
    for m in run_models:
        if m.get("status") != "ok" or m.get("init") == "random" or not m.get("n_layers") or not m.get("n_heads"):
            continue
        lab = str((m.get("metadata") or {}).get("lab") or "unknown")
        L, H = int(m["n_layers"]), int(m["n_heads"])
        if (L, H, lab) not in known:
            rows.append(row(str(m.get("spec") or m.get("model_id")), lab, L, H, "run"))
            known.add((L, H, lab))
    return sorted(rows, key=lambda r: (r["predicted_ratio"], r["model"]))
