"""Server-side run: global model, central evaluation, TensorBoard, checkpoints, summary."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from flwr.app import MetricRecord
from flwr.serverapp import Grid
from safetensors.torch import save_file
from torch.utils.data import DataLoader

from fedlowrank.checkpoint import (append_jsonl, atomic_write_bytes, latest_complete, load_tensors, prune, read_json,
                                   read_jsonl, write_checkpoint_dir)
from fedlowrank.config import FederatedRun
from fedlowrank.lowrank import count_params, state_bytes
from fedlowrank.training.loop import evaluate_classifier

from .aggregation import State
from .client import model_from_state
from .grid import PollingGrid
from .methods import fed_method
from .task import build_model, fed_data

log = logging.getLogger(__name__)


def dense_model_bytes(run: FederatedRun) -> int:
    return sum(p.numel() * 4 for p in build_model(run).state_dict().values())


def _save_round(out: Path, run: FederatedRun, rnd: int, state: State, strategy_state: dict) -> None:
    """Round checkpoint ``checkpoints/round-<n>/`` (global model + strategy state, verified manifest)
    and an atomically replaced ``checkpoints/last.safetensors``."""
    from safetensors.torch import save

    tensors = {k: v.contiguous() for k, v in state.items()}
    meta = {"round": str(rnd), "strategy": run.strategy}

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / "global.safetensors"), metadata=meta)
        (tmp / "strategy.json").write_text(json.dumps({"round": rnd, **strategy_state}))

    write_checkpoint_dir(out / "checkpoints" / f"round-{rnd:06d}", write)
    prune(out / "checkpoints", run.fed.keep_checkpoints, prefix="round-")
    atomic_write_bytes(out / "checkpoints" / "last.safetensors", save(tensors, metadata=meta))


def _resume_point(out: Path, run: FederatedRun) -> tuple[int, State, dict, list[dict], dict] | None:
    """(round, global state, strategy state, round history, evals) of the newest complete round
    checkpoint, or None. The JSONL log is cut back to that round (later lines were never checkpointed)."""
    if run.fed.resume != "auto":
        return None
    ckpt = latest_complete(out / "checkpoints", prefix="round-")
    if ckpt is None:
        log.info("fed.resume=auto: no complete round checkpoint in %s; starting at round 1", out)
        return None
    st = read_json(ckpt / "strategy.json")
    rnd = int(st.pop("round"))
    records = [r for r in read_jsonl(out / "rounds.jsonl") if r["round"] <= rnd]
    evals = {int(r["round"]): r["eval"] for r in records if "eval" in r}
    history = [r["train"] for r in records if "train" in r]
    _rewrite_jsonl(out / "rounds.jsonl", records)
    log.info("fed.resume=auto: continuing after round %d from %s", rnd, ckpt)
    return rnd, load_tensors(ckpt / "global.safetensors"), st, history, evals


def _rewrite_jsonl(path: Path, records: list[dict]) -> None:
    atomic_write_bytes(path, "".join(json.dumps(r, default=float) + "\n" for r in records).encode())


def partition_sizes(run: FederatedRun) -> list[int]:
    """Training examples of every client, computed by the server itself (never taken from a client)."""
    from .client import client_partitions

    return [len(p) for p in client_partitions(run, run.fed.num_clients)]


def run_server(grid: Grid, run: FederatedRun) -> dict:
    """Run all rounds on ``grid``; returns (and writes ``metrics.json``) the run summary.
    Every round appends to ``rounds.jsonl`` and checkpoints the global model and strategy state,
    so ``fed.resume=auto`` continues a killed run where its last complete round ended. A run that
    fails leaves its cause in ``error.json`` (read back by runtimes that only see an exit code)."""
    from .logs import quiet_engine_tracebacks

    quiet_engine_tracebacks()
    err = Path(run.out_dir) / "error.json"
    err.unlink(missing_ok=True)
    try:
        return _run_server(grid, run)
    except Exception as e:
        err.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(err, json.dumps({"error": f"{type(e).__name__}: {e}"}).encode())
        raise


def _run_server(grid: Grid, run: FederatedRun) -> dict:
    from torch.utils.tensorboard import SummaryWriter

    from server.strategy import HeteroRankStrategy, to_record

    grid = PollingGrid(grid, run.fed.poll_s)
    out = Path(run.out_dir)
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    writer = SummaryWriter(str(out / "tb"))
    test_loader = DataLoader(fed_data(run).test, batch_size=256)
    budgets = sorted({tuple(run.fed.budget(i).items()) for i in range(run.fed.num_clients)})
    method = fed_method(run)
    resumed = _resume_point(out, run)
    done, evals = (resumed[0], resumed[4]) if resumed else (0, {})
    if not resumed and (out / "rounds.jsonl").exists():
        (out / "rounds.jsonl").unlink()  # a fresh run does not append to an old run's log

    def evaluate(rnd: int, state: State) -> dict[str, float]:
        res = {f"global_{k}": v for k, v in evaluate_classifier(model_from_state(run, state), test_loader).items()}
        if run.fed.eval_budgets and method.budget_views():
            for b in budgets:
                bd = dict(b)
                view = method.view(state, bd)
                tag = "_".join(f"{k}{v}" for k, v in bd.items())
                res[f"{tag}_accuracy"] = evaluate_classifier(model_from_state(run, view), test_loader)["accuracy"]
        for k, v in res.items():
            writer.add_scalar(f"global/{k}", v, rnd)
            if strategy.clock.active:  # the same against simulated device time (step = simulated milliseconds)
                writer.add_scalar(f"sim_time/{k}", v, int(round(1000 * strategy.clock.elapsed)))
        if strategy.clock.active:
            res["sim_time_s"] = strategy.clock.elapsed
        writer.flush()
        if rnd not in evals:
            append_jsonl(out / "rounds.jsonl", {"round": rnd, "eval": res})
        evals[rnd] = res
        log.info("round %d global eval: %s", rnd, {k: round(v, 4) for k, v in res.items()})
        return res

    def on_round_end(rnd: int, state: State, summary: dict) -> None:
        append_jsonl(out / "rounds.jsonl", {"round": rnd, "train": strategy.history[-1]})
        if rnd % run.fed.checkpoint_every == 0 or rnd == run.fed.rounds:
            _save_round(out, run, rnd, state, strategy.state())

    init = resumed[1] if resumed else method.initial_state()
    strategy = HeteroRankStrategy(run, method, init, writer=writer, on_round_end=on_round_end,
                                  sizes=partition_sizes(run), round_offset=done)
    if resumed:
        strategy.restore(resumed[2], resumed[3])
    if done < run.fed.rounds:
        strategy.start(grid, to_record(init), num_rounds=run.fed.rounds - done, timeout=run.fed.timeout,
                       evaluate_fn=lambda rnd, arrays: MetricRecord(evaluate(rnd + done, strategy.global_state)))
    writer.close()
    final = evals.get(run.fed.rounds, {})
    from .report import label_skew, personalized_eval, plot_report

    personal = personalized_eval(run, method, strategy.global_state, fed_data(run))
    png = plot_report(out / "report.png", evals, strategy.history,
                      f"{run.strategy} · {run.data.name} · {run.fed.num_clients} clients ({run.fed.partition})")
    summary = {
        "strategy": run.strategy, "rounds": run.fed.rounds, "num_clients": run.fed.num_clients,
        "final": final, "initial": evals.get(0, {}), "rounds_detail": strategy.history, "resumed_after": done,
        "global_params": count_params(model_from_state(run, strategy.global_state)),
        "global_model_bytes": state_bytes(strategy.global_state), "dense_model_bytes": dense_model_bytes(run),
        "personalized": personal, "label_skew": label_skew(fed_data(run)), "report_png": str(png) if png else None,
    }
    atomic_write_bytes(out / "metrics.json", json.dumps(summary, indent=2, default=float).encode())
    log.info("federated run finished: final %s; logs in %s", final, os.fspath(out))
    return summary
