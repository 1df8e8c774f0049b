"""Data-parallel runs: torchrun (gloo, CPU) processes share a run's units and give the numbers of
one process; a killed run resumes per unit. Shards depend on the prompts alone."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from importlib.resources import files
from pathlib import Path

import jsonschema
import pytest

from sheafscope.cli import main
from sheafscope.prompts import load_prompts
from sheafscope.units import shards

MODELS = ["-m", "random:pythia-160m", "-m", "smollm2-135m"]
ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    # One thread per process in every run compared: float32 matrix products may round differently
    # when split over another number of threads, and the claim is bit-for-bit equality.
    return {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _torchrun(out: Path, prompts: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "-m", "sheafscope", "run", *MODELS, "--prompts", str(prompts), "--out", str(out), "--no-progress"],
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _numbers(out: Path) -> dict[str, dict]:
    """What a model's entry measured (not when, where or how long)."""
    res = json.loads((out / "results.json").read_text())
    return {m["spec"]: {k: m[k] for k in ("prompts", "lstar", "wv_norm_sq", "warnings", "mean_trace")} for m in res["models"]}


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory) -> Path:
    """research-v1's 70 shortest prompts: two shards per model, four units in all."""
    path = tmp_path_factory.mktemp("prompts") / "p.txt"
    path.write_text("\n".join(sorted(load_prompts("research-v1")[0], key=len)[:70]) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, prompt_file) -> Path:
    out = tmp_path_factory.mktemp("one") / "out"
    done = subprocess.run([sys.executable, "-m", "sheafscope", "run", *MODELS, "--prompts", str(prompt_file),
                           "--out", str(out), "--no-progress"], env=_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return out


@pytest.mark.integration
def test_two_processes_share_the_units_survive_a_kill_and_give_the_numbers_of_one(one_process, prompt_file, tmp_path):
    out = tmp_path / "two"
    proc = _torchrun(out, prompt_file)
    deadline = time.time() + 300
    while not list((out / "units").glob("*/*.json")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    workers = _children(proc.pid)
    assert proc.poll() is None and len(workers) == 2
    os.kill(workers[1], signal.SIGKILL)  # one of the two processes, mid-run: torchrun then stops the other
    proc.communicate(timeout=120)
    assert proc.returncode != 0 and not any(_alive(w) for w in workers)
    assert list((out / "units").glob("*/*.json")) and not (out / "results.json").exists()

    proc = _torchrun(out, prompt_file)  # the rerun computes only the missing units
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-2000:]
    assert "unit(s) reused" in stdout and stdout.count("Verdict:") == 1  # one process reports
    assert _numbers(out) == _numbers(one_process)  # bit for bit: JSON floats round-trip exactly
    res = json.loads((out / "results.json").read_text())
    assert res["processes"] == 2 and json.loads((one_process / "results.json").read_text())["processes"] == 1
    jsonschema.validate(res, json.loads(files("sheafscope").joinpath("data/results.schema.json").read_text()))
    ran = {(m["spec"], u["shard"]): u["process"] for m in res["models"] for u in m["units"]}
    assert len(ran) == 4 and set(ran.values()) == {0, 1}  # each process did part of the work
    assert not any((out / "units").rglob("*.json"))  # merged units removed


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


@pytest.mark.unit
def test_shards_depend_on_the_prompts_alone_and_cover_each_once():
    prompts = [f"p{i} " + "x" * (i * 37 % 101) for i in range(150)]
    parts = shards(prompts, size=64)
    assert len(parts) == 3 and sorted(i for p in parts for i in p) == list(range(150))
    assert parts == shards(list(prompts), size=64)
    chars = [sum(len(prompts[i]) for i in p) for p in parts]
    assert max(chars) - min(chars) <= 2 * max(len(p) for p in prompts)  # dealt in turn: like work per shard
    assert shards(["a b"], size=64) == [[0]]


@pytest.mark.unit
def test_processes_zero_is_refused(capsys):
    assert main(["run", "-m", "smollm2-135m", "--processes", "0"]) == 2
    err = capsys.readouterr().err
    assert "--processes" in err and "Traceback" not in err
