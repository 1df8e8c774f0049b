"""Running many models over one prompt set, in one process or many, surviving failure.

The work is units: a model and a shard of the prompts (units.py). Each process computes its
share of the units that are missing and writes each atomically with its resume key (resume.py:
weights, code, prompts, options); then the main process merges each model's units into
DIR/models/<slug>.json and writes results.json, summary.csv, analysis.json, figures and the
report. A rerun into the same DIR reuses a model's file, or its finished units, when the key is
the same (stdout says so); otherwise it recomputes and says which part changed. A model that
fails is recorded with its error (and retried next time) and the run goes on.

The output directory's rules (one run at a time, never two runs' results mixed) are rundir.py's.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import platform
import sys
import traceback
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from itertools import groupby
from pathlib import Path
from typing import Any, Callable

from sheafscope import __version__
from sheafscope.errors import ConfigError, OutputWriteError, SheafscopeError
from sheafscope.outputs.io import atomic_write_json, read_json
from sheafscope.processes import Processes
from sheafscope.resume import COMMIT, code_identity, jsonable, key_changes, key_hash, listed, resume_key
from sheafscope.rundir import RunLock, check_distinct, earlier_run_differs, prepare_dir, remove_earlier_run, remove_temporaries
from sheafscope.units import (ModelEntry, Unit, finished, merge, model_units, remove_units, slug,
                              write_pooled)

__all__ = ["ModelEntry", "RunOptions", "RunOutcome", "run", "slug"]

log = logging.getLogger(__name__)


@dataclass
class RunOptions:
    """Options that change the numbers (recorded, and part of the resume fingerprint)."""

    dtype: str | None = None
    device: str | None = None
    restriction_map: str = "raw_wv"
    max_tokens: int | None = None
    revision: str | None = None
    quantize: str | None = None
    seed: int = 0
    init: str = "pretrained"
    attention: str = "fast"  # "fast" (diagonal capture inside the forward pass) or "eager" (reference)
    batch_tokens: int | None = None  # padded tokens per forward pass; None: the device default
    device_map: str | None = None  # "auto", "balanced", "sequential": one model over several devices (accelerate)
    max_memory: dict | None = None  # per-device budgets, as accelerate takes them
    offload_dir: str | None = None  # where weights offloaded to disk go


def environment() -> dict[str, Any]:
    import torch
    import transformers

    env = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu",
    }
    return env


def definitions(restriction_map: str) -> dict[str, Any]:
    from sheafscope.measures.intrinsic import DEFINITION as INTRINSIC_DEFINITION
    from sheafscope.measures.lstar import DEFINITIONS, FORMULA_TEXT
    from sheafscope.measures.restriction import RESTRICTION_MAPS

    return {
        "offdiag_mass": "n - sum_i A_h[i,i] = sum_{i != j} A_h[i,j] (rows of A sum to 1); A_h the row-softmax attention of head h",
        "trace": "Tr(L_F^h) = offdiag_mass * ||R_h||_F^2 (exact: L_F^h = L_G^h (x) R_h^T R_h)",
        "layer_trace": "sum over heads of trace (block-diagonal multi-head sheaf Laplacian)",
        "wv_norm_sq": "||R_h||_F^2 for the restriction map in use",
        "restriction_map": {"used": restriction_map, **{k: v.definition for k, v in RESTRICTION_MAPS.items()}},
        "legacy_trace_full": "notebook 000's trace_full (D8): offdiag mass of the head-averaged attention times ||R_0||_F^2 of head 0 only; a legacy number",
        "first_token_mass": "mean over query positions i >= 1 of A_h[i, 0] (attention-sink mass)",
        "max_abs_hidden": "max |h| over tokens and channels of each residual stream (embeddings, then after each layer)",
        "intrinsic_dimension": INTRINSIC_DEFINITION,
        "lstar": {k: {"definition": v.definition, "source": v.source} for k, v in DEFINITIONS.items()},
        "formula": FORMULA_TEXT,
        "error_pct": "|predicted - empirical| / L * 100, empirical = diff-definition mean (notebook 001)",
    }


@dataclass
class RunOutcome:
    out_dir: Path
    models: list[dict[str, Any]]
    main: bool = True  # False in the other processes of a run: the main one reports

    @property
    def n_failed(self) -> int:
        return sum(m.get("status") != "ok" for m in self.models)


def _say(msg: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(msg, file=sys.stdout)


def _reuse_or_why(entry: ModelEntry, path: Path, key: dict[str, Any], force: bool) -> tuple[dict[str, Any] | None, str | None]:
    """(the earlier result to reuse, None) or (None, why it is recomputed; None for a new model)."""
    if not path.exists():
        return None, None
    if force:
        return None, f"{entry.spec}: recomputing (--force), replacing {path}"
    try:
        done = read_json(path)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        return None, f"{entry.spec}: recomputing, {path} is unreadable ({type(e).__name__})"
    if not isinstance(done, dict) or done.get("status") != "ok":
        err = done.get("error") if isinstance(done, dict) else None
        msg = err.get("message") if isinstance(err, dict) else None
        return None, f"{entry.spec}: retrying, the earlier attempt failed" + (f" ({msg})" if msg else "")
    old = done.get("resume_key")
    if not isinstance(old, dict):
        return None, f"{entry.spec}: recomputing, {path} has no resume key (written by an earlier sheafscope)"
    if old.get("fingerprint") == key["fingerprint"] and done.get("fingerprint") == key["fingerprint"]:
        return done, None
    changes = key_changes(old, key) or ["the resume key differs"]
    return None, f"{entry.spec}: recomputing, {path} is out of date: {'; '.join(changes)}"


def _settle_weights(key: dict[str, Any], revision: Any) -> None:
    """A hub model's key records the commit that was loaded (resolved only at load time)."""
    w = key["weights"]
    if w.get("kind") == "hub" and isinstance(revision, str) and COMMIT.match(revision):
        w["commit"] = revision
        key["fingerprint"] = key_hash(key)


def _load(entry: ModelEntry, options: RunOptions, device: str | None):
    from sheafscope.models.loading import load_model

    return load_model(entry.spec, init=options.init, seed=options.seed, dtype=options.dtype, device=device,
                      revision=options.revision, quantize=options.quantize, device_map=options.device_map,
                      max_memory=options.max_memory, offload_dir=options.offload_dir)


def _error_of(e: BaseException) -> dict[str, str]:
    if not isinstance(e, SheafscopeError):  # a bug or an unforeseen library error: keep the others' results
        log.error("%s", traceback.format_exc())
    return {"type": type(e).__name__, "message": str(e) or type(e).__name__}


def _compute(units: list[Unit], prompts: list[str], options: RunOptions, procs: Processes, show_progress: bool,
             model_done: Callable[[ModelEntry], None]) -> None:
    """Compute `units` (grouped by model: each model loads once), write each unit's record, and
    call `model_done` after each model's units."""
    import torch
    from tqdm.auto import tqdm

    from sheafscope.analysis import measure

    disable = not (show_progress and procs.is_main)
    bar = tqdm(total=len(units), desc="units", unit="unit", disable=disable, position=0)
    for _, group in groupby(units, key=lambda u: u.entry.spec):
        group = list(group)
        loaded, load_error = None, None
        try:
            loaded = _load(group[0].entry, options, procs.device)
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as e:  # noqa: BLE001 - recorded in every unit of this model
            load_error = _error_of(e)
        for unit in group:
            bar.set_postfix_str(unit.name)
            record: dict[str, Any] = {"status": "ok", "error": None}
            if load_error:
                record = {"status": "failed", "error": load_error}
            else:
                try:
                    with tqdm(total=len(unit.prompts), desc=f"  {unit.name}", unit="prompt", disable=disable,
                              leave=False, position=1) as prompt_bar:
                        part = measure(loaded, prompts, unit.prompts, attention=options.attention,
                                       restriction_map=options.restriction_map, max_tokens=options.max_tokens,
                                       progress=prompt_bar.update, batch_tokens=options.batch_tokens)
                    record["part"] = part.to_dict()
                    _settle_weights(unit.key, part.info.get("revision"))
                except (KeyboardInterrupt, SystemExit):
                    raise
                except Exception as e:  # noqa: BLE001
                    record = {"status": "failed", "error": _error_of(e)}
            record.update(shard={"index": unit.index, "count": unit.count, "prompts": unit.prompts},
                          process=procs.rank, fingerprint=unit.key["fingerprint"], resume_key=unit.key)
            if record["status"] == "ok":  # before the record, which marks the unit finished
                write_pooled(unit, part.pooled)
            unit.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(unit.path, record)
            if record["status"] != "ok":
                tqdm.write(f"FAILED {unit.name}: {record['error']['message']}", file=sys.stderr)
            bar.update(1)
        del loaded
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        model_done(group[0].entry)
    bar.close()


def _plan(models: list[ModelEntry], prompts: list[str], options: RunOptions, out_dir: Path, force: bool) -> dict[str, Any]:
    """Which models are reused whole, and which units are still to compute (main process only:
    the others receive this plan, so that all agree on it)."""
    code = code_identity()
    reused: dict[str, dict[str, Any]] = {}
    keys: dict[str, dict[str, Any]] = {}
    todo: list[Unit] = []
    for entry in models:
        path = out_dir / "models" / f"{slug(entry.spec)}.json"
        key = resume_key(entry, prompts, options, code)
        key["fingerprint"] = key_hash(key)
        keys[entry.spec] = key
        done, why = _reuse_or_why(entry, path, key, force)
        if done is not None:
            _say(f"{entry.spec}: reused from {path} (same weights, code, prompts and options); --force recomputes")
            reused[entry.spec] = done
            continue
        units = model_units(entry, prompts, key, out_dir)
        missing = units if force else [u for u in units if finished(u) is None]
        if why:
            _say(why)
        if len(missing) < len(units):
            _say(f"{entry.spec}: {len(units) - len(missing)} of {len(units)} unit(s) reused from {units[0].path.parent}")
        todo += missing
    return {"reused": reused, "keys": keys, "todo": todo}


def run(
    models: list[ModelEntry],
    prompts: list[str],
    options: RunOptions,
    out_dir: Path,
    *,
    prompt_source: str = "",
    force: bool = False,
    show_progress: bool = True,
    suite: dict[str, Any] | None = None,
) -> RunOutcome:
    """Run every model over the prompts, in this process or, under torchrun / accelerate
    launch, in all of them (each computes a share of the units; call it in every process).
    Writes DIR/models/*.json as each model is merged, then results.json, summary.csv,
    analysis.json, figures and the report. Returns all model entries (ok and failed) in the
    main process, an empty list in the others.

    Before any model loads: a model given twice raises ConfigError; DIR must be free (DIR/.lock;
    a stale lock is replaced) and must not hold results of other prompts or options (ConfigError;
    with force=True, those results are deleted first). A model whose file in DIR/models has the
    same resume key is reused (stdout says so), and so is every finished unit of the others;
    the rest is computed (stdout says why, when a file was there). Model files in DIR/models
    of models not in this run are left in place and not listed in results.json. A result that
    cannot be written (a full disk) raises OutputWriteError; finished units and models are kept.
    """
    from sheafscope.analysis import validate_prompts

    prompts = validate_prompts(prompts)
    models = list(models)
    check_distinct(models, options.init)
    out_dir = Path(out_dir)
    procs = Processes(options.device)
    lock = RunLock(out_dir)
    plan: dict[str, Any] | BaseException | None = None
    if procs.is_main:
        try:
            prepare_dir(out_dir)
            lock.acquire()
            _clear_earlier_run(out_dir, prompts, options, force)
            plan = _plan(models, prompts, options, out_dir, force)
        except Exception as e:  # noqa: BLE001 - every process must hear of it, or the others wait forever
            plan = e
    plan = procs.share(plan)
    if isinstance(plan, BaseException):
        lock.release()
        raise plan
    try:
        merged: dict[str, dict[str, Any]] = dict(plan["reused"])

        def merge_model(entry: ModelEntry) -> None:
            key = plan["keys"][entry.spec]
            out = merge(model_units(entry, prompts, key, out_dir), prompts)
            _settle_weights(key, out.get("revision") if out["status"] == "ok" else None)
            out["fingerprint"] = key["fingerprint"]
            out["resume_key"] = key
            atomic_write_json(out_dir / "models" / f"{slug(entry.spec)}.json", out)
            if out["status"] == "ok":
                remove_units(out_dir, entry.spec)
            merged[entry.spec] = out

        def model_done(entry: ModelEntry) -> None:
            if procs.size == 1:  # this process computed every unit: the model's file is final now
                merge_model(entry)

        _compute(procs.mine(plan["todo"]), prompts, options, procs, show_progress, model_done)
        procs.wait()
        if not procs.is_main:
            return RunOutcome(out_dir, [], main=False)
        for entry in models:
            if entry.spec not in merged:
                merge_model(entry)
        results = [merged[e.spec] for e in models]
        ours = {f"{slug(e.spec)}.json" for e in models}
        others = sorted(p.stem for p in (out_dir / "models").glob("*.json") if p.name not in ours)
        if others:
            _say(f"note: {out_dir / 'models'} also holds {len(others)} result file(s) of model(s) not in this run "
                 f"({listed(others)}): left in place, not in results.json")
        write_outputs(out_dir, _header(prompts, options, prompt_source, suite, procs), results)
    except OutputWriteError as e:
        raise OutputWriteError(f"{e}: finished units and models are kept") from e
    finally:
        lock.release()
    return RunOutcome(out_dir, results)


def _clear_earlier_run(out_dir: Path, prompts: list[str], options: RunOptions, force: bool) -> None:
    """Refuse a DIR holding results of other prompts or options (with force: delete them)."""
    remove_temporaries(out_dir)
    opts = jsonable(asdict(options))
    prompts_sha = hashlib.sha256(json.dumps(prompts, ensure_ascii=False).encode()).hexdigest()
    earlier = earlier_run_differs(out_dir, prompts, opts, prompts_sha)
    if earlier is None:
        return
    what, where = earlier
    if not force:
        raise ConfigError(
            f"{out_dir} holds results of a run with {what} ({where}); results are never mixed: "
            f"choose another --out, or add --force to replace everything in {out_dir} (its earlier results are deleted)"
        )
    try:
        n = remove_earlier_run(out_dir)
    except OSError as e:
        raise ConfigError(f"--force: cannot delete the earlier results in {out_dir} "
                          f"({e.strerror or type(e).__name__}: {e.filename}); choose another --out") from e
    _say(f"--force: {out_dir} held results of a run with {what}; deleted its {n} model file(s) and its results.json")


def _header(prompts: list[str], options: RunOptions, prompt_source: str, suite: dict[str, Any] | None,
            procs: Processes) -> dict[str, Any]:
    return {
        "schema": "sheafscope.results/1",
        "sheafscope_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "environment": environment(),
        "definitions": definitions(options.restriction_map),
        "options": asdict(options),
        "processes": procs.size,
        "prompt_source": prompt_source,
        "prompts": prompts,
        "suite": suite,
    }

def write_outputs(out_dir: Path, header: dict[str, Any], results: list[dict[str, Any]]) -> None:
    """results.json, summary.csv and analysis.json from the per-model entries."""
    from sheafscope.outputs.summarize import analysis_block, summary_frame

    atomic_write_json(out_dir / "results.json", {**header, "models": results})
    summary = summary_frame(results)
    from sheafscope.outputs.io import atomic_write_text

    atomic_write_text(out_dir / "summary.csv", summary.to_csv(index=False))
    atomic_write_json(out_dir / "analysis.json", analysis_block(results, summary))
    try:  # figures and report are derived views: a plotting problem must not lose the numbers
        from sheafscope.outputs.figures import write_all_figures
        from sheafscope.outputs.report import write_report

        write_all_figures(out_dir)
        write_report(out_dir)
    except Exception as e:  # noqa: BLE001
        log.error("figures/report could not be written (%s); the numbers are in results.json", e)
