"""Experiments as data: suite files (TOML) naming models, metadata, prompts and options."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any

from sheafscope.errors import ConfigError
from sheafscope.runner import ModelEntry

OPTION_KEYS = {"dtype", "device", "restriction_map", "max_tokens", "revision", "quantize", "seed", "init"}


@dataclass
class Suite:
    name: str
    description: str
    models: list[ModelEntry]
    prompts: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    path: str = ""
    grid: dict[str, list[Any]] = field(default_factory=dict)  # conditions: one run each (grid.py)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "path": self.path, "prompts": self.prompts,
                "options": self.options, "grid": self.grid, "models": [{"spec": m.spec, **m.metadata} for m in self.models]}


def _builtin_dir() -> Path:
    return Path(str(files("sheafscope").joinpath("data/suites")))


def list_suites() -> list[Suite]:
    return [load_suite(p) for p in sorted(_builtin_dir().glob("*.toml"))]


def load_suite(name_or_path: str | Path) -> Suite:
    """A built-in suite by name, or a user's suite file."""
    path = Path(name_or_path)
    if not path.suffix:
        builtin = _builtin_dir() / f"{name_or_path}.toml"
        if not builtin.exists():
            names = ", ".join(p.stem for p in sorted(_builtin_dir().glob("*.toml")))
            raise ConfigError(f"unknown suite '{name_or_path}'; built-in suites: {names}, or pass a .toml file")
        path = builtin
    if not path.exists():
        raise ConfigError(f"suite file {path} not found")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"suite file {path} is not valid TOML: {e}") from None
    models = raw.get("models")
    if not models or not all(isinstance(m, dict) and m.get("spec") for m in models):
        raise ConfigError(f"suite file {path}: needs [[models]] tables, each with a 'spec'")
    options = dict(raw.get("options", {}))
    unknown = set(options) - OPTION_KEYS
    if unknown:
        raise ConfigError(f"suite file {path}: unknown option(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(OPTION_KEYS))}")
    prompts = raw.get("prompts")
    if prompts and not Path(prompts).is_absolute() and (path.parent / prompts).exists():
        prompts = str(path.parent / prompts)  # a user's suite may name a prompts file beside it
    return Suite(
        name=raw.get("name", path.stem),
        description=raw.get("description", ""),
        models=[ModelEntry(m["spec"], {k: v for k, v in m.items() if k != "spec"}) for m in models],
        prompts=prompts,
        options=options,
        path=str(path),
        grid=dict(raw.get("grid", {})),
    )
