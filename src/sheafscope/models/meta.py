"""A spec's config and its model on the meta device: shapes without weights.

Placement checks, plans and twins need parameter sizes and accelerate's device map before any
weight exists; a model built on the meta device gives both in about a second, whatever its size.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sheafscope.errors import ModelLoadError, SheafscopeError

log = logging.getLogger(__name__)


def config_for(spec: str, init: str = "pretrained", revision: str | None = None,
               config_overrides: dict[str, Any] | None = None) -> tuple[Any, str]:
    """The transformers config of a spec, and where it came from, without reading a weight:
    a twin's catalog entry; an offline alias's dequantized cache (else its catalog entry); a
    local directory's config.json; a GGUF file's header (or its cache); the hub's config.json
    (a catalog entry's when the hub cannot be asked)."""
    import transformers

    from sheafscope.models import catalog as cat
    from sheafscope.models import hub, loading, offline

    kind = loading.check_spec(spec, init)
    name, _ = loading.parse_spec(spec.strip(), init)
    entry = cat.find(name)
    if config_overrides and kind != "random-init":
        from sheafscope.errors import ConfigError

        raise ConfigError(f"config overrides apply to random-init twins only, not to '{spec}' ({kind})")
    if kind == "random-init":
        return entry.build_config(**(config_overrides or {})), f"catalog entry {entry.name}"
    if kind == "offline-package":
        w = offline.OFFLINE_WEIGHTS[entry.offline]
        path = offline.model_dir(entry.offline) if w.kind == "dir" else offline.dequantized_cache(entry.offline)
        if (path / "config.json").is_file():
            return transformers.AutoConfig.from_pretrained(str(path)), str(path / "config.json")
        return entry.build_config(), f"catalog entry {entry.name} (not dequantized yet)"
    if kind == "local-dir":
        path = Path(name).expanduser().resolve()
        return transformers.AutoConfig.from_pretrained(str(path)), str(path / "config.json")
    if kind == "gguf-file":
        path = Path(name).expanduser().resolve()
        cached = offline.gguf_cache(offline.sha256_cached(path))
        if offline.is_complete(cached):
            return transformers.AutoConfig.from_pretrained(str(cached)), str(cached / "config.json")
        return transformers.AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name), f"{path.name} (GGUF header)"
    hub_id = entry.hub_id if entry else name
    try:
        local_only = hub.hub_preflight(spec, hub_id, revision)
        kw = {"revision": revision, "token": os.environ.get("HF_TOKEN") or None}
        if local_only:
            kw["local_files_only"] = True
        return transformers.AutoConfig.from_pretrained(hub_id, **kw), f"{hub_id} (hub config)"
    except (SheafscopeError, OSError, ValueError) as e:
        if entry is None:
            if isinstance(e, SheafscopeError):
                raise
            raise ModelLoadError(f"could not read the config of '{spec}' from the hub: {str(e).splitlines()[0]}") from e
        log.info("config of %s from the catalog: %s", spec, e)
        return entry.build_config(), f"catalog entry {entry.name} (the hub config could not be read)"


def meta_model(config: Any, dtype: torch.dtype) -> nn.Module:
    """The model of this config with every parameter on the meta device (buffers stay real:
    they are small, and rotary tables or causal masks are computed from the config)."""
    from accelerate import init_empty_weights

    from sheafscope.models.loading import model_class_for

    cls = model_class_for(config.model_type)
    with init_empty_weights(include_buffers=False):
        return cls.from_config(config, dtype=dtype)


def meta_model_for(spec: str, *, init: str = "pretrained", dtype: str | torch.dtype | None = None,
                   device: str | None = None, revision: str | None = None,
                   config_overrides: dict[str, Any] | None = None) -> tuple[nn.Module, Any, str]:
    """(meta model, config, where the config came from) of a spec, in the dtype it would load
    in (load_model's default)."""
    from sheafscope.models.loading import default_device, resolve_dtype

    config, source = config_for(spec, init, revision, config_overrides)
    return meta_model(config, resolve_dtype(dtype, device or default_device())), config, source
