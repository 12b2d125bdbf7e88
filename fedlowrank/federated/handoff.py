"""A run's data, built once by ``main.py`` and handed to the processes of its runtime.

On the default runtime the ServerApp runs in Flower's simulation process and every client actor is a Ray worker
process; each used to load (or, for Synthetic, generate) the whole data and its partitions itself: 10,000
Synthetic clients cost ~10 s and ~2 GB per process. ``main.py`` now writes the data it has already built for its
checks to ``<out_dir>/flwr_runtime/data/`` (raw tensors + ``meta.json`` + the partitions as ``.npz`` arrays, no
pickle) and names the directory in ``FEDLOWRANK_RUN_DATA`` for the processes it starts. A process whose run has
the same data key maps the tensors (``torch.from_file``: pages come from the page cache, shared between
processes, copied only if written) instead of rebuilding them; any other run, or a damaged or mismatched file,
builds its data as before.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

log = logging.getLogger(__name__)
ENV = "FEDLOWRANK_RUN_DATA"
DTYPES = {"float32": torch.float32, "int64": torch.int64}


def data_key(args: tuple) -> str:
    """What decides a run's data: ``task.data_args`` without the data root and file path (index 1 and 4), which
    name where the files are read from and are relative to each process's working directory; the hand-over
    directory belongs to one run, named only to the processes that run starts."""
    norm = [None if i in (1, 4) else a for i, a in enumerate(args)]
    return hashlib.sha256(json.dumps(norm, default=str).encode()).hexdigest()


def _tensors(fd) -> dict[str, torch.Tensor]:
    out = {"x": fd.x, "y": fd.y, "test_x": fd.test.tensors[0], "test_y": fd.test.tensors[1]}
    if fd.y_eval is not None:
        out["y_eval"] = fd.y_eval
    return out


def write(fd, args: tuple, dest: Path) -> None:
    """``fd`` (a FedData) into ``dest``, replaced atomically."""
    tmp = dest.with_name(f"{dest.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    meta: dict = {"key": data_key(args), "num_classes": fd.num_classes, "clients": len(fd.train_parts),
                  "heldout": fd.heldout_parts is not None, "tensors": {}}
    for name, t in _tensors(fd).items():
        t = t.contiguous()
        if str(t.dtype).removeprefix("torch.") not in DTYPES:
            raise TypeError(f"cannot hand over a {t.dtype} tensor")
        t.numpy().tofile(tmp / f"{name}.bin")
        meta["tensors"][name] = [str(t.dtype).removeprefix("torch."), list(t.shape)]
    for kind, parts in (("train", fd.train_parts), ("heldout", fd.heldout_parts or [])):
        np.savez(tmp / f"{kind}.npz", **pack_parts(parts))
    (tmp / "meta.json").write_text(json.dumps(meta))
    shutil.rmtree(dest, ignore_errors=True)
    os.rename(tmp, dest)


def pack_parts(parts: list[np.ndarray]) -> dict[str, np.ndarray]:
    """Per-client index arrays as two arrays: ``flat`` (all indices, int64) and ``sizes`` (one per client)."""
    return {"flat": np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64),
            "sizes": np.array([len(p) for p in parts], dtype=np.int64)}


def unpack_parts(flat: np.ndarray, sizes: np.ndarray) -> list[np.ndarray]:
    """The per-client index arrays :func:`pack_parts` packed."""
    return np.split(flat, np.cumsum(sizes)[:-1]) if len(sizes) else []


def _parts(src: Path, kind: str, n: int, rows: int) -> list[np.ndarray]:
    with np.load(src / f"{kind}.npz", allow_pickle=False) as z:
        flat, sizes = z["flat"], z["sizes"]
    if sizes.shape != (n,) or sizes.min(initial=0) < 0 or sizes.sum() != len(flat) or \
            (len(flat) and not 0 <= flat.min() <= flat.max() < rows):
        raise ValueError(f"{kind} partitions do not fit {rows} examples and {n} clients")
    return unpack_parts(flat, sizes)


def read(args: tuple, fed_data_cls):
    """The ``fed_data_cls`` (FedData) handed over for ``args``, or None (no hand-over, another run's, or
    unreadable)."""
    src = os.environ.get(ENV)
    if not src:
        return None
    src_dir = Path(src)
    try:
        meta = json.loads((src_dir / "meta.json").read_text())
        if meta.get("key") != data_key(args):
            return None
        t = {}
        for name, (dtype, shape) in meta["tensors"].items():
            numel, path = int(np.prod(shape)), src_dir / f"{name}.bin"
            if path.stat().st_size != numel * DTYPES[dtype].itemsize:
                raise ValueError(f"{name}.bin holds {path.stat().st_size} bytes, not {numel} x {dtype}")
            t[name] = torch.from_file(str(path), shared=False, size=numel, dtype=DTYPES[dtype]).reshape(shape)
        n, rows = int(meta["clients"]), len(t["x"])
        train = _parts(src_dir, "train", n, rows)
        held = _parts(src_dir, "heldout", n, rows) if meta["heldout"] else None
        test = TensorDataset(t["test_x"], t["test_y"])
        return fed_data_cls(t["x"], t["y"], train, held, test, int(meta["num_classes"]), t.get("y_eval"))
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("the run's handed-over data in %s is unusable (%s); building it again", src_dir, e)
        return None
