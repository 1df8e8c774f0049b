"""Running many models over one prompt set, surviving failure.

Each model's result is written to DIR/models/<slug>.json atomically as soon as it exists;
a rerun into the same DIR skips models already complete with the same prompts and options
and redoes the rest; a model that fails is recorded with its error and the run goes on.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import platform
import re
import sys
import traceback
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sheafscope import __version__
from sheafscope.errors import SheafscopeError
from sheafscope.outputs.io import atomic_write_json, read_json

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




@dataclass
class ModelEntry:
    """A model to run: its spec and metadata overrides (lab, behavior, gain, ...)."""

    spec: str
    metadata: dict[str, Any] = field(default_factory=dict)


def slug(spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", spec).strip("_") or "model"


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
        "lstar": {k: {"definition": v.definition, "source": v.source} for k, v in DEFINITIONS.items()},
        "formula": FORMULA_TEXT,
        "error_pct": "|predicted - empirical| / L * 100, empirical = diff-definition mean (notebook 001)",
    }


def fingerprint(prompts: list[str], options: RunOptions, entry: ModelEntry) -> str:
    blob = json.dumps({"prompts": prompts, "options": asdict(options), "spec": entry.spec, "v": __version__}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def failed_entry(entry: ModelEntry, err: BaseException) -> dict[str, Any]:
    return {
        "spec": entry.spec,
        "status": "failed",
        "error": {"type": type(err).__name__, "message": str(err) or type(err).__name__},
        "metadata": entry.metadata,
    }


def run_one(entry: ModelEntry, prompts: list[str], options: RunOptions, progress=None) -> dict[str, Any]:
    """Load, analyse and free one model; never raises for a model-level failure."""
    import torch

    from sheafscope.analysis import analyze
    from sheafscope.models.loading import load_model

    loaded = None
    try:
        loaded = load_model(entry.spec, init=options.init, seed=options.seed, dtype=options.dtype, device=options.device,
                            revision=options.revision, quantize=options.quantize)
        result = analyze(loaded, prompts, attention=options.attention, restriction_map=options.restriction_map, max_tokens=options.max_tokens,
                         progress=progress, batch_tokens=options.batch_tokens)
        out = result.to_dict()
        out["metadata"] = {**out.get("metadata", {}), **entry.metadata}
        return out
    except SheafscopeError as e:
        return failed_entry(entry, e)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as e:  # a bug or an unforeseen library error: keep the others' results
        log.error("model %s failed:\n%s", entry.spec, traceback.format_exc())
        return failed_entry(entry, e)
    finally:
        del loaded
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


@dataclass
class RunOutcome:
    out_dir: Path
    models: list[dict[str, Any]]

    @property
    def n_failed(self) -> int:
        return sum(m.get("status") != "ok" for m in self.models)


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
    """Run every model, writing DIR/models/*.json as each finishes, then results.json,
    summary.csv and analysis.json. Returns all model entries (ok and failed)."""
    from tqdm.auto import tqdm

    from sheafscope.analysis import validate_prompts

    prompts = validate_prompts(prompts)
    out_dir = Path(out_dir)
    (out_dir / "models").mkdir(parents=True, exist_ok=True)
    header = {
        "schema": "sheafscope.results/1",
        "sheafscope_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "environment": environment(),
        "definitions": definitions(options.restriction_map),
        "options": asdict(options),
        "prompt_source": prompt_source,
        "prompts": prompts,
        "suite": suite,
    }
    results: list[dict[str, Any]] = []
    disable = not show_progress
    model_bar = tqdm(models, desc="models", unit="model", disable=disable, position=0)
    for entry in model_bar:
        model_bar.set_postfix_str(entry.spec)
        path = out_dir / "models" / f"{slug(entry.spec)}.json"
        fp = fingerprint(prompts, options, entry)
        if not force and path.exists():
            try:
                done = read_json(path)
            except (OSError, json.JSONDecodeError):
                done = {}
            if done.get("status") == "ok" and done.get("fingerprint") == fp:
                log.info("%s: complete in %s, skipped", entry.spec, path)
                results.append(done)
                continue
        with tqdm(total=len(prompts), desc=f"  {entry.spec}", unit="prompt", disable=disable, leave=False, position=1) as bar:
            out = run_one(entry, prompts, options, progress=bar.update)
        out["fingerprint"] = fp
        atomic_write_json(path, out)
        if out["status"] != "ok":
            tqdm.write(f"FAILED {entry.spec}: {out['error']['message']}", file=sys.stderr)
        results.append(out)
    write_outputs(out_dir, header, results)
    return RunOutcome(out_dir, results)


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
