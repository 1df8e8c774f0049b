"""Prompt sets: built-in ones shipped with the package, or a user's .txt / .jsonl file."""

from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path

from sheafscope.errors import PromptError

BUILTIN = {
    "notebooks": "data/prompts/notebooks.txt",
    "notebook-001": "data/prompts/notebook001.txt",
    "notebook-000": "data/prompts/notebook000.txt",
    "research-v1": "data/prompts/research_v1.jsonl",
}
DEFAULT = "notebooks"


def builtin_path(name: str) -> Path:
    return Path(str(files("sheafscope").joinpath(BUILTIN[name])))


def load_prompts(source: str | Path | None = None) -> tuple[list[str], str]:
    """Prompts from a built-in set name or a file; returns (prompts, where they came from).

    .txt: one prompt a line (blank lines skipped). .jsonl: one object a line with a "text"
    field. An empty "text" is an error, not skipped: it would silently change the set.
    """
    if source is None:
        source = DEFAULT
    if str(source) in BUILTIN:
        path, label = builtin_path(str(source)), f"builtin:{source}"
    else:
        path, label = Path(source).expanduser(), str(source)
    if not path.exists():
        raise PromptError(
            f"prompts file {path} not found; pass an existing .txt (one prompt a line) or .jsonl "
            f"(a 'text' field a line), or a built-in set: {', '.join(BUILTIN)}"
        )
    lines = path.read_text(encoding="utf-8").splitlines()
    prompts: list[str] = []
    if path.suffix == ".jsonl":
        for no, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise PromptError(f"{path}:{no}: not valid JSON ({e.msg}); each line must be an object with a 'text' field") from None
            text = obj.get("text") if isinstance(obj, dict) else None
            if not isinstance(text, str) or not text.strip():
                raise PromptError(f"{path}:{no}: missing or empty 'text' field; give every line a non-empty 'text'")
            prompts.append(text)
    else:
        prompts = [line for line in lines if line.strip()]
    if not prompts:
        raise PromptError(f"prompts file {path} holds no prompt; add one prompt a line")
    return prompts, label
