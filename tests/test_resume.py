"""Reruns into one --out: a result is reused only when its weights, code, prompts and options
are the same (stdout says so, or says what changed); one run per directory (DIR/.lock);
results of other prompts or options never mixed; files 0644; a full disk stops the run with a
message and keeps what was finished. Tiny llama checkpoints saved to local directories, two
prompts, through the CLI as a user runs it and through sheafscope.runner.run."""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from sheafscope import resume, runner
from sheafscope.cli import main
from sheafscope.errors import ConfigError, OutputWriteError
from sheafscope.models import loading
from sheafscope.outputs import summarize
from sheafscope.outputs.io import atomic_write_text
from sheafscope.runner import ModelEntry, RunOptions
from tiny_models import TINY_CONFIGS

pytestmark = pytest.mark.integration

PROMPTS = ["The capital of France is Paris.", "Once upon a time in a land far away"]
OTHER_PROMPTS = ["def f(n): return n + 1", "A quick brown fox jumps over the lazy dog."]
HOST = socket.gethostname()


def _save_llama(path: Path, tok, seed: int) -> Path:
    cls_name, kwargs = TINY_CONFIGS["llama"]
    config = getattr(transformers, cls_name)(**{**kwargs, "vocab_size": len(tok)})
    torch.manual_seed(seed)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, offline_model):
    """Two tiny llama checkpoints (seeds 0 and 1) with smollm2's tokenizer."""
    tok = offline_model("smollm2-135m").tokenizer
    root = tmp_path_factory.mktemp("ckpt")
    return {"a": _save_llama(root / "a", tok, 0), "b": _save_llama(root / "b", tok, 1)}


@pytest.fixture(autouse=True)
def _no_figures(monkeypatch):
    """Figures and report.html are derived views, not under test here: skip them (speed)."""
    import sheafscope.outputs.figures as figures
    import sheafscope.outputs.report as report

    monkeypatch.setattr(figures, "write_all_figures", lambda out_dir: [])
    monkeypatch.setattr(report, "write_report", lambda out_dir: Path(out_dir) / "report.html")


@pytest.fixture
def prompts(tmp_path):
    def write(lines, name="p.txt"):
        p = tmp_path / name
        p.write_text("\n".join(lines) + "\n")
        return str(p)

    return write


def _run(capsys, *args) -> tuple[int, str, str]:
    rc = main(["run", "--no-progress", "--device", "cpu", *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _model_file(out: Path, spec) -> Path:
    return out / "models" / f"{runner.slug(str(spec))}.json"


def _models(out: Path) -> list[dict]:
    return json.loads((out / "results.json").read_text())["models"]


def _snapshot(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


# -- reuse and recompute ---------------------------------------------------------------------------

def test_rerun_with_nothing_changed_is_reused_bit_identical(ckpts, tmp_path, prompts, capsys):
    out, spec = tmp_path / "out", str(ckpts["a"])
    args = ["-m", spec, "--prompts", prompts(PROMPTS), "--out", str(out)]
    rc, stdout, _ = _run(capsys, *args)
    assert rc == 0 and "reused" not in stdout
    path = _model_file(out, spec)
    first, first_models = path.read_bytes(), _models(out)
    key = json.loads(first)["resume_key"]
    assert {"weights", "code", "prompts", "options", "fingerprint"} <= set(key)
    assert key["weights"]["kind"] == "local-dir"
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= {row[0] for row in key["weights"]["files"]}
    assert key["code"]["sheafscope"] and len(key["code"]["source_sha256"]) == 64

    rc, stdout, _ = _run(capsys, *args)
    assert rc == 0
    assert f"{spec}: reused from {path} (same weights, code, prompts and options); --force recomputes" in stdout
    assert path.read_bytes() == first  # not rewritten
    assert _models(out) == first_models  # the same numbers, bit for bit

    rc, stdout, _ = _run(capsys, *args, "--force")
    assert rc == 0 and f"{spec}: recomputing (--force)" in stdout
    assert [m["prompts"] for m in _models(out)] == [m["prompts"] for m in first_models]


def test_replaced_weights_are_recomputed_and_the_message_says_so(ckpts, tmp_path, prompts, capsys):
    model_dir = tmp_path / "ckpt"
    shutil.copytree(ckpts["a"], model_dir)
    out, spec = tmp_path / "out", str(model_dir)
    args = ["-m", spec, "--prompts", prompts(PROMPTS), "--out", str(out)]
    assert _run(capsys, *args)[0] == 0
    before = _models(out)[0]

    # Replace the weights in place with another seed's: same shapes, so the same file size.
    weights = model_dir / "model.safetensors"
    old_stat = weights.stat()
    shutil.copyfile(ckpts["b"] / "model.safetensors", model_dir / "new.tmp")
    os.replace(model_dir / "new.tmp", weights)
    assert weights.stat().st_size == old_stat.st_size and weights.stat().st_mtime_ns != old_stat.st_mtime_ns

    rc, stdout, _ = _run(capsys, *args)
    assert rc == 0
    path = _model_file(out, spec)
    assert (f"{spec}: recomputing, {path} is out of date: weights changed: model.safetensors replaced "
            "(size or modification time differs)") in stdout
    assert "reused" not in stdout and "code changed" not in stdout
    after = _models(out)[0]
    assert after["wv_norm_sq"] != before["wv_norm_sq"]
    assert [p["trace"] for p in after["prompts"]] != [p["trace"] for p in before["prompts"]]
    row = {r[0]: r for r in after["resume_key"]["weights"]["files"]}["model.safetensors"]
    assert row[1:] == [weights.stat().st_size, weights.stat().st_mtime_ns]

    rc, stdout, _ = _run(capsys, *args)  # and now it is the result of these weights: reused
    assert rc == 0 and f"{spec}: reused from {path}" in stdout
    assert _models(out)[0] == after


def test_a_failed_model_is_retried(ckpts, tmp_path, prompts, capsys, monkeypatch):
    import sheafscope.models.loading as loading
    from sheafscope.errors import ModelLoadError

    out, spec = tmp_path / "out", str(ckpts["a"])
    args = ["-m", spec, "--prompts", prompts(PROMPTS), "--out", str(out)]
    real = loading.load_model

    def unlucky(*a, **k):
        raise ModelLoadError("the disk hiccuped")

    monkeypatch.setattr(loading, "load_model", unlucky)
    assert _run(capsys, *args)[0] == 1
    monkeypatch.setattr(loading, "load_model", real)
    rc, stdout, _ = _run(capsys, *args)
    assert rc == 0 and f"{spec}: retrying, the earlier attempt failed (the disk hiccuped)" in stdout
    assert _models(out)[0]["status"] == "ok"


def test_code_change_recomputes(ckpts, tmp_path, prompts, capsys, monkeypatch):
    out, spec = tmp_path / "out", str(ckpts["a"])
    args = ["-m", spec, "--prompts", prompts(PROMPTS), "--out", str(out)]
    assert _run(capsys, *args)[0] == 0
    monkeypatch.setattr(resume, "code_revision", lambda: "0" * 64)  # as after a `git pull` with a fix
    rc, stdout, _ = _run(capsys, *args)
    assert rc == 0
    assert f"{spec}: recomputing, {_model_file(out, spec)} is out of date: code changed (source_sha256 " in stdout
    assert "-> 000000000000)" in stdout and "weights changed" not in stdout
    assert _models(out)[0]["resume_key"]["code"]["source_sha256"] == "0" * 64
    assert "reused" in _run(capsys, *args)[1]


def test_code_revision_hashes_the_package_files(tmp_path, monkeypatch):
    pkg = tmp_path / "sheafscope"
    shutil.copytree(Path(resume.__file__).parent, pkg, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(resume, "__file__", str(pkg / "resume.py"))
    base = resume.code_revision()
    assert base == resume.code_revision() and len(base) == 64
    (pkg / "__pycache__").mkdir()
    (pkg / "__pycache__" / "x.pyc").write_bytes(b"bytecode")
    assert resume.code_revision() == base  # caches do not count
    (pkg / "data" / "catalog.toml").write_text((pkg / "data" / "catalog.toml").read_text() + "\n# edited\n")
    edited = resume.code_revision()
    assert edited != base  # data files count
    with open(pkg / "analysis.py", "a") as f:
        f.write("\n# a fix\n")
    assert resume.code_revision() not in (base, edited)


# -- never mixed -----------------------------------------------------------------------------------

def test_other_prompts_or_options_are_refused_and_force_replaces_everything(ckpts, tmp_path, prompts, capsys):
    out, a, b = tmp_path / "out", str(ckpts["a"]), str(ckpts["b"])
    assert _run(capsys, "-m", a, "-m", b, "--prompts", prompts(PROMPTS), "--out", str(out))[0] == 0
    before = _snapshot(out)

    rc, stdout, err = _run(capsys, "-m", a, "--prompts", prompts(OTHER_PROMPTS, "q.txt"), "--out", str(out))
    assert rc == 2
    assert f"sheafscope: error: {out} holds results of a run with other prompts (other texts) ({out / 'results.json'}); " in err
    assert f"choose another --out, or add --force to replace everything in {out}" in err
    assert "Traceback" not in err
    assert _snapshot(out) == before  # nothing written, nothing removed, no lock left

    rc, _, err = _run(capsys, "-m", a, "--prompts", prompts(PROMPTS), "--attention", "eager", "--out", str(out))
    assert rc == 2 and "other options (attention fast -> eager)" in err and "--force" in err
    assert _snapshot(out) == before

    rc, stdout, _ = _run(capsys, "-m", a, "--prompts", prompts(OTHER_PROMPTS, "q.txt"), "--out", str(out), "--force")
    assert rc == 0
    assert f"--force: {out} held results of a run with other prompts (other texts); deleted its 2 model file(s)" in stdout
    assert sorted(p.name for p in (out / "models").glob("*.json")) == [_model_file(out, a).name]
    res = json.loads((out / "results.json").read_text())
    assert res["prompts"] == OTHER_PROMPTS and [m["spec"] for m in res["models"]] == [a]
    assert [p["text"] for p in res["models"][0]["prompts"]] == OTHER_PROMPTS


def test_model_files_of_other_prompts_are_refused_without_results_json(ckpts, tmp_path, prompts, capsys):
    """A killed run leaves model files but no results.json: their resume keys tell."""
    out, a, b = tmp_path / "out", str(ckpts["a"]), str(ckpts["b"])
    assert _run(capsys, "-m", a, "--prompts", prompts(PROMPTS), "--out", str(out))[0] == 0
    (out / "results.json").unlink()
    rc, _, err = _run(capsys, "-m", b, "--prompts", prompts(OTHER_PROMPTS, "q.txt"), "--out", str(out))
    assert rc == 2 and f"other prompts (other texts) ({_model_file(out, a)})" in err
    assert not _model_file(out, b).exists()


def test_results_list_only_this_runs_models_and_others_are_left_in_place(ckpts, tmp_path, prompts, capsys):
    out, a, b = tmp_path / "out", str(ckpts["a"]), str(ckpts["b"])
    p = prompts(PROMPTS)
    assert _run(capsys, "-m", a, "-m", b, "--prompts", p, "--out", str(out))[0] == 0
    b_file = _model_file(out, b)
    b_bytes = b_file.read_bytes()
    rc, stdout, _ = _run(capsys, "-m", a, "--prompts", p, "--out", str(out))
    assert rc == 0 and f"{a}: reused" in stdout
    assert [m["spec"] for m in _models(out)] == [a]
    assert json.loads((out / "analysis.json").read_text())  # rebuilt from this run's models only
    assert b_file.read_bytes() == b_bytes
    assert (f"note: {out / 'models'} also holds 1 result file(s) of model(s) not in this run ({b_file.stem}): "
            "left in place, not in results.json") in stdout


def test_duplicate_specs_are_refused_before_any_model_loads(ckpts, tmp_path, prompts, capsys, monkeypatch):
    def must_not_load(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(loading, "load_model", must_not_load)
    out, a = tmp_path / "out", str(ckpts["a"])
    with pytest.raises(ConfigError, match=f"model given more than once: '{a}' twice"):
        runner.run([ModelEntry(a), ModelEntry(a)], PROMPTS, RunOptions(device="cpu"), out, show_progress=False)
    with pytest.raises(ConfigError, match="the same model"):  # one directory spelled two ways
        runner.run([ModelEntry(a), ModelEntry(a + "/")], PROMPTS, RunOptions(device="cpu"), out, show_progress=False)
    with pytest.raises(ConfigError, match="the same model"):  # a twin and its random: spelling
        runner.run([ModelEntry("random:gpt2"), ModelEntry("gpt2")], PROMPTS, RunOptions(init="random"), out, show_progress=False)
    assert not out.exists()
    rc, _, err = _run(capsys, "-m", a, "-m", a, "--prompts", prompts(PROMPTS), "--out", str(out))
    assert rc == 2 and "twice" in err and "Traceback" not in err  # the CLI refuses it even earlier
    assert not out.exists()


# -- one run per directory -------------------------------------------------------------------------

def test_a_live_lock_refuses_and_a_stale_one_is_replaced(ckpts, tmp_path, prompts, capsys):
    out, a = tmp_path / "out", str(ckpts["a"])
    out.mkdir()
    lock = out / ".lock"
    args = ["-m", a, "--prompts", prompts(PROMPTS), "--out", str(out)]
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        lock.write_text(json.dumps({"pid": holder.pid, "host": HOST}))
        rc, _, err = _run(capsys, *args)
        assert rc == 2
        assert (f"sheafscope: error: {out} is in use by pid {holder.pid} on {HOST}; "
                f"wait for it or remove {lock} if that process is gone") in err
        assert json.loads(lock.read_text())["pid"] == holder.pid  # the holder's lock is left alone
        assert not list((out / "models").glob("*.json"))
    finally:
        holder.kill()
        holder.wait()

    # Another host's lock cannot be checked: respected.
    lock.write_text(json.dumps({"pid": 1, "host": "elsewhere.example"}))
    rc, _, err = _run(capsys, *args)
    assert rc == 2 and f"in use by pid 1 on elsewhere.example; wait for it or remove {lock}" in err

    # The holder is gone (a finished process's pid): the lock is stale, reported and replaced.
    lock.write_text(json.dumps({"pid": holder.pid, "host": HOST}))
    rc, _, err = _run(capsys, *args)
    assert rc == 0
    assert f"{lock} was left by pid {holder.pid} on {HOST}, which is no longer running; replacing the stale lock" in err
    assert not lock.exists()  # released at the end
    assert _model_file(out, a).exists()


def test_the_lock_is_held_during_the_run_and_released_on_errors(ckpts, tmp_path, prompts, capsys, monkeypatch):
    out, a = tmp_path / "out", str(ckpts["a"])
    seen, real_load = [], loading.load_model

    def interrupted(*args, **kwargs):
        seen.append(json.loads((out / ".lock").read_text()))
        raise KeyboardInterrupt

    monkeypatch.setattr(loading, "load_model", interrupted)
    rc, _, err = _run(capsys, "-m", a, "--prompts", prompts(PROMPTS), "--out", str(out))
    assert rc == 130 and "interrupted" in err
    assert seen[0]["pid"] == os.getpid() and seen[0]["host"] == HOST
    assert not (out / ".lock").exists()

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(loading, "load_model", real_load)
    monkeypatch.setattr(summarize, "summary_frame", broken)  # a failure outside any model
    with pytest.raises(RuntimeError, match="boom"):
        runner.run([ModelEntry(a)], PROMPTS, RunOptions(device="cpu"), out, show_progress=False)
    assert not (out / ".lock").exists()


# -- files -----------------------------------------------------------------------------------------

def test_result_files_are_0644_under_the_default_umask(ckpts, tmp_path, prompts, capsys):
    out = tmp_path / "out"
    old = os.umask(0o022)
    try:
        assert _run(capsys, "-m", str(ckpts["a"]), "--prompts", prompts(PROMPTS), "--out", str(out))[0] == 0
    finally:
        os.umask(old)
    written = [out / "results.json", out / "summary.csv", out / "analysis.json", *(out / "models").glob("*.json")]
    assert len(written) == 4
    assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in written} == {p.name: "0o644" for p in written}
    old = os.umask(0o077)  # the mode follows the umask, as open() does
    try:
        atomic_write_text(tmp_path / "private.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "private.txt").stat().st_mode) == 0o600


def test_full_disk_stops_with_a_message_and_keeps_finished_models(ckpts, tmp_path, prompts, capsys, monkeypatch):
    out, a, b = tmp_path / "out", str(ckpts["a"]), str(ckpts["b"])
    args = ["-m", a, "-m", b, "--prompts", prompts(PROMPTS), "--out", str(out)]
    assert _run(capsys, "-m", a, *args[4:])[0] == 0  # an earlier run of model a
    before = _snapshot(out)
    b_file = _model_file(out, b)
    real_replace = os.replace

    def full_disk(src, dst, *rest, **kw):
        if Path(dst) == b_file:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst, *rest, **kw)

    monkeypatch.setattr(os, "replace", full_disk)
    rc, stdout, err = _run(capsys, *args)
    assert rc == 1  # cli.py maps OutputWriteError (the run had started) to exit 1
    assert (f"sheafscope: error: no space left on device while writing {b_file}; "
            "free space and rerun: finished units and models are kept") in err
    assert "Traceback" not in err + stdout
    assert not b_file.exists()
    assert not [p.name for p in out.rglob("*.tmp")]  # the temporary file removed
    after = _snapshot(out)
    b_units = [k for k in after if k.startswith("units/")]
    assert b_units and {k: v for k, v in after.items() if k not in b_units} == before  # earlier results intact, no lock left
    monkeypatch.setattr(os, "replace", real_replace)

    rc, stdout, _ = _run(capsys, *args)  # space freed: a is reused, b merged from its finished unit
    assert rc == 0 and f"{a}: reused" in stdout and f"{b}: 1 of 1 unit(s) reused" in stdout
    assert not (out / "units").exists() or not any((out / "units").rglob("*.json"))
    assert [m["status"] for m in _models(out)] == ["ok", "ok"]


def test_a_failed_write_leaves_the_earlier_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "r.json"
    path.write_text("earlier\n")

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)  # the text is in the temporary file by now
    with pytest.raises(OutputWriteError, match=f"no space left on device while writing {path}; free space and rerun"):
        atomic_write_text(path, "new\n")
    assert path.read_text() == "earlier\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


def test_a_hub_model_is_identified_by_the_commit_its_revision_resolves_to(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    refs = tmp_path / "models--org--name" / "refs"
    refs.mkdir(parents=True)
    old, new = "a" * 40, "b" * 40
    (refs / "main").write_text(old)
    first = resume.weights_identity("org/name", RunOptions())
    assert first == {"kind": "hub", "id": "org/name", "revision": "main", "commit": old}
    assert resume.weights_identity("org/name", RunOptions(revision=new))["commit"] == new  # a commit pins itself
    (refs / "main").write_text(new)  # the cached main moved (a newer download)
    second = resume.weights_identity("org/name", RunOptions())
    assert resume.key_changes({"weights": first}, {"weights": second}) == [
        f"weights changed: org/name revision main ({old[:12]}) is now main ({new[:12]})"]
