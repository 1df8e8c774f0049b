"""What a run will need before it starts: weights and activation memory per device against
each device's capacity, from the config alone (the model is built on the meta device: sizes
and accelerate's device map without a weight), so a run that cannot fit says so at once.

Activation memory is an estimate of the peak on each device that runs layers, for one forward
pass of the capture (the trunk only: no logits). It counts, in the model's dtype:
  - fast path, for one batch of T = max(token budget, longest prompt) tokens: the residual
    stream and its working copies (4·T·d), queries, keys and values with the KV heads expanded
    and the attention output (4·T·heads·head_dim), the MLP's intermediate activations
    (3·T·ffn, ffn the widest matrix of a block); per layer on the device, the statistics kept
    until the batch ends (2·T·heads, float64); the queries and keys held for exact
    recomputation, and the residual streams held for their statistics (each up to
    capture.fast.HOLD_BYTES; twice that where they are reduced together, stacked). It never
    materialises n×n attention.
  - eager path, one prompt of n tokens at a time: every layer's n×n attention maps, returned
    by the model and kept for the pass (n²·heads per layer), the float32 scores and softmax of
    the layer running (2·n²·heads), all hidden states ((L+1)·n·d), and the fast path's per-token
    terms for T = n.
  - with offload, a copy of the largest layer on the device that runs it.
It leaves out the allocator's fragmentation and the framework's own workspace: keep a margin.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sheafscope.errors import ConfigError

GB = 1e9


@dataclass
class DevicePlan:
    """One device: what it holds and runs, and its room."""

    device: str
    weights_bytes: int = 0
    activation_bytes: int = 0
    capacity_bytes: int | None = None
    capacity_from: str = ""
    layers_run: int = 0

    @property
    def need_bytes(self) -> int:
        return self.weights_bytes + self.activation_bytes

    @property
    def fits(self) -> bool | None:
        """None where the capacity is not checked (disk read in place)."""
        return None if self.capacity_bytes is None else self.need_bytes <= self.capacity_bytes


@dataclass
class Plan:
    spec: str
    config_from: str
    dtype: str
    n_parameters: int
    weights_bytes: int
    n_layers: int
    attention: str
    tokens_per_batch: int
    longest_prompt_tokens: int
    processes: int
    device_map: str | dict | None
    placed: dict[str, int | str] | None
    devices: list[DevicePlan]
    notes: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return all(d.fits is not False for d in self.devices)

    def render(self) -> str:
        where = "one device" if self.placed is None else f"device map {self.device_map if isinstance(self.device_map, str) else 'given'}"
        lines = [
            f"{self.spec}: {self.n_parameters / 1e9:.2f} B parameters, {self.dtype}, {self.weights_bytes / GB:.1f} GB of "
            f"weights; {self.n_layers} layers on {where} (config: {self.config_from})",
            f"{self.attention} attention, {self.tokens_per_batch:,} tokens a forward pass (longest prompt "
            f"{self.longest_prompt_tokens:,}), {self.processes} process{'es' if self.processes > 1 else ''}",
            f"{'device':<10}{'layers':>7}{'weights':>12}{'activations':>13}{'need':>11}{'capacity':>11}  fits",
        ]
        for d in self.devices:
            cap = "-" if d.capacity_bytes is None else f"{d.capacity_bytes / GB:.1f} GB"
            fits = {True: "yes", False: "NO", None: "not checked"}[d.fits]
            lines.append(f"{d.device:<10}{d.layers_run:>7}{d.weights_bytes / GB:>9.1f} GB{d.activation_bytes / GB:>10.1f} GB"
                         f"{d.need_bytes / GB:>8.1f} GB{cap:>11}  {fits} ({d.capacity_from})")
        lines += [f"note: {n}" for n in self.notes]
        lines.append("fits" if self.fits else "does NOT fit: " + fix_for(self))
        return "\n".join(lines)

    __str__ = render


# -- capacity ---------------------------------------------------------------------------------
def capacity(device: str, budgets: dict[int | str, int] | None, offload_dir: str | None,
             gpu_memory: int | None = None) -> tuple[int | None, str]:
    """Room on a device: a GPU's free memory, the CPU's available memory, the disk's free space
    at the offload directory. A GPU this machine lacks (a plan for another machine) has
    `gpu_memory`, else its --max-memory budget; ConfigError for one with neither."""
    import psutil

    if device == "cpu":
        return int(psutil.virtual_memory().available), "available memory"
    if device == "disk":
        where = Path(offload_dir or ".").expanduser().resolve()
        while not where.exists() and where.parent != where:  # not created yet: the disk it would be on
            where = where.parent
        return int(shutil.disk_usage(where).free), f"free at {offload_dir or '.'}"
    if device == "mps":
        return None, "not measured"
    index = int(device.split(":")[1]) if device.startswith("cuda:") else None
    if index is not None and index < torch.cuda.device_count():
        return int(torch.cuda.mem_get_info(index)[0]), "free memory"
    if gpu_memory is not None and index is not None:
        return int(gpu_memory), "declared by --gpu-memory"
    if budgets and index is not None and index in budgets:
        return int(budgets[index]), "its --max-memory budget"
    raise ConfigError(f"{device} is not on this machine: to plan for another machine, give the GPUs' memory with "
                      f"--gpu-memory (e.g. 80GB) or a budget with --max-memory (e.g. {index if index is not None else device}=70GiB)")


# -- the estimate -----------------------------------------------------------------------------
def _block_names(model: nn.Module, blocks: list[nn.Module]) -> list[str]:
    name_of = {id(m): n for n, m in model.named_modules()}
    return [name_of[id(b)] for b in blocks]


def _exec_device(placed: dict, name: str, main: str) -> tuple[str, bool]:
    """(device that runs module `name`, whether its weights are offloaded to get there)."""
    from sheafscope.models.placement import device_name, device_of

    dev = device_name(device_of(placed, name))
    if dev == "disk" or (dev == "cpu" and main != "cpu"):
        return main, True
    return dev, False


def _main_device(placed: dict) -> str:
    from sheafscope.models.placement import device_name

    # dispatch_model: the first device that is neither cpu nor disk runs the offloaded layers
    gpus = [device_name(d) for d in placed.values() if device_name(d) not in ("cpu", "disk")]
    return sorted(set(gpus))[0] if gpus else "cpu"


def activation_bytes(geometry: Any, ffn: int, elem: int, *, tokens: int, longest: int, layers: int,
                     total_layers: int, attention: str, device_type: str) -> int:
    """The estimate in the module docstring, for one device running `layers` layers."""
    from sheafscope.capture.fast import HOLD_BYTES, TOGETHER

    d, h, hd = geometry.d_model, geometry.n_heads, geometry.head_dim
    if layers == 0:
        return 0
    if attention == "eager":
        n = longest
        per_token = n * (4 * d + 4 * h * hd + 3 * ffn) * elem
        return per_token + layers * h * n * n * elem + 2 * h * n * n * 4 + (total_layers + 1) * n * d * elem
    per_token = tokens * (4 * d + 4 * h * hd + 3 * ffn) * elem
    stats = layers * 2 * tokens * h * 8
    # queries and keys, and the residual streams, each held within the limit; a stacked copy of
    # each where they settle together
    limit = HOLD_BYTES.get(device_type, HOLD_BYTES["cuda"])
    held = min(limit, layers * 2 * tokens * h * hd * elem) + min(limit, (layers + 1) * tokens * d * elem)
    held *= 2 if TOGETHER.get(device_type, True) else 1
    return per_token + stats + held + (total_layers + 1) * tokens * 8


def plan_for_model(model: nn.Module, *, spec: str, device: str, placed: dict[str, int | str] | None,
                   device_map: str | dict | None = None, budgets: dict[int | str, int] | None = None,
                   offload_dir: str | None = None, processes: int = 1, longest_prompt_tokens: int | None = None,
                   batch_tokens: int | None = None, attention: str = "fast", weights_written: bool = False,
                   config_from: str = "", gpu_memory: int | None = None) -> Plan:
    """The plan of a model built on the meta device, placed by `placed` (accelerate's map) or
    on `device`. `weights_written`: whether disk-offloaded weights are written (twins) rather
    than read in place from the checkpoint, so that the disk's room is checked."""
    from sheafscope.capture.batching import BATCH_TOKENS
    from sheafscope.models.adapters import adapter_for
    from sheafscope.models.placement import device_name, largest_layer

    if processes < 1:
        raise ConfigError(f"processes must be at least 1, not {processes}")
    adapter = adapter_for(model)
    g = adapter.geometry
    params = dict(model.named_parameters())
    elem = next(iter(params.values())).element_size()
    ffn = max(max(p.shape) for p in adapter.blocks[0].parameters())
    device = device_name(device)
    if placed is None:
        where = {n: device for n in params}
    else:
        from sheafscope.models.placement import device_of

        where = {n: device_name(device_of(placed, n)) for n in params}
    weights: dict[str, int] = {}
    for n, p in params.items():
        weights[where[n]] = weights.get(where[n], 0) + p.numel() * p.element_size()
    runs: dict[str, int] = {}
    offloaded: set[str] = set()
    main = _main_device(placed) if placed is not None else device
    for name in _block_names(model, adapter.blocks):
        dev, off = (_exec_device(placed, name, main) if placed is not None else (device, False))
        runs[dev] = runs.get(dev, 0) + 1
        if off:
            offloaded.add(dev)
    context = getattr(getattr(model.config, "text_config", None) or model.config, "max_position_embeddings", None)
    budget = batch_tokens or BATCH_TOKENS.get(main.split(":")[0], BATCH_TOKENS["cpu"])
    longest = longest_prompt_tokens or min(budget, context or budget)
    tokens = max(budget, longest) if attention == "fast" else longest
    notes: list[str] = []
    if longest_prompt_tokens is None:
        notes.append(f"no prompts given: the longest prompt is taken as {longest:,} tokens (pass --prompts or --max-tokens)")
    if processes > 1 and placed is None and device.startswith("cuda"):
        # data-parallel processes take one GPU each, from cuda:0
        names = [f"cuda:{i}" for i in range(processes)]
        weights = {n: weights[device] for n in names}
        runs = {n: runs[device] for n in names}
        copies = dict.fromkeys(names, 1)
    else:
        copies = dict.fromkeys(set(weights) | set(runs), processes)
        if processes > 1:
            notes.append(f"the {processes} processes share {'the devices of the map' if placed else device}: "
                         "each holds its own copy of the weights and activations")
    big = largest_layer(model)[1] if offloaded else 0
    devices = []
    for dev in sorted(set(weights) | set(runs), key=lambda x: (x == "disk", x == "cpu", x)):
        act = activation_bytes(g, ffn, elem, tokens=tokens, longest=longest, layers=runs.get(dev, 0),
                               total_layers=g.n_layers, attention=attention, device_type=dev.split(":")[0])
        act += big if dev in offloaded else 0
        n = copies.get(dev, 1) if dev != "disk" else 1
        dp = DevicePlan(dev, weights.get(dev, 0) * n, act * n if dev != "disk" else 0, layers_run=runs.get(dev, 0))
        if dev == "disk" and not weights_written:
            dp.capacity_from = "read in place from the checkpoint"
        else:
            dp.capacity_bytes, dp.capacity_from = capacity(dev, budgets, offload_dir, gpu_memory)
        devices.append(dp)
    if attention == "fast" and tokens > budget:
        notes.append(f"the longest prompt ({longest:,} tokens) exceeds the token budget and runs alone")
    total = sum(p.numel() for p in params.values())
    return Plan(spec, config_from, str(next(iter(params.values())).dtype).removeprefix("torch."), total,
                sum(p.numel() * p.element_size() for p in params.values()), g.n_layers, attention, tokens, longest,
                processes, device_map, placed, devices, notes)


def plan(
    spec: str,
    *,
    init: str = "pretrained",
    dtype: str | torch.dtype | None = None,
    device: str | None = None,
    device_map: str | dict | None = None,
    max_memory: dict | None = None,
    offload_dir: str | None = None,
    processes: int = 1,
    longest_prompt_tokens: int | None = None,
    batch_tokens: int | None = None,
    attention: str = "fast",
    revision: str | None = None,
    config_overrides: dict[str, Any] | None = None,
    gpu_memory: int | str | None = None,
    meta_model: tuple[nn.Module, str] | None = None,
) -> Plan:
    """What running `spec` needs per device, from its config (catalog entry, a directory's
    config.json, a GGUF header, the hub's config): weights following the device map accelerate
    would choose under `max_memory` (or all on `device`), the activation estimate of the module
    docstring, and each device's capacity. `max_memory` or `offload_dir` imply
    device_map="auto", as for load_model. GPUs this machine lacks may be planned for: each has
    `gpu_memory` ("80GB"), else its `max_memory` budget, as its memory. `meta_model`: the spec's
    model on the meta device and where its config came from, when the caller has built them."""
    from sheafscope.capture import ATTENTION_PATHS
    from sheafscope.models import meta
    from sheafscope.models.loading import default_device, parse_spec
    from sheafscope.models.placement import (check_device_map_value, check_budgets, choose_device_map,
                                             normalize_max_memory)

    if attention not in ATTENTION_PATHS:
        raise ConfigError(f"unknown attention path '{attention}'; choose one of {', '.join(ATTENTION_PATHS)}")
    if processes < 1:
        raise ConfigError(f"--processes must be at least 1, not {processes}")
    for what, value in (("longest_prompt_tokens", longest_prompt_tokens), ("batch_tokens", batch_tokens)):
        if value is not None and value < 1:
            raise ConfigError(f"{what} must be at least 1, not {value}")
    device = device or default_device()
    if device_map is None and (max_memory is not None or offload_dir is not None):
        device_map = "auto"
    budgets = normalize_max_memory(max_memory)
    gpu_bytes = None if gpu_memory is None else normalize_max_memory({"cpu": gpu_memory})["cpu"]
    if meta_model is None:
        model, _, config_from = meta.meta_model_for(spec, init=init, dtype=dtype, device=device, revision=revision,
                                                    config_overrides=config_overrides)
    else:
        model, config_from = meta_model
    check_budgets(model, budgets, spec)
    placed = None
    if device_map is not None:
        placed = choose_device_map(model, check_device_map_value(device_map), budgets)
    twin = parse_spec(spec.strip(), init)[1] == "random"
    return plan_for_model(model, spec=spec, device=device, placed=placed, device_map=device_map, budgets=budgets,
                          offload_dir=offload_dir, processes=processes, longest_prompt_tokens=longest_prompt_tokens,
                          batch_tokens=batch_tokens, attention=attention, weights_written=twin, config_from=config_from,
                          gpu_memory=gpu_bytes)


def longest_tokens_bound(prompts: list[str], special: int = 2) -> int:
    """An upper bound on the longest prompt's tokens without a tokenizer: its UTF-8 bytes plus
    `special` tokens (BOS/EOS). Byte-level BPE and SentencePiece with byte fallback never make
    more tokens than bytes, so the plan errs on the side of more memory."""
    if not prompts:
        raise ConfigError("no prompts to plan for: pass a prompts file with at least one prompt, or --max-tokens N")
    return max(len(p.encode("utf-8")) for p in prompts) + special


def fix_for(p: Plan, over: list[DevicePlan] | None = None) -> str:
    """What to change, from what does not fit."""
    over = [d for d in p.devices if d.fits is False] if over is None else over
    weights_alone = any(d.weights_bytes > (d.capacity_bytes or 0) for d in over)
    fixes = []
    if weights_alone:
        if p.dtype == "float32":
            fixes.append("--dtype bfloat16 (halves the weights)")
        if any(d.device.startswith("cuda") for d in p.devices) or torch.cuda.device_count() > 1:
            fixes.append("--device-map auto to spread the layers over the GPUs")
        fixes.append("--max-memory and --offload-dir to offload layers to the CPU and disk")
    else:
        if p.placed is not None:
            room = max(d.activation_bytes for d in over)
            fixes.append(f"lower --max-memory below each device's memory by about {room / GB:.1f} GB: accelerate fills "
                         "the budget with weights, and the activations need room beside them")
        fixes.append("--batch-tokens N (fewer tokens a forward pass) or --max-tokens N (truncate the longest prompts)")
        if p.attention == "eager":
            fixes.append("the fast attention path (eager keeps every n×n attention map)")
    return "; or ".join(fixes)


def require_fit(p: Plan, *, weights_only: bool = False) -> None:
    """ConfigError with the numbers and the fix when the plan does not fit (weights alone, for
    `weights_only`)."""
    over = [d for d in p.devices if d.capacity_bytes is not None
            and (d.weights_bytes if weights_only else d.need_bytes) > d.capacity_bytes]
    if not over:
        return
    what = "; ".join(
        f"{d.device} needs {(d.weights_bytes if weights_only else d.need_bytes) / GB:.1f} GB "
        f"({d.weights_bytes / GB:.1f} GB of weights" + ("" if weights_only else f" + {d.activation_bytes / GB:.1f} GB of activations")
        + f") but has {d.capacity_bytes / GB:.1f} GB ({d.capacity_from})" for d in over)
    raise ConfigError(f"'{p.spec}' does not fit ({p.dtype}): {what}. Use {fix_for(p, over)}; `sheafscope plan` shows the numbers")
