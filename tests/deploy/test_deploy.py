"""Deployment as documented: a SuperLink and N SuperNodes on 127.0.0.1 (--insecure), `flwr run` of this
project for 2 rounds within a bounded time; only the processes this test started are stopped."""
import json

import pytest

from fedlowrank.deploy.loopback import flwr_run, loopback_deployment
from fedlowrank.runtime.reaper import group_alive

pytestmark = pytest.mark.slow


@pytest.mark.timeout(600)
@pytest.mark.parametrize("warm,poll", [(False, None), (True, 0.1)], ids=["subprocess", "warm-executor-fastnode"])
def test_superlink_and_supernodes_run_two_rounds(tmp_path, warm, poll):
    n = 3
    with loopback_deployment(n, tmp_path, {"FEDLOWRANK_CACHE_DIR": str(tmp_path / "cache")}, warm=warm,
                             node_poll_s=poll) as lb:
        overrides = f"fed.num_clients={n} fed.rank_ratios=[0.25,1.0] fed.rounds=2 fed.local_epochs=1 fed.timeout=240"
        res = flwr_run(lb, overrides, "runs/deployed", timeout=480)
        metrics = tmp_path / "runs" / "deployed" / "metrics.json"
        logs = "\n".join((tmp_path / f).read_text()[-1500:] for f in ("superlink.log", "node0.log"))
        assert metrics.exists(), f"flwr run rc={res.returncode}\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}\n{logs}"
        m = json.loads(metrics.read_text())
        assert m["rounds"] == 2 and len(m["rounds_detail"]) == 2 and m["num_clients"] == n
        assert all(r["clients_ok"] == n for r in m["rounds_detail"])
        assert m["final"]["global_accuracy"] > m["initial"]["global_accuracy"] + 0.1
        assert (tmp_path / "runs" / "deployed" / "report.png").exists()
        assert any((tmp_path / "cache" / "fed-data").iterdir())  # nodes cached their data and partitions
        if warm:  # every node's ClientApps were forked by its warm executor, none started by flower-superexec
            for i in range(n):
                assert "forked ClientApp child" in (tmp_path / f"warmexec{i}.log").read_text()
        pids = [p.pid for p in lb.procs]
    assert len(pids) == (2 * n + 1 if warm else n + 1) and not [p for p in pids if group_alive(p)]  # nothing of ours is left running


@pytest.mark.timeout(600)
def test_main_on_the_non_deprecated_simulation_runtime(tmp_path):
    """`python main.py mode=federated fed.runtime=superlink`: a private SuperLink in simulation mode, `flwr run`
    with the resolved config, the summary back from metrics.json, and nothing left running afterwards."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "run"
    cmd = [sys.executable, "main.py", "mode=federated", "fed.runtime=superlink", "fed.num_clients=3",
           "fed.rank_ratios=[0.25,1.0]", "fed.rounds=2", "fed.local_epochs=1", f"out_dir={out}"]
    before = {p for p in os.listdir("/proc") if p.isdigit()}
    proc = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["rounds"] == 2 and all(r["clients_ok"] == 3 for r in m["rounds_detail"])
    assert m["final"]["global_accuracy"] > m["initial"]["global_accuracy"] + 0.1
    assert "run_simulation" not in proc.stderr  # the deprecated entry point was not used
    left = []
    for p in {p for p in os.listdir("/proc") if p.isdigit()} - before:
        try:
            cmdline = Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "flower-superlink" in cmdline or "flower-superexec" in cmdline:
            left.append(cmdline)
    assert not left, left
