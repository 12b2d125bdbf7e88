"""Entry point: ``python main.py mode=federated`` or ``python main.py mode=central experiment=...``."""
from __future__ import annotations

import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from fedlowrank.checkpoint import CheckpointError
from fedlowrank.config import ConfigError
from fedlowrank import stopping as stop

log = logging.getLogger("fedlowrank")
# conf/config.yaml: hydra.run.dir = out_dir when it is set (nothing written outside it), else outputs/<date>/<time>
OmegaConf.register_new_resolver("or_default", lambda value, default: default if value is None else value, replace=True)


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with open_dict(cfg):
        if cfg.get("out_dir") is None:
            cfg.out_dir = HydraConfig.get().runtime.output_dir
    logging.getLogger("flwr").propagate = False  # Flower has its own console handler
    logging.getLogger("alembic").setLevel(logging.WARNING)
    mode = cfg.get("run_mode")
    stop.install()  # Ctrl-C / SIGTERM: no traceback, the resume command, exit 130 / 143
    try:
        if mode == "federated":
            from fedlowrank.runtime.runner import run
        elif mode == "central":
            from fedlowrank.central import run  # type: ignore[no-redef]
        elif mode == "sample":
            from fedlowrank.central.sample import run  # type: ignore[no-redef]
        else:
            raise ConfigError(f"unknown mode {mode!r} (federated|central|sample)")
        run(cfg)
    except ConfigError as e:
        log.error("invalid configuration: %s", e)
        sys.exit(2)
    except CheckpointError as e:  # a damaged checkpoint or log, named; nothing was trained from it
        log.error("cannot resume: %s", e)
        sys.exit(2)
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM (stop.Stopped): what started has been stopped on the way out
        again = stop.resume_command(sys.argv, str(cfg.out_dir), str(mode))
        log.warning("stopped (%s); the checkpoints in %s are kept%s", e or "SIGINT", cfg.out_dir,
                    f"; resume with:\n  {again}" if again else "")
        sys.exit(stop.exit_code(e))


if __name__ == "__main__":
    from pathlib import Path

    from fedlowrank.config.cli import unknown_override

    mistake = unknown_override(sys.argv[1:], str(Path(__file__).resolve().parent / "conf"))
    if mistake:  # before Hydra, which would say "not in struct" and suggest a '+' that only moves the error
        logging.basicConfig(format="%(message)s")
        log.error("invalid configuration: %s", mistake)
        sys.exit(2)
    main()
