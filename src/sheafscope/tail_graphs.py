"""CUDA graphs of the work a short forward pass leaves for after it: replayed, not relaunched.

On a GPU a forward pass of a few hundred tokens is bound by the host: the device waits for
Python. After such a forward pass the fast path queues its tail: the fused sums kernel over
the held layers (`fused_rows.fused_stats`), the residual streams' maxima, and both copies to
the host. Launched op by op right after a forward pass, whose host work has left the caches
cold, that costs ~0.45 ms of host time; replayed as one CUDA graph, much less
(benchmarks/launch_cost.py and timeline.py, an H200 host).

A graph reads its inputs at the addresses it was captured with, and a forward pass puts its
queries, keys and residual streams wherever the caching allocator has room. So the graph reads
them through a table: its first step copies a pinned host table (each layer's offset from a
fixed base tensor, in elements) to the device, and its kernels (`fused_rows.table_sums`,
`table_maxima.table_maxima`) find every layer and stream there. A replay writes the forward
pass's offsets into the table and replays. Graphs are kept by what they bake in: the shapes,
strides and dtypes, the number of layers and streams, the causal flag, the scale, the device
and the stream. The kernels are the op-by-op path's sums kernel and exact maxima, so a replay
gives what relaunching would, bit for bit. A shape is captured on its second sighting (a first
runs op by op, which also compiles the sums kernel; a graph cannot compile while capturing).

Each graph writes into pinned host buffers of its own, and reads a host table of its own. With
batches pipelined (batch i + 1 is launched before batch i is read) one set would be overwritten
before it is read, so each key has up to two graphs, each taken by the batch that replayed it
until that batch's result() has copied its numbers out (or the batch is gone); with both taken,
the tail runs op by op.

Only the plain case is graphed: one planned fused route for every layer, sums kept (up to
capture_fast.FUSED_SUMS_MAX_ROWS rows), no mask, no padding, contiguous streams. Everything else
(padded batches, long prompts, the lse and dense routes) runs op by op as before.
"""

from __future__ import annotations

import operator
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from sheafscope import fused_rows
from sheafscope.table_maxima import table_maxima

MAX_KEYS = 4  # shapes kept; each holds up to two graphs, their pinned outputs and a small pool
KERNEL_NAME = "tail-graph"  # the kernel counter a replayed tail adds (one per forward pass)

disabled: str | None = None  # why graphs are off for the rest of the process (a capture failed)

_Tensor = torch.Tensor
_dtype = operator.attrgetter("dtype")


@dataclass(eq=False)
class _Slot:
    """One captured tail and its outputs: sums (layers * b, heads, 2) float64 and the streams'
    maxima (streams, b) in the hidden states' dtype, pinned on the host; `table`, the pinned
    host table's numpy view, which the graph copies to the device first (queries', keys',
    streams' offsets from their bases); the alignments its kernels assume of those offsets."""

    graph: Any  # torch.cuda.CUDAGraph
    sums: torch.Tensor
    maxima: torch.Tensor
    table: np.ndarray
    align_qk: int
    align_h: int
    keep: tuple  # tensors made outside the graph that it reads (the host and device tables)
    owner: Any = None  # weakref to the Replayed whose outputs these are until read, or None

    def free(self) -> bool:
        return self.owner is None or self.owner() is None


@dataclass(eq=False)
class Replayed:
    """A replayed tail: host views of its outputs, as launch_batch would have copied them
    ((b, layers, heads, 2) sums, (b, streams) maxima). Its slot is taken until release(), or
    until this object is collected (a batch dropped unread gives its graph back)."""

    sums: torch.Tensor
    maxima: torch.Tensor
    slot: _Slot

    def release(self) -> None:
        self.slot.owner = None


class TailGraphs:
    """The cache of tail graphs (one per process: `TAILS`)."""

    def __init__(self, max_keys: int = MAX_KEYS):
        self.max_keys = max_keys
        self._graphs: OrderedDict[tuple, list[_Slot]] = OrderedDict()
        self._sighted: OrderedDict[tuple, None] = OrderedDict()  # keys seen once, not captured (the latest few)
        self._lock = threading.Lock()
        self.captures = 0  # graphs captured by this cache so far (benchmarks count recaptures)

    def clear(self) -> None:
        """Drop every graph whose outputs no batch is reading."""
        with self._lock:
            for key in [k for k, slots in self._graphs.items() if all(s.free() for s in slots)]:
                del self._graphs[key]
            self._sighted.clear()

    def replay(self, qs: list[torch.Tensor], ks: list[torch.Tensor], streams: list[torch.Tensor], causal: bool,
               scale: float) -> Replayed | None:
        """Replay the tail of a forward pass whose layers' queries and keys are qs, ks (every
        layer, in order; the queries of one shape and dtype, the keys of one shape, as the
        caller's plan makes them) and whose residual streams are `streams` (every stream, in
        order), or None where it must run op by op (first sighting, both graphs owned, a layout
        the table cannot describe, graphs disabled)."""
        if disabled is not None:
            return None
        with self._lock:  # threads sharing the cache must not take one slot twice
            return self._replay(qs, ks, streams, causal, scale)

    def _replay(self, qs: list[torch.Tensor], ks: list[torch.Tensor], streams: list[torch.Tensor], causal: bool,
                scale: float) -> Replayed | None:
        key = _layout(qs, ks, streams, causal, scale)
        if key is None:
            return None
        slots = self._graphs.get(key)
        if slots is None:
            if key not in self._sighted:  # a first sighting: op by op
                self._sighted[key] = None
                while len(self._sighted) > self.max_keys:
                    self._sighted.popitem(last=False)
                return None
            slots = self._new_key(key)
            if slots is None:
                return None
            del self._sighted[key]
        else:
            self._graphs.move_to_end(key)
        q0, k0, h0 = qs[0], ks[0], streams[0]
        layers = len(qs)
        offsets = _offsets([*qs, *ks, *streams], 2 * layers, _base(q0), _base(h0))
        if offsets is None:
            return None
        slot = next((s for s in slots if s.free()), None)
        if slot is None:
            if len(slots) >= 2:
                return None
            slot = _capture(q0, k0, h0, layers, len(streams), causal, scale, offsets)
            if slot is None:
                return None
            self.captures += 1
            slots.append(slot)
        if (offsets[:2 * layers] % slot.align_qk).any() or (offsets[2 * layers:] % slot.align_h).any():
            return None  # placed less aligned than the kernels were compiled for
        # The slot is free: its last replay was read (result() waited for it), or its batch was
        # dropped; then, if that replay's copy of the table has yet to run, it reads these
        # offsets, and its outputs are overwritten by this replay's, queued after it.
        slot.table[:] = offsets
        slot.graph.replay()
        b = q0.shape[0]
        sums = slot.sums.view(layers, b, *slot.sums.shape[1:]).transpose(0, 1)
        replayed = Replayed(sums, slot.maxima.transpose(0, 1), slot)
        slot.owner = weakref.ref(replayed)
        return replayed

    def _new_key(self, key: tuple) -> list[_Slot] | None:
        if len(self._graphs) >= self.max_keys:
            oldest = next((k for k, slots in self._graphs.items() if all(s.free() for s in slots)), None)
            if oldest is None:  # every kept graph is being read: no room
                return None
            del self._graphs[oldest]
        slots = self._graphs[key] = []
        return slots


_BASES: dict[tuple, torch.Tensor] = {}  # (device, dtype) -> the tensor table offsets count from


def _base(t: torch.Tensor) -> torch.Tensor:
    """A tensor of t's dtype on t's device that lives as long as the process: where the table's
    offsets count from (any place would do; a graph bakes it in)."""
    key = (t.device, t.dtype)
    base = _BASES.get(key)
    if base is None:
        base = _BASES[key] = torch.empty(1, dtype=t.dtype, device=t.device)
    return base


def _layout(qs: list[torch.Tensor], ks: list[torch.Tensor], streams: list[torch.Tensor], causal: bool,
            scale: float) -> tuple | None:
    """What a graph of this tail bakes in (its key), or None where one set of strides cannot
    describe the layers (the kernels take one for all queries, one for all keys, and contiguous
    streams of one shape)."""
    q0, k0, h0 = qs[0], ks[0], streams[0]
    if (len(set(map(_Tensor.stride, qs))) != 1 or len(set(map(_Tensor.stride, ks))) != 1
            or {*map(_dtype, ks)} != {q0.dtype} or len(set(map(_Tensor.size, streams))) != 1
            or len({*map(_dtype, streams)}) != 1 or not all(map(_Tensor.is_contiguous, streams))
            or max(q0.numel(), k0.numel(), h0.numel()) >= fused_rows.INT32_ELEMENTS):
        return None
    stream = torch.cuda.current_stream(q0.device).cuda_stream if q0.is_cuda else None
    return (stream, q0.device, q0.dtype, h0.dtype, causal, scale, len(qs), len(streams), q0.shape, q0.stride(),
            k0.shape, k0.stride(), h0.shape)


def _offsets(tensors: list[torch.Tensor], split: int, qk_base: torch.Tensor, h_base: torch.Tensor
             ) -> np.ndarray | None:
    """Each tensor's offset in elements from its base (the first `split` from qk_base, the rest
    from h_base), or None where one is not a whole number of elements away."""
    rel = np.fromiter(map(_Tensor.data_ptr, tensors), dtype=np.int64, count=len(tensors))
    rel[:split] -= qk_base.data_ptr()
    rel[split:] -= h_base.data_ptr()
    sizes = np.full(len(tensors), h_base.element_size(), dtype=np.int64)
    sizes[:split] = qk_base.element_size()
    if (rel % sizes).any():
        return None
    return rel // sizes


def _capture(q0: torch.Tensor, k0: torch.Tensor, h0: torch.Tensor, layers: int, count: int, causal: bool,
             scale: float, offsets: np.ndarray) -> _Slot | None:
    """Capture, as one graph, the table's copy to the device, the sums of `layers` layers
    shaped as q0, k0 and the maxima of `count` streams shaped as h0, all read through the
    table, and both copied into pinned host buffers of the slot's own (on a side stream, into
    the graph's own memory pool). The work runs once first, uncaptured, on the current stream
    (where the op-by-op tail allocates, so the allocator's state stays as it was): a capture
    cannot compile a kernel. A failure turns graphs off for the process (`disabled`) and leaves
    the tail to run op by op."""
    global disabled
    device = q0.device
    qk_base, h_base = _base(q0), _base(h0)
    align_qk = fused_rows.offset_alignment(offsets[:2 * layers], q0.element_size())
    align_h = fused_rows.offset_alignment(offsets[2 * layers:], h0.element_size())
    host_table = torch.empty(len(offsets), dtype=torch.int64, pin_memory=True)
    table = host_table.numpy()
    table[:] = offsets
    device_table = torch.empty(len(offsets), dtype=torch.int64, device=device)
    b, h = q0.shape[0], q0.shape[1]
    sums_host = torch.empty((layers * b, h, 2), dtype=torch.float64, pin_memory=True)
    maxima_host = torch.empty((count, b), dtype=h0.dtype, pin_memory=True)

    def tail() -> tuple[torch.Tensor, torch.Tensor]:
        device_table.copy_(host_table, non_blocking=True)
        sums = fused_rows.table_sums(q0, k0, qk_base, device_table, layers, align_qk, causal, scale)
        return sums, table_maxima(h0, h_base, device_table[2 * layers:], count, align_h)

    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream(device)
    current = torch.cuda.current_stream(device)
    try:
        tail()
        side.wait_stream(current)
        with torch.cuda.stream(side):
            graph.capture_begin(capture_error_mode="thread_local")
            try:
                sums, maxima = tail()
                sums_host.copy_(sums, non_blocking=True)
                maxima_host.copy_(maxima, non_blocking=True)
            finally:
                graph.capture_end()
    except Exception as e:  # capture errors have no common base (CUDA, Triton, allocator)
        disabled = f"tail graphs off ({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})"
        return None
    finally:
        current.wait_stream(side)
    return _Slot(graph, sums_host, maxima_host, table, align_qk, align_h, (host_table, device_table))


TAILS = TailGraphs()
