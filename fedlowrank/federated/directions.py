"""Which way each client's update points, against the others': the direction gate of ``fed.screen_cusum``.

A client's change is taken in the space of what the model computes: for every factorized layer the change of its
product U·V (out, fan_in), whatever the client's rank, and for every other floating-point tensor the change itself
(BatchNorm's running statistics left out: they are statistics, not a direction of training). Clients of different
budgets are comparable there; their raw factors are not.
"""
from __future__ import annotations

import torch

from .aggregation import State

# fed.screen_cusum counts a round's rise in full where the client's change points away from the others' (cosine with
# the sum of their changes below DISAGREE) and at most ALONG_CAP nats where it does not. Default MLP on digits, iid,
# 40 clean runs: honest cosines >= -0.17 in every round where a client raised the server sample's loss by more than
# 0.1 nat (by up to 1.6 nats in one round, which alone passed the 1.5-nat bound in 2 of 20 seeds); reversed changes
# (k = 1, 1.4) at -0.50 to -0.66 in their first round. The ViT (5 seeds): reversed changes' rises are small (0.1-0.75
# nat a round) and point at -0.22 to -0.61, sometimes above -0.2: capped, not dropped, such rounds still add up.
# Honest sums with the cap stay <= 0.86 (40 MLP seeds; 1.93 without the gate). docs/results.md, "The cumulative rule
# counts only disagreeing rounds".
DISAGREE, ALONG_CAP = -0.2, 0.3
STATS = ("running_mean", "running_var", "num_batches_tracked")


def change(update: State, sent: State) -> torch.Tensor:
    """(D,) float64: ``update`` minus ``sent`` in the space of the model's products (see the module's docstring).
    Tensors the client was not sent, or got back in another shape, are left out."""
    parts = []
    for k in sorted(update):
        t = update[k]
        if not t.is_floating_point() or k.endswith(STATS) or k.endswith(".V") and k[:-2] + ".U" in update:
            continue
        v = k[:-2] + ".V"
        if k.endswith(".U") and v in update and k in sent and v in sent:
            d = t.double() @ update[v].double() - sent[k].double() @ sent[v].double()
        elif k in sent and sent[k].shape == t.shape:
            d = t.double() - sent[k].double()
        else:
            continue
        parts.append(d.flatten())
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)


def cosines(changes: list[torch.Tensor]) -> list[float | None]:
    """Per change, its cosine with the sum of the others' (0 where either is zero); None for every change where
    they are not of one length (not comparable: the gate then counts every rise, as without it)."""
    if len({c.shape for c in changes}) != 1:
        return [None] * len(changes)
    total = torch.stack(changes).sum(0)
    out: list[float | None] = []
    for c in changes:
        o = total - c
        den = float(c.norm() * o.norm())
        out.append(float(c @ o) / den if den > 0 else 0.0)
    return out


def round_cosines(strategy: str, valid: list) -> list[float | None]:
    """Per valid reply of a round ((pid, update, weight, metrics, sent) entries), the cosine the cumulative rule gates
    on; None everywhere on dense ``fedavg``, which averages whole tensors and needs no gate (honest sums stay small)."""
    if strategy == "fedavg":
        return [None] * len(valid)
    return cosines([change(v[1], v[4]) for v in valid])


def counted(rise: float, cos: float | None) -> float:
    """What a round's rise adds to a client's cumulative sum: all of it where its change points away from the
    others' (cosine below ``DISAGREE``) or the direction is unknown (None), at most ``ALONG_CAP`` otherwise."""
    return rise if cos is None or cos < DISAGREE else min(rise, ALONG_CAP)
