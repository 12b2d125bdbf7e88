"""Shared test helpers (imported by test modules; pytest puts tests/ on sys.path)."""
from pathlib import Path

from hydra import compose, initialize_config_dir

from fedlowrank.central import central_run_from_cfg
from fedlowrank.config import federated_run_from_cfg

CONF = Path(__file__).resolve().parents[1] / "conf"
# small, CPU-pinned central runs: deterministic wherever the tests run
FAST = ["trainer.progress=false", "trainer.device=cpu", "trainer.batch_size=4", "trainer.block_size=32",
        "trainer.eval_iters=2", "trainer.warmup_steps=2", "data.max_chars=60000"]


def compose_cfg(*overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def central_run(out_dir, *overrides):
    """Validated CentralRun for a tiny CPU run writing to ``out_dir``."""
    return central_run_from_cfg(compose_cfg(*FAST, f"out_dir={out_dir}", *overrides))


def text_run(play, *overrides):
    """Validated FederatedRun of the Shakespeare experiment on the play file ``play``."""
    return federated_run_from_cfg(compose_cfg("experiment=fed_shakespeare", f"data.path={play}", "out_dir=/tmp/x",
                                              "data.seq_len=16", "fed.min_partition_size=2", "fed.fraction_train=1.0",
                                              *overrides))


def fed_run(tmp_path, *overrides):
    """Validated FederatedRun of the default task with 5 clients, writing to ``tmp_path``."""
    return federated_run_from_cfg(compose_cfg("mode=federated", f"out_dir={tmp_path}", "fed.num_clients=5",
                                              "fed.eval_budgets=false", *overrides))
