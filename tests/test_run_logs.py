"""Runs begin and end legibly: the relay of ``flwr run --stream`` keeps the project's records (logger and
level) and drops Flower's known noise; the closing summaries say what the run did; no log line claims more
than it lists."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest

from fedlowrank.runtime.logs import FlowerNoiseFilter, StreamRelay

STREAM = """\
\x1b[92mINFO \x1b[0m:      Starting Flower Simulation
\x1b[92mINFO \x1b[0m:      Federation `@none/default` (4 simulated SuperNodes)
\x1b[92mINFO \x1b[0m:      flwr federation simulation-config @none/default <superlink> --num-supernodes <N>
INFO fedlowrank.federated.strategy: round 1: 4 ok, 0 failed, 0 rejected; up 10 B, down 10 B; train loss 1.7202
\x1b[92mINFO \x1b[0m:      \t└──> Aggregated MetricRecord: {'clients_ok': 4.0}
WARNING fedlowrank.federated.strategy: round 1: rejected update of client 2: shape mismatch
\x1b[93mWARNING \x1b[0m:   a warning of Flower's own
\x1b[93mWARNING \x1b[0m:   Since flwr 1.32, default simulated SuperNodes changed from 10 to 2.
\x1b[92mINFO \x1b[0m:      [ROUND 2/2]
\x1b[92mINFO \x1b[0m:      Final results:
\x1b[92mINFO \x1b[0m:      \t{ 1: { 'clients_ok': '4.0000e+00',
\x1b[92mINFO \x1b[0m:      \t       'download_bytes': '3.5882e+05'}}
INFO fedlowrank.federated.server: federated run finished: slice · 4 clients · 2 rounds · 3.0 s wall (server)
"""


def test_stream_relay_keeps_our_records_and_drops_flowers_noise(caplog):
    caplog.set_level(logging.DEBUG)
    relay = StreamRelay()
    for line in STREAM.splitlines():
        relay(line)
    got = [(r.name, r.levelname, r.getMessage()) for r in caplog.records]
    assert got == [
        ("fedlowrank.flwr", "INFO", "Starting Flower Simulation"),
        ("fedlowrank.federated.strategy", "INFO",
         "round 1: 4 ok, 0 failed, 0 rejected; up 10 B, down 10 B; train loss 1.7202"),
        ("fedlowrank.federated.strategy", "WARNING", "round 1: rejected update of client 2: shape mismatch"),
        ("fedlowrank.flwr", "WARNING", "a warning of Flower's own"),  # not the one that never applies, nor a banner
        ("fedlowrank.federated.server", "INFO",
         "federated run finished: slice · 4 clients · 2 rounds · 3.0 s wall (server)"),
    ]


def test_flower_noise_filter_on_the_in_process_runtime():
    f = FlowerNoiseFilter()

    def rec(msg: str, level: int = logging.INFO) -> logging.LogRecord:
        return logging.LogRecord("flwr", level, __file__, 1, msg, None, None)

    assert not f.filter(rec("[ROUND 1/2]"))  # the project's round line marks the round
    assert f.filter(rec("Starting Flower Simulation"))
    assert not f.filter(rec("\t└──> MetricRecord: {'global_loss': 0.4}"))
    assert not f.filter(rec(""))
    assert not f.filter(rec("Final results:")) and not f.filter(rec("\t  2: { 'global_accuracy': '9.4986e-01',"))
    assert f.filter(rec("something went wrong", logging.WARNING))  # warnings pass, but for one that never applies
    assert not f.filter(rec("Since flwr 1.32, default simulated SuperNodes changed from 10 to 2.", logging.WARNING))


def test_growth_log_names_every_layer_it_counts_or_says_how_many_more():
    from fedlowrank.methods.inrank import describe_growth

    few = {"a": (2, 4), "b": (3, 6)}
    assert describe_growth(few) == "grew 2 layers: a 2->4, b 3->6"
    many = {f"h.{i}.mlp": (1, 2) for i in range(8)}
    text = describe_growth(many)
    assert text.startswith("grew 8 layers: ") and text.count("->") == 6 and text.endswith("and 2 more")


def test_central_summary_lines_report_ppl_params_ranks_time_and_paths(tmp_path):
    from fedlowrank.central import summary_lines

    summary = {"step": 30, "final_eval": {"step": 30, "loss": 3.2875, "ppl": 26.78}, "params": 91072,
               "trainable_params": 91072, "compression": {"params_if_dense": 124672},
               "ranks": {f"h.{i}.mlp.c_fc": 32 for i in range(8)}, "tokens_per_s": 13180.4, "tokens_seen": 30720}
    text = "\n".join(summary_lines(summary, str(tmp_path), 4.5))
    assert "held-out loss 3.2875, ppl 26.78" in text and "4.5 s wall" in text
    assert "parameters 91,072 stored (0.730x the dense model's 124,672)" in text
    assert "final ranks (8 layers)" in text and text.count(" 32") == 6 and ", ..." in text
    assert "13,180 tokens/s" in text
    assert f"summary: {tmp_path / 'summary.json'}" in text and f"tensorboard --logdir {tmp_path}" in text


def test_federated_summary_lines_report_accuracy_budgets_bytes_and_paths(tmp_path):
    from fedlowrank.federated.report import summary_lines

    summary = {"strategy": "slice", "num_clients": 4, "rounds": 2,
               "final": {"global_accuracy": 0.95, "global_loss": 0.2, "ratio0.1_accuracy": 0.72,
                         "ratio1.0_accuracy": 0.95, "sim_time_s": 12.5, "clients_mean_accuracy": 0.9,
                         "clients_p10_accuracy": 0.8, "clients_p90_accuracy": 0.97, "clients_worst_accuracy": 0.7,
                         "ratio0.1_clients_mean_accuracy": 0.6},
               "rounds_detail": [{"upload_bytes": 1_000_000, "download_bytes": 2_000_000}] * 2,
               "global_model_bytes": 186_000, "dense_model_bytes": 104_000}
    text = "\n".join(summary_lines(summary, str(tmp_path), 15.1))
    assert "slice · 4 clients · 2 rounds · 15.1 s wall" in text and "global accuracy 0.9500" in text
    assert "at each budget: ratio0.1 0.7200, ratio1.0 0.9500\n" in text + "\n"  # client figures have their own line
    assert "clients on their held-out data: mean 0.9000, p10 0.8000, p90 0.9700, worst 0.7000" in text
    assert "2.00 MB up, 4.00 MB down" in text and "simulated device time 12.50 s" in text
    assert f"summary: {tmp_path / 'metrics.json'}" in text and "excluded" not in text
    summary["excluded"] = {"3": 2}
    text = "\n".join(summary_lines(summary, str(tmp_path), 15.1))
    assert "excluded by the screen (trained without from then on): client 3 in round 2" in text



def test_the_relay_marks_the_summary_done_at_its_last_line_and_not_before(tmp_path):
    """The SuperLink runtime stops Flower's shutdown short once the relay has re-logged the summary's last line:
    the flag must rise on exactly that line as the ServerApp logs it (``summary_lines`` through
    ``log_to_stderr``'s format), not on an earlier line, another logger's or Flower's echo of the same text."""
    from fedlowrank.federated.report import summary_lines

    lines = summary_lines({"strategy": "slice", "num_clients": 4, "rounds": 2, "final": {"global_accuracy": 0.9}},
                          str(tmp_path), 1.0)
    relay = StreamRelay()
    for decoy in (f"INFO fedlowrank.federated.strategy: {lines[-1]}", f"\x1b[92mINFO \x1b[0m:      {lines[-1]}"):
        relay(decoy)
    for line in lines:
        assert not relay.summary_done.is_set()
        relay(f"INFO fedlowrank.federated.server: {line}")
    assert relay.summary_done.is_set()

@pytest.mark.timeout(240)
def test_central_run_logs_its_output_dir_first_and_summary_last(tmp_path, caplog):
    from helpers import FAST, compose_cfg

    from fedlowrank.central import run

    caplog.set_level(logging.INFO)
    run(compose_cfg("mode=central", "experiment=gpt2_full", *FAST, f"out_dir={tmp_path}", "trainer.max_steps=4",
                    "trainer.eval_interval=4"))
    msgs = [r.getMessage() for r in caplog.records if r.name == "fedlowrank.central"]
    assert msgs[0].endswith(f"output in {tmp_path}")
    assert msgs[1].startswith("central run finished at step 4") and "held-out loss" in msgs[2]
    assert msgs[-1] == f"  tensorboard --logdir {tmp_path}"


def test_one_readable_line_per_round():
    from fedlowrank.federated.report import round_line

    res = {"global_loss": 0.1508, "global_accuracy": 0.9721, "ratio0.1_accuracy": 0.9081, "ratio1.0_accuracy": 0.9721,
           "clients_mean_accuracy": 0.9514, "clients_p10_accuracy": 0.9139, "clients_p90_accuracy": 0.97,
           "ratio0.1_clients_mean_accuracy": 0.5}
    train = {"round": 15, "clients_ok": 3, "failures": 1, "rejected": 0, "train_loss": 0.0288,
             "upload_bytes": 358816, "download_bytes": 2 * 358816}
    line = round_line(15, 15, res, train)
    assert line == ("round 15/15: accuracy 0.9721 (loss 0.1508) | budgets 0.1 0.908, 1.0 0.972 | clients mean 0.951, "
                    "p10 0.914 | 3 trained, 1 failed, train loss 0.0288, 0.34 MB up, 0.68 MB down")
    assert round_line(0, 15, res, train).endswith("p10 0.914")  # the initial evaluation has no training part
    train["round"] = 3  # a round fed.eval_every skips: its training alone
    assert round_line(3, 15, {}, train) == ("round 3/15: not evaluated (fed.eval_every) | 3 trained, 1 failed, train "
                                            "loss 0.0288, 0.34 MB up, 0.68 MB down")


def test_clipping_is_one_info_line_per_round_never_a_warning_per_client(tmp_path, caplog):
    """Clipping (the default where no screen runs) scaled honest clients and printed a WARNING for each, every
    round; it is one INFO line with the counts (the record keeps each client's excess)."""
    import logging

    from fedlowrank.runtime.inprocess import InProcessGrid, make_strategy

    from helpers import fed_run as _run

    run = _run(tmp_path, "fed.num_clients=4", "fed.screen=none")  # no screen: clipping at 1.5 (fed.clip_auto=auto)
    st, grid = make_strategy(run), InProcessGrid(run)
    with caplog.at_level(logging.INFO, logger="fedlowrank.federated.strategy"):
        for rnd in range(1, 7):
            st.aggregate_train(rnd, grid.send_and_receive(list(st.configure_train(rnd, None, None, grid))))
    clip = [r for r in caplog.records if "clipping" in r.getMessage()]
    excess = [c for h in st.history for c in h["clients"] if c.get("clipped_excess")]
    assert excess, "the setting must make clipping act, or the test shows nothing"
    assert len(clip) <= 6 and all(r.levelno == logging.INFO for r in clip)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_each_budgets_model_size_against_an_independent_count_and_the_why(tmp_path):
    """A budget's model holds (m + n)·r (+ bias) per factorized m x n layer and the dense layers as they are: the
    summary's numbers equal that count from the dense model's shapes, and the line says why full rank is larger."""
    import math

    from torch import nn

    from fedlowrank.federated.report import summary_lines
    from fedlowrank.federated.server import _ServerRun
    from fedlowrank.federated.task import build_model

    from helpers import fed_run as _run

    run = _run(tmp_path, "fed.num_clients=4", "fed.eval_budgets=true")
    sizes = _ServerRun(run)._budget_params()
    dense = build_model(run)
    import re

    skip = run.model.get("skip") or []  # layers the config keeps dense (the MLP's head)
    linears = [m for n, m in dense.named_modules() if isinstance(m, nn.Linear) and not any(re.search(r, n) for r in skip)]
    assert linears and len(linears) < sum(isinstance(m, nn.Linear) for m in dense.modules())
    others = sum(p.numel() for p in dense.parameters()) - sum(m.weight.numel() for m in linears)
    for ratio in run.fed.rank_ratios:
        want = others + sum((m.in_features + m.out_features) * max(1, math.ceil(ratio * min(m.weight.shape) - 1e-9))
                            for m in linears)
        assert sizes[f"ratio{ratio}"] == want, (ratio, sizes)
    total = sum(p.numel() for p in dense.parameters())
    text = "\n".join(summary_lines({"budget_params": sizes, "dense_params": total}, str(tmp_path), 1.0))
    assert f"ratio1.0 {sizes['ratio1.0']:,} ({sizes['ratio1.0'] / total:.2f}x, " in text and "(m+n)·r" in text
    params = _ServerRun(_run(tmp_path / "p", "fed.num_clients=4", "fed.budget_unit=params"))._budget_params()
    assert sorted(params) == [f"params{r}" for r in sorted(run.fed.rank_ratios)] and max(params.values()) <= total
    text = "\n".join(summary_lines({"budget_params": params, "dense_params": total}, str(tmp_path), 1.0))
    assert "(m+n)·r" not in text and f"params1.0 {params['params1.0']:,}" in text


def test_tensorboard_overlays_every_budgets_accuracy_and_the_report_has_its_panels(tmp_path):
    """The event files carry a custom-scalars layout whose budget chart matches exactly the global model's and
    every budget's accuracy tags the run wrote (not the per-budget client statistics), and report.png is drawn."""
    import re

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.plugins.custom_scalar import layout_pb2

    from fedlowrank.federated.server import _ServerRun
    from fedlowrank.runtime.inprocess import InProcessGrid

    from helpers import fed_run as _run

    run = _run(tmp_path, "fed.num_clients=4", "fed.eval_budgets=true", "fed.rounds=1", "fed.local_steps=2")
    sr, grid = _ServerRun(run), InProcessGrid(run)
    sr.evaluate(0, sr.strategy.global_state)
    st = sr.strategy
    st.aggregate_train(1, grid.send_and_receive(list(st.configure_train(1, None, None, grid))))
    sr.evaluate(1, st.global_state)
    sr.writers.close()
    summary = sr.finish(0.0)
    event_files = sorted((tmp_path / "tb").glob("events.out.tfevents.*"))
    layout = None
    for f in event_files:
        for ev in EventFileLoader(str(f)).Load():
            for v in ev.summary.value:
                if v.tag == "custom_scalars__config__":
                    layout = layout_pb2.Layout.FromString(v.tensor.string_val[0])
    assert layout is not None
    charts = {c.title: c for cat in layout.category for c in cat.chart}
    regex = charts["accuracy per budget (test set)"].multiline.tag[0]
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    want = {"global/global_accuracy"} | {f"global/ratio{r}_accuracy" for r in run.fed.rank_ratios}
    assert {t for t in tags if re.search(regex, t)} == want
    assert any("clients_mean_accuracy" in t for t in tags)  # present, and left out of the budget chart
    assert summary["report_png"] and Path(summary["report_png"]).stat().st_size > 10_000


def test_partition_assignment_is_one_short_line_grouped_by_budget(tmp_path, caplog):
    """The server logged the assignment as a dict with one entry per partition (a 1000-entry wall of text at
    1000 clients); it is one line with each budget's count, its first ids and its last, checked against the
    budgets the config gives each partition."""
    import logging
    import re

    from fedlowrank.runtime.inprocess import InProcessGrid, make_strategy

    from helpers import fed_run as _run

    run = _run(tmp_path, "fed.num_clients=200", "fed.fraction_train=0.05")
    st, grid = make_strategy(run), InProcessGrid(run)
    with caplog.at_level(logging.INFO, logger="fedlowrank.federated.strategy"):
        list(st.configure_train(1, None, None, grid))
    [line] = [r.getMessage() for r in caplog.records if "partitions assigned" in r.getMessage()]
    assert len(line) < 300, line
    expected: dict[str, list[int]] = {}
    for pid in range(200):
        expected.setdefault(", ".join(f"{k}={v}" for k, v in run.fed.budget(pid).items()), []).append(pid)
    assert len(expected) == 4  # the default four budgets, or the line shows nothing grouped
    for budget, pids in expected.items():
        m = re.search(re.escape(budget) + r": (\d+) \((\d+), (\d+), (\d+), \.\.\., (\d+)\)", line)
        assert m, (budget, line)
        assert [int(g) for g in m.groups()] == [len(pids), *pids[:3], pids[-1]]


def test_the_simulation_runtimes_deprecation_and_rays_address_lookup_are_dropped_other_warnings_kept(caplog):
    """fed.runtime=simulation: Flower's run_simulation deprecation (three lines, the user chose the runtime and the
    run's first line names it) and Ray's lookup of its address in the private network (no route out, by design)
    are dropped from the relay; any other Flower warning still shows."""
    caplog.set_level(logging.DEBUG)
    relay = StreamRelay()
    for line in ["\x1b[93mWARNING \x1b[0m:   DEPRECATED FEATURE: The `run_simulation` function is deprecated and will "
                 "be removed in a future version of Flower. Please use `flwr run` in the CLI instead.",
                 "\x1b[92mINFO \x1b[0m:      This is a deprecated feature. It will be removed",
                 "\x1b[92mINFO \x1b[0m:      entirely in future versions of Flower.",
                 "[2026-12-05 21:26:13,452 W 7881 7881] network_util.cc:296: Failed to determine local IP via "
                 "external connectivity to: 8.8.8.8:53, falling back to hostname resolution",
                 "\x1b[93mWARNING \x1b[0m:   DEPRECATED FEATURE: some other function is deprecated"]:
        relay(line)
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("WARNING", "DEPRECATED FEATURE: some other function is deprecated")]
    f = FlowerNoiseFilter()  # the same in the process that runs run_simulation
    rec = logging.LogRecord("flwr", logging.WARNING, __file__, 1, "DEPRECATED FEATURE: The `run_simulation` function "
                            "is deprecated and will be removed", None, None)
    assert not f.filter(rec)
