"""What a user can get wrong on the command line, refused before any model loads or --out is
touched: devices this machine lacks, unknown or repeated models, an unwritable --out, a placement
that cannot work and weights that cannot fit."""

from __future__ import annotations

import argparse
import os
import re
import tempfile
from pathlib import Path

from sheafscope.errors import ConfigError, SheafscopeError
from sheafscope.units import ModelEntry


_DEVICE = re.compile(r"^(cpu|mps|cuda)(?::(\d+))?$")


def check_device(device: str) -> None:
    """Refuse a --device this machine does not have (cheap: asks torch, loads nothing)."""
    import torch

    n_cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    available = ["cpu", *(["cuda", *(f"cuda:{i}" for i in range(n_cuda))] if n_cuda else []), *(["mps"] if mps else [])]
    m = _DEVICE.match(device)
    if m is None or (m.group(1) in ("cpu", "mps") and m.group(2) not in (None, "0")):
        raise ConfigError(f"--device {device}: not a device name; use one of this machine's: {', '.join(available)} "
                          "(or omit --device: cuda if available, else cpu)")
    kind, index = m.group(1), m.group(2)
    if kind == "cuda":
        if not n_cuda:
            raise ConfigError(f"--device {device}: torch sees no CUDA GPU on this machine (torch.cuda.is_available() is False); "
                              "use --device cpu, or omit --device")
        if index is not None and int(index) >= n_cuda:
            raise ConfigError(f"--device {device}: this machine has {n_cuda} CUDA device(s), cuda:0 to cuda:{n_cuda - 1}; "
                              "pick one of those")
    if kind == "mps" and not mps:
        raise ConfigError(f"--device {device}: torch sees no Apple MPS device here; use one of: {', '.join(available)}")


def check_models(entries: list[ModelEntry], init: str, quantize: str | None) -> None:
    """Unknown specs, duplicate specs, --quantize where it cannot apply and unusable GGUF files
    (header read, nothing dequantized), without loading any model."""
    from sheafscope.models import catalog as cat
    from sheafscope.models.loading import check_spec, parse_spec

    seen: dict[tuple[str, str], str] = {}
    for e in entries:
        kind = check_spec(e.spec, init, quantize)  # raises UnknownModelError / ConfigError with the fix
        name, spec_init = parse_spec(e.spec.strip(), init)
        if kind in ("local-dir", "gguf-file"):
            key = ("path", str(Path(name).expanduser().resolve()))
        else:
            entry = cat.find(name)
            key = (spec_init if kind == "random-init" else "pretrained", entry.name if entry else name.lower())
        if key in seen:
            also = f" (also as '{seen[key]}')" if seen[key] != e.spec else ""
            raise ConfigError(f"model '{e.spec}' is given twice{also}: a model given twice would count twice in the MAPE; "
                              "give each model once")
        seen[key] = e.spec


def check_out(out: Path) -> None:
    """--out must be a directory, existing or not, that this process can write in. Nothing is
    created: writability is tested by making and removing a probe file, as the run's atomic
    writes would (os.access alone is wrong for root and for read-only mounts)."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a directory; pass a directory (it is created if missing)")
    if (out / "models").exists() and not (out / "models").is_dir():
        raise ConfigError(f"--out {out}: {out / 'models'} is a file, where the run keeps its per-model results; "
                          "move it away or pass another --out")
    parent = out
    while not parent.exists() and parent.parent != parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"--out {out} cannot be created: {parent} is a file, not a directory; pass another --out")
    for d in (parent, out / "models"):
        if not d.is_dir():
            continue
        try:
            fd, tmp = tempfile.mkstemp(dir=d, prefix=".sheafscope-write-check-")
            os.close(fd)
            os.unlink(tmp)
        except OSError as e:
            where = f"{d}" if d == out else f"{d}, where it would be created," if d == parent else f"{d}"
            raise ConfigError(f"--out {out} is not writable ({where} refuses a new file: {e.strerror or type(e).__name__}); "
                              "pass a directory you can write to, or fix its permissions") from None


def check_room(entries: list[ModelEntry], args: argparse.Namespace) -> None:
    """A placement that cannot work, and weights that cannot fit their devices, refused from
    the configs before any model loads (`sheafscope plan` shows the whole estimate)."""
    from sheafscope.models import meta
    from sheafscope.models.placement import check_placement
    from sheafscope.plan import plan, require_fit

    placing = args.device_map or args.max_memory or args.offload_dir
    if placing and (args.processes or 1) > 1:
        raise ConfigError("--device-map, --max-memory and --offload-dir spread one model over the devices of one process; "
                          "--processes N gives each process its own GPU: use one or the other")
    for e in entries:
        kw = dict(init=args.init, dtype=args.dtype, device=args.device, device_map=args.device_map,
                  max_memory=args.max_memory, offload_dir=args.offload_dir, revision=args.revision)
        try:
            model, _, source = meta.meta_model_for(e.spec, init=args.init, dtype=args.dtype, device=args.device,
                                                   revision=args.revision)
        except SheafscopeError:
            continue  # the spec's own problem: its load says so, and the other models still run
        if placing:
            check_placement(e.spec, **kw, model=model)
        require_fit(plan(e.spec, **kw, meta_model=(model, source)), weights_only=True)
