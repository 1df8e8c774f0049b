"""The resume key: what a model's numbers depend on, so that a rerun reuses a result only
when none of it changed, and says which part did otherwise (runner.py uses it).

Four parts: weights (a local directory's or GGUF file's files by name, size and mtime in ns;
a hub model's revision and resolved commit; an offline alias's pinned sha256; a twin's shape
and seed), code (version, a sha256 of the package's own files, torch and transformers),
prompts (a sha256) and options.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sheafscope import __version__
from sheafscope.errors import SheafscopeError

if TYPE_CHECKING:
    from sheafscope.runner import ModelEntry, RunOptions

COMMIT = re.compile(r"^[0-9a-f]{40}$")


def code_revision() -> str:
    """sha256 over the installed sheafscope package's own files (.py and data), by path.

    Every file under the package directory counts (relative path, size and bytes, sorted by
    path), except caches and hidden files; a `git pull` that changes any of them changes it.
    """
    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if any(part == "__pycache__" or part.startswith(".") for part in rel.parts) or p.suffix in (".pyc", ".pyo"):
            continue
        if not p.is_file():
            continue
        data = p.read_bytes()
        h.update(f"{rel.as_posix()}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()


def _dist_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def code_identity() -> dict[str, Any]:
    """The code part of the resume key: this package's version and source, and the libraries
    that compute the numbers."""
    return {
        "sheafscope": __version__,
        "source_sha256": code_revision(),
        "torch": _dist_version("torch"),
        "transformers": _dist_version("transformers"),
    }


def _file_row(path: Path, name: str) -> list[Any]:
    st = path.stat()
    return [name, st.st_size, st.st_mtime_ns]


def _dir_files(root: Path) -> list[list[Any]]:
    """[relative path, size, mtime_ns] of every file in a checkpoint directory (hidden files
    and directories, such as a download tool's .cache/, left out)."""
    rows = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__pycache__")
        for fn in filenames:
            if fn.startswith("."):
                continue
            p = Path(dirpath) / fn
            try:
                rows.append(_file_row(p, p.relative_to(root).as_posix()))
            except OSError:  # a dangling link or a file removed while we look: not part of the model
                continue
    return sorted(rows)


def _hub_commit(hub_id: str, revision: str) -> str | None:
    """The commit a hub revision resolves to in the local hub cache (None when not cached)."""
    if COMMIT.match(revision):
        return revision
    try:
        from huggingface_hub import constants

        ref = Path(constants.HF_HUB_CACHE) / f"models--{hub_id.replace('/', '--')}" / "refs" / revision
        commit = ref.read_text(encoding="utf-8").strip()
    except Exception:  # noqa: BLE001 - no cache, no such ref, no huggingface_hub: unknown
        return None
    return commit if COMMIT.match(commit) else None


def weights_identity(spec: str, options: RunOptions) -> dict[str, Any]:
    """What identifies the weights a spec loads, found without loading them (cheap: file
    sizes and modification times, no hashing)."""
    from sheafscope.models import catalog as cat
    from sheafscope.models import offline
    from sheafscope.models.loading import classify_spec, parse_spec

    try:
        kind = classify_spec(spec, options.init)
    except SheafscopeError:
        return {"kind": "unknown", "spec": spec}  # the load fails and says why
    name, init = parse_spec(spec.strip(), options.init)
    if kind == "local-dir":
        root = Path(name).expanduser().resolve()
        return {"kind": kind, "path": str(root), "files": _dir_files(root)}
    if kind == "gguf-file":
        path = Path(name).expanduser().resolve()
        return {"kind": kind, "path": str(path), "files": [_file_row(path, path.name)]}
    entry = cat.find(name)
    if kind == "random-init":
        return {"kind": kind, "catalog": entry.name, "config_class": entry.config_class, "config": entry.config,
                "seed": options.seed, "twin_tokenizer": os.environ.get("SHEAFSCOPE_TWIN_TOKENIZER")}
    if kind == "offline-package":
        w = offline.OFFLINE_WEIGHTS[entry.offline]
        return {"kind": kind, "alias": w.alias, "sha256": w.sha256,
                "packages": {d: _dist_version(d) for d in offline.WEIGHT_DISTRIBUTIONS.get(w.alias, [])}}
    hub_id = entry.hub_id if entry else name
    revision = options.revision or "main"
    return {"kind": "hub", "id": hub_id, "revision": revision, "commit": _hub_commit(hub_id, revision)}


def jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def resume_key(entry: ModelEntry, prompts: list[str], options: RunOptions, code: dict[str, Any] | None = None) -> dict[str, Any]:
    """The parts a model's result depends on: weights, code, prompts, options (with the entry's
    metadata). Stored in the model's file; `fingerprint` hashes them."""
    blob = json.dumps(prompts, ensure_ascii=False).encode()
    return jsonable({
        "spec": entry.spec,
        "weights": weights_identity(entry.spec, options),
        "code": code if code is not None else code_identity(),
        "prompts": {"sha256": hashlib.sha256(blob).hexdigest(), "count": len(prompts)},
        "options": asdict(options),
        "metadata": entry.metadata,
    })


def key_hash(key: dict[str, Any]) -> str:
    parts = {k: v for k, v in key.items() if k != "fingerprint"}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def fingerprint(prompts: list[str], options: RunOptions, entry: ModelEntry) -> str:
    """The resume key's hash (see resume_key)."""
    return key_hash(resume_key(entry, prompts, options))


def listed(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _short(v: Any) -> str:
    """A commit or sha256 cut to 12 hex digits; anything else as it is."""
    return v[:12] if isinstance(v, str) and len(v) >= 40 and re.fullmatch(r"[0-9a-f]+", v) else str(v)


def _weights_change(old: dict[str, Any], new: dict[str, Any]) -> str:
    if old.get("kind") != new.get("kind") or old.get("path") != new.get("path"):
        return "weights changed (another model at this spec)"
    if "files" in old and "files" in new:
        o = {r[0]: r[1:] for r in old["files"]}
        n = {r[0]: r[1:] for r in new["files"]}
        parts = []
        if changed := sorted(k for k in o.keys() & n.keys() if o[k] != n[k]):
            parts.append(f"{listed(changed)} replaced (size or modification time differs)")
        if added := sorted(n.keys() - o.keys()):
            parts.append(f"{listed(added)} added")
        if removed := sorted(o.keys() - n.keys()):
            parts.append(f"{listed(removed)} removed")
        return "weights changed: " + ("; ".join(parts) or "files differ")
    if old.get("kind") == "hub":
        return (f"weights changed: {new.get('id')} revision {old.get('revision')} ({_short(old.get('commit'))}) "
                f"is now {new.get('revision')} ({_short(new.get('commit')) if new.get('commit') else 'commit unknown'})")
    diff = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    return f"weights changed ({', '.join(diff)})"


def _dict_change(what: str, old: dict[str, Any], new: dict[str, Any]) -> str:
    diff = sorted(k for k in old.keys() | new.keys() if old.get(k, "(not recorded)") != new.get(k, "(not recorded)"))
    cells = [f"{k} {_short(old.get(k, '(not recorded)'))} -> {_short(new.get(k, '(not recorded)'))}" for k in diff]
    return f"{what} changed ({'; '.join(cells)})"


def key_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Which parts of a resume key differ, in words ("weights changed: model.safetensors
    replaced ...", "code changed (source_sha256 ...)", "prompts changed", "options changed (...)")."""
    out = []
    if old.get("spec") != new.get("spec"):
        out.append(f"computed for another spec ({old.get('spec')})")
    if old.get("weights") != new.get("weights"):
        out.append(_weights_change(old.get("weights") or {}, new.get("weights") or {}))
    if old.get("code") != new.get("code"):
        out.append(_dict_change("code", old.get("code") or {}, new.get("code") or {}))
    if old.get("prompts") != new.get("prompts"):
        o, n = (old.get("prompts") or {}).get("count"), (new.get("prompts") or {}).get("count")
        out.append("prompts changed" + (f" ({o} -> {n} prompts)" if o != n else " (other texts)"))
    if old.get("options") != new.get("options"):
        out.append(_dict_change("options", old.get("options") or {}, new.get("options") or {}))
    if old.get("metadata") != new.get("metadata"):
        out.append("metadata changed")
    return out


