"""The Hugging Face hub: whether it is switched off or reachable, and whether a hub model can
load, from the hub or the local hub cache, before transformers spends its retries finding out."""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
import urllib.parse

from sheafscope.errors import ModelLoadError
from sheafscope.models import offline

log = logging.getLogger(__name__)

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
HUB_PROBE_SECONDS = 3.0


def hub_hint(known_unreachable: bool = False) -> str:
    lead = " Use" if known_unreachable else " This machine may not reach the model hub: use"
    return f"{lead} an offline alias ({', '.join(offline.OFFLINE_WEIGHTS)}), a local directory, or --init random."


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def hub_offline() -> bool:
    """Whether the hub is switched off ($HF_HUB_OFFLINE or $TRANSFORMERS_OFFLINE)."""
    return _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE")


def hub_reachable(timeout: float = HUB_PROBE_SECONDS) -> bool:
    """A quick TCP probe of the hub endpoint ($HF_ENDPOINT). Without it, an unreachable hub
    costs transformers' retries (about 35 s and ten warnings) before the error. Behind a proxy
    ($HTTPS_PROXY, $ALL_PROXY) the probe cannot tell, so the hub counts as reachable."""
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    ok: list[bool] = []

    def probe():  # in a thread: name resolution ignores socket timeouts
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)
    return bool(ok)


def _in_hub_cache(hub_id: str, revision: str | None) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(hub_id, "config.json", revision=revision), str)
    except Exception:
        return False


def hub_preflight(spec: str, hub_id: str, revision: str | None) -> bool:
    """Whether to load from the local hub cache only; refuses at once when the hub is off or
    unreachable and the model is not cached."""
    if hub_offline():
        if not _in_hub_cache(hub_id, revision):
            raise ModelLoadError(
                f"could not load '{spec}' (hub): HF_HUB_OFFLINE is set and {hub_id}"
                f"{'@' + revision if revision else ''} is not in the local hub cache.{hub_hint(True)}"
            )
        return True
    if hub_reachable():
        return False
    if _in_hub_cache(hub_id, revision):
        log.warning("the model hub is unreachable: loading %s from the local hub cache", hub_id)
        return True
    raise ModelLoadError(f"could not load '{spec}' (hub): the model hub cannot be reached from this machine "
                         f"and {hub_id} is not in the local hub cache.{hub_hint(True)}")
