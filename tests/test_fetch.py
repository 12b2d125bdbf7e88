"""The Shakespeare corpus where a checkout has none: the default data.path is used when present; otherwise the
corpus is downloaded once into the cache, verified against its pinned SHA-256 and reused; offline or on a
mismatch the error names data.path and the URL and nothing is cached. (The real download needs the internet:
here the network is replaced by the shared copy's bytes, or by a failure.)"""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from fedlowrank.config import ConfigError
from fedlowrank.data import fetch

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


@pytest.fixture
def elsewhere(tmp_path, monkeypatch):
    """A checkout without ../shared: the default path points nowhere, the cache is empty."""
    monkeypatch.setattr(fetch, "DEFAULT_PATH", str(tmp_path / "no" / "tinyshakespeare.txt"))
    monkeypatch.setenv("FEDLOWRANK_DATA_CACHE", str(tmp_path / "cache"))
    return tmp_path


def test_a_given_file_is_used_as_it_is_and_a_missing_one_is_named(tmp_path):
    f = tmp_path / "play.txt"
    f.write_text("ROMEO:\nHi.\n")
    assert fetch.shakespeare_path(str(f)) == str(f)
    with pytest.raises(ConfigError, match="data.path='/nowhere/x.txt' is not a file"):
        fetch.shakespeare_path("/nowhere/x.txt")


@pytest.mark.skipif(not SHAKESPEARE.is_file(), reason="needs ../shared/data/tinyshakespeare.txt")
def test_the_pinned_digest_is_the_corpus_and_it_is_fetched_once(elsewhere, monkeypatch):
    assert hashlib.sha256(SHAKESPEARE.read_bytes()).hexdigest() == fetch.SHA256
    calls = []

    def fake_download(url, timeout=60.0):
        calls.append(url)
        return SHAKESPEARE.read_bytes()

    monkeypatch.setattr(fetch, "_download", fake_download)
    got = fetch.shakespeare_path(fetch.DEFAULT_PATH)
    assert Path(got).read_bytes() == SHAKESPEARE.read_bytes() and calls == [fetch.URL]
    assert fetch.shakespeare_path(None) == got and calls == [fetch.URL]  # cached: no second download


def test_offline_or_a_wrong_digest_is_a_clear_error_and_caches_nothing(elsewhere, monkeypatch):
    def offline(url, timeout=60.0):
        raise OSError("network is unreachable")

    monkeypatch.setattr(fetch, "_download", offline)
    with pytest.raises(ConfigError, match=r"data\.path=.*could not be downloaded from https://.*give data\.path="):
        fetch.shakespeare_path(None)
    monkeypatch.setattr(fetch, "_download", lambda url, timeout=60.0: b"not the corpus")
    with pytest.raises(ConfigError, match="not the pinned"):
        fetch.shakespeare_path(None)
    assert not any((elsewhere / "cache").glob("*.txt"))


def test_both_modes_resolve_the_default_corpus_at_validation(elsewhere, monkeypatch):
    from fedlowrank.config import federated_run_from_cfg

    from helpers import central_run, compose_cfg

    def offline(url, timeout=60.0):
        raise OSError("offline")

    monkeypatch.setattr(fetch, "_download", offline)
    with pytest.raises(ConfigError, match="could not be downloaded"):
        federated_run_from_cfg(compose_cfg("experiment=fed_shakespeare", f"data.path={fetch.DEFAULT_PATH}",
                                           f"out_dir={elsewhere}"))
    with pytest.raises(ConfigError, match="could not be downloaded"):
        central_run(elsewhere / "c", "mode=central", "model=lstm", "data=shakespeare",
                    f"data.path={fetch.DEFAULT_PATH}")
