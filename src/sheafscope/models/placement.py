"""Models larger than one device: accelerate's big-model placement (a device map, a memory
budget per device, CPU and disk offload), checked before a weight is read.

Checkpoints are placed by transformers (`from_pretrained(device_map=...)`), random twins by
models/twins.py with the map transformers would choose (`choose_device_map`), so the two agree.
Everything a user can get wrong here (a device this machine lacks, a budget below one layer, an
offload directory that cannot be written, disk offload without one) is refused by
`check_placement` from the config alone, with the cause and the fix.
"""

from __future__ import annotations

import logging
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from sheafscope.errors import ConfigError, SheafscopeError

STRATEGIES = ("auto", "balanced", "sequential")
NAMED_DEVICES = ("cpu", "disk", "mps")
MAX_MEMORY_SYNTAX = "DEVICE=SIZE,... e.g. 0=70GiB,1=70GiB,cpu=100GiB (DEVICE: a GPU index, cpu or disk; SIZE: bytes or KiB/MiB/GiB/KB/MB/GB)"


@dataclass(frozen=True)
class Placement:
    """A checked placement: what from_pretrained (and the twin builder) are given."""

    device_map: str | dict[str, int | str]
    max_memory: dict[int | str, int] | None = None
    offload_dir: str | None = None

    def from_pretrained_kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {"device_map": self.device_map}
        if self.max_memory:
            kw["max_memory"] = dict(self.max_memory)
        if self.offload_dir:
            kw["offload_folder"] = self.offload_dir
        return kw


# -- parsing ----------------------------------------------------------------------------------
def _size(value: Any, where: str) -> int:
    from accelerate.utils import convert_file_size_to_int

    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())  # plain bytes; accelerate wants a unit on strings
    try:
        size = convert_file_size_to_int(value.strip() if isinstance(value, str) else value)
    except (ValueError, AttributeError, TypeError):
        size = -1
    if isinstance(value, bool) or not isinstance(size, int) or size < 0:
        raise ConfigError(f"{where}: '{value}' is not a size; give bytes or a number with KiB/MiB/GiB/KB/MB/GB, e.g. 70GiB")
    return size


def _device_key(key: Any, where: str) -> int | str:
    """A max_memory key as accelerate takes it: a GPU index, 'cpu', 'disk' or 'mps'."""
    if isinstance(key, bool):
        raise ConfigError(f"{where}: '{key}' is not a device")
    if isinstance(key, int):
        if key < 0:
            raise ConfigError(f"{where}: GPU index {key} is negative")
        return key
    text = str(key).strip().lower()
    if text.isdigit():
        return int(text)
    if text.startswith("cuda:") and text[5:].isdigit():
        return int(text[5:])
    if text in NAMED_DEVICES:
        return text
    raise ConfigError(f"{where}: '{key}' is not a device; use a GPU index (0, 1, ...), cpu or disk")


def normalize_max_memory(max_memory: dict | None) -> dict[int | str, int] | None:
    """{device: size} with sizes in bytes and keys as accelerate takes them; ConfigError if not."""
    if max_memory is None:
        return None
    if not isinstance(max_memory, dict) or not max_memory:
        raise ConfigError(f"max_memory must be a non-empty {{device: size}} dict, not {max_memory!r}; {MAX_MEMORY_SYNTAX}")
    out: dict[int | str, int] = {}
    for key, value in max_memory.items():
        device = _device_key(key, "--max-memory")
        if device in out:
            raise ConfigError(f"--max-memory names {device} twice; give each device once")
        out[device] = _size(value, f"--max-memory {key}")
    return out


def parse_max_memory(text: str) -> dict[int | str, int]:
    """The --max-memory syntax `0=70GiB,1=70GiB,cpu=100GiB` as {0: bytes, 1: bytes, 'cpu': bytes}."""
    pairs = [p.strip() for p in text.split(",") if p.strip()]
    if not pairs:
        raise ConfigError(f"--max-memory is empty; {MAX_MEMORY_SYNTAX}")
    raw: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ConfigError(f"--max-memory: '{pair}' is not DEVICE=SIZE; {MAX_MEMORY_SYNTAX}")
        if key.strip() in raw:
            raise ConfigError(f"--max-memory names {key.strip()} twice; give each device once")
        raw[key.strip()] = value.strip()
    return normalize_max_memory(raw)


# -- this machine's devices -------------------------------------------------------------------
def machine_devices() -> list[str]:
    """The devices torch sees here, plus disk."""
    found = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        found.append("mps")
    return found + ["disk"]


def device_name(device: Any) -> str:
    """A device as a string: GPU indices (accelerate's notation) as cuda:N."""
    if isinstance(device, int) and not isinstance(device, bool):
        return f"cuda:{device}"
    if isinstance(device, torch.device):
        return str(device) if device.index is not None or device.type != "cuda" else "cuda:0"
    text = str(device).strip().lower()
    return "cuda:0" if text == "cuda" else text


def _missing(device: Any, where: str) -> ConfigError | None:
    name = device_name(device)
    here = machine_devices()
    if name in here:
        return None
    if name.startswith("cuda"):
        have = torch.cuda.device_count()
        what = "no CUDA device" if not have else f"{have} CUDA device(s), cuda:0 to cuda:{have - 1}"
    else:
        what = f"no device {name}"
    return ConfigError(f"{where} names {name}, but this machine has {what}; use one of {', '.join(here)} "
                       "(or plan for another machine with `sheafscope plan --max-memory`)")


def check_device_map_value(device_map: Any) -> str | dict[str, int | str]:
    if isinstance(device_map, str):
        if device_map in STRATEGIES:
            return device_map
        raise ConfigError(f"--device-map '{device_map}': choose one of {', '.join(STRATEGIES)}, or pass a "
                          "{module: device} dict in Python (for one device, use --device instead)")
    if not isinstance(device_map, dict) or not device_map:
        raise ConfigError(f"device_map must be one of {', '.join(STRATEGIES)} or a non-empty {{module: device}} dict, "
                          f"not {device_map!r}")
    out: dict[str, int | str] = {}
    for module, device in device_map.items():
        if isinstance(device, torch.device):
            device = device_name(device)
        if isinstance(device, str) and device.strip().lower().startswith("cuda"):
            text = device_name(device)
            device = int(text[5:]) if text[5:].isdigit() else device
        if not isinstance(device, (int, str)) or isinstance(device, bool) or (
                isinstance(device, str) and device not in NAMED_DEVICES):
            raise ConfigError(f"device_map['{module}'] = {device!r} is not a device; use a GPU index, "
                              "'cuda:N', 'cpu' or 'disk'")
        out[str(module)] = device
    return out


def _check_offload_dir(offload_dir: str | os.PathLike) -> str:
    path = Path(offload_dir).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".sheafscope-probe-"):
            pass
    except OSError as e:
        raise ConfigError(f"--offload-dir {path} is not writable ({e.strerror or type(e).__name__}): pass a directory "
                          "this user can write, on a disk with room for the offloaded weights") from None
    return str(path.resolve())


# -- the map accelerate chooses ---------------------------------------------------------------
class _DropMissingDeviceWarnings(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "is not available, available devices are" not in record.getMessage()


@contextmanager
def planning_quietly() -> Iterator[None]:
    """accelerate warns once per call about every budgeted GPU this machine lacks; a plan for
    another machine names them on purpose."""
    logger, flt = logging.getLogger("accelerate.utils.modeling"), _DropMissingDeviceWarnings()
    logger.addFilter(flt)
    try:
        yield
    finally:
        logger.removeFilter(flt)


def choose_device_map(model: nn.Module, device_map: str | dict, max_memory: dict | None) -> dict[str, int | str]:
    """The {module: device} map transformers' from_pretrained would use for this (meta) model:
    its own routine (balanced budgets, no-split blocks, tied weights together), so checkpoints,
    twins and plans agree; accelerate's where a transformers version lacks it. A dict is
    checked to cover every parameter."""
    import inspect

    from accelerate.utils import check_device_map

    if isinstance(device_map, dict):
        try:
            check_device_map(model, device_map)
        except ValueError as e:
            raise ConfigError(f"device_map does not place every weight: {str(e).splitlines()[0]} "
                              "Add the missing modules, or use --device-map auto") from None
        return dict(device_map)
    budgets = dict(max_memory) if max_memory else None
    with planning_quietly():
        try:  # private, and its signature has changed between transformers versions
            from transformers.integrations.accelerate import _get_device_map

            extra = {"dtype": model.dtype} if "dtype" in inspect.signature(_get_device_map).parameters else {}
            return dict(_get_device_map(model, device_map, budgets, None, **extra))
        except ImportError:
            from accelerate.utils import get_balanced_memory, get_max_memory, infer_auto_device_map

            no_split = list(model._no_split_modules or [])
            if device_map != "sequential":
                budgets = get_balanced_memory(model, budgets, no_split_module_classes=no_split, dtype=model.dtype)
            else:
                budgets = get_max_memory(budgets)
            return dict(infer_auto_device_map(model, max_memory=budgets, no_split_module_classes=no_split, dtype=model.dtype))


def device_of(device_map: dict[str, int | str], name: str) -> int | str:
    """The device a map gives to a parameter or module: its longest listed prefix's."""
    parts = name.split(".")
    for i in range(len(parts), -1, -1):
        key = ".".join(parts[:i])
        if key in device_map:
            return device_map[key]
    raise ConfigError(f"the device map does not place '{name}'")


def largest_layer(model: nn.Module) -> tuple[str, int]:
    """The largest unit accelerate moves onto a device at once (a no-split block or a leaf
    module, e.g. the embedding), and its size in bytes: every device that runs layers needs it."""
    from accelerate.utils import compute_module_sizes, get_max_layer_size

    sizes = compute_module_sizes(model)
    size, names = get_max_layer_size(list(model.named_children()), sizes, list(model._no_split_modules or []))
    return (names[0] if names else ""), int(size)


def mib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def check_budgets(model: nn.Module, budgets: dict[int | str, int] | None, spec: str) -> None:
    """Each device that runs layers (the GPUs budgeted, else the CPU) needs room for the largest
    layer: accelerate moves a whole one onto it to run it, offloaded or not. 0 leaves a device out."""
    if not budgets:
        return
    runs = [d for d in budgets if d not in ("cpu", "disk", "mps")] or [d for d in ("mps", "cpu") if d in budgets][:1]
    name, size = largest_layer(model)
    for d in runs:
        if 0 < budgets[d] < size:
            raise ConfigError(
                f"--max-memory {d}={mib(budgets[d])} is below the largest layer of '{spec}' ({name}: {mib(size)} in "
                f"{str(model.dtype).removeprefix('torch.')}): accelerate moves a whole layer onto the device that runs it. "
                f"Give {d} at least {mib(size)}, leave it out of --max-memory, or use a smaller --dtype")
    if runs and all(budgets[d] == 0 for d in runs):
        raise ConfigError("--max-memory gives every device that would run the layers 0 bytes: give one of them room")


def check_placement(
    spec: str,
    *,
    init: str = "pretrained",
    dtype: str | torch.dtype | None = None,
    device: str | None = None,
    device_map: str | dict | None = None,
    max_memory: dict | None = None,
    offload_dir: str | os.PathLike | None = None,
    revision: str | None = None,
    config_overrides: dict[str, Any] | None = None,
    model: nn.Module | None = None,
) -> Placement | None:
    """Refuse a placement that cannot work, before any weight is read; None without one.

    `max_memory` or `offload_dir` without `device_map` imply device_map="auto" (a budget asks
    accelerate to place the model). Checked: the strategy or map; every device named exists on
    this machine; each device that runs layers has room for the largest layer; the offload
    directory can be written; disk offload has an offload directory. Builds the model on the
    meta device from its config (models/meta.py), so a spec's own refusals come first, unless
    the caller passes that meta `model`.
    """
    if device_map is None and max_memory is None and offload_dir is None:
        return None
    device_map = check_device_map_value("auto" if device_map is None else device_map)
    budgets = normalize_max_memory(max_memory)
    for key in budgets or {}:
        if key != "disk" and (err := _missing(key, f"--max-memory {key}=...")):
            raise err
    if isinstance(device_map, dict):
        for module, dev in device_map.items():
            if dev != "disk" and (err := _missing(dev, f"the device map (module '{module or '<whole model>'}')")):
                raise err

    if model is None:
        from sheafscope.models import meta

        model, _, _ = meta.meta_model_for(spec, init=init, dtype=dtype, device=device, revision=revision,
                                            config_overrides=config_overrides)
    check_budgets(model, budgets, spec)
    chosen = choose_device_map(model, device_map, budgets)
    on_disk = sorted(m for m, d in chosen.items() if d == "disk")
    if on_disk and offload_dir is None:
        raise ConfigError(f"the device map for '{spec}' offloads {len(on_disk)} module(s) to disk ({', '.join(on_disk[:3])}"
                          f"{', ...' if len(on_disk) > 3 else ''}): pass --offload-dir DIR (a writable directory), "
                          "or give --max-memory more room")
    folder = _check_offload_dir(offload_dir) if offload_dir is not None else None  # last: it creates the directory
    return Placement(device_map, budgets, folder)


# -- a dispatched model -----------------------------------------------------------------------
def recorded_map(model: nn.Module) -> dict[str, int | str] | None:
    """The model's device map as results record it (JSON: GPU indices and device names), or None
    for a model on one device without a map."""
    hf_map = getattr(model, "hf_device_map", None)
    if not hf_map:
        return None
    return {k: v if isinstance(v, int) and not isinstance(v, bool) else str(v) for k, v in hf_map.items()}


def input_device(model: nn.Module) -> torch.device:
    """Where inputs go: the execution device of the input embedding (accelerate's hook moves an
    offloaded embedding's weights there to run it), else the device its weight is on."""
    emb = model.get_input_embeddings()
    hook = getattr(emb, "_hf_hook", None)
    for h in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):
        dev = getattr(h, "execution_device", None)
        if dev is not None:
            return torch.device(device_name(dev))
    weight = getattr(emb, "weight", None)
    if weight is not None and weight.device.type != "meta":
        return weight.device
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    raise SheafscopeError(f"{type(model).__name__}: every weight is on the meta device and no accelerate hook says "
                          "where the model runs; load it with load_model(device_map=...) or dispatch it with accelerate")
