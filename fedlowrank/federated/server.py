"""Server-side run: global model, central evaluation, TensorBoard, checkpoints, summary."""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from flwr.app import MetricRecord
from flwr.serverapp import Grid

from fedlowrank.checkpoint import BackgroundWriter, append_jsonl, atomic_write_bytes, prune, write_checkpoint_dir
from fedlowrank.config import FederatedRun
from fedlowrank.lowrank import count_params, state_bytes
from fedlowrank.training.batches import batches
from fedlowrank.training.loop import evaluate_classifier

from .aggregation import State
from .bn_stats import eval_model
from .client import autocast, compute_device, model_from_state
from .grid import PollingGrid
from .methods import fed_method
from .report import budget_tag, round_line
from .resume import resume_point, settings
from .task import build_model, eval_batch, fed_data
from .tb import RunWriters

log = logging.getLogger(__name__)


def dense_model_bytes(run: FederatedRun) -> int:
    return sum(p.numel() * 4 for p in build_model(run).state_dict().values())


def _save_round(out: Path, run: FederatedRun, rnd: int, state: State, strategy_state: dict,
                opt_state: dict | None = None, rollback: dict | None = None) -> None:
    """Round checkpoint ``checkpoints/round-<n>/`` (global model, strategy state, the server optimizer's moments
    when there is one, the models ``fed.screen_rollback`` could go back to; verified manifest) and an atomically
    replaced ``checkpoints/last.safetensors``."""
    _write_round(out, run.fed.keep_checkpoints, rnd, _round_files(run, rnd, state, strategy_state, opt_state, rollback))


def _round_files(run: FederatedRun, rnd: int, state: State, strategy_state: dict, opt_state: dict | None = None,
                 rollback: dict | None = None) -> dict[str, bytes]:
    """A round checkpoint's files, serialized now (name -> bytes): they own their data, so the caller may go on
    changing ``state`` while :func:`_write_round` writes them."""
    from safetensors.torch import save

    files = {"global.safetensors": save({k: v.contiguous() for k, v in state.items()},
                                        metadata={"round": str(rnd), "strategy": run.strategy}),
             "strategy.json": json.dumps({"round": rnd, **strategy_state}).encode(),
             "settings.json": json.dumps(settings(run), default=str).encode()}
    if opt_state:
        files["server_opt.safetensors"] = save({k: v.contiguous() for k, v in opt_state.items()})
    if rollback:
        files["rollback.safetensors"] = save(_own_storage(rollback))
    return files


def _own_storage(tensors: State) -> State:
    """``tensors`` contiguous, each on storage of its own (safetensors refuses shared memory): a round without a
    valid update keeps the same global tensors, so the rollback window can hold them twice; repeats are copied."""
    seen, out = set(), {}
    for k, v in tensors.items():
        v = v.contiguous()
        ptr = v.untyped_storage().data_ptr()
        out[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    return out


def _write_round(out: Path, keep: int, rnd: int, files: dict[str, bytes]) -> None:
    """Write :func:`_round_files` as ``checkpoints/round-<n>/``, keep the newest ``keep``, and replace
    ``checkpoints/last.safetensors`` (the same bytes as the round's global model)."""
    def write(tmp: Path) -> None:
        for name, data in files.items():
            (tmp / name).write_bytes(data)

    write_checkpoint_dir(out / "checkpoints" / f"round-{rnd:06d}", write)
    prune(out / "checkpoints", keep, prefix="round-")
    atomic_write_bytes(out / "checkpoints" / "last.safetensors", files["global.safetensors"])


def partition_sizes(run: FederatedRun) -> list[int]:
    """Training examples of every client, computed by the server itself (never taken from a client)."""
    from .client import client_partitions

    return [len(p) for p in client_partitions(run, run.fed.num_clients)]


def run_server(grid: Grid, run: FederatedRun) -> dict:
    """Run all rounds on ``grid``; returns (and writes ``metrics.json``) the run summary.
    Every round appends to ``rounds.jsonl`` and checkpoints the global model and strategy state,
    so ``fed.resume=auto`` continues a killed run where its last complete round ended. A run that
    fails leaves its cause in ``error.json`` (read back by runtimes that only see an exit code)."""
    err = Path(run.out_dir) / "error.json"
    err.unlink(missing_ok=True)
    try:
        return _run_server(grid, run)
    except Exception as e:
        err.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(err, json.dumps({"error": f"{type(e).__name__}: {e}"}).encode())
        raise


def _run_server(grid: Grid, run: FederatedRun) -> dict:
    from .strategy import to_record

    t0 = time.perf_counter()
    sr = _ServerRun(run)
    strategy, done = sr.strategy, sr.done
    try:
        if done < run.fed.rounds:
            strategy.start(PollingGrid(grid, run.fed.poll_s), to_record(strategy.global_state),
                           num_rounds=run.fed.rounds - done, timeout=run.fed.timeout,
                           evaluate_fn=lambda rnd, arrays: sr.evaluated(rnd + done, strategy.global_state))
    finally:  # a failing run still leaves every round checkpoint it had written
        sr.saver.close()
    sr.writers.close()
    return sr.finish(time.perf_counter() - t0)


class _ServerRun:
    """The server side of one run: resume point, strategy, TensorBoard, central evaluation, round log,
    checkpoints, and the closing summary."""

    def __init__(self, run: FederatedRun) -> None:
        from .strategy import HeteroRankStrategy

        self.run, self.out = run, Path(run.out_dir)
        (self.out / "checkpoints").mkdir(parents=True, exist_ok=True)
        self.writers = RunWriters(self.out / "tb")
        self.saver = BackgroundWriter()  # round checkpoints are written while the next round runs
        self.test_loader = batches(fed_data(run).test, eval_batch(run, fed_data(run), 256))
        self.budgets = sorted({tuple(run.fed.budget(i).items()) for i in range(run.fed.num_clients)})
        self.method = fed_method(run)
        initial = self.method.initial_state()
        resumed = resume_point(self.out, run, initial)
        self.client_rows: dict[int, list[dict]] = {}  # round -> sampled clients' held-out accuracies
        self.done, self.evals = (resumed[0], resumed[4]) if resumed else (0, {})
        if not resumed and (self.out / "rounds.jsonl").exists():
            (self.out / "rounds.jsonl").unlink()  # a fresh run does not append to an old run's log
        init = resumed[1] if resumed else initial
        self.strategy = HeteroRankStrategy(run, self.method, init, writer=self.writers, on_round_end=self.on_round_end,
                                           sizes=partition_sizes(run), round_offset=self.done)
        if resumed:
            self.strategy.restore(resumed[2], resumed[3])

    def evaluated(self, rnd: int, state: State) -> MetricRecord | None:
        """Flower's ``evaluate_fn``: :meth:`evaluate` in the rounds ``fed.eval_every`` picks (always round 0 and
        the last); in the others only the round's console line (its training)."""
        f = self.run.fed
        if rnd % f.eval_every and rnd != f.rounds:
            h = self.strategy.history[-1] if self.strategy.history else None
            log.info("%s", round_line(rnd, f.rounds, {}, h))
            return None
        return MetricRecord(self.evaluate(rnd, state))

    def evaluate(self, rnd: int, state: State) -> dict[str, float]:
        """Global model on the test set (and cut to each client budget), logged to TensorBoard and
        ``rounds.jsonl`` once per round."""
        run, method, clock, w = self.run, self.method, self.strategy.clock, self.writers.server
        res = {f"global_{k}": v for k, v in self._eval(state).items()}
        if run.fed.eval_budgets and method.budget_views():
            for b in self.budgets:
                bd = dict(b)
                res[f"{budget_tag(bd)}_accuracy"] = self._eval(method.view(state, bd))["accuracy"]
        stats, rows = self._client_eval(rnd, state)
        res.update(stats)
        for k, v in res.items():
            w.add_scalar(f"global/{k}", v, rnd)
            if clock.active:  # the same against simulated device time (step = simulated milliseconds)
                w.add_scalar(f"sim_time/{k}", v, int(round(1000 * clock.elapsed)))
        if clock.active:
            res["sim_time_s"] = clock.elapsed
        w.flush()
        if rnd not in self.evals:
            append_jsonl(self.out / "rounds.jsonl", {"round": rnd, "eval": res, **({"clients": rows} if rows else {})})
        if rows:
            self.client_rows[rnd] = rows
        self.evals[rnd] = res
        h = self.strategy.history[-1] if self.strategy.history else None
        log.info("%s", round_line(rnd, run.fed.rounds, res, h))
        return res

    def _budget_params(self) -> dict[str, int]:
        """Parameters of each budget's model (what a client of that budget holds), by budget tag."""
        if not self.method.budget_views():
            return {}
        state = self.strategy.global_state
        return {budget_tag(dict(b)): count_params(model_from_state(self.run, self.method.view(state, dict(b))))
                for b in self.budgets}

    def _eval(self, state: State) -> dict[str, float]:
        """A global model (or a budget's view of it) on the test set, on the run's device, with BatchNorm
        statistics per view (:func:`.bn_stats.eval_model`)."""
        device = compute_device(self.run)
        model = eval_model(self.run, state, device)
        with autocast(self.run, device):
            return evaluate_classifier(model, self.test_loader, device)

    def _client_eval(self, rnd: int, state: State) -> tuple[dict[str, float], list[dict]]:
        """This round's sampled clients, each on its own held-out split (tasks that have one): their accuracies
        go to ``tb/clients/<id>`` (``client/heldout_accuracy``), the statistics into the round's eval record."""
        from .report import client_eval

        h = self.strategy.history[-1] if self.strategy.history else None
        pids = [int(c["pid"]) for c in h["clients"]] if h is not None and h["round"] == rnd else []
        stats, rows = client_eval(self.run, self.method, state, fed_data(self.run), pids)
        for r in rows:
            self.writers.client(r["pid"]).add_scalar("client/heldout_accuracy", r["accuracy"], rnd)
        return stats, rows

    def on_round_end(self, rnd: int, state: State, summary: dict) -> None:
        append_jsonl(self.out / "rounds.jsonl", {"round": rnd, "train": self.strategy.history[-1]})
        if rnd % self.run.fed.checkpoint_every == 0 or rnd == self.run.fed.rounds:
            opt = self.strategy.server_opt
            back = self.strategy.screen.rollback
            files = _round_files(self.run, rnd, state, self.strategy.state(), opt.state() if opt else None,
                                 back.tensors(state) if back is not None else None)
            self.saver.submit(_write_round, self.out, self.run.fed.keep_checkpoints, rnd, files)

    def finish(self, wall_s: float) -> dict:
        """Personalised evaluation, report, ``metrics.json`` and the closing lines; returns the summary."""
        from .report import label_skew, personalized_eval, plot_report, summary_lines

        run, out, st = self.run, self.out, self.strategy
        self.saver.close()  # every round checkpoint is on disk before the summary says the run finished
        png = plot_report(out / "report.png", self.evals, st.history,
                          f"{run.strategy} · {run.data.name} · {run.fed.num_clients} clients ({run.fed.partition})")
        summary = {
            "strategy": run.strategy, "rounds": run.fed.rounds, "num_clients": run.fed.num_clients,
            "final": self.evals.get(run.fed.rounds, {}), "initial": self.evals.get(0, {}),
            "rounds_detail": st.history, "resumed_after": self.done,
            "global_params": count_params(model_from_state(run, st.global_state)),
            "global_model_bytes": state_bytes(st.global_state), "dense_model_bytes": dense_model_bytes(run),
            "dense_params": count_params(build_model(run)), "budget_params": self._budget_params(),
            "personalized": personalized_eval(run, self.method, st.global_state, fed_data(run),
                                              {c["pid"] for h in st.history for c in h.get("clients", [])}),
            "final_clients": self.client_rows.get(run.fed.rounds, []),  # the last round's sampled clients
            "label_skew": label_skew(fed_data(run)), "report_png": str(png) if png else None,
            "excluded": {str(p): r for p, r in sorted(st.screen.excluded.items())},  # partition id -> round
            "settings": settings(run),
        }
        atomic_write_bytes(out / "metrics.json", json.dumps(summary, indent=2, default=float).encode())
        for line in summary_lines(summary, os.fspath(out), wall_s):
            log.info("%s", line)
        return summary
