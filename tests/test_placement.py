"""Models larger than one device: accelerate's device map, CPU and disk offload, checked before
loading; an offloaded model measures exactly what the in-memory one does."""

from __future__ import annotations

import collections

import numpy as np
import pytest
import torch

from sheafscope import analyze, load_model
from sheafscope.cli import main
from sheafscope.errors import ConfigError
from sheafscope.models import loading, twins
from sheafscope.models.placement import check_placement, parse_max_memory

PROMPTS = ["The capital of France is Paris.", "def add(a, b):\n    return a + b", "Sheaves glue local data into global sections."]


def _boom(*args, **kwargs):
    raise AssertionError("weights were read before the placement was refused")


@pytest.fixture
def no_loading(monkeypatch):
    """Any weight read fails the test: refusals must come first."""
    monkeypatch.setattr(loading, "_from_pretrained", _boom)
    monkeypatch.setattr(twins, "materialize", _boom)


# -- the acceptance test ------------------------------------------------------------------------
@pytest.mark.integration
def test_a_disk_offloaded_model_measures_what_the_in_memory_model_does(offline_model, tmp_path):
    """qwen2.5-coder-0.5b with a CPU budget that leaves most layers on disk: the same per-prompt
    masses and traces as the in-memory load, and the device map recorded."""
    in_memory = offline_model("qwen2.5-coder-0.5b")
    offloaded = load_model("qwen2.5-coder-0.5b", device="cpu", dtype="float32",
                           max_memory={"cpu": "1200MiB"}, offload_dir=str(tmp_path / "offload"))
    where = collections.Counter(offloaded.device_map.values())
    layers_on_disk = sum(1 for m, d in offloaded.device_map.items() if m.startswith("model.layers.") and d == "disk")
    assert where["disk"] and where["cpu"] and layers_on_disk > 24 // 2
    assert any(p.device.type == "meta" for p in offloaded.model.parameters())
    assert offloaded.device == torch.device("cpu")  # the embedding's execution device, not meta
    assert in_memory.device_map is None  # no map, no change
    a, b = analyze(in_memory, PROMPTS), analyze(offloaded, PROMPTS)
    for pa, pb in zip(a.prompts, b.prompts):
        assert pa.n_tokens == pb.n_tokens
        for key in ("offdiag_mass", "trace", "layer_trace"):
            np.testing.assert_allclose(getattr(pb, key), getattr(pa, key), rtol=1e-6, err_msg=key)
    np.testing.assert_allclose(b.wv_norm_sq, a.wv_norm_sq, rtol=1e-6)  # W_V read through the offload hooks
    assert b.info["device_map"] == offloaded.device_map and a.info["device_map"] is None
    assert b.info["device"] == "cpu"


@pytest.mark.integration
def test_the_eager_reference_runs_on_an_offloaded_model(tmp_path):
    spec_kw = dict(device="cpu", config_overrides=dict(num_hidden_layers=3, hidden_size=256, intermediate_size=512,
                                                       num_attention_heads=8, num_key_value_heads=2, head_dim=32))
    plain = load_model("random:llama-3.1-70b", **spec_kw)
    placed = load_model("random:llama-3.1-70b", device_map={
        "model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "disk", "model.layers.1": "cpu",
        "model.layers.2": "disk", "model.norm": "cpu", "lm_head": "disk"}, offload_dir=str(tmp_path), **spec_kw)
    for attention in ("fast", "eager"):
        a, b = analyze(plain, PROMPTS, attention=attention), analyze(placed, PROMPTS, attention=attention)
        for pa, pb in zip(a.prompts, b.prompts):
            np.testing.assert_array_equal(pb.trace, pa.trace)
            np.testing.assert_array_equal(pb.max_abs_hidden, pa.max_abs_hidden)
    assert placed.device_map["model.layers.0"] == "disk"


# -- refused before any weight is read ----------------------------------------------------------
@pytest.mark.unit
@pytest.mark.skipif(torch.cuda.device_count() > 3, reason="this machine has a cuda:3")
def test_a_device_map_naming_a_missing_device_is_refused(no_loading):
    for kw in (dict(device_map={"": "cuda:3"}), dict(max_memory={3: "1GiB", "cpu": "10GiB"})):
        with pytest.raises(ConfigError, match=r"names cuda:3, but this machine has .*use one of cpu"):
            load_model("qwen2.5-coder-0.5b", device="cpu", **kw)
        with pytest.raises(ConfigError, match="cuda:3"):
            check_placement("random:pythia-160m", **kw)


@pytest.mark.unit
def test_max_memory_below_one_layer_is_refused(no_loading):
    # pythia-160m's largest layer is its (untied) embedding: vocabulary x hidden x 4 bytes in float32
    embedding = 50304 * 768 * 4
    with pytest.raises(ConfigError) as e:
        load_model("random:pythia-160m", device="cpu", max_memory={"cpu": "20MiB"})
    msg = str(e.value)
    assert "below the largest layer" in msg and f"{embedding / 2**20:.0f} MiB" in msg and "cpu=20 MiB" in msg
    assert "embed" in msg and "at least" in msg  # the cause and the fix
    with pytest.raises(ConfigError, match="below the largest layer"):
        check_placement("random:pythia-160m", device="cpu", max_memory={"cpu": embedding - 1})


@pytest.mark.unit
def test_an_offload_dir_that_is_not_writable_is_refused(tmp_path, no_loading):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match=r"--offload-dir .* is not writable .*pass a directory"):
        load_model("random:pythia-160m", device="cpu", device_map={"": "disk"}, offload_dir=str(blocker / "offload"))


@pytest.mark.unit
def test_disk_offload_needs_an_offload_dir(no_loading):
    with pytest.raises(ConfigError, match="offloads 1 module.*to disk.*pass --offload-dir"):
        load_model("random:pythia-160m", device="cpu", device_map={"": "disk"})


@pytest.mark.unit
def test_a_device_map_must_place_every_weight_and_name_devices(no_loading):
    with pytest.raises(ConfigError, match="does not place every weight"):
        check_placement("random:pythia-160m", device_map={"gpt_neox.embed_in": "cpu"})
    with pytest.raises(ConfigError, match="choose one of auto, balanced, sequential"):
        check_placement("random:pythia-160m", device_map="everywhere")
    with pytest.raises(ConfigError, match="is not a device"):
        check_placement("random:pythia-160m", device_map={"": "floppy"})


@pytest.mark.unit
def test_without_a_placement_nothing_is_checked_or_built(monkeypatch):
    from sheafscope.models import meta

    monkeypatch.setattr(meta, "meta_model_for", _boom)
    assert check_placement("random:pythia-160m") is None


@pytest.mark.unit
def test_max_memory_syntax():
    assert parse_max_memory("0=70GiB,1=70GiB,cpu=100GiB") == {0: 70 * 2**30, 1: 70 * 2**30, "cpu": 100 * 2**30}
    assert parse_max_memory(" cuda:1 = 2GB , disk=0 ") == {1: 2 * 10**9, "disk": 0}
    for bad, why in [("cpu", "not DEVICE=SIZE"), ("cpu=lots", "not a size"), ("gpu0=1GiB", "not a device"),
                     ("0=1GiB,0=2GiB", "twice"), ("", "empty"), ("-1=1GiB", "not a device")]:
        with pytest.raises(ConfigError, match=why):
            parse_max_memory(bad)


@pytest.mark.unit
@pytest.mark.parametrize("argv, says", [
    (["--max-memory", "cpu=lots"], "argument --max-memory: cpu: 'lots' is not a size"),
    (["--max-memory", "cpu=20MiB"], "below the largest layer"),
    (["--device-map", "everywhere"], "invalid choice"),
])
def test_bad_placement_flags_exit_2_with_one_line(argv, says, capsys):
    for command in (["plan", "-m", "random:pythia-160m", "--device", "cpu"], ["run", "-m", "random:pythia-160m"]):
        if command[0] == "run" and "below" in says:
            continue  # run hands the (parsed) flags to the runner, which checks them with the model
        rc = main(command + argv)
        err = capsys.readouterr().err
        assert rc == 2 and says in err and "Traceback" not in err and err.count("\n") == 1, err


@pytest.mark.unit
def test_weights_are_never_read_from_the_meta_placeholder():
    from sheafscope.errors import SheafscopeError
    from sheafscope.measures.restriction import norms_sq
    from sheafscope.models.adapters import adapter_for
    from sheafscope.models.meta import meta_model_for

    model, _, _ = meta_model_for("random:pythia-160m", dtype="float32")  # no accelerate hook to load them
    with pytest.raises(SheafscopeError, match="on the meta device without an accelerate offload hook"):
        norms_sq(adapter_for(model))
