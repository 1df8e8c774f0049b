"""GGUF weights as plain checkpoints: a GGUF's header checked before anything is dequantized,
then dequantized once by transformers into the cache (keyed by the file's sha256) and loaded
from there like any checkpoint directory."""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import torch

from sheafscope.errors import ModelLoadError
from sheafscope.models import gguf_header, offline

log = logging.getLogger(__name__)


def cache_or_header(path: Path, sha256: str) -> tuple[Path, gguf_header.GGUFHeader | None]:
    """The dequantized cache of a GGUF, and (when it must still be built) the GGUF's header,
    checked: truncation and unsupported architectures are refused here, before dequantizing."""
    cached = offline.gguf_cache(sha256)
    return cached, None if offline.is_complete(cached) else checked_header(path)


def checked_header(path: Path) -> gguf_header.GGUFHeader:
    """The GGUF's header, refused if truncated or of an architecture sheafscope cannot measure."""
    header = gguf_header.read_header(path)
    gguf_header.check_supported(header)
    return header


def dequantize(gguf: Path, header: gguf_header.GGUFHeader, target: Path, provenance: dict) -> None:
    """Dequantize a GGUF with transformers (slow) and save it as plain safetensors at target."""
    import transformers

    target.parent.mkdir(parents=True, exist_ok=True)
    need = header.n_elements * 4  # float32
    free = shutil.disk_usage(target.parent).free
    if free < need * 1.05:
        raise ModelLoadError(
            f"dequantizing {gguf.name} needs about {need / 1e9:.1f} GB in the cache {target.parent}, "
            f"which has {free / 1e9:.1f} GB free: free space there or set SHEAFSCOPE_CACHE to another directory"
        )
    log.warning("dequantizing %s from GGUF once (slow); later runs load %s", gguf.name, target)
    t0 = time.time()
    model = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    offline.save_dequantized(model, tok, target, {
        **provenance, "architecture": header.architecture, "tensor_types": list(header.tensor_types),
        "dequantize_s": round(time.time() - t0, 1),
    })
    del model


def provenance_note(cached: Path, default: str) -> str:
    try:
        types = json.loads((cached / "sheafscope-provenance.json").read_text()).get("tensor_types")
    except (OSError, ValueError):
        types = None
    if not types:
        return default
    return f"weights dequantized by transformers from a GGUF ({', '.join(types)} tensors)"
