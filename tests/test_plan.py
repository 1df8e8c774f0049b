"""`plan`: weights and activations per device from the config alone, against hand-computed
figures and the model built on the meta device."""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import psutil
import pytest
import torch

from sheafscope.cli import main
from sheafscope.errors import ConfigError
from sheafscope.models import twins
from sheafscope.models.catalog import find
from sheafscope.models.meta import meta_model
from sheafscope.plan import longest_tokens_bound, plan, require_fit

pytestmark = pytest.mark.unit

# Llama-3.1-70B's public config
V, D, L, H, KV, HD, FFN = 128256, 8192, 80, 64, 8, 128, 28672


def llama_parameters(V, D, L, KV, HD, FFN) -> int:
    """A Llama by hand: embedding, per layer q, k, v, o, gate/up/down and two norms, the final
    norm, and the untied output layer."""
    per_layer = D * D + 2 * D * KV * HD + D * D + 3 * D * FFN + 2 * D
    return V * D + L * per_layer + D + V * D


def test_the_hand_count_is_the_meta_models():
    config = find("llama-3.1-70b").build_config()
    model = meta_model(config, torch.bfloat16)
    assert sum(p.numel() for p in model.parameters()) == llama_parameters(V, D, L, KV, HD, FFN)
    small = find("llama-3.1-70b").build_config(num_hidden_layers=2, hidden_size=256, intermediate_size=640,
                                               num_attention_heads=8, num_key_value_heads=2, head_dim=32)
    assert sum(p.numel() for p in meta_model(small, torch.float32).parameters()) == \
        llama_parameters(V, 256, 2, 2, 32, 640)


def test_a_70b_plan_weights_are_the_hand_computed_bfloat16_bytes_and_need_two_80gb_gpus():
    n = llama_parameters(V, D, L, KV, HD, FFN)
    assert 141e9 < 2 * n < 141.2e9
    one = plan("llama-3.1-70b", dtype="bfloat16", device_map={"": 0}, gpu_memory="80GB",
               longest_prompt_tokens=512, batch_tokens=8192)
    assert one.n_parameters == n and one.weights_bytes == 2 * n
    assert [d.device for d in one.devices] == ["cuda:0"]
    assert one.devices[0].weights_bytes == 2 * n and one.devices[0].layers_run == L
    assert one.devices[0].capacity_bytes == 80 * 10**9 and one.devices[0].fits is False and not one.fits
    with pytest.raises(ConfigError, match=r"does not fit .*cuda:0 needs .*141\.1 GB of weights.*80\.0 GB.*--device-map auto"):
        require_fit(one)
    two = plan("llama-3.1-70b", dtype="bfloat16", device_map="auto", max_memory={0: "70GiB", 1: "70GiB"},
               gpu_memory="80GB", longest_prompt_tokens=512, batch_tokens=8192)
    assert [d.device for d in two.devices] == ["cuda:0", "cuda:1"]
    assert sum(d.weights_bytes for d in two.devices) == 2 * n
    assert sum(d.layers_run for d in two.devices) == L and all(d.layers_run > 30 for d in two.devices)
    assert all(d.fits for d in two.devices) and two.fits
    require_fit(two)
    # budgets as large as the GPUs leave the activations no room: said, with the fix
    tight = plan("llama-3.1-70b", dtype="bfloat16", device_map="sequential", max_memory={0: "80GB", 1: "80GB"},
                 longest_prompt_tokens=512, batch_tokens=8192)
    assert not tight.fits and all(d.weights_bytes <= 80e9 for d in tight.devices)
    with pytest.raises(ConfigError, match="lower --max-memory"):
        require_fit(tight)
    text = two.render()
    assert "cuda:1" in text and "141.1 GB of weights" in text and text.rstrip().endswith("fits")


def test_activations_count_the_batch_on_the_fast_path_and_n_squared_on_the_eager_path():
    kw = dict(dtype="bfloat16", device_map={"": 0}, gpu_memory="80GB")
    fast = [plan("random:llama-3.1-70b", longest_prompt_tokens=n, batch_tokens=n, **kw).devices[0].activation_bytes
            for n in (1024, 2048)]
    assert fast[0] < fast[1] <= 2 * fast[0]  # at most linear in tokens: no n x n matrix
    d = plan("random:llama-3.1-70b", longest_prompt_tokens=1024, batch_tokens=1024, **kw).devices[0]
    per_token_lower = 1024 * 3 * FFN * 2  # at least the MLP's intermediate activations
    assert d.activation_bytes > per_token_lower
    eager = [plan("random:llama-3.1-70b", longest_prompt_tokens=n, attention="eager", **kw).devices[0].activation_bytes
             for n in (1024, 2048)]
    assert eager[1] >= L * H * 2048**2 * 2  # every layer's attention maps, kept for the pass
    assert eager[1] > 3.5 * eager[0]  # quadratic


def test_a_small_models_plan_fits_on_the_cpu():
    p = plan("random:pythia-160m", device="cpu", longest_prompt_tokens=64)
    model = meta_model(find("pythia-160m").build_config(), torch.float32)
    assert p.weights_bytes == 4 * sum(q.numel() for q in model.parameters())
    (cpu,) = p.devices
    assert cpu.device == "cpu" and cpu.fits and p.fits and cpu.layers_run == 12
    assert cpu.capacity_bytes == pytest.approx(psutil.virtual_memory().available, rel=0.2)
    require_fit(p)
    both = plan("random:pythia-160m", device="cpu", longest_prompt_tokens=64, processes=2)
    assert both.devices[0].weights_bytes == 2 * cpu.weights_bytes  # two processes, two copies


@pytest.mark.skipif(psutil.virtual_memory().available > 300e9, reason="this machine could hold a 70B float32 twin")
def test_a_70b_twin_on_this_cpu_is_refused_before_a_weight_is_made(monkeypatch):
    from sheafscope import load_model

    def boom(*a, **k):
        raise AssertionError("the twin was built")

    monkeypatch.setattr(twins, "materialize", boom)
    with pytest.raises(ConfigError, match=r"'random:llama-3.1-70b' does not fit \(float32\): cpu needs 282\.2 GB"):
        load_model("random:llama-3.1-70b", device="cpu")


def test_a_gpu_that_is_not_here_must_be_budgeted():
    if torch.cuda.device_count() > 1:
        pytest.skip("this machine has GPUs")
    with pytest.raises(ConfigError, match=r"cuda:1 is not on this machine.*--gpu-memory .*--max-memory \(e\.g\. 1=70GiB\)"):
        plan("random:pythia-160m", device="cuda:1")


def test_longest_prompt_bound_is_at_least_the_tokens():
    from sheafscope.models.loading import twin_tokenizer

    texts = ["short", "héllo wörld, ein längerer Satz mit Umlauten"]
    tok, _ = twin_tokenizer(find("pythia-160m"))
    assert longest_tokens_bound(texts) >= max(len(tok(t)["input_ids"]) for t in texts)


@pytest.mark.parametrize("argv, rc, says", [
    (["-m", "random:pythia-160m", "--device", "cpu", "--max-tokens", "64"], 0, "fits"),
    (["-m", "random:llama-3.1-70b", "--dtype", "bfloat16", "--device-map", "auto", "--max-memory", "0=70GiB,1=70GiB",
      "--gpu-memory", "80GB", "--batch-tokens", "8192", "--max-tokens", "512"], 0, "cuda:1"),
    (["-m", "random:llama-3.1-70b", "--dtype", "bfloat16", "--device", "cpu", "--max-tokens", "512"], 1, "does NOT fit"),
    (["-m", "random:pythia-160m", "--processes", "0"], 2, "--processes"),
    (["-m", "no-such-model"], 2, "unknown model"),
])
def test_plan_command(argv, rc, says, capsys, tmp_path):
    if rc == 1 and psutil.virtual_memory().available > 150e9:
        pytest.skip("this machine could hold it")
    assert main(["plan", *argv]) == rc
    out = capsys.readouterr()
    assert says in (out.out if rc < 2 else out.err)
    if rc == 2:
        assert "Traceback" not in out.err and out.err.count("\n") == 1


@pytest.mark.parametrize("free_gb, rc, says", [(1000, 0, "yes"), (10, 1, "NO (free at")])
def test_plan_checks_the_offload_disk(free_gb, rc, says, capsys, tmp_path, monkeypatch):
    """Layers offloaded to disk need its free space at --offload-dir; the disk's room is the
    environment's, so it is set here rather than read from whatever machine runs the test."""
    free = free_gb * 10**9
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(total=2 * free, used=free, free=free))
    argv = ["-m", "random:llama-3.1-70b", "--dtype", "bfloat16", "--device-map", "auto", "--max-memory",
            "0=50GB,1=50GB", "--gpu-memory", "80GB", "--offload-dir", str(tmp_path), "--batch-tokens", "8192",
            "--max-tokens", "512"]
    assert main(["plan", *argv]) == rc
    disk = [line for line in capsys.readouterr().out.splitlines() if line.startswith("disk")]
    assert len(disk) == 1 and says in disk[0]
