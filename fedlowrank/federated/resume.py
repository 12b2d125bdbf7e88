"""Continuing a federated run from its newest complete round checkpoint, with every field of the planted or
damaged state checked against the run's config before use: the round within [0, ``fed.rounds``], the sampling
RNG a valid Mersenne-Twister state, counters finite and in range, budgets keyed by existing partitions, every
``rounds.jsonl`` record typed, the global model's and the server optimizer's tensors of exactly the model's
names, shapes and dtypes (read from the safetensors headers before any tensor is loaded). A bad field stops the
run with a :class:`CheckpointError` naming the file and the field; with ``fed.resume=auto_or_fresh`` the run
continues from the newest checkpoint that passes, or afresh, says so, and renames the refused one
``rejected-<name>``."""
from __future__ import annotations

import json
import logging
import math
import random
from dataclasses import asdict
from pathlib import Path

import torch

from fedlowrank.checkpoint import (CheckpointError, atomic_write_bytes, checked_int, checked_number, latest_complete,
                                   load_tensors, read_json)
from fedlowrank.config import FederatedRun
from fedlowrank.tensorfile import TensorFileError, check_against, read_header

from .aggregation import State, factor_prefixes

log = logging.getLogger(__name__)


def check_strategy_state(st: object, run: FederatedRun, path: Path) -> tuple[int, dict]:
    """(round, strategy state) of ``strategy.json``, each field checked against the run's config."""
    if not isinstance(st, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    st = dict(st)
    rnd = checked_int(st.pop("round", None), 0, run.fed.rounds, f"{path}: round")
    rng = st.get("rng")
    try:
        v, internal, gauss = rng  # type: ignore[misc]
        if type(v) is not int or not isinstance(internal, list) or not all(type(x) is int for x in internal):
            raise TypeError("version and state must be integers")
        if not all(0 <= x < 1 << 32 for x in internal) or not (gauss is None or type(gauss) is float):
            raise ValueError("state words must be in [0, 2**32), gauss a float or null")
        random.Random().setstate((v, tuple(internal), gauss))  # CPython checks the length and the ranges
    except (TypeError, ValueError, OverflowError) as e:
        raise CheckpointError(f"{path}: rng is not a Mersenne-Twister state ({str(e)[:80]})") from None
    checked_int(st.get("failed_rounds", 0), 0, rnd, f"{path}: failed_rounds")
    checked_number(st.get("sim_time_s", 0.0), f"{path}: sim_time_s", minimum=0)
    budgets = st.get("budgets", {})
    if not isinstance(budgets, dict):
        raise CheckpointError(f"{path}: budgets must map partition ids to budgets")
    for pid, b in budgets.items():
        ok = pid.isdigit() and int(pid) < run.fed.num_clients and isinstance(b, dict) and \
            all(k in ("ratio", "rank", "params") and type(x) in (int, float) and 0 < x < math.inf for k, x in b.items())
        if not ok:
            raise CheckpointError(f"{path}: budgets[{pid[:20]!r}]={str(b)[:60]} is no budget of a partition in "
                                  f"[0, {run.fed.num_clients})")
    excluded = st.get("excluded", {})
    if not isinstance(excluded, dict) or not all(
            isinstance(p, str) and p.isdigit() and int(p) < run.fed.num_clients and type(r) is int and 1 <= r <= rnd
            for p, r in excluded.items()):
        raise CheckpointError(f"{path}: excluded must map partition ids in [0, {run.fed.num_clients}) to the rounds "
                              f"(1..{rnd}) that excluded them, got {str(excluded)[:60]}")
    aggregated = st.get("aggregated", {})
    if not isinstance(aggregated, dict) or not all(
            isinstance(p, str) and p.isdigit() and int(p) < run.fed.num_clients and isinstance(rs, list) and
            all(type(r) is int and 1 <= r <= rnd for r in rs) for p, rs in aggregated.items()):
        raise CheckpointError(f"{path}: aggregated must map partition ids in [0, {run.fed.num_clients}) to lists of "
                              f"rounds (1..{rnd}), got {str(aggregated)[:60]}")
    cusum = st.get("cusum", {})
    if not isinstance(cusum, dict) or not all(
            isinstance(p, str) and p.isdigit() and int(p) < run.fed.num_clients and type(c) in (int, float) and
            0 <= c < math.inf for p, c in cusum.items()):
        raise CheckpointError(f"{path}: cusum must map partition ids in [0, {run.fed.num_clients}) to finite sums "
                              f">= 0, got {str(cusum)[:60]}")
    return rnd, st


def _check_record(rec: dict, rnd: int, run: FederatedRun, where: str) -> None:
    """One ``rounds.jsonl`` record: its round, its train summary (client rows with partition ids), its eval."""
    r = rec["round"]
    train, ev = rec.get("train"), rec.get("eval")
    if train is not None:
        if not isinstance(train, dict) or train.get("round") != r or not isinstance(train.get("clients", []), list):
            raise CheckpointError(f"{where}: train must be round {r}'s summary with a list of clients")
        for c in train.get("clients", []):
            if not isinstance(c, dict):
                raise CheckpointError(f"{where}: train.clients holds a {type(c).__name__}, not a client's row")
            checked_int(c.get("pid"), 0, run.fed.num_clients - 1, f"{where}: train.clients[].pid")
        for k, v in train.items():
            if k != "clients":
                checked_number(v, f"{where}: train.{k}", nan_ok=True)
    if ev is not None:
        if not isinstance(ev, dict):
            raise CheckpointError(f"{where}: eval must be an object of metrics")
        for k, v in ev.items():
            checked_number(v, f"{where}: eval.{k}", nan_ok=True)


def read_rounds(path: Path, rnd: int, run: FederatedRun) -> list[dict]:
    """``rounds.jsonl``'s records of rounds 0..``rnd``, each checked. A damaged line after all of rounds 1..rnd
    (a write cut by a crash, or garbage) is dropped with what follows, with a warning: the intact round checkpoint
    is what resumes. A damaged line before them is an error naming the file and the line."""
    out: list[dict] = []
    seen: set[int] = set()
    lines = path.read_text(errors="replace").splitlines() if path.is_file() else []
    for i, line in enumerate(lines, 1):
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict) or "round" not in rec:
                raise ValueError("no round")
            checked_int(rec["round"], 0, run.fed.rounds, "round")
        except (ValueError, RecursionError, CheckpointError) as e:
            if len(seen) == rnd:
                log.warning("%s: line %d is damaged (%s); dropping it and the %d line(s) after it (round %d's "
                            "checkpoint is intact)", path, i, type(e).__name__, len(lines) - i, rnd)
                break
            raise CheckpointError(f"{path}: line {i} is damaged ({type(e).__name__}: {str(e)[:80]}) before the "
                                  f"records of the checkpointed round {rnd}") from None
        if rec["round"] <= rnd:
            _check_record(rec, rnd, run, f"{path}: line {i}")
            out.append(rec)
            if rec["round"] >= 1:
                seen.add(rec["round"])
    return out


def check_tensors(path: Path, want: State, partial: bool = False) -> None:
    """The file's tensor names, shapes and dtypes equal ``want``'s (``partial``: a subset of its names), from its
    header alone."""
    try:
        check_against(path, want, require_all=not partial)
    except TensorFileError as e:
        raise CheckpointError(str(e)) from None


def _moments(initial: State) -> State:
    """What a server optimizer may store (meta tensors): float64 first and second moments of every global tensor
    and, under ``product``, of every factorized layer's dense product ``<layer>.W`` (out, in)."""
    dense = {f"{p}.W": (initial[f"{p}.U"].shape[0], initial[f"{p}.V"].shape[1]) for p in factor_prefixes(initial)}
    shapes = {k: tuple(t.shape) for k, t in initial.items()} | dense
    return {f"{mv}/{k}": torch.empty(shape, dtype=torch.float64, device="meta") for mv in "mv"
            for k, shape in shapes.items()}


def settings(run: FederatedRun) -> dict:
    """What the run ran with, every ``auto`` resolved (``fed.lr``, ``fed.screen``, ``fed.clip_auto``, ...), as
    ``metrics.json`` and each round checkpoint keep it; the Hydra config beside the outputs keeps what was asked."""
    return {"seed": run.seed, "strategy": run.strategy, "fed": asdict(run.fed), "data": asdict(run.data),
            "model": dict(run.model), "method": dict(run.method)}


RESUME_MAY_CHANGE = ("fed.rounds", "fed.resume")  # a resumed run continues for longer, and is one


def changed_settings(saved: object, now: dict, prefix: str = "") -> list[str]:
    """``key (saved -> now)`` for every setting of ``now`` that ``saved`` (a checkpoint's, untrusted) holds
    otherwise, nested keys dotted; what a resume may change is left out."""
    if not isinstance(saved, dict):
        return [] if prefix else ["the whole record (not a JSON object)"]
    out = []
    for k, v in now.items():
        key, old = f"{prefix}{k}", saved.get(k, "(missing)")
        if isinstance(v, dict):
            out += changed_settings(old if isinstance(old, dict) else {}, v, f"{key}.")
        elif old != v and key not in RESUME_MAY_CHANGE:
            out.append(f"{key} ({repr(old)[:40]} -> {repr(v)[:40]})")  # repr: a planted value cannot break lines
    return out


def _warn_if_changed(path: Path, run: FederatedRun) -> None:
    """A warning naming the settings this run changes against the checkpoint's ``settings.json`` (none in
    checkpoints written before it existed). Only compared: a change never stops the resume."""
    if not path.is_file():
        return
    try:
        diff = changed_settings(read_json(path), settings(run))
    except CheckpointError as e:
        diff = [f"unreadable ({str(e)[:80]})"]
    if diff:
        log.warning("fed.resume: this run's settings differ from the checkpoint's, so it does not continue the same "
                    "run: %s", "; ".join(diff[:8]) + (f"; and {len(diff) - 8} more" if len(diff) > 8 else ""))


def _load(ckpt: Path, out: Path, run: FederatedRun, initial: State) -> tuple[int, State, dict, list[dict]]:
    rnd, st = check_strategy_state(read_json(ckpt / "strategy.json"), run, ckpt / "strategy.json")
    records = read_rounds(out / "rounds.jsonl", rnd, run)
    check_tensors(ckpt / "global.safetensors", initial)
    opt = ckpt / "server_opt.safetensors"
    if opt.is_file():
        check_tensors(opt, _moments(initial), partial=True)
        st["server_opt"] = load_tensors(opt)
    global_state = load_tensors(ckpt / "global.safetensors")
    if (ckpt / "rollback.safetensors").is_file():
        st["rollback"] = _rollback_models(ckpt / "rollback.safetensors", rnd, global_state)
    return rnd, global_state, st, records


def _rollback_models(path: Path, rnd: int, global_state: State) -> State:
    """``fed.screen_rollback``'s models: ``<round>/<name>`` for rounds 1..``rnd`` (those out of this run's reach
    are dropped at its next round), each a model of the global model's names, shapes and dtypes (checked from the
    header before loading)."""
    try:
        rounds = {name.split("/", 1)[0] for name in read_header(path)[0]}
    except TensorFileError as e:
        raise CheckpointError(str(e)) from None
    if not all(r.isdigit() and 1 <= int(r) <= rnd for r in rounds):
        raise CheckpointError(f"{path}: models must be named <round>/<tensor> for rounds 1..{rnd}, got rounds "
                              f"{sorted(rounds)[:4]}")
    check_tensors(path, {f"{r}/{k}": v for r in rounds for k, v in global_state.items()})
    return load_tensors(path)


def resume_point(out: Path, run: FederatedRun, initial: State,
                 check_only: bool = False) -> tuple[int, State, dict, list[dict], dict] | None:
    """(round, global state, strategy state, round history, evals) of the newest complete round checkpoint that
    passes every check, or None (start at round 1). A refused one stops the run (``fed.resume=auto``) or, with
    ``auto_or_fresh``, is renamed ``rejected-<name>`` (kept, never picked again) with a warning, and the next
    newest is tried. The JSONL log is cut back to the resumed round (later lines were never checkpointed);
    ``check_only``: no log rewrite and no info line (the runner's check before the runtime starts)."""
    if run.fed.resume not in ("auto", "auto_or_fresh"):
        return None
    while (ckpt := latest_complete(out / "checkpoints", prefix="round-")) is not None:
        try:
            rnd, global_state, st, records = _load(ckpt, out, run, initial)
            break
        except CheckpointError as e:
            if run.fed.resume != "auto_or_fresh":
                raise
            aside = ckpt.with_name(f"rejected-{ckpt.name}")
            ckpt.rename(aside)
            log.warning("fed.resume=auto_or_fresh: %s; that checkpoint is set aside as %s", e, aside.name)
    else:
        if not check_only:
            log.info("fed.resume=%s: no usable round checkpoint in %s; starting at round 1", run.fed.resume, out)
        return None
    if not check_only:
        body = "".join(json.dumps(r, default=float) + "\n" for r in records)
        atomic_write_bytes(out / "rounds.jsonl", body.encode())
        log.info("fed.resume=%s: continuing after round %d from %s", run.fed.resume, rnd, ckpt)
        _warn_if_changed(ckpt / "settings.json", run)
    evals = {int(r["round"]): r["eval"] for r in records if "eval" in r}
    return rnd, global_state, st, [r["train"] for r in records if "train" in r], evals
