"""After a federated run: per-client (personalised) evaluation on each client's own held-out split,
a label-skew summary of the partition, and a PNG report (accuracy per budget over rounds, rank per
client over rounds)."""
from __future__ import annotations

import logging
import math
import os
import re
from pathlib import Path

import numpy as np
import torch

from fedlowrank.config import TEXT_SPECS as TEXT_TASKS
from fedlowrank.config import FederatedRun
from fedlowrank.config.fed_lora import INSTRUCTION_SPECS
from fedlowrank.runtime.logs import SUMMARY_END
from fedlowrank.training.loop import example_sums, mean_loss_accuracy

from .aggregation import State
from .task import FedData, eval_batch

log = logging.getLogger(__name__)


def label_skew(fd: FedData) -> dict:
    """How far each client's label (or next-character) distribution is from the pooled one: total
    variation distance, share of the most frequent label, labels present; mean/min/max over clients."""
    k = fd.num_classes
    counts = np.stack([np.bincount(fd.y[p].reshape(-1).numpy(), minlength=k) for p in fd.train_parts]).astype(float)
    pooled = counts.sum(0) / counts.sum()
    shares = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    tv = 0.5 * np.abs(shares - pooled).sum(1)
    per = {"tv_distance": tv, "top_label_share": shares.max(1), "labels_present": (counts > 0).sum(1).astype(float),
           "train_examples": np.array([len(p) for p in fd.train_parts], dtype=float)}
    return {name: {"mean": float(v.mean()), "min": float(v.min()), "max": float(v.max())} for name, v in per.items()}


def budget_tag(budget: dict) -> str:
    """A budget as a metric-name prefix, e.g. ``ratio0.5``."""
    return "_".join(f"{k}{v}" for k, v in budget.items())


def budget_groups(by_partition: dict[int, dict], show: int = 4) -> str:
    """Partition ids grouped by budget, e.g. ``ratio=0.1: 250 (0, 4, 8, ..., 996); ratio=0.25: 1 (1)``: one short
    line for any number of clients, where the dict itself would print one entry per partition."""
    groups: dict[str, list[int]] = {}
    for pid, budget in sorted(by_partition.items()):
        groups.setdefault(", ".join(f"{k}={v}" for k, v in budget.items()), []).append(pid)
    return "; ".join(f"{b}: {len(p)} ({_first_and_last(p, show)})" for b, p in groups.items())


def _first_and_last(ids: list[int], show: int) -> str:
    """``0, 4, 8, ..., 996``: at most ``show`` ids, the last always among them."""
    if len(ids) <= show:
        return ", ".join(map(str, ids))
    return ", ".join(map(str, ids[: show - 1])) + f", ..., {ids[-1]}"


def _budget_accuracies(res: dict) -> dict[str, float]:
    """``ratio0.5_accuracy``-style entries of an evaluation, keyed by budget tag."""
    return {k[: -len("_accuracy")]: v for k, v in res.items()
            if k.endswith("_accuracy") and not k.startswith("global") and "clients_" not in k}


def round_line(rnd: int, rounds: int, res: dict, train: dict | None) -> str:
    """One readable console line for a round: global accuracy, each budget's, the clients' held-out mean and p10,
    and the round's training (clients, loss, bytes). The whole record stays in ``rounds.jsonl``."""
    parts = [f"round {rnd}/{rounds}: " + (f"accuracy {res['global_accuracy']:.4f} (loss {res['global_loss']:.4f})"
                                          if "global_accuracy" in res else "not evaluated (fed.eval_every)")]
    budgets = _budget_accuracies(res)
    if budgets:
        parts.append("budgets " + ", ".join(f"{k.removeprefix('ratio')} {v:.3f}" for k, v in sorted(budgets.items())))
    if "clients_mean_accuracy" in res:
        parts.append(f"clients mean {res['clients_mean_accuracy']:.3f}, p10 {res['clients_p10_accuracy']:.3f}")
    if train is not None and train.get("round") == rnd:
        bad = "".join(f", {train[k]} {word}" for k, word in (("failures", "failed"), ("rejected", "rejected"))
                      if train.get(k))
        parts.append(f"{train['clients_ok']} trained{bad}, train loss {train['train_loss']:.4f}, "
                     f"{train['upload_bytes'] / 2**20:.2f} MB up, {train['download_bytes'] / 2**20:.2f} MB down")
    return " | ".join(parts)


def _heldout_rows(run: FederatedRun, method, state: State, fd: FedData, pids, cut: bool) -> list[dict]:
    """Per client of ``pids`` with held-out examples: the global model cut to its budget, on those examples.
    One model per budget, its clients' examples evaluated together (chunks of :data:`EVAL_CHUNK`) and the sums
    split by client, so ten thousand clients cost a few forward passes, not ten thousand model builds
    (:func:`.bn_stats.eval_model`)."""
    from .bn_stats import eval_model
    from .client import compute_device

    if fd.heldout_parts is None:
        return []
    groups: dict[tuple, list[int]] = {}  # budget -> its clients (one group where every client gets the whole model)
    for pid in pids:
        if len(fd.heldout_parts[pid]):
            groups.setdefault(tuple(sorted(run.fed.budget(pid).items())) if cut else (), []).append(pid)
    rows: dict[int, dict] = {}
    for key, members in groups.items():
        model = eval_model(run, method.view(state, dict(key)) if cut else state, compute_device(run))
        for pid, tot in zip(members, _client_sums(run, model, fd, members)):
            res = mean_loss_accuracy(tot)
            rows[pid] = {"pid": pid, **run.fed.budget(pid), "examples": len(fd.heldout_parts[pid]),
                         "accuracy": res["accuracy"], "loss": res["loss"]}
    return [rows[p] for p in pids if p in rows]


EVAL_CHUNK = 1024  # held-out examples per forward pass, at most (task.eval_batch: fewer for long sequences)


@torch.no_grad()
def _client_sums(run: FederatedRun, model, fd: FedData, members: list[int]) -> torch.Tensor:
    """(len(members), 3) ``eval_sums`` totals of ``model`` on each member's held-out examples, on the run's device."""
    from .client import autocast, compute_device

    device = compute_device(run)
    model.to(device).eval()
    y_all = fd.y if fd.y_eval is None else fd.y_eval
    parts = [torch.as_tensor(fd.heldout_parts[p], dtype=torch.long) for p in members]
    idx = torch.cat(parts)
    owner = torch.repeat_interleave(torch.arange(len(members)), torch.tensor([len(p) for p in parts]))
    tot = torch.zeros(len(members), 3, dtype=torch.float64)
    chunk = eval_batch(run, fd, EVAL_CHUNK)
    for i in range(0, len(idx), chunk):
        sel = idx[i:i + chunk]
        with autocast(run, device):
            logits = model(fd.x[sel].to(device))
        tot.index_add_(0, owner[i:i + chunk], example_sums(logits, y_all[sel].to(device)).cpu())
    return tot


def personalized_eval(run: FederatedRun, method, state: State, fd: FedData, trained: set[int] | None = None
                      ) -> dict | None:
    """Accuracy of the global model, cut to each client's budget (``method=lora``: the whole global adapter, the
    model a fine-tuning run produces), on that client's own held-out examples; for text tasks also its perplexity
    there (exp of the mean token loss): over every client, and over those that ``trained`` in the run and those
    that never did. None when the task has no per-client held-out split."""
    if fd.heldout_parts is None:
        return None
    rows = _heldout_rows(run, method, state, fd, range(run.fed.num_clients), cut=method.evaluate_at_budget())
    if not rows:
        return None
    acc = np.array([r["accuracy"] for r in rows])
    n = np.array([r["examples"] for r in rows], dtype=float)
    out = {"mean": float(acc.mean()), "weighted_mean": float((acc * n).sum() / n.sum()), "min": float(acc.min()),
           "max": float(acc.max()), "clients": rows}
    if run.data.name in (*TEXT_TASKS, *INSTRUCTION_SPECS):
        for r in rows:
            r["perplexity"] = float(np.exp(r["loss"]))
        groups = {"all": rows}
        if trained is not None:
            groups |= {"trained": [r for r in rows if r["pid"] in trained],
                       "never_trained": [r for r in rows if r["pid"] not in trained]}
        out["perplexity"] = {name: _ppl_stats(rs) for name, rs in groups.items() if rs}
    return out


def _ppl_stats(rows: list[dict]) -> dict:
    """Mean, 10th and 90th percentiles and worst (largest) perplexity of clients on their held-out splits."""
    ppl = np.array([r["perplexity"] for r in rows])
    return {"clients": len(rows), "mean": float(ppl.mean()), "p10": float(np.percentile(ppl, 10)),
            "p90": float(np.percentile(ppl, 90)), "worst": float(ppl.max())}


def client_eval(run: FederatedRun, method, state: State, fd: FedData, pids: list[int]) -> tuple[dict, list[dict]]:
    """The global model, cut to each client's budget, on the held-out examples of clients ``pids``: flat
    statistics (``clients_{mean,p10,p90,worst}_accuracy``, and the same per budget ``<budget>_clients_...``)
    and the per-client rows. Empty when the task has no per-client held-out split."""
    if fd.heldout_parts is None or not pids:
        return {}, []
    rows = _heldout_rows(run, method, state, fd, sorted(pids), cut=method.budget_views())
    groups: dict[str, list[dict]] = {"clients": rows}
    for r in rows:
        groups.setdefault(f"{budget_tag(run.fed.budget(r['pid']))}_clients", []).append(r)
    stats = {}
    for name, rs in groups.items():
        if rs:
            acc = np.array([r["accuracy"] for r in rs])
            stats.update({f"{name}_mean_accuracy": float(acc.mean()), f"{name}_worst_accuracy": float(acc.min()),
                          f"{name}_p10_accuracy": float(np.percentile(acc, 10)),
                          f"{name}_p90_accuracy": float(np.percentile(acc, 90))})
    return stats, rows


def keep_matplotlib_in(out_dir: str) -> None:
    """Matplotlib (imported by flwr-datasets, and for ``report.png``) keeps its config and font cache under
    ``<out_dir>/.matplotlib`` (unless ``MPLCONFIGDIR`` is set), in this process and the ones it starts, instead
    of HOME; its font-cache notice stays out of the run's log."""
    os.environ.setdefault("MPLCONFIGDIR", os.path.join(os.path.abspath(out_dir), ".matplotlib"))
    logging.getLogger("matplotlib").setLevel(logging.WARNING)


def _lines(ax, rounds: list[int], evals: dict[int, dict], keys: list[str], xlabel: str, title: str,
           x: list[float] | None = None) -> None:
    """The global model's and each budget's test accuracy, one colour each, the legend beside the plot."""
    colours = plt_colours(len(keys))
    for key, colour in zip(keys, colours):
        label = "global model" if key == "global_accuracy" else key.removesuffix("_accuracy")
        ax.plot(x or rounds, [evals[r].get(key, np.nan) for r in rounds], marker=".", color=colour, label=label,
                lw=2 if key == "global_accuracy" else 1)
    ax.set(xlabel=xlabel, ylabel="test accuracy", title=title, ylim=(0, 1))
    ax.legend(fontsize=8, loc="best", title="budget", title_fontsize=8)


def plt_colours(n: int) -> list:
    """``n`` distinct colours (tab10, then tab20)."""
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def plot_report(path: Path, evals: dict[int, dict], history: list[dict], title: str) -> Path | None:
    """PNG: the global model's and each budget's test accuracy over rounds; the clients' held-out accuracy (p10-p90
    band and mean) where clients hold out data; each client's (reported) rank ratio over rounds; and, with a
    device population, accuracy against simulated time. Matplotlib's config and font cache go beside
    the PNG (``.matplotlib/``) unless ``MPLCONFIGDIR`` names a place: a run writes nothing under HOME."""
    keep_matplotlib_in(str(Path(path).parent))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is a dependency
        log.warning("matplotlib missing: no report PNG")
        return None
    rounds = sorted(evals)
    timed = all("sim_time_s" in evals[r] for r in rounds) and bool(rounds)
    spread = any("clients_mean_accuracy" in evals[r] for r in rounds)
    fig, axes = plt.subplots(1, 2 + spread + timed, figsize=(5.2 * (2 + spread + timed), 4.4), squeeze=False)
    axes = list(axes[0])
    keys = ["global_accuracy"] + sorted({f"{k}_accuracy" for r in rounds for k in _budget_accuracies(evals[r])},
                                        key=lambda k: float(re.sub(r"[^0-9.]", "", k) or 0))
    _lines(axes.pop(0), rounds, evals, keys, "round", "accuracy per budget (test set)")
    if spread:  # each evaluated client on its own held-out split: the p10-p90 band around the mean
        ax = axes.pop(0)
        got = [r for r in rounds if "clients_mean_accuracy" in evals[r]]
        ax.fill_between(got, [evals[r]["clients_p10_accuracy"] for r in got],
                        [evals[r]["clients_p90_accuracy"] for r in got], alpha=0.3, label="p10-p90")
        ax.plot(got, [evals[r]["clients_mean_accuracy"] for r in got], marker=".", label="mean")
        ax.set(xlabel="round", ylabel="held-out accuracy", title="clients on their own held-out data", ylim=(0, 1))
        ax.legend(fontsize=8, loc="best")
    b = axes.pop(0)
    per: dict[int, list[tuple[int, float]]] = {}
    for h in history:
        for c in h.get("clients", []):
            per.setdefault(int(c["pid"]), []).append((int(h["round"]), float(c.get("rank_ratio", np.nan))))
    for pid, pts in sorted(per.items())[:50]:
        xs, ys = zip(*pts)
        b.plot(xs, ys, marker=".", lw=0.8, label=f"client {pid}" if len(per) <= 10 else None)
    b.set(xlabel="round", ylabel="mean rank / full rank", title="rank per client")
    if len(per) <= 10:
        b.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    if timed:  # accuracy against simulated device time (fed.devices)
        _lines(axes.pop(0), rounds, evals, keys, "simulated time (s)", "accuracy vs simulated time",
               x=[evals[r]["sim_time_s"] for r in rounds])
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _size_lines(summary: dict) -> list[str]:
    """Each budget's model against the dense one, and why a budget near full rank is larger: a rank-r
    factorization of an m x n layer holds (m + n)·r numbers, more than m·n once r > mn / (m + n)."""
    sizes, dense = summary.get("budget_params") or {}, summary.get("dense_params")
    if not sizes or not dense:
        return []
    line = "  model size per budget (parameters, x the dense model's {:,}, fp32 MB): ".format(dense) + ", ".join(
        f"{k} {v:,} ({v / dense:.2f}x, {v * 4 / 2**20:.2f} MB)" for k, v in sorted(sizes.items()))
    if max(sizes.values()) > dense:
        line += ("; a rank-r factorization of an m x n layer stores (m+n)·r numbers, more than the dense m·n "
                 "above r = mn/(m+n) (budgets are FedLMT rank ratios; fed.budget_unit=params caps every layer at "
                 "its dense size; see docs/federated.md)")
    return [line]


def summary_lines(summary: dict, out_dir: str, wall_s: float) -> list[str]:
    """The closing lines of a run from its ``metrics.json`` summary: global and per-budget accuracy, bytes,
    wall (server) and simulated time, where the files are and the TensorBoard command."""
    final = summary.get("final", {}) or {}
    rounds = summary.get("rounds_detail", []) or []
    up = sum(r.get("upload_bytes", 0) for r in rounds)
    down = sum(r.get("download_bytes", 0) for r in rounds)
    lines = [f"federated run finished: {summary.get('strategy')} · {summary.get('num_clients')} clients · "
             f"{summary.get('rounds')} rounds · {wall_s:.1f} s wall (server)"]
    if "global_accuracy" in final:
        lines.append(f"  global accuracy {final['global_accuracy']:.4f} (loss {final.get('global_loss', float('nan')):.4f})")
    budgets = _budget_accuracies(final)
    if budgets:
        lines.append("  at each budget: " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(budgets.items())))
    if "clients_mean_accuracy" in final:  # each evaluated client on its own held-out split
        lines.append("  clients on their held-out data: " + ", ".join(
            f"{q} {final[f'clients_{q}_accuracy']:.4f}" for q in ("mean", "p10", "p90", "worst")))
    ppl = (summary.get("personalized") or {}).get("perplexity")
    if ppl:  # text tasks: the global model's held-out perplexity, every client on its own split
        lines.append(f"  held-out perplexity: global {math.exp(final.get('global_loss', float('nan'))):.2f}; " + "; ".join(
            f"{name.replace('_', ' ')} ({g['clients']} clients) mean {g['mean']:.2f}, p10 {g['p10']:.2f}, p90 {g['p90']:.2f}, "
            f"worst {g['worst']:.2f}" for name, g in ppl.items()))
    lines.append(f"  bytes: {up / 1e6:.2f} MB up, {down / 1e6:.2f} MB down; global model "
                 f"{summary.get('global_model_bytes', 0) / 1e6:.3f} MB (dense {summary.get('dense_model_bytes', 0) / 1e6:.3f} MB)")
    lines += _size_lines(summary)
    if "sim_time_s" in final:
        lines.append(f"  simulated device time {final['sim_time_s']:.2f} s")
    if summary.get("excluded"):  # named here too: the run's figures are without their data from then on
        lines.append("  excluded by the screen (trained without from then on): " + ", ".join(
            f"client {p} in round {r}" for p, r in summary["excluded"].items()))
    out = os.path.abspath(out_dir)
    lines.append(f"  summary: {os.path.join(out, 'metrics.json')} (per round: {os.path.join(out, 'rounds.jsonl')})")
    lines.append(f"  {SUMMARY_END[1]}{out}")  # the last line: see runtime.logs.SUMMARY_END
    return lines
