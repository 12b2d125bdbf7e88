"""The benchmarks' statistics: confidence intervals and paired tests against scipy's own routines, and the
federated quality benchmark's pairing by seed (a run order that interleaves seeds must not change the result)."""
from __future__ import annotations

import random
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _common import ci95, paired  # noqa: E402
import bench_fed_quality as bq  # noqa: E402


@pytest.mark.parametrize("xs", [[0.91, 0.93, 0.92, 0.95, 0.90], [1.0, -2.0], [3.5, 3.1, 2.8, 4.0, 3.3, 3.9, 2.2]])
def test_ci95_is_scipys_t_interval(xs):
    lo, hi = stats.t.interval(0.95, len(xs) - 1, loc=np.mean(xs), scale=stats.sem(xs))
    assert ci95(xs) == pytest.approx([lo, hi], rel=1e-12)
    assert ci95([1.0]) is None


def test_paired_matches_ttest_rel():
    rng = np.random.default_rng(0)
    a = rng.normal(0.9, 0.02, 6)
    for shift, expect_sig in ((0.05, True), (0.0, None)):
        b = a + shift + rng.normal(0, 0.005, 6)
        d = paired(list(b - a))
        ref = stats.ttest_rel(b, a)
        assert d["p"] == pytest.approx(ref.pvalue, rel=1e-9)
        assert d["significant"] == (ref.pvalue < 0.05)  # the CI excludes 0 exactly when p < 0.05
        if expect_sig is not None:
            assert d["significant"] is expect_sig
    assert paired([0.5, 0.5, 0.5])["significant"] is True  # zero spread, non-zero mean
    assert paired([0.0, 0.0])["significant"] is False


def _run(setting, strategy, seed, acc):
    return {"task": "t", "setting": setting, "strategy": strategy, "seed": seed, "global": acc, "wall_s": 1.0}


def test_summarise_pairs_by_seed_not_by_order():
    """Seed s of each strategy is compared with seed s of FedAvg, and treatments with the first setting."""
    task = bq.Task(base=[], settings={"plain": [], "prox": []}, treatments=True, strategies=["fedavg", "slice"])
    base = {0: 0.80, 1: 0.90, 2: 0.70, 3: 0.85}
    runs = [_run(st, s, seed, base[seed] + (0.01 * seed if s == "slice" else 0) + (0.02 if st == "prox" else 0))
            for st in ("plain", "prox") for s in ("fedavg", "slice") for seed in base]
    random.Random(1).shuffle(runs)
    res = bq.summarise(task, runs)
    d = res["plain"]["slice"]["vs_fedavg_pt"]
    assert d["mean"] == pytest.approx(100 * np.mean([0.01 * s for s in base]))
    assert d["ci95"][1] - d["ci95"][0] == pytest.approx(2 * stats.t.ppf(0.975, 3) * stats.sem([1, 2, 3, 0]) * 1.0)
    t = res["prox"]["fedavg"]["vs_plain_pt"]
    assert t["mean"] == pytest.approx(2.0) and t["significant"]
    assert "vs_plain_pt" not in res["plain"]["fedavg"] and "vs_fedavg_pt" not in res["plain"]["fedavg"]
    assert res["plain"]["fedavg"]["global"]["mean"] == pytest.approx(np.mean(list(base.values())))
    # settings that are different datasets (not treatments) are never paired with each other
    task.treatments = False
    assert "vs_plain_pt" not in bq.summarise(task, runs)["prox"]["fedavg"]


def test_summarise_leaves_diverged_runs_out_and_counts_them():
    task = bq.Task(base=[], settings={"plain": []}, strategies=["fedavg", "slice"])
    runs = [_run("plain", "fedavg", s, a) for s, a in enumerate([0.80, 0.90, 0.70, 0.85])]
    runs += [_run("plain", "slice", s, a) for s, a in enumerate([0.81, float("nan"), 0.73, 0.86])]
    runs[5]["diverged_at_round"] = 7
    row = bq.summarise(task, runs)["plain"]["slice"]
    assert row["diverged"] == "1/4" and bq.summarise(task, runs)["plain"]["fedavg"]["diverged"] == "0/4"
    assert row["global"]["mean"] == pytest.approx(np.mean([0.81, 0.73, 0.86]))
    assert row["vs_fedavg_pt"]["n"] == 3 and row["vs_fedavg_pt"]["mean"] == pytest.approx(np.mean([1.0, 3.0, 1.0]))
    assert "diverged in 1/4" in bq.markdown(task, bq.summarise(task, runs))


@pytest.mark.timeout(120)
def test_a_benchmark_killed_with_sigterm_stops_the_contender_it_runs(tmp_path):
    """``run_sampled``: SIGTERM to the benchmark (as ``pkill`` sends) ends the process it is measuring too."""
    import os
    import signal
    import subprocess
    import time

    pid_file = tmp_path / "child.pid"
    child = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(120)"
    driver = (f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parents[1] / 'benchmarks')!r}); "
              f"from _common import run_sampled; run_sampled([sys.executable, '-c', {child!r}], '.')")
    bench = subprocess.Popen([sys.executable, "-c", driver])
    deadline = time.time() + 60
    while not (pid_file.exists() and pid_file.read_text()) and time.time() < deadline:
        time.sleep(0.1)
    pid = int(pid_file.read_text())
    bench.send_signal(signal.SIGTERM)
    assert bench.wait(timeout=60) == 143
    with pytest.raises(ProcessLookupError):  # reaped by the benchmark: gone, not a zombie
        os.kill(pid, 0)
