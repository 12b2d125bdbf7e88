"""Node-side disk cache of a run's data and partitions. A deployed SuperNode starts a fresh process
for every message; with this cache that process reads a few tensors instead of importing datasets
and recomputing partitions. Keyed by everything that decides the data (config values, and size and
mtime of input files), written atomically (unique temp dir, then rename), read without pickle
(safetensors and ``np.load(allow_pickle=False)``). Used only where ``FEDLOWRANK_CACHE_DIR`` names a directory
(set it on your SuperNodes; :mod:`.loopback` sets it for its nodes); unset, empty or ``off``: no cache.

The cache holds at most ``FEDLOWRANK_CACHE_MAX_GB`` (default 4 GB): after each write, the entries used least
recently (each hit touches its entry) are deleted until it fits, and an entry larger than the whole limit is not
kept. A damaged entry is deleted when it is found, so the recomputed data replace it."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
from safetensors.torch import load_file, save_file
from torch.utils.data import TensorDataset

from fedlowrank.federated.handoff import pack_parts, unpack_parts
from fedlowrank.federated.run_config import CONF_DIR, compose_cfg, node_cache_dir

log = logging.getLogger(__name__)
VERSION = 1
MAX_ENV = "FEDLOWRANK_CACHE_MAX_GB"
DEFAULT_MAX_GB = 4.0


def max_bytes() -> int:
    """The cache's size limit from ``FEDLOWRANK_CACHE_MAX_GB`` (a bad value: the default, with a warning)."""
    raw = os.environ.get(MAX_ENV, "")
    try:
        gb = float(raw) if raw else DEFAULT_MAX_GB
        if not gb >= 0:
            raise ValueError
    except ValueError:
        log.warning("%s=%r is not a size in GB >= 0; using %g", MAX_ENV, raw, DEFAULT_MAX_GB)
        gb = DEFAULT_MAX_GB
    return int(gb * 2**30)


def _size(path: Path) -> int:
    try:
        if path.is_file():
            return path.stat().st_size
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    except OSError:  # removed meanwhile by another process
        return 0


def _remove(path: Path) -> None:
    """Delete an entry: renamed aside first (atomic), so no reader sees half of it."""
    aside = path.with_name(f"{path.name}.gone{os.getpid()}")
    try:
        os.rename(path, aside)
    except OSError:
        return
    if aside.is_dir():
        shutil.rmtree(aside, ignore_errors=True)
    else:
        aside.unlink(missing_ok=True)


def _entries(root: Path) -> list[Path]:
    """Complete entries (no temp or removed ones): data directories and config files."""
    out = [p for p in (root / "fed-data").glob("*") if p.is_dir() and "." not in p.name]
    return out + [p for p in (root / "configs").glob("*.yaml")]


def evict(root: Path, keep: Path | None = None, limit: int | None = None) -> list[Path]:
    """Delete the least recently used entries (by mtime) until the cache fits ``limit`` bytes
    (:func:`max_bytes`); ``keep`` (the entry just written) is never deleted. Returns what was deleted."""
    limit = max_bytes() if limit is None else limit
    sized = []
    for p in _entries(root):
        try:
            sized.append((p.stat().st_mtime_ns, p, _size(p)))
        except OSError:
            continue
    total, gone = sum(s for _, _, s in sized), []
    for _, p, s in sorted(sized, key=lambda e: e[0]):
        if total <= limit:
            break
        if keep is not None and p == keep:
            continue
        _remove(p)
        total -= s
        gone.append(p)
    if gone:
        log.info("node cache over %.2f GB: deleted %d least recently used entr%s", limit / 2**30, len(gone),
                 "y" if len(gone) == 1 else "ies")
    return gone


def _touch(path: Path) -> None:
    try:
        os.utime(path)
    except OSError:
        pass


def cache_key(args: tuple, files: list[str | None]) -> str:
    """Digest of the loader's arguments and the identity (path, size, mtime) of the files it reads."""
    stamp = []
    for f in files:
        if f and os.path.isfile(f):
            st = os.stat(f)
            stamp.append([os.path.abspath(f), st.st_size, st.st_mtime_ns])
    blob = json.dumps({"v": VERSION, "args": list(args), "files": stamp}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _unpack(z) -> list[np.ndarray]:
    return [a.copy() for a in unpack_parts(z["flat"], z["sizes"])]


def save(key: str, fd) -> None:
    """Write ``fd`` (a FedData) under the cache; a concurrent writer of the same key is harmless."""
    root = node_cache_dir()
    if root is None:
        return
    final = root / "fed-data" / key
    if final.exists():
        return
    tmp = final.with_name(f"{key}.tmp{os.getpid()}")
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        x_test, y_test = fd.test.tensors
        save_file({"x": fd.x.contiguous(), "y": fd.y.contiguous(), "x_test": x_test.contiguous(),
                   "y_test": y_test.contiguous()}, str(tmp / "tensors.safetensors"))
        np.savez(tmp / "train.npz", **pack_parts(fd.train_parts))
        if fd.heldout_parts is not None:
            np.savez(tmp / "heldout.npz", **pack_parts(fd.heldout_parts))
        (tmp / "meta.json").write_text(json.dumps({"num_classes": fd.num_classes}))
        size = _size(tmp)
        if size > max_bytes():
            log.info("fed-data cache entry of %.2f GB exceeds %s: not kept", size / 2**30, MAX_ENV)
            return
        os.rename(tmp, final)
        evict(root, keep=final)
    except OSError as e:  # another process won the rename, or the disk refused: the cache is optional
        log.debug("fed-data cache not written (%s)", e)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load(key: str, cls):
    """The cached FedData for ``key`` (an instance of ``cls``), or None when absent or unreadable."""
    root = node_cache_dir()
    path = root / "fed-data" / key if root is not None else None
    if path is None or not (path / "meta.json").is_file():
        return None
    try:
        t = load_file(str(path / "tensors.safetensors"))
        with np.load(path / "train.npz", allow_pickle=False) as z:
            train = _unpack(z)
        held = None
        if (path / "heldout.npz").is_file():
            with np.load(path / "heldout.npz", allow_pickle=False) as z:
                held = _unpack(z)
        meta = json.loads((path / "meta.json").read_text())
        out = cls(t["x"], t["y"], train, held, TensorDataset(t["x_test"], t["y_test"]), int(meta["num_classes"]))
    except Exception as e:  # a damaged entry is deleted and recomputed, never trusted
        log.warning("deleting damaged fed-data cache %s (%s); it is rebuilt", path, e)
        _remove(path)
        return None
    _touch(path)
    return out


def composed_config(overrides: list[str], conf_dir: Path, compose):
    """``compose(overrides)`` (Hydra: 0.3-0.6 s a call, paid by every message a deployed node handles),
    kept as YAML under the cache, keyed by the overrides, the Hydra/OmegaConf versions, the sections' dataclass
    defaults and the bytes of every ``*.yaml`` below ``conf_dir``; a config that fails to compose is never
    cached."""
    import hydra
    import omegaconf
    from omegaconf import OmegaConf

    root = node_cache_dir()
    if root is None:
        return compose(overrides)
    from fedlowrank.config.store import schema_defaults

    # the sections' defaults come from the dataclasses (ConfigStore), the rest from the YAML files
    h = hashlib.sha256(json.dumps([VERSION, hydra.__version__, omegaconf.__version__, overrides,
                                   schema_defaults()], sort_keys=True, default=str).encode())
    for f in sorted(conf_dir.rglob("*.yaml")):
        h.update(f.relative_to(conf_dir).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    path = root / "configs" / f"{h.hexdigest()[:32]}.yaml"
    if path.is_file():
        try:
            cfg = OmegaConf.load(path)
            OmegaConf.set_struct(cfg, True)
            _touch(path)
            return cfg
        except Exception as e:  # a damaged entry is recomposed (and replaced), never trusted
            log.warning("ignoring damaged config cache %s (%s); it is rebuilt", path, e)
    cfg = compose(overrides)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, tmp)
        os.replace(tmp, path)
        evict(root, keep=path)
    except OSError as e:  # the cache is optional
        log.debug("config cache not written (%s)", e)
        tmp.unlink(missing_ok=True)
    return cfg


def cached_compose(overrides: list[str]):
    """The project's config for ``overrides``, through :func:`composed_config` (the node's config cache)."""
    return composed_config(overrides, CONF_DIR, compose_cfg)
