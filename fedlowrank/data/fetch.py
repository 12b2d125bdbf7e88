"""The Shakespeare corpus where a user's checkout has none: the default ``data.path``
(``../shared/data/tinyshakespeare.txt``, beside the project in its own workplace) is used when it exists; otherwise
the corpus is downloaded once (Karpathy's char-rnn ``tinyshakespeare``, 1,115,394 bytes) into a cache
(``FEDLOWRANK_DATA_CACHE``, else ``~/.cache/fedlowrank``) and checked against its pinned SHA-256 before use.
Offline, or on a checksum mismatch, the run stops with exit 2 naming ``data.path`` and the URL. A path the user
gave is never replaced."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from fedlowrank.schema import ConfigError

DEFAULT_PATH = "../shared/data/tinyshakespeare.txt"
URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


def cache_dir() -> Path:
    return Path(os.environ.get("FEDLOWRANK_DATA_CACHE") or Path.home() / ".cache" / "fedlowrank")


def _download(url: str, timeout: float = 60.0) -> bytes:
    from urllib.request import urlopen

    with urlopen(url, timeout=timeout) as r:  # noqa: S310 - a fixed https URL, checked by its digest below
        return r.read(16 << 20)


def shakespeare_path(path: str | None) -> str:
    """``path`` when it is a file; for the default path (or none) that is missing, the cached corpus, fetched and
    verified on first use; else a :class:`ConfigError` naming ``data.path``."""
    if path and Path(path).is_file():
        return path
    if path not in (None, DEFAULT_PATH):
        raise ConfigError(f"data.path={path!r} is not a file (tinyshakespeare.txt, or text in its format: speaker "
                          "lines 'NAME:' followed by their speech)")
    cached = cache_dir() / f"tinyshakespeare-{SHA256[:12]}.txt"
    if cached.is_file():
        return str(cached)
    try:
        data = _download(URL)
    except Exception as e:  # offline, DNS, HTTP error: one clear message
        raise ConfigError(f"data.path={DEFAULT_PATH!r} does not exist here and the corpus could not be downloaded "
                          f"from {URL} ({type(e).__name__}: {str(e)[:120]}); connect once (it is cached in "
                          f"{cached.parent}) or give data.path=<tinyshakespeare.txt>") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != SHA256:
        raise ConfigError(f"the corpus downloaded from {URL} has SHA-256 {digest[:16]}…, not the pinned "
                          f"{SHA256[:16]}…; nothing was cached: give data.path=<tinyshakespeare.txt>")
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, cached)
    return str(cached)


__all__ = ["DEFAULT_PATH", "SHA256", "URL", "cache_dir", "shakespeare_path"]
