"""Replayed tail graphs (tail_graphs.py) against the same tail launched op by op.

A replay runs the op-by-op tail's kernels on the tensors of the forward pass at hand, found
through the graph's table, so every prompt's numbers must equal the op-by-op path's exactly:
for repeated prompts, for new prompts of a captured shape, with batches in flight (each
replay's outputs are read by its own batch only), after a batch dropped unread (its graph is
given back), with NaN appearing after a capture (the replay reads the new forward pass), and
the plain case only (padded and long batches run op by op). The op-by-op path is itself tested
against the eager reference (test_fast_path.py). A shape replays from its second forward pass
on, wherever the allocator puts its tensors. They need a GPU. The cache's own rules (when a
shape is captured, when a graph is taken and given back, what it is keyed by, what its table
holds) run on the CPU too, with a stand-in for the capture.
"""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch

from sheafscope import tail_graphs
from sheafscope.adapters import adapter_for
from sheafscope.capture_fast import FAST_ATTENTION, BatchStats, capture_batch, launch_batch
from sheafscope.errors import NonFiniteError
from tiny_models import build_tiny

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
FIELDS = ("offdiag_mass", "first_token_mass", "max_abs_hidden")
REPLAYS = tail_graphs.KERNEL_NAME


def _ids(n: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 128, (1, n), generator=torch.Generator().manual_seed(seed)).cuda()


@pytest.fixture()
def fresh_graphs():
    tail_graphs.TAILS.clear()
    tail_graphs.disabled = None
    yield tail_graphs.TAILS
    tail_graphs.TAILS.clear()


def _model(name: str = "llama"):
    model = build_tiny(name, attn_implementation=FAST_ATTENTION).to("cuda", torch.bfloat16)
    return model, adapter_for(model).blocks


def _op_by_op(model, blocks, prompt):
    return capture_batch(model, blocks, [prompt], tail_graph=False)[0]


def _assert_same(got, want, what) -> None:
    for f in FIELDS:
        np.testing.assert_array_equal(getattr(got, f), getattr(want, f), err_msg=f"{what}: {f}")


def _settle(model, blocks, prompt, want, tries: int = 4) -> None:
    """Run `prompt` until two runs in a row replay (the second and third: a first sighting runs
    op by op), then two in flight (so that both of the shape's graphs exist), then until two in
    a row replay again. Every run's numbers must equal `want`."""
    def streak() -> None:
        run = 0
        for _ in range(tries):
            batch = launch_batch(model, blocks, [prompt])
            run = run + 1 if batch.replayed is not None else 0
            _assert_same(batch.result()[0], want, "settling")
            if run == 2:
                return
        pytest.fail(f"no two replays in a row in {tries} runs of one prompt (graphs disabled: {tail_graphs.disabled})")

    streak()
    for batch in [launch_batch(model, blocks, [prompt]) for _ in range(2)]:
        _assert_same(batch.result()[0], want, "settling, in flight")
    streak()


@cuda
@pytest.mark.parametrize("name", ["llama", "qwen2", "gemma"])
def test_cuda_replays_equal_op_by_op(fresh_graphs, name):
    """A repeated prompt settles into replays; a new prompt of its shape replays the same
    graph; another shape in between runs op by op. Every result equals the op-by-op tail's."""
    model, blocks = _model(name)
    p1, p2, p3 = _ids(23, 1), _ids(23, 2), _ids(11, 3)
    want = {id(p): _op_by_op(model, blocks, p) for p in (p1, p2, p3)}
    _settle(model, blocks, p1, want[id(p1)])
    batch = launch_batch(model, blocks, [p2])
    assert batch.replayed is not None, "a new prompt of a settled shape did not replay"
    _assert_same(batch.result()[0], want[id(p2)], f"{name}: a new prompt, replayed")
    for p in (p3, p1, p3, p2, p1, p1, p2):  # mixed shapes: replayed or not, the same numbers
        _assert_same(capture_batch(model, blocks, [p])[0], want[id(p)], f"{name}: {p.shape[1]} tokens")
    assert tail_graphs.disabled is None, tail_graphs.disabled


@cuda
def test_cuda_batches_in_flight_read_their_own_replay(fresh_graphs):
    """Four batches launched before any is read: two replays own the two graphs of the shape,
    the other two run op by op; each batch's numbers are its own, also when read twice."""
    model, blocks = _model()
    prompts = [_ids(31, s) for s in (4, 5, 6, 7)]
    want = [_op_by_op(model, blocks, p) for p in prompts]
    _settle(model, blocks, prompts[0], want[0])
    stats = BatchStats()
    launched = [launch_batch(model, blocks, [p]) for p in prompts]
    assert launched[0].replayed is not None and launched[1].replayed is not None
    assert launched[2].replayed is None and launched[3].replayed is None  # both graphs owned
    for batch, w in zip(launched, want):
        _assert_same(batch.result(stats)[0], w, "in flight")
        _assert_same(batch.result()[0], w, "read twice")  # its own copy, not the graph's buffers
    assert stats.kernels[REPLAYS] == 2, dict(stats.kernels)


@cuda
def test_cuda_a_batch_dropped_unread_frees_its_graph(fresh_graphs):
    """A replayed batch that is dropped without result() gives its graph back: with the other
    graph still owned, the next batch replays the dropped one's, and reads its own numbers."""
    model, blocks = _model()
    p1, p2, p3 = _ids(29, 13), _ids(29, 14), _ids(29, 15)
    want = {id(p): _op_by_op(model, blocks, p) for p in (p1, p2, p3)}
    _settle(model, blocks, p1, want[id(p1)])
    first, second = launch_batch(model, blocks, [p1]), launch_batch(model, blocks, [p2])
    assert first.replayed is not None and second.replayed is not None
    del first
    gc.collect()
    third = launch_batch(model, blocks, [p3])
    assert third.replayed is not None, "the dropped batch's graph was not given back"
    _assert_same(second.result()[0], want[id(p2)], "second")
    _assert_same(third.result()[0], want[id(p3)], "third")


@cuda
def test_cuda_replay_reads_the_new_forward_pass(fresh_graphs):
    """NaN that appears after the shape was captured reaches the replayed numbers (NonFiniteError
    naming the layer), and the numbers are finite and equal again once the weight is restored."""
    model, blocks = _model()
    p = _ids(19, 9)
    want = _op_by_op(model, blocks, p)
    _settle(model, blocks, p, want)
    weight = model.model.layers[1].self_attn.q_proj.weight
    saved = weight[0, 0].item()
    with torch.no_grad():
        weight[0, 0] = float("nan")
    batch = launch_batch(model, blocks, [p])
    assert batch.replayed is not None
    with pytest.raises(NonFiniteError, match="layer 1"):
        batch.result()
    with torch.no_grad():
        weight[0, 0] = saved
    batch = launch_batch(model, blocks, [p])
    assert batch.replayed is not None
    _assert_same(batch.result()[0], want, "restored")


@cuda
def test_cuda_padded_and_long_batches_run_op_by_op(fresh_graphs):
    """Only the plain case is graphed: a padded batch and a prompt beyond the kept sums' length
    never replay, and their numbers are the op-by-op path's."""
    from sheafscope.capture_fast import FUSED_SUMS_MAX_ROWS

    model, blocks = _model()
    padded = [_ids(17, 10), _ids(9, 11)]
    want = capture_batch(model, blocks, padded, tail_graph=False)
    stats = BatchStats()
    for _ in range(4):
        for got, w in zip(capture_batch(model, blocks, padded, stats), want):
            _assert_same(got, w, "padded")
    long = _ids(FUSED_SUMS_MAX_ROWS + 1, 12)
    want_long = _op_by_op(model, blocks, long)
    for _ in range(4):
        _assert_same(capture_batch(model, blocks, [long], stats)[0], want_long, "long")
    assert stats.kernels[REPLAYS] == 0, dict(stats.kernels)


# -- the cache's rules, on the CPU (a stand-in for the capture; the numbers are the GPU tests') --
class _FakeGraph:
    def __init__(self, out: torch.Tensor):
        self.out, self.replays = out, 0

    def replay(self) -> None:
        self.replays += 1
        self.out.fill_(self.replays)


@pytest.fixture()
def fake_capture(monkeypatch, fresh_graphs):
    """tail_graphs._capture replaced by one that records its calls and returns a slot whose
    'graph' stamps its sums with its replay count."""
    made = []

    def capture(q0, k0, h0, layers, count, causal, scale, offsets):
        sums = torch.zeros((layers * q0.shape[0], q0.shape[1], 2), dtype=torch.float64)
        slot = tail_graphs._Slot(_FakeGraph(sums), sums, torch.zeros(count, h0.shape[0]), np.zeros_like(offsets),
                                 1, 1, ())
        made.append(slot)
        return slot

    monkeypatch.setattr(tail_graphs, "_capture", capture)
    return made


def _tensors(layers: int = 3, n: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    qs = [torch.randn(1, n, 4, 8, generator=g).transpose(1, 2) for _ in range(layers)]
    ks = [torch.randn(1, n, 2, 8, generator=g).transpose(1, 2) for _ in range(layers)]
    streams = [torch.randn(1, n, 32, generator=g) for _ in range(layers + 1)]
    return qs, ks, streams


def _replay(graphs, tensors, scale: float = 0.125):
    qs, ks, streams = tensors
    return graphs.replay(qs, ks, streams, True, scale)


def _places(tensors) -> list[int]:
    """Where the table must say each tensor lies: elements from the base of its dtype."""
    qs, ks, streams = tensors
    return [(t.data_ptr() - tail_graphs._base(t).data_ptr()) // t.element_size() for t in (*qs, *ks, *streams)]


def test_a_shape_is_captured_on_its_second_sighting_and_taken_until_read(fake_capture, fresh_graphs):
    """First sighting: op by op. Second: a graph, taken by its Replayed. While both of a key's
    graphs are taken, op by op; a released or dropped Replayed gives its graph back."""
    t = _tensors()
    assert _replay(fresh_graphs, t) is None and not fake_capture
    first = _replay(fresh_graphs, t)
    assert first is not None and len(fake_capture) == 1
    assert first.sums.shape == (1, 3, 4, 2)  # (b, layers, heads, 2), a view of the slot's buffer
    assert float(first.sums[0, 0, 0, 0]) == 1.0  # the slot's first replay wrote it
    second = _replay(fresh_graphs, t)
    assert second is not None and second.slot is not first.slot and len(fake_capture) == 2
    assert _replay(fresh_graphs, t) is None  # both taken
    first.release()
    third = _replay(fresh_graphs, t)
    assert third is not None and third.slot is fake_capture[0] and len(fake_capture) == 2
    del second
    gc.collect()
    fourth = _replay(fresh_graphs, t)
    assert fourth is not None and fourth.slot is fake_capture[1]
    assert fake_capture[1].graph.replays == 2 and fake_capture[0].graph.replays == 2


def test_a_graph_serves_any_tensors_of_its_layout_through_its_table(fake_capture, fresh_graphs):
    """New tensors of the captured layout (other addresses) replay the graph, with their
    places written into its table; the same memory read with other strides, another shape or
    another scale never replays it."""
    t = _tensors()
    _replay(fresh_graphs, t)
    kept = _replay(fresh_graphs, t)
    assert list(kept.slot.table) == _places(t)
    kept.release()
    other = _tensors(seed=1)
    again = _replay(fresh_graphs, other)
    assert again is not None and again.slot is fake_capture[0] and list(again.slot.table) == _places(other)
    again.release()
    qs, ks, streams = t
    # layer 1's queries: the same memory (same address) read with other strides
    restrided = [qs[0], qs[1].as_strided(qs[1].shape, (160, 1, 32, 4)), qs[2]]
    assert restrided[1].data_ptr() == qs[1].data_ptr()
    assert _replay(fresh_graphs, (restrided, ks, streams)) is None  # no one set of strides: never a graph
    assert _replay(fresh_graphs, (restrided, ks, streams)) is None
    for call in (lambda: _replay(fresh_graphs, _tensors(n=6)), lambda: _replay(fresh_graphs, t, scale=0.5)):
        for _ in range(2):  # also on a second sighting in a row
            got = call()
            assert got is None or got.slot is not fake_capture[0]
            if got is not None:
                got.release()
    assert _replay(fresh_graphs, t).slot is fake_capture[0]


def test_graphs_off_and_keys_evicted(fake_capture, fresh_graphs, monkeypatch):
    """With graphs disabled nothing replays; beyond MAX_KEYS shapes the oldest free one goes."""
    sets = [_tensors(n=5 + s) for s in range(tail_graphs.MAX_KEYS + 1)]
    for t in sets:
        _replay(fresh_graphs, t)
        _replay(fresh_graphs, t).release()
    assert len(fake_capture) == tail_graphs.MAX_KEYS + 1
    assert _replay(fresh_graphs, sets[-1]).slot is fake_capture[-1]
    assert _replay(fresh_graphs, sets[0]) is None  # evicted: a first sighting again
    monkeypatch.setattr(tail_graphs, "disabled", "tail graphs off (a test)")
    assert _replay(fresh_graphs, sets[-1]) is None
