"""Prompt sets: built-in ones shipped with the package, or a user's .txt / .jsonl file."""

from __future__ import annotations

import codecs
import json
import os
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
_FORMATS = "a .txt file (one prompt a line) or a .jsonl file (a 'text' field a line)"


def builtin_path(name: str) -> Path:
    return Path(str(files("sheafscope").joinpath(BUILTIN[name])))


def read_utf8(path: Path) -> str:
    """The text of a UTF-8 file, with or without a byte-order mark (which is dropped).

    Anything else raises PromptError naming the file, the byte offset (0-based, counted in
    the file as stored, BOM included) and the line of the first byte that is not UTF-8.
    """
    if path.is_dir():
        raise PromptError(f"prompts path {path} is a directory; pass {_FORMATS}, or a built-in set: {', '.join(BUILTIN)}")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise PromptError(f"prompts file {path} not found; pass an existing {_FORMATS}, "
                          f"or a built-in set: {', '.join(BUILTIN)}") from None
    except OSError as e:
        raise PromptError(f"prompts file {path} cannot be read ({e.strerror or type(e).__name__}); "
                          "check its permissions or pass another file") from None
    skip = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        return data[skip:].decode("utf-8")
    except UnicodeDecodeError as e:
        offset = e.start + skip
        line = data[:offset].count(b"\n") + 1
        raise PromptError(
            f"prompts file {path} is not UTF-8: byte 0x{data[offset]:02x} at offset {offset} (line {line}) "
            "is not valid UTF-8; save the file as UTF-8 (with or without a BOM)"
        ) from None


def load_prompts(source: str | Path | None = None) -> tuple[list[str], str]:
    """Prompts from a built-in set name or a file; returns (prompts, where they came from).

    .txt: one prompt a line (blank lines skipped). .jsonl: one object a line with a "text"
    field. An empty "text" is an error, not skipped: it would silently change the set.
    Files are read as UTF-8, with or without a byte-order mark; anything else is refused with
    the offset of the first byte that is not UTF-8.
    """
    if source is None:
        source = DEFAULT
    if str(source) in BUILTIN:
        path, label = builtin_path(str(source)), f"builtin:{source}"
    else:
        path, label = Path(os.path.expanduser(str(source))), str(source)
    text = read_utf8(path)
    prompts: list[str] = []
    if path.suffix == ".jsonl":
        # JSON Lines are separated by "\n" only: str.splitlines would also cut at U+2028 and
        # other separators that a JSON string may hold unescaped.
        for no, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise PromptError(f"{path}:{no}: not valid JSON ({e.msg}); each line must be an object with a 'text' field") from None
            text_field = obj.get("text") if isinstance(obj, dict) else None
            if not isinstance(text_field, str) or not text_field.strip():
                raise PromptError(f"{path}:{no}: missing or empty 'text' field; give every line a non-empty 'text'")
            prompts.append(text_field)
    else:
        prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise PromptError(f"prompts file {path} holds no prompt; add one prompt a line")
    return prompts, label
