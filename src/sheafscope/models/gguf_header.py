"""What a GGUF file holds, read from its header before anything is dequantized.

transformers dequantizes every tensor of a GGUF file before it checks much of anything, so an
unsupported architecture or a truncated download costs minutes and gigabytes before it fails
(a truncated file with "cannot reshape array of size ..."). The header (key-value metadata and
tensor infos) is read through a memory map, skipping the tokenizer's arrays: the architecture,
and where every tensor's data must lie, are known in a fraction of a second.
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

from sheafscope.errors import ModelLoadError, UnsupportedArchitectureError

GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class GGUFHeader:
    """The header of a GGUF file: its architecture and the extent of its tensor data."""

    path: Path
    architecture: str  # general.architecture, llama.cpp's name ("llama", "qwen2", "gemma3")
    name: str | None  # general.name
    model_type: str  # the transformers config.model_type this loads as ("gemma3_text", ...)
    file_size: int
    data_end: int  # the byte just past the furthest tensor data the header describes
    n_tensors: int
    n_elements: int  # all tensors' elements: the size of the dequantized model in values
    tensor_types: tuple[str, ...]  # distinct ggml types, e.g. ("F32", "Q4_K", "Q6_K")

    @property
    def truncated(self) -> bool:
        return self.data_end > self.file_size


def has_gguf_magic(path: Path) -> bool:
    """Whether a file starts with the GGUF magic bytes."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def model_type_for(architecture: str, name: str | None) -> str:
    """The transformers model_type a GGUF architecture loads as.

    Mirrors transformers.modeling_gguf_pytorch_utils.load_gguf_checkpoint (5.x), which renames
    a few llama.cpp architectures and loads Gemma 3/4 GGUFs as their text-only models.
    """
    arch = architecture
    if "llama" in arch and name == "mistral":  # transformers compares the whole general.name
        return "mistral"
    if "t5" in arch:
        return "umt5" if name and "umt5" in name.lower() else "t5"
    for key, model_type in (("qwen2moe", "qwen2_moe"), ("gpt_oss", "gpt_oss"), ("gpt-oss", "gpt_oss"),
                            ("qwen3moe", "qwen3_moe"), ("minimax-m2", "minimax_m2")):
        if key in arch:
            return model_type
    return {"gemma3": "gemma3_text", "gemma4": "gemma4_text"}.get(arch, arch)


def _transformers_gguf_architectures() -> list[str]:
    try:
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES
    except ImportError:  # a transformers without GGUF support: let it say so itself
        return []
    return list(GGUF_SUPPORTED_ARCHITECTURES)


def supported_gguf_architectures() -> list[str]:
    """GGUF architectures that both transformers reads and sheafscope has an adapter for."""
    from sheafscope.models.adapters import ADAPTERS

    return sorted(a for a in _transformers_gguf_architectures() if model_type_for(a, None) in ADAPTERS)


class _ShortRead(Exception):
    """The header claims bytes past the end of the file."""

    def __init__(self, needed: int):
        super().__init__(needed)
        self.needed = needed


_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUFValueType -> bytes
_STRING, _ARRAY, _UINT32 = 8, 9, 4


class _Cursor:
    """Sequential little- (or big-) endian reads from a memory-mapped file, refusing to read
    past its end. Arrays are skipped without decoding: a tokenizer's 150,000-string vocabulary
    costs one length read per string (gguf.GGUFReader builds numpy views of each: ~15 s)."""

    def __init__(self, buf, size: int, order: str = "<"):
        self.buf, self.size, self.order, self.pos = buf, size, order, 0

    def take(self, fmt: str):
        n = struct.calcsize(fmt)
        if self.pos + n > self.size:
            raise _ShortRead(self.pos + n)
        value = struct.unpack_from(self.order + fmt, self.buf, self.pos)
        self.pos += n
        return value[0] if len(value) == 1 else value

    def string(self, keep: bool = True) -> str | None:
        n = self.take("Q")
        if self.pos + n > self.size:
            raise _ShortRead(self.pos + n)
        out = bytes(self.buf[self.pos : self.pos + n]).decode("utf-8", errors="replace") if keep else None
        self.pos += n
        return out

    def value(self, vtype: int, keep: bool):
        """Read (keep) or skip one value of a GGUF value type."""
        if vtype == _STRING:
            return self.string(keep)
        if vtype == _ARRAY:
            itype, count = self.take("I"), self.take("Q")
            if itype in _SCALAR_SIZES:
                end = self.pos + _SCALAR_SIZES[itype] * count
                if end > self.size:
                    raise _ShortRead(end)
                self.pos = end
            else:
                for _ in range(count):
                    self.value(itype, keep=False)
            return None
        if vtype not in _SCALAR_SIZES:
            raise ValueError(f"unknown GGUF value type {vtype} at byte {self.pos}")
        fmt = {1: "B", 2: "H", 4: "I", 8: "Q"}[_SCALAR_SIZES[vtype]]
        return self.take(fmt)


def read_header(path: Path) -> GGUFHeader:
    """Read a GGUF file's header (metadata and tensor infos) without touching its tensor data.

    Raises ModelLoadError naming truncation ("truncated: the file is N bytes, its header
    describes M") or damage, instead of numpy's reshape error from deep inside the loader.
    """
    try:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    except ImportError:
        raise ModelLoadError("reading a GGUF file needs the gguf package: pip install gguf") from None

    path = Path(path)
    size = path.stat().st_size
    if not has_gguf_magic(path):
        raise ModelLoadError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)")
    if size < 24:  # magic, version and the two counts
        raise ModelLoadError(f"{path}: truncated: the file is {size} bytes and ends inside its header; download or copy it again")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        cur = _Cursor(buf, size)
        cur.pos = 4
        try:
            version = cur.take("I")
            if version & 0xFFFF == 0:  # written on a big-endian machine
                cur.order = ">"
                version = int.from_bytes(version.to_bytes(4, "little"), "big")
            if version not in (2, 3):
                raise ModelLoadError(f"{path}: GGUF version {version} cannot be read (versions 2 and 3 can)")
            n_tensors, n_kv = cur.take("Q"), cur.take("Q")
            fields: dict[str, object] = {}
            for _ in range(n_kv):
                key = cur.string()
                vtype = cur.take("I")
                keep = key in ("general.architecture", "general.name", "general.alignment")
                fields[key] = cur.value(vtype, keep)
            infos = []
            for _ in range(n_tensors):
                cur.string(keep=False)
                n_dims = cur.take("I")
                dims = [cur.take("Q") for _ in range(n_dims)]
                raw_type, offset = cur.take("I"), cur.take("Q")
                infos.append((dims, raw_type, offset))
        except _ShortRead as e:
            raise ModelLoadError(
                f"{path}: truncated: the file is {size} bytes and ends inside its header "
                f"(at least {e.needed} bytes are needed to read it); download or copy it again"
            ) from None
        except (ValueError, UnicodeDecodeError, struct.error) as e:
            raise ModelLoadError(f"{path}: damaged GGUF header ({e}); download or copy it again") from None
    alignment = fields.get("general.alignment") or 32
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise ModelLoadError(f"{path}: damaged GGUF header (general.alignment {alignment!r})")
    data_offset = -(-cur.pos // alignment) * alignment
    types, n_elements, data_end = set(), 0, data_offset
    for dims, raw_type, offset in infos:
        try:
            ggml_type = GGMLQuantizationType(raw_type)
            block_size, type_size = GGML_QUANT_SIZES[ggml_type]
        except (ValueError, KeyError):
            raise ModelLoadError(f"{path}: tensor type {raw_type} is unknown to the gguf package "
                                 "(a newer quantization, or a damaged header): upgrade gguf, or download the file again") from None
        n = math.prod(dims)
        types.add(ggml_type.name)
        n_elements += n
        data_end = max(data_end, data_offset + offset + n * type_size // block_size)
    architecture = fields.get("general.architecture") or ""
    name = fields.get("general.name")
    header = GGUFHeader(
        path=path, architecture=architecture, name=name, model_type=model_type_for(architecture, name),
        file_size=size, data_end=data_end, n_tensors=len(infos), n_elements=n_elements, tensor_types=tuple(sorted(types)),
    )
    if header.truncated:
        raise ModelLoadError(
            f"{path}: truncated: the file is {size} bytes, its header describes {data_end} "
            f"({data_end - size} bytes missing); download or copy it again"
        )
    if not architecture:
        raise ModelLoadError(f"{path}: the GGUF header has no general.architecture; not a model file transformers can load")
    return header


def check_supported(header: GGUFHeader) -> None:
    """Refuse an architecture sheafscope (or transformers' GGUF loader) cannot read, before any
    tensor is dequantized."""
    from sheafscope.models.adapters import ADAPTERS

    supported = ", ".join(supported_gguf_architectures())
    arch = header.architecture
    readable = _transformers_gguf_architectures()
    if arch not in readable and header.model_type not in readable:
        raise UnsupportedArchitectureError(
            f"{header.path.name}: GGUF architecture '{arch}' cannot be read by transformers' GGUF loader. "
            f"Supported GGUF architectures: {supported}; or pass a transformers checkpoint directory. Nothing was dequantized."
        )
    if header.model_type not in ADAPTERS:
        raise UnsupportedArchitectureError(
            f"{header.path.name}: GGUF architecture '{arch}' (transformers model_type '{header.model_type}') is not "
            f"supported: sheafscope does not know where it keeps its value weights. Supported GGUF architectures: "
            f"{supported}. Nothing was dequantized."
        )
