"""Every config composes and validates; invalid configs fail before any training."""
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from fedlowrank.config import ConfigError, federated_run_from_cfg
from fedlowrank.config.fed_lora import LORA_ONLY
from helpers import compose_cfg

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
GROUPS = ["mode", "model", "data", "strategy", "method"]


def _compose(overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=overrides)


def _options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def _validate(cfg):
    OmegaConf.resolve(cfg)
    if cfg.run_mode == "federated":
        cfg.out_dir = "unused"
        federated_run_from_cfg(cfg)
    else:
        from fedlowrank.central import central_run_from_cfg

        cfg.out_dir = "unused"
        central_run_from_cfg(cfg)


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in _options(g)])
def test_every_group_option_composes(group, option):
    cfg = _compose([f"{group}={option}"])
    assert cfg.run_mode in ("federated", "central", "sample")
    # group options are valid in the mode they belong to
    if group == "strategy" and option in LORA_ONLY:  # adapters' rules: refused without method=lora
        with pytest.raises(ConfigError, match="needs method=lora"):
            _validate(_compose(["mode=federated", f"{group}={option}"]))
    elif group in ("strategy",) or (group == "model" and cfg.model.get("family") == "vision") or \
            (group == "data" and option in ("digits", "cifar10")):
        _validate(_compose(["mode=federated", f"{group}={option}"]))


@pytest.mark.parametrize("exp", _options("experiment"))
def test_every_experiment_composes_and_validates(exp, tmp_path):
    cfg = _compose([f"experiment={exp}"])
    if cfg.get("run_mode") == "federated" and cfg.data.name == "shakespeare":  # its text file lives outside the repo
        play = tmp_path / "play.txt"
        play.write_text("ROMEO:\nBut soft, what light.\n\nJULIET:\nAy me.\n")
        cfg.data.path = str(play)
    if exp in ("llama_welore_pretrained", "fed_lora"):  # need a checkpoint (test_hf.py, test_fed_lora.py)
        with pytest.raises(ConfigError, match="model.pretrained"):
            _validate(cfg)
        return
    _validate(cfg)


def test_default_is_federated_slice_digits():
    cfg = _compose([])
    run = federated_run_from_cfg(OmegaConf.merge(cfg, {"out_dir": "x"}))
    assert run.strategy == "slice" and run.data.name == "digits"
    assert run.fed.rank_ratios == [0.1, 0.25, 0.5, 1.0]


@pytest.mark.parametrize("override,msg", [
    ("fed.ranks=[4,0]", "positive integers"),
    ("fed.rank_ratios=[0.5,1.5]", "(0, 1]"),
    ("fed.rank_ratios=[0.0]", "(0, 1]"),
    ("strategy.name=median", "unknown strategy"),
    ("fed.partition=zipf", "partition"),
    ("fed.dropout_prob=1.0", "dropout_prob"),
    ("+fed.bogus=1", "unknown key"),
    ("model.arch=transformerxl", "unknown vision arch"),
    ("fed.faults=[1:explode]", "faults"),
])
def test_invalid_federated_config_raises_clear_error(override, msg):
    cfg = _compose([override])
    cfg.out_dir = "unused"
    with pytest.raises(ConfigError, match=msg.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        federated_run_from_cfg(cfg)


def test_main_rejects_bad_config_before_training(tmp_path):
    t0 = time.time()
    proc = subprocess.run([sys.executable, "main.py", "mode=federated", "fed.rank_ratios=[0.5,2.0]",
                           f"hydra.run.dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "invalid configuration" in proc.stderr + proc.stdout and "(0, 1]" in proc.stderr + proc.stdout
    assert not (tmp_path / "tb").exists()  # nothing started
    assert time.time() - t0 < 60


@pytest.mark.parametrize("override, key", [
    ("fed.rounds=abc", "fed.rounds"), ("fed.rank_ratios=0.5", "fed.rank_ratios"), ("fed.lr=fast", "fed.lr"),
    ("fed.eval_budgets=3", "fed.eval_budgets"), ("fed.ranks=[4,x]", r"fed.ranks\[1\]"), ("model.hidden=wide", "model.hidden"),
    ("mode=central model.size=huge", "model.size"), ("mode=central trainer.max_steps=1.5", "trainer.max_steps"),
    ("mode=central trainer.lr=[1]", "trainer.lr"), ("mode=central trainer.compile=maybe", "trainer.compile"),
])
def test_wrong_types_name_the_key(override, key):
    """Values of the wrong type are refused by the typed schema with the key's name, not a traceback."""
    cfg = _compose(override.split())
    with pytest.raises(ConfigError, match=key):
        _validate(cfg)


def test_hydra_writes_nothing_outside_out_dir(tmp_path):
    work, out = tmp_path / "cwd", tmp_path / "out"
    work.mkdir()
    proc = subprocess.run([sys.executable, str(ROOT / "main.py"), "mode=central", "experiment=gpt2_full",
                           "trainer.device=cpu", "trainer.max_steps=2", "trainer.progress=false",
                           "trainer.block_size=32", "data.max_chars=20000", f"out_dir={out}"],
                          cwd=work, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert list(work.iterdir()) == []  # no outputs/<date>/<time> in the working directory
    assert (out / ".hydra" / "config.yaml").is_file() and (out / "summary.json").is_file()


def test_section_defaults_are_written_once_in_the_dataclasses():
    """``fed.*`` and ``trainer.*`` defaults come from FedConfig / TrainerConfig through Hydra's ConfigStore:
    the composed sections equal the dataclasses' defaults, and no mode YAML writes a value of its own."""
    from omegaconf import OmegaConf

    from fedlowrank.config.central import TrainerConfig
    from fedlowrank.config.defences import LR_DEFAULT
    from fedlowrank.config.federated import FedConfig
    from fedlowrank.schema import defaults

    fed = OmegaConf.to_container(_compose(["mode=federated"]).fed)
    trainer = OmegaConf.to_container(_compose(["mode=central"]).trainer)
    assert fed == defaults(FedConfig) and fed["rounds"] == 15 and fed["devices"]["spread"] == 10.0
    assert trainer == defaults(TrainerConfig) and trainer["max_steps"] == 200
    for mode in ("federated", "central"):
        raw = OmegaConf.to_container(OmegaConf.load(CONF / "mode" / f"{mode}.yaml"))
        assert set(raw) == {"defaults", "run_mode"}, raw
    # the method options are the method dataclasses' defaults too
    from fedlowrank.methods.inrank import InRankConfig
    from fedlowrank.methods.relora import ReLoRAConfig
    from fedlowrank.methods.welore import WeLoreConfig

    for name, cls in (("inrank", InRankConfig), ("relora", ReLoRAConfig), ("welore", WeLoreConfig)):
        assert OmegaConf.to_container(_compose(["mode=federated", f"method={name}"]).method) == defaults(cls)
        assert not (CONF / "method" / f"{name}.yaml").exists()
    # a command-line override still reaches the typed run, and a nested default can be overridden
    run = federated_run_from_cfg(_compose(["mode=federated", "fed.rounds=3", "fed.devices.spread=2"]))
    assert run.fed.rounds == 3 and run.fed.devices.spread == 2.0 and run.fed.lr == LR_DEFAULT


@pytest.mark.parametrize("argv, hint", [
    (["fed.round=5"], "did you mean 'fed.rounds'"),
    (["mode=central", "trainer.max_step=3"], "did you mean 'trainer.max_steps'"),
    (["mode=central", "model.rnak=3"], "did you mean 'model.rank'"),
    (["fed.zzzz=1"], "keys of fed: "),
])
def test_an_unknown_override_names_the_closest_valid_key(argv, hint):
    from fedlowrank.config.cli import unknown_override

    msg = unknown_override(argv, str(CONF))
    assert msg is not None and hint in msg, msg


def test_valid_command_lines_pass_the_override_check():
    from fedlowrank.config.cli import unknown_override

    for argv in (["fed.rounds=5", "strategy=product"], ["mode=central", "experiment=llama_relora", "trainer.max_steps=9"],
                 ["+fed.round=5"], ["hydra.run.dir=x", "--cfg", "job"], ["--config-name", "other", "fed.round=1"]):
        assert unknown_override(argv, str(CONF)) is None, argv  # '+' keys are the schema's to refuse (below)


def test_added_unknown_keys_and_scalars_for_lists_are_named_with_the_fix(tmp_path):
    from fedlowrank.config import federated_run_from_cfg

    with pytest.raises(ConfigError, match=r"fed\.round: did you mean fed\.rounds\?"):
        federated_run_from_cfg(compose_cfg("+fed.round=5", f"out_dir={tmp_path}"))
    with pytest.raises(ConfigError, match=r"fed\.rank_ratios takes a list, e\.g\. fed\.rank_ratios=\[0\.5\]"):
        federated_run_from_cfg(compose_cfg("fed.rank_ratios=0.5", f"out_dir={tmp_path}"))


@pytest.mark.timeout(120)
def test_main_answers_a_typo_with_exit_2_and_the_key_it_meant(tmp_path):
    import subprocess
    import sys

    root = CONF.parent
    p = subprocess.run([sys.executable, str(root / "main.py"), "fed.round=5", f"out_dir={tmp_path}"],
                       capture_output=True, text=True, timeout=100, cwd=tmp_path)
    out = p.stdout + p.stderr
    assert p.returncode == 2 and "did you mean 'fed.rounds'" in out and "not in struct" not in out, out
    assert "Traceback" not in out and not any(tmp_path.iterdir())  # refused before anything was written
