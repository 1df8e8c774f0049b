"""Units of work: a model and one shard of the prompts.

A run splits each model's prompts into shards that depend on the prompts alone (never on how
many processes run), so one process or many compute every prompt in the same batches and give
the same numbers. Each unit is written to DIR/units/<model>/<k>-of-<n>.json atomically with its
resume key; a rerun computes only the units that are missing, failed or out of date. When all
of a model's units are there, one process merges them into the model's result (L* and every
statistic across prompts are computed there, never per shard) and removes the unit files.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sheafscope.errors import SheafscopeError
from sheafscope.outputs.io import read_json
from sheafscope.resume import key_hash

# Prompts per shard: enough for full batches of short prompts, few enough that a study's
# prompts spread over several processes.
SHARD_PROMPTS = 64


@dataclass
class ModelEntry:
    """A model to run: its spec and metadata overrides (lab, behavior, gain, ...)."""

    spec: str
    metadata: dict[str, Any] = field(default_factory=dict)


def slug(spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", spec).strip("_") or "model"


def shards(prompts: list[str], size: int = SHARD_PROMPTS) -> list[list[int]]:
    """Prompt indices in ceil(n / size) shards. Prompts are ordered by length and dealt out in
    turn, so every shard holds long and short prompts alike (similar work per shard) and each
    can still batch prompts of like length."""
    n = len(prompts)
    count = max(1, -(-n // size))
    order = sorted(range(n), key=lambda i: (-len(prompts[i]), i))
    return [sorted(order[k::count]) for k in range(count)]


@dataclass
class Unit:
    """One model and one shard of the prompts, with where its result goes and its resume key."""

    entry: ModelEntry
    index: int
    count: int
    prompts: list[int]
    path: Path
    key: dict[str, Any]

    @property
    def name(self) -> str:
        return f"{self.entry.spec} [{self.index + 1}/{self.count}]"


def units_dir(out_dir: Path, spec: str) -> Path:
    return Path(out_dir) / "units" / slug(spec)


def model_units(entry: ModelEntry, prompts: list[str], model_key: dict[str, Any], out_dir: Path) -> list[Unit]:
    """The units of one model: its resume key plus which shard of the prompts."""
    parts = shards(prompts)
    units = []
    for k, indices in enumerate(parts):
        key = {**model_key, "shard": {"index": k, "count": len(parts), "prompts": indices}}
        key["fingerprint"] = key_hash(key)
        units.append(Unit(entry, k, len(parts), indices, units_dir(out_dir, entry.spec) / f"{k + 1}-of-{len(parts)}.json", key))
    return units


def finished(unit: Unit) -> dict[str, Any] | None:
    """The unit's earlier record if it is complete, measured and has this unit's key."""
    try:
        record = read_json(unit.path)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    if isinstance(record, dict) and record.get("status") == "ok" and record.get("fingerprint") == unit.key["fingerprint"]:
        return record
    return None


def failed_entry(entry: ModelEntry, err: BaseException | dict[str, Any]) -> dict[str, Any]:
    error = err if isinstance(err, dict) else {"type": type(err).__name__, "message": str(err) or type(err).__name__}
    return {"spec": entry.spec, "status": "failed", "error": error, "metadata": entry.metadata}


def merge(units: list[Unit], prompts: list[str]) -> dict[str, Any]:
    """The model's results.json entry from its unit records (failed if any unit failed)."""
    from sheafscope.analysis import Part, assemble

    entry = units[0].entry
    records = []
    for u in units:
        try:
            records.append(read_json(u.path))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            return failed_entry(entry, SheafscopeError(f"unit {u.path} could not be read ({type(e).__name__}); rerun to recompute it"))
    done = [{"shard": r["shard"]["index"] + 1, "of": r["shard"]["count"], "prompts": len(r["shard"]["prompts"]),
             "process": r.get("process"), "status": r["status"]} for r in records]
    bad = next((r for r in records if r.get("status") != "ok"), None)
    if bad is not None:
        return {**failed_entry(entry, bad.get("error") or {"type": "Error", "message": "unit failed"}), "units": done}
    parts = [Part.from_dict(r["part"]) for r in records]
    for d, p in zip(done, parts):
        d.update(device=p.info.get("device"), elapsed_s=p.info.get("elapsed_s"), load_seconds=p.info.get("load_seconds"))
    try:
        out = assemble(parts, len(prompts)).to_dict()
    except SheafscopeError as e:
        return {**failed_entry(entry, e), "units": done}
    out["metadata"] = {**out.get("metadata", {}), **entry.metadata}
    out["units"] = done
    return out


def remove_units(out_dir: Path, spec: str) -> None:
    """A merged model's unit files: its result file now holds all of them."""
    shutil.rmtree(units_dir(out_dir, spec), ignore_errors=True)
