"""The defaults of the defences against hostile clients, checked and resolved per run.

``fed.screen=auto`` (default) is ``exclude`` for models trained from scratch whose clients hold data out (the
server's sample is drawn from there), except Synthetic; ``none`` for ``method=lora``, Synthetic or without held-out
splits.
``fed.clip_auto=auto`` (default) is off where a screen runs (neither alters an honest update of the default run)
and 1.5 where none does (``method=lora``: clipping in the space of ΔW). ``fed.screen_rollback`` (``exclude``,
no server optimizer): excluding a client takes the global model back to before the earliest of the last that
many rounds that aggregated its update (``auto``: 5, 1 for the ViT). ``fed.screen_cusum=auto`` (``exclude``: dense
FedAvg, and ``slice`` on an iid partition) also excludes a client whose one-sided cumulative loss rise passes 0.5
(1.5) nats. See docs/reliability.md.
``fed.lr=auto`` (default) is the clients' learning rate for the model: the screen's bounds hold only where honest
training does not blow up, which the CNN's does at the MLP's rate. ``fed.bn_stats=auto`` (default) is ``server`` where
the run holds examples out for the server's sample, else ``aggregate`` (fedlowrank.federated.bn_stats)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fedlowrank.schema import ConfigError

if TYPE_CHECKING:
    from .federated import FedConfig, FederatedRun

SCREENS = ("auto", "none", "loo", "exclude")
ROBUST = ("none", "median", "trimmed_mean", "krum")
CLIP_WHERE_UNSCREENED = 1.5
# fed.screen_cusum=auto (no method): dense FedAvg 0.5 nats (honest clients' cumulative rises <= 0.2 there, iid and
# Dirichlet 0.1; a reversed change's passed 0.5 in round 1-2); slice on an iid partition 1.5 (honest <= 0.75 with
# 4, 10 and 20 clients); off elsewhere: honest sums reached 1.0 under fedlmt (iid) and 4.9 under slice (Dirichlet
# 0.1). results.md, "Hostile clients"
CUSUM_SHARED, CUSUM_SLICE_IID = 0.5, 1.5
# fed.lr=auto: the clients' SGD learning rate (momentum 0.9) by model.arch, measured on digits. The MLP trains stably
# at 0.05 (0 of 600 honest updates altered, 10 seeds); the CNN's honest rounds blew up there now and then (the
# sample's loss to 14.4 nats; 17 honest updates of 10 clean runs excluded), at 0.02 not (0 altered, 0.979 against
# 0.961). Clean runs, 5 seeds: vit 0.832 at 0.01 against 0.656 at 0.05; vgg 0.865 at 0.02 against 0.829 (honest
# updates altered 21 against 46); resnet no better below 0.05. Others keep 0.05. results.md, "Hostile clients"
# fed.screen_rollback=auto: 5 rounds, 1 for the ViT. Undoing an excluded client's rounds keeps a reversed change from
# leaving a fast learner unstable (MLP, flip1.4 from the middle budget: -1.6 pt against -7.7 without, one seed at
# chance), while a slow learner loses more by undone rounds than the attack cost it. ViT on digits, 5 seeds, reversed
# changes k = 1 / 1.4 / 5: -9.9 to -20.8 pt undoing 5 rounds, -9.9 to -14.6 undoing 1, -6.1 to -13.6 undoing none;
# but without any a 100x change aggregated in round 1 left one seed at chance (-17.9 mean; -9.0 undoing 1, the
# crash floor). results.md, "Hostile clients"
ROLLBACK_BY_ARCH, ROLLBACK_DEFAULT = {"vit": 1}, 5
BN_STATS = ("auto", "server", "aggregate")
LR_BY_ARCH, LR_DEFAULT = {"cnn": 0.02, "vgg": 0.02, "vit": 0.01}, 0.05


def _clip_value(v: Any) -> float | None | str:
    """``fed.clip_auto`` typed: "auto", null or a number >= 1 (strings that spell a number are numbers)."""
    if v is None or v == "auto":
        return v
    try:
        x = float(v)
    except (TypeError, ValueError):
        x = float("nan")
    if isinstance(v, bool) or not x >= 1:
        raise ConfigError(f"fed.clip_auto must be auto, null or a number >= 1 (a multiple of the round's median "
                          f"change), got {v!r}")
    return x


def _positive(v: Any) -> bool:
    try:
        return float(v) > 0
    except (TypeError, ValueError):
        return False


def resolve_lr(run: FederatedRun) -> None:
    """``fed.lr``: ``auto`` becomes the model's rate (:data:`LR_BY_ARCH`); anything else must be a number."""
    f = run.fed
    if f.lr == "auto":
        f.lr = LR_BY_ARCH.get(run.model.get("arch"), LR_DEFAULT)
    elif isinstance(f.lr, bool) or not isinstance(f.lr, (int, float)):
        raise ConfigError(f"fed.lr must be auto or a number > 0, got {f.lr!r}")


def resolve_bn_stats(run: FederatedRun) -> None:
    """``fed.bn_stats``: ``auto`` becomes ``server`` where the run holds examples out (the server's sample exists:
    every task but local image data with ``fed.client_holdout=0``), else ``aggregate``; ``server`` without them is
    refused."""
    from fedlowrank.data.vision import IMAGE_SPECS

    f = run.fed
    holds_out = run.data.source == "hub" or run.data.name not in IMAGE_SPECS or f.client_holdout > 0
    if f.bn_stats not in BN_STATS:
        raise ConfigError(f"fed.bn_stats must be one of {BN_STATS}, got {f.bn_stats!r}")
    if f.bn_stats == "auto":
        f.bn_stats = "server" if holds_out else "aggregate"
    elif f.bn_stats == "server" and not holds_out:
        raise ConfigError("fed.bn_stats=server recomputes BatchNorm statistics on the server's sample, drawn from the "
                          "clients' held-out splits: set fed.client_holdout > 0, or fed.bn_stats=aggregate")


def check_defences(f: FedConfig) -> None:
    """The robust rule's, the screen's and clipping's keys, each on its own."""
    f.clip_auto = _clip_value(f.clip_auto)
    if f.screen not in SCREENS:
        raise ConfigError(f"fed.screen must be one of {SCREENS}, got {f.screen!r}")
    if f.robust not in ROBUST:
        raise ConfigError(f"fed.robust must be one of {ROBUST}, got {f.robust!r}")
    if f.robust == "krum" and f.krum_f < 0:
        raise ConfigError(f"fed.krum_f must be >= 0, got {f.krum_f}")
    if f.screen_rollback != "auto" and (type(f.screen_rollback) is not int or f.screen_rollback < 0):
        raise ConfigError(f"fed.screen_rollback must be auto or an integer >= 0 (rounds an exclusion may undo), got "
                          f"{f.screen_rollback!r}")
    if f.screen_cusum not in ("auto", None) and (isinstance(f.screen_cusum, bool) or not _positive(f.screen_cusum)):
        raise ConfigError(f"fed.screen_cusum must be auto, null or a number of nats > 0, got {f.screen_cusum!r}")
    if f.screen_examples < 1 or not f.screen_tolerance > 0 or not f.screen_nats > 0:
        raise ConfigError(f"fed.screen_examples must be >= 1 and fed.screen_tolerance, fed.screen_nats > 0; got "
                          f"{f.screen_examples}, {f.screen_tolerance}, {f.screen_nats}")


def screened(run: FederatedRun, text_specs: tuple[str, ...]) -> bool:
    """Whether ``auto`` screens this run: its clients hold data out (the server's sample comes from there: hub
    datasets, text by speaking role, images with ``fed.client_holdout > 0``) and honest rises stay far below the
    bound there. Not Synthetic: its honest clients' rises reach 1e10 nats (heterogeneous users, lr 0.05)."""
    d, f = run.data, run.fed
    if d.name == "synthetic":
        return False
    if d.source == "hub":
        return True
    return f.partition == "natural" if d.name in text_specs else f.client_holdout > 0


def resolve_defences(run: FederatedRun, lora: bool, text_specs: tuple[str, ...]) -> None:
    """Turn ``auto`` into the run's screen, rollback, clipping factor, cumulative bound and BatchNorm statistics (in
    place, before anything reads them)."""
    f = run.fed
    if f.screen == "auto":
        f.screen = "exclude" if not lora and screened(run, text_specs) else "none"
    if f.screen_rollback == "auto":
        f.screen_rollback = ROLLBACK_BY_ARCH.get(run.model.get("arch"), ROLLBACK_DEFAULT)
    if f.clip_auto == "auto":
        f.clip_auto = None if f.screen != "none" else CLIP_WHERE_UNSCREENED
    if f.screen_cusum == "auto":
        plain = f.screen == "exclude" and run.method.get("name", "none") == "none"
        bound = {"fedavg": CUSUM_SHARED, "slice": CUSUM_SLICE_IID if f.partition == "iid" else None}
        f.screen_cusum = bound.get(run.strategy) if plain else None
    elif f.screen_cusum is not None:
        f.screen_cusum = float(f.screen_cusum)
    resolve_bn_stats(run)
