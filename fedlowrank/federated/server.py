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

from fedlowrank.config import FederatedRun
from fedlowrank.data.vision import load_image_data
from fedlowrank.lowrank import count_params, state_bytes
from fedlowrank.training.loop import evaluate_classifier

from .aggregation import State
from .client import model_from_state
from .methods import fed_method

log = logging.getLogger(__name__)


def dense_model_bytes(run: FederatedRun) -> int:
    from fedlowrank.models.build import vision_config
    from fedlowrank.models.vision import build_vision_model

    return sum(p.numel() * 4 for p in build_vision_model(vision_config(run.model, run.data.name)).state_dict().values())


def run_server(grid: Grid, run: FederatedRun) -> dict:
    """Run all rounds on ``grid``; returns (and writes ``metrics.json``) the run summary."""
    from torch.utils.tensorboard import SummaryWriter

    from server.strategy import HeteroRankStrategy, to_record

    out = Path(run.out_dir)
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    writer = SummaryWriter(str(out / "tb"))
    data = load_image_data(run.data.name, run.data.root, run.data.download, run.data.seed)
    test_loader = DataLoader(data.test_set(), batch_size=256)
    budgets = sorted({tuple(run.fed.budget(i).items()) for i in range(run.fed.num_clients)})
    evals: dict[int, dict[str, float]] = {}

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
        writer.flush()
        evals[rnd] = res
        log.info("round %d global eval: %s", rnd, {k: round(v, 4) for k, v in res.items()})
        return res

    def on_round_end(rnd: int, state: State, summary: dict) -> None:
        if rnd % run.fed.checkpoint_every == 0 or rnd == run.fed.rounds:
            save_file({k: v.contiguous() for k, v in state.items()}, str(out / "checkpoints" / "last.safetensors"),
                      metadata={"round": str(rnd), "strategy": run.strategy})

    method = fed_method(run)
    init = method.initial_state()
    strategy = HeteroRankStrategy(run, method, init, writer=writer, on_round_end=on_round_end)
    strategy.start(grid, to_record(init), num_rounds=run.fed.rounds, timeout=run.fed.timeout,
                   evaluate_fn=lambda rnd, arrays: MetricRecord(evaluate(rnd, strategy.global_state)))
    writer.close()
    final = evals.get(run.fed.rounds, {})
    summary = {
        "strategy": run.strategy, "rounds": run.fed.rounds, "num_clients": run.fed.num_clients,
        "final": final, "initial": evals.get(0, {}), "rounds_detail": strategy.history,
        "global_params": count_params(model_from_state(run, strategy.global_state)),
        "global_model_bytes": state_bytes(strategy.global_state), "dense_model_bytes": dense_model_bytes(run),
    }
    (out / "metrics.json").write_text(json.dumps(summary, indent=2, default=float))
    log.info("federated run finished: final %s; logs in %s", final, os.fspath(out))
    return summary
