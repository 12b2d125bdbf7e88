"""Planted or damaged resume state: every field of a federated round checkpoint and of a central checkpoint is
type- and range-checked against the run's config before use. ``resume=auto`` stops with a CheckpointError naming
the file and the field (exit 2 through ``main.py``, before any runtime starts); ``auto_or_fresh`` sets the bad
checkpoint aside and continues from the newest good one, or starts afresh, and says so."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fedlowrank.checkpoint import CheckpointError, MANIFEST, _digest
from fedlowrank.federated.resume import resume_point
from fedlowrank.federated.server import _save_round
from fedlowrank.runtime.inprocess import make_strategy

from helpers import compose_cfg

ROOT = Path(__file__).resolve().parents[1]


def _fed_run(out: Path, *overrides: str):
    from fedlowrank.config import federated_run_from_cfg

    return federated_run_from_cfg(compose_cfg("mode=federated", f"out_dir={out}", "fed.rounds=5", "fed.resume=auto",
                                              *overrides))


def _saved(out: Path, rnd: int = 2, *overrides: str):
    """A real round checkpoint (and its rounds.jsonl lines) of a default run, as the server writes them."""
    run = _fed_run(out, *overrides)
    st = make_strategy(run)
    with (out / "rounds.jsonl").open("w") as f:
        for r in range(1, rnd + 1):
            f.write(json.dumps({"round": r, "train": {"round": r, "clients_ok": 4, "train_loss": 0.5,
                                                      "clients": [{"pid": 0, "train_loss": 0.5}]}}) + "\n")
            f.write(json.dumps({"round": r, "eval": {"global_accuracy": 0.5}}) + "\n")
    _save_round(out, run, rnd, st.global_state, st.state())
    return run, st, out / "checkpoints" / f"round-{rnd:06d}"


def _reseal(ckpt: Path) -> None:
    """Rewrite the manifest so a planted file passes the completeness check (as an attacker would)."""
    files = [p for p in ckpt.iterdir() if p.name != MANIFEST]
    (ckpt / MANIFEST).write_text(json.dumps({p.name: {"bytes": p.stat().st_size, "sha256": _digest(p)} for p in files}))


def _plant_strategy(**fields):
    def edit(ckpt: Path, st) -> None:
        d = json.loads((ckpt / "strategy.json").read_text())
        d.update(fields)
        (ckpt / "strategy.json").write_text(json.dumps(d))
    return edit


def _plant_log(line: str):
    def edit(ckpt: Path, st) -> None:
        log = ckpt.parent.parent / "rounds.jsonl"
        lines = log.read_text().splitlines()
        log.write_text("\n".join([lines[0], line, *lines[1:]]) + "\n")
    return edit


def _plant_global(shape_change: bool = True):
    def edit(ckpt: Path, st) -> None:
        sd = {k: v.clone() for k, v in st.global_state.items()}
        k = next(iter(sd))
        if shape_change:
            sd[k] = torch.zeros(sd[k].shape[0] + 1, *sd[k].shape[1:])
        else:
            sd["planted.weight"] = torch.zeros(3)
        save_file(sd, str(ckpt / "global.safetensors"))
    return edit


def _plant_opt(ckpt: Path, st) -> None:
    k, t = next(iter(st.global_state.items()))
    save_file({f"m/{k}": torch.zeros(t.numel() + 5, dtype=torch.float64)}, str(ckpt / "server_opt.safetensors"))


def _plant_rollback(rnd: int, grow: int = 0):
    """``rollback.safetensors`` holding a model of round ``rnd``, its first tensor ``grow`` rows longer."""
    def edit(ckpt: Path, st) -> None:
        sd = {f"{rnd}/{k}": v.clone() for k, v in st.global_state.items()}
        k = next(iter(st.global_state))
        sd[f"{rnd}/{k}"] = torch.zeros(st.global_state[k].shape[0] + grow, *st.global_state[k].shape[1:])
        save_file(sd, str(ckpt / "rollback.safetensors"))
    return edit


CASES = {
    "round 1e15 and a damaged line": (lambda c, s: (_plant_strategy(round=10**15)(c, s),
                                                    _plant_log("{garbage")(c, s)), ["strategy.json", "round"]),
    "round -5": (_plant_strategy(round=-5), ["strategy.json", "round"]),
    "round as a string": (_plant_strategy(round="2"), ["strategy.json", "round"]),
    "rng not a state": (_plant_strategy(rng=[3, [1, 2, 3], None]), ["strategy.json", "rng"]),
    "rng words out of range": (_plant_strategy(rng=[3, [2**40] * 624 + [624], None]), ["strategy.json", "rng"]),
    "failed_rounds Infinity": (_plant_strategy(failed_rounds=float("inf")), ["strategy.json", "failed_rounds"]),
    "failed_rounds past the round": (_plant_strategy(failed_rounds=7), ["strategy.json", "failed_rounds"]),
    "sim_time NaN": (_plant_strategy(sim_time_s=float("nan")), ["strategy.json", "sim_time_s"]),
    "budget of no partition": (_plant_strategy(budgets={"999": {"ratio": 0.5}}), ["strategy.json", "budgets"]),
    "a record without round": (_plant_log('{"train": {}}'), ["rounds.jsonl", "line 2"]),
    "a client id out of range": (_plant_log(json.dumps({"round": 1, "train": {"round": 1, "clients": [
        {"pid": 10**9}]}})), ["rounds.jsonl", "line 2", "pid"]),
    "an eval that is no number": (_plant_log(json.dumps({"round": 1, "eval": {"global_accuracy": "high"}})),
                                  ["rounds.jsonl", "eval.global_accuracy"]),
    "global model of another shape": (_plant_global(), ["global.safetensors", "the run's model has"]),
    "global model with a planted tensor": (_plant_global(False), ["global.safetensors", "planted.weight"]),
    "server optimizer of another shape": (_plant_opt, ["server_opt.safetensors"]),
    "rollback model of a round out of reach": (_plant_rollback(99), ["rollback.safetensors", "rounds"]),
    "rollback model of another shape": (_plant_rollback(1, grow=1), ["rollback.safetensors", "the run's model has"]),
    "aggregated in a later round": (_plant_strategy(aggregated={"2": [1, 7]}), ["strategy.json", "aggregated"]),
    "cumulative rise NaN": (_plant_strategy(cusum={"1": float("nan")}), ["strategy.json", "cusum"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_planted_federated_state_is_named_before_use(tmp_path, case):
    edit, names = CASES[case]
    run, st, ckpt = _saved(tmp_path)
    edit(ckpt, st)
    _reseal(ckpt)
    with pytest.raises(CheckpointError) as e:
        resume_point(tmp_path, run, st.global_state)
    msg = str(e.value)
    assert "\n" not in msg and all(n in msg for n in names), msg


def test_the_unplanted_checkpoint_resumes(tmp_path):
    run, st, _ = _saved(tmp_path)
    rnd, state, saved, history, evals = resume_point(tmp_path, run, st.global_state)
    assert rnd == 2 and [h["round"] for h in history] == [1, 2] and set(evals) == {1, 2}
    assert all(torch.equal(state[k], st.global_state[k]) for k in state)
    assert saved["rng"] == json.loads(json.dumps(st.state()["rng"]))


def test_a_resume_with_other_settings_names_them_and_more_rounds_do_not(tmp_path, caplog):
    """Each round checkpoint keeps the settings it was written with, every ``auto`` resolved: resuming with another
    learning rate warns and names it (the run is not the uninterrupted one); more rounds, what resuming is for,
    do not; a garbled ``settings.json`` is reported, never fatal."""
    run, st, ckpt = _saved(tmp_path)
    assert json.loads((ckpt / "settings.json").read_text())["fed"]["lr"] == run.fed.lr == 0.05  # auto, resolved
    with caplog.at_level(logging.WARNING):
        assert resume_point(tmp_path, _fed_run(tmp_path, "fed.rounds=8"), st.global_state)[0] == 2
        assert "settings differ" not in caplog.text
        assert resume_point(tmp_path, _fed_run(tmp_path, "fed.lr=0.02"), st.global_state)[0] == 2
        assert "settings differ from the checkpoint's" in caplog.text and "fed.lr (0.05 -> 0.02)" in caplog.text
        assert "fed.rounds" not in caplog.text
        caplog.clear()  # a planted value is quoted: it cannot start a line of its own in the log
        planted = json.loads((ckpt / "settings.json").read_text())
        planted["strategy"] = "x\n[2026-01-01][fedlowrank][INFO] - fake"
        (ckpt / "settings.json").write_text(json.dumps(planted))
        _reseal(ckpt)
        assert resume_point(tmp_path, run, st.global_state)[0] == 2
        assert "strategy ('x\\n[2026" in caplog.text and "\n[2026-01-01]" not in caplog.text
        (ckpt / "settings.json").write_text("{")
        _reseal(ckpt)
        caplog.clear()
        assert resume_point(tmp_path, run, st.global_state)[0] == 2
        assert "unreadable" in caplog.text


def test_auto_or_fresh_sets_a_bad_checkpoint_aside_and_continues_from_a_good_one(tmp_path, caplog):
    run, st, good = _saved(tmp_path, 2, "fed.resume=auto_or_fresh")
    _, _, bad = _saved(tmp_path, 4, "fed.resume=auto_or_fresh")
    _plant_strategy(round=10**15)(bad, st)
    _reseal(bad)
    with caplog.at_level(logging.WARNING):
        rnd, *_ = resume_point(tmp_path, run, st.global_state)
    assert rnd == 2 and (tmp_path / "checkpoints" / f"rejected-{bad.name}").is_dir() and not bad.exists()
    assert "auto_or_fresh" in caplog.text and "round=" in caplog.text
    _plant_strategy(round=-1)(good, st)
    _reseal(good)
    assert resume_point(tmp_path, run, st.global_state) is None  # nothing usable: a fresh start


@pytest.mark.timeout(300)
def test_main_refuses_a_planted_round_with_exit_2_before_the_runtime(tmp_path):
    _, st, ckpt = _saved(tmp_path)
    _plant_strategy(round=10**15)(ckpt, st)
    _reseal(ckpt)
    p = subprocess.run([sys.executable, str(ROOT / "main.py"), "mode=federated", f"out_dir={tmp_path}",
                        "fed.rounds=5", "fed.resume=auto"], capture_output=True, text=True, timeout=240, cwd=ROOT,
                       env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    out = p.stdout + p.stderr
    assert p.returncode == 2 and "Traceback" not in out and "strategy.json" in out and "round=" in out, out[-3000:]
    assert "SuperLink" not in out and not (tmp_path / "flwr_runtime").exists()  # refused before any runtime


# ----------------------------------------------------------------------------- central checkpoints
CENTRAL = ["experiment=llama_full", "model.lowrank=fixed", "model.ratio=0.25", "trainer.max_steps=6",
           "trainer.ckpt_interval=3", "trainer.eval_interval=3", "trainer.log_interval=1"]


@pytest.fixture(scope="module")
def central_ckpt(tmp_path_factory) -> Path:
    """A tiny low-rank LLaMA run stopped after its step-3 checkpoint."""
    from fedlowrank.central import launch

    from helpers import central_run

    out = tmp_path_factory.mktemp("central")
    launch(central_run(out, *CENTRAL, "trainer.stop_after=3"))
    return out


def _meta(**fields):
    def edit(ckpt: Path) -> None:
        meta = json.loads((ckpt / "meta.json").read_text())
        for k, v in fields.items():
            meta[k] = v(meta) if callable(v) else v
        (ckpt / "meta.json").write_text(json.dumps(meta))
    return edit


def _trainer_pt(change):
    def edit(ckpt: Path) -> None:
        ts = torch.load(ckpt / "trainer.pt", weights_only=True)
        change(ts)
        torch.save(ts, ckpt / "trainer.pt")
    return edit


def _first_moment(ts: dict) -> None:
    st = next(iter(ts["optimizer"]["state"].values()))
    st["exp_avg"] = torch.zeros(7)


def _weights(ckpt: Path) -> None:
    from safetensors.torch import load_file

    sd = load_file(str(ckpt / "model.safetensors"))
    k = next(k for k in sd if k.endswith(".U"))
    sd[k] = torch.zeros(sd[k].shape[0], sd[k].shape[1] + 1)
    save_file(sd, str(ckpt / "model.safetensors"))


CENTRAL_CASES = {
    "step 1e15": (_meta(step=10**15), ["meta.json", "step"]),
    "step -1": (_meta(step=-1), ["meta.json", "step"]),
    "rank 1e9": (_meta(ranks=lambda m: {k: 10**9 for k in m["ranks"]}), ["meta.json", "ranks", "1000000000"]),
    "a rank of no layer": (_meta(ranks={"planted.layer": 2}), ["meta.json", "planted.layer"]),
    "tokens_seen as text": (_meta(tokens_seen="many"), ["meta.json", "tokens_seen"]),
    "train time infinite": (_meta(train_time_s=float("inf")), ["meta.json", "train_time_s"]),
    "losses not pairs": (_meta(losses=[[1, 2, 3]]), ["meta.json", "losses"]),
    "weights of another shape": (_weights, ["model.safetensors", "the run's model has"]),
    "rng of the wrong size": (_trainer_pt(lambda ts: ts["rng"][0].update(cpu=torch.zeros(3, dtype=torch.uint8))),
                              ["trainer.pt", "rng[0]"]),
    "rng for two processes": (_trainer_pt(lambda ts: ts["rng"].append(ts["rng"][0])), ["trainer.pt", "2 process"]),
    "moment of another shape": (_trainer_pt(_first_moment), ["trainer.pt", "optimizer state"]),
}


@pytest.mark.parametrize("case", sorted(CENTRAL_CASES))
def test_planted_central_state_is_named_before_use(central_ckpt, tmp_path, case):
    import shutil

    from fedlowrank.central import launch

    from helpers import central_run

    edit, names = CENTRAL_CASES[case]
    out = tmp_path / "run"
    shutil.copytree(central_ckpt, out, symlinks=True)
    ckpt = next((out / "checkpoints").glob("step-*"))
    edit(ckpt)
    _reseal(ckpt)
    with pytest.raises(CheckpointError) as e:
        launch(central_run(out, *CENTRAL, "trainer.resume=auto"))
    msg = str(e.value)
    assert "\n" not in msg and all(n in msg for n in names), msg


def test_central_auto_or_fresh_sets_a_planted_checkpoint_aside_and_trains_from_scratch(central_ckpt, tmp_path, caplog):
    import shutil

    from fedlowrank.central import launch

    from helpers import central_run

    out = tmp_path / "run"
    shutil.copytree(central_ckpt, out, symlinks=True)
    ckpt = next((out / "checkpoints").glob("step-*"))
    _meta(step=10**15)(ckpt)
    _reseal(ckpt)
    with caplog.at_level(logging.WARNING):
        res = launch(central_run(out, *CENTRAL, "trainer.resume=auto_or_fresh"))
    fresh = launch(central_run(tmp_path / "fresh", *CENTRAL))
    assert "auto_or_fresh" in caplog.text and (out / "checkpoints" / f"rejected-{ckpt.name}").is_dir()
    assert res["losses"] == fresh["losses"] and res["final_eval"] == fresh["final_eval"]  # a true fresh start


@pytest.mark.parametrize("hook, state, field", [
    ("relora", {"restarts": -1}, "restarts"),
    ("relora", {"restarts": 2, "wrapped": "yes"}, "wrapped"),
    ("welore", {"plan": {"ranks": {"layers.0.attn.q_proj": 10**9}, "dense": [], "threshold": 0.1,
                         "reduction": 0.5, "kind": "params"}}, "plan.ranks"),
    ("welore", {"plan": {"ranks": {"planted": 2}, "dense": [], "threshold": 0.1, "reduction": 0.5,
                         "kind": "params"}}, "planted"),
    ("welore", {"plan": {"ranks": {}, "evil": 1}}, "plan"),
    ("inrank", {"stage": 7}, "stage"),
    ("inrank", {"stage": 1, "kept": {"layers.0.attn.q_proj": 10**6}}, "kept"),
])
def test_planted_method_state_is_refused_before_the_model_changes(hook, state, field):
    """Each method's saved state (ReLoRA's restarts, WeLore's plan, InRank's stage and kept ranks) is checked
    against the model before the hook restructures anything: a planted rank would allocate (out x 1e9) factors."""
    from types import SimpleNamespace

    from fedlowrank.central.hooks import make_hook
    from fedlowrank.lowrank import factorize
    from fedlowrank.models.llama import Llama, LlamaConfig

    torch.manual_seed(0)
    model = Llama(LlamaConfig(vocab_size=64, block_size=16, n_layer=1, n_head=4, dim=32, hidden_dim=64))
    method = {"relora": {"name": "relora"}, "welore": {"name": "welore"}, "inrank": {"name": "inrank"}}[hook]
    if hook == "inrank":
        factorize(model, rank=4, targets=[r"attn\.", r"mlp\."])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    h = make_hook(method, 0, 10)
    with pytest.raises(CheckpointError, match=field.replace(".", r"\.")):
        h.restore(SimpleNamespace(model=model), state)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize("plant, named", [
    ("vocab", "vocab_size"), ("unknown field", "model_config"), ("factors", "merges to [100000, 100000]"),
])
def test_export_and_sampling_check_a_runs_model_config_and_factor_shapes_first(central_ckpt, tmp_path, plant, named):
    """Export and mode=sample build the run's dense model from meta.json's model_config and multiply U·V: a
    planted config or a factor pair whose product would be 10^5 x 10^5 (40 GB, from a file under 1 MB) is named
    with exit 2 before anything is built or multiplied."""
    import shutil

    from safetensors.torch import load_file

    from fedlowrank.central.sample import load_for_sampling
    from fedlowrank.config import ConfigError
    from fedlowrank.export import main as export_main

    out = tmp_path / "run"
    shutil.copytree(central_ckpt, out, symlinks=True)
    ckpt = next((out / "checkpoints").glob("step-*"))
    if plant == "factors":
        sd = load_file(str(ckpt / "model.safetensors"))
        k = next(k for k in sd if k.endswith(".U"))
        sd[k], sd[k[:-1] + "V"] = torch.zeros(100_000, 1), torch.zeros(1, 100_000)
        save_file(sd, str(ckpt / "model.safetensors"))
    else:
        meta = json.loads((ckpt / "meta.json").read_text())
        meta["model_config"] |= {"vocab_size": 10**9} if plant == "vocab" else {"evil": 1}
        (ckpt / "meta.json").write_text(json.dumps(meta))
    _reseal(ckpt)
    assert export_main([str(ckpt), str(tmp_path / "hf")]) == 2 and not (tmp_path / "hf").exists()
    with pytest.raises(ConfigError, match=named.replace("[", r"\[")):
        load_for_sampling(ckpt)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_dense_shapes_are_the_shapes_dense_state_builds(arch):
    """The shape check before export merges factors must predict exactly what merging gives, for factorized layers
    and for LoRA adapters on biased (GPT-2) and bias-free (LLaMA) linears."""
    from fedlowrank.export import dense_shapes, dense_state
    from fedlowrank.lowrank import add_lora, factorize
    from fedlowrank.models.gpt2 import GPT2, GPT2Config
    from fedlowrank.models.llama import Llama, LlamaConfig

    for change in ("lora", "factorize"):
        torch.manual_seed(0)
        model = GPT2(GPT2Config(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=16)) if arch == "gpt2" \
            else Llama(LlamaConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, dim=16, hidden_dim=32))
        if change == "lora":
            add_lora(model, r=2, targets=[r"attn\.", r"mlp\."], trainable_scaling=True)
        else:
            factorize(model, rank=2, targets=[r"attn\.", r"mlp\."])
        sd = model.state_dict()
        assert dense_shapes(sd) == {k: tuple(v.shape) for k, v in dense_state(sd).items()}
