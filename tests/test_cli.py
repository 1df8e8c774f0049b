"""The command line end to end on tiny local checkpoints: outputs, errors a user can cause,
and runs that survive failure (kept results, resume, kill)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
import torch
import transformers

from sheafscope.cli import main
from tiny_models import TINY_CONFIGS

ROOT = Path(__file__).resolve().parents[1]


def _save_tiny(path: Path, name: str, tokenizer, *, scale_mlp: float = 1.0, **overrides) -> Path:
    cls_name, kwargs = TINY_CONFIGS[name]
    config = getattr(transformers, cls_name)(**{**kwargs, "vocab_size": len(tokenizer), **overrides})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    if scale_mlp != 1.0:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if ".mlp." in n and p.ndim == 2:
                    p.mul_(scale_mlp)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory, offline_model):
    # smollm2's tokenizer adds no special tokens: a one-word prompt is one token.
    tok = offline_model("smollm2-135m").tokenizer
    root = tmp_path_factory.mktemp("tiny")
    dirs = {
        "gpt2": _save_tiny(root / "gpt2", "gpt2", tok, n_positions=24),
        "llama": _save_tiny(root / "llama", "llama", tok),
        "neox": _save_tiny(root / "neox", "gpt_neox", tok),
        "overflow": _save_tiny(root / "overflow", "gpt2", tok, scale_mlp=3e3),
    }
    gptj = transformers.GPTJConfig(n_layer=1, n_head=2, n_embd=16, vocab_size=len(tok), n_positions=32, rotary_dim=4)
    transformers.AutoModelForCausalLM.from_config(gptj).save_pretrained(root / "gptj")
    tok.save_pretrained(root / "gptj")
    dirs["gptj"] = root / "gptj"
    return dirs


def _prompts(tmp_path: Path, lines: list[str], name="p.txt") -> str:
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n")
    return str(p)


def _run(args: list[str], capsys) -> tuple[int, str, str]:
    rc = main(["run", "--no-progress", *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


PROMPTS = ["The capital of France is Paris.", "Once upon a time in a land far away", "def f(n): return n + 1"]


def test_run_writes_results_with_the_documented_schema(tiny_dirs, tmp_path, capsys):
    out = tmp_path / "out"
    rc, stdout, _ = _run(["-m", str(tiny_dirs["llama"]), "-m", str(tiny_dirs["neox"]), "--prompts",
                       _prompts(tmp_path, PROMPTS), "--out", str(out)], capsys)
    assert rc == 0, stdout
    res = json.loads((out / "results.json").read_text())
    for key in ("sheafscope_version", "environment", "definitions", "options", "prompts", "models"):
        assert key in res
    assert res["prompts"] == PROMPTS
    for m in res["models"]:
        assert m["status"] == "ok"
        for key in ("spec", "architecture", "n_layers", "n_heads", "n_kv_heads", "head_dim", "dtype", "wv_norm_sq", "lstar"):
            assert key in m
        L, H = m["n_layers"], m["n_heads"]
        for p in m["prompts"]:
            assert len(p["offdiag_mass"]) == L and len(p["offdiag_mass"][0]) == H
            for l in range(L):
                for h in range(H):  # trace = mass x ||W_V||^2, layer trace = sum over heads
                    assert p["trace"][l][h] == pytest.approx(p["offdiag_mass"][l][h] * m["wv_norm_sq"][l][h], rel=1e-12)
                assert p["layer_trace"][l] == pytest.approx(sum(p["trace"][l]), rel=1e-12)
    llama = res["models"][0]
    assert (llama["n_heads"], llama["n_kv_heads"]) == (8, 2)
    assert (out / "summary.csv").exists() and (out / "analysis.json").exists()
    assert "L*grad" in stdout


def test_unknown_model_exits_2_with_the_fix(tmp_path, capsys):
    rc, _, err = _run(["-m", "no-such-model", "--out", str(tmp_path)], capsys)
    assert rc == 2
    assert "unknown model 'no-such-model'" in err and "smollm2-135m" in err


def test_missing_prompts_file(tiny_dirs, tmp_path, capsys):
    rc, _, err = _run(["-m", str(tiny_dirs["llama"]), "--prompts", str(tmp_path / "nope.txt"), "--out", str(tmp_path)], capsys)
    assert rc == 2 and "nope.txt not found" in err


def test_empty_prompt_in_jsonl(tiny_dirs, tmp_path, capsys):
    p = tmp_path / "p.jsonl"
    p.write_text('{"text": "fine prompt here"}\n{"text": "  "}\n')
    rc, _, err = _run(["-m", str(tiny_dirs["llama"]), "--prompts", str(p), "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and "p.jsonl:2" in err and "empty" in err


def test_unsupported_architecture_fails_alone_and_keeps_the_others(tiny_dirs, tmp_path, capsys):
    out = tmp_path / "out"
    rc, stdout, err = _run(["-m", str(tiny_dirs["gptj"]), "-m", str(tiny_dirs["llama"]), "--prompts",
                            _prompts(tmp_path, PROMPTS), "--out", str(out)], capsys)
    assert rc == 1
    models = json.loads((out / "results.json").read_text())["models"]
    assert [m["status"] for m in models] == ["failed", "ok"]
    msg = models[0]["error"]["message"]
    assert "'gptj' is not supported" in msg and "llama" in msg and "gpt_neox" in msg
    assert "FAILED" in stdout


@pytest.mark.parametrize("placing", [[], ["--max-memory", "cpu=8GiB"]], ids=["one-device", "placed"])
def test_a_model_that_cannot_be_loaded_fails_alone_and_keeps_the_others(tiny_dirs, tmp_path, capsys, monkeypatch,
                                                                        placing):
    """A hub id absent from the cache with the hub off fails at its load, also when placement
    flags make the runner check every model's room first."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "out"
    rc, _, err = _run(["-m", "no-org/no-model", "-m", str(tiny_dirs["llama"]), *placing, "--prompts",
                      _prompts(tmp_path, PROMPTS), "--out", str(out)], capsys)
    models = json.loads((out / "results.json").read_text())["models"]
    assert [m["status"] for m in models] == ["failed", "ok"]
    assert rc == 1 and "HF_HUB_OFFLINE" in models[0]["error"]["message"] and "1 of 2 model(s) failed" in err


def test_one_token_prompt_is_skipped_with_a_reason(tiny_dirs, tmp_path, capsys):
    out = tmp_path / "out"
    rc, _, _ = _run(["-m", str(tiny_dirs["llama"]), "--prompts", _prompts(tmp_path, ["Hello", PROMPTS[0]]), "--out", str(out)], capsys)
    assert rc == 0
    m = json.loads((out / "results.json").read_text())["models"][0]
    assert len(m["prompts"]) == 1
    assert any("prompt 1" in w and "at least 2" in w for w in m["warnings"])
    rc, _, err = _run(["-m", str(tiny_dirs["llama"]), "--prompts", _prompts(tmp_path, ["Hello"]), "--out", str(tmp_path / "o2")], capsys)
    assert rc == 1 and "no prompt could be measured" in err + _run_models_error(tmp_path / "o2")


def _run_models_error(out: Path) -> str:
    return json.loads((out / "results.json").read_text())["models"][0]["error"]["message"]


def test_prompt_longer_than_context(tiny_dirs, tmp_path, capsys):
    long = " ".join(["word"] * 60)
    out = tmp_path / "out"
    rc, _, _ = _run(["-m", str(tiny_dirs["gpt2"]), "--prompts", _prompts(tmp_path, [long, PROMPTS[0]]), "--out", str(out)], capsys)
    assert rc == 0
    m = json.loads((out / "results.json").read_text())["models"][0]
    assert any("24-token context" in w and "--max-tokens" in w for w in m["warnings"])
    rc, stdout, _ = _run(["-m", str(tiny_dirs["gpt2"]), "--prompts", _prompts(tmp_path, [long, PROMPTS[0]]),
                          "--max-tokens", "24", "--out", str(tmp_path / "t")], capsys)
    assert rc == 0
    m = json.loads((tmp_path / "t" / "results.json").read_text())["models"][0]
    (cut, kept) = m["prompts"]
    assert (cut["truncated"], cut["n_tokens"]) == (True, 24) and not kept["truncated"] and kept["n_tokens"] < 24
    said = "1 of 2 prompt(s) truncated to their first 24 tokens (--max-tokens)"
    assert said in m["warnings"] and said in stdout


def test_float16_overflow_is_reported_not_carried(tiny_dirs, tmp_path, capsys):
    out = tmp_path / "out"
    rc, _, _ = _run(["-m", str(tiny_dirs["overflow"]), "-m", str(tiny_dirs["llama"]), "--dtype", "float16",
                     "--prompts", _prompts(tmp_path, PROMPTS), "--out", str(out)], capsys)
    assert rc == 1
    models = json.loads((out / "results.json").read_text())["models"]
    assert models[0]["status"] == "failed"
    assert "NaN/Inf" in models[0]["error"]["message"] and "--dtype bfloat16" in models[0]["error"]["message"]
    assert models[1]["status"] == "ok"


def test_gemma3_270m_overflows_in_float16(tmp_path):
    """DESIGN.md: gemma-3-270m overflows to NaN in float16; the tool must say so."""
    from sheafscope import analyze, load_model
    from sheafscope.errors import NonFiniteError

    loaded = load_model("gemma3-270m", device="cpu", dtype="float16")
    with pytest.raises(NonFiniteError, match="float16"):
        analyze(loaded, ["The capital of France is Paris, which is known for the Eiffel Tower."])


def test_rerun_skips_complete_models_and_redoes_the_rest(tiny_dirs, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["-m", str(tiny_dirs["llama"]), "-m", str(tiny_dirs["neox"]), "--prompts", _prompts(tmp_path, PROMPTS), "--out", str(out)]
    assert _run(args, capsys)[0] == 0
    files = sorted((out / "models").glob("*.json"))
    assert len(files) == 2
    first = json.loads((out / "results.json").read_text())["models"]
    keep, redo = files
    stamp = keep.stat().st_mtime_ns
    redo.unlink()
    assert _run(args, capsys)[0] == 0
    assert keep.stat().st_mtime_ns == stamp  # not recomputed
    again = json.loads((out / "results.json").read_text())["models"]
    assert [m["prompts"] for m in again] == [m["prompts"] for m in first]


def test_killed_run_resumes_to_identical_numbers(tiny_dirs, tmp_path):
    """Kill a suite part-way (SIGKILL, nothing flushed), rerun, compare with an uninterrupted run."""
    prompts = _prompts(tmp_path, PROMPTS)
    specs = [str(tiny_dirs[k]) for k in ("llama", "neox", "gpt2")]
    suite = tmp_path / "suite.toml"
    suite.write_text('name = "t"\nprompts = "%s"\n' % prompts + "".join(f'[[models]]\nspec = "{s}"\n' for s in specs))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "sheafscope.cli", "run", "--no-progress", "--suite", str(suite)]
    killed = tmp_path / "killed"
    proc = subprocess.Popen([*cmd, "--out", str(killed)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list((killed / "models").glob("*.json")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = list((killed / "models").glob("*.json"))
    assert 1 <= len(done_before) < 3, "the kill should land part-way"
    assert not (killed / "results.json").exists()
    assert subprocess.run([*cmd, "--out", str(killed)], env=env, capture_output=True).returncode == 0
    clean = tmp_path / "clean"
    assert subprocess.run([*cmd, "--out", str(clean)], env=env, capture_output=True).returncode == 0
    a = json.loads((killed / "results.json").read_text())["models"]
    b = json.loads((clean / "results.json").read_text())["models"]
    assert [m["spec"] for m in a] == specs
    assert [m["prompts"] for m in a] == [m["prompts"] for m in b]
    assert [m["wv_norm_sq"] for m in a] == [m["wv_norm_sq"] for m in b]


def test_stdout_ends_with_the_verdict_and_the_report_and_quiet_is_quiet(tiny_dirs, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["run", "--quiet", "--device", "cpu", "-m", str(tiny_dirs["llama"]), "-m", str(tiny_dirs["neox"]),
               "--prompts", _prompts(tmp_path, PROMPTS), "--out", str(out)])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    mape = json.loads((out / "analysis.json").read_text())["mape"]
    lines = cap.out.rstrip("\n").splitlines()
    assert lines[-2] == f"Verdict: {mape['verdict']}, MAPE {mape['overall']['mape_of_L']:.1f} % of L, n = 2"
    assert lines[-1] == f"Report: {out / 'report.html'}" and (out / "report.html").is_file()
    assert cap.err == "", cap.err  # --quiet: no start line, no bars, no library noise
    assert not transformers.utils.logging.is_progress_bar_enabled()  # transformers' own bars are off too


def test_verdict_line_when_no_trained_model_ran(tmp_path):
    from sheafscope.outputs.console import report_line, verdict_line

    assert verdict_line(tmp_path, []).startswith("not available")
    (tmp_path / "analysis.json").write_text(json.dumps({"warnings": []}))
    assert verdict_line(tmp_path, [{"status": "ok", "init": "random"}]).startswith("none: no trained model ran")
    assert verdict_line(tmp_path, [{"status": "failed"}]) == "none: no model ran"
    assert report_line(tmp_path).startswith("not written")


def test_a_suites_options_apply_unless_the_command_line_gives_them(tiny_dirs, tmp_path):
    prompts = _prompts(tmp_path, PROMPTS)
    suite = tmp_path / "suite.toml"
    suite.write_text(f'name = "t"\nprompts = "{prompts}"\n[options]\ndtype = "bfloat16"\nrestriction_map = "ov"\n'
                     f'[[models]]\nspec = "{tiny_dirs["llama"]}"\n')
    for extra, dtype in (([], "bfloat16"), (["--dtype", "float32"], "float32")):
        out = tmp_path / f"out-{dtype}"
        assert main(["run", "--quiet", "--suite", str(suite), "--out", str(out), *extra]) == 0
        res = json.loads((out / "results.json").read_text())
        assert res["options"]["dtype"] == dtype and res["models"][0]["dtype"] == dtype
        assert res["options"]["restriction_map"] == "ov" and res["models"][0]["restriction_map"] == "ov"


def test_a_grid_suite_runs_each_condition_and_reports_the_spread_of_lstar(tiny_dirs, tmp_path, capsys):
    """The robustness suite's mechanism on a tiny model: 2 dtypes x 2 prompt sets (and 8-bit,
    left out on a machine without a GPU); the spread is checked against each condition's results."""
    a, b = _prompts(tmp_path, PROMPTS), tmp_path / "b.txt"
    b.write_text("Water boils at 100 degrees.\nThe quick brown fox jumps over the lazy dog again and again.\n")
    suite = tmp_path / "grid.toml"
    suite.write_text(f'name = "g"\n[grid]\ndtype = ["float32", "bfloat16"]\nprompts = ["{a}", "{b}"]\n'
                     'quantize = ["none", "8bit"]\n'
                     + f'[[models]]\nspec = "{tiny_dirs["llama"]}"\n')
    out = tmp_path / "out"
    assert main(["run", "--no-progress", "--suite", str(suite), "--out", str(out)]) == 0
    cap = capsys.readouterr()
    table = json.loads((out / "robustness.json").read_text())
    names = [c["name"] for c in table["conditions"]]
    assert len(names) == 4 and {s["why"] for s in table["skipped"]} <= {"bitsandbytes quantization needs a CUDA GPU",
                                                                          "bitsandbytes is not installed"}
    assert len(table["skipped"]) == 4 and "left out" in cap.err
    for spec in (str(tiny_dirs["llama"]),):
        seen = []
        for name, cond in zip(names, table["conditions"]):
            res = json.loads((out / name / "results.json").read_text())
            assert res["options"]["dtype"] == cond["dtype"]
            seen.append(next(m for m in res["models"] if m["spec"] == spec)["lstar"]["diff"]["mean"])
        assert table["spread"][spec]["diff"]["spread"] == pytest.approx(max(seen) - min(seen), abs=0)
    # one trained model: no condition judges any claim, so nothing flips and each says why
    assert table["verdict_flips"] == {} and set(table["not_judged"]["formula"]) == set(names)
    assert all("at least 3" in why for why in table["not_judged"]["formula"].values())
    assert (out / "figures" / "robustness.png").stat().st_size > 1000 and "Verdict flips: none" in cap.out
