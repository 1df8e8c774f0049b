"""Random twins filled weight by weight on their target devices, the same whatever the devices.

A twin is built on the meta device and each parameter is then created where it will live (a
GPU, the CPU, or the CPU on its way to the offload directory) and filled there, so a 70B twin
never exists whole in CPU memory. Values come from a counter-based hash of (seed, parameter
name, element index) computed with integer ops, not from torch's generator (mt19937 on the
CPU, Philox on CUDA): the same seed gives bit-identical weights on any device and under any
device map, and a CPU test checks the twin a GPU run measures.

What transformers' own init would do decides each parameter: its `_init_weights` runs on every
materialised module with its random initialisers intercepted, so constants (norm gains of one,
Gemma's zeros, zero biases, rotary tables) are transformers' own, and every randomly initialised
weight takes the hash's uniform values with the mean and std transformers asked for (GPT-2's
scaled residual projections included); a weight left uninitialised gets the config's
initializer_range.
"""

from __future__ import annotations

import hashlib
import math
import shutil
import tempfile
import weakref
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn

from sheafscope.models.placement import device_name, device_of

# Elements per chunk of the hash: small enough that the int64 temporaries of a billion-element
# embedding stay in cache on a CPU, large enough that a GPU is not bound by kernel launches.
CHUNK = {"cpu": 1 << 20, "cuda": 1 << 24}
_M64 = 1 << 64


def _s64(c: int) -> int:
    return c - _M64 if c >= 1 << 63 else c


# splitmix64's increment and finaliser multipliers, as signed int64 (torch has no uint64 ops).
_GOLDEN, _MIX1, _MIX2 = _s64(0x9E3779B97F4A7C15), _s64(0xBF58476D1CE4E5B9), _s64(0x94D049BB133111EB)


def _srl(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def parameter_key(seed: int, name: str) -> int:
    """The hash stream of one parameter: a 64-bit key from the seed and the parameter's name."""
    digest = hashlib.blake2b(f"{seed}\0{name}".encode(), digest_size=8).digest()
    return _s64(int.from_bytes(digest, "little"))


@torch.no_grad()
def hashed_uniform_(out: torch.Tensor, key: int, mean: float, std: float) -> torch.Tensor:
    """Fill `out` in place with uniform values of this mean and std, element i from the top 23
    bits of splitmix64's mix of i * golden + key. Integer ops are exact everywhere and the two
    float ops that follow are single IEEE roundings: the bits do not depend on the device."""
    flat = out.view(-1)
    chunk = CHUNK.get(out.device.type, CHUNK["cuda"])
    half_width = std * math.sqrt(3.0)
    # u in [0, 2^23) maps to (u + 1/2) / 2^22 - 1 in (-1, 1), then to mean + half_width * that
    scale, shift = half_width * 2.0 ** -22, mean + half_width * (2.0 ** -23 - 1.0)
    for start in range(0, flat.numel(), chunk):
        stop = min(start + chunk, flat.numel())
        z = torch.arange(start, stop, dtype=torch.int64, device=out.device)
        z.mul_(_GOLDEN).add_(key)
        z.bitwise_xor_(_srl(z, 30)).mul_(_MIX1)
        z.bitwise_xor_(_srl(z, 27)).mul_(_MIX2)
        u = _srl(z, 41).to(torch.float32)
        flat[start:stop].copy_(u.mul_(scale).add_(shift))
    return out


@contextmanager
def _random_inits_recorded(tracked: dict[int, torch.Tensor], stds: dict[int, tuple[float, float] | None]) -> Iterator[None]:
    """transformers' random initialisers record (mean, std) for the tracked parameters instead
    of drawing (None: an initialiser without a std, the config's applies). The first record of
    a tensor wins, which is transformers' last: it initialises children before parents, and
    this builder visits parents first."""
    from transformers.initialization import TORCH_INIT_FUNCTIONS

    def record(mean_std):
        def init(tensor, *args, **kwargs):
            if id(tensor) in tracked:
                stds.setdefault(id(tensor), mean_std(*args, **kwargs))
            return tensor
        return init

    def normal(mean=0.0, std=1.0, *rest, **kw):
        return float(mean), float(std)

    def uniform(a=0.0, b=1.0, *rest, **kw):
        return (a + b) / 2, (b - a) / math.sqrt(12.0)

    patched = {"normal_": record(normal), "trunc_normal_": record(normal), "uniform_": record(uniform)}
    for other in ("xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_", "sparse_"):
        patched[other] = record(lambda *a, **k: None)
    saved = {k: TORCH_INIT_FUNCTIONS[k] for k in patched if k in TORCH_INIT_FUNCTIONS}
    TORCH_INIT_FUNCTIONS.update({k: patched[k] for k in saved})
    try:
        yield
    finally:
        TORCH_INIT_FUNCTIONS.update(saved)


def _default_std(config: Any) -> float:
    for key in ("initializer_range", "init_std", "initializer_factor"):
        if getattr(config, key, None):
            return float(getattr(config, key))
    return 0.02


def _target(device_map: dict | None, device: str | torch.device, name: str) -> str:
    return str(device) if device_map is None else device_name(device_of(device_map, name))


@torch.no_grad()
def fill(model: nn.Module, seed: int, device: str | torch.device, device_map: dict | None = None,
         offload_dir: str | None = None) -> dict[str, dict]:
    """Create every meta parameter of `model` on its target device (`device_map`'s, else
    `device`), module by module, filled as described in the module docstring. Parameters for
    "disk" are written to `offload_dir` as they are made and left on the meta device; returns
    accelerate's offload index for them. Tied parameters stay tied."""
    from accelerate.utils import offload_weight

    default_std = _default_std(model.config)
    names: dict[int, list[str]] = {}  # a tied parameter has several names; the first is its own
    tracked: dict[int, torch.Tensor] = {}  # keeps every tensor whose id is a key below alive
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
        tracked[id(p)] = p
    made: dict[int, nn.Parameter] = {}
    stds: dict[int, tuple[float, float] | None] = {}
    index: dict[str, dict] = {}
    for module in model.modules():  # parents before children
        fresh = []
        for pname, p in module._parameters.items():
            if p is None or id(p) not in names:
                continue
            if id(p) in made:  # tied to a parameter made already
                module._parameters[pname] = made[id(p)]
                continue
            full = names[id(p)][0]
            where = _target(device_map, device, full)
            new = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="cpu" if where == "disk" else where),
                               requires_grad=False)
            tracked[id(new)] = new
            if id(p) in stds:  # a parent's initialiser named it while it was still on the meta device
                stds[id(new)] = stds[id(p)]
            made[id(p)] = new
            module._parameters[pname] = new
            fresh.append((p, full, where, new))
        with _random_inits_recorded(tracked, stds):  # every module: a parent may name its children's std
            model._init_weights(module)
        for _, full, _, new in fresh:
            if id(new) in stds or new.ndim >= 2:
                mean, std = stds.get(id(new)) or (0.0, default_std)
                hashed_uniform_(new.data, parameter_key(seed, full), mean, std)
        if isinstance(module, nn.Embedding) and module.padding_idx is not None and fresh:
            module.weight.data[module.padding_idx].zero_()  # as transformers' init leaves it
        for old, _, where, new in fresh:
            if where != "disk":
                continue
            for alias in names[id(old)]:
                offload_weight(new, alias, offload_dir, index)
            placeholder = nn.Parameter(torch.empty(new.shape, dtype=new.dtype, device="meta"), requires_grad=False)
            made[id(old)] = placeholder
            for pname, p in module._parameters.items():
                if p is new:
                    module._parameters[pname] = placeholder
            del tracked[id(new)]  # nothing holds the CPU copy now: it is freed
            stds.pop(id(new), None)
    return index


def empty(config: Any, cls: Any, dtype: torch.dtype, attn: str | None) -> nn.Module:
    """The model of this config with its parameters on the meta device (buffers real)."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        model = cls.from_config(config, dtype=dtype, attn_implementation=attn)
    model.tie_weights()  # init_empty_weights re-creates each assigned parameter, untying them
    return model


def materialize(model: nn.Module, seed: int, device: str, device_map: dict | None = None,
                offload_dir: str | None = None) -> nn.Module:
    """Fill a meta model (`empty`) with the seed's weights: all on `device`, or placed by
    accelerate's `device_map`, disk-offloaded weights written to a fresh folder inside
    `offload_dir` that is removed with the model."""
    from accelerate import dispatch_model
    from accelerate.utils import save_offload_index

    if device_map is None:
        fill(model, seed, device)
        return model.to(device).eval()  # the buffers, built on the CPU
    folder = None
    if "disk" in device_map.values():
        folder = tempfile.mkdtemp(prefix="twin-", dir=offload_dir)
        weakref.finalize(model, shutil.rmtree, folder, ignore_errors=True)
    index = fill(model, seed, "cpu", device_map, folder)
    if folder is not None:
        save_offload_index(index, folder)
    dispatch_model(model, device_map=device_map, offload_dir=folder)
    model.hf_device_map = dict(device_map)
    return model.eval()
