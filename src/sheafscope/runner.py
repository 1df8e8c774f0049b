"""Running many models over one prompt set, surviving failure.

Each model's result is written to DIR/models/<slug>.json atomically as soon as it exists,
with its resume key (resume.py: weights, code, prompts, options). A rerun into the same DIR
reuses a model's file when its key is the same, and says so on stdout; otherwise it
recomputes the model and says which part changed. A model that fails is recorded with its
error (and retried next time) and the run goes on.

One run per DIR at a time (DIR/.lock holds the holder's pid and host; a lock whose process is
gone is replaced). A DIR holding results computed with other prompts or options is refused,
never mixed (--force replaces them). results.json lists the models of this run only.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import platform
import re
import socket
import sys
import traceback
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sheafscope import __version__
from sheafscope.errors import ConfigError, OutputWriteError, SheafscopeError
from sheafscope.outputs.io import atomic_write_json, read_json
from sheafscope.resume import COMMIT, code_identity, jsonable, key_changes, key_hash, listed, resume_key

log = logging.getLogger(__name__)


@dataclass
class RunOptions:
    """Options that change the numbers (recorded, and part of the resume fingerprint)."""

    dtype: str | None = None
    device: str | None = None
    restriction_map: str = "raw_wv"
    max_tokens: int | None = None
    revision: str | None = None
    quantize: str | None = None
    seed: int = 0
    init: str = "pretrained"
    attention: str = "fast"  # "fast" (diagonal capture inside the forward pass) or "eager" (reference)
    batch_tokens: int | None = None  # padded tokens per forward pass; None: the device default




@dataclass
class ModelEntry:
    """A model to run: its spec and metadata overrides (lab, behavior, gain, ...)."""

    spec: str
    metadata: dict[str, Any] = field(default_factory=dict)


def slug(spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", spec).strip("_") or "model"


def environment() -> dict[str, Any]:
    import torch
    import transformers

    env = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu",
    }
    return env


def definitions(restriction_map: str) -> dict[str, Any]:
    from sheafscope.measures.lstar import DEFINITIONS, FORMULA_TEXT
    from sheafscope.measures.restriction import RESTRICTION_MAPS

    return {
        "offdiag_mass": "n - sum_i A_h[i,i] = sum_{i != j} A_h[i,j] (rows of A sum to 1); A_h the row-softmax attention of head h",
        "trace": "Tr(L_F^h) = offdiag_mass * ||R_h||_F^2 (exact: L_F^h = L_G^h (x) R_h^T R_h)",
        "layer_trace": "sum over heads of trace (block-diagonal multi-head sheaf Laplacian)",
        "wv_norm_sq": "||R_h||_F^2 for the restriction map in use",
        "restriction_map": {"used": restriction_map, **{k: v.definition for k, v in RESTRICTION_MAPS.items()}},
        "legacy_trace_full": "notebook 000's trace_full (D8): offdiag mass of the head-averaged attention times ||R_0||_F^2 of head 0 only; a legacy number",
        "first_token_mass": "mean over query positions i >= 1 of A_h[i, 0] (attention-sink mass)",
        "max_abs_hidden": "max |h| over tokens and channels of each residual stream (embeddings, then after each layer)",
        "lstar": {k: {"definition": v.definition, "source": v.source} for k, v in DEFINITIONS.items()},
        "formula": FORMULA_TEXT,
        "error_pct": "|predicted - empirical| / L * 100, empirical = diff-definition mean (notebook 001)",
    }


def failed_entry(entry: ModelEntry, err: BaseException) -> dict[str, Any]:
    return {
        "spec": entry.spec,
        "status": "failed",
        "error": {"type": type(err).__name__, "message": str(err) or type(err).__name__},
        "metadata": entry.metadata,
    }


def run_one(entry: ModelEntry, prompts: list[str], options: RunOptions, progress=None) -> dict[str, Any]:
    """Load, analyse and free one model; never raises for a model-level failure."""
    import torch

    from sheafscope.analysis import analyze
    from sheafscope.models.loading import load_model

    loaded = None
    try:
        loaded = load_model(entry.spec, init=options.init, seed=options.seed, dtype=options.dtype, device=options.device,
                            revision=options.revision, quantize=options.quantize)
        result = analyze(loaded, prompts, attention=options.attention, restriction_map=options.restriction_map, max_tokens=options.max_tokens,
                         progress=progress, batch_tokens=options.batch_tokens)
        out = result.to_dict()
        out["metadata"] = {**out.get("metadata", {}), **entry.metadata}
        return out
    except SheafscopeError as e:
        return failed_entry(entry, e)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as e:  # a bug or an unforeseen library error: keep the others' results
        log.error("model %s failed:\n%s", entry.spec, traceback.format_exc())
        return failed_entry(entry, e)
    finally:
        del loaded
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


@dataclass
class RunOutcome:
    out_dir: Path
    models: list[dict[str, Any]]

    @property
    def n_failed(self) -> int:
        return sum(m.get("status") != "ok" for m in self.models)


# -- one run per directory -------------------------------------------------------------------------

LOCK_NAME = ".lock"


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (another user's counts)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return True  # cannot tell: assume it runs
    return True


class RunLock:
    """DIR/.lock: {"pid", "host", "started"} of the one run writing into DIR.

    Taken by a hard link of a complete file (so a reader never sees half a lock; O_EXCL where
    the file system has no hard links). A lock of this host whose pid is gone is stale: it is
    reported and replaced. A lock of another host cannot be checked and is respected.
    """

    def __init__(self, out_dir: Path):
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / LOCK_NAME
        self.me = {"pid": os.getpid(), "host": socket.gethostname()}
        self.held = False

    def _create(self) -> bool:
        body = json.dumps({**self.me, "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}) + "\n"
        tmp = self.out_dir / f"{LOCK_NAME}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(body)
            try:
                os.link(tmp, self.path)
                return True
            except FileExistsError:
                return False
            except OSError:  # no hard links here: exclusive create, then write
                try:
                    fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
                except FileExistsError:
                    return False
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    f.write(body)
                return True
        except OSError as e:
            raise ConfigError(f"cannot create the lock {self.path} ({(e.strerror or type(e).__name__).lower()}); "
                              f"make {self.out_dir} writable or choose another --out") from e
        finally:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass

    def _read(self) -> tuple[dict[str, Any] | None, str]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}, ""
        except OSError as e:
            return None, e.strerror or type(e).__name__
        try:
            holder = json.loads(text)
            if isinstance(holder, dict) and isinstance(holder.get("pid"), int) and isinstance(holder.get("host"), str):
                return holder, text
        except json.JSONDecodeError:
            pass
        return None, "not a sheafscope lock"

    def acquire(self) -> None:
        for _ in range(5):
            if self._create():
                self.held = True
                return
            holder, text = self._read()
            if holder == {}:  # released between our attempt and our look: try again
                continue
            if holder is None:
                raise ConfigError(f"{self.path} exists but cannot be read as a sheafscope lock ({text}); "
                                  f"remove it if no sheafscope run is writing into {self.out_dir}")
            pid, host = holder["pid"], holder["host"]
            if host == self.me["host"] and pid != os.getpid() and not pid_alive(pid):
                print(f"sheafscope: {self.path} was left by pid {pid} on {host}, which is no longer running; "
                      "replacing the stale lock", file=sys.stderr)
                try:  # remove it only if it is still the stale one we read
                    if self.path.read_text(encoding="utf-8") == text:
                        self.path.unlink()
                except FileNotFoundError:
                    pass
                continue
            who = "this process" if (pid, host) == (os.getpid(), self.me["host"]) else f"pid {pid} on {host}"
            raise ConfigError(f"{self.out_dir} is in use by {who}; wait for it or remove {self.path} if that process is gone")
        raise ConfigError(f"could not take the lock {self.path}: other runs keep taking it; retry, or choose another --out")

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        holder, _ = self._read()
        if holder and holder.get("pid") == self.me["pid"] and holder.get("host") == self.me["host"]:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


# -- what may go into one directory ----------------------------------------------------------------

def model_identity(spec: str, init: str) -> tuple[str, str]:
    """Two specs that name the same model (the same path spelled two ways, a catalog name and
    its hub id, random:NAME and NAME with init random) have the same identity."""
    from sheafscope.models import catalog as cat
    from sheafscope.models.loading import classify_spec, parse_spec

    try:
        kind = classify_spec(spec, init)
    except SheafscopeError:
        return ("unknown", spec.strip())
    name, _ = parse_spec(spec.strip(), init)
    if kind in ("local-dir", "gguf-file"):
        return (kind, str(Path(name).expanduser().resolve()))
    entry = cat.find(name)
    if entry is not None:
        return (kind, entry.name)
    return (kind, name.lower())


def check_distinct(models: list[ModelEntry], init: str) -> None:
    """Refuse a model given twice (it would be counted twice in the analysis) and two specs
    that would write the same result file."""
    seen: dict[tuple[str, str], str] = {}
    slugs: dict[str, str] = {}
    for e in models:
        ident = model_identity(e.spec, init)
        if ident in seen:
            same = f"'{e.spec}' twice" if seen[ident] == e.spec else f"'{seen[ident]}' and '{e.spec}', the same model ({ident[1]})"
            raise ConfigError(f"model given more than once: {same}; give each model once (it would be counted twice in the analysis)")
        seen[ident] = e.spec
        s = slug(e.spec)
        if s in slugs:
            raise ConfigError(f"'{slugs[s]}' and '{e.spec}' would share the result file models/{s}.json; "
                              "rename one (a local path can be given another way)")
        slugs[s] = e.spec


_RUN_OUTPUTS = ("results.json", "summary.csv", "analysis.json", "report.html")


def _options_change(old: dict[str, Any], new: dict[str, Any]) -> str:
    diff = sorted(k for k in old.keys() | new.keys() if old.get(k, "(not recorded)") != new.get(k, "(not recorded)"))
    return "; ".join(f"{k} {old.get(k, '(not recorded)')} -> {new.get(k, '(not recorded)')}" for k in diff)


def _earlier_run_differs(out_dir: Path, prompts: list[str], options: dict[str, Any], prompts_sha: str) -> tuple[str, Path] | None:
    """(what differs, in which file) when DIR holds results of other prompts or options:
    results.json's header, or any finished model file's resume key."""
    def differs(old_prompts_same: bool, old_prompts_n: Any, old_options: Any) -> str | None:
        what = []
        if not old_prompts_same:
            what.append(f"other prompts ({old_prompts_n} prompt(s), not these {len(prompts)})" if old_prompts_n != len(prompts)
                        else "other prompts (other texts)")
        if isinstance(old_options, dict) and old_options != options:
            what.append(f"other options ({_options_change(old_options, options)})")
        return " and ".join(what) or None

    results = out_dir / "results.json"
    if results.exists():
        try:
            header = read_json(results)
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            header = None  # unreadable: the model files below still tell
        if isinstance(header, dict) and isinstance(header.get("prompts"), list):
            d = differs(header["prompts"] == prompts, len(header["prompts"]), header.get("options"))
            if d:
                return d, results
    for path in sorted((out_dir / "models").glob("*.json")):
        try:
            done = read_json(path)
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            continue
        key = done.get("resume_key") if isinstance(done, dict) else None
        if not isinstance(key, dict) or done.get("status") != "ok":
            continue  # a failed record holds no numbers; an old file without a key is recomputed if in this run
        kp = key.get("prompts") or {}
        d = differs(kp.get("sha256") == prompts_sha, kp.get("count"), key.get("options"))
        if d:
            return d, path
    return None


def _remove_earlier_run(out_dir: Path) -> int:
    """--force over a run of other prompts/options: delete its model files and outputs."""
    n = 0
    for path in (out_dir / "models").glob("*.json"):
        path.unlink(missing_ok=True)
        n += 1
    for name in _RUN_OUTPUTS:
        (out_dir / name).unlink(missing_ok=True)
    figures = out_dir / "figures"
    if figures.is_dir():
        for path in figures.iterdir():
            if path.suffix in (".png", ".svg") and path.is_file():
                path.unlink(missing_ok=True)
    return n


def _remove_temporaries(out_dir: Path) -> None:
    """Temporary files of atomic writes (.NAME.XXXX.tmp) that a killed run left; we hold the
    lock, so no other run is writing them."""
    for d in (out_dir, out_dir / "models"):
        for pattern in (".*.json.*.tmp", ".*.csv.*.tmp"):
            for path in d.glob(pattern):
                try:
                    path.unlink(missing_ok=True)
                except OSError:
                    pass


def _prepare_dir(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {out_dir} is a file, not a directory; choose a directory")
    try:
        (out_dir / "models").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create the output directory {out_dir / 'models'} "
                          f"({(e.strerror or type(e).__name__).lower()}); choose another --out") from e
    if not os.access(out_dir / "models", os.W_OK | os.X_OK) or not os.access(out_dir, os.W_OK | os.X_OK):
        raise ConfigError(f"the output directory {out_dir} is not writable; make it writable or choose another --out")


def _say(msg: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(msg, file=sys.stdout)


def _reuse_or_why(entry: ModelEntry, path: Path, key: dict[str, Any], force: bool) -> tuple[dict[str, Any] | None, str | None]:
    """(the earlier result to reuse, None) or (None, why it is recomputed; None for a new model)."""
    if not path.exists():
        return None, None
    if force:
        return None, f"{entry.spec}: recomputing (--force), replacing {path}"
    try:
        done = read_json(path)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        return None, f"{entry.spec}: recomputing, {path} is unreadable ({type(e).__name__})"
    if not isinstance(done, dict) or done.get("status") != "ok":
        err = done.get("error") if isinstance(done, dict) else None
        msg = err.get("message") if isinstance(err, dict) else None
        return None, f"{entry.spec}: retrying, the earlier attempt failed" + (f" ({msg})" if msg else "")
    old = done.get("resume_key")
    if not isinstance(old, dict):
        return None, f"{entry.spec}: recomputing, {path} has no resume key (written by an earlier sheafscope)"
    if old.get("fingerprint") == key["fingerprint"] and done.get("fingerprint") == key["fingerprint"]:
        return done, None
    changes = key_changes(old, key) or ["the resume key differs"]
    return None, f"{entry.spec}: recomputing, {path} is out of date: {'; '.join(changes)}"


def _settle_weights(key: dict[str, Any], out: dict[str, Any]) -> None:
    """A hub model's key records the commit that was loaded (resolved only at load time)."""
    w = key["weights"]
    if w.get("kind") == "hub" and out.get("status") == "ok" and isinstance(out.get("revision"), str) and COMMIT.match(out["revision"]):
        w["commit"] = out["revision"]
        key["fingerprint"] = key_hash(key)


def run(
    models: list[ModelEntry],
    prompts: list[str],
    options: RunOptions,
    out_dir: Path,
    *,
    prompt_source: str = "",
    force: bool = False,
    show_progress: bool = True,
    suite: dict[str, Any] | None = None,
) -> RunOutcome:
    """Run every model, writing DIR/models/*.json as each finishes, then results.json,
    summary.csv and analysis.json. Returns all model entries (ok and failed).

    Before any model loads: a model given twice raises ConfigError; DIR must be free (DIR/.lock;
    a stale lock is replaced) and must not hold results of other prompts or options (ConfigError;
    with force=True, those results are deleted first). A model whose file in DIR/models has the
    same resume key is reused (stdout says so), else recomputed (stdout says why, when a file was
    there). Model files in DIR/models of models not in this run are left in place and not listed
    in results.json. A result that cannot be written (a full disk) raises OutputWriteError;
    finished model files are kept.
    """
    from tqdm.auto import tqdm

    from sheafscope.analysis import validate_prompts

    prompts = validate_prompts(prompts)
    models = list(models)
    check_distinct(models, options.init)
    out_dir = Path(out_dir)
    _prepare_dir(out_dir)
    with RunLock(out_dir):
        _remove_temporaries(out_dir)
        code = code_identity()
        opts = jsonable(asdict(options))
        prompts_sha = hashlib.sha256(json.dumps(prompts, ensure_ascii=False).encode()).hexdigest()
        earlier = _earlier_run_differs(out_dir, prompts, opts, prompts_sha)
        if earlier is not None:
            what, where = earlier
            if not force:
                raise ConfigError(
                    f"{out_dir} holds results of a run with {what} ({where}); results are never mixed: "
                    f"choose another --out, or add --force to replace everything in {out_dir} (its earlier results are deleted)"
                )
            try:
                n = _remove_earlier_run(out_dir)
            except OSError as e:
                raise ConfigError(f"--force: cannot delete the earlier results in {out_dir} "
                                  f"({e.strerror or type(e).__name__}: {e.filename}); choose another --out") from e
            _say(f"--force: {out_dir} held results of a run with {what}; deleted its {n} model file(s) and its results.json")
        header = {
            "schema": "sheafscope.results/1",
            "sheafscope_version": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "environment": environment(),
            "definitions": definitions(options.restriction_map),
            "options": asdict(options),
            "prompt_source": prompt_source,
            "prompts": prompts,
            "suite": suite,
        }
        results: list[dict[str, Any]] = []
        disable = not show_progress
        try:
            model_bar = tqdm(models, desc="models", unit="model", disable=disable, position=0)
            for entry in model_bar:
                model_bar.set_postfix_str(entry.spec)
                path = out_dir / "models" / f"{slug(entry.spec)}.json"
                key = resume_key(entry, prompts, options, code)
                key["fingerprint"] = key_hash(key)
                done, why = _reuse_or_why(entry, path, key, force)
                if done is not None:
                    _say(f"{entry.spec}: reused from {path} (same weights, code, prompts and options); --force recomputes")
                    results.append(done)
                    continue
                if why:
                    _say(why)
                with tqdm(total=len(prompts), desc=f"  {entry.spec}", unit="prompt", disable=disable, leave=False, position=1) as bar:
                    out = run_one(entry, prompts, options, progress=bar.update)
                _settle_weights(key, out)
                out["fingerprint"] = key["fingerprint"]
                out["resume_key"] = key
                atomic_write_json(path, out)
                if out["status"] != "ok":
                    tqdm.write(f"FAILED {entry.spec}: {out['error']['message']}", file=sys.stderr)
                results.append(out)
            ours = {f"{slug(e.spec)}.json" for e in models}
            others = sorted(p.stem for p in (out_dir / "models").glob("*.json") if p.name not in ours)
            if others:
                _say(f"note: {out_dir / 'models'} also holds {len(others)} result file(s) of model(s) not in this run "
                     f"({listed(others)}): left in place, not in results.json")
            write_outputs(out_dir, header, results)
        except OutputWriteError as e:
            raise OutputWriteError(f"{e}: finished models are kept") from e
    return RunOutcome(out_dir, results)


def write_outputs(out_dir: Path, header: dict[str, Any], results: list[dict[str, Any]]) -> None:
    """results.json, summary.csv and analysis.json from the per-model entries."""
    from sheafscope.outputs.summarize import analysis_block, summary_frame

    atomic_write_json(out_dir / "results.json", {**header, "models": results})
    summary = summary_frame(results)
    from sheafscope.outputs.io import atomic_write_text

    atomic_write_text(out_dir / "summary.csv", summary.to_csv(index=False))
    atomic_write_json(out_dir / "analysis.json", analysis_block(results, summary))
    try:  # figures and report are derived views: a plotting problem must not lose the numbers
        from sheafscope.outputs.figures import write_all_figures
        from sheafscope.outputs.report import write_report

        write_all_figures(out_dir)
        write_report(out_dir)
    except Exception as e:  # noqa: BLE001
        log.error("figures/report could not be written (%s); the numbers are in results.json", e)
