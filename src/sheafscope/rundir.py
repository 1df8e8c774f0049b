"""The output directory of a run: one run at a time (a lock), never results of two runs mixed,
and what a killed run left behind cleaned up.

DIR/.lock holds the holder's pid and host; a lock whose process is gone is replaced. A DIR
holding results computed with other prompts or options is refused (--force deletes them).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sheafscope.errors import ConfigError, SheafscopeError
from sheafscope.outputs.io import read_json
from sheafscope.units import ModelEntry, slug


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


def earlier_run_differs(out_dir: Path, prompts: list[str], options: dict[str, Any], prompts_sha: str) -> tuple[str, Path] | None:
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


def remove_earlier_run(out_dir: Path) -> int:
    """--force over a run of other prompts/options: delete its model files and outputs."""
    n = 0
    for path in (out_dir / "models").glob("*.json"):
        path.unlink(missing_ok=True)
        n += 1
    for name in _RUN_OUTPUTS:
        (out_dir / name).unlink(missing_ok=True)
    shutil.rmtree(out_dir / "units", ignore_errors=True)
    figures = out_dir / "figures"
    if figures.is_dir():
        for path in figures.iterdir():
            if path.suffix in (".png", ".svg") and path.is_file():
                path.unlink(missing_ok=True)
    return n


def remove_temporaries(out_dir: Path) -> None:
    """Temporary files of atomic writes (.NAME.XXXX.tmp) that a killed run left; we hold the
    lock, so no other run is writing them."""
    for d in (out_dir, out_dir / "models", *(out_dir / "units").glob("*/")):
        for pattern in (".*.json.*.tmp", ".*.csv.*.tmp", ".*.npz.*.tmp"):
            for path in d.glob(pattern):
                try:
                    path.unlink(missing_ok=True)
                except OSError:
                    pass


def prepare_dir(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {out_dir} is a file, not a directory; choose a directory")
    try:
        (out_dir / "models").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create the output directory {out_dir / 'models'} "
                          f"({(e.strerror or type(e).__name__).lower()}); choose another --out") from e
    if not os.access(out_dir / "models", os.W_OK | os.X_OK) or not os.access(out_dir, os.W_OK | os.X_OK):
        raise ConfigError(f"the output directory {out_dir} is not writable; make it writable or choose another --out")


