"""Units of work: a model and one shard of the prompts.

A run splits each model's prompts into shards that depend on the prompts alone (never on how
many processes run), so one process or many compute every prompt in the same batches and give
the same numbers. Each unit is written to DIR/units/<model>/<k>-of-<n>.json atomically with its
resume key, its prompts' pooled hidden states beside it in <k>-of-<n>.npz (written first: the
JSON record is what marks a unit finished); a rerun computes only the units that are missing, failed or out of date. When all
of a model's units are there, one process merges them into the model's result (L* and every
statistic across prompts are computed there, never per shard) and removes the unit files.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sheafscope.errors import SheafscopeError
from sheafscope.outputs.io import file_mode, read_json, write_error
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


def pooled_path(unit: Unit) -> Path:
    return unit.path.with_suffix(".npz")


def write_pooled(unit: Unit, pooled: dict[int, np.ndarray]) -> None:
    """The unit's pooled hidden states (prompt index -> (layers + 1, d)), written atomically beside
    its record; OutputWriteError as for any result file."""
    path = pooled_path(unit)
    indices = sorted(pooled)
    arrays = np.stack([pooled[i] for i in indices]) if indices else np.zeros((0, 0, 0), dtype=np.float32)
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, indices=np.asarray(indices, dtype=np.int64), pooled=arrays)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise write_error(path, e) from e
        raise


def read_pooled(unit: Unit) -> dict[int, np.ndarray]:
    with np.load(pooled_path(unit)) as f:
        return {int(i): v for i, v in zip(f["indices"], f["pooled"])}


def finished(unit: Unit) -> dict[str, Any] | None:
    """The unit's earlier record if it is complete, measured and has this unit's key (and its
    pooled hidden states are there)."""
    try:
        record = read_json(unit.path)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    if (isinstance(record, dict) and record.get("status") == "ok" and record.get("fingerprint") == unit.key["fingerprint"]
            and pooled_path(unit).is_file()):
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
    for u, p in zip(units, parts):
        try:
            p.pooled = read_pooled(u)
        except (OSError, ValueError, KeyError) as e:
            return {**failed_entry(entry, SheafscopeError(f"unit {pooled_path(u)} could not be read ({type(e).__name__}); "
                                                          "rerun to recompute it")), "units": done}
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
