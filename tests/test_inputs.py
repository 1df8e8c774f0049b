"""Every option and input a user can get wrong is refused before any model loads: exit 2, one
line on stderr naming the cause and the fix, no traceback, no --out created, earlier results
untouched. Prompt files: UTF-8 with or without a BOM, anything else named with its byte offset.
`sheafscope report` on a damaged results.json. None of these tests loads a model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

import sheafscope.models.loading as loading
import sheafscope.runner as runner
from sheafscope.cli import main
from sheafscope.errors import PromptError
from sheafscope.prompts import load_prompts

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["The capital of France is Paris.", "Once upon a time in a land far away"]
EARLIER = '{"earlier": "results"}\n'


@pytest.fixture(autouse=True)
def no_model_loads(monkeypatch):
    """A refused run must stop before the runner and before any model loads."""
    def refuse(*a, **k):
        raise AssertionError("a run that should have been refused reached the runner / model loading")

    monkeypatch.setattr(runner, "run", refuse)
    monkeypatch.setattr(loading, "load_model", refuse)


@pytest.fixture
def ws(tmp_path):
    """A prompts file, an --out holding an earlier run's results.json, a fresh --out path."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    old = tmp_path / "old"
    old.mkdir()
    (old / "results.json").write_text(EARLIER)
    ckpt = tmp_path / "ckpt"  # a local checkpoint directory: classified without loading it
    ckpt.mkdir()
    (ckpt / "config.json").write_text('{"model_type": "llama"}')
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    return {"root": tmp_path, "prompts": str(prompts), "old": old, "new": tmp_path / "new", "ckpt": str(ckpt), "gguf": str(gguf)}


def refused(args: list[str], ws, capsys, *words: str) -> str:
    """Run `sheafscope run ARGS` into a fresh --out and into one with earlier results; both must
    be refused with exit 2 and one line naming WORDS, leaving nothing behind."""
    for out in (ws["new"], ws["old"]):
        full = ["run", "--no-progress", *args]
        if "--out" not in args:
            full += ["--out", str(out)]
        if "--prompts" not in args:
            full += ["--prompts", ws["prompts"]]
        rc = main(full)
        cap = capsys.readouterr()
        err = cap.err
        assert rc == 2, (rc, err)
        assert "Traceback" not in err and "Traceback" not in cap.out
        assert len(err.strip().splitlines()) == 1, f"want one line on stderr, got:\n{err}"
        assert err.startswith("sheafscope: error:"), err
        for w in words:
            assert w.lower() in err.lower(), f"{w!r} not in: {err}"
        assert not ws["new"].exists(), "a refused run created --out"
        assert sorted(p.name for p in ws["old"].iterdir()) == ["results.json"]
        assert (ws["old"] / "results.json").read_text() == EARLIER
    return err


# --------------------------------------------------------------------------- numeric options


@pytest.mark.parametrize("value", ["0", "1", "-5", "two", "2.5"])
def test_max_tokens_below_2_or_not_an_int(value, ws, capsys):
    err = refused(["-m", "smollm2-135m", "--max-tokens", value], ws, capsys, "--max-tokens", "integer >= 2")
    assert value in err and "omit it" in err


@pytest.mark.parametrize("value", ["0", "-1", "many"])
def test_batch_tokens_below_1(value, ws, capsys):
    refused(["-m", "smollm2-135m", "--batch-tokens", value], ws, capsys, "--batch-tokens", "integer >= 1", value)


def test_old_batch_size_option_is_unknown(ws, capsys):
    refused(["-m", "smollm2-135m", "--batch-size", "0"], ws, capsys, "unrecognized arguments: --batch-size")


@pytest.mark.parametrize("value", ["x", "1.5", "-1", str(2**63)])
def test_seed_must_be_a_non_negative_int(value, ws, capsys):
    refused(["-m", "random:gpt2", "--seed", value], ws, capsys, "--seed", "integer from 0 to")


def test_bad_choice_is_one_line(ws, capsys):
    refused(["-m", "smollm2-135m", "--dtype", "float64"], ws, capsys, "--dtype", "float64", "--help")


# --------------------------------------------------------------------------- devices


@pytest.mark.parametrize("value", ["tpu", "gpu", "cuda:x", "cpu:1", "cuda:-1"])
def test_device_that_is_no_device(value, ws, capsys):
    refused(["-m", "smollm2-135m", "--device", value], ws, capsys, f"--device {value}", "not a device name", "cpu")


def test_cuda_index_beyond_the_gpus(ws, capsys):
    refused(["-m", "smollm2-135m", "--device", "cuda:99"], ws, capsys, "--device cuda:99", "cuda")


def test_cuda_without_a_gpu(ws, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU: `--device cuda` is valid here")
    refused(["-m", "smollm2-135m", "--device", "cuda"], ws, capsys, "no CUDA GPU", "--device cpu")


# --------------------------------------------------------------------------- models


def test_duplicate_spec(ws, capsys):
    refused(["-m", "smollm2-135m", "-m", "random:gpt2", "-m", "smollm2-135m"], ws, capsys,
            "'smollm2-135m' is given twice", "MAPE")


def test_duplicate_twin_spelled_two_ways(ws, capsys):
    refused(["--init", "random", "-m", "gpt2", "-m", "random:gpt2"], ws, capsys, "'random:gpt2' is given twice", "also as 'gpt2'")


def test_duplicate_directory_by_two_paths(ws, capsys):
    refused(["-m", ws["ckpt"], "-m", ws["ckpt"] + "/."], ws, capsys, "given twice")


def test_a_model_and_its_twin_are_not_duplicates(ws, capsys, monkeypatch):
    # Both pass every check and reach the runner (stubbed here): exit 0 from the stub's outcome.
    seen = {}

    def fake_run(entries, prompts, opts, out, **kw):
        seen["specs"] = [e.spec for e in entries]
        raise KeyboardInterrupt  # stop here: validation passed

    monkeypatch.setattr(runner, "run", fake_run)
    rc = main(["run", "--no-progress", "-m", "smollm2-135m", "-m", "random:smollm2-135m", "--prompts", ws["prompts"],
               "--out", str(ws["new"])])
    assert rc == 130 and seen["specs"] == ["smollm2-135m", "random:smollm2-135m"]
    capsys.readouterr()


@pytest.mark.parametrize("spec, kind", [("smollm2-135m", "offline-package"), ("random:gpt2", "random-init"), ("gguf", "gguf-file")])
def test_quantize_where_it_cannot_apply(spec, kind, ws, capsys):
    spec = ws["gguf"] if spec == "gguf" else spec
    refused(["-m", spec, "--quantize", "4bit"], ws, capsys, "--quantize 4bit does not apply", kind, "drop --quantize")


def test_quantize_with_init_random(ws, capsys):
    refused(["--init", "random", "-m", "gpt2", "--quantize", "8bit"], ws, capsys, "--quantize 8bit does not apply", "random-init")


def test_quantize_in_a_suite_of_offline_models(ws, capsys):
    refused(["--suite", "offline", "--quantize", "4bit"], ws, capsys, "does not apply", "offline-package")


def test_a_suite_and_models_together_are_refused(ws, capsys):
    # The suite names its own models: silently running only the --model ones would lose it.
    refused(["-m", "smollm2-135m", "--suite", "offline"], ws, capsys, "argument --suite: not allowed with argument --model")


def test_truncated_gguf_is_refused_before_loading(ws, capsys):
    refused(["-m", ws["gguf"]], ws, capsys, "m.gguf")


def test_directory_without_config(ws, capsys):
    (ws["root"] / "empty").mkdir()
    refused(["-m", str(ws["root"] / "empty")], ws, capsys, "no config.json")


def test_unknown_model(ws, capsys):
    refused(["-m", "no-such-model"], ws, capsys, "unknown model 'no-such-model'", "smollm2-135m")


# --------------------------------------------------------------------------- prompts


def test_prompts_directory(ws, capsys):
    refused(["-m", "smollm2-135m", "--prompts", str(ws["root"])], ws, capsys, "is a directory", ".txt")


def test_prompts_missing(ws, capsys):
    refused(["-m", "smollm2-135m", "--prompts", str(ws["root"] / "nope.txt")], ws, capsys, "nope.txt not found")


def test_prompts_not_utf8(ws, capsys):
    p = ws["root"] / "latin1.txt"
    p.write_bytes("first prompt here\nCaf\u00e9 au lait, s'il vous pla\u00eet\n".encode("latin-1"))
    err = refused(["-m", "smollm2-135m", "--prompts", str(p)], ws, capsys, "latin1.txt", "not UTF-8", "offset 21", "line 2")
    assert "0xe9" in err


def test_prompts_unreadable(ws, capsys):
    p = ws["root"] / "secret.txt"
    p.write_text("a prompt that nobody may read\n")
    p.chmod(0)
    try:
        try:
            p.read_bytes()
            pytest.skip("running as root: file permissions are not enforced, a mode-000 file is readable")
        except PermissionError:
            pass
        refused(["-m", "smollm2-135m", "--prompts", str(p)], ws, capsys, "secret.txt", "cannot be read", "permission")
    finally:
        p.chmod(0o644)


def test_empty_prompts_file(ws, capsys):
    p = ws["root"] / "blank.txt"
    p.write_text("\n  \n")
    refused(["-m", "smollm2-135m", "--prompts", str(p)], ws, capsys, "holds no prompt")


def test_utf8_bom_is_dropped_in_txt(tmp_path):
    p = tmp_path / "bom.txt"
    p.write_bytes("\ufeffFirst prompt\r\nSecond prompt\r\n".encode("utf-8"))
    assert load_prompts(p)[0] == ["First prompt", "Second prompt"]


def test_utf8_bom_is_accepted_in_jsonl(tmp_path):
    p = tmp_path / "bom.jsonl"
    p.write_bytes(('\ufeff{"text": "First prompt"}\n{"text": "Second \u00fcml\u00e4ut"}\n').encode("utf-8"))
    assert load_prompts(p)[0] == ["First prompt", "Second \u00fcml\u00e4ut"]


def test_jsonl_lines_split_at_newlines_only(tmp_path):
    # A JSON string may hold U+2028 unescaped; str.splitlines would cut the line there.
    p = tmp_path / "ls.jsonl"
    p.write_text(json.dumps({"text": "one\u2028two"}, ensure_ascii=False) + "\n", encoding="utf-8")
    assert load_prompts(p)[0] == ["one\u2028two"]


def test_bad_byte_offset_counts_the_bom(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_bytes(b'\xef\xbb\xbf{"text": "ok"}\n{"text": "\xff"}\n')
    with pytest.raises(PromptError, match=r"byte 0xff at offset 28 \(line 2\)"):
        load_prompts(p)
    assert p.read_bytes()[28] == 0xFF


# --------------------------------------------------------------------------- --out


def test_out_is_a_file(ws, capsys):
    f = ws["root"] / "results.txt"
    f.write_text("keep me\n")
    refused(["-m", "smollm2-135m", "--out", str(f)], ws, capsys, "is a file, not a directory")
    assert f.read_text() == "keep me\n"


def test_out_below_a_file(ws, capsys):
    f = ws["root"] / "afile"
    f.write_text("x")
    refused(["-m", "smollm2-135m", "--out", str(f / "sub")], ws, capsys, "cannot be created", "is a file")


def test_out_read_only_directory(ws, capsys):
    ro = ws["root"] / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        try:  # root ignores the mode bits: then the run could write there, and is rightly not refused
            (ro / "probe").touch()
            (ro / "probe").unlink()
            pytest.skip("running as root: permissions are not enforced, a 0o555 directory is writable")
        except PermissionError:
            pass
        refused(["-m", "smollm2-135m", "--out", str(ro)], ws, capsys, "is not writable", "permission")
        refused(["-m", "smollm2-135m", "--out", str(ro / "new" / "deeper")], ws, capsys, "is not writable", str(ro))
    finally:
        ro.chmod(0o755)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc is Linux's")
def test_out_where_no_file_can_be_created(ws, capsys):
    # /proc refuses new files even to root: the writability probe, not os.access, decides.
    refused(["-m", "smollm2-135m", "--out", "/proc/sheafscope-results"], ws, capsys, "is not writable", "/proc")
    assert not Path("/proc/sheafscope-results").exists()


# --------------------------------------------------------------------------- report


def test_report_on_truncated_results(tmp_path, capsys):
    from test_report import build_run

    build_run(tmp_path)
    text = (tmp_path / "results.json").read_text()
    (tmp_path / "results.json").write_text(text[: len(text) // 2])
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "results.json is truncated or not valid JSON" in err and f"--out {tmp_path}" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "report.html").exists()


@pytest.mark.parametrize("content", ["", "[]", '{"schema": "x"}'])
def test_report_on_results_that_are_not_results(content, tmp_path, capsys):
    (tmp_path / "results.json").write_text(content)
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "results.json" in err and ("truncated" in err or "not a sheafscope results file" in err)
    assert not (tmp_path / "report.html").exists()


def test_report_on_missing_results(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "results.json not found" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "not a run directory" in capsys.readouterr().err


# --------------------------------------------------------------------------- as a user runs it


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run([sys.executable, "-m", "sheafscope.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_subprocess_refusals_are_one_line_exit_2(tmp_path):
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS) + "\n")
    for args, word in [
        (["run", "-m", "smollm2-135m", "--max-tokens", "-5"], "--max-tokens"),
        (["run", "-m", "smollm2-135m", "-m", "smollm2-135m"], "given twice"),
        (["run", "-m", "smollm2-135m", "--device", "tpu"], "--device tpu"),
    ]:
        r = _cli(*args, "--prompts", "p.txt", "--out", "out", cwd=tmp_path)
        assert r.returncode == 2, r.stderr
        assert "Traceback" not in r.stderr and r.stderr.count("\n") == 1 and word in r.stderr
        assert not (tmp_path / "out").exists()
