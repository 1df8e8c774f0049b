"""Per-model analysis: prompts in, per-head masses, traces and L* out.

Capture (what runs inside the forward pass) lives in capture/; this module turns captured
numbers into traces and L*, and knows nothing about architectures.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable

import numpy as np
import torch

from sheafscope.capture import PromptCapture, Target, path_for
from sheafscope.capture.batching import capture_all
from sheafscope.errors import ConfigError, PromptError
from sheafscope.models.adapters import Adapter, adapter_for
from sheafscope.models.loading import LoadedModel
from sheafscope.measures import intrinsic
from sheafscope.measures.lstar import lstar_block
from sheafscope.measures.restriction import norms_sq

log = logging.getLogger(__name__)


@dataclass
class PromptResult:
    """One prompt's numbers for one model. Arrays are (layers, heads) unless noted."""

    text: str
    n_tokens: int
    truncated: bool
    offdiag_mass: np.ndarray
    trace: np.ndarray
    layer_trace: np.ndarray  # (layers,)
    legacy_trace_full: np.ndarray  # (layers,) notebook 000's trace_full (D8)
    first_token_mass: np.ndarray
    max_abs_hidden: np.ndarray  # (layers + 1,)

    def to_dict(self) -> dict[str, Any]:
        return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in asdict(self).items()}


@dataclass
class ModelResult:
    """Everything measured on one model. `to_dict` gives the results.json entry,
    `to_dataframe` one row per prompt x layer x head."""

    info: dict[str, Any]
    wv_norm_sq: np.ndarray  # (layers, heads) ||R_h||_F^2
    prompts: list[PromptResult]
    lstar: dict[str, Any]
    warnings: list[str] = field(default_factory=list)

    @property
    def layer_traces(self) -> np.ndarray:
        """(prompts, layers) multi-head traces."""
        return np.stack([p.layer_trace for p in self.prompts])

    @property
    def mean_trace(self) -> float:
        return float(self.layer_traces.mean())

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.info,
            "status": "ok",
            "error": None,
            "wv_norm_sq": self.wv_norm_sq.tolist(),
            "prompts": [p.to_dict() for p in self.prompts],
            "lstar": self.lstar,
            "mean_trace": self.mean_trace,
            "warnings": self.warnings,
        }

    def to_dataframe(self):
        """Long table: prompt, layer, head, n_tokens, offdiag_mass, wv_norm_sq, trace, first_token_mass."""
        import pandas as pd

        rows = []
        for pi, p in enumerate(self.prompts):
            n_layers, n_heads = p.trace.shape
            layer, head = np.meshgrid(np.arange(n_layers), np.arange(n_heads), indexing="ij")
            rows.append(pd.DataFrame({
                "model": self.info["spec"],
                "prompt": pi,
                "layer": layer.ravel(),
                "head": head.ravel(),
                "n_tokens": p.n_tokens,
                "offdiag_mass": p.offdiag_mass.ravel(),
                "wv_norm_sq": self.wv_norm_sq.ravel(),
                "trace": p.trace.ravel(),
                "first_token_mass": p.first_token_mass.ravel(),
            }))
        return pd.concat(rows, ignore_index=True)


def validate_prompts(prompts: Iterable[str]) -> list[str]:
    """Reject empty prompts at once (before any model runs), naming which one."""
    out = list(prompts)
    if not out:
        raise PromptError("no prompts given: pass --prompts FILE (one prompt a line, or .jsonl with a 'text' field)")
    for i, p in enumerate(out):
        if not isinstance(p, str) or not p.strip():
            raise PromptError(f"prompt {i + 1} is empty: remove it from the prompts file")
    return out


def tokenize(loaded: LoadedModel, text: str, max_tokens: int | None) -> tuple[torch.Tensor | None, bool, str | None]:
    """Token ids (1, n) on the model's device, whether truncated, and a warning if unusable."""
    ids = loaded.tokenizer(text, return_tensors="pt")["input_ids"]
    n = ids.shape[1]
    limit = loaded.context_length
    truncated = False
    if max_tokens is not None and n > max_tokens:
        ids, truncated = ids[:, :max_tokens], True
    elif limit is not None and n > limit:
        return None, False, (
            f"prompt skipped: {n} tokens, longer than the {limit}-token context of {loaded.spec}; "
            f"shorten it or pass --max-tokens {limit} to truncate (recorded in results)"
        )
    if ids.shape[1] < 2:
        return None, False, (
            f"prompt skipped: {ids.shape[1]} token(s); an attention graph needs at least 2 nodes "
            "(every trace would be 0): use a longer prompt"
        )
    if limit is not None and ids.shape[1] > limit:
        return None, False, f"prompt skipped: --max-tokens {max_tokens} exceeds the {limit}-token context of {loaded.spec}"
    return ids.to(loaded.device), truncated, None


def model_info(loaded: LoadedModel, restriction_map: str, attention_path: str) -> dict[str, Any]:
    g = loaded.adapter.geometry
    return {
        "spec": loaded.spec,
        "model_id": loaded.model_id,
        "source": loaded.source,
        "revision": loaded.revision,
        "file_sha256": loaded.file_sha256,
        "init": loaded.init,
        "seed": loaded.seed,
        "tokenizer_from": loaded.tokenizer_from,
        "architecture": type(loaded.model).__name__,
        "family": loaded.adapter.family,
        "n_layers": g.n_layers,
        "n_heads": g.n_heads,
        "n_kv_heads": g.n_kv_heads,
        "head_dim": g.head_dim,
        "d_model": g.d_model,
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "device": str(loaded.device),
        "device_map": loaded.device_map,
        "attention_path": attention_path,
        "causal": g.causal,
        "context_length": loaded.context_length,
        "metadata": loaded.metadata,
        "restriction_map": restriction_map,
        "notes": loaded.notes,
        "load_seconds": loaded.load_seconds,
    }


def prompt_result(text: str, cap: PromptCapture, truncated: bool, norm_sq: np.ndarray) -> PromptResult:
    trace = cap.offdiag_mass * norm_sq
    # D8: notebook 000 paired the head-averaged attention with head 0's W_V only. The
    # off-diagonal mass is linear in A, so mass(mean_h A_h) = mean_h mass(A_h).
    # sum / heads is numpy's mean to the bit, without mean's Python layer (per prompt on a host-bound GPU run)
    legacy = cap.offdiag_mass.sum(axis=1) / cap.offdiag_mass.shape[1] * norm_sq[:, 0]
    return PromptResult(text, cap.n_tokens, truncated, cap.offdiag_mass, trace, trace.sum(axis=1), legacy,
                        cap.first_token_mass, cap.max_abs_hidden)


def target_of(model: torch.nn.Module, pad_id: int = 0, adapter: Adapter | None = None) -> Target:
    """What the capture needs of a transformers model: its trunk, blocks and attention modules
    (found by the family's adapter, built here unless given)."""
    adapter = adapter or adapter_for(model)
    return Target(
        model=model.base_model,
        blocks=list(adapter.blocks),
        attention_modules=[adapter.attention(layer) for layer in range(adapter.geometry.n_layers)],
        causal=adapter.geometry.causal,
        fast_supported=adapter.fast_path_supported,
        pad_id=pad_id,
    )


@dataclass
class Part:
    """One shard of a model's prompts measured: everything `assemble` needs to build the
    model's result without the model (so a result can be merged from several processes)."""

    info: dict[str, Any]  # model_info and what ran (kernels, batches, seconds)
    wv_norm_sq: np.ndarray
    prompts: dict[int, PromptResult]  # by index in the run's prompt list
    skipped: dict[int, str]  # index -> why it could not be measured
    # index -> (layers + 1, d) float32 residual-stream means; large, so never in to_dict (units
    # keep them beside their JSON record: units.write_pooled)
    pooled: dict[int, np.ndarray] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"info": self.info, "wv_norm_sq": self.wv_norm_sq.tolist(),
                "prompts": {str(i): p.to_dict() for i, p in self.prompts.items()},
                "skipped": {str(i): w for i, w in self.skipped.items()}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Part:
        arrays = {"offdiag_mass", "trace", "layer_trace", "legacy_trace_full", "first_token_mass", "max_abs_hidden"}
        prompts = {int(i): PromptResult(**{k: (np.asarray(v, dtype=np.float64) if k in arrays else v) for k, v in p.items()})
                   for i, p in d["prompts"].items()}
        return cls(d["info"], np.asarray(d["wv_norm_sq"], dtype=np.float64), prompts,
                   {int(i): w for i, w in d["skipped"].items()})


def measure(
    loaded: LoadedModel,
    texts: list[str],
    indices: Iterable[int] | None = None,
    *,
    attention: str = "fast",
    restriction_map: str = "raw_wv",
    max_tokens: int | None = None,
    progress: Callable[[int], None] | None = None,
    batch_tokens: int | None = None,
) -> Part:
    """Measure the prompts texts[i] for i in `indices` (all by default); see `analyze`."""
    t0 = time.time()
    if max_tokens is not None and max_tokens < 2:
        raise ConfigError(f"max_tokens must be at least 2 (an attention graph needs 2 tokens), not {max_tokens}")
    indices = list(range(len(texts)) if indices is None else indices)
    target = target_of(loaded.model, getattr(loaded.tokenizer, "pad_token_id", None) or 0, loaded.adapter)
    path = path_for(target, attention)
    norm_sq = norms_sq(loaded.adapter, restriction_map).numpy()
    items, skipped = [], {}
    for i in indices:
        ids, truncated, warning = tokenize(loaded, texts[i], max_tokens)
        if warning:
            skipped[i] = warning
            if progress:
                progress(1)
        else:
            items.append((i, ids, truncated))
    run_info: dict[str, Any] = {}
    prompts: dict[int, PromptResult] = {}
    pooled: dict[int, np.ndarray] = {}
    if items:
        caps, run_info = capture_all(target, [ids[0] for _, ids, _ in items], path, batch_tokens, progress)
        prompts = {i: prompt_result(texts[i], cap, truncated, norm_sq) for (i, _, truncated), cap in zip(items, caps)}
        pooled = {i: cap.pooled for (i, _, _), cap in zip(items, caps) if cap.pooled is not None}
    if path != attention:
        path = f"eager (fallback: {loaded.adapter.fast_path_note or loaded.adapter.family + ' is not supported by the fast path'})"
    info = model_info(loaded, restriction_map, path)
    info.update(run_info)
    info["elapsed_s"] = time.time() - t0
    return Part(info, norm_sq, prompts, skipped, pooled)


def _merged_run_info(parts: list[Part]) -> dict[str, Any]:
    """What ran, over all parts: kernel counts and token counts added, fallbacks listed once."""
    kernels: dict[str, int] = {}
    fallbacks: list[str] = []
    for p in parts:
        for k, v in p.info.get("kernels", {}).items():
            kernels[k] = kernels.get(k, 0) + v
        fallbacks += [f for f in p.info.get("fallbacks", []) if f not in fallbacks]
    tokens = sum(p.info.get("tokens", 0) for p in parts)
    padded = sum(p.info.get("padded_tokens", 0) for p in parts)
    return {
        "batch_size": max(p.info.get("batch_size", 0) for p in parts),
        "tokens": tokens,
        "padded_tokens": padded,
        "padding_share": 1 - tokens / padded if padded else 0.0,
        "oom_backoffs": sum(p.info.get("oom_backoffs", 0) for p in parts),
        "kernels": kernels,
        "fallbacks": fallbacks,
        "elapsed_s": sum(p.info["elapsed_s"] for p in parts),
    }


def assemble(parts: list[Part], n_prompts: int) -> ModelResult:
    """One model's result from the parts that measured its prompts (in any order): prompts in
    their order, what ran added up, and L* computed over all of them (never per part)."""
    first = parts[0]
    info = {**first.info, **_merged_run_info(parts)}
    prompts = {i: r for p in parts for i, r in p.prompts.items()}
    skipped = {i: w for p in parts for i, w in p.skipped.items()}
    missing = set(range(n_prompts)) - prompts.keys() - skipped.keys()
    if missing:
        raise ValueError(f"parts cover {n_prompts - len(missing)} of {n_prompts} prompts")
    warnings = [f"prompt {i + 1}: {skipped[i]}" for i in sorted(skipped)]
    if not prompts:
        raise PromptError(f"no prompt could be measured on {info['spec']}: " + "; ".join(warnings))
    res = ModelResult(info, first.wv_norm_sq, [prompts[i] for i in sorted(prompts)], {}, warnings)
    cut = [r.n_tokens for r in res.prompts if r.truncated]
    if cut:  # the numbers of a cut prompt are those of its first tokens only
        warnings.append(f"{len(cut)} of {len(res.prompts)} prompt(s) truncated to their first {max(cut)} tokens (--max-tokens)")
    n_layers, n_heads = info["n_layers"], info["n_heads"]
    res.lstar = lstar_block(res.layer_traces, n_layers, n_heads)
    res.info["intrinsic_dimension"] = _id_profile(parts, sorted(prompts))
    if res.lstar["formula"]["exceeds_L"]:
        f = res.lstar["formula"]
        warnings.append(f"D10: the formula predicts L* = {f['predicted']:.1f}, beyond the last layer (L = {n_layers}); not clipped")
    return res


def _id_profile(parts: list[Part], order: list[int]) -> dict[str, Any]:
    """The ID profile over every measured prompt's pooled streams, in prompt order."""
    pooled = {i: v for p in parts for i, v in p.pooled.items()}
    lacking = [i for i in order if i not in pooled]
    if lacking:
        return intrinsic.unavailable(f"the pooled hidden states of {len(lacking)} of {len(order)} measured prompt(s) "
                                     "were not kept (results from before the ID profile?)", len(order) - len(lacking))
    return intrinsic.id_profile(np.stack([pooled[i] for i in order]))


def analyze(
    loaded: LoadedModel,
    prompts: Iterable[str],
    *,
    attention: str = "fast",
    restriction_map: str = "raw_wv",
    max_tokens: int | None = None,
    progress: Callable[[int], None] | None = None,
    batch_tokens: int | None = None,
) -> ModelResult:
    """Measure every prompt on one model: masses, traces, L* (all definitions), formula.

    attention: "fast" (statistics captured inside the forward pass, prompts in right-padded
    batches of about `batch_tokens` tokens, halved on out-of-memory; every prompt's numbers
    equal those of running it alone) or "eager" (the reference: explicit attention matrices,
    one prompt at a time). Families whose attention transformers' interface cannot see (BLOOM)
    always run eager, and `attention_path` says why.
    Prompts that cannot be measured (one token, longer than the context) are skipped with a
    warning in the result; if none is left, PromptError. NaN/Inf raises NonFiniteError.
    `progress(k)` is called as k more prompts are done.
    """
    texts = validate_prompts(prompts)
    part = measure(loaded, texts, attention=attention, restriction_map=restriction_map, max_tokens=max_tokens,
                   progress=progress, batch_tokens=batch_tokens)
    return assemble([part], len(texts))
