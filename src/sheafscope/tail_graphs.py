"""CUDA graphs of the work a short forward pass leaves for after it: replayed, not relaunched.

On a GPU a forward pass of a few hundred tokens is bound by the host: the device waits for
Python. After such a forward pass the fast path queues its tail: the fused sums kernel over
the held layers (`fused_rows.fused_stats`), the residual streams' maxima, and both copies to
the host. Launched op by op right after a forward pass, whose host work has left the caches
cold, that costs ~0.45 ms of host time; replayed as one CUDA graph, ~0.15 ms
(benchmarks/launch_cost.py, an H200 host). Within a forward pass, with the key and the
checks, a replay saves ~0.16 ms (benchmarks/capture_overhead.py, b against b/op-by-op).

A graph reads the tensors at the addresses it was captured with. A repeated forward pass of
one shape makes its queries, keys and residual streams at the same addresses (the caching
allocator hands out the same blocks), so graphs are kept by those addresses, with every
shape, stride and dtype that the kernels read, and replayed only when all of them match:
the same kernels then read the new forward pass's tensors, and give what relaunching them
would, bit for bit. A shape is captured on its second forward pass in a row (a first sighting
runs op by op, which also compiles the kernel and fills fused_rows' offset tables; a graph
cannot do either while capturing).

So this pays where one shape repeats: many prompts of one length (fixed-length or truncated
inputs, a benchmark's repeats), one at a time or in equal-length batches. The allocator settles
after a few forward passes of one shape and then keeps its addresses; forward passes of other
shapes in between move them, so a stream of prompts of mixed lengths rarely replays
(benchmarks/tail_graph_hits.py shows both). A miss costs a few address reads (a pre-key of
four), not the full key.

Each graph writes into pinned host buffers of its own. With batches pipelined (batch i + 1
is launched before batch i's result is read) one set would be overwritten before it is read,
so each key has up to two graphs, each taken by the batch that replayed it until that batch's
result() has copied its numbers out (or the batch is gone); with both taken, the tail runs op
by op.

Only the plain case is graphed: one planned fused route for every layer, sums kept (up to
capture_fast.FUSED_SUMS_MAX_ROWS rows), no mask, no padding. Everything else (padded batches,
long prompts, the lse and dense routes) runs op by op as before.
"""

from __future__ import annotations

import operator
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

import torch

from sheafscope import fused_rows

MAX_KEYS = 4  # shapes kept; each holds up to two graphs, their pinned outputs and a small pool
KERNEL_NAME = "tail-graph"  # the kernel counter a replayed tail adds (one per forward pass)

disabled: str | None = None  # why graphs are off for the rest of the process (a capture failed)

_Tensor = torch.Tensor
_dtype = operator.attrgetter("dtype")


@dataclass(eq=False)
class _Slot:
    """One captured tail and its outputs: sums (layers * b, heads, 2) float64 and the streams'
    maxima (streams, b) in the hidden states' dtype, pinned on the host."""

    graph: Any  # torch.cuda.CUDAGraph
    sums: torch.Tensor
    maxima: torch.Tensor
    keep: tuple  # device tensors made outside the graph that it reads
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
        self._pres: set[tuple] = set()  # the kept graphs' pre-keys (`pre` in replay)
        self._last_pre: tuple | None = None
        self._lock = threading.Lock()
        self.captures = 0  # graphs captured by this cache so far (benchmarks count recaptures)

    def clear(self) -> None:
        """Drop every graph whose outputs no batch is reading."""
        with self._lock:
            for key in [k for k, slots in self._graphs.items() if all(s.free() for s in slots)]:
                del self._graphs[key]
            self._pres = {k[0] for k in self._graphs}
            self._last_pre = None

    def replay(self, qs: list[torch.Tensor], ks: list[torch.Tensor], streams: list[torch.Tensor],
               stats: Callable[[], torch.Tensor], causal: bool, scale: float) -> Replayed | None:
        """Replay the tail of a forward pass whose layers' queries and keys are qs, ks (every
        layer, in order) and whose residual streams are `streams` (every stream, in order), or
        None where it must run op by op (first sighting, both graphs owned, graphs disabled).
        `stats()` queues the sums (layers * b, heads, 2) as the op-by-op path does; it is what
        a capture records."""
        if disabled is not None:
            return None
        with self._lock:  # threads sharing the cache must not take one slot twice
            return self._replay(qs, ks, streams, stats, causal, scale)

    def _replay(self, qs: list[torch.Tensor], ks: list[torch.Tensor], streams: list[torch.Tensor],
                stats: Callable[[], torch.Tensor], causal: bool, scale: float) -> Replayed | None:
        q0, k0, h0 = qs[0], ks[0], streams[0]
        # A few addresses first: where they match neither a kept graph nor the previous forward
        # pass (a new shape, or one the allocator placed elsewhere), this is not a replay, and
        # the full key (four attributes of ~100 tensors) is not built.
        pre = (q0.data_ptr(), k0.data_ptr(), h0.data_ptr(), streams[-1].data_ptr(), q0.shape, k0.shape,
               len(qs), len(streams))
        if pre not in self._pres and pre != self._last_pre:
            self._last_pre = pre
            return None
        tensors = [*qs, *ks, *streams]
        # The plan gave every layer's queries and keys one shape; the streams' sizes are checked
        # here, and the stream, as a graph's replays must queue behind one another (one pool,
        # one set of outputs).
        stream = torch.cuda.current_stream(q0.device).cuda_stream if q0.is_cuda else None
        key = (pre, stream, q0.device, q0.dtype, h0.dtype, causal, scale,
               *map(_Tensor.data_ptr, tensors),
               *map(_Tensor.stride, tensors), *map(_Tensor.size, streams), *map(_dtype, tensors))
        slots = self._graphs.get(key)
        if slots is None:
            if pre != self._last_pre:  # like a kept graph's, but not the same: a first sighting
                self._last_pre = pre
                return None
            slots = self._new_key(key)
            if slots is None:
                return None
        else:
            self._graphs.move_to_end(key)
        n_layers, b = len(qs), q0.shape[0]
        slot = next((s for s in slots if s.free()), None)
        if slot is None:
            if len(slots) >= 2:
                return None
            # the kernel reads fused_rows' offset table, made outside the graph: the slot keeps
            # it alive, or a later clear of fused_rows' cache would leave the graph reading freed memory
            tables = fused_rows._offset_table(qs, ks) if n_layers > 1 else ()
            slot = _capture(streams, stats, (n_layers * b, q0.shape[1], 2), tables)
            if slot is None:
                return None
            self.captures += 1
            slots.append(slot)
        slot.graph.replay()
        sums = slot.sums.view(n_layers, b, *slot.sums.shape[1:]).transpose(0, 1)
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
        self._pres = {k[0] for k in self._graphs}
        return slots


def _capture(streams: list[torch.Tensor], stats: Callable[[], torch.Tensor], sums_shape: tuple,
             keep: tuple) -> _Slot | None:
    """Capture stats() and the streams' maxima, each copied into pinned host buffers of the
    slot's own, as one graph (on a side stream, into the graph's own memory pool). The work
    runs once first, uncaptured, on the current stream (where the op-by-op tail allocates, so
    the allocator's state, and with it the next forward pass's addresses, stay as they were): a
    capture cannot compile a kernel or copy a table to the device, and that run leaves neither
    to do. A failure turns graphs off for the process (`disabled`) and leaves the tail to run
    op by op."""
    global disabled
    from sheafscope.capture_fast import _max_abs

    def tail() -> tuple[torch.Tensor, torch.Tensor]:
        # one reduction per stream: nothing stacked, so the pool stays small; in a replay the
        # launches cost the host nothing
        return stats(), torch.stack([_max_abs(h, (-2, -1)) for h in streams])

    device = streams[0].device
    sums_host = torch.empty(sums_shape, dtype=torch.float64, pin_memory=True)
    maxima_host = torch.empty((len(streams), streams[0].shape[0]), dtype=streams[0].dtype, pin_memory=True)
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
                if sums.shape != sums_host.shape or maxima.shape != maxima_host.shape:
                    raise RuntimeError(f"tail shapes {tuple(sums.shape)}, {tuple(maxima.shape)} are not "
                                       f"{tuple(sums_host.shape)}, {tuple(maxima_host.shape)}")
                sums_host.copy_(sums, non_blocking=True)
                maxima_host.copy_(maxima, non_blocking=True)
            finally:
                graph.capture_end()
    except Exception as e:  # capture errors have no common base (CUDA, Triton, allocator)
        disabled = f"tail graphs off ({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})"
        return None
    finally:
        current.wait_stream(side)
    return _Slot(graph, sums_host, maxima_host, keep)


TAILS = TailGraphs()
