"""What a federated run trains on, from its config: the data, every client's train (and held-out)
split, and the dense model. Image tasks (digits, CIFAR-10) classify images; ``shakespeare`` is
LEAF-style next-character prediction with one client per speaking role. Loaded once per process
(cached), so a simulated or deployed node recomputes nothing between messages."""
from __future__ import annotations

import copy
import functools
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from fedlowrank.config import TEXT_SPECS as TEXT_TASKS
from fedlowrank.config import FederatedRun
from fedlowrank.config.fed_lora import INSTRUCTION_SPECS, text_tokenizer
from fedlowrank.data.partition import natural_split, partition_indices
from fedlowrank.federated.run_config import node_cache_dir
from fedlowrank.models.build import dense_model
from fedlowrank.training.loop import IGNORE


@dataclass
class FedData:
    """Example tensors, each client's training indices and, where the task has them, each client's own
    held-out indices (both into ``x``/``y``), plus the global test set. Image x: (N, C, H, W), y: (N,);
    text x, y: (N, T) character ids."""

    x: torch.Tensor
    y: torch.Tensor
    train_parts: list[np.ndarray]
    heldout_parts: list[np.ndarray] | None
    test: TensorDataset
    num_classes: int  # classes, or vocabulary size for text
    y_eval: torch.Tensor | None = None  # text: the targets scored at evaluation (IGNORE where not scored)

    def _subset(self, idx: np.ndarray, y: torch.Tensor | None = None) -> TensorDataset:
        t = torch.as_tensor(idx, dtype=torch.long)
        return TensorDataset(self.x[t], (self.y if y is None else y)[t])

    def client_train(self, pid: int) -> TensorDataset:
        return self._subset(self.train_parts[pid])

    def client_heldout(self, pid: int) -> TensorDataset | None:
        return None if self.heldout_parts is None else self._subset(self.heldout_parts[pid], self.y_eval)


def leaf_targets(y: torch.Tensor) -> torch.Tensor:
    """LEAF's evaluation of next-character prediction: only the character after each window's full context is
    scored; every other position's target becomes :data:`IGNORE`. y: (N, T) -> (N, T)."""
    out = torch.full_like(y, IGNORE)
    out[:, -1] = y[:, -1]
    return out


def _holdout(parts: list[np.ndarray], fraction: float, seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Split every client's indices: a seeded ``fraction`` held out for its personalised evaluation."""
    rng = np.random.default_rng(seed)
    train, held = [], []
    for p in parts:
        p = rng.permutation(p)
        k = int(round(fraction * len(p)))
        held.append(np.sort(p[:k]))
        train.append(np.sort(p[k:]))
    return train, held


@functools.lru_cache(maxsize=4)
def _cached(*args) -> FedData:
    """``_load(*args)``, once per process; on a deployed node with ``FEDLOWRANK_CACHE_DIR`` set, from its disk
    cache (:mod:`fedlowrank.deploy.cache`) when an earlier process computed it already. A simulation sets no
    cache directory and writes nothing outside its output directory."""
    from . import handoff

    handed = handoff.read(args, FedData)  # main.py built it already for this run (fedlowrank.federated.handoff)
    if handed is not None:
        return handed
    if node_cache_dir() is None:
        return _load_single_blas(*args)
    from fedlowrank.deploy import cache

    text = args[0] in (*TEXT_TASKS, *INSTRUCTION_SPECS) and args[14] == "local"  # [14]: data.source, [15]: tokenizer
    key = cache.cache_key(args, [args[4] if text else None, args[15] if text else None])
    hit = cache.load(key, FedData)
    if hit is not None:
        return hit
    fd = _load_single_blas(*args)
    cache.save(key, fd)
    return fd


def _load_single_blas(*args) -> FedData:
    """``_load(*args)`` with numpy's OpenBLAS on one thread: its products here are small (Synthetic's labels are
    (n, 60) x (60, 10) per client), and inside a simulation whose clients hold the cores its thread pool stalled
    each call for seconds (1000 Synthetic clients had not reached round 1 after 400 s; 24 s with one thread).
    Torch's own thread pools are left alone."""
    from threadpoolctl import ThreadpoolController

    with ThreadpoolController().select(prefix=["libscipy_openblas", "libopenblas"]).limit(limits=1):
        return _load(*args)


def _synthetic(n: int, alpha: float, beta: float, iid: bool, seed: int, test_fraction: float) -> FedData:
    """FedProx's Synthetic(alpha, beta): one client per generated user; the pooled test set is every client's
    held-out split."""
    from fedlowrank.data.synthetic import CLASSES, generate

    sd = generate(n, alpha, beta, iid=iid, seed=seed, test_fraction=test_fraction)
    t = torch.as_tensor(np.concatenate(sd.heldout_parts), dtype=torch.long)
    return FedData(sd.x, sd.y, sd.train_parts, sd.heldout_parts, TensorDataset(sd.x[t], sd.y[t]), CLASSES)


def _load(name: str, root: str, download: bool, seed: int, path: str | None, seq_len: int, test_fraction: float,
          kind: str, n: int, alpha: float, min_size: int, holdout: float, eval_target: str = "all",
          synthetic: tuple[float, float, bool] = (1.0, 1.0, False), source: str = "local",
          tokenizer: str | None = None) -> FedData:
    if source == "hub" and name not in INSTRUCTION_SPECS:
        from fedlowrank.data.hub import load_hub

        hd = load_hub(name, kind, n, alpha, seed + 42, min_size, test_fraction)
        if hd.test is None:
            t = torch.as_tensor(np.concatenate(hd.heldout), dtype=torch.long)
            test = TensorDataset(hd.x[t], hd.y[t])
        else:
            test = TensorDataset(*hd.test)
        return FedData(hd.x, hd.y, hd.parts, hd.heldout, test, hd.num_classes)
    if name == "synthetic":
        return _synthetic(n, *synthetic, seed, test_fraction)
    if name in INSTRUCTION_SPECS:
        return _instructions(path, source, tokenizer, seq_len, test_fraction, seed, (kind, n, alpha, min_size))
    if name in TEXT_TASKS:
        from fedlowrank.data.shakespeare import load_role_text, natural_partitions

        text = load_role_text(path or "", seq_len, test_fraction, seed, tokenizer)
        y_eval = leaf_targets(text.y) if eval_target == "last" else text.y
        if kind == "natural":
            train, held = natural_partitions(text, n, min_size)
            t = torch.as_tensor(np.concatenate(held), dtype=torch.long)  # every participating role's held-out
            return FedData(text.x, text.y, train, held, TensorDataset(text.x[t], y_eval[t]), text.vocab_size, y_eval)
        tr, te = np.flatnonzero(~text.test), np.flatnonzero(text.test)
        parts = [tr[p] for p in partition_indices(torch.zeros(len(tr), dtype=torch.long), kind, n, alpha, seed + 42,
                                                  min_size)]
        t = torch.as_tensor(te, dtype=torch.long)
        return FedData(text.x, text.y, parts, None, TensorDataset(text.x[t], y_eval[t]), text.vocab_size, y_eval)
    from fedlowrank.data.vision import load_image_data

    data = load_image_data(name, root=root, download=download, seed=seed)
    parts = partition_indices(data.y_train, kind, n, alpha, seed + 42, min_size)
    held = None
    if holdout > 0:
        parts, held = _holdout(parts, holdout, seed + 7)
    return FedData(data.x_train, data.y_train, parts, held, data.test_set(), data.num_classes)


def _instructions(path: str | None, source: str, tokenizer: str | None, seq_len: int, test_fraction: float,
                  seed: int, split: tuple[str, int, float, int]) -> FedData:
    """Dolly-layout instructions (:mod:`fedlowrank.data.instructions`): one client per category (natural; the
    ``n`` largest), or an iid / Dirichlet-over-categories split with each client's own held-out share."""
    from fedlowrank.data import instructions as ins
    from fedlowrank.data.prepare import eos_id
    from fedlowrank.data.text import make_tokenizer

    kind, n, alpha, min_size = split
    records = ins.hub_records() if source == "hub" else ins.read_jsonl(path or "")
    spec = tokenizer or "byte"
    data = ins.encode(records, make_tokenizer(spec), eos_id(spec), seq_len, test_fraction, seed)
    if kind == "natural":
        train, held = natural_split(data.category, data.test, n, min_size, "categories", "training examples")
    else:
        parts = partition_indices(torch.as_tensor(data.category), kind, n, alpha, seed + 42, min_size)
        train, held = _holdout(parts, test_fraction, seed + 7)
    t = torch.as_tensor(np.concatenate(held), dtype=torch.long)
    return FedData(data.x, data.y, train, held, TensorDataset(data.x[t], data.y[t]), data.vocab_size, data.y)


LOGITS_PER_PASS = 1 << 24  # evaluation: at most this many logits (64 MB in fp32) per forward pass


def eval_batch(run: FederatedRun, fd: FedData, cap: int) -> int:
    """Examples per evaluation forward pass: ``cap``, fewer where an example's logits are many (a sequence of T
    positions over the model's V outputs: T·V; GPT-2's 50,257 tokens over 64 positions are 12.9 MB an example)."""
    positions = fd.x.shape[1] if fd.x.dim() == 2 and fd.y.dim() == 2 else 1
    return max(1, min(cap, LOGITS_PER_PASS // max(1, positions * logits_width(run, fd))))


def logits_width(run: FederatedRun, fd: FedData) -> int:
    """Outputs per position of the run's model: the data's classes (vocabulary), or a pretrained checkpoint's
    ``vocab_size`` where that is larger (its tokenizer may use fewer ids than its output layer has)."""
    src = run.model.get("pretrained")
    if not src:
        return fd.num_classes
    from fedlowrank.models.hf import resolve
    from fedlowrank.models.hf_config import model_config

    return max(fd.num_classes, int(model_config(resolve(str(src)))[1].vocab_size))


def forget_data() -> None:
    """Drop this process's cached data (after handing it over, the copy it mapped replaces it on next use)."""
    _cached.cache_clear()


def data_args(run: FederatedRun) -> tuple:
    """Everything that decides the run's data and partitions (the arguments of ``_load``)."""
    d, f = run.data, run.fed
    return (d.name, d.root, d.download, d.seed, d.path, d.seq_len, d.test_fraction, f.partition, f.num_clients,
            f.alpha, f.min_partition_size, f.client_holdout, d.eval_target, (d.alpha, d.beta, d.iid), d.source,
            text_tokenizer(run) if d.name in (*TEXT_TASKS, *INSTRUCTION_SPECS) else None)


def fed_data(run: FederatedRun) -> FedData:
    """The run's data and partitions (cached per process; deterministic for a config)."""
    return _cached(*data_args(run))


def build_model(run: FederatedRun) -> nn.Module:
    """The dense model of the run (factorized later by the method/strategy). A pretrained one is a fresh module
    tree over this process's one frozen copy of the checkpoint's tensors (:func:`pretrained_base`)."""
    if run.model.get("pretrained"):
        return shared_copy(pretrained_base(str(run.model["pretrained"])))
    vocab = fed_data(run).num_classes if run.data.name in TEXT_TASKS else None  # Hub text: 256 byte ids
    return dense_model(run.model, run.data.name, vocab)


@functools.lru_cache(maxsize=1)
def pretrained_base(src: str) -> nn.Module:
    """The checkpoint's model, loaded once per process, every tensor frozen (shared by every client it runs)."""
    from fedlowrank.models.hf import load_pretrained

    model, _ = load_pretrained(src)
    model.requires_grad_(False)
    return model


def shared_copy(model: nn.Module) -> nn.Module:
    """A new module tree whose parameters and buffers are ``model``'s own tensors (no copy): modules can be
    replaced in it (adapters) without touching ``model``."""
    memo = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return copy.deepcopy(model, memo)
